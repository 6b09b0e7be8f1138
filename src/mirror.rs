//! The pull-through logic: answer from the cache when it can, else from the upstream, filling
//! the cache on the way. HTTP framing lives in `handler`; this module speaks in manifests,
//! blobs and tag lists.
//!
//! Manifests are cached by digest, exactly as fetched. A tag is a record `tag -> digest`
//! trusted for `tag_ttl`; after that a `HEAD` (free on Docker Hub's pull limit) revalidates
//! it. When the upstream is down or limits us, a cached tag is served stale rather than
//! failing a pull that the cache can answer.
//!
//! With a shared tier (`[storage] backend = "s3"`), the local disk is the first tier and the
//! object store the second: a manifest or tag record missing locally is looked up there
//! before the upstream, and whatever comes from the upstream is written there too, so every
//! replica benefits. A tag record keeps the time it was checked upstream wherever it is
//! copied, so `tag_ttl` holds across replicas. Blobs go through the fills (see `fetch`).

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode, header};

use crate::cluster::Cluster;
use crate::config::Config;
use crate::error::Error;
use crate::fetch::{BlobHandle, Fills, Origin};
use crate::keyed_locks::KeyedLocks;
use crate::metrics::{Kind, Metrics, Source};
use crate::reference::{Digest, Reference, RepoName, Tag};
use crate::shared::{SharedError, SharedTier};
use crate::store::{Store, StoredManifest, TagRecord, unix_now};
use crate::upstream::{MANIFEST_ACCEPT, Upstream, UpstreamError, read_limited};

/// Manifests larger than this are refused, as the distribution spec allows and Docker does.
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// The media types we cache tags for: what [`MANIFEST_ACCEPT`] asks for.
const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

pub struct Mirror {
    config: Config,
    store: Store,
    upstreams: Vec<Arc<Upstream>>,
    fills: Fills,
    metrics: Arc<Metrics>,
    /// The object store replicas share, if configured.
    shared: Option<Arc<SharedTier>>,
    /// The other replicas, if configured.
    cluster: Option<Arc<Cluster>>,
    /// Manifests the upstream said do not exist, remembered for `negative_ttl`.
    unknown_manifests: moka::sync::Cache<(String, RepoName, String), ()>,
    /// One manifest fetch per (upstream, repository, reference) at a time.
    manifest_fetches: KeyedLocks<(String, RepoName, String)>,
    /// Referrers answers, trusted for `tag_ttl` like tags.
    referrers: moka::sync::Cache<(String, RepoName, Digest, Option<String>), JsonAnswer>,
}

/// Bounds the in-memory answer caches (entries, not bytes: each is small).
const ANSWER_CACHE_ENTRIES: u64 = 10_000;

/// A manifest ready to serve.
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    /// Whether it came from the cache (or was just fetched from the upstream).
    pub source: Source,
    /// For an answer by tag: when the tag was last confirmed upstream (Unix seconds), which
    /// a replica passes on to the replica that forwarded the request.
    pub checked_at: Option<u64>,
}

/// A small JSON answer passed through from the upstream (tag lists, referrers).
#[derive(Clone)]
pub struct JsonAnswer {
    pub content_type: String,
    pub body: Bytes,
    /// Headers worth passing on (`Link` for pagination, `OCI-Filters-Applied`).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// [`Store::open`] or [`Store::open_shared`].
type OpenStore = fn(&std::path::Path, u64, Arc<Metrics>) -> std::io::Result<Store>;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open cache directory {path}: {source}")]
    Store { path: String, source: std::io::Error },
    #[error("cannot build the HTTP client for upstream {name}: {source}")]
    Client { name: String, source: crate::upstream::ClientError },
    #[error("cannot set up shared storage: {0}")]
    Shared(#[from] SharedError),
    #[error("cannot build the HTTP client for the other replicas: {0}")]
    Cluster(reqwest::Error),
}

impl Mirror {
    /// Opens the cache and prepares the upstream clients. Contacts no upstream: the mirror
    /// starts and serves its cache even when every upstream is down.
    pub fn open(config: Config) -> Result<Arc<Mirror>, StartError> {
        Self::open_with(config, Store::open)
    }

    /// Like [`Mirror::open`], for a command that fills a cache a running mirror may be
    /// serving (`seed`): see [`Store::open_shared`].
    pub fn open_shared(config: Config) -> Result<Arc<Mirror>, StartError> {
        Self::open_with(config, Store::open_shared)
    }

    fn open_with(config: Config, open_store: OpenStore) -> Result<Arc<Mirror>, StartError> {
        let metrics = Arc::new(Metrics::new());
        let store_error = |source| StartError::Store { path: config.cache_dir.display().to_string(), source };
        let store = open_store(&config.cache_dir, config.max_cache_size, metrics.clone()).map_err(store_error)?;
        store.pin(&config.pinned).map_err(store_error)?;
        store.enforce_bound();
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                Upstream::new(u.clone(), metrics.clone(), config.offline)
                    .map(Arc::new)
                    .map_err(|source| StartError::Client { name: u.name.clone(), source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        metrics.cache_max_size_bytes.set(config.max_cache_size.min(i64::MAX as u64) as i64);
        let cluster = match &config.cluster {
            Some(c) => Some(Arc::new(Cluster::new(c, metrics.clone()).map_err(StartError::Cluster)?)),
            None => None,
        };
        let shared = match &config.storage {
            Some(s3) => Some(Arc::new(SharedTier::open(s3, &replica_id(&config), metrics.clone())?)),
            None => None,
        };
        let fills = Fills::new(store.clone(), metrics.clone(), shared.clone(), cluster.clone());
        let unknown_manifests = moka::sync::Cache::builder()
            .max_capacity(ANSWER_CACHE_ENTRIES)
            .time_to_live(config.negative_ttl.max(std::time::Duration::from_millis(1)))
            .build();
        let referrers = moka::sync::Cache::builder()
            .max_capacity(ANSWER_CACHE_ENTRIES)
            .time_to_live(config.tag_ttl.max(std::time::Duration::from_millis(1)))
            .build();
        let manifest_fetches = KeyedLocks::new();
        Ok(Arc::new(Mirror {
            config,
            store,
            upstreams,
            fills,
            metrics,
            shared,
            cluster,
            unknown_manifests,
            manifest_fetches,
            referrers,
        }))
    }

    /// Starts what a serving replica runs in the background: membership and peer probes,
    /// and the shared tier's access records and size bound. Needs a Tokio runtime.
    pub fn spawn_background(self: &Arc<Self>) {
        if let Some(cluster) = &self.cluster {
            tokio::spawn(cluster.clone().run());
        }
        if let (Some(shared), Some(s3)) = (&self.shared, &self.config.storage) {
            let (shared, cluster, interval) = (shared.clone(), self.cluster.clone(), s3.maintenance_interval);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks.tick().await;
                loop {
                    ticks.tick().await;
                    if let Err(error) = shared.flush_accesses().await {
                        tracing::warn!(%error, "could not write this replica's access record");
                        continue;
                    }
                    if cluster.as_ref().is_none_or(|c| c.keeps_shared_bound())
                        && let Err(error) = shared.enforce_bound().await
                    {
                        tracing::warn!(%error, "could not trim shared storage to its bound");
                    }
                }
            });
        }
    }

    /// Waits for blob uploads to the shared tier still running, at most `timeout` (a process
    /// about to exit would otherwise cut them: the blobs would stay local only).
    pub async fn finish_uploads(&self, timeout: std::time::Duration) {
        if let Some(shared) = &self.shared
            && !shared.wait_for_uploads(timeout).await
        {
            tracing::warn!("uploads to shared storage still running at exit: those blobs stay local");
        }
    }

    /// The shared tier, if any, and while it is marked down, how long until it is tried again.
    pub fn shared_health(&self) -> Option<(&str, Option<std::time::Duration>)> {
        self.shared.as_ref().map(|s| (s.description(), s.down_for()))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The metrics, for bodies that count bytes after the handler returned.
    pub fn metrics_arc(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The upstream a request is for: the one named by `?ns=`, else the default. A name that
    /// is not configured is refused: the mirror never contacts hosts it was not given.
    pub fn upstream(&self, ns: Option<&str>) -> Result<&Arc<Upstream>, Error> {
        match ns {
            None => Ok(&self.upstreams[0]),
            Some(name) => self
                .upstreams
                .iter()
                .find(|u| u.name() == name)
                .ok_or_else(|| Error::UnknownUpstream(name.chars().take(80).collect())),
        }
    }

    /// The upstream and repository a request is for. Besides `?ns=`, an upstream configured
    /// with `path_prefix = true` is also reached as `/v2/<upstream name>/<repository>/...`,
    /// for clients that cannot send `ns` (Docker's daemon mirrors only Docker Hub and
    /// podman's mirrors rewrite only the host; both can put the registry in the path).
    pub fn route(&self, ns: Option<&str>, name: &RepoName) -> Result<(&Arc<Upstream>, RepoName), Error> {
        if ns.is_none()
            && let Some((first, rest)) = name.as_str().split_once('/')
            && let Some(upstream) = self.upstreams.iter().find(|u| u.config().path_prefix && u.name() == first)
        {
            return Ok((upstream, RepoName::parse(rest)?));
        }
        Ok((self.upstream(ns)?, name.clone()))
    }

    /// Each upstream and, while it is marked down, how long until it is tried again.
    pub fn upstream_health(&self) -> Vec<(&str, Option<std::time::Duration>)> {
        self.upstreams.iter().map(|u| (u.name(), u.down_for())).collect()
    }

    /// The name a repository is cached under: the same for `alpine` and `library/alpine` on
    /// Docker Hub, so both share one cache entry.
    fn cache_name(&self, upstream: &Upstream, repo: &RepoName) -> RepoName {
        if upstream.config().is_docker_hub() && repo.is_single_component() {
            repo.with_prefix("library").unwrap_or_else(|_| repo.clone())
        } else {
            repo.clone()
        }
    }

    /// A manifest by tag or digest. `accept` is the client's Accept header; `forwarded`:
    /// another replica asks, so this one answers without forwarding again.
    pub async fn manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        reference: &Reference,
        accept: Option<&str>,
        forwarded: bool,
    ) -> Result<Manifest, Error> {
        let repo = self.cache_name(upstream, repo);
        let negative_key = (upstream.name().to_owned(), repo.clone(), reference.to_string());
        if self.unknown_manifests.contains_key(&negative_key) {
            return Err(Error::ManifestUnknown { upstream: upstream.name().to_owned() });
        }
        let answer = match reference {
            Reference::Digest(digest) => self.manifest_by_digest(upstream, &repo, digest, accept, forwarded).await,
            Reference::Tag(tag) => self.manifest_by_tag(upstream, &repo, tag, accept, forwarded).await,
        };
        if let Err(Error::Upstream { error: UpstreamError::Status { status: StatusCode::NOT_FOUND, .. }, .. }) = &answer
        {
            self.unknown_manifests.insert(negative_key, ());
        }
        answer
    }

    async fn manifest_by_digest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        accept: Option<&str>,
        forwarded: bool,
    ) -> Result<Manifest, Error> {
        let cached = |stored: StoredManifest| Manifest {
            digest: *digest,
            media_type: stored.media_type,
            bytes: stored.bytes,
            source: Source::Cache,
            checked_at: None,
        };
        if let Some(stored) = self.cached_manifest(digest).await? {
            self.metrics.hit(Kind::Manifest);
            return Ok(cached(stored));
        }
        let _fetching =
            self.manifest_fetches.lock((upstream.name().to_owned(), repo.clone(), digest.to_string())).await;
        if let Some(stored) = self.cached_manifest(digest).await? {
            self.metrics.hit(Kind::Manifest);
            return Ok(cached(stored));
        }
        self.metrics.miss(Kind::Manifest);
        let accept = accept.filter(|a| !a.trim().is_empty()).unwrap_or(MANIFEST_ACCEPT);
        if !forwarded
            && let Some(manifest) =
                self.manifest_from_owner(upstream, repo, &digest.to_string(), accept, Some(digest)).await
        {
            return Ok(manifest);
        }
        let manifest = self.fetch_manifest(upstream, repo, &digest.to_string(), accept, Some(digest)).await?;
        Ok(manifest)
    }

    async fn manifest_by_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        accept: Option<&str>,
        forwarded: bool,
    ) -> Result<Manifest, Error> {
        let ttl = upstream.config().tag_ttl.unwrap_or(self.config.tag_ttl);
        let mut cached = self.cached_tag(upstream, repo, tag, accept, ttl).await?;
        let from_cache = |record: &TagRecord, stored: &StoredManifest| Manifest {
            digest: record.digest,
            media_type: stored.media_type.clone(),
            bytes: stored.bytes.clone(),
            source: Source::Cache,
            checked_at: Some(record.checked_at),
        };
        if let Some((record, stored)) = &cached
            && unix_now().saturating_sub(record.checked_at) < ttl.as_secs()
        {
            self.metrics.hit(Kind::Manifest);
            return Ok(from_cache(record, stored));
        }
        // Ask with our full list when the client takes all of it, so the answer can be cached
        // for every client; otherwise with the client's own list, uncached as a tag.
        let full = accepts_all(accept);
        let ask = if full { MANIFEST_ACCEPT } else { accept.unwrap_or(MANIFEST_ACCEPT) };
        // One refresh per tag at a time: those who waited find the tag fresh.
        let _fetching = match full {
            true => Some(self.manifest_fetches.lock((upstream.name().to_owned(), repo.clone(), tag.to_string())).await),
            false => None,
        };
        if _fetching.is_some() {
            cached = self.cached_tag(upstream, repo, tag, accept, ttl).await?;
            if let Some((record, stored)) = &cached
                && unix_now().saturating_sub(record.checked_at) < ttl.as_secs()
            {
                self.metrics.hit(Kind::Manifest);
                return Ok(from_cache(record, stored));
            }
        }
        // In a cluster, the tag's owner replica checks it upstream for everyone.
        if full
            && !forwarded
            && let Some(manifest) = self.manifest_from_owner(upstream, repo, tag.as_str(), ask, None).await
        {
            let record = TagRecord {
                digest: manifest.digest,
                media_type: manifest.media_type.clone(),
                checked_at: manifest.checked_at.unwrap_or_else(unix_now),
            };
            if let Err(error) = self.store.put_tag(upstream.name(), repo, tag, &record).await {
                self.cannot_store(&error);
            }
            return Ok(manifest);
        }
        if let Some((record, stored)) = &cached
            && self.revalidate(upstream, repo, tag, record).await
        {
            self.metrics.hit(Kind::Manifest);
            return Ok(from_cache(record, stored));
        }
        self.metrics.miss(Kind::Manifest);
        match self.fetch_manifest(upstream, repo, tag.as_str(), ask, None).await {
            Ok(mut manifest) => {
                if full {
                    let record = TagRecord {
                        digest: manifest.digest,
                        media_type: manifest.media_type.clone(),
                        checked_at: unix_now(),
                    };
                    manifest.checked_at = Some(record.checked_at);
                    if let Err(error) = self.store.put_tag(upstream.name(), repo, tag, &record).await {
                        self.cannot_store(&error);
                    }
                    self.share_tag(upstream, repo, tag, &record);
                    self.refresh_pins(upstream, repo).await;
                }
                Ok(manifest)
            }
            Err(error) if is_upstream_trouble(&error) => match cached {
                Some((record, stored)) => {
                    tracing::warn!(repo = %repo, tag = %tag, %error, "upstream unavailable: serving cached tag stale");
                    self.metrics.hit(Kind::Manifest);
                    Ok(from_cache(&record, &stored))
                }
                None => Err(error),
            },
            Err(error) => Err(error),
        }
    }

    /// The cached tag record and its manifest, if both exist and the client accepts its type.
    /// A record older than `ttl` is compared with the shared tier's, which another replica
    /// may have checked more recently.
    async fn cached_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        accept: Option<&str>,
        ttl: std::time::Duration,
    ) -> Result<Option<(TagRecord, StoredManifest)>, Error> {
        let mut record = self.store.tag(upstream.name(), repo, tag).await?;
        let fresh = |r: &TagRecord| unix_now().saturating_sub(r.checked_at) < ttl.as_secs();
        if !record.as_ref().is_some_and(fresh)
            && let Some(shared) = self.shared_tag(upstream, repo, tag).await
            && record.as_ref().is_none_or(|local| shared.checked_at > local.checked_at)
        {
            if let Err(error) = self.store.put_tag(upstream.name(), repo, tag, &shared).await {
                self.cannot_store(&error);
            }
            record = Some(shared);
        }
        let Some(record) = record else { return Ok(None) };
        if !accepts(accept, &record.media_type) {
            return Ok(None);
        }
        Ok(self.cached_manifest(&record.digest).await?.map(|m| (record, m)))
    }

    /// A manifest from the local tier, else from the shared tier (copied to the local one).
    async fn cached_manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, Error> {
        if let Some(stored) = self.store.manifest(digest).await? {
            return Ok(Some(stored));
        }
        let Some(shared) = &self.shared else { return Ok(None) };
        let stored = match shared.manifest(digest).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::debug!(%error, "shared manifest lookup failed");
                None
            }
        };
        if let Some(stored) = &stored {
            self.keep_manifest(digest, stored).await;
        }
        Ok(stored)
    }

    async fn shared_tag(&self, upstream: &Upstream, repo: &RepoName, tag: &Tag) -> Option<TagRecord> {
        let shared = self.shared.as_ref()?;
        match shared.tag(upstream.name(), repo, tag).await {
            Ok(record) => record,
            Err(error) => {
                tracing::debug!(%error, "shared tag lookup failed");
                None
            }
        }
    }

    /// Writes a tag record to the shared tier, in the background: the client does not wait.
    fn share_tag(&self, upstream: &Upstream, repo: &RepoName, tag: &Tag, record: &TagRecord) {
        let Some(shared) = self.shared.clone() else { return };
        let (name, repo, tag, record) = (upstream.name().to_owned(), repo.clone(), tag.clone(), record.clone());
        tokio::spawn(async move {
            if let Err(error) = shared.put_tag(&name, &repo, &tag, &record).await {
                tracing::warn!(%error, "could not write a tag record to shared storage");
            }
        });
    }

    /// Writes a manifest to the shared tier, in the background.
    fn share_manifest(&self, digest: &Digest, stored: &StoredManifest) {
        let Some(shared) = self.shared.clone() else { return };
        let (digest, stored) = (*digest, stored.clone());
        tokio::spawn(async move {
            if let Err(error) = shared.put_manifest(&digest, &stored).await {
                tracing::warn!(%error, "could not write a manifest to shared storage");
            }
        });
    }

    /// Asks the upstream (HEAD) whether `tag` still points at the cached digest. True when it
    /// does (the record is refreshed) or when the upstream cannot say (serve stale).
    async fn revalidate(&self, upstream: &Upstream, repo: &RepoName, tag: &Tag, record: &TagRecord) -> bool {
        let answer = upstream.manifest(Method::HEAD, repo, tag.as_str(), MANIFEST_ACCEPT).await;
        let current = match answer {
            Ok(r) if r.status().is_success() => r
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Digest::parse(v).ok()),
            // Gone upstream, or refused: fetch again and report what the upstream says.
            Ok(r) if matches!(r.status(), StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                return false;
            }
            Ok(r) => {
                tracing::warn!(repo = %repo, tag = %tag, status = %r.status(), "tag revalidation failed: serving cached tag stale");
                return true;
            }
            Err(error) => {
                tracing::warn!(repo = %repo, tag = %tag, %error, "tag revalidation failed: serving cached tag stale");
                return true;
            }
        };
        if current != Some(record.digest) {
            return false;
        }
        let refreshed = TagRecord { checked_at: unix_now(), ..record.clone() };
        if let Err(error) = self.store.put_tag(upstream.name(), repo, tag, &refreshed).await {
            tracing::warn!(%error, "could not refresh a tag record");
        }
        self.share_tag(upstream, repo, tag, &refreshed);
        true
    }

    /// GETs a manifest, verifies its digest (against `expected` and the upstream's
    /// `Docker-Content-Digest`), and stores it.
    async fn fetch_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        reference: &str,
        accept: &str,
        expected: Option<&Digest>,
    ) -> Result<Manifest, Error> {
        let response = upstream.manifest(Method::GET, repo, reference, accept).await;
        let response = response.and_then(|r| upstream.check(r)).map_err(|e| Error::upstream(Kind::Manifest, e))?;
        let (content_type, announced) = (header_text(&response, "content-type"), header_text(&response, DIGEST_HEADER));
        let bytes =
            read_limited(response, MAX_MANIFEST_SIZE).await.map_err(|e| Error::manifest_body(upstream.name(), e))?;
        upstream.count_bytes(bytes.len() as u64);

        let digest = Digest::of(&bytes);
        if let Some(claimed) = mismatched_claim(&digest, expected, announced) {
            self.metrics.digest_mismatches.with_label_values(&[upstream.name()]).inc();
            tracing::error!(repo = %repo, reference, expected = %claimed, actual = %digest, "manifest refused: digest mismatch");
            return Err(Error::ManifestDigestMismatch {
                upstream: upstream.name().to_owned(),
                expected: claimed,
                actual: digest.to_string(),
            });
        }
        let media_type = manifest_media_type(content_type.as_deref(), &bytes).ok_or_else(|| {
            Error::ManifestInvalid { upstream: upstream.name().to_owned(), reason: "not a JSON manifest".into() }
        })?;
        let stored = StoredManifest { bytes, media_type };
        self.keep_manifest(&digest, &stored).await;
        self.share_manifest(&digest, &stored);
        self.refresh_pins(upstream, repo).await;
        Ok(Manifest {
            digest,
            media_type: stored.media_type,
            bytes: stored.bytes,
            source: Source::Upstream,
            checked_at: None,
        })
    }

    /// Asks the replica that owns this manifest reference, when that is another one (see
    /// `cluster`): it answers from its cache or asks the upstream once for the whole cluster.
    /// `None` when there is no such replica or its answer is unusable; the caller then asks
    /// the upstream itself. The answer is verified like an upstream's and cached locally
    /// (the owner already shared it).
    async fn manifest_from_owner(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        reference: &str,
        accept: &str,
        expected: Option<&Digest>,
    ) -> Option<Manifest> {
        let cluster = self.cluster.as_ref()?;
        let owner = cluster.owner(format!("{}/{repo}:{reference}", upstream.name()).as_bytes())?;
        let response = match cluster.manifest(&owner, upstream.name(), repo, reference, accept).await {
            Ok(response) if response.status() == StatusCode::OK => response,
            Ok(response) => {
                tracing::debug!(replica = %owner, status = %response.status(), "owner replica could not answer a manifest");
                return None;
            }
            Err(error) => {
                tracing::warn!(replica = %owner, %error, "owner replica unreachable: asking the upstream");
                return None;
            }
        };
        let (content_type, announced) = (header_text(&response, "content-type"), header_text(&response, DIGEST_HEADER));
        let checked_at = header_text(&response, crate::cluster::CHECKED_AT_HEADER).and_then(|v| v.parse().ok());
        let bytes = read_limited(response, MAX_MANIFEST_SIZE).await.ok()?;
        let digest = Digest::of(&bytes);
        if let Some(claimed) = mismatched_claim(&digest, expected, announced) {
            tracing::error!(replica = %owner, repo = %repo, reference, expected = %claimed, actual = %digest, "owner replica sent a manifest that does not match its digest");
            return None;
        }
        let media_type = manifest_media_type(content_type.as_deref(), &bytes)?;
        let stored = StoredManifest { bytes, media_type };
        self.keep_manifest(&digest, &stored).await;
        Some(Manifest { digest, media_type: stored.media_type, bytes: stored.bytes, source: Source::Cache, checked_at })
    }

    /// Stores a verified manifest in the local tier; a failure only costs a later refetch.
    async fn keep_manifest(&self, digest: &Digest, stored: &StoredManifest) {
        if let Err(error) = self.store.put_manifest(digest, stored).await {
            self.cannot_store(&error);
        }
    }

    /// A blob: from the cache, or streamed from a (shared) fill. `forwarded`: another
    /// replica asks (see `cluster`), so this one fills it without forwarding again.
    pub async fn blob(
        &self,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        forwarded: bool,
    ) -> Result<(BlobHandle, Origin), Error> {
        let repo = self.cache_name(upstream, repo);
        let (handle, origin) = self.fills.open(upstream, &repo, digest, forwarded).await.map_err(Error::Fill)?;
        match origin {
            Origin::Cache => self.metrics.hit(Kind::Blob),
            Origin::Fill => self.metrics.miss(Kind::Blob),
        }
        Ok((handle, origin))
    }

    /// A blob's size without downloading it: the cache, a running fill, or an upstream HEAD.
    pub async fn blob_size(&self, upstream: &Upstream, repo: &RepoName, digest: &Digest) -> Result<u64, Error> {
        if let Some(blob) = self.store.open_blob(digest).await? {
            return Ok(blob.size);
        }
        if let Some(size) = self.fills.inflight_size(digest) {
            return Ok(size);
        }
        if let Some(shared) = &self.shared
            && let Ok(Some(size)) = shared.blob_size(digest).await
        {
            return Ok(size);
        }
        let repo = self.cache_name(upstream, repo);
        let response = upstream.head_blob(&repo, digest).await.and_then(|r| upstream.check(r));
        let response = response.map_err(|e| Error::upstream(Kind::Blob, e))?;
        // The header, not `content_length()`: a HEAD response's body is always empty.
        response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .ok_or_else(|| Error::upstream(Kind::Blob, upstream.invalid("blob HEAD without Content-Length")))
    }

    /// `tags/list`, from the upstream; from the cache when the upstream is unavailable.
    pub async fn tags_list(&self, upstream: &Upstream, repo: &RepoName, query: &str) -> Result<JsonAnswer, Error> {
        let repo = self.cache_name(upstream, repo);
        let remote = upstream.remote_name(&repo);
        let answer = self.pass_through(upstream, &repo, "tags/list", query, Kind::Tags).await;
        match answer {
            Ok(mut answer) => {
                // The upstream names its own repository (prefixed): show the client's name.
                if let Ok(mut list) = serde_json::from_slice::<serde_json::Value>(&answer.body) {
                    list["name"] = repo.as_str().into();
                    answer.body = Bytes::from(serde_json::to_vec(&list).expect("json serialises"));
                }
                for (name, value) in &mut answer.headers {
                    if *name == header::LINK {
                        let rewritten = value
                            .to_str()
                            .unwrap_or_default()
                            .replace(&format!("/v2/{remote}/"), &format!("/v2/{repo}/"));
                        *value = http::HeaderValue::from_str(&rewritten).unwrap_or_else(|_| value.clone());
                    }
                }
                Ok(answer)
            }
            Err(error) if is_upstream_trouble(&error) => {
                let tags = self.store.tags(upstream.name(), &repo).await?;
                if tags.is_empty() {
                    return Err(error);
                }
                tracing::warn!(repo = %repo, %error, "upstream unavailable: serving cached tag list");
                let body = serde_json::json!({ "name": repo.as_str(), "tags": tags });
                Ok(JsonAnswer {
                    content_type: "application/json".into(),
                    body: Bytes::from(body.to_string()),
                    headers: vec![],
                })
            }
            Err(error) => Err(error),
        }
    }

    /// OCI 1.1 referrers of `digest`, optionally filtered by artifact type. From the
    /// upstream's referrers API when it has one; when it answers 404 (no such API, as
    /// distribution 2.8), from the spec's fallback: the index tagged `sha256-<hex>`, filtered
    /// here, or an empty index. Answers are kept for `tag_ttl`.
    pub async fn referrers(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<JsonAnswer, Error> {
        let repo = self.cache_name(upstream, repo);
        let key = (upstream.name().to_owned(), repo.clone(), *digest, artifact_type.map(str::to_owned));
        if let Some(answer) = self.referrers.get(&key) {
            return Ok(answer);
        }
        let query = artifact_type
            .map(|t| url::form_urlencoded::Serializer::new(String::new()).append_pair("artifactType", t).finish())
            .unwrap_or_default();
        let answer =
            match self.pass_through(upstream, &repo, &format!("referrers/{digest}"), &query, Kind::Referrers).await {
                Err(Error::Upstream { error: UpstreamError::Status { status: StatusCode::NOT_FOUND, .. }, .. }) => {
                    self.referrers_by_tag_schema(upstream, &repo, digest, artifact_type).await?
                }
                other => other?,
            };
        self.referrers.insert(key, answer.clone());
        Ok(answer)
    }

    /// The referrers tag schema: an OCI index tagged `sha256-<hex>` lists the referrers.
    async fn referrers_by_tag_schema(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<JsonAnswer, Error> {
        let tag = Tag::parse(&format!("sha256-{}", digest.hex()))?;
        let index = match self.manifest(upstream, repo, &Reference::Tag(tag), Some(MANIFEST_TYPES[0]), false).await {
            Ok(manifest) => serde_json::from_slice::<serde_json::Value>(&manifest.bytes).ok(),
            Err(Error::ManifestUnknown { .. }) => None,
            Err(Error::Upstream { error: UpstreamError::Status { status: StatusCode::NOT_FOUND, .. }, .. }) => None,
            Err(error) => return Err(error),
        };
        let mut manifests: Vec<serde_json::Value> =
            index.and_then(|i| i.get("manifests").and_then(|m| m.as_array()).cloned()).unwrap_or_default();
        let mut headers = Vec::new();
        if let Some(wanted) = artifact_type {
            manifests.retain(|m| m.get("artifactType").and_then(|t| t.as_str()) == Some(wanted));
            headers.push((
                http::HeaderName::from_static("oci-filters-applied"),
                http::HeaderValue::from_static("artifactType"),
            ));
        }
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPES[0],
            "manifests": manifests,
        });
        Ok(JsonAnswer { content_type: MANIFEST_TYPES[0].to_owned(), body: Bytes::from(body.to_string()), headers })
    }

    async fn pass_through(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        suffix: &str,
        query: &str,
        kind: Kind,
    ) -> Result<JsonAnswer, Error> {
        let response = upstream.get_json(repo, suffix, query, kind).await.and_then(|r| upstream.check(r));
        let response = response.map_err(|e| Error::upstream(kind, e))?;
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_owned();
        let headers = [header::LINK, http::HeaderName::from_static("oci-filters-applied")]
            .into_iter()
            .filter_map(|name| response.headers().get(&name).cloned().map(|v| (name, v)))
            .collect();
        let body =
            read_limited(response, MAX_MANIFEST_SIZE).await.map_err(|e| Error::upstream(kind, upstream.invalid(e)))?;
        upstream.count_bytes(body.len() as u64);
        Ok(JsonAnswer { content_type, body, headers })
    }

    /// The repositories cached for an upstream.
    pub async fn catalog(&self, upstream: &Upstream) -> Result<Vec<String>, Error> {
        Ok(self.store.repositories(upstream.name()).await?)
    }

    /// Re-pins after a pinned repository's tag or manifest was stored, so what it now
    /// references is kept from the start.
    async fn refresh_pins(&self, upstream: &Upstream, repo: &RepoName) {
        let affected = self.config.pinned.iter().any(|p| p.registry == upstream.name() && p.repository == *repo);
        if !affected {
            return;
        }
        let (store, pinned) = (self.store.clone(), self.config.pinned.clone());
        let result = tokio::task::spawn_blocking(move || store.pin(&pinned)).await;
        if let Ok(Err(error)) | Err(error) = result.map_err(std::io::Error::other) {
            tracing::warn!(%error, "cannot refresh pinned images");
        }
    }

    /// A verified answer the disk refused: the client still gets it, the cache does not.
    fn cannot_store(&self, error: &std::io::Error) {
        self.metrics.cache_store_failures.inc();
        tracing::error!(%error, "cache cannot store a manifest or tag: serving it uncached");
    }

    /// Whether the cache can take writes (for `/readyz`).
    pub fn is_ready(&self) -> bool {
        self.store.is_writable()
    }
}

/// Errors where a cached answer beats failing: the upstream is down, broken or limiting us.
fn is_upstream_trouble(error: &Error) -> bool {
    match error {
        Error::Upstream { error: UpstreamError::Status { status, .. }, .. } => {
            status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
        }
        Error::Upstream {
            error: UpstreamError::Unreachable { .. } | UpstreamError::Invalid { .. } | UpstreamError::Unavailable { .. },
            ..
        } => true,
        _ => false,
    }
}

/// The media ranges of an Accept header, without parameters.
fn accept_list(accept: &str) -> impl Iterator<Item = &str> {
    accept.split(',').map(|part| part.split(';').next().unwrap_or("").trim()).filter(|s| !s.is_empty())
}

/// Whether a client's Accept takes `media_type`. No Accept at all takes anything.
fn accepts(accept: Option<&str>, media_type: &str) -> bool {
    match accept.filter(|a| !a.trim().is_empty()) {
        None => true,
        Some(accept) => accept_list(accept).any(|t| t == media_type || t == "*/*"),
    }
}

/// Whether a client takes every manifest type we cache tags for.
fn accepts_all(accept: Option<&str>) -> bool {
    MANIFEST_TYPES.iter().all(|t| accepts(accept, t))
}

/// The manifest's media type: the upstream's Content-Type when it names one, else the
/// `mediaType` field, else a guess from its shape (OCI manifests may omit `mediaType`).
/// `None` if the body is not a JSON object.
fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let object = json.as_object()?;
    let header = content_type.map(|c| c.split(';').next().unwrap_or("").trim()).filter(|c| {
        !c.is_empty() && *c != "application/json" && *c != "text/plain" && *c != "application/octet-stream"
    });
    if let Some(header) = header {
        return Some(header.to_owned());
    }
    if let Some(field) = object.get("mediaType").and_then(|v| v.as_str()) {
        return Some(field.to_owned());
    }
    Some(if object.contains_key("manifests") { MANIFEST_TYPES[0] } else { MANIFEST_TYPES[2] }.to_owned())
}

const DIGEST_HEADER: &str = "docker-content-digest";

fn header_text(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// What received manifest bytes claimed to be, when it is not `digest`: the digest asked for,
/// else the sender's `Docker-Content-Digest` (if sha256).
fn mismatched_claim(digest: &Digest, expected: Option<&Digest>, announced: Option<String>) -> Option<String> {
    let claimed = expected.map(Digest::to_string).or(announced.filter(|a| a.starts_with("sha256:")));
    claimed.filter(|c| *c != digest.to_string())
}

/// Names this replica's access record in the shared tier: its cluster address, else its
/// host and cache directory. Hashed: the record's name need not reveal either.
fn replica_id(config: &Config) -> String {
    let identity = match &config.cluster {
        Some(cluster) => cluster.advertise.to_string(),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}:{}", host.trim(), config.cache_dir.display())
        }
    };
    Digest::of(identity.as_bytes()).hex()[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_lists_are_matched_by_type() {
        let docker = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json;q=0.9";
        assert!(accepts(Some(docker), "application/vnd.docker.distribution.manifest.list.v2+json"));
        assert!(!accepts(Some(docker), "application/vnd.oci.image.index.v1+json"));
        assert!(accepts(None, "anything"));
        assert!(accepts(Some("*/*"), "application/vnd.oci.image.index.v1+json"));
        assert!(!accepts_all(Some(docker)));
        assert!(accepts_all(Some(MANIFEST_ACCEPT)));
        assert!(accepts_all(None));
    }

    #[test]
    fn media_type_from_header_field_or_shape() {
        let oci = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        let typed = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#;
        assert_eq!(
            manifest_media_type(Some("application/vnd.oci.image.manifest.v1+json"), oci).unwrap(),
            MANIFEST_TYPES[2]
        );
        assert_eq!(manifest_media_type(Some("application/json"), typed).unwrap(), MANIFEST_TYPES[3]);
        assert_eq!(manifest_media_type(None, index).unwrap(), MANIFEST_TYPES[0]);
        assert_eq!(manifest_media_type(None, oci).unwrap(), MANIFEST_TYPES[2]);
        assert_eq!(manifest_media_type(None, b"not json"), None);
        assert_eq!(manifest_media_type(None, b"[1,2]"), None);
    }
}
