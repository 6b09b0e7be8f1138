//! `regmirror seed`: pull images into the cache ahead of time, for a rollout that must not
//! wait on the upstream, or to carry them to an air-gapped site (`export`, then `import`).
//!
//! Seeding goes through the very path a client's pull takes: an in-process [`Mirror`] on
//! the cache directory resolves each reference with [`Mirror::manifest`] (which verifies
//! and stores the manifest and records the tag) and fetches every blob with
//! [`Mirror::blob`], whose single-flight fill hashes the bytes and commits them only when
//! the digest matches. Seeded content is therefore exactly what a pull would have cached,
//! deduplicated the same way, and a tag seeded here is served by tag and by digest.
//!
//! For an index, the children for the chosen platforms are seeded (the host's by default,
//! `--platform` to choose, `--all-platforms` for every child) and the index itself is kept,
//! so clients resolve the tag to the index and pick their platform from it.
//!
//! It is safe beside a running mirror on the same directory: the store only ever renames
//! complete, verified files into place, and [`Mirror::open_shared`] leaves `tmp/` (that
//! mirror's fills in progress) alone. At the end every seeded file is checked to be in
//! place, so a commit the disk refused, an eviction under a small cache bound, or a
//! restarting mirror clearing `tmp/` is reported instead of passing silently.
//!
//! The HTTP "preheat" endpoint (asking a running mirror to warm itself) is not here.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::{StreamExt, stream};
use indicatif::ProgressBar;
use tokio::sync::Semaphore;

use crate::error::Error;
use crate::fetch::Origin;
use crate::image_ref::{ImageRef, ImageRefError};
use crate::index::Key;
use crate::maintenance::human_size;
use crate::mirror::Mirror;
use crate::oci::{self, Descriptor, Shape, ShapeError};
use crate::progress::Progress;
use crate::reference::{Digest, Reference};
use crate::upstream::Upstream;

/// Which children of an index to seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platforms {
    /// The platform of this machine (see [`PlatformSpec::host`]).
    Host,
    /// Each of these must be in the index.
    Only(Vec<PlatformSpec>),
    /// Every child.
    All,
}

/// `os/architecture[/variant]`, as `--platform` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl PlatformSpec {
    pub fn parse(s: &str) -> Result<PlatformSpec, SeedError> {
        let invalid = || SeedError::Platform(s.chars().take(80).collect());
        let word =
            |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let parts: Vec<&str> = s.trim().split('/').collect();
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| word(p)) {
            return Err(invalid());
        }
        Ok(PlatformSpec {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }

    /// Linux on this machine's architecture, in Go's names (the ones image indexes use).
    /// Linux even on other systems: container images are Linux images.
    pub fn host() -> PlatformSpec {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        PlatformSpec { os: "linux".into(), architecture: architecture.into(), variant: None }
    }

    /// Whether an index entry's platform is this one. No variant asked means any variant;
    /// `arm64/v8` is arm64's only variant, so it matches an entry that names none.
    fn matches(&self, platform: &oci::Platform) -> bool {
        let normal = |arch: &str, variant: Option<&str>| match (arch, variant) {
            ("arm64", Some("v8")) => None,
            (_, v) => v.map(str::to_owned),
        };
        self.os == platform.os
            && self.architecture == platform.architecture
            && (self.variant.is_none()
                || normal(&self.architecture, self.variant.as_deref())
                    == normal(&platform.architecture, platform.variant.as_deref()))
    }
}

impl std::fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

pub struct SeedOptions {
    pub platforms: Platforms,
    /// How many blobs download at once, across all images (and how many images are
    /// resolved at once).
    pub jobs: usize,
}

/// Why one image could not be seeded. One line each; the others go on.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("invalid platform {0:?}: expected OS/ARCH or OS/ARCH/VARIANT, e.g. linux/arm64")]
    Platform(String),
    #[error("no upstream named {0:?} is configured (add it to [[upstreams]] in the config)")]
    UnknownUpstream(String),
    /// The reference itself could not be resolved (unknown tag, upstream down, ...).
    #[error("{0}")]
    Resolve(Error),
    #[error("manifest {digest}: {source}")]
    Manifest { digest: Digest, source: Error },
    #[error("manifest {digest}: {source}")]
    Shape { digest: Digest, source: ShapeError },
    #[error("the index has no manifest for {wanted} (it has: {available})")]
    NoPlatform { wanted: String, available: String },
    #[error("blob {digest}: {source}")]
    Blob { digest: Digest, source: Error },
    #[error("blob {digest}: download failed: {source}")]
    Download { digest: Digest, source: std::io::Error },
    #[error(
        "{0} was fetched and verified but is not in the cache (disk full, cache bound too small, or a mirror restart cleared tmp/; see the log)"
    )]
    NotKept(String),
    #[error("cache storage error: {0}")]
    Storage(#[from] std::io::Error),
}

/// What seeding one image did.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub image: ImageRef,
    /// What the reference resolved to (an index for multi-platform images).
    pub digest: Digest,
    pub manifests: usize,
    pub blobs: usize,
    /// Bytes of the image's blobs (seeded platforms only).
    pub bytes: u64,
    /// Of those, the bytes of blobs that were not cached before (fetched by this run, or by
    /// a pull that was filling them at the same time).
    pub new_bytes: u64,
    /// The platforms seeded from an index; empty for a single-platform image.
    pub platforms: Vec<String>,
}

impl Seeded {
    /// `seeded docker.io/library/alpine:3.20 sha256:… (linux/amd64; 2 manifests, 4 blobs, 6.0 MiB, 6.0 MiB new)`
    pub fn line(&self) -> String {
        let platforms =
            if self.platforms.is_empty() { String::new() } else { format!("{}; ", self.platforms.join(", ")) };
        format!(
            "seeded {} {} ({platforms}{}, {}, {}, {} new)",
            self.image,
            self.digest,
            plural(self.manifests, "manifest"),
            plural(self.blobs, "blob"),
            human_size(self.bytes),
            human_size(self.new_bytes)
        )
    }
}

/// One line of a list file (`--file`): 1-based line number and what it parsed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListLine {
    pub line: usize,
    pub image: Result<ImageRef, ImageRefError>,
}

/// Parses a list file: one reference per line; blank lines and `#` comments (whole-line or
/// trailing) are skipped. A bad line is returned as an error with its line number, so the
/// caller can report it and seed the rest.
pub fn parse_list(text: &str, default_registry: &str) -> Vec<ListLine> {
    text.lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                return None;
            }
            let image = if content.split_whitespace().nth(1).is_some() {
                Err(ImageRefError::Invalid {
                    input: content.chars().take(120).collect(),
                    reason: "one image reference per line".into(),
                })
            } else {
                ImageRef::parse(content, default_registry)
            };
            Some(ListLine { line: i + 1, image })
        })
        .collect()
}

/// Seeds `images`, some at once, and reports each as it ends. Returns every outcome, in
/// the order of `images`.
pub async fn seed_all(
    mirror: &Mirror,
    images: Vec<ImageRef>,
    options: &SeedOptions,
    progress: &Progress,
) -> Vec<(ImageRef, Result<Seeded, SeedError>)> {
    let jobs = options.jobs.max(1);
    let downloads = Semaphore::new(jobs);
    let mut outcomes: Vec<(usize, ImageRef, Result<Seeded, SeedError>)> = stream::iter(images.into_iter().enumerate())
        .map(|(i, image)| {
            let downloads = &downloads;
            async move {
                let result = seed_one(mirror, &image, options, downloads, progress).await;
                match &result {
                    Ok(seeded) => progress.done(&seeded.line()),
                    Err(error) => {
                        tracing::info!(image = %image, %error, "seeding failed");
                        progress.failed(&format!("failed {image}: {error}"));
                    }
                }
                (i, image, result)
            }
        })
        .buffer_unordered(jobs)
        .collect()
        .await;
    outcomes.sort_by_key(|(i, ..)| *i);
    outcomes.into_iter().map(|(_, image, result)| (image, result)).collect()
}

/// The manifests an image needs (top first) and its blobs with their sizes.
struct Plan {
    manifests: Vec<Digest>,
    blobs: BTreeMap<Digest, u64>,
    platforms: Vec<String>,
}

async fn seed_one(
    mirror: &Mirror,
    image: &ImageRef,
    options: &SeedOptions,
    downloads: &Semaphore,
    progress: &Progress,
) -> Result<Seeded, SeedError> {
    let upstream =
        mirror.upstream(Some(&image.registry)).map_err(|_| SeedError::UnknownUpstream(image.registry.clone()))?.clone();
    let top = mirror
        .manifest(&upstream, &image.repository, &image.reference(), None, false)
        .await
        .map_err(SeedError::Resolve)?;
    let plan = plan(mirror, &upstream, image, top.digest, &top.bytes, &options.platforms).await?;

    let total = plan.blobs.values().sum();
    let bar = progress.bar(&image.to_string(), total);
    let results: Vec<Result<u64, SeedError>> = stream::iter(&plan.blobs)
        .map(|(digest, size)| fetch_blob(mirror, &upstream, image, *digest, *size, downloads, &bar))
        .buffer_unordered(options.jobs.max(1))
        .collect()
        .await;
    bar.finish_and_clear();
    let mut new_bytes = 0;
    for result in results {
        new_bytes += result?;
    }

    // Everything seeded must still be there: a refused commit or an eviction is a failure.
    let store = mirror.store();
    if let Some(missing) = plan.manifests.iter().find(|d| !store.path_of(Key::Manifest(**d)).is_file()) {
        return Err(SeedError::NotKept(format!("manifest {missing}")));
    }
    if let Some(missing) = plan.blobs.keys().find(|d| !store.has_blob(d)) {
        return Err(SeedError::NotKept(format!("blob {missing}")));
    }
    if let Some(tag) = image.tag_to_record() {
        let record = store.tag(upstream.name(), &image.repository, tag).await?;
        if record.is_none_or(|r| r.digest != top.digest) {
            return Err(SeedError::NotKept(format!("the tag record of {image}")));
        }
    }
    Ok(Seeded {
        image: image.clone(),
        digest: top.digest,
        manifests: plan.manifests.len(),
        blobs: plan.blobs.len(),
        bytes: total,
        new_bytes,
        platforms: plan.platforms,
    })
}

/// Walks from the top manifest through the chosen children of indexes (fetching each
/// through the mirror) and gathers the blobs to fetch.
async fn plan(
    mirror: &Mirror,
    upstream: &Upstream,
    image: &ImageRef,
    top: Digest,
    top_bytes: &[u8],
    platforms: &Platforms,
) -> Result<Plan, SeedError> {
    let mut plan = Plan { manifests: Vec::new(), blobs: BTreeMap::new(), platforms: Vec::new() };
    let mut pending = vec![(top, top_bytes.to_vec())];
    while let Some((digest, bytes)) = pending.pop() {
        if plan.manifests.contains(&digest) {
            continue;
        }
        plan.manifests.push(digest);
        let shape = oci::shape(&bytes).map_err(|source| SeedError::Shape { digest, source })?;
        let children = match &shape {
            Shape::Image { .. } => {
                for blob in shape.blobs() {
                    let d = blob.sha256().map_err(|source| SeedError::Shape { digest, source })?;
                    plan.blobs.insert(d, blob.size);
                }
                continue;
            }
            Shape::Index(children) => select(children, platforms)?,
        };
        for child in children {
            let child_digest = child.sha256().map_err(|source| SeedError::Shape { digest, source })?;
            if let Some(platform) = &child.platform {
                plan.platforms.push(platform.to_string());
            }
            let manifest = mirror
                .manifest(upstream, &image.repository, &Reference::Digest(child_digest), None, false)
                .await
                .map_err(|source| SeedError::Manifest { digest: child_digest, source })?;
            pending.push((child_digest, manifest.bytes.to_vec()));
        }
    }
    plan.platforms.sort();
    plan.platforms.dedup();
    Ok(plan)
}

/// The children of an index to seed. Entries without a platform (nested indexes, mostly)
/// are always taken: there is no telling what they hold.
fn select<'a>(children: &'a [Descriptor], platforms: &Platforms) -> Result<Vec<&'a Descriptor>, SeedError> {
    let wanted = match platforms {
        Platforms::All => return Ok(children.iter().collect()),
        Platforms::Host => vec![PlatformSpec::host()],
        Platforms::Only(list) => list.clone(),
    };
    let mut chosen: Vec<&Descriptor> = children.iter().filter(|c| c.platform.is_none()).collect();
    for spec in &wanted {
        let matching: Vec<&Descriptor> =
            children.iter().filter(|c| c.platform.as_ref().is_some_and(|p| spec.matches(p))).collect();
        if matching.is_empty() {
            let available: Vec<String> =
                children.iter().filter_map(|c| c.platform.as_ref()).map(|p| p.to_string()).collect();
            return Err(SeedError::NoPlatform {
                wanted: spec.to_string(),
                available: if available.is_empty() { "no platforms".into() } else { available.join(", ") },
            });
        }
        for child in matching {
            if !chosen.iter().any(|c| c.digest == child.digest) {
                chosen.push(child);
            }
        }
    }
    Ok(chosen)
}

/// Fetches one blob through the mirror's fill (or finds it cached); returns its size if it
/// was not cached, else 0.
async fn fetch_blob(
    mirror: &Mirror,
    upstream: &Arc<Upstream>,
    image: &ImageRef,
    digest: Digest,
    size: u64,
    downloads: &Semaphore,
    bar: &ProgressBar,
) -> Result<u64, SeedError> {
    let _permit = downloads.acquire().await.map_err(std::io::Error::other)?;
    let (handle, origin) = mirror
        .blob(upstream, &image.repository, &digest, false)
        .await
        .map_err(|source| SeedError::Blob { digest, source })?;
    if origin == Origin::Cache {
        bar.inc(size);
        return Ok(0);
    }
    // The stream ends cleanly only after the fill verified the digest (it holds back the
    // last byte until then), and fails if the fill fails.
    let mut body = std::pin::pin!(handle.stream(0, None));
    let mut received = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| SeedError::Download { digest, source })?;
        received += chunk.len() as u64;
        bar.inc(chunk.len() as u64);
    }
    tracing::debug!(image = %image, digest = %digest, bytes = received, "blob seeded");
    Ok(received)
}

/// `1 blob`, `2 blobs`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_files_skip_comments_and_blanks_and_keep_line_numbers() {
        let text = "# images for the rollout\n\nalpine:3.20\n  ghcr.io/org/tool:v1   # pinned later\nNot Valid\n\n#busybox\nBad:Ref:x\nlocalhost:5000/x\n";
        let lines = parse_list(text, "docker.io");
        let summary: Vec<(usize, Result<String, String>)> = lines
            .iter()
            .map(|l| (l.line, l.image.as_ref().map(|i| i.to_string()).map_err(|e| e.to_string())))
            .collect();
        assert_eq!(summary.len(), 5, "{summary:?}");
        assert_eq!(summary[0], (3, Ok("docker.io/library/alpine:3.20".into())));
        assert_eq!(summary[1], (4, Ok("ghcr.io/org/tool:v1".into())));
        assert_eq!(summary[2].0, 5);
        assert!(summary[2].1.as_ref().unwrap_err().contains("one image reference per line"));
        assert_eq!(summary[3].0, 8);
        assert!(summary[3].1.is_err());
        assert_eq!(summary[4], (9, Ok("localhost:5000/x:latest".into())));
        assert!(parse_list("\n# only comments\n   \n", "docker.io").is_empty());
    }

    #[test]
    fn platforms_parse_and_match() {
        let arm = PlatformSpec::parse("linux/arm64").unwrap();
        assert_eq!(arm.to_string(), "linux/arm64");
        let v7 = PlatformSpec::parse("linux/arm/v7").unwrap();
        assert_eq!(v7.variant.as_deref(), Some("v7"));
        for bad in ["linux", "linux/", "/amd64", "Linux/amd64", "a/b/c/d", "linux/amd 64"] {
            assert!(PlatformSpec::parse(bad).is_err(), "{bad}");
        }
        let entry = |arch: &str, variant: Option<&str>| oci::Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: variant.map(str::to_owned),
        };
        assert!(arm.matches(&entry("arm64", Some("v8"))));
        assert!(PlatformSpec::parse("linux/arm64/v8").unwrap().matches(&entry("arm64", None)));
        assert!(!v7.matches(&entry("arm", Some("v6"))));
        assert!(PlatformSpec::parse("linux/arm").unwrap().matches(&entry("arm", Some("v6"))));
        assert!(!arm.matches(&entry("amd64", None)));
        assert_eq!(PlatformSpec::host().os, "linux");
    }

    fn child(c: char, platform: Option<(&str, &str)>) -> Descriptor {
        Descriptor {
            media_type: oci::OCI_MANIFEST.into(),
            digest: format!("sha256:{}", c.to_string().repeat(64)),
            size: 1,
            platform: platform.map(|(os, arch)| oci::Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: None,
            }),
            annotations: Default::default(),
        }
    }

    #[test]
    fn index_children_are_chosen_by_platform() {
        let children = [
            child('a', Some(("linux", "amd64"))),
            child('b', Some(("linux", "arm64"))),
            child('c', Some(("unknown", "unknown"))),
        ];
        let digests =
            |chosen: Vec<&Descriptor>| chosen.iter().map(|d| d.digest.chars().nth(7).unwrap()).collect::<String>();
        assert_eq!(digests(select(&children, &Platforms::All).unwrap()), "abc");
        let only = |list: &[&str]| Platforms::Only(list.iter().map(|p| PlatformSpec::parse(p).unwrap()).collect());
        assert_eq!(digests(select(&children, &only(&["linux/arm64"])).unwrap()), "b");
        assert_eq!(digests(select(&children, &only(&["linux/arm64", "linux/amd64"])).unwrap()), "ba");
        let error = select(&children, &only(&["linux/s390x"])).unwrap_err().to_string();
        assert!(error.contains("linux/s390x") && error.contains("linux/amd64, linux/arm64"), "{error}");
        let nested = [child('n', None), child('a', Some(("linux", "amd64")))];
        assert_eq!(digests(select(&nested, &only(&["linux/amd64"])).unwrap()), "na");
    }
}
