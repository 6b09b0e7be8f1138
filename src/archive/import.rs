//! `regmirror import`: an OCI image layout tar into a cache, all or nothing.
//!
//! Three phases, and nothing becomes visible before the third:
//!
//! 1. **Stage.** The tar is read once, front to back. Each `blobs/sha256/<hex>` entry is
//!    hashed while it is copied into a staging directory in the cache's `tmp/` (the same
//!    filesystem, so committing is a rename); content the cache already holds as a blob is
//!    only hashed. An entry whose bytes do not hash to its name stops the import and is
//!    named. The archive must end with tar's end-of-archive marker: a file cut short, even
//!    exactly between two entries, is refused as truncated.
//! 2. **Check.** From `index.json`, every image is walked: each manifest must be in the
//!    archive, parse, and match its descriptor's size; each config and layer must be in the
//!    archive (or already cached) with the size its manifest declares. Children of an index
//!    may be absent (an export of a cache seeded for one platform); they are counted.
//! 3. **Commit.** Blobs first, then manifests children-before-parents, then tag records,
//!    each renamed into place by the store. A mirror serving the directory meanwhile never
//!    sees a tag whose content is not there yet.
//!
//! If anything fails before the commit, the staging directory is removed and the cache is
//! as it was. Importing the same archive twice adds nothing the second time.
//!
//! Tags are recorded under the upstream and repository the archive's names give
//! (`io.containerd.image.name`, else a registry-qualified `org.opencontainers.image.ref.name`),
//! with the time the exporting mirror last confirmed them upstream. A mirror with that
//! upstream configured serves them by tag, as fresh while that answer is younger than
//! `tag_ttl`, stale after that while the upstream cannot be reached, and by digest always.
//! A tag the cache already has is kept if its answer is newer.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tempfile::{NamedTempFile, TempDir, TempPath};

use super::{BLOBS_DIR, CHECKED_AT, CONTAINERD_NAME, INDEX_FILE, Index, LAYOUT_FILE, Layout, MAX_INDEX_SIZE, REF_NAME};
use crate::image_ref::ImageRef;
use crate::index::Key;
use crate::mirror::MAX_MANIFEST_SIZE;
use crate::oci::{self, Shape};
use crate::reference::{Digest, RepoName, Tag};
use crate::store::{Store, StoredManifest, TagRecord};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("the archive is not a readable tar file: {0}")]
    Tar(io::Error),
    #[error("the archive is truncated: {0}")]
    Truncated(String),
    #[error("blob {expected} in the archive is corrupt: its content hashes to {actual}")]
    Corrupt { expected: Digest, actual: Digest },
    #[error("not an OCI image layout: {0}")]
    NotLayout(String),
    #[error("{what} {digest} is not in the archive")]
    Missing { what: &'static str, digest: Digest },
    #[error("{digest} is {actual} bytes, but its descriptor says {declared}")]
    Size { digest: Digest, declared: u64, actual: u64 },
    #[error("manifest {digest}: {reason}")]
    Manifest { digest: Digest, reason: String },
    #[error("unsupported archive entry {path:?}: {reason}")]
    Entry { path: String, reason: &'static str },
    #[error("cannot stage in the cache's tmp/: {0}")]
    Staging(io::Error),
    #[error("cannot commit to the cache: {0}")]
    Commit(io::Error),
}

/// What an import did.
#[derive(Debug, Clone, Default)]
pub struct ImportReport {
    pub images: Vec<ImportedImage>,
    pub blobs_added: usize,
    pub blobs_present: usize,
    pub manifests_added: usize,
    pub manifests_present: usize,
    /// Bytes of blobs and manifests added to the cache.
    pub bytes_added: u64,
    /// Index children the archive does not hold.
    pub children_absent: usize,
    /// Entries that are not part of any image (unreferenced blobs, other files).
    pub ignored_entries: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    /// The name the archive gives it, if registry-qualified.
    pub name: Option<String>,
    pub digest: Digest,
    pub tag: TagOutcome,
}

/// What happened to an image's tag record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagOutcome {
    /// No tag: named by digest, or not registry-qualified (reachable by digest).
    None,
    Written,
    /// The cache already had this tag pointing at this digest.
    Unchanged,
    /// The cache has a newer answer for this tag, pointing elsewhere: kept.
    KeptNewer(Digest),
}

impl ImportedImage {
    pub fn line(&self) -> String {
        let name = self.name.as_deref().unwrap_or("(unnamed)");
        let tag = match &self.tag {
            TagOutcome::None => "no tag recorded, reachable by digest".to_owned(),
            TagOutcome::Written => "tag recorded".to_owned(),
            TagOutcome::Unchanged => "tag already recorded".to_owned(),
            TagOutcome::KeptNewer(d) => format!("tag kept at the cache's newer {d}"),
        };
        format!("imported {name} {} ({tag})", self.digest)
    }
}

/// Imports the archive at `path` into `store`, all or nothing.
pub async fn import(store: &Store, path: &Path) -> Result<ImportReport, ImportError> {
    let staging = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(store.root().join("tmp"))
        .map_err(ImportError::Staging)?;
    let checked = {
        let (store, path, dir) = (store.clone(), path.to_owned(), staging.path().to_owned());
        tokio::task::spawn_blocking(move || {
            let staged = stage(&store, &path, &dir)?;
            check(&store, &staged, &dir)
        })
        .await
        .map_err(|e| ImportError::Staging(io::Error::other(e)))??
    };
    commit(store, checked, staging).await
}

/// What phase 1 found.
struct Staged {
    layout: Option<Vec<u8>>,
    index: Option<Vec<u8>>,
    /// Every verified blob entry and its size; `true` if staged, `false` if the cache
    /// already holds it as a blob.
    blobs: HashMap<Digest, (u64, bool)>,
    other_entries: usize,
}

/// Reads the tar, verifying and staging every blob entry. Blocking.
fn stage(store: &Store, path: &Path, dir: &Path) -> Result<Staged, ImportError> {
    let file = File::open(path).map_err(|source| ImportError::Open { path: path.to_owned(), source })?;
    let ended = Rc::new(Cell::new(false));
    let reader = EofWatch { inner: BufReader::with_capacity(1 << 20, file), ended: ended.clone() };
    let mut archive = tar::Archive::new(reader);
    let mut staged = Staged { layout: None, index: None, blobs: HashMap::new(), other_entries: 0 };
    // A read error after the file ended is a truncation, whatever tar made of it; before the
    // first entry, the file is not a tar at all.
    let entries = Cell::new(0usize);
    let read_error = |e: io::Error| {
        if ended.get() && entries.get() > 0 { ImportError::Truncated(e.to_string()) } else { ImportError::Tar(e) }
    };

    for entry in archive.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        entries.set(entries.get() + 1);
        let name = entry.path().map_err(read_error)?.to_string_lossy().into_owned();
        let name = name.trim_start_matches("./").to_owned();
        let kind = entry.header().entry_type();
        let size = entry.size();
        if kind.is_dir() {
            continue;
        }
        if name == LAYOUT_FILE || name == INDEX_FILE {
            if !kind.is_file() {
                return Err(ImportError::Entry { path: name, reason: "not a regular file" });
            }
            if size > MAX_INDEX_SIZE {
                return Err(ImportError::NotLayout(format!("{name} is {size} bytes")));
            }
            let mut bytes = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut bytes).map_err(read_error)?;
            if bytes.len() as u64 != size {
                return Err(ImportError::Truncated(format!("{name} ends after {} of {size} bytes", bytes.len())));
            }
            *(if name == LAYOUT_FILE { &mut staged.layout } else { &mut staged.index }) = Some(bytes);
            continue;
        }
        let Some(hex) = name.strip_prefix(BLOBS_DIR) else {
            tracing::debug!(entry = %name, "ignoring an archive entry outside the layout");
            staged.other_entries += 1;
            continue;
        };
        let Ok(digest) = Digest::parse(&format!("sha256:{hex}")) else {
            return Err(ImportError::Entry { path: name, reason: "not named by a sha256 digest" });
        };
        if !kind.is_file() {
            return Err(ImportError::Entry { path: name, reason: "a link or special file, not a regular file" });
        }
        let keep = !store.has_blob(&digest);
        let target = dir.join(hex);
        let written = copy_verified(&mut entry, keep.then_some(target.as_path()), digest, &name, size, &read_error)?;
        staged.blobs.insert(digest, (written, keep));
    }
    drop(archive);
    if ended.get() && entries.get() == 0 {
        return Err(ImportError::NotLayout("the archive is empty".into()));
    }
    if ended.get() {
        return Err(ImportError::Truncated("it ends before tar's end-of-archive marker".into()));
    }
    Ok(staged)
}

/// Copies one entry to `target` (or only reads it) while hashing it; fails unless it is
/// exactly `size` bytes hashing to `digest`.
fn copy_verified(
    entry: &mut impl Read,
    target: Option<&Path>,
    digest: Digest,
    name: &str,
    size: u64,
    read_error: &dyn Fn(io::Error) -> ImportError,
) -> Result<u64, ImportError> {
    let mut out = match target {
        Some(path) => Some(BufWriter::with_capacity(1 << 20, File::create(path).map_err(ImportError::Staging)?)),
        None => None,
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = entry.read(&mut buf).map_err(read_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(out) = out.as_mut() {
            out.write_all(&buf[..n]).map_err(ImportError::Staging)?;
        }
        read += n as u64;
    }
    if read != size {
        return Err(ImportError::Truncated(format!("{name} ends after {read} of {size} bytes")));
    }
    let actual = Digest::from_sha256(hasher.finalize().into());
    if actual != digest {
        return Err(ImportError::Corrupt { expected: digest, actual });
    }
    if let Some(out) = out {
        out.into_inner().map_err(|e| ImportError::Staging(e.into_error()))?;
    }
    Ok(read)
}

/// What phase 2 decided to commit.
struct Checked {
    /// Blobs (configs and layers) with their sizes and whether they are staged.
    blobs: BTreeMap<Digest, (u64, bool)>,
    /// Manifests, children before parents.
    manifests: Vec<(Digest, StoredManifest)>,
    images: Vec<(Option<ImageRef>, Digest, TagRecord)>,
    children_absent: usize,
    ignored_entries: usize,
}

/// Walks every image of `index.json` over the staged content. Blocking.
fn check(store: &Store, staged: &Staged, dir: &Path) -> Result<Checked, ImportError> {
    let layout = staged.layout.as_deref().ok_or_else(|| ImportError::NotLayout(format!("no {LAYOUT_FILE} file")))?;
    let layout: Layout =
        serde_json::from_slice(layout).map_err(|e| ImportError::NotLayout(format!("{LAYOUT_FILE}: {e}")))?;
    if !layout.image_layout_version.starts_with("1.") {
        return Err(ImportError::NotLayout(format!("unsupported layout version {:?}", layout.image_layout_version)));
    }
    let index = staged.index.as_deref().ok_or_else(|| ImportError::NotLayout(format!("no {INDEX_FILE} file")))?;
    let index: Index =
        serde_json::from_slice(index).map_err(|e| ImportError::NotLayout(format!("{INDEX_FILE}: {e}")))?;
    if index.manifests.is_empty() {
        return Err(ImportError::NotLayout(format!("{INDEX_FILE} lists no images")));
    }

    let mut walk = Walk {
        store,
        staged,
        dir,
        blobs: BTreeMap::new(),
        manifests: Vec::new(),
        seen: HashSet::new(),
        children_absent: 0,
    };
    let mut images = Vec::new();
    for descriptor in &index.manifests {
        let digest = descriptor.sha256().map_err(|e| ImportError::NotLayout(format!("{INDEX_FILE}: {e}")))?;
        let media_type = walk.manifest(digest, &descriptor.media_type, descriptor.size, true)?.unwrap_or_default();
        let name = descriptor
            .annotations
            .get(CONTAINERD_NAME)
            .or_else(|| descriptor.annotations.get(REF_NAME))
            .and_then(|n| ImageRef::parse_qualified(n));
        if let Some(pinned) = name.as_ref().and_then(|n| n.digest)
            && pinned != digest
        {
            return Err(ImportError::NotLayout(format!("{INDEX_FILE} names {pinned} for the entry of {digest}")));
        }
        let checked_at = descriptor.annotations.get(CHECKED_AT).and_then(|s| s.parse().ok()).unwrap_or(0);
        images.push((name, digest, TagRecord { digest, media_type, checked_at }));
    }
    let used: HashSet<Digest> = walk.blobs.keys().chain(walk.manifests.iter().map(|(d, _)| d)).copied().collect();
    let ignored_entries = staged.other_entries + staged.blobs.keys().filter(|d| !used.contains(d)).count();
    Ok(Checked {
        blobs: walk.blobs,
        manifests: walk.manifests,
        images,
        children_absent: walk.children_absent,
        ignored_entries,
    })
}

struct Walk<'a> {
    store: &'a Store,
    staged: &'a Staged,
    dir: &'a Path,
    blobs: BTreeMap<Digest, (u64, bool)>,
    manifests: Vec<(Digest, StoredManifest)>,
    seen: HashSet<Digest>,
    children_absent: usize,
}

impl Walk<'_> {
    /// Checks one manifest and what it references, depth first. Returns its media type, or
    /// `None` for an absent child (allowed when not `required`).
    fn manifest(
        &mut self,
        digest: Digest,
        declared_type: &str,
        declared_size: u64,
        required: bool,
    ) -> Result<Option<String>, ImportError> {
        if let Some((_, stored)) = self.manifests.iter().find(|(d, _)| *d == digest) {
            return Ok(Some(stored.media_type.clone()));
        }
        if !self.seen.insert(digest) {
            return Err(ImportError::Manifest { digest, reason: "it references itself".into() });
        }
        let Some(&(size, staged)) = self.staged.blobs.get(&digest) else {
            if required {
                return Err(ImportError::Missing { what: "manifest", digest });
            }
            self.children_absent += 1;
            return Ok(None);
        };
        if size != declared_size {
            return Err(ImportError::Size { digest, declared: declared_size, actual: size });
        }
        if size > MAX_MANIFEST_SIZE as u64 {
            return Err(ImportError::Manifest { digest, reason: format!("{size} bytes is too large for a manifest") });
        }
        let path = if staged { self.dir.join(digest.hex()) } else { self.store.path_of(Key::Blob(digest)) };
        let bytes = std::fs::read(&path).map_err(ImportError::Staging)?;
        if Digest::of(&bytes) != digest {
            return Err(ImportError::Manifest { digest, reason: "changed on disk while importing".into() });
        }
        let shape = oci::shape(&bytes).map_err(|e| ImportError::Manifest { digest, reason: e.to_string() })?;
        let media_type = oci::media_type(Some(declared_type), &bytes, &shape);
        match &shape {
            Shape::Index(children) => {
                for child in children {
                    let child_digest =
                        child.sha256().map_err(|e| ImportError::Manifest { digest, reason: e.to_string() })?;
                    self.manifest(child_digest, &child.media_type, child.size, false)?;
                }
            }
            Shape::Image { .. } => {
                for blob in shape.blobs() {
                    let blob_digest =
                        blob.sha256().map_err(|e| ImportError::Manifest { digest, reason: e.to_string() })?;
                    let what = if blob.media_type.contains("config") { "config" } else { "layer" };
                    let &(size, staged) = self
                        .staged
                        .blobs
                        .get(&blob_digest)
                        .ok_or(ImportError::Missing { what, digest: blob_digest })?;
                    if size != blob.size {
                        return Err(ImportError::Size { digest: blob_digest, declared: blob.size, actual: size });
                    }
                    self.blobs.insert(blob_digest, (size, staged));
                }
            }
        }
        self.manifests.push((digest, StoredManifest { bytes: Bytes::from(bytes), media_type: media_type.clone() }));
        Ok(Some(media_type))
    }
}

/// Renames everything into place: blobs, manifests (children first), tags.
async fn commit(store: &Store, checked: Checked, staging: TempDir) -> Result<ImportReport, ImportError> {
    let mut report = ImportReport {
        children_absent: checked.children_absent,
        ignored_entries: checked.ignored_entries,
        ..ImportReport::default()
    };
    let (added, present, bytes) = {
        let (store, dir, blobs) = (store.clone(), staging.path().to_owned(), checked.blobs);
        tokio::task::spawn_blocking(move || commit_blobs(&store, &dir, &blobs))
            .await
            .map_err(|e| ImportError::Commit(io::Error::other(e)))??
    };
    report.blobs_added = added;
    report.blobs_present = present;
    report.bytes_added = bytes;

    for (digest, manifest) in &checked.manifests {
        if store.path_of(Key::Manifest(*digest)).is_file() {
            report.manifests_present += 1;
            continue;
        }
        store.put_manifest(digest, manifest).await.map_err(ImportError::Commit)?;
        report.manifests_added += 1;
        report.bytes_added += manifest.bytes.len() as u64;
    }

    for (name, digest, record) in checked.images {
        let tag = match name.as_ref().and_then(|n| Some((n, n.tag_to_record()?))) {
            Some((name, tag)) => record_tag(store, &name.registry, &name.repository, tag, record).await?,
            None => TagOutcome::None,
        };
        report.images.push(ImportedImage { name: name.map(|n| n.to_string()), digest, tag });
    }
    drop(staging);
    Ok(report)
}

/// Commits the staged blobs. Returns (added, already present, bytes added). Blocking.
fn commit_blobs(
    store: &Store,
    dir: &Path,
    blobs: &BTreeMap<Digest, (u64, bool)>,
) -> Result<(usize, usize, u64), ImportError> {
    let (mut added, mut present, mut bytes) = (0, 0, 0);
    for (digest, &(size, staged)) in blobs {
        if store.has_blob(digest) {
            present += 1;
            continue;
        }
        if !staged {
            return Err(ImportError::Commit(io::Error::other(format!(
                "blob {digest} left the cache during the import (evicted?): import again"
            ))));
        }
        let path = dir.join(digest.hex());
        let file = File::options().read(true).write(true).open(&path).map_err(ImportError::Commit)?;
        let temp = NamedTempFile::from_parts(file, TempPath::try_from_path(path).map_err(ImportError::Commit)?);
        store.commit_blob(temp, digest).map_err(ImportError::Commit)?;
        added += 1;
        bytes += size;
    }
    Ok((added, present, bytes))
}

/// Writes a tag record unless the cache has the same one or a newer answer.
async fn record_tag(
    store: &Store,
    upstream: &str,
    repository: &RepoName,
    tag: &Tag,
    record: TagRecord,
) -> Result<TagOutcome, ImportError> {
    let existing = store.tag(upstream, repository, tag).await.map_err(ImportError::Commit)?;
    let outcome = match existing {
        Some(current) if current.digest == record.digest && current.checked_at >= record.checked_at => {
            return Ok(TagOutcome::Unchanged);
        }
        // The same answer, confirmed more recently by the exporting mirror: keep that time.
        Some(current) if current.digest == record.digest => TagOutcome::Unchanged,
        Some(current) if current.checked_at > record.checked_at => return Ok(TagOutcome::KeptNewer(current.digest)),
        _ => TagOutcome::Written,
    };
    store.put_tag(upstream, repository, tag, &record).await.map_err(ImportError::Commit)?;
    Ok(outcome)
}

/// Remembers whether the reader reached the end of the file: a tar that ends properly is
/// read up to its end-of-archive block and no further, so reaching the end means the
/// archive was cut short.
struct EofWatch<R> {
    inner: R,
    ended: Rc<Cell<bool>>,
}

impl<R: Read> Read for EofWatch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ended.set(true);
        }
        Ok(n)
    }
}
