//! Many upstreams behind one mirror: routing by `?ns=` and by path prefix, no contact with
//! hosts that are not configured, health tracking of a dying upstream, negative caching,
//! referrers with the tag-schema fallback, offline mode and mirror chains.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use crate::harness::fake_upstream::{FakeUpstream, Reply};
use crate::harness::in_process::{OCI_MANIFEST, TestMirror, manifest_reply, sha256};

fn image_manifest(seed: u8) -> Bytes {
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{}},"layers":[],"seed":{seed}}}"#
    ))
}

#[tokio::test]
async fn an_unconfigured_ns_never_opens_a_connection() {
    let watcher = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = watcher.local_addr().unwrap().to_string();
    let connects = Arc::new(AtomicUsize::new(0));
    let counted = connects.clone();
    let counter = tokio::spawn(async move {
        while watcher.accept().await.is_ok() {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let upstream = FakeUpstream::start(|_| Reply::status(StatusCode::NOT_FOUND)).await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;

    for path in ["/v2/library/app/manifests/1.0", "/v2/library/app/tags/list", "/v2/_catalog"] {
        let response = mirror.get(&format!("{path}?ns={target}")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(connects.load(Ordering::SeqCst), 0, "the mirror connected to a host it was not given");
    assert_eq!(upstream.request_count(), 0);
    counter.abort();
}

#[tokio::test]
async fn ns_and_path_prefix_route_to_their_upstreams_and_same_content_is_stored_once() {
    let manifest = image_manifest(1);
    let (hub_manifest, ghcr_manifest) = (manifest.clone(), manifest.clone());
    let hub = FakeUpstream::start(move |_| manifest_reply(&hub_manifest)).await;
    let ghcr = FakeUpstream::start(move |_| manifest_reply(&ghcr_manifest)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = TestMirror::config(&dir, &[("docker.io", &hub.url()), ("ghcr.io", &ghcr.url())]);
    config.upstreams[1].path_prefix = true;
    let mirror = TestMirror::start_config(dir, config).await;

    assert_eq!(mirror.get("/v2/org/tool/manifests/v1?ns=ghcr.io").await.status(), StatusCode::OK);
    assert_eq!(ghcr.requests_to("/v2/org/tool/manifests/v1").len(), 1);
    // The same tag through the path-prefix form is the same cache entry.
    assert_eq!(mirror.get("/v2/ghcr.io/org/tool/manifests/v1").await.status(), StatusCode::OK);
    assert_eq!(ghcr.requests_to("/v2/org/tool/manifests/v1").len(), 1);
    // docker.io's org/tool is another repository, though its manifest has the same bytes.
    assert_eq!(mirror.get("/v2/org/tool/manifests/v1").await.status(), StatusCode::OK);
    assert_eq!(hub.requests_to("/v2/org/tool/manifests/v1").len(), 1);
    let manifests = crate::harness::in_process::walk_files(&mirror.dir.path().join("manifests"));
    assert_eq!(manifests, 2, "one manifest and its media type, stored once for both upstreams");
    let catalog: serde_json::Value = mirror.get("/v2/_catalog?ns=ghcr.io").await.json().await.unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["org/tool"]));
}

#[tokio::test]
async fn a_failing_upstream_is_marked_down_and_cached_tags_are_served_without_asking_it() {
    let manifest = image_manifest(2);
    let digest = sha256(&manifest);
    let down = Arc::new(AtomicBool::new(false));
    let failing = down.clone();
    let upstream = FakeUpstream::start(move |_| {
        if failing.load(Ordering::SeqCst) { Reply::status(StatusCode::BAD_GATEWAY) } else { manifest_reply(&manifest) }
    })
    .await;
    // A zero TTL: every tag request wants a revalidation.
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::ZERO).await;
    assert_eq!(mirror.get("/v2/library/app/manifests/1.0").await.status(), StatusCode::OK);

    down.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let stale = mirror.get("/v2/library/app/manifests/1.0").await;
        assert_eq!(stale.status(), StatusCode::OK);
        assert_eq!(stale.headers()["docker-content-digest"], digest.as_str());
    }
    assert_eq!(mirror.metric("regmirror_upstream_up{upstream=\"docker.io\"}"), 0.0);
    let readiness = mirror.get("/readyz").await.text().await.unwrap();
    assert!(readiness.contains("upstream docker.io: down"), "{readiness}");

    // While down, nothing is asked: cached answers come at once.
    let asked = upstream.request_count();
    for _ in 0..5 {
        assert_eq!(mirror.get("/v2/library/app/manifests/1.0").await.status(), StatusCode::OK);
    }
    let missing = mirror.get("/v2/library/app/manifests/other").await;
    assert_eq!(missing.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.request_count(), asked, "a down upstream is not asked");

    // Back up: after the backoff (seconds), the next request probes and revalidation resumes.
    down.store(false, Ordering::SeqCst);
    let mut revalidated = false;
    for _ in 0..300 {
        mirror.get("/v2/library/app/manifests/1.0").await;
        if upstream.request_count() > asked {
            revalidated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(revalidated, "revalidation resumes once the upstream is back");
    assert_eq!(mirror.metric("regmirror_upstream_up{upstream=\"docker.io\"}"), 1.0);
}

#[tokio::test]
async fn an_unknown_tag_is_remembered_briefly() {
    let upstream = FakeUpstream::start(|_| Reply::status(StatusCode::NOT_FOUND)).await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;
    for _ in 0..5 {
        let response = mirror.get("/v2/library/app/manifests/typo").await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    assert_eq!(upstream.requests_to("/manifests/typo").len(), 1);
}

#[tokio::test]
async fn referrers_fall_back_to_the_tag_schema_and_filter_by_artifact_type() {
    let subject = sha256(b"subject manifest");
    let fallback_tag = format!("sha256-{}", subject.trim_start_matches("sha256:"));
    let index = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"artifactType":"application/vnd.dev.cosign.artifact.sig.v1+json"}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"artifactType":"application/spdx+json"}}]}}"#,
        sha256(b"sig"),
        sha256(b"sbom")
    ));
    let tag_path = format!("/manifests/{fallback_tag}");
    let upstream = FakeUpstream::start(move |seen| {
        if seen.path.ends_with(&tag_path) {
            Reply::ok(index.clone())
                .with_header("content-type", "application/vnd.oci.image.index.v1+json")
                .with_header("docker-content-digest", sha256(&index))
        } else {
            Reply::status(StatusCode::NOT_FOUND)
        }
    })
    .await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;

    let all = mirror.get(&format!("/v2/library/app/referrers/{subject}")).await;
    assert_eq!(all.status(), StatusCode::OK);
    assert_eq!(all.headers()["content-type"], "application/vnd.oci.image.index.v1+json");
    let all: serde_json::Value = all.json().await.unwrap();
    assert_eq!(all["manifests"].as_array().unwrap().len(), 2);

    let sboms = mirror.get(&format!("/v2/library/app/referrers/{subject}?artifactType=application/spdx%2Bjson")).await;
    assert_eq!(sboms.headers()["oci-filters-applied"], "artifactType");
    let sboms: serde_json::Value = sboms.json().await.unwrap();
    assert_eq!(sboms["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(sboms["manifests"][0]["artifactType"], "application/spdx+json");

    // No referrers at all: an empty index, not an error.
    let none = mirror.get(&format!("/v2/library/app/referrers/{}", sha256(b"lonely"))).await;
    assert_eq!(none.status(), StatusCode::OK);
    let none: serde_json::Value = none.json().await.unwrap();
    assert_eq!(none["manifests"], serde_json::json!([]));
    // Answers are cached like tags.
    let asked = upstream.request_count();
    mirror.get(&format!("/v2/library/app/referrers/{subject}")).await;
    assert_eq!(upstream.request_count(), asked);
}

#[tokio::test]
async fn offline_mode_serves_the_cache_and_contacts_nobody() {
    let manifest = image_manifest(3);
    let upstream = FakeUpstream::start(move |_| manifest_reply(&manifest)).await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::ZERO).await;
    assert_eq!(mirror.get("/v2/library/app/manifests/1.0").await.status(), StatusCode::OK);
    let asked = upstream.request_count();

    let dir = mirror.dir;
    let mut config = TestMirror::config(&dir, &[("docker.io", &upstream.url())]);
    config.offline = true;
    config.tag_ttl = Duration::ZERO;
    let offline = TestMirror::start_config(dir, config).await;
    assert_eq!(offline.get("/v2/library/app/manifests/1.0").await.status(), StatusCode::OK);
    assert_eq!(offline.get("/v2/library/app/manifests/2.0").await.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.request_count(), asked);
}

#[tokio::test]
async fn a_chained_mirror_forwards_its_upstream_namespace() {
    let manifest = image_manifest(4);
    let parent = FakeUpstream::start(move |_| manifest_reply(&manifest)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = TestMirror::config(&dir, &[("ghcr.io", &parent.url())]);
    config.upstreams[0].upstream_ns = Some("ghcr.io".into());
    let mirror = TestMirror::start_config(dir, config).await;
    assert_eq!(mirror.get("/v2/org/tool/manifests/v1?ns=ghcr.io").await.status(), StatusCode::OK);
    let seen = parent.requests_to("/v2/org/tool/manifests/v1");
    assert_eq!(seen[0].query.as_deref(), Some("ns=ghcr.io"));
}

#[tokio::test]
async fn a_rate_limited_upstream_still_gets_cached_tags_served() {
    let manifest = image_manifest(5);
    let limited = Arc::new(AtomicBool::new(false));
    let limiting = limited.clone();
    let upstream = FakeUpstream::start(move |_| {
        if limiting.load(Ordering::SeqCst) {
            Reply::status(StatusCode::TOO_MANY_REQUESTS)
                .with_header("retry-after", "60")
                .with_header("ratelimit-remaining", "0;w=21600")
        } else {
            manifest_reply(&manifest).with_header("ratelimit-remaining", "99;w=21600")
        }
    })
    .await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::ZERO).await;
    assert_eq!(mirror.get("/v2/library/app/manifests/1.0").await.status(), StatusCode::OK);
    assert_eq!(mirror.metric("regmirror_upstream_ratelimit_remaining{upstream=\"docker.io\"}"), 99.0);

    limited.store(true, Ordering::SeqCst);
    assert_eq!(mirror.get("/v2/library/app/manifests/1.0").await.status(), StatusCode::OK, "cached, served");
    let uncached = mirror.get("/v2/library/app/manifests/2.0").await;
    assert_eq!(uncached.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(uncached.headers()["retry-after"], "60");
    assert_eq!(mirror.metric("regmirror_upstream_ratelimit_remaining{upstream=\"docker.io\"}"), 0.0);
}

/// Two real registries behind one mirror, one of them with token auth, and containerd
/// pulling `docker.io/…` and `ghcr.io/…` through it with a hosts.toml for each: containerd
/// names the registry with `?ns=`. The fixtures share their layers, which are stored once.
#[test]
fn containerd_pulls_from_two_real_registries_through_one_mirror() -> anyhow::Result<()> {
    use crate::harness::clients::containerd::containerd;
    use crate::harness::mirror::{Mirror, MirrorConfig, UpstreamConfig};
    use crate::harness::{process, shared, workdir::Scratch};

    let (plain, token) = (shared::plain()?, shared::token_auth()?);
    let mut config = MirrorConfig::docker_io(&plain.registry.upstream.url());
    config.upstreams.push(UpstreamConfig {
        name: "ghcr.io".into(),
        url: token.registry.upstream.url(),
        username: None,
        password: None,
        settings: Vec::new(),
    });
    let mirror = Mirror::start(config)?;

    let hosts = Scratch::new("two-registries-hosts")?;
    for registry in ["docker.io", "ghcr.io"] {
        std::fs::write(
            hosts.subdir(registry)?.join("hosts.toml"),
            format!(
                "server = \"http://{}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                crate::harness::clients::UNREACHABLE_REGISTRY,
                mirror.host()
            ),
        )?;
    }
    let image = &plain.fixtures.alpine;
    for registry in ["docker.io", "ghcr.io"] {
        let reference = format!("{registry}/{}:{}", image.repository, image.tag);
        let output = process::run_stdout(
            containerd()?
                .ctr(&format!("two-registries-{registry}"))?
                .args(["images", "pull", "--hosts-dir"])
                .arg(hosts.path())
                .args(["--snapshotter", "native", "--platform", "linux/amd64"])
                .arg(&reference),
        )?;
        anyhow::ensure!(output.contains("unpacking"), "ctr did not unpack {reference}:\n{output}");
    }
    let blobs = image.platform(crate::harness::images::ARCHITECTURE)?.blobs.len();
    let stored = crate::harness::in_process::walk_files(&mirror.cache_dir().join("blobs"));
    anyhow::ensure!(stored == blobs, "{stored} blob files for {blobs} blobs shared by both registries");
    let catalog = crate::harness::http::get(&format!("{}/v2/_catalog?ns=ghcr.io", mirror.url()))?;
    anyhow::ensure!(catalog.body.contains(&image.repository), "ghcr.io catalog: {}", catalog.body);
    let fetched =
        mirror.counter("regmirror_upstream_requests_total", &[("upstream", "ghcr.io"), ("kind", "manifest")])?;
    anyhow::ensure!(fetched >= 1.0, "nothing was asked of ghcr.io");
    Ok(())
}
