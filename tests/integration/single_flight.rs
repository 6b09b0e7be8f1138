//! Many real clients cold-pulling one image at once through one mirror: the upstream must
//! see exactly one GET per blob, and every client must get the upstream's digests.

use anyhow::{Context, Result, ensure};

use crate::harness::clients::PullClient;
use crate::harness::clients::containerd::Ctr;
use crate::harness::clients::skopeo::Skopeo;
use crate::harness::images::{ARCHITECTURE, Fixture};
use crate::harness::mirror::{Mirror, MirrorConfig};
use crate::harness::shared;

const SKOPEO_CLIENTS: usize = 6;
const CTR_CLIENTS: usize = 3;

#[test]
fn concurrent_cold_pulls_fetch_each_blob_once() -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let repository = "flight/alpine";
    let image = shared.registry.push(Fixture::Alpine, repository)?;
    let mirror = Mirror::start(MirrorConfig::docker_io(&upstream.url()))?;

    let mut clients: Vec<Box<dyn PullClient + Send + Sync>> = Vec::new();
    for _ in 0..SKOPEO_CLIENTS {
        clients.push(Box::new(Skopeo::new(mirror.host())?));
    }
    for _ in 0..CTR_CLIENTS {
        clients.push(Box::new(Ctr::new(mirror.host())?));
    }

    let mark = upstream.mark()?;
    let reference = image.by_tag();
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let pulls: Vec<_> = clients
            .iter()
            .map(|client| {
                let (reference, image) = (&reference, &image);
                scope.spawn(move || {
                    client
                        .pull(reference)
                        .and_then(|pulled| pulled.check(image))
                        .with_context(|| format!("{} pulling {reference}", client.name()))
                })
            })
            .collect();
        pulls.into_iter().map(|p| p.join().expect("a pull thread panicked")).collect()
    });
    for result in results {
        result.with_context(|| format!("mirror log: {}", mirror.log_path().display()))?;
    }

    let blobs = &image.platform(ARCHITECTURE)?.blobs;
    for blob in blobs {
        let fetches = upstream.count_since(&mark, "GET", &format!("/v2/{repository}/blobs/{}", blob.digest))?;
        ensure!(fetches == 1, "{} clients made the upstream serve blob {} {fetches} times", clients.len(), blob.digest);
    }
    let total = upstream.blob_fetches_since(&mark, repository)?;
    ensure!(total == blobs.len(), "{total} blob GETs upstream for a {}-blob image", blobs.len());
    check_served_bytes(&mirror, clients.len(), blobs.iter().map(|b| b.size).sum())
}

/// Every client got every byte, from the one fill or from the cache.
fn check_served_bytes(mirror: &Mirror, clients: usize, image_bytes: u64) -> Result<()> {
    let served = mirror.counter("regmirror_bytes_served_total", &[])?;
    let fetched = mirror.counter("regmirror_upstream_bytes_total", &[])?;
    ensure!(served >= (clients as u64 * image_bytes) as f64, "served {served} bytes to {clients} clients");
    ensure!(
        fetched < (image_bytes + 64 * 1024) as f64,
        "fetched {fetched} bytes upstream for a {image_bytes}-byte image"
    );
    Ok(())
}
