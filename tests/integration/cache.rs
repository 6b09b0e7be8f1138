//! The bounded cache: LRU eviction by bytes measured on the filesystem, recency across
//! restarts, blobs shared between repositories, and a crash in the middle of a fill.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;

use crate::harness::clients::PullClient;
use crate::harness::clients::skopeo::Skopeo;
use crate::harness::fake_upstream::{FakeUpstream, Reply};
use crate::harness::in_process::{TestMirror, blob, download, walk_files};
use crate::harness::mirror::{Mirror, MirrorConfig};
use crate::harness::shared;

const MIB: u64 = 1 << 20;

/// Bytes of blobs and manifests on disk, by walking the directory.
fn content_bytes(cache_dir: &Path) -> u64 {
    ["blobs", "manifests"].iter().map(|dir| tree_bytes(&cache_dir.join(dir))).sum()
}

fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| {
            let metadata = e.metadata().unwrap();
            if metadata.is_dir() { tree_bytes(&e.path()) } else { metadata.len() }
        })
        .sum()
}

#[test]
fn a_real_client_pulling_more_than_the_bound_keeps_the_cache_under_it() -> Result<()> {
    let shared = shared::plain()?;
    let bound = 7 * MIB;
    let config = MirrorConfig::docker_io(&shared.registry.upstream.url()).with_max_cache_size("7MiB");
    let mirror = Mirror::start(config)?;
    let skopeo = Skopeo::new(mirror.host())?;
    let images = shared.fixtures.all();
    let total: u64 = images.iter().map(|i| i.platform("amd64").map_or(0, |p| p.total_size())).sum();
    ensure!(total > bound, "the fixtures ({total} bytes) must exceed the bound");

    for image in images.iter().chain(images.iter()) {
        skopeo.pull(&image.by_tag())?.check(image).with_context(|| format!("pulling {}", image.by_tag()))?;
        let on_disk = content_bytes(&mirror.cache_dir());
        ensure!(on_disk <= bound, "after pulling {} the cache holds {on_disk} bytes, over {bound}", image.by_tag());
    }
    ensure!(mirror.counter("regmirror_evictions_total", &[])? > 0.0, "nothing was evicted");
    ensure!(mirror.counter("regmirror_cache_size_bytes", &[])? <= bound as f64);
    Ok(())
}

/// Three 1 MiB blobs fit; a fourth evicts the least recently used.
fn lru_upstream(blobs: &[(Bytes, String)]) -> impl Fn(&crate::harness::fake_upstream::Seen) -> Reply + use<> {
    let blobs = blobs.to_vec();
    move |seen| match blobs.iter().find(|(_, digest)| seen.path.ends_with(digest.as_str())) {
        Some((data, _)) => Reply::ok(data.clone()),
        None => Reply::status(http::StatusCode::NOT_FOUND),
    }
}

fn blob_path(digest: &str) -> String {
    format!("/v2/library/app/blobs/{digest}")
}

fn cached(mirror: &TestMirror, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    mirror.dir.path().join("blobs/sha256").join(&hex[..2]).join(hex).exists()
}

#[tokio::test]
async fn the_least_recently_used_blob_goes_first_also_after_a_restart() {
    let blobs: Vec<_> = (0..4).map(|n| blob(MIB as usize, 100 + n)).collect();
    let [a, untouched, b, c] = [0, 1, 2, 3].map(|i| blobs[i].1.clone());
    let upstream = FakeUpstream::start(lru_upstream(&blobs)).await;
    let upstreams = [("docker.io", upstream.url())];
    let upstreams: Vec<(&str, &str)> = upstreams.iter().map(|(n, u)| (*n, u.as_str())).collect();

    let mirror = TestMirror::start_bounded(&upstreams, 3 * MIB).await;
    for digest in [&a, &untouched] {
        download(&mirror, &blob_path(digest)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    download(&mirror, &blob_path(&a)).await.unwrap(); // touch A
    // Restart on the same cache: the order must survive it.
    let mirror = TestMirror::start_in_bounded(mirror.dir, &upstreams, 3 * MIB).await;
    for digest in [&b, &c] {
        download(&mirror, &blob_path(digest)).await.unwrap();
    }
    assert!(cached(&mirror, &a), "the touched blob survives");
    assert!(!cached(&mirror, &untouched), "the untouched blob is evicted");
    assert!(cached(&mirror, &b) && cached(&mirror, &c));
    assert!(content_bytes(mirror.dir.path()) <= 3 * MIB);
    assert_eq!(mirror.metric("regmirror_evictions_total"), 1.0);
    assert_eq!(mirror.metric("regmirror_evicted_bytes_total"), MIB as f64);
}

#[tokio::test]
async fn a_blob_shared_by_two_repositories_is_never_served_empty_after_eviction() {
    let blobs: Vec<_> = (0..4).map(|n| blob(MIB as usize, 200 + n)).collect();
    let shared_layer = blobs[0].clone();
    let upstream = FakeUpstream::start(lru_upstream(&blobs)).await;
    let url = upstream.url();
    let mirror = TestMirror::start_bounded(&[("docker.io", &url)], 2 * MIB).await;

    let via = |repo: &str, digest: &str| format!("/v2/{repo}/blobs/{digest}");
    assert_eq!(download(&mirror, &via("team-a/app", &shared_layer.1)).await.unwrap(), shared_layer.0);
    assert_eq!(download(&mirror, &via("team-b/app", &shared_layer.1)).await.unwrap(), shared_layer.0);
    assert_eq!(upstream.requests_to(&shared_layer.1).len(), 1, "stored once for both repositories");
    // Push the shared layer out of the cache through other content.
    for (_, digest) in &blobs[1..] {
        download(&mirror, &via("team-a/app", digest)).await.unwrap();
    }
    assert!(!cached(&mirror, &shared_layer.1));
    // Whichever repository asks next gets the full, right bytes again.
    assert_eq!(download(&mirror, &via("team-b/app", &shared_layer.1)).await.unwrap(), shared_layer.0);
    assert_eq!(upstream.requests_to(&shared_layer.1).len(), 2);
}

#[test]
fn a_crash_mid_fill_leaves_nothing_partial() -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let (data, digest) = blob(8 * MIB as usize, 300);
    let served = data.clone();
    let upstream = runtime.block_on(FakeUpstream::start(move |_| Reply::Slow {
        body: served.clone(),
        chunk: 256 * 1024,
        delay: Duration::from_millis(50),
    }));
    let mut mirror = Mirror::start(MirrorConfig::docker_io(&upstream.url()))?;
    let url = format!("{}/v2/library/app/blobs/{digest}", mirror.url());

    // A client starts the download; the mirror dies with part of the blob in tmp/.
    let client = std::thread::spawn({
        let url = url.clone();
        move || crate::harness::http::get(&url)
    });
    let tmp = mirror.cache_dir().join("tmp");
    crate::harness::wait::poll("a partly written fill", Duration::from_secs(30), || {
        Ok((tree_bytes(&tmp) > MIB).then_some(()))
    })?;
    mirror.crash_and_restart()?;
    let _ = client.join();

    ensure!(walk_files(&tmp) == 0, "the restart removed the interrupted fill");
    ensure!(walk_files(&mirror.cache_dir().join("blobs")) == 0, "no partial blob is visible");
    // The restarted mirror listens on a new port.
    let url = format!("{}/v2/library/app/blobs/{digest}", mirror.url());
    let body = crate::harness::http::get_bytes(&url)?;
    ensure!(body == data, "a fresh fill serves the right bytes");
    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(["verify", "--cache-dir"])
        .arg(mirror.cache_dir())
        .output()?;
    ensure!(verify.status.success(), "verify: {}", String::from_utf8_lossy(&verify.stdout));
    drop(upstream);
    Ok(())
}

#[tokio::test]
async fn pinned_images_are_never_evicted() {
    let (config_blob, config_digest) = blob(1000, 400);
    let (layer, layer_digest) = blob(MIB as usize, 401);
    let manifest = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":1000}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{MIB}}}]}}"#,
        OCI = crate::harness::in_process::OCI_MANIFEST,
    ));
    let mut blobs: Vec<_> = (0..4).map(|n| blob(MIB as usize, 410 + n)).collect();
    blobs.push((config_blob, config_digest.clone()));
    blobs.push((layer.clone(), layer_digest.clone()));
    let serve_blob = lru_upstream(&blobs);
    let upstream = FakeUpstream::start(move |seen| {
        if seen.path.contains("/manifests/") {
            crate::harness::in_process::manifest_reply(&manifest)
        } else {
            serve_blob(seen)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = TestMirror::config(&dir, &[("docker.io", &upstream.url())]);
    config.max_cache_size = 3 * MIB;
    config.pinned = vec![regmirror::image_ref::ImageRef::parse("docker.io/library/keep:1", "docker.io").unwrap()];
    let mirror = TestMirror::start_config(dir, config).await;

    assert_eq!(mirror.get("/v2/library/keep/manifests/1").await.status(), http::StatusCode::OK);
    for digest in [&config_digest, &layer_digest] {
        download(&mirror, &format!("/v2/library/keep/blobs/{digest}")).await.unwrap();
    }
    for (_, digest) in &blobs[..4] {
        download(&mirror, &blob_path(digest)).await.unwrap();
    }
    assert!(cached(&mirror, &layer_digest) && cached(&mirror, &config_digest), "pinned content stays");
    assert!(content_bytes(mirror.dir.path()) <= 3 * MIB, "and the bound holds for everything together");
    assert!(mirror.metric("regmirror_evictions_total") >= 2.0);
}
