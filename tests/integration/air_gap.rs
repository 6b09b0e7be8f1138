//! Air-gapped hand-over with the real binary: `regmirror seed` from the shared upstream,
//! `regmirror export` to an OCI layout tar, `regmirror import` into a fresh cache, and a
//! mirror on that cache whose upstream is unreachable serving containerd and dockerd, by
//! tag and by digest. Also: skopeo reads the archive, a tampered or truncated archive
//! imports nothing, and a list file with bad lines seeds the rest.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::harness::clients::containerd::{Containerd, containerd};
use crate::harness::clients::docker::{docker_cli, docker_pull, dockerd_command};
use crate::harness::clients::skopeo::Skopeo;
use crate::harness::clients::{PullClient, PulledImage, UNREACHABLE_REGISTRY};
use crate::harness::images::{ARCHITECTURE, Fixture, PushedImage, digest_of};
use crate::harness::mirror::{Mirror, MirrorConfig};
use crate::harness::process::{self, Process, run, run_unchecked};
use crate::harness::shared;
use crate::harness::wait;
use crate::harness::workdir::{self, Scratch};

/// The fixtures as an operator would name them.
const IMAGES: [&str; 3] = ["alpine:3.20", "busybox", "docker.io/library/multi:1"];

#[test]
fn offline_mirror_serves_imported_images_to_ctr_and_dockerd() -> Result<()> {
    let fixtures = &shared::plain()?.fixtures;
    let work = Workspace::new()?;
    let connected = work.dir.subdir("connected-cache")?;
    let seeded = work.regmirror_ok("seed", &connected, &IMAGES)?;
    ensure!(seeded.contains("seeded 3 of 3 images"), "seed said:\n{seeded}");

    let archive = work.dir.join("images.tar");
    let exported = work.regmirror_ok("export", &connected, &export_args(&archive, &IMAGES))?;
    ensure!(exported.contains("3 images"), "export said:\n{exported}");

    let site = work.dir.subdir("site-cache")?;
    let imported = work.import(&site, &archive)?;
    ensure!(imported.status.success(), "import failed:\n{}", text(&imported));
    let stdout = String::from_utf8_lossy(&imported.stdout);
    ensure!(stdout.contains("imported docker.io/library/alpine:3.20"), "import said:\n{stdout}");
    let again = work.import(&site, &archive)?;
    let again_out = String::from_utf8_lossy(&again.stdout);
    ensure!(again.status.success(), "a second import failed:\n{}", text(&again));
    ensure!(again_out.contains("added 0 blobs and 0 manifests"), "a second import added content:\n{again_out}");

    // The site's mirror: docker.io is unreachable, and tags are past their TTL, so every
    // pull by tag is answered with the imported record, served stale.
    let mut config = MirrorConfig::docker_io(&format!("http://{UNREACHABLE_REGISTRY}"));
    config.tag_ttl = "1s".into();
    let mirror = Mirror::start_on_cache_dir(config, &site)?;
    std::thread::sleep(Duration::from_secs(2));

    let ctr = crate::harness::clients::containerd::Ctr::new(mirror.host())?;
    for image in fixtures.all() {
        for reference in [image.by_tag(), image.by_digest()] {
            pulled(&ctr, &reference, image)?;
        }
    }

    let docker = OfflineDockerd::start(&mirror)?;
    for image in fixtures.all() {
        for reference in [image.by_tag(), image.by_digest()] {
            let before = mirror.counter("regmirror_bytes_served_total", &[])?;
            pulled(&docker, &reference, image)?;
            let served = mirror.counter("regmirror_bytes_served_total", &[])? - before;
            let size = image.platform(ARCHITECTURE)?.total_size();
            ensure!(
                served >= size as f64,
                "dockerd pulled {reference} ({size} bytes of blobs) but the mirror served only {served} bytes"
            );
        }
    }
    Ok(())
}

#[test]
fn seed_takes_the_host_platform_unless_told_otherwise() -> Result<()> {
    let multi = &shared::plain()?.fixtures.multi;
    let (amd64, arm64) = (multi.platform("amd64")?, multi.platform("arm64")?);
    let work = Workspace::new()?;

    let default = work.dir.subdir("default")?;
    work.regmirror_ok("seed", &default, &["docker.io/library/multi:1"])?;
    ensure!(holds_manifest(&default, &multi.digest), "the index was not kept");
    ensure!(holds_platform(&default, amd64), "the host's (amd64) image was not seeded");
    ensure!(!holds_manifest(&default, &arm64.digest), "arm64 was seeded without being asked for");

    let all = work.dir.subdir("all")?;
    work.regmirror_ok("seed", &all, &["--all-platforms", "docker.io/library/multi:1"])?;
    ensure!(holds_manifest(&all, &multi.digest), "the index was not kept");
    ensure!(holds_platform(&all, amd64) && holds_platform(&all, arm64), "--all-platforms missed a platform");

    let arm = work.dir.subdir("arm")?;
    work.regmirror_ok("seed", &arm, &["--platform", "linux/arm64", "docker.io/library/multi:1"])?;
    ensure!(
        holds_platform(&arm, arm64) && !holds_manifest(&arm, &amd64.digest),
        "--platform linux/arm64 was not obeyed"
    );

    let missing = work.regmirror("seed", &work.dir.subdir("s390x")?, &["--platform", "linux/s390x", "multi:1"])?;
    ensure!(!missing.status.success(), "seeding a platform the index lacks succeeded");
    ensure!(text(&missing).contains("no manifest for linux/s390x"), "{}", text(&missing));
    Ok(())
}

/// skopeo finds images by the full reference in `org.opencontainers.image.ref.name`. The
/// skopeo here (1.9) looks up names only among OCI-typed entries, so the Docker schema2
/// fixture is read from an archive of its own, without a name, which skopeo takes as "the
/// only image".
#[test]
fn skopeo_reads_the_exported_archive() -> Result<()> {
    let fixtures = &shared::plain()?.fixtures;
    let work = Workspace::new()?;
    let cache = work.dir.subdir("cache")?;
    work.regmirror_ok("seed", &cache, &IMAGES)?;
    let archive = work.dir.join("images.tar");
    work.regmirror_ok("export", &cache, &export_args(&archive, &IMAGES))?;
    let single = work.dir.join("busybox.tar");
    work.regmirror_ok("export", &cache, &export_args(&single, &["busybox"]))?;

    for (image, source) in [
        (&fixtures.alpine, format!("oci-archive:{}:{}", archive.display(), fixtures.alpine.by_tag())),
        (&fixtures.multi, format!("oci-archive:{}:{}", archive.display(), fixtures.multi.by_tag())),
        (&fixtures.busybox, format!("oci-archive:{}", single.display())),
    ] {
        let out = work.dir.join(&format!("skopeo-{}", image.repository.replace('/', "-")));
        run(process::tool("skopeo")?
            .args(["--override-os", "linux", "--override-arch", ARCHITECTURE, "--insecure-policy", "copy"])
            .arg(&source)
            .arg(format!("dir:{}", out.display())))
        .with_context(|| format!("skopeo reading {source}"))?;
        let manifest = std::fs::read(out.join("manifest.json"))?;
        let platform = image.platform(ARCHITECTURE)?;
        ensure!(
            digest_of(&manifest) == platform.digest,
            "skopeo read {source} as {}, the upstream serves {}",
            digest_of(&manifest),
            platform.digest
        );
        for blob in &platform.blobs {
            let hex = blob.digest.trim_start_matches("sha256:");
            let copied =
                std::fs::read(out.join(hex)).with_context(|| format!("skopeo did not copy {}", blob.digest))?;
            ensure!(digest_of(&copied) == blob.digest, "skopeo's copy of {} has other bytes", blob.digest);
        }
    }
    Ok(())
}

#[test]
fn tampered_and_truncated_archives_import_nothing() -> Result<()> {
    let alpine = &shared::plain()?.fixtures.alpine;
    let work = Workspace::new()?;
    let cache = work.dir.subdir("cache")?;
    work.regmirror_ok("seed", &cache, &["alpine:3.20", "busybox"])?;
    let good = work.dir.join("alpine.tar");
    work.regmirror_ok("export", &cache, &export_args(&good, &["alpine:3.20"]))?;
    let busybox = work.dir.join("busybox.tar");
    work.regmirror_ok("export", &cache, &export_args(&busybox, &["busybox"]))?;

    // The site already holds busybox: a refused import must leave it exactly as it was.
    let site = work.dir.subdir("site")?;
    let first = work.import(&site, &busybox)?;
    ensure!(first.status.success(), "{}", text(&first));
    let before = listing(&site)?;

    let bytes = std::fs::read(&good)?;
    let layer = alpine.platform(ARCHITECTURE)?.blobs.last().context("alpine has layers")?.clone();
    let (offset, size) = tar_entry(&bytes, &format!("blobs/sha256/{}", layer.digest.trim_start_matches("sha256:")))?;
    let mut tampered = bytes.clone();
    tampered[(offset + size / 2) as usize] ^= 0x20;
    let cut_in_a_layer = bytes[..(offset + size / 3) as usize].to_vec();
    let cut_between_entries = bytes[..(offset + size).div_ceil(512) as usize * 512].to_vec();

    for (what, archive, expected) in [
        ("tampered", tampered, vec![layer.digest.as_str(), "corrupt"]),
        ("cut in a layer", cut_in_a_layer, vec!["truncated"]),
        ("cut between entries", cut_between_entries, vec!["truncated"]),
    ] {
        let path = work.dir.join("bad.tar");
        std::fs::write(&path, archive)?;
        let output = work.import(&site, &path)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(!output.status.success(), "the {what} archive was imported:\n{}", text(&output));
        for word in expected {
            ensure!(stderr.contains(word), "importing the {what} archive: {word:?} not in stderr:\n{stderr}");
        }
        ensure!(stderr.contains("cache is unchanged"), "{stderr}");
        ensure!(listing(&site)? == before, "importing the {what} archive changed the cache");
    }
    Ok(())
}

#[test]
fn seed_list_reports_bad_lines_and_seeds_the_rest() -> Result<()> {
    let work = Workspace::new()?;
    let cache = work.dir.subdir("cache")?;
    let list = work.dir.join("images.txt");
    std::fs::write(
        &list,
        "# for the air-gapped site\n\
         \n\
         alpine:3.20\n\
         \x20 # an indented comment\n\
         docker.io/library/busybox:latest   # trailing comment\n\
         Not A Reference\n\
         docker.io/library/does-not-exist:1\n",
    )?;
    let output = work.regmirror("seed", &cache, &[OsStr::new("--file"), list.as_os_str()])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "seed succeeded despite a bad line:\n{}", text(&output));
    ensure!(stderr.contains("line 6"), "the bad line's number is not reported:\n{stderr}");
    ensure!(stderr.contains("does-not-exist"), "the missing image is not reported:\n{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    ensure!(last.starts_with("regmirror: ") && last.contains("failed"), "no one-line reason at the end:\n{stderr}");
    for (repository, tag) in [("library/alpine", "3.20"), ("library/busybox", "latest")] {
        let record = cache.join("repos/docker.io").join(repository).join("_tags").join(tag);
        ensure!(record.is_file(), "{repository}:{tag} was not seeded:\n{}", text(&output));
    }
    Ok(())
}

/// `seed` on the cache directory of a running mirror: the mirror then serves the image
/// without fetching a blob upstream.
#[test]
fn seeding_a_running_mirrors_cache_warms_it() -> Result<()> {
    let shared = shared::plain()?;
    let repository = "air-gap-warm/alpine";
    let image = shared.registry.push(Fixture::Alpine, repository)?;
    let mirror = Mirror::start(MirrorConfig::docker_io(&shared.registry.upstream.url()))?;
    let work = Workspace::new()?;
    work.regmirror_ok("seed", &mirror.cache_dir(), &[image.by_tag().as_str()])?;

    let mark = shared.registry.upstream.mark()?;
    pulled(&Skopeo::new(mirror.host())?, &image.by_tag(), &image)?;
    let fetched = shared.registry.upstream.blob_fetches_since(&mark, repository)?;
    ensure!(fetched == 0, "the mirror fetched {fetched} blobs upstream after seeding");
    Ok(())
}

/// A temp dir with a config that points `docker.io` at the shared upstream (the connected
/// side of the hand-over).
struct Workspace {
    dir: Scratch,
    config: PathBuf,
}

impl Workspace {
    fn new() -> Result<Workspace> {
        let upstream = &shared::plain()?.registry.upstream;
        let dir = Scratch::new("air-gap")?;
        let config = dir.join("seed.toml");
        std::fs::write(&config, MirrorConfig::docker_io(&upstream.url()).to_toml()?)?;
        Ok(Workspace { dir, config })
    }

    /// `regmirror COMMAND --config … --cache-dir CACHE ARGS…`, whatever its exit status.
    fn regmirror<S: AsRef<OsStr>>(&self, command: &str, cache: &Path, args: &[S]) -> Result<Output> {
        let mut regmirror = Command::new(env!("CARGO_BIN_EXE_regmirror"));
        regmirror.arg(command).arg("--config").arg(&self.config).arg("--cache-dir").arg(cache).args(args);
        run_unchecked(&mut regmirror)
    }

    /// Like [`Self::regmirror`]; fails unless it succeeds, and returns its stdout.
    fn regmirror_ok<S: AsRef<OsStr>>(&self, command: &str, cache: &Path, args: &[S]) -> Result<String> {
        let output = self.regmirror(command, cache, args)?;
        if !output.status.success() {
            bail!("regmirror {command} failed ({}):\n{}", output.status, text(&output));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `regmirror import --cache-dir CACHE ARCHIVE` (no config: the site has none).
    fn import(&self, cache: &Path, archive: &Path) -> Result<Output> {
        let mut import = Command::new(env!("CARGO_BIN_EXE_regmirror"));
        import.arg("import").arg("--cache-dir").arg(cache).arg(archive);
        run_unchecked(&mut import)
    }
}

/// `--output ARCHIVE IMAGE...`
fn export_args<'a>(archive: &'a Path, images: &[&'a str]) -> Vec<&'a OsStr> {
    let mut args = vec![OsStr::new("--output"), archive.as_os_str()];
    args.extend(images.iter().map(|image| OsStr::new(*image)));
    args
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn pulled(client: &dyn PullClient, reference: &str, image: &PushedImage) -> Result<PulledImage> {
    let pulled = client.pull(reference).with_context(|| format!("{} pulling {reference}", client.name()))?;
    pulled.check(image).with_context(|| format!("{} pulling {reference}", client.name()))?;
    Ok(pulled)
}

fn cache_path(cache: &Path, kind: &str, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    cache.join(kind).join("sha256").join(&hex[..2]).join(hex)
}

fn holds_manifest(cache: &Path, digest: &str) -> bool {
    cache_path(cache, "manifests", digest).is_file()
}

/// The platform's manifest and every blob of it are cached.
fn holds_platform(cache: &Path, platform: &crate::harness::images::PlatformManifest) -> bool {
    holds_manifest(cache, &platform.digest)
        && platform.blobs.iter().all(|b| cache_path(cache, "blobs", &b.digest).is_file())
}

/// Every file (with size and mtime) and directory under `dir`, sorted.
fn listing(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            let metadata = entry.metadata()?;
            let relative = entry.path().strip_prefix(dir)?.display().to_string();
            if metadata.is_dir() {
                out.push(format!("{relative}/"));
                pending.push(entry.path());
            } else {
                out.push(format!("{relative} {} {:?}", metadata.len(), metadata.modified()?));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Where the data of the tar entry `path` starts, and its size.
fn tar_entry(archive: &[u8], path: &str) -> Result<(u64, u64)> {
    let mut tar = tar::Archive::new(archive);
    for entry in tar.entries()? {
        let entry = entry?;
        if entry.path()?.to_string_lossy() == path {
            return Ok((entry.raw_file_position(), entry.size()));
        }
    }
    bail!("{path} is not in the archive")
}

/// A dockerd of this test's own whose `--registry-mirror` is the given mirror (the shared
/// dockerd's mirror is fixed at its start). It runs on the shared containerd under its own
/// namespaces. There is no internet here, so dockerd's silent fallback to Docker Hub fails:
/// a pull that succeeds came from the mirror, which the metrics confirm too.
struct OfflineDockerd {
    dir: Scratch,
    _process: Process,
}

impl OfflineDockerd {
    fn start(mirror: &Mirror) -> Result<OfflineDockerd> {
        let containerd: &Containerd = containerd()?;
        let dir = Scratch::new("air-gap-dockerd")?;
        std::fs::write(dir.join("daemon.json"), "{}")?;
        let name = workdir::test_scoped("dockerd");
        let log = workdir::log_file(&name)?;
        let namespace = format!("air-gap-{}", std::process::id());
        let mut command = dockerd_command(&dir, containerd)?;
        command
            .args(["--containerd-namespace", &namespace])
            .args(["--containerd-plugins-namespace", &format!("{namespace}-plugins")])
            .arg("--registry-mirror")
            .arg(mirror.url());
        let mut process = Process::spawn_logged(&name, command, &log, &log)?;
        wait::for_log_line(&mut process, &log, "API listen on")
            .with_context(|| format!("dockerd log: {}", log.display()))?;
        Ok(OfflineDockerd { dir, _process: process })
    }

    fn docker(&self) -> Result<Command> {
        docker_cli(&self.dir)
    }
}

impl PullClient for OfflineDockerd {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn pull(&self, reference: &str) -> Result<PulledImage> {
        run(self.docker()?.args(["image", "prune", "--all", "--force"]))?;
        docker_pull(|| self.docker(), reference)
    }
}
