//! Real clients pulling through the mirror from the shared plain upstream.
//!
//! Every test runs its own mirror (own cache dir), except the dockerd tests,
//! which share dockerd's mirror one at a time. Tests that count upstream
//! requests push the image to a repository of their own first, so that
//! parallel tests pulling the shared fixtures do not show up in the counts.

use anyhow::{Context, Result, ensure};

use crate::harness::clients::PullClient;
use crate::harness::clients::containerd::Ctr;
use crate::harness::clients::docker::{self, DockerSession};
use crate::harness::clients::podman::Podman;
use crate::harness::clients::skopeo::Skopeo;
use crate::harness::images::{ARCHITECTURE, Fixture, PushedImage};
use crate::harness::mirror::{Mirror, MirrorConfig};
use crate::harness::registry::Registry;
use crate::harness::shared;
use crate::harness::workdir;

#[test]
fn skopeo_pulls_fixtures_by_tag() -> Result<()> {
    with_new_mirror(Skopeo::new, |client, _| pulls_fixtures(client, By::Tag))
}

#[test]
fn skopeo_pulls_fixtures_by_digest() -> Result<()> {
    with_new_mirror(Skopeo::new, |client, _| pulls_fixtures(client, By::Digest))
}

#[test]
fn skopeo_warm_pull_fetches_no_blobs_upstream() -> Result<()> {
    with_new_mirror(Skopeo::new, warm_pull_fetches_no_blobs_upstream)
}

#[test]
fn ctr_pulls_fixtures_by_tag() -> Result<()> {
    with_new_mirror(Ctr::new, |client, _| pulls_fixtures(client, By::Tag))
}

#[test]
fn ctr_pulls_fixtures_by_digest() -> Result<()> {
    with_new_mirror(Ctr::new, |client, _| pulls_fixtures(client, By::Digest))
}

#[test]
fn ctr_warm_pull_fetches_no_blobs_upstream() -> Result<()> {
    with_new_mirror(Ctr::new, warm_pull_fetches_no_blobs_upstream)
}

#[test]
fn podman_pulls_fixtures_by_tag() -> Result<()> {
    with_new_mirror(Podman::new, |client, _| pulls_fixtures(client, By::Tag))
}

#[test]
fn podman_warm_pull_fetches_no_blobs_upstream() -> Result<()> {
    with_new_mirror(Podman::new, warm_pull_fetches_no_blobs_upstream)
}

/// dockerd falls back to Docker Hub silently, so each pull must also show
/// up in the mirror's served bytes.
#[test]
fn docker_pulls_fixtures_by_tag() -> Result<()> {
    let docker = docker::session()?;
    for image in shared::plain()?.fixtures.all() {
        let served = served_by_mirror(&docker, || pulls(&docker, image, By::Tag))?;
        let size = image.platform(ARCHITECTURE)?.total_size();
        ensure!(
            served >= size as f64,
            "dockerd pulled {} ({size} bytes of blobs) but its mirror served only {served} bytes",
            image.by_tag()
        );
    }
    Ok(())
}

#[test]
fn docker_warm_pull_fetches_no_blobs_upstream() -> Result<()> {
    let docker = docker::session()?;
    warm_pull_fetches_no_blobs_upstream(&docker, docker.mirror())
}

/// The mirror keeps serving what it cached when the upstream is gone, also
/// across a restart. Uses an upstream of its own, since it stops it.
#[test]
fn restarted_mirror_serves_cached_image_with_upstream_down() -> Result<()> {
    let registry = Registry::plain(&workdir::test_scoped("upstream"))?;
    let image = registry.push(Fixture::Alpine, Fixture::Alpine.repository())?;
    let mut mirror = Mirror::start(MirrorConfig::docker_io(&registry.upstream.url()))?;
    pulls(&Skopeo::new(mirror.host())?, &image, By::Tag).context("warming the cache")?;

    registry.upstream.stop();
    mirror.restart()?;
    let skopeo = Skopeo::new(mirror.host())?;
    for by in [By::Tag, By::Digest] {
        pulls(&skopeo, &image, by).context("after a restart, with the upstream down")?;
    }
    Ok(())
}

/// How a test refers to an image.
#[derive(Clone, Copy, Debug)]
enum By {
    Tag,
    Digest,
}

/// Starts a mirror of the shared plain upstream and runs `test` with a
/// client pulling through it.
fn with_new_mirror<C: PullClient>(
    client: impl FnOnce(&str) -> Result<C>,
    test: impl FnOnce(&dyn PullClient, &Mirror) -> Result<()>,
) -> Result<()> {
    let upstream = &shared::plain()?.registry.upstream;
    let mirror = Mirror::start(MirrorConfig::docker_io(&upstream.url()))?;
    test(&client(mirror.host())?, &mirror)
}

/// The client pulls every shared fixture and gets the upstream's digests.
fn pulls_fixtures(client: &dyn PullClient, by: By) -> Result<()> {
    shared::plain()?.fixtures.all().into_iter().try_for_each(|image| pulls(client, image, by))
}

fn pulls(client: &dyn PullClient, image: &PushedImage, by: By) -> Result<()> {
    let reference = match by {
        By::Tag => image.by_tag(),
        By::Digest => image.by_digest(),
    };
    client
        .pull(&reference)
        .and_then(|pulled| pulled.check(image))
        .with_context(|| format!("{} pulling {reference} through the mirror", client.name()))
}

/// A second pull of an image (into a fresh client store) is served from the
/// mirror's cache: the upstream serves no blob, the mirror serves them all.
fn warm_pull_fetches_no_blobs_upstream(client: &dyn PullClient, mirror: &Mirror) -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let repository = format!("warm-{}/alpine", client.name());
    let image = shared.registry.push(Fixture::Alpine, &repository)?;
    pulls(client, &image, By::Tag).context("cold pull")?;

    let mark = upstream.mark()?;
    let hits_before = blob_cache_hits(mirror)?;
    pulls(client, &image, By::Tag).context("warm pull")?;
    let fetched = upstream.blob_fetches_since(&mark, &repository)?;
    let hits = blob_cache_hits(mirror)? - hits_before;

    ensure!(fetched == 0, "the warm pull made {fetched} blob GETs upstream");
    let blobs = image.platform(ARCHITECTURE)?.blobs.len();
    ensure!(hits >= blobs as f64, "the warm pull of a {blobs}-blob image counted only {hits} blob cache hits");
    Ok(())
}

/// Runs `pull` and returns how many bytes dockerd's mirror served meanwhile.
fn served_by_mirror(docker: &DockerSession, pull: impl FnOnce() -> Result<()>) -> Result<f64> {
    let mirror = docker.mirror();
    let before = bytes_served(mirror)?;
    pull()?;
    Ok(bytes_served(mirror)? - before)
}

fn blob_cache_hits(mirror: &Mirror) -> Result<f64> {
    mirror.counter("regmirror_cache_hits_total", &[("kind", "blob")])
}

/// Bytes served from the cache and from the upstream alike.
fn bytes_served(mirror: &Mirror) -> Result<f64> {
    mirror.counter("regmirror_bytes_served_total", &[])
}
