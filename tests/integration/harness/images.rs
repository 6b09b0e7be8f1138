//! Fixture images: built once with umoci into an OCI layout, pushed with
//! skopeo, and described as the upstream serves them.
//!
//! Layers are random bytes, so no registry anywhere else has them: a client
//! that ends up with the upstream's digests got them through the mirror.
//! Digests are taken from what the registry serves (`skopeo inspect --raw`),
//! never predicted, because pushing as Docker schema2 rewrites the manifest.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::process::{self, run, run_stdout};
use super::token::Credentials;
use super::workdir::Scratch;

/// The platform the tests ask clients for, and the one single-platform
/// fixtures are built for.
pub const ARCHITECTURE: &str = "amd64";

const MIB: usize = 1 << 20;

/// The images every registry gets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fixture {
    /// An OCI image with three layers.
    Alpine,
    /// A Docker schema2 image.
    Busybox,
    /// A two-platform OCI index (amd64 + arm64).
    Multi,
}

impl Fixture {
    /// The repository it is pushed to on the shared registries.
    pub fn repository(self) -> &'static str {
        match self {
            Fixture::Alpine => "library/alpine",
            Fixture::Busybox => "library/busybox",
            Fixture::Multi => "library/multi",
        }
    }

    pub fn tag(self) -> &'static str {
        match self {
            Fixture::Alpine => "3.20",
            Fixture::Busybox => "latest",
            Fixture::Multi => "1",
        }
    }

    /// Its reference name inside the OCI layout.
    fn layout_name(self) -> &'static str {
        match self {
            Fixture::Alpine => "alpine",
            Fixture::Busybox => "busybox",
            Fixture::Multi => "multi",
        }
    }

    fn skopeo_format_flags(self) -> &'static [&'static str] {
        match self {
            Fixture::Alpine => &[],
            Fixture::Busybox => &["--format", "v2s2"],
            Fixture::Multi => &["--all"],
        }
    }
}

/// Single-platform images in the layout: name, architecture, layer sizes.
const IMAGES: &[(&str, &str, &[usize])] = &[
    ("alpine", ARCHITECTURE, &[MIB, 2 * MIB, 3 * MIB]),
    ("busybox", ARCHITECTURE, &[3 * MIB / 2, MIB / 2]),
    ("multi-amd64", "amd64", &[MIB]),
    ("multi-arm64", "arm64", &[MIB]),
];

/// Indexes in the layout: name and the images it lists.
const INDEXES: &[(&str, &[&str])] = &[("multi", &["multi-amd64", "multi-arm64"])];

/// An OCI layout holding every fixture, built once per test binary.
pub struct OciLayout {
    dir: Scratch,
}

impl OciLayout {
    pub fn build() -> Result<OciLayout> {
        let dir = Scratch::new("fixtures")?;
        let layout = dir.join("layout");
        run(umoci(&["init", "--layout"])?.arg(&layout))?;
        let layer = dir.join("layer");
        for (name, architecture, layer_sizes) in IMAGES {
            let image = format!("{}:{name}", layout.display());
            run(&mut umoci(&["new", "--image", &image])?)?;
            run(umoci(&["config", "--image", &image, "--os", "linux"])?.args(["--architecture", architecture]))?;
            for (n, size) in layer_sizes.iter().enumerate() {
                write_random_file(&layer, *size)?;
                run(umoci(&["insert", "--image", &image])?.arg(&layer).arg(format!("/fixture/{name}-layer-{n}")))?;
            }
        }
        for (name, images) in INDEXES {
            add_index(&layout, name, images)?;
        }
        Ok(OciLayout { dir })
    }

    /// Pushes `fixture` to `registry_host` as `repository:tag`.
    pub fn push(
        &self,
        fixture: Fixture,
        registry_host: &str,
        repository: &str,
        credentials: Option<&Credentials>,
    ) -> Result<PushedImage> {
        let target = format!("{registry_host}/{repository}:{}", fixture.tag());
        let source = format!("oci:{}:{}", self.dir.join("layout").display(), fixture.layout_name());
        let mut copy = process::tool("skopeo")?;
        copy.args(["copy", "--insecure-policy", "--dest-tls-verify=false"]).args(fixture.skopeo_format_flags());
        if let Some(credentials) = credentials {
            copy.args(["--dest-creds", &credentials.colon_joined()]);
        }
        run(copy.arg(&source).arg(format!("docker://{target}")))
            .with_context(|| format!("pushing fixture {fixture:?} to {target}"))?;
        PushedImage::inspect(registry_host, repository, fixture.tag(), credentials)
    }
}

/// A blob an image references.
#[derive(Clone, Debug)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

/// The manifest of one platform and the blobs (config and layers) it uses.
#[derive(Clone, Debug)]
pub struct PlatformManifest {
    pub architecture: String,
    pub digest: String,
    pub blobs: Vec<Blob>,
    /// The manifest as the upstream serves it.
    pub manifest: Value,
    /// The size of the manifest's bytes.
    pub manifest_size: u64,
}

impl PlatformManifest {
    pub fn total_size(&self) -> u64 {
        self.blobs.iter().map(|blob| blob.size).sum()
    }
}

/// A pushed image as the upstream serves it.
#[derive(Clone, Debug)]
pub struct PushedImage {
    pub repository: String,
    pub tag: String,
    /// The digest of the manifest (or index) the tag points to.
    pub digest: String,
    /// One entry per platform; a single-platform image has exactly one.
    pub platforms: Vec<PlatformManifest>,
}

impl PushedImage {
    /// `docker.io/REPOSITORY:TAG`, which clients send to the mirror.
    pub fn by_tag(&self) -> String {
        format!("docker.io/{}:{}", self.repository, self.tag)
    }

    /// `docker.io/REPOSITORY@DIGEST`
    pub fn by_digest(&self) -> String {
        format!("docker.io/{}@{}", self.repository, self.digest)
    }

    pub fn platform(&self, architecture: &str) -> Result<&PlatformManifest> {
        self.platforms
            .iter()
            .find(|platform| platform.architecture == architecture)
            .with_context(|| format!("{} has no {architecture} manifest", self.by_tag()))
    }

    fn inspect(host: &str, repository: &str, tag: &str, credentials: Option<&Credentials>) -> Result<PushedImage> {
        let fetch = |reference: &str| -> Result<(String, Value, u64)> {
            let mut inspect = process::tool("skopeo")?;
            inspect.args(["inspect", "--raw", "--tls-verify=false"]);
            if let Some(credentials) = credentials {
                inspect.args(["--creds", &credentials.colon_joined()]);
            }
            let raw = run_stdout(inspect.arg(format!("docker://{host}/{repository}{reference}")))?;
            let manifest = serde_json::from_str(&raw).context("manifest is not JSON")?;
            Ok((digest_of(raw.as_bytes()), manifest, raw.len() as u64))
        };
        let (digest, manifest, manifest_size) = fetch(&format!(":{tag}"))?;
        let platforms = match manifest["manifests"].as_array().cloned() {
            None => vec![PlatformManifest {
                architecture: ARCHITECTURE.into(),
                digest: digest.clone(),
                blobs: blobs_of(&manifest)?,
                manifest,
                manifest_size,
            }],
            Some(entries) => entries
                .iter()
                .map(|entry| {
                    let child = entry["digest"].as_str().context("index entry without digest")?;
                    let (child_digest, child_manifest, child_size) = fetch(&format!("@{child}"))?;
                    Ok(PlatformManifest {
                        architecture: entry["platform"]["architecture"]
                            .as_str()
                            .context("index entry without platform")?
                            .into(),
                        digest: child_digest,
                        blobs: blobs_of(&child_manifest)?,
                        manifest: child_manifest,
                        manifest_size: child_size,
                    })
                })
                .collect::<Result<_>>()?,
        };
        Ok(PushedImage { repository: repository.into(), tag: tag.into(), digest, platforms })
    }
}

/// `sha256:HEX` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn umoci(args: &[&str]) -> Result<std::process::Command> {
    let mut command = process::tool("umoci")?;
    command.args(args);
    Ok(command)
}

fn write_random_file(path: &Path, size: usize) -> Result<()> {
    let mut random = std::fs::File::open("/dev/urandom")?.take(size as u64);
    let mut file = std::fs::File::create(path)?;
    std::io::copy(&mut random, &mut file).context("writing random layer data")?;
    Ok(())
}

/// The config and layer descriptors of an image manifest.
fn blobs_of(manifest: &Value) -> Result<Vec<Blob>> {
    let layers = manifest["layers"].as_array().context("manifest without layers")?;
    std::iter::once(&manifest["config"])
        .chain(layers)
        .map(|descriptor| {
            Ok(Blob {
                digest: descriptor["digest"].as_str().context("descriptor without digest")?.into(),
                size: descriptor["size"].as_u64().context("descriptor without size")?,
            })
        })
        .collect()
}

/// Writes an OCI index listing `images` (with their platforms) as a blob of
/// the layout and tags it `name` in `index.json`.
fn add_index(layout: &Path, name: &str, images: &[&str]) -> Result<()> {
    let index_path = layout.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    let entries = index["manifests"].as_array().context("index.json without manifests")?;
    let manifests = images
        .iter()
        .map(|image| {
            let entry = entries
                .iter()
                .find(|entry| entry["annotations"]["org.opencontainers.image.ref.name"] == *image)
                .with_context(|| format!("{image} is not in the layout"))?;
            let architecture = IMAGES
                .iter()
                .find(|(listed, ..)| listed == image)
                .map(|(_, architecture, _)| *architecture)
                .context("unknown image")?;
            let mut descriptor = entry.clone();
            descriptor.as_object_mut().context("descriptor is not an object")?.remove("annotations");
            descriptor["platform"] = json!({"architecture": architecture, "os": "linux"});
            Ok(descriptor)
        })
        .collect::<Result<Vec<_>>>()?;
    let blob = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))?;
    let hex = hex::encode(Sha256::digest(&blob));
    std::fs::write(layout.join("blobs/sha256").join(&hex), &blob)?;
    index["manifests"].as_array_mut().context("index.json without manifests")?.push(json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": format!("sha256:{hex}"),
        "size": blob.len(),
        "annotations": {"org.opencontainers.image.ref.name": name},
    }));
    std::fs::write(&index_path, serde_json::to_vec(&index)?)?;
    Ok(())
}
