//! regmirror: a pull-through caching mirror for container registries.
//!
//! Docker, containerd and podman pull through it; it resolves each pull against an upstream
//! registry, streams blobs to the client while hashing them into a content-addressed disk
//! cache, commits a blob only when its sha256 matches, and serves later pulls locally.
//!
//! # Layout
//! - [`config`]: clap flags + TOML file + `REGMIRROR_*` env -> one validated `Config`.
//! - [`reference`]: `RepoName`, `Tag`, `Digest`: validated once at the edge, trusted after.
//! - [`routes`]: a pure parse of method + path into a `Route`.
//! - [`server`]: the accept loop, connection limits, TLS handshakes, graceful shutdown.
//! - [`tls`]: HTTPS with certificates reloaded when their files change.
//! - [`access`]: client network allow-list and Basic auth (htpasswd, bcrypt).
//! - [`handler`]: HTTP framing of one request: route, call the mirror, write headers.
//! - [`mirror`]: the pull-through logic for manifests, tags, blobs and tag lists.
//! - [`fetch`]: single-flight blob fills: one upstream download, many readers.
//! - [`keyed_locks`]: single-flight for manifests: one fetch per reference at a time.
//! - [`store`]: content-addressed files on disk with atomic commits.
//! - [`shared`]: the tier replicas share in an S3-compatible object store.
//! - [`cluster`]: replicas acting as one cache: rendezvous owners, peer streaming.
//! - [`index`]: sizes and recency of cached files; LRU eviction decisions under the bound.
//! - [`upstream`]: the registry client: auth challenges, token cache, retries, redirects.
//! - [`range`]: `Range` header parsing.
//! - [`error`]: the request error and its one mapping to OCI error responses.
//! - [`manifest`]: what a manifest references (for `ls`, pinning, export).
//! - [`maintenance`]: the offline commands `ls`, `verify`, `gc`.
//! - [`metrics`]: the Prometheus metrics of the contract.
//! - [`image_ref`]: image references as operators type them (`alpine:3.20`), qualified.
//! - [`oci`]: descriptors and manifest shapes with sizes, platforms and annotations.
//! - [`seed`]: `seed`: images pulled into the cache through the mirror's own fill path.
//! - [`progress`]: progress bars on a terminal, plain lines otherwise.
//! - [`archive`]: `export` and `import` of OCI image layout tars, verified, all or nothing.

pub mod access;
pub mod archive;
pub mod cluster;
pub mod config;
pub mod error;
pub mod fetch;
pub mod handler;
pub mod image_ref;
pub mod index;
pub mod keyed_locks;
pub mod maintenance;
pub mod manifest;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod progress;
pub mod range;
pub mod reference;
pub mod routes;
pub mod seed;
pub mod server;
pub mod shared;
pub mod store;
pub mod tls;
pub mod upstream;
