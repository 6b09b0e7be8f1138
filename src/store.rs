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
//! Callers see only the methods below: the later S3 tier implements the same surface.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tempfile::NamedTempFile;

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

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) a cache directory and removes what interrupted fills left
    /// in `tmp/`.
    pub fn open(root: &Path) -> io::Result<Store> {
        for dir in ["blobs/sha256", "manifests/sha256", "repos", "tmp"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        let store = Store { root: root.to_owned() };
        let removed = store.clear_tmp()?;
        if removed > 0 {
            tracing::info!(removed, "removed files of interrupted fills");
        }
        Ok(store)
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
        sharded(&self.root.join("blobs/sha256"), digest)
    }

    fn manifest_path(&self, digest: &Digest) -> PathBuf {
        sharded(&self.root.join("manifests/sha256"), digest)
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

    pub async fn open_blob(&self, digest: &Digest) -> io::Result<Option<BlobFile>> {
        let path = self.blob_path(digest);
        blocking(move || match File::open(&path) {
            Ok(file) => {
                let size = file.metadata()?.len();
                Ok(Some(BlobFile { file, size }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    /// A new temp file for a fill. Dropping it without [`Self::commit_blob`] deletes it.
    pub fn temp_file(&self) -> io::Result<NamedTempFile> {
        tempfile::Builder::new().prefix("fill-").tempfile_in(self.root.join("tmp"))
    }

    /// Makes a fully written and verified temp file visible as `digest`. Blocking: call it from
    /// a blocking context. The caller guarantees the content hashes to `digest`.
    pub fn commit_blob(&self, temp: NamedTempFile, digest: &Digest) -> io::Result<()> {
        temp.as_file().sync_data()?;
        let path = self.blob_path(digest);
        std::fs::create_dir_all(path.parent().expect("sharded path has a parent"))?;
        temp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    }

    pub async fn manifest(&self, digest: &Digest) -> io::Result<Option<StoredManifest>> {
        let path = self.manifest_path(digest);
        blocking(move || {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let media_type = std::fs::read_to_string(path.with_extension("type"))?;
            Ok(Some(StoredManifest { bytes: Bytes::from(bytes), media_type }))
        })
        .await
    }

    /// Stores manifest bytes under their digest. The caller has verified the digest.
    pub async fn put_manifest(&self, digest: &Digest, manifest: &StoredManifest) -> io::Result<()> {
        let store = self.clone();
        let path = self.manifest_path(digest);
        let manifest = manifest.clone();
        blocking(move || {
            // The type first: the bytes' appearance is what makes the manifest visible.
            store.write_atomic(&path.with_extension("type"), manifest.media_type.as_bytes())?;
            store.write_atomic(&path, &manifest.bytes)
        })
        .await
    }

    pub async fn tag(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> io::Result<Option<TagRecord>> {
        let path = self.tag_path(upstream, repo, tag);
        blocking(move || match std::fs::read(&path) {
            // A record we cannot parse is as good as none: it will be fetched again.
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    pub async fn put_tag(&self, upstream: &str, repo: &RepoName, tag: &Tag, record: &TagRecord) -> io::Result<()> {
        let store = self.clone();
        let path = self.tag_path(upstream, repo, tag);
        let json = serde_json::to_vec(record).expect("a tag record serialises");
        blocking(move || store.write_atomic(&path, &json)).await
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

/// `<dir>/<first 2 hex>/<64 hex>`: two levels keep directories small at 100k blobs.
fn sharded(dir: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    dir.join(&hex[..2]).join(hex)
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

    #[tokio::test]
    async fn blobs_appear_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
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
        let store = Store::open(dir.path()).unwrap();
        drop(store.temp_file().unwrap());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // A crash leaves a file behind: the next start removes it.
        std::fs::write(dir.path().join("tmp/fill-crashed"), b"partial").unwrap();
        Store::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn manifests_tags_and_repositories_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
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
