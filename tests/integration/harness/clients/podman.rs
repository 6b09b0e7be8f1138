//! podman pulling through a mirror configured with
//! `CONTAINERS_REGISTRIES_CONF`, into a fresh vfs store per pull.

use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;

use super::{PullClient, PulledImage, write_registries_conf};
use crate::harness::images::ARCHITECTURE;
use crate::harness::process::{self, run, run_stdout};
use crate::harness::workdir::Scratch;

pub struct Podman {
    config: Scratch,
}

impl Podman {
    /// A client using the registry at `mirror_host` as the mirror of docker.io and, by path,
    /// of ghcr.io (`deploy/clients/registries.conf`).
    pub fn new(mirror_host: &str) -> Result<Podman> {
        let config = Scratch::new("podman-config")?;
        write_registries_conf(config.path(), mirror_host)?;
        Ok(Podman { config })
    }

    /// A `podman` command using the store in `store`.
    fn podman(&self, store: &Scratch) -> Result<Command> {
        let mut command = process::tool("podman")?;
        command
            .env("CONTAINERS_REGISTRIES_CONF", self.config.join("registries.conf"))
            .args(["--storage-driver", "vfs", "--root"])
            .arg(store.join("root"))
            .arg("--runroot")
            .arg(store.join("run"));
        Ok(command)
    }
}

impl PullClient for Podman {
    fn name(&self) -> &'static str {
        "podman"
    }

    fn pull(&self, reference: &str) -> Result<PulledImage> {
        // podman refuses a runroot path longer than 50 characters.
        let store = Scratch::new("podman")?;
        run(self
            .podman(&store)?
            .args(["pull", "--quiet", "--platform"])
            .arg(format!("linux/{ARCHITECTURE}"))
            .arg(reference))?;
        let inspected = run_stdout(self.podman(&store)?.args(["image", "inspect", reference]))?;
        let inspected: Value = serde_json::from_str(&inspected)?;
        let image = &inspected[0];
        let repo_digests = image["RepoDigests"].as_array().into_iter().flatten();
        let digests = repo_digests
            .filter_map(|repo_digest| repo_digest.as_str()?.split_once('@'))
            .map(|(_, digest)| digest)
            .chain(image["Digest"].as_str())
            .map(str::to_owned)
            .collect();
        Ok(PulledImage {
            client: self.name(),
            reference: reference.into(),
            digests,
            architecture: image["Architecture"].as_str().context("no Architecture in `podman image inspect`")?.into(),
        })
    }
}
