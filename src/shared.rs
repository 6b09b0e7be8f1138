//! The shared tier: blobs, manifests and tag records in an S3-compatible object store, so
//! that several replicas act as one cache and losing a replica loses nothing.
//!
//! ```text
//! <prefix>blobs/sha256/<64 hex>         verified blob bytes
//! <prefix>manifests/sha256/<64 hex>     manifest bytes, their media type as Content-Type
//! <prefix>tags/<upstream>/<repo>/_tags/<tag>   tag record (JSON), as on local disk
//! <prefix>access/<replica id>.json      when this replica last used each object
//! ```
//!
//! Only verified content is written, and an object store makes an object visible only when
//! its upload completes (a single PUT, or the final call of a multipart upload), so no reader
//! ever sees a partial or unverified object under a final key. Readers verify again anyway:
//! a blob streamed from here goes through the same hashing fill as one from an upstream, and
//! a manifest is hashed before it is used.
//!
//! The tier is best-effort. Every failure is counted and logged, and after repeated failures
//! the tier is marked down for a while (`regmirror_shared_up`, `/readyz`): requests then skip
//! it and the replica serves its local tier and its upstreams as if it were alone.
//!
//! Its size bound (`shared_max_size`) is kept by one replica at a time (the cluster picks
//! it): every replica batches its last-access times into its own `access/` record, and the
//! keeper deletes the least recently used objects, by the newest of those times and the
//! object's upload time, until the tier fits. Incomplete multipart uploads of a crashed
//! replica are left to the bucket's lifecycle rule (deploy/kubernetes-replicas/README.md).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutOptions, PutPayload, WriteMultipart,
};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use crate::config::S3Config;
use crate::metrics::Metrics;
use crate::reference::{Digest, RepoName, Tag};
use crate::store::{StoredManifest, TagRecord};
use crate::upstream::health::Health;

/// Blobs up to this size go up in one PUT; larger ones in parts of this size.
const PART_SIZE: usize = 8 << 20;
/// Uploads at once: each holds up to two parts in memory.
const MAX_UPLOADS: usize = 2;
/// Access times (milliseconds) older than this are dropped from a replica's record.
const ACCESS_RECORD_MAX_AGE_MS: u64 = 30 * 24 * 3600 * 1000;
/// The keeper deletes down to this share of the bound, so it does not run on every object.
const BOUND_LOW_WATER: f64 = 0.95;
const MAX_MANIFEST_SIZE: usize = crate::mirror::MAX_MANIFEST_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("shared storage: {0}")]
    Store(#[from] object_store::Error),
    #[error("shared storage credentials: {0}")]
    Credentials(io::Error),
    #[error("shared storage is marked down after repeated failures")]
    Down,
}

/// A blob body from the shared tier, from the requested offset on.
pub struct SharedBlob {
    pub size: u64,
    pub body: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
}

pub struct SharedTier {
    store: AmazonS3,
    prefix: String,
    description: String,
    health: Health,
    metrics: Arc<Metrics>,
    uploads: Semaphore,
    /// Uploads running in the background, so a process can wait for them before it exits.
    pending_uploads: tokio_util::task::TaskTracker,
    max_size: Option<u64>,
    replica_id: String,
    /// Object keys (relative to the prefix) and when this replica last used them (Unix ms:
    /// pulls a second apart must keep their order).
    accesses: Mutex<HashMap<String, u64>>,
    /// Whether the record this replica wrote before a restart was merged into `accesses`.
    accesses_loaded: std::sync::atomic::AtomicBool,
}

impl SharedTier {
    /// Builds the client; contacts nothing (a mirror starts even when the store is down).
    /// `replica_id` names this replica's access record.
    pub fn open(config: &S3Config, replica_id: &str, metrics: Arc<Metrics>) -> Result<SharedTier, SharedError> {
        // Client options first: they replace the whole set, `allow_http` included.
        let store = AmazonS3Builder::new()
            .with_client_options(client_options())
            .with_endpoint(config.endpoint.as_str().trim_end_matches('/'))
            .with_allow_http(config.endpoint.scheme() == "http")
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_access_key_id(config.access_key_id.read().map_err(SharedError::Credentials)?)
            .with_secret_access_key(config.secret_access_key.read().map_err(SharedError::Credentials)?)
            .with_retry(quick_retries())
            .build()?;
        metrics.shared_up.set(1);
        Ok(SharedTier {
            store,
            prefix: config.prefix.clone(),
            description: format!("{}/{}", config.endpoint.as_str().trim_end_matches('/'), config.bucket),
            health: Health::default(),
            metrics,
            uploads: Semaphore::new(MAX_UPLOADS),
            pending_uploads: tokio_util::task::TaskTracker::new(),
            max_size: config.shared_max_size,
            replica_id: replica_id.to_owned(),
            accesses: Mutex::default(),
            accesses_loaded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// `endpoint/bucket`, for logs and `/readyz` (no credentials).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// `Some(remaining)` while the store is marked down.
    pub fn down_for(&self) -> Option<std::time::Duration> {
        self.health.down_for()
    }

    fn path(&self, relative: &str) -> Path {
        Path::from(format!("{}{relative}", self.prefix))
    }

    fn blob_key(digest: &Digest) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }

    fn manifest_key(digest: &Digest) -> String {
        format!("manifests/sha256/{}", digest.hex())
    }

    fn tag_key(upstream: &str, repo: &RepoName, tag: &Tag) -> String {
        format!("tags/{upstream}/{repo}/_tags/{tag}")
    }

    /// Runs one request unless the store is marked down, and records how it went.
    async fn call<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> Result<Option<T>, SharedError> {
        if self.health.down_for().is_some() {
            return Err(SharedError::Down);
        }
        let (result, outcome) = match request.await {
            Ok(value) => (Ok(Some(value)), "ok"),
            Err(object_store::Error::NotFound { .. }) => (Ok(None), "not_found"),
            Err(error) => (Err(SharedError::Store(error)), "error"),
        };
        self.metrics.shared_requests.with_label_values(&[op, outcome]).inc();
        let marked_down = self.health.record(result.is_ok());
        self.metrics.shared_up.set(i64::from(self.health.down_for().is_none()));
        if marked_down {
            tracing::warn!(store = %self.description, "shared storage marked down: serving the local tier only");
        }
        result
    }

    /// The blob from byte `offset` on, or `None` if the tier does not have it.
    pub async fn blob(&self, digest: &Digest, offset: u64) -> Result<Option<SharedBlob>, SharedError> {
        let key = Self::blob_key(digest);
        let options = GetOptions { range: (offset > 0).then_some(GetRange::Offset(offset)), ..Default::default() };
        let Some(result) = self.call("get", self.store.get_opts(&self.path(&key), options)).await? else {
            return Ok(None);
        };
        self.touch(key);
        let size = result.meta.size;
        let body = result.into_stream().map_err(io::Error::other).boxed();
        Ok(Some(SharedBlob { size, body }))
    }

    /// The blob's size, if the tier has it.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, SharedError> {
        let meta = self.call("head", self.store.head(&self.path(&Self::blob_key(digest)))).await?;
        Ok(meta.map(|m| m.size))
    }

    /// Uploads a verified blob in the background (see [`Self::upload_blob`]); a failure is
    /// logged, and the blob stays in the local tier only.
    pub fn spawn_upload(self: &Arc<Self>, digest: Digest, file: std::fs::File, size: u64) {
        let shared = self.clone();
        self.pending_uploads.spawn(async move {
            if let Err(error) = shared.upload_blob(&digest, file, size).await {
                tracing::warn!(digest = %digest, %error, "could not upload the blob to shared storage");
            }
        });
    }

    /// Waits for the background uploads started so far (`seed` before it exits, a replica
    /// while it shuts down), at most `timeout`. Returns whether they all finished.
    pub async fn wait_for_uploads(&self, timeout: std::time::Duration) -> bool {
        self.pending_uploads.close();
        let finished = tokio::time::timeout(timeout, self.pending_uploads.wait()).await.is_ok();
        self.pending_uploads.reopen();
        finished
    }

    /// Deletes a blob whose bytes do not match its digest (written by something else than a
    /// replica, or damaged in the store).
    pub async fn remove_blob(&self, digest: &Digest) {
        let path = self.path(&Self::blob_key(digest));
        match self.call("delete", self.store.delete(&path)).await {
            Ok(_) => {
                tracing::error!(digest = %digest, store = %self.description, "corrupt blob deleted from shared storage")
            }
            Err(error) => tracing::warn!(digest = %digest, %error, "could not delete a corrupt shared blob"),
        }
    }

    /// Uploads a verified blob from an open file of the local tier (which keeps the bytes
    /// readable even if the local tier evicts it meanwhile).
    pub async fn upload_blob(&self, digest: &Digest, file: std::fs::File, size: u64) -> Result<(), SharedError> {
        let _permit = self.uploads.acquire().await.expect("upload semaphore never closed");
        let path = self.path(&Self::blob_key(digest));
        if self.call("head", self.store.head(&path)).await?.is_some() {
            return Ok(());
        }
        let mut file = tokio::fs::File::from_std(file);
        if size as usize <= PART_SIZE {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes).await.map_err(|e| SharedError::Store(local_read_error(e)))?;
            self.call("put", self.store.put(&path, PutPayload::from(bytes))).await?;
        } else {
            let Some(upload) = self.call("put", self.store.put_multipart(&path)).await? else {
                return Err(SharedError::Store(local_read_error(io::ErrorKind::NotFound.into())));
            };
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let mut buf = vec![0; PART_SIZE];
            loop {
                let n = match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(error) => {
                        let _ = writer.abort().await;
                        return Err(SharedError::Store(local_read_error(error)));
                    }
                };
                if let Err(error) = writer.wait_for_capacity(1).await {
                    let _ = writer.abort().await;
                    return Err(self.failed_put(error));
                }
                writer.write(&buf[..n]);
            }
            // `finish` aborts the upload itself when completing fails.
            if let Err(error) = writer.finish().await {
                return Err(self.failed_put(error));
            }
            self.metrics.shared_requests.with_label_values(&["put", "ok"]).inc();
        }
        tracing::info!(digest = %digest, size, store = %self.description, "blob uploaded to shared storage");
        Ok(())
    }

    fn failed_put(&self, error: object_store::Error) -> SharedError {
        self.metrics.shared_requests.with_label_values(&["put", "error"]).inc();
        self.health.record(false);
        SharedError::Store(error)
    }

    /// The manifest `digest`, if the tier has it and its bytes hash to it.
    pub async fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, SharedError> {
        let key = Self::manifest_key(digest);
        let Some((bytes, attributes)) = self.get_small(&self.path(&key)).await? else { return Ok(None) };
        let media_type = attributes.get(&Attribute::ContentType).map(|v| v.to_string());
        if Digest::of(&bytes) != *digest {
            tracing::error!(digest = %digest, store = %self.description, "shared manifest does not match its digest: ignored");
            return Ok(None);
        }
        let Some(media_type) = media_type else { return Ok(None) };
        self.touch(key);
        Ok(Some(StoredManifest { bytes, media_type }))
    }

    pub async fn put_manifest(&self, digest: &Digest, manifest: &StoredManifest) -> Result<(), SharedError> {
        let key = Self::manifest_key(digest);
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, manifest.media_type.clone().into());
        let options = PutOptions { attributes, ..Default::default() };
        let payload = PutPayload::from(manifest.bytes.clone());
        self.call("put", self.store.put_opts(&self.path(&key), payload, options)).await?;
        self.touch(key);
        Ok(())
    }

    pub async fn tag(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> Result<Option<TagRecord>, SharedError> {
        let path = self.path(&Self::tag_key(upstream, repo, tag));
        let Some((bytes, _)) = self.get_small(&path).await? else { return Ok(None) };
        Ok(serde_json::from_slice(&bytes).ok())
    }

    pub async fn put_tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        record: &TagRecord,
    ) -> Result<(), SharedError> {
        let path = self.path(&Self::tag_key(upstream, repo, tag));
        let json = serde_json::to_vec(record).expect("a tag record serialises");
        self.call("put", self.store.put(&path, PutPayload::from(json))).await?;
        Ok(())
    }

    /// Notes that this replica used an object now (written out by [`Self::flush_accesses`]).
    fn touch(&self, key: String) {
        self.accesses.lock().expect("accesses poisoned").insert(key, unix_millis());
    }

    /// Notes a use of a blob served from the local tier, so the shared tier's LRU order
    /// reflects what clients pull, not only what reached the shared tier.
    pub fn touch_blob(&self, digest: &Digest) {
        self.touch(Self::blob_key(digest));
    }

    fn access_path(&self, replica: &str) -> Path {
        self.path(&format!("access/{replica}.json"))
    }

    /// Writes this replica's access record, which keeps its earlier times across restarts.
    pub async fn flush_accesses(&self) -> Result<(), SharedError> {
        let own = self.access_path(&self.replica_id);
        if !self.accesses_loaded.load(std::sync::atomic::Ordering::Relaxed) {
            let before = self.read_access_record(&own).await?;
            let mut accesses = self.accesses.lock().expect("accesses poisoned");
            for (key, at) in before {
                let entry = accesses.entry(key).or_default();
                *entry = (*entry).max(at);
            }
            self.accesses_loaded.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let snapshot = {
            let now = unix_millis();
            let mut accesses = self.accesses.lock().expect("accesses poisoned");
            accesses.retain(|_, at| now.saturating_sub(*at) < ACCESS_RECORD_MAX_AGE_MS);
            serde_json::to_vec(&*accesses).expect("a map serialises")
        };
        self.call("put", self.store.put(&own, PutPayload::from(snapshot))).await?;
        Ok(())
    }

    async fn read_access_record(&self, path: &Path) -> Result<HashMap<String, u64>, SharedError> {
        let Some((bytes, _)) = self.get_small(path).await? else { return Ok(HashMap::new()) };
        Ok(serde_json::from_slice(&bytes).unwrap_or_default())
    }

    /// A small object (a manifest, a record) whole, with its attributes; `None` if it does not
    /// exist or is larger than any manifest may be.
    async fn get_small(&self, path: &Path) -> Result<Option<(Bytes, Attributes)>, SharedError> {
        let read = async {
            let result = self.store.get(path).await?;
            if result.meta.size > MAX_MANIFEST_SIZE as u64 {
                return Ok(None);
            }
            let attributes = result.attributes.clone();
            Ok(Some((result.bytes().await?, attributes)))
        };
        Ok(self.call("get", read).await?.flatten())
    }

    /// Deletes least recently used blobs and manifests until the tier fits `shared_max_size`.
    /// Returns the bytes deleted. Called by one replica at a time.
    pub async fn enforce_bound(&self) -> Result<u64, SharedError> {
        let Some(max) = self.max_size else { return Ok(0) };
        let mut objects = Vec::new();
        for kind in ["blobs/", "manifests/"] {
            objects.extend(self.list(kind).await?);
        }
        let mut total: u64 = objects.iter().map(|o| o.size).sum();
        if total <= max {
            return Ok(0);
        }
        let mut last_access = HashMap::<String, u64>::new();
        for record in self.list("access/").await? {
            for (key, at) in self.read_access_record(&record.location).await? {
                let entry = last_access.entry(key).or_default();
                *entry = (*entry).max(at);
            }
        }
        let relative = |o: &object_store::ObjectMeta| o.location.as_ref()[self.prefix.len()..].to_owned();
        let used = |o: &object_store::ObjectMeta| {
            let uploaded = u64::try_from(o.last_modified.timestamp_millis()).unwrap_or_default();
            last_access.get(&relative(o)).copied().unwrap_or_default().max(uploaded)
        };
        objects.sort_by_key(|o| used(o));
        let target = (max as f64 * BOUND_LOW_WATER) as u64;
        let mut deleted = 0;
        for object in objects {
            if total <= target {
                break;
            }
            self.call("delete", self.store.delete(&object.location)).await?;
            total -= object.size;
            deleted += object.size;
            self.metrics.shared_evictions.inc();
            self.metrics.shared_evicted_bytes.inc_by(object.size);
            self.accesses.lock().expect("accesses poisoned").remove(&relative(&object));
        }
        tracing::info!(deleted, remaining = total, max, "shared storage trimmed to its bound");
        Ok(deleted)
    }

    async fn list(&self, relative: &str) -> Result<Vec<object_store::ObjectMeta>, SharedError> {
        let prefix = self.path(relative.trim_end_matches('/'));
        let listing: object_store::Result<Vec<_>> = self.store.list(Some(&prefix)).try_collect().await;
        Ok(self.call("list", std::future::ready(listing)).await?.unwrap_or_default())
    }
}

/// One quick retry, then the error: the tier is an optimisation, and a replica waiting
/// minutes on it (object_store's default) would be slower than its upstream. Failures feed
/// the health tracker, which then skips the tier for a while.
fn quick_retries() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 1,
        retry_timeout: std::time::Duration::from_secs(5),
    }
}

/// A short connect timeout; a long whole-request one, since a blob body streams within it.
fn client_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(2))
        .with_timeout(std::time::Duration::from_secs(30 * 60))
}

fn local_read_error(error: io::Error) -> object_store::Error {
    object_store::Error::Generic { store: "local tier", source: Box::new(error) }
}

fn unix_millis() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_registry_ports_and_nested_repositories() {
        let repo = RepoName::parse("org/team/tool").unwrap();
        let tag = Tag::parse("v1.2").unwrap();
        let key = SharedTier::tag_key("localhost:5000", &repo, &tag);
        assert_eq!(Path::from(format!("mirror/{key}")).as_ref(), "mirror/tags/localhost:5000/org/team/tool/_tags/v1.2");
        let digest = Digest::of(b"x");
        assert_eq!(SharedTier::blob_key(&digest), format!("blobs/sha256/{}", digest.hex()));
    }
}
