//! skopeo copying `docker://docker.io/…` to a fresh `dir:` through a mirror
//! configured with `--registries-conf`.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use super::{PullClient, PulledImage, write_registries_conf};
use crate::harness::images::{ARCHITECTURE, digest_of};
use crate::harness::process::{self, run};
use crate::harness::workdir::Scratch;

pub struct Skopeo {
    config: Scratch,
}

impl Skopeo {
    /// A client using the registry at `mirror_host` as the mirror of docker.io and, by path,
    /// of ghcr.io (`deploy/clients/registries.conf`).
    pub fn new(mirror_host: &str) -> Result<Skopeo> {
        let config = Scratch::new("skopeo")?;
        write_registries_conf(config.path(), mirror_host)?;
        Ok(Skopeo { config })
    }
}

impl PullClient for Skopeo {
    fn name(&self) -> &'static str {
        "skopeo"
    }

    fn pull(&self, reference: &str) -> Result<PulledImage> {
        let destination = Scratch::new("skopeo-pull")?;
        let image_dir = destination.join("image");
        run(process::tool("skopeo")?
            .arg("--registries-conf")
            .arg(self.config.join("registries.conf"))
            .args(["--override-os", "linux", "--override-arch", ARCHITECTURE])
            .args(["--insecure-policy", "copy"])
            .arg(format!("docker://{reference}"))
            .arg(format!("dir:{}", image_dir.display())))?;
        let manifest = std::fs::read(image_dir.join("manifest.json"))?;
        Ok(PulledImage {
            client: self.name(),
            reference: reference.into(),
            digests: vec![digest_of(&manifest)],
            architecture: architecture(&image_dir, &manifest)?,
        })
    }
}

/// The architecture in the config blob the manifest points to.
fn architecture(image_dir: &Path, manifest: &[u8]) -> Result<String> {
    let manifest: Value = serde_json::from_slice(manifest)?;
    let config = manifest["config"]["digest"]
        .as_str()
        .and_then(|digest| digest.strip_prefix("sha256:"))
        .context("skopeo stored a manifest without a config")?;
    let config: Value = serde_json::from_slice(&std::fs::read(image_dir.join(config))?)?;
    Ok(config["architecture"].as_str().context("config without architecture")?.into())
}
