//! Harness for regmirror's integration tests: real registries, real clients
//! and the real `regmirror` binary, all on 127.0.0.1.
//!
//! - [`shared`]: what every test shares, started once per binary: the OCI
//!   layout of fixture images, a plain upstream and a token-auth upstream
//!   with the fixtures pushed ([`registry`], [`upstream`], [`token`],
//!   [`images`]); the containerd and dockerd daemons live in [`clients`].
//! - [`mirror`]: a mirror process per test, with its own cache dir and log;
//!   [`metrics`] reads its counters.
//! - [`clients`]: skopeo, ctr, docker and podman pulling through a mirror.
//! - [`garage`]: a real Garage cluster (S3-compatible object store), the
//!   shared storage tier of mirror replicas; one per binary or per test.
//! - [`fake_upstream`], [`in_process`]: a scriptable upstream for faults the real
//!   registry cannot produce, and a mirror served in-process in front of it.
//! - [`process`], [`wait`], [`workdir`], [`http`]: plumbing that keeps
//!   processes from outliving the binary, polls instead of sleeping, and
//!   keeps files in temp dirs and logs where a failed run can be read.

pub mod clients;
pub mod fake_upstream;
pub mod garage;
pub mod http;
pub mod images;
pub mod in_process;
pub mod metrics;
pub mod mirror;
pub mod process;
pub mod registry;
pub mod shared;
pub mod token;
pub mod upstream;
pub mod wait;
pub mod workdir;
