//! Offline commands over a cache directory: `ls`, `verify` and `gc`.
//!
//! They work on the files directly and are safe beside a running mirror: they never write a
//! file in place (quarantine and eviction are a rename or an unlink), and a mirror that finds
//! a file gone fetches it again.

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use crate::image_ref::ImageRef;
use crate::index::Key;
use crate::metrics::Metrics;
use crate::reference::{Digest, RepoName, Tag};
use crate::store::Store;

/// One cached tag, as `regmirror ls` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedTag {
    pub upstream: String,
    pub repository: String,
    pub tag: String,
    pub digest: Digest,
    /// Bytes of the image's manifests and blobs present in the cache.
    pub cached_bytes: u64,
    pub last_used: Option<SystemTime>,
}

/// Opens a cache for reading without evicting anything, and without touching `tmp/`, where
/// a running mirror's fills may be in progress.
pub fn open_unbounded(cache_dir: &std::path::Path) -> io::Result<Store> {
    Store::open_shared(cache_dir, u64::MAX, Arc::new(Metrics::new()))
}

/// Every cached tag of every upstream, sorted.
pub async fn list(store: &Store) -> io::Result<Vec<ListedTag>> {
    let mut listed = Vec::new();
    for upstream in store.upstreams().await? {
        for repository in store.repositories(&upstream).await? {
            let Ok(repo) = RepoName::parse(&repository) else { continue };
            for tag in store.tags(&upstream, &repo).await? {
                let Ok(tag_name) = Tag::parse(&tag) else { continue };
                let Some(record) = store.tag(&upstream, &repo, &tag_name).await? else { continue };
                let last_used =
                    std::fs::metadata(store.path_of(Key::Manifest(record.digest))).and_then(|m| m.modified()).ok();
                let cached_bytes = image_bytes(store, &record.digest)?;
                listed.push(ListedTag {
                    upstream: upstream.clone(),
                    repository: repository.clone(),
                    tag,
                    digest: record.digest,
                    cached_bytes,
                    last_used,
                });
            }
        }
    }
    Ok(listed)
}

/// The cached bytes of a manifest and everything it references (through indexes too).
fn image_bytes(store: &Store, digest: &Digest) -> io::Result<u64> {
    let mut total = 0;
    for key in store.image_keys(digest)? {
        total += std::fs::metadata(store.path_of(key)).map(|m| m.len()).unwrap_or(0);
    }
    Ok(total)
}

/// Renders `ls` output as aligned columns.
pub fn render_list(tags: &[ListedTag]) -> String {
    let mut rows = vec![["UPSTREAM", "REPOSITORY", "TAG", "DIGEST", "SIZE", "LAST USED"].map(str::to_owned)];
    for t in tags {
        rows.push([
            t.upstream.clone(),
            t.repository.clone(),
            t.tag.clone(),
            t.digest.to_string(),
            human_size(t.cached_bytes),
            t.last_used.map_or_else(|| "-".to_owned(), |m| humantime::format_rfc3339_seconds(m).to_string()),
        ]);
    }
    let widths: Vec<usize> = (0..6).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
            cells.join("  ").trim_end().to_owned() + "\n"
        })
        .collect()
}

/// `1.5 GiB`, `312.0 KiB`, `17 B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub checked: u64,
    pub bytes: u64,
    /// Files whose content did not match their name, now in quarantine.
    pub quarantined: Vec<(Key, PathBuf)>,
}

/// Re-hashes every cached blob and manifest; moves the bad ones to `quarantine/`.
/// Blocking: it reads the whole cache.
pub fn verify(store: &Store) -> io::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    for file in store.cached_files()? {
        let (Key::Blob(expected) | Key::Manifest(expected)) = file.key;
        let actual = match hash_file(&store.path_of(file.key)) {
            Ok(d) => d,
            // Evicted by a running mirror meanwhile: nothing to check.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        report.checked += 1;
        report.bytes += file.size;
        if actual != expected {
            let target = store.quarantine(file.key)?;
            tracing::error!(expected = %expected, %actual, quarantined = %target.display(), "corrupt cache file");
            report.quarantined.push((file.key, target));
        }
    }
    Ok(report)
}

fn hash_file(path: &std::path::Path) -> io::Result<Digest> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest::from_sha256(hasher.finalize().into()))
}

/// What `gc` did.
#[derive(Debug)]
pub struct GcReport {
    pub evicted_files: u64,
    pub evicted_bytes: u64,
    pub remaining_bytes: u64,
}

/// Shrinks a cache to `max_bytes`, least recently used first, keeping `pinned` images.
/// Blocking.
pub fn gc(cache_dir: &std::path::Path, max_bytes: u64, pinned: &[ImageRef]) -> io::Result<GcReport> {
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(cache_dir, max_bytes, metrics.clone())?;
    store.pin(pinned)?;
    store.enforce_bound();
    Ok(GcReport {
        evicted_files: metrics.evictions.get(),
        evicted_bytes: metrics.evicted_bytes.get(),
        remaining_bytes: store.size(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(17), "17 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 << 30), "5.0 GiB");
    }

    #[test]
    fn verify_quarantines_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_unbounded(dir.path()).unwrap();
        let good = b"good bytes";
        let bad = b"bad bytes";
        for data in [&good[..], &bad[..]] {
            let mut temp = store.temp_file().unwrap();
            io::Write::write_all(&mut temp, data).unwrap();
            store.commit_blob(temp, &Digest::of(data)).unwrap();
        }
        std::fs::write(store.path_of(Key::Blob(Digest::of(bad))), b"flipped!!").unwrap();
        let report = verify(&store).unwrap();
        assert_eq!(report.checked, 2);
        assert_eq!(report.quarantined.len(), 1);
        assert_eq!(report.quarantined[0].0, Key::Blob(Digest::of(bad)));
        assert!(!store.has_blob(&Digest::of(bad)));
        assert!(store.has_blob(&Digest::of(good)));
    }
}
