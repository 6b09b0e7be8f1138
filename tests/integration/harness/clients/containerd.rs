//! containerd, started once per test binary with its own root, state and
//! socket, and `ctr images pull --hosts-dir` through a mirror, with the
//! `hosts.toml` files of `deploy/clients/containerd/`.
//!
//! Every pull runs in a namespace of its own. containerd shares blobs
//! across namespaces by default, which would let a second pull skip the
//! mirror entirely, so the daemon is configured with
//! `content_sharing_policy = "isolated"`: a new namespace is a fresh store.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};

use super::{MIRROR_PLACEHOLDER, PullClient, PulledImage, UNREACHABLE_REGISTRY, deploy_snippet};
use crate::harness::images::ARCHITECTURE;
use crate::harness::process::{self, Process, run_stdout};
use crate::harness::shared;
use crate::harness::wait;
use crate::harness::workdir::{self, Scratch};

/// The shared containerd daemon.
pub struct Containerd {
    socket: PathBuf,
    _process: Process,
    _dir: Scratch,
}

/// Starts the shared containerd on first use.
pub fn containerd() -> Result<&'static Containerd> {
    static CONTAINERD: OnceLock<Result<Containerd, String>> = OnceLock::new();
    shared::once(&CONTAINERD, Containerd::start)
}

impl Containerd {
    fn start() -> Result<Containerd> {
        let dir = Scratch::new("containerd")?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\n\
                 root = \"{root}\"\n\
                 state = \"{state}\"\n\
                 [grpc]\n  address = \"{socket}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n\
                 [plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"isolated\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                socket = socket.display(),
            ),
        )?;
        let log = workdir::log_file("shared-containerd")?;
        let mut command = process::tool("containerd")?;
        command.arg("--config").arg(&config);
        let mut process = Process::spawn_logged("containerd", command, &log, &log)?;
        wait::for_log_line(&mut process, &log, "containerd successfully booted")?;
        Ok(Containerd { socket, _process: process, _dir: dir })
    }

    pub fn socket(&self) -> &PathBuf {
        &self.socket
    }

    /// A `ctr` command talking to this daemon in `namespace`.
    pub fn ctr(&self, namespace: &str) -> Result<Command> {
        let mut command = process::tool("ctr")?;
        command.arg("--address").arg(&self.socket).args(["--namespace", namespace]);
        Ok(command)
    }
}

/// `ctr images pull` through one mirror, each pull in a new namespace.
pub struct Ctr {
    containerd: &'static Containerd,
    hosts: Scratch,
}

impl Ctr {
    /// A client using the registry at `mirror_host` as the mirror of docker.io and ghcr.io,
    /// with `deploy/clients/containerd/*/hosts.toml`.
    pub fn new(mirror_host: &str) -> Result<Ctr> {
        let hosts = Scratch::new("ctr-hosts")?;
        let unreachable = format!("http://{UNREACHABLE_REGISTRY}");
        for (registry, server) in [("docker.io", "https://registry-1.docker.io"), ("ghcr.io", "https://ghcr.io")] {
            let text = deploy_snippet(
                &format!("containerd/{registry}/hosts.toml"),
                &[(MIRROR_PLACEHOLDER, mirror_host), (server, &unreachable)],
            )?;
            std::fs::write(hosts.subdir(registry)?.join("hosts.toml"), text)?;
        }
        Ok(Ctr { containerd: containerd()?, hosts })
    }
}

impl PullClient for Ctr {
    fn name(&self) -> &'static str {
        "ctr"
    }

    fn pull(&self, reference: &str) -> Result<PulledImage> {
        static NAMESPACES: AtomicUsize = AtomicUsize::new(0);
        let namespace = format!("pull-{}", NAMESPACES.fetch_add(1, Ordering::Relaxed));
        let output = run_stdout(
            self.containerd
                .ctr(&namespace)?
                .args(["images", "pull", "--hosts-dir"])
                .arg(self.hosts.path())
                .args(["--snapshotter", "native", "--platform"])
                .arg(format!("linux/{ARCHITECTURE}"))
                .arg(reference),
        )?;
        let architecture =
            unpacked_architecture(&output).with_context(|| format!("ctr did not say what it unpacked:\n{output}"))?;
        let images = run_stdout(self.containerd.ctr(&namespace)?.args(["images", "ls"]))?;
        let digest = listed_digest(&images, reference)
            .with_context(|| format!("{reference} is not in `ctr images ls`:\n{images}"))?;
        Ok(PulledImage { client: self.name(), reference: reference.into(), digests: vec![digest], architecture })
    }
}

/// `amd64` from ctr's `unpacking linux/amd64 sha256:…` line.
fn unpacked_architecture(output: &str) -> Option<String> {
    let platform = output.split("unpacking ").nth(1)?.split_whitespace().next()?;
    Some(platform.rsplit('/').next()?.to_owned())
}

/// The DIGEST column of `reference`'s row in `ctr images ls`.
fn listed_digest(listing: &str, reference: &str) -> Option<String> {
    listing.lines().find_map(|line| {
        let mut columns = line.split_whitespace();
        (columns.next()? == reference).then_some(())?;
        Some(columns.nth(1)?.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ctr_output() {
        let pull = "elapsed: 0.1 s   total: 0.0 B\nunpacking linux/amd64 sha256:7b38...\ndone: 35ms";
        assert_eq!(unpacked_architecture(pull).as_deref(), Some("amd64"));
        let listing = "REF TYPE DIGEST SIZE PLATFORMS LABELS\n\
            docker.io/library/alpine:3.20 application/vnd.oci.image.manifest.v1+json sha256:7b38 6.0 MiB linux/amd64 -";
        assert_eq!(listed_digest(listing, "docker.io/library/alpine:3.20").as_deref(), Some("sha256:7b38"));
        assert_eq!(listed_digest(listing, "docker.io/library/alpine:3"), None);
    }
}
