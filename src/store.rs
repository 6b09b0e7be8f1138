//! The content-addressed cache on disk.
//!
//! ```text
//! <cache_dir>/blobs/sha256/<2 hex>/<64 hex>        committed layers and configs
//! <cache_dir>/manifests/sha256/<2 hex>/<64 hex>    committed manifest bytes, exactly as fetched
//! <cache_dir>/manifests/sha256/<2 hex>/<64 hex>.type   their media type
//! <cache_dir>/repos/<upstream>/<repo>/_tags/<tag>  tag -> digest records (JSON)
//! <cache_dir>/tmp/                                 fills in progress; emptied at startup
//! ```
//!
//! Every file appears by `rename` from `tmp/` (same filesystem, so atomic) after its bytes
//! were written and synced, so a crash or a full disk can leave garbage in `tmp/` but never a
//! partial file under a final name. Blobs and manifests are keyed by digest alone: identical
//! content from two upstreams is stored once, while tag records live under their upstream so
//! `docker.io/library/x` and `ghcr.io/library/x` never mix. `_tags` cannot collide with a
//! repository path component, which must start with a letter or digit.
//!
//! Every use of a blob or manifest sets its mtime, and the [`Index`] keeps them in LRU order
//! under the size bound; when it evicts, the store deletes the file. Open handles keep an
//! evicted file readable, so a blob being served finishes streaming; a blob being filled is
//! only a temp file and is never a candidate.
//!
//! Callers see only the methods below: the later S3 tier implements the same surface.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tempfile::NamedTempFile;

use crate::image_ref::ImageRef;
use crate::index::{Index, Key};
use crate::metrics::Metrics;
use crate::reference::{Digest, RepoName, Tag};

/// What a tag pointed at when it was last checked upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    /// Unix seconds of the last upstream confirmation; compared with `tag_ttl`.
    pub checked_at: u64,
}

/// A manifest as stored: its bytes are its identity and are never re-serialised.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub bytes: Bytes,
    pub media_type: String,
}

/// A committed blob opened for reading. The open handle keeps the bytes readable even if the
/// file is evicted meanwhile.
pub struct BlobFile {
    pub file: File,
    pub size: u64,
}

#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    index: Arc<Index>,
    hot: Arc<Hot>,
}

/// Manifests and tag records in memory, in front of their files: a cached tag then costs no
/// file read and no blocking hop (measured: 2-4x the requests per second). The files stay
/// the truth: an evicted manifest leaves memory too, and tag records are re-read now and
/// then, so a `seed` or `import` into the same directory shows through.
struct Hot {
    manifests: moka::sync::Cache<Digest, StoredManifest>,
    tags: moka::sync::Cache<(String, RepoName, Tag), TagRecord>,
}

/// Memory for hot manifests, and how long a tag record is trusted without reading its file.
const HOT_MANIFEST_BYTES: u64 = 64 << 20;
const HOT_TAG_ENTRIES: u64 = 100_000;
const HOT_TAG_TTL: std::time::Duration = std::time::Duration::from_secs(30);

impl Hot {
    fn new() -> Hot {
        Hot {
            manifests: moka::sync::Cache::builder()
                .max_capacity(HOT_MANIFEST_BYTES)
                .weigher(|_: &Digest, m: &StoredManifest| u32::try_from(m.bytes.len()).unwrap_or(u32::MAX))
                .build(),
            tags: moka::sync::Cache::builder().max_capacity(HOT_TAG_ENTRIES).time_to_live(HOT_TAG_TTL).build(),
        }
    }
}

/// A blob or manifest file found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedFile {
    pub key: Key,
    pub size: u64,
    pub last_used: SystemTime,
}

impl Store {
    /// Opens (creating if needed) a cache directory bounded to `max_bytes`: removes what
    /// interrupted fills left in `tmp/`, rebuilds the LRU index from the files' mtimes, and
    /// evicts the least recently used files if the cache is over the bound.
    pub fn open(root: &Path, max_bytes: u64, metrics: Arc<Metrics>) -> io::Result<Store> {
        Self::open_with(root, max_bytes, metrics, true)
    }

    /// Opens a cache directory that a running mirror may be using (for `seed` and `import`):
    /// like [`Store::open`], but leaves `tmp/` alone, since its files may be that mirror's
    /// fills in progress.
    pub fn open_shared(root: &Path, max_bytes: u64, metrics: Arc<Metrics>) -> io::Result<Store> {
        Self::open_with(root, max_bytes, metrics, false)
    }

    fn open_with(root: &Path, max_bytes: u64, metrics: Arc<Metrics>, clear_tmp: bool) -> io::Result<Store> {
        for dir in ["blobs/sha256", "manifests/sha256", "repos", "tmp"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        let paths = Paths { root: root.to_owned() };
        let hot = Arc::new(Hot::new());
        let evicted = hot.clone();
        let evict = Box::new(move |key: Key| {
            if let Key::Manifest(digest) = key {
                evicted.manifests.invalidate(&digest);
            }
            paths.delete(key);
        });
        let index = Arc::new(Index::new(max_bytes, metrics, evict));
        let store = Store { root: root.to_owned(), index, hot };
        let removed = if clear_tmp { store.clear_tmp()? } else { 0 };
        if removed > 0 {
            tracing::info!(removed, "removed files of interrupted fills");
        }
        let mut files = store.cached_files()?;
        files.sort_by_key(|f| f.last_used);
        for file in &files {
            store.index.insert(file.key, file.size);
        }
        // No eviction yet: the caller pins what must stay first, then calls `enforce_bound`.
        Ok(store)
    }

    /// Every blob and manifest on disk, in no particular order.
    pub fn cached_files(&self) -> io::Result<Vec<CachedFile>> {
        let mut files = Vec::new();
        for (dir, make_key) in [("blobs/sha256", Key::Blob as fn(Digest) -> Key), ("manifests/sha256", Key::Manifest)] {
            for shard in read_dir_or_empty(&self.root.join(dir))? {
                for entry in read_dir_or_empty(&shard.path())? {
                    let name = entry.file_name();
                    let Some(digest) = name.to_str().and_then(|n| Digest::parse(&format!("sha256:{n}")).ok()) else {
                        continue;
                    };
                    let metadata = entry.metadata()?;
                    let key = make_key(digest);
                    files.push(CachedFile {
                        key,
                        size: metadata.len() + self.sidecar_size(key),
                        last_used: metadata.modified().unwrap_or(UNIX_EPOCH),
                    });
                }
            }
        }
        Ok(files)
    }

    /// The size of a manifest's media-type file, which counts toward the bound with it.
    fn sidecar_size(&self, key: Key) -> u64 {
        match key {
            Key::Manifest(_) => std::fs::metadata(self.path_of(key).with_extension("type")).map_or(0, |m| m.len()),
            Key::Blob(_) => 0,
        }
    }

    /// Bytes held by blobs and manifests.
    pub fn size(&self) -> u64 {
        self.index.bytes()
    }

    /// Applies pending evictions. Blocking.
    pub fn enforce_bound(&self) {
        self.index.enforce();
    }

    /// Pins `images`: the manifests they resolve to through cached tag records, and
    /// everything those reference (cached now or later), are never evicted. Blocking.
    pub fn pin(&self, images: &[ImageRef]) -> io::Result<()> {
        let mut wanted = HashSet::new();
        for image in images {
            let digest = match (&image.digest, &image.tag) {
                (Some(digest), _) => Some(*digest),
                (None, Some(tag)) => self.read_tag(&image.registry, &image.repository, tag)?.map(|r| r.digest),
                (None, None) => None,
            };
            if let Some(digest) = digest {
                wanted.extend(self.referenced_keys(&digest)?);
            }
        }
        self.index.set_pinned(wanted);
        Ok(())
    }

    /// A manifest and everything it references, through indexes, whether cached or not
    /// (children of an index are followed only when cached). Blocking; records no use.
    fn referenced_keys(&self, digest: &Digest) -> io::Result<HashSet<Key>> {
        let mut keys = HashSet::new();
        let mut pending = vec![*digest];
        while let Some(manifest) = pending.pop() {
            if !keys.insert(Key::Manifest(manifest)) {
                continue;
            }
            let bytes = match std::fs::read(self.manifest_path(&manifest)) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let references = crate::manifest::references(&bytes);
            keys.extend(references.blobs.into_iter().map(Key::Blob));
            pending.extend(references.manifests.into_iter().map(|(d, _)| d));
        }
        Ok(keys)
    }

    fn read_tag(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> io::Result<Option<TagRecord>> {
        match std::fs::read(self.tag_path(upstream, repo, tag)) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The path of a cached file (for `verify` and `export`).
    pub fn path_of(&self, key: Key) -> PathBuf {
        Paths { root: self.root.clone() }.of(key)
    }

    /// Moves a corrupt file to `quarantine/` and forgets it.
    pub fn quarantine(&self, key: Key) -> io::Result<PathBuf> {
        let dir = self.root.join("quarantine");
        std::fs::create_dir_all(&dir)?;
        let (Key::Blob(d) | Key::Manifest(d)) = key;
        let target = dir.join(d.hex());
        std::fs::rename(self.path_of(key), &target)?;
        self.index.remove(&key);
        if let Key::Manifest(digest) = key {
            self.hot.manifests.invalidate(&digest);
        }
        Ok(target)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn clear_tmp(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(self.root.join("tmp"))? {
            let path = entry?.path();
            let result = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            result?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Whether the cache directory accepts writes right now (for `/readyz`).
    pub fn is_writable(&self) -> bool {
        NamedTempFile::new_in(self.root.join("tmp")).and_then(|mut f| f.write_all(b"ok")).is_ok()
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.path_of(Key::Blob(*digest))
    }

    fn manifest_path(&self, digest: &Digest) -> PathBuf {
        self.path_of(Key::Manifest(*digest))
    }

    fn tag_path(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> PathBuf {
        self.tags_dir(upstream, repo).join(tag.as_str())
    }

    fn tags_dir(&self, upstream: &str, repo: &RepoName) -> PathBuf {
        self.root.join("repos").join(upstream).join(repo.as_str()).join("_tags")
    }

    /// Whether a blob is committed. Cheap (one `stat`), so it may be called under a lock.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a committed blob and records the use.
    pub async fn open_blob(&self, digest: &Digest) -> io::Result<Option<BlobFile>> {
        let path = self.blob_path(digest);
        let store = self.clone();
        let key = Key::Blob(*digest);
        blocking(move || match File::open(&path) {
            Ok(file) => {
                let size = file.metadata()?.len();
                store.record_use(key, &file, size);
                Ok(Some(BlobFile { file, size }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    /// Marks a file most recently used, in the index and (for the next start) in its mtime.
    fn record_use(&self, key: Key, file: &File, size: u64) {
        if let Err(error) = file.set_modified(SystemTime::now()) {
            tracing::debug!(%error, "cannot record a use in the file's mtime");
        }
        if !self.index.touch(&key) {
            self.index.insert(key, size);
            self.index.enforce();
        }
    }

    /// A new temp file for a fill. Dropping it without [`Self::commit_blob`] deletes it.
    pub fn temp_file(&self) -> io::Result<NamedTempFile> {
        tempfile::Builder::new().prefix("fill-").tempfile_in(self.root.join("tmp"))
    }

    /// Makes a fully written and verified temp file visible as `digest`. Blocking: call it from
    /// a blocking context. The caller guarantees the content hashes to `digest`.
    pub fn commit_blob(&self, temp: NamedTempFile, digest: &Digest) -> io::Result<()> {
        temp.as_file().sync_data()?;
        let size = temp.as_file().metadata()?.len();
        let path = self.blob_path(digest);
        std::fs::create_dir_all(path.parent().expect("sharded path has a parent"))?;
        temp.persist(&path).map_err(|e| e.error)?;
        self.index.insert(Key::Blob(*digest), size);
        self.index.enforce();
        Ok(())
    }

    /// Reads a cached manifest and records the use.
    pub async fn manifest(&self, digest: &Digest) -> io::Result<Option<StoredManifest>> {
        if let Some(manifest) = self.hot.manifests.get(digest) {
            if self.index.touch(&Key::Manifest(*digest)) {
                return Ok(Some(manifest));
            }
            self.hot.manifests.invalidate(digest);
        }
        let path = self.manifest_path(digest);
        let store = self.clone();
        let key = Key::Manifest(*digest);
        blocking(move || {
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut file, &mut bytes)?;
            let media_type = match std::fs::read_to_string(path.with_extension("type")) {
                Ok(t) => t,
                // Evicted between the two reads: as good as not cached.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            store.record_use(key, &file, (bytes.len() + media_type.len()) as u64);
            let manifest = StoredManifest { bytes: Bytes::from(bytes), media_type };
            store.hot.manifests.insert(*key_digest(&key), manifest.clone());
            Ok(Some(manifest))
        })
        .await
    }

    /// Stores manifest bytes under their digest. The caller has verified the digest.
    pub async fn put_manifest(&self, digest: &Digest, manifest: &StoredManifest) -> io::Result<()> {
        let store = self.clone();
        let path = self.manifest_path(digest);
        let manifest = manifest.clone();
        let key = Key::Manifest(*digest);
        blocking(move || {
            // The type first: the bytes' appearance is what makes the manifest visible.
            store.write_atomic(&path.with_extension("type"), manifest.media_type.as_bytes())?;
            store.write_atomic(&path, &manifest.bytes)?;
            store.index.insert(key, (manifest.bytes.len() + manifest.media_type.len()) as u64);
            store.hot.manifests.insert(*key_digest(&key), manifest);
            store.index.enforce();
            Ok(())
        })
        .await
    }

    pub async fn tag(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> io::Result<Option<TagRecord>> {
        let hot_key = (upstream.to_owned(), repo.clone(), tag.clone());
        if let Some(record) = self.hot.tags.get(&hot_key) {
            return Ok(Some(record));
        }
        let store = self.clone();
        // A record we cannot parse is as good as none: it will be fetched again.
        blocking(move || {
            let record = store.read_tag(&hot_key.0, &hot_key.1, &hot_key.2)?;
            if let Some(record) = &record {
                store.hot.tags.insert(hot_key, record.clone());
            }
            Ok(record)
        })
        .await
    }

    pub async fn put_tag(&self, upstream: &str, repo: &RepoName, tag: &Tag, record: &TagRecord) -> io::Result<()> {
        let store = self.clone();
        let path = self.tag_path(upstream, repo, tag);
        let json = serde_json::to_vec(record).expect("a tag record serialises");
        let (hot_key, record) = ((upstream.to_owned(), repo.clone(), tag.clone()), record.clone());
        blocking(move || {
            store.write_atomic(&path, &json)?;
            store.hot.tags.insert(hot_key, record);
            Ok(())
        })
        .await
    }

    /// The tags cached for a repository, sorted.
    pub async fn tags(&self, upstream: &str, repo: &RepoName) -> io::Result<Vec<String>> {
        let dir = self.tags_dir(upstream, repo);
        blocking(move || {
            let mut tags = match std::fs::read_dir(&dir) {
                Ok(entries) => entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|name| Tag::parse(name).is_ok())
                    .collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            };
            tags.sort();
            Ok(tags)
        })
        .await
    }

    /// The upstreams that have cached tags, sorted.
    pub async fn upstreams(&self) -> io::Result<Vec<String>> {
        let dir = self.root.join("repos");
        blocking(move || {
            let mut names: Vec<String> =
                read_dir_or_empty(&dir)?.into_iter().filter_map(|e| e.file_name().into_string().ok()).collect();
            names.sort();
            Ok(names)
        })
        .await
    }

    /// A manifest and everything it references that is cached: child manifests of an index,
    /// configs and layers. Blocking; records no use.
    pub fn image_keys(&self, digest: &Digest) -> io::Result<Vec<Key>> {
        let mut keys = Vec::new();
        let mut pending = vec![*digest];
        while let Some(manifest) = pending.pop() {
            let bytes = match std::fs::read(self.manifest_path(&manifest)) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            keys.push(Key::Manifest(manifest));
            let references = crate::manifest::references(&bytes);
            keys.extend(references.blobs.into_iter().filter(|d| self.has_blob(d)).map(Key::Blob));
            pending.extend(
                references.manifests.into_iter().map(|(d, _)| d).filter(|d| !keys.contains(&Key::Manifest(*d))),
            );
        }
        Ok(keys)
    }

    /// The repositories of one upstream that have cached tags, sorted.
    pub async fn repositories(&self, upstream: &str) -> io::Result<Vec<String>> {
        let base = self.root.join("repos").join(upstream);
        blocking(move || {
            let mut repos = Vec::new();
            collect_repositories(&base, "", &mut repos)?;
            repos.sort();
            Ok(repos)
        })
        .await
    }

    /// Writes a small file atomically: temp file, sync, rename.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut temp = self.temp_file()?;
        temp.write_all(bytes)?;
        temp.as_file().sync_data()?;
        std::fs::create_dir_all(path.parent().expect("cache paths have parents"))?;
        temp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

fn key_digest(key: &Key) -> &Digest {
    match key {
        Key::Blob(d) | Key::Manifest(d) => d,
    }
}

/// Where cached files live; also what the index's eviction callback deletes with.
struct Paths {
    root: PathBuf,
}

impl Paths {
    /// `<kind>/sha256/<first 2 hex>/<64 hex>`: two levels keep directories small at 100k blobs.
    fn of(&self, key: Key) -> PathBuf {
        let (dir, digest) = match key {
            Key::Blob(d) => ("blobs/sha256", d),
            Key::Manifest(d) => ("manifests/sha256", d),
        };
        let hex = digest.hex();
        self.root.join(dir).join(&hex[..2]).join(hex)
    }

    fn delete(&self, key: Key) {
        let path = self.of(key);
        let result = std::fs::remove_file(&path);
        if let Key::Manifest(_) = key {
            let _ = std::fs::remove_file(path.with_extension("type"));
        }
        match result {
            Ok(()) => tracing::debug!(path = %path.display(), "evicted"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(path = %path.display(), %error, "cannot delete an evicted file"),
        }
    }
}

fn read_dir_or_empty(dir: &Path) -> io::Result<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn collect_repositories(dir: &Path, prefix: &str, out: &mut Vec<String>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let Ok(name) = entry.file_name().into_string() else { continue };
        if name == "_tags" {
            if !prefix.is_empty() {
                out.push(prefix.to_owned());
            }
            continue;
        }
        let path = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        collect_repositories(&entry.path(), &path, out)?;
    }
    Ok(())
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(data: &[u8]) -> Digest {
        Digest::of(data)
    }

    fn open(dir: &Path) -> Store {
        Store::open(dir, 1 << 30, Arc::new(Metrics::new())).unwrap()
    }

    fn put_blob(store: &Store, data: &[u8]) -> Digest {
        let mut temp = store.temp_file().unwrap();
        temp.write_all(data).unwrap();
        let d = digest(data);
        store.commit_blob(temp, &d).unwrap();
        d
    }

    #[tokio::test]
    async fn restart_keeps_lru_order_and_shrinking_the_bound_evicts_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = put_blob(&store, &[1; 4096]);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = put_blob(&store, &[2; 4096]);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let c = put_blob(&store, &[3; 4096]);
        std::thread::sleep(std::time::Duration::from_millis(5));
        store.open_blob(&a).await.unwrap().unwrap();
        drop(store);

        // Room for two of the three: the least recently used (b) goes.
        let store = Store::open(dir.path(), 2 * 4096, Arc::new(Metrics::new())).unwrap();
        store.enforce_bound();
        assert!(store.has_blob(&a));
        assert!(!store.has_blob(&b));
        assert!(store.has_blob(&c));
        assert_eq!(store.size(), 2 * 4096);
    }

    #[tokio::test]
    async fn blobs_appear_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let d = digest(b"hello");
        let mut temp = store.temp_file().unwrap();
        temp.write_all(b"hello").unwrap();
        assert!(!store.has_blob(&d));
        assert!(store.open_blob(&d).await.unwrap().is_none());
        store.commit_blob(temp, &d).unwrap();
        assert!(store.has_blob(&d));
        assert_eq!(store.open_blob(&d).await.unwrap().unwrap().size, 5);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_dropped_fill_leaves_nothing_and_startup_clears_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        drop(store.temp_file().unwrap());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // A crash leaves a file behind: the next start removes it.
        std::fs::write(dir.path().join("tmp/fill-crashed"), b"partial").unwrap();
        open(dir.path());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn manifests_tags_and_repositories_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let bytes = Bytes::from_static(b"{\"schemaVersion\":2}");
        let d = digest(&bytes);
        let m =
            StoredManifest { bytes: bytes.clone(), media_type: "application/vnd.oci.image.manifest.v1+json".into() };
        store.put_manifest(&d, &m).await.unwrap();
        let back = store.manifest(&d).await.unwrap().unwrap();
        assert_eq!(back.bytes, bytes);
        assert_eq!(back.media_type, m.media_type);

        let record = TagRecord { digest: d, media_type: m.media_type.clone(), checked_at: 7 };
        let alpine = RepoName::parse("library/alpine").unwrap();
        let nested = RepoName::parse("library/alpine/tools").unwrap();
        let latest = Tag::parse("latest").unwrap();
        store.put_tag("docker.io", &alpine, &latest, &record).await.unwrap();
        store.put_tag("docker.io", &nested, &Tag::parse("v1").unwrap(), &record).await.unwrap();
        store.put_tag("ghcr.io", &alpine, &Tag::parse("other").unwrap(), &record).await.unwrap();
        assert_eq!(store.tag("docker.io", &alpine, &latest).await.unwrap(), Some(record));
        assert_eq!(store.tag("ghcr.io", &alpine, &latest).await.unwrap(), None);
        assert_eq!(store.tags("docker.io", &alpine).await.unwrap(), vec!["latest"]);
        assert_eq!(store.repositories("docker.io").await.unwrap(), vec!["library/alpine", "library/alpine/tools"]);
        assert_eq!(store.repositories("ghcr.io").await.unwrap(), vec!["library/alpine"]);
        assert!(store.repositories("quay.io").await.unwrap().is_empty());
    }
}
