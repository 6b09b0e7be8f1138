//! Real registry clients pulling through a mirror.
//!
//! Every client pulls into a fresh store each time (a new directory, a new
//! containerd namespace, a pruned dockerd), so each pull really fetches from
//! the mirror, and reports what it ended up with: the digests it recorded
//! and the architecture it chose. All of them ask for linux/amd64.
//!
//! Clients are told that docker.io itself lives at [`UNREACHABLE_REGISTRY`],
//! a closed local port: a client that gives up on the mirror then fails at
//! once instead of trying the internet. (dockerd cannot be told; see
//! [`docker`].)
//!
//! Clients are configured with the files users copy from `deploy/clients/`
//! (the README shows the same text), read by [`deploy_snippet`] with only the
//! placeholders replaced, so a snippet that stops working fails these tests.

pub mod containerd;
pub mod docker;
pub mod podman;
pub mod skopeo;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

use super::images::{ARCHITECTURE, PushedImage};

/// Where clients are told the real docker.io is: nothing listens on port 1.
pub const UNREACHABLE_REGISTRY: &str = "127.0.0.1:1";

/// A client that pulls image references through a mirror.
pub trait PullClient {
    fn name(&self) -> &'static str;

    /// Pulls `reference` (`docker.io/REPOSITORY:TAG` or `…@DIGEST`) into a
    /// fresh store.
    fn pull(&self, reference: &str) -> Result<PulledImage>;
}

/// What a client reports after a pull.
#[derive(Debug)]
pub struct PulledImage {
    pub client: &'static str,
    pub reference: String,
    /// Every manifest digest the client recorded for the image.
    pub digests: Vec<String>,
    /// The architecture of the image the client unpacked or stored.
    pub architecture: String,
}

impl PulledImage {
    /// Checks that the client got `image` as the upstream serves it: for an
    /// index, clients record either the index digest or that of the amd64
    /// manifest, and must have chosen amd64.
    pub fn check(&self, image: &PushedImage) -> Result<()> {
        let platform = image.platform(ARCHITECTURE)?;
        ensure!(
            self.architecture == ARCHITECTURE,
            "{} pulled {} for {} instead of {ARCHITECTURE}",
            self.client,
            self.reference,
            self.architecture
        );
        ensure!(
            self.digests.iter().any(|digest| *digest == image.digest || *digest == platform.digest),
            "{} pulled {} as {:?}, but the upstream serves {} ({ARCHITECTURE}: {})",
            self.client,
            self.reference,
            self.digests,
            image.digest,
            platform.digest
        );
        Ok(())
    }
}

/// The placeholder for the mirror's address in `deploy/clients/`.
pub const MIRROR_PLACEHOLDER: &str = "MIRROR:5000";

/// `deploy/clients/`, the client configuration the README tells users to copy.
pub fn deploy_clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/clients")
}

/// The file `relative` of [`deploy_clients_dir`] with each `(from, to)` replaced. Every `from`
/// must occur: a snippet that no longer contains what a test replaces would otherwise be used
/// with, say, the real Docker Hub in it.
pub fn deploy_snippet(relative: &str, substitutions: &[(&str, &str)]) -> Result<String> {
    let path = deploy_clients_dir().join(relative);
    let mut text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for (from, to) in substitutions {
        ensure!(text.contains(from), "{} no longer contains {from:?}", path.display());
        text = text.replace(from, to);
    }
    Ok(text)
}

/// Writes `deploy/clients/registries.conf` (skopeo, podman) into `dir`, sending docker.io
/// and ghcr.io pulls to the mirror at `mirror_host` and both registries themselves to
/// [`UNREACHABLE_REGISTRY`].
pub fn write_registries_conf(dir: &Path, mirror_host: &str) -> Result<PathBuf> {
    let path = dir.join("registries.conf");
    let unreachable = format!("location = \"{UNREACHABLE_REGISTRY}\"");
    let text = deploy_snippet(
        "registries.conf",
        &[
            (MIRROR_PLACEHOLDER, mirror_host),
            ("location = \"docker.io\"", &unreachable),
            ("location = \"ghcr.io\"", &unreachable),
        ],
    )?;
    std::fs::write(&path, text)?;
    Ok(path)
}
