//! `regmirror export`: cached images into an OCI image layout tar (see [`super`]).
//!
//! Export reads only the cache and never contacts an upstream: an image that is not fully
//! cached is an error that names what is missing and says to seed it first. (Children of
//! an index for platforms that were not seeded are left out and reported instead.)
//!
//! The tar is written straight from the cache files, one at a time, into a temp file next
//! to the output that is renamed over it at the end: the data is on disk once more, not
//! twice, and a failed export leaves no partial archive. Every file is re-hashed on the way
//! out, so a cache file corrupted on disk is refused rather than exported. Entries are in
//! digest order with zero timestamps and owners, so exporting the same images twice gives
//! the same bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::{BLOBS_DIR, CHECKED_AT, CONTAINERD_NAME, INDEX_FILE, Index, LAYOUT_FILE, LAYOUT_VERSION, Layout, REF_NAME};
use crate::image_ref::ImageRef;
use crate::index::Key;
use crate::oci::{self, Descriptor, Shape, ShapeError};
use crate::reference::{Digest, Reference};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{image} is not in the cache (seed it first: regmirror seed {image})")]
    NotCached { image: String },
    #[error("{image}: {what} {digest} is not in the cache (seed it first: regmirror seed {image})")]
    Missing { image: String, what: &'static str, digest: Digest },
    #[error("{image}: manifest {digest}: {source}")]
    Shape { image: String, digest: Digest, source: ShapeError },
    #[error("blob {digest} was evicted from the cache during the export: seed again, or raise max_cache_size")]
    Evicted { digest: Digest },
    #[error("the cache file of {digest} is corrupt ({reason}): run `regmirror verify`, then seed again")]
    Corrupt { digest: Digest, reason: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cache storage error: {0}")]
    Storage(#[from] io::Error),
}

/// What an export wrote.
#[derive(Debug, Clone, Default)]
pub struct ExportReport {
    /// Name and digest of each image entry in `index.json`.
    pub images: Vec<(String, Digest)>,
    pub manifests: usize,
    pub blobs: usize,
    /// Size of the archive file.
    pub archive_bytes: u64,
    /// Index children left out because they are not cached: image, child digest, platform.
    pub left_out: Vec<(String, Digest, String)>,
}

/// What goes into the tar under one digest.
enum Content {
    Manifest(Bytes),
    Blob { size: u64 },
}

/// Writes `images` from the cache as an OCI layout tar at `output`.
pub async fn export(store: &Store, images: &[ImageRef], output: &Path) -> Result<ExportReport, ExportError> {
    let mut contents: BTreeMap<Digest, Content> = BTreeMap::new();
    let mut index = Index {
        schema_version: 2,
        media_type: Some(oci::OCI_INDEX.into()),
        manifests: Vec::new(),
        annotations: BTreeMap::new(),
    };
    let mut report = ExportReport::default();
    for image in images {
        let name = image.to_string();
        if index.manifests.iter().any(|d| d.annotations.get(REF_NAME) == Some(&name)) {
            continue;
        }
        let (digest, checked_at) = match image.reference() {
            Reference::Digest(digest) => (digest, None),
            Reference::Tag(tag) => match store.tag(&image.registry, &image.repository, &tag).await? {
                Some(record) => (record.digest, Some(record.checked_at)),
                None => return Err(ExportError::NotCached { image: name }),
            },
        };
        let Some(top) = store.manifest(&digest).await? else {
            return Err(ExportError::NotCached { image: name });
        };
        collect(store, &name, digest, &mut contents, &mut report).await?;

        let mut annotations =
            BTreeMap::from([(REF_NAME.to_owned(), name.clone()), (CONTAINERD_NAME.to_owned(), name.clone())]);
        if let Some(checked_at) = checked_at {
            annotations.insert(CHECKED_AT.to_owned(), checked_at.to_string());
        }
        index.manifests.push(Descriptor {
            media_type: top.media_type,
            digest: digest.to_string(),
            size: top.bytes.len() as u64,
            platform: None,
            annotations,
        });
        report.images.push((name, digest));
    }
    report.manifests = contents.values().filter(|c| matches!(c, Content::Manifest(_))).count();
    report.blobs = contents.len() - report.manifests;

    let store = store.clone();
    let output = output.to_owned();
    report.archive_bytes = tokio::task::spawn_blocking(move || write_archive(&store, &contents, &index, &output))
        .await
        .map_err(io::Error::other)??;
    Ok(report)
}

/// Gathers an image's manifests and blobs from the cache.
async fn collect(
    store: &Store,
    image: &str,
    root: Digest,
    contents: &mut BTreeMap<Digest, Content>,
    report: &mut ExportReport,
) -> Result<(), ExportError> {
    let mut pending: Vec<(Digest, Option<String>)> = vec![(root, None)];
    let mut images_found = 0;
    while let Some((digest, platform)) = pending.pop() {
        if let Some(Content::Manifest(_)) = contents.get(&digest) {
            images_found += 1;
            continue;
        }
        let Some(manifest) = store.manifest(&digest).await? else {
            // Only index children get here without a platform: the root was read already.
            report.left_out.push((image.to_owned(), digest, platform.unwrap_or_else(|| "unknown platform".into())));
            continue;
        };
        let shape =
            oci::shape(&manifest.bytes).map_err(|source| ExportError::Shape { image: image.into(), digest, source })?;
        match &shape {
            Shape::Index(children) => {
                for child in children {
                    let child_digest =
                        child.sha256().map_err(|source| ExportError::Shape { image: image.into(), digest, source })?;
                    pending.push((child_digest, child.platform.as_ref().map(|p| p.to_string())));
                }
            }
            Shape::Image { .. } => {
                images_found += 1;
                for blob in shape.blobs() {
                    let blob_digest =
                        blob.sha256().map_err(|source| ExportError::Shape { image: image.into(), digest, source })?;
                    if !store.has_blob(&blob_digest) {
                        let what = if blob.media_type.contains("config") { "config" } else { "layer" };
                        return Err(ExportError::Missing { image: image.into(), what, digest: blob_digest });
                    }
                    contents.insert(blob_digest, Content::Blob { size: blob.size });
                }
            }
        }
        contents.insert(digest, Content::Manifest(manifest.bytes));
    }
    if images_found == 0 {
        return Err(ExportError::Missing { image: image.into(), what: "no platform manifest of index", digest: root });
    }
    Ok(())
}

/// Writes the tar into a temp file beside `output` and renames it over `output`. Returns
/// the archive's size. Blocking.
fn write_archive(
    store: &Store,
    contents: &BTreeMap<Digest, Content>,
    index: &Index,
    output: &Path,
) -> Result<u64, ExportError> {
    let write_error = |source: io::Error| ExportError::Write { path: output.to_owned(), source };
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = tempfile::Builder::new()
        .prefix(".regmirror-export-")
        .suffix(".partial")
        .tempfile_in(parent)
        .map_err(write_error)?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, temp.as_file()));

    let layout = serde_json::to_vec(&Layout { image_layout_version: LAYOUT_VERSION.into() }).expect("json serialises");
    append(&mut tar, LAYOUT_FILE, &layout[..], layout.len() as u64).map_err(write_error)?;
    for dir in ["blobs/", BLOBS_DIR] {
        let mut header = header(tar::EntryType::Directory, 0);
        header.set_mode(0o755);
        tar.append_data(&mut header, dir, io::empty()).map_err(write_error)?;
    }
    for (digest, content) in contents {
        let path = super::blob_path(&digest.hex());
        match content {
            Content::Manifest(bytes) => {
                let actual = Digest::of(bytes);
                if actual != *digest {
                    return Err(ExportError::Corrupt {
                        digest: *digest,
                        reason: format!("its content hashes to {actual}"),
                    });
                }
                append(&mut tar, &path, &bytes[..], bytes.len() as u64).map_err(write_error)?;
            }
            Content::Blob { size } => {
                let file = match File::open(store.path_of(Key::Blob(*digest))) {
                    Ok(file) => file,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(ExportError::Evicted { digest: *digest });
                    }
                    Err(e) => return Err(e.into()),
                };
                let len = file.metadata()?.len();
                if len != *size {
                    return Err(ExportError::Corrupt {
                        digest: *digest,
                        reason: format!("{len} bytes, its descriptor says {size}"),
                    });
                }
                let mut reader = HashingReader { inner: file.take(len), hasher: Sha256::new(), read: 0 };
                append(&mut tar, &path, &mut reader, len).map_err(write_error)?;
                let actual = Digest::from_sha256(reader.hasher.finalize().into());
                if reader.read != len || actual != *digest {
                    return Err(ExportError::Corrupt {
                        digest: *digest,
                        reason: format!("its content hashes to {actual}"),
                    });
                }
            }
        }
    }
    let index_json = serde_json::to_vec(index).expect("json serialises");
    append(&mut tar, INDEX_FILE, &index_json[..], index_json.len() as u64).map_err(write_error)?;

    let mut writer = tar.into_inner().map_err(write_error)?;
    writer.flush().map_err(write_error)?;
    drop(writer);
    temp.as_file().sync_all().map_err(write_error)?;
    let size = temp.as_file().metadata().map_err(write_error)?.len();
    temp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(write_error)?;
    temp.persist(output).map_err(|e| write_error(e.error))?;
    Ok(size)
}

/// A regular file entry with reproducible metadata.
fn header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn append<W: Write>(tar: &mut tar::Builder<W>, path: &str, data: impl Read, size: u64) -> io::Result<()> {
    let mut header = header(tar::EntryType::Regular, size);
    tar.append_data(&mut header, path, data)
}

/// Hashes what passes through, to re-verify cache files as they are exported.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}
