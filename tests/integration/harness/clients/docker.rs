//! dockerd, started once per test binary on the shared containerd, and
//! `docker pull` through it.
//!
//! dockerd takes its mirror at start (`registry-mirrors` in its config
//! file, `deploy/clients/daemon.json`), so it gets a dedicated long-lived
//! mirror of the shared plain upstream. Tests use it one at a time through
//! a [`DockerSession`], which also lets them attribute the mirror's metrics
//! to their own pulls. Each pull first prunes every image, so layers are
//! fetched again.
//!
//! dockerd silently falls back to Docker Hub when the mirror fails, so tests
//! must prove the mirror served the pull (its metrics or the upstream's
//! access log); getting the random fixture layers at all is proof too, as
//! nothing else has them.

use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use anyhow::{Context, Result};
use serde_json::Value;

use super::containerd::{Containerd, containerd};
use super::{MIRROR_PLACEHOLDER, PullClient, PulledImage, deploy_snippet};
use crate::harness::images::ARCHITECTURE;
use crate::harness::mirror::{Mirror, MirrorConfig};
use crate::harness::process::{self, Process, run, run_stdout};
use crate::harness::shared;
use crate::harness::wait;
use crate::harness::workdir::{self, Scratch};

/// The shared dockerd and its mirror.
pub struct Dockerd {
    dir: Scratch,
    mirror: Mirror,
    in_use: Mutex<()>,
    _process: Process,
}

/// Exclusive use of the shared dockerd.
pub struct DockerSession {
    daemon: &'static Dockerd,
    _exclusive: MutexGuard<'static, ()>,
}

/// Waits for the shared dockerd (starting it on first use) and returns it
/// for this test's exclusive use.
pub fn session() -> Result<DockerSession> {
    static DOCKERD: OnceLock<Result<Dockerd, String>> = OnceLock::new();
    let daemon = shared::once(&DOCKERD, Dockerd::start)?;
    let exclusive = daemon.in_use.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    eprintln!("dockerd's mirror logs to {} (shared by all dockerd tests)", daemon.mirror.log_path().display());
    Ok(DockerSession { daemon, _exclusive: exclusive })
}

impl Dockerd {
    fn start() -> Result<Dockerd> {
        let upstream = &shared::plain()?.registry.upstream;
        let mirror = Mirror::start_named("shared-dockerd-mirror", MirrorConfig::docker_io(&upstream.url()))?;
        let containerd = containerd()?;
        let dir = Scratch::new("dockerd")?;
        // deploy/clients/daemon.json, which also keeps /etc/docker/daemon.json out of it.
        let daemon_json = deploy_snippet("daemon.json", &[(MIRROR_PLACEHOLDER, mirror.host())])?;
        std::fs::write(dir.join("daemon.json"), daemon_json)?;
        let log = workdir::log_file("shared-dockerd")?;
        let command = dockerd_command(&dir, containerd)?;
        let mut process = Process::spawn_logged("dockerd", command, &log, &log)?;
        wait::for_log_line(&mut process, &log, "API listen on")?;
        Ok(Dockerd { dir, mirror, in_use: Mutex::new(()), _process: process })
    }

    /// A `docker` CLI command for this daemon, with a private CLI config.
    fn docker(&self) -> Result<Command> {
        docker_cli(&self.dir)
    }
}

/// `docker pull` of `reference` for this machine's platform with the CLI `docker` makes, and
/// what `docker image inspect` then says the image is.
pub fn docker_pull(docker: impl Fn() -> Result<Command>, reference: &str) -> Result<PulledImage> {
    run(docker()?.args(["pull", "--platform"]).arg(format!("linux/{ARCHITECTURE}")).arg(reference))?;
    let inspected: Value = serde_json::from_str(&run_stdout(docker()?.args(["image", "inspect", reference]))?)?;
    let image = &inspected[0];
    let digests = image["RepoDigests"]
        .as_array()
        .context("no RepoDigests in `docker image inspect`")?
        .iter()
        .filter_map(|repo_digest| repo_digest.as_str()?.split_once('@'))
        .map(|(_, digest)| digest.to_owned())
        .collect();
    Ok(PulledImage {
        client: "docker",
        reference: reference.into(),
        digests,
        architecture: image["Architecture"].as_str().context("no Architecture in `docker image inspect`")?.into(),
    })
}

/// `dockerd` with everything in `dir` (config `daemon.json`, data, exec root, pid file and
/// the API socket `docker.sock`), no networking of its own, on `containerd`.
pub fn dockerd_command(dir: &Scratch, containerd: &Containerd) -> Result<Command> {
    let mut command = process::tool("dockerd")?;
    command
        .arg("--config-file")
        .arg(dir.join("daemon.json"))
        .arg("--data-root")
        .arg(dir.join("root"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("dockerd.pid"))
        .arg("--host")
        .arg(format!("unix://{}", dir.join("docker.sock").display()))
        .args(["--storage-driver", "vfs", "--bridge", "none"])
        .args(["--iptables=false", "--ip6tables=false"])
        .arg("--containerd")
        .arg(containerd.socket());
    Ok(command)
}

/// A `docker` CLI command for the daemon of [`dockerd_command`]`(dir, …)`, with a private
/// CLI config.
pub fn docker_cli(dir: &Scratch) -> Result<Command> {
    let mut command = process::tool("docker")?;
    command
        .env("DOCKER_HOST", format!("unix://{}", dir.join("docker.sock").display()))
        .env("DOCKER_CONFIG", dir.join("cli"));
    Ok(command)
}

impl DockerSession {
    /// The mirror dockerd pulls through.
    pub fn mirror(&self) -> &'static Mirror {
        &self.daemon.mirror
    }

    /// Removes every image, so the next pull fetches every layer.
    pub fn remove_all_images(&self) -> Result<()> {
        run(self.daemon.docker()?.args(["image", "prune", "--all", "--force"]))?;
        Ok(())
    }
}

impl PullClient for DockerSession {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn pull(&self, reference: &str) -> Result<PulledImage> {
        self.remove_all_images()?;
        docker_pull(|| self.daemon.docker(), reference)
    }
}
