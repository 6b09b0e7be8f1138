//! Images carried between caches as an OCI image layout in a tar file: `regmirror export`
//! writes one ([`export`]), `regmirror import` reads one ([`import`]).
//!
//! ```text
//! oci-layout                {"imageLayoutVersion":"1.0.0"}
//! blobs/sha256/<hex>        every manifest, index, config and layer, by digest
//! index.json                one descriptor per exported image, written last
//! ```
//!
//! Each `index.json` entry carries the image's full name twice, because readers look in
//! different places:
//!
//! - `org.opencontainers.image.ref.name`: `docker.io/library/alpine:3.20`, which is what
//!   skopeo matches: `skopeo copy oci-archive:FILE.tar:docker.io/library/alpine:3.20 …`.
//!   The full name, not just the tag, so one archive can hold `alpine:3.20` and
//!   `busybox:3.20`. (skopeo 1.9, Debian 12's, looks names up only among OCI-typed entries,
//!   so it finds an image stored as Docker schema2 only in an archive holding just that
//!   image, read without a name: `skopeo copy oci-archive:FILE.tar …`.)
//! - `io.containerd.image.name`: the same, which `ctr images import` and containerd use.
//! - `io.regmirror.tag.checked-at`: when the seeding mirror last confirmed the tag upstream
//!   (Unix seconds), so an import keeps the newer of two answers for a tag.
//!
//! Images exported by digest are named `docker.io/library/alpine@sha256:…`, and import
//! records no tag for them. Import accepts archives from other tools too; an entry without
//! a registry-qualified name is imported as content, reachable by digest.
//!
//! An index may list children the archive does not hold (a cache seeded for one platform):
//! the archive carries the children that were cached, and import accepts that.

pub mod export;
pub mod import;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::oci::Descriptor;

pub const LAYOUT_FILE: &str = "oci-layout";
pub const INDEX_FILE: &str = "index.json";
pub const BLOBS_DIR: &str = "blobs/sha256/";
pub const LAYOUT_VERSION: &str = "1.0.0";

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
pub const CHECKED_AT: &str = "io.regmirror.tag.checked-at";

/// `oci-layout`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    pub image_layout_version: String,
}

/// `index.json`: an OCI image index.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// How large `index.json` and `oci-layout` may be: they are read into memory.
pub const MAX_INDEX_SIZE: u64 = 16 << 20;

/// The tar entry path of a blob.
pub fn blob_path(hex: &str) -> String {
    format!("{BLOBS_DIR}{hex}")
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;
    use std::sync::Arc;

    use bytes::Bytes;

    use super::export::{ExportError, export};
    use super::import::{ImportError, TagOutcome, import};
    use crate::image_ref::ImageRef;
    use crate::metrics::Metrics;
    use crate::oci;
    use crate::reference::{Digest, RepoName, Tag};
    use crate::store::{Store, StoredManifest, TagRecord};

    fn open(dir: &Path) -> Store {
        Store::open_shared(dir, u64::MAX, Arc::new(Metrics::new())).unwrap()
    }

    fn put_blob(store: &Store, data: &[u8]) -> Digest {
        let mut temp = store.temp_file().unwrap();
        temp.write_all(data).unwrap();
        let digest = Digest::of(data);
        store.commit_blob(temp, &digest).unwrap();
        digest
    }

    async fn put_manifest(store: &Store, json: String, media_type: &str) -> (Digest, usize) {
        let bytes = Bytes::from(json);
        let digest = Digest::of(&bytes);
        let len = bytes.len();
        store.put_manifest(&digest, &StoredManifest { bytes, media_type: media_type.into() }).await.unwrap();
        (digest, len)
    }

    /// An index with an amd64 image (cached) and an arm64 child that is not cached, tagged
    /// `docker.io/library/app:1`. Returns the index digest and the layer's digest.
    async fn seeded_store(store: &Store) -> (Digest, Digest) {
        let config_data = br#"{"architecture":"amd64","os":"linux"}"#;
        let config = put_blob(store, config_data);
        let layer_data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let layer = put_blob(store, &layer_data);
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{}}}]}}"#,
            oci::OCI_MANIFEST,
            config_data.len(),
            layer_data.len()
        );
        let (image, image_len) = put_manifest(store, image, oci::OCI_MANIFEST).await;
        let absent = format!("sha256:{}", "e".repeat(64));
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{image}","size":{image_len},"platform":{{"os":"linux","architecture":"amd64"}}}},{{"mediaType":"{}","digest":"{absent}","size":10,"platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#,
            oci::OCI_INDEX,
            oci::OCI_MANIFEST,
            oci::OCI_MANIFEST
        );
        let (index, _) = put_manifest(store, index, oci::OCI_INDEX).await;
        let record = TagRecord { digest: index, media_type: oci::OCI_INDEX.into(), checked_at: 1_000 };
        store.put_tag("docker.io", &repo(), &tag(), &record).await.unwrap();
        (index, layer)
    }

    fn repo() -> RepoName {
        RepoName::parse("library/app").unwrap()
    }

    fn tag() -> Tag {
        Tag::parse("1").unwrap()
    }

    fn app() -> ImageRef {
        ImageRef::parse("app:1", "docker.io").unwrap()
    }

    /// Every file under `dir` with its size and mtime, and every directory outside tmp/.
    fn listing(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut pending = vec![dir.to_owned()];
        while let Some(d) = pending.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let entry = entry.unwrap();
                let meta = entry.metadata().unwrap();
                let rel = entry.path().strip_prefix(dir).unwrap().display().to_string();
                if meta.is_dir() {
                    out.push(format!("{rel}/"));
                    pending.push(entry.path());
                } else {
                    out.push(format!("{rel} {} {:?}", meta.len(), meta.modified().unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn export_then_import_round_trips_and_is_idempotent() {
        let source_dir = tempfile::tempdir().unwrap();
        let source = open(source_dir.path());
        let (index, layer) = seeded_store(&source).await;
        let out = tempfile::tempdir().unwrap();
        let archive = out.path().join("images.tar");
        let report = export(&source, &[app()], &archive).await.unwrap();
        assert_eq!(report.images, vec![("docker.io/library/app:1".to_owned(), index)]);
        assert_eq!((report.manifests, report.blobs), (2, 2));
        assert_eq!(report.left_out.len(), 1, "the arm64 child is not cached");

        // Reproducible: the same images give the same bytes.
        let again = out.path().join("again.tar");
        export(&source, &[app()], &again).await.unwrap();
        assert_eq!(std::fs::read(&archive).unwrap(), std::fs::read(&again).unwrap());

        let target_dir = tempfile::tempdir().unwrap();
        let target = open(target_dir.path());
        let first = import(&target, &archive).await.unwrap();
        assert_eq!((first.blobs_added, first.manifests_added, first.children_absent), (2, 2, 1));
        assert_eq!(first.images[0].tag, TagOutcome::Written);
        assert_eq!(first.images[0].name.as_deref(), Some("docker.io/library/app:1"));
        let record = target.tag("docker.io", &repo(), &tag()).await.unwrap().unwrap();
        assert_eq!((record.digest, record.checked_at), (index, 1_000));
        assert!(target.has_blob(&layer));
        assert_eq!(target.manifest(&index).await.unwrap().unwrap().media_type, oci::OCI_INDEX);

        let second = import(&target, &archive).await.unwrap();
        assert_eq!((second.blobs_added, second.manifests_added, second.bytes_added), (0, 0, 0));
        assert_eq!((second.blobs_present, second.manifests_present), (2, 2));
        assert_eq!(second.images[0].tag, TagOutcome::Unchanged);
        assert_eq!(std::fs::read_dir(target_dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_newer_tag_in_the_cache_is_kept() {
        let source_dir = tempfile::tempdir().unwrap();
        let source = open(source_dir.path());
        seeded_store(&source).await;
        let archive = source_dir.path().join("a.tar");
        export(&source, &[app()], &archive).await.unwrap();

        let target_dir = tempfile::tempdir().unwrap();
        let target = open(target_dir.path());
        let newer = TagRecord { digest: Digest::of(b"other"), media_type: oci::OCI_INDEX.into(), checked_at: 2_000 };
        target.put_tag("docker.io", &repo(), &tag(), &newer).await.unwrap();
        let report = import(&target, &archive).await.unwrap();
        assert_eq!(report.images[0].tag, TagOutcome::KeptNewer(newer.digest));
        assert_eq!(target.tag("docker.io", &repo(), &tag()).await.unwrap(), Some(newer));
    }

    #[tokio::test]
    async fn export_needs_the_images_cached() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (_, layer) = seeded_store(&store).await;
        let archive = dir.path().join("x.tar");
        let missing = ImageRef::parse("app:2", "docker.io").unwrap();
        let error = export(&store, &[missing], &archive).await.unwrap_err();
        assert!(matches!(error, ExportError::NotCached { .. }), "{error}");
        assert!(error.to_string().contains("regmirror seed docker.io/library/app:2"), "{error}");

        std::fs::remove_file(store.path_of(crate::index::Key::Blob(layer))).unwrap();
        let error = export(&store, &[app()], &archive).await.unwrap_err().to_string();
        assert!(error.contains(&layer.to_string()) && error.contains("not in the cache"), "{error}");
        assert!(!archive.exists());
        // No temp file left behind next to the output either.
        assert!(
            std::fs::read_dir(dir.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("partial"))
        );
    }

    /// Imports `bytes` as an archive into a cache that already holds something, and checks
    /// that it fails and leaves the cache exactly as it was.
    async fn refused(bytes: &[u8]) -> ImportError {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        put_blob(&store, b"already here");
        let archive = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(archive.path(), bytes).unwrap();
        let before = listing(dir.path());
        let error = import(&store, archive.path()).await.unwrap_err();
        assert_eq!(listing(dir.path()), before, "the cache changed: {error}");
        error
    }

    #[tokio::test]
    async fn tampered_and_truncated_archives_import_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (_, layer) = seeded_store(&store).await;
        let archive = dir.path().join("a.tar");
        export(&store, &[app()], &archive).await.unwrap();
        let good = std::fs::read(&archive).unwrap();

        // One flipped byte in the middle of the layer's data.
        let mut tar = tar::Archive::new(&good[..]);
        let (offset, size) = tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().to_string_lossy().ends_with(&layer.hex()))
            .map(|e| (e.raw_file_position(), e.size()))
            .unwrap();
        let mut tampered = good.clone();
        tampered[(offset + size / 2) as usize] ^= 0x01;
        match refused(&tampered).await {
            ImportError::Corrupt { expected, .. } => assert_eq!(expected, layer),
            other => panic!("{other}"),
        }

        // Cut in the middle of an entry, and exactly between two entries (before index.json,
        // which makes every entry before it look complete).
        let error = refused(&good[..good.len() / 2]).await;
        assert!(matches!(error, ImportError::Truncated(_)), "{error}");
        let end_of_data = (offset + size).div_ceil(512) * 512;
        let error = refused(&good[..end_of_data as usize]).await;
        assert!(matches!(error, ImportError::Truncated(_)), "{error}");
        // Without the end-of-archive blocks.
        let error = refused(&good[..good.len() - 1024]).await;
        assert!(matches!(error, ImportError::Truncated(_)), "{error}");

        let error = refused(b"not a tar at all, not a tar at all").await;
        assert!(matches!(error, ImportError::Truncated(_) | ImportError::Tar(_)), "{error}");
    }
}
