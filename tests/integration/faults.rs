//! Faults only a hand-written upstream can produce, against an in-process mirror: wrong bytes
//! for a digest, downloads cut mid-blob, slow fills shared by many readers, a dead or
//! rate-limiting upstream, hostile requests. The real registry covers everything else.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;

use crate::harness::fake_upstream::{FakeUpstream, Reply};
use crate::harness::in_process::*;

#[tokio::test]
async fn a_blob_with_wrong_bytes_is_refused_and_never_cached() {
    let (_, digest) = blob(300_000, 1);
    let (wrong, _) = blob(300_000, 2);
    let upstream = FakeUpstream::start(move |_| Reply::ok(wrong.clone())).await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;

    let path = format!("/v2/library/app/blobs/{digest}");
    let response = mirror.get(&path).await;
    assert_eq!(response.status(), StatusCode::OK, "headers go out before the digest is known");
    assert!(read_body(response).await.is_err(), "the client must see a broken download");

    assert_eq!(mirror.cached_blobs(), 0);
    assert_eq!(mirror.metric("regmirror_digest_mismatches_total"), 1.0);
    // The failed fill is forgotten: the next request asks the upstream again.
    assert!(read_body(mirror.get(&path).await).await.is_err());
    assert_eq!(upstream.requests_to(&digest).len(), 2);
    assert_eq!(mirror.cached_blobs(), 0);
    assert_eq!(mirror.temp_files(), 0);
}

#[tokio::test]
async fn a_cut_download_resumes_with_a_range_request_and_verifies() {
    let (data, digest) = blob(2_000_000, 3);
    let served = data.clone();
    let upstream = FakeUpstream::start(move |seen| {
        if seen.header("range").is_some() {
            blob_reply(seen, &served)
        } else {
            Reply::Cut { headers: vec![], length: served.len() as u64, sent: served.slice(..700_000) }
        }
    })
    .await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;

    let body = read_body(mirror.get(&format!("/v2/library/app/blobs/{digest}")).await).await.unwrap();
    assert_eq!(body, data);
    let requests = upstream.requests_to(&digest);
    assert_eq!(requests.len(), 2);
    let resumed_at: u64 =
        requests[1].header("range").unwrap().trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(resumed_at > 0, "resumed from where the cut left off, not from 0");
    assert_eq!(mirror.cached_blobs(), 1);
}

#[tokio::test]
async fn a_cut_download_that_cannot_resume_fails_every_reader_and_the_next_request_starts_afresh() {
    let (data, digest) = blob(1_000_000, 4);
    let upstream = FakeUpstream::start(move |_| Reply::Cut {
        headers: vec![],
        length: data.len() as u64,
        sent: data.slice(..100_000),
    })
    .await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;

    let path = format!("/v2/library/app/blobs/{digest}");
    let readers = (0..4).map(|_| download(&mirror, &path));
    for result in futures_util::future::join_all(readers).await {
        assert!(result.is_err(), "every reader sees the failure");
    }
    assert_eq!(mirror.cached_blobs(), 0);
    assert_eq!(mirror.temp_files(), 0);
    let before = upstream.requests_to(&digest).len();
    assert!(download(&mirror, &path).await.is_err());
    assert!(upstream.requests_to(&digest).len() > before, "a fresh fill after the failed one");
}

#[tokio::test]
async fn concurrent_readers_share_one_upstream_download_and_survive_a_quitter() {
    let (data, digest) = blob(4_000_000, 5);
    let served = data.clone();
    let upstream = FakeUpstream::start(move |_| Reply::Slow {
        body: served.clone(),
        chunk: 256 * 1024,
        delay: Duration::from_millis(20),
    })
    .await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;
    let path = format!("/v2/library/app/blobs/{digest}");

    // One reader quits after its first chunk, while the others keep reading.
    let quitter = async {
        let mut stream = mirror.get(&path).await.bytes_stream();
        stream.next().await.unwrap().unwrap();
    };
    let readers = futures_util::future::join_all((0..8).map(|_| async { read_body(mirror.get(&path).await).await }));
    let (results, ()) = tokio::join!(readers, quitter);
    for body in results {
        assert_eq!(body.unwrap(), data);
    }
    assert_eq!(upstream.requests_to(&digest).len(), 1, "one upstream download for nine readers");
    assert_eq!(mirror.cached_blobs(), 1);
    // And the next reader is served from the cache.
    assert_eq!(read_body(mirror.get(&path).await).await.unwrap(), data);
    assert_eq!(upstream.requests_to(&digest).len(), 1);
}

#[tokio::test]
async fn ranges_on_cold_and_cached_blobs_are_206_and_byte_exact() {
    let (data, digest) = blob(1_500_000, 6);
    let served = data.clone();
    let upstream = FakeUpstream::start(move |_| Reply::Slow {
        body: served.clone(),
        chunk: 100_000,
        delay: Duration::from_millis(5),
    })
    .await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;
    let path = format!("/v2/library/app/blobs/{digest}");
    let len = data.len();

    for round in ["cold", "cached"] {
        for (range, start, end) in [
            (format!("bytes={}-", len - 1000), len - 1000, len),
            ("bytes=10-19".into(), 10, 20),
            ("bytes=-5".into(), len - 5, len),
        ] {
            let response = mirror.request(reqwest::Method::GET, &path, &[("range", &range)]).await;
            assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT, "{round} {range}");
            let content_range = response.headers()["content-range"].to_str().unwrap().to_owned();
            assert_eq!(content_range, format!("bytes {start}-{}/{len}", end - 1), "{round} {range}");
            assert_eq!(read_body(response).await.unwrap(), data.slice(start..end), "{round} {range}");
        }
    }
    let response = mirror.request(reqwest::Method::GET, &path, &[("range", &format!("bytes={len}-"))]).await;
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(response.headers()["content-range"], format!("bytes */{len}").as_str());
    assert_eq!(upstream.requests_to(&digest).len(), 1);
}

#[tokio::test]
async fn cached_tags_and_digests_are_served_when_the_upstream_is_down() {
    let manifest =
        Bytes::from(format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{}},"layers":[]}}"#));
    let digest = sha256(&manifest);
    let (layer, layer_digest) = blob(100_000, 7);
    let down = Arc::new(AtomicBool::new(false));
    let is_down = down.clone();
    let upstream = FakeUpstream::start(move |seen| {
        if is_down.load(Ordering::SeqCst) {
            Reply::status(StatusCode::SERVICE_UNAVAILABLE)
        } else if seen.path.contains("/manifests/") {
            manifest_reply(&manifest)
        } else {
            Reply::ok(layer.clone())
        }
    })
    .await;
    // A zero TTL: every tag request revalidates, so the stale path is taken.
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::ZERO).await;
    assert_eq!(mirror.get("/v2/library/app/manifests/1.0").await.status(), StatusCode::OK);
    read_body(mirror.get(&format!("/v2/library/app/blobs/{layer_digest}")).await).await.unwrap();

    down.store(true, Ordering::SeqCst);
    let stale = mirror.get("/v2/library/app/manifests/1.0").await;
    assert_eq!(stale.status(), StatusCode::OK);
    assert_eq!(stale.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(mirror.get(&format!("/v2/library/app/manifests/{digest}")).await.status(), StatusCode::OK);
    assert_eq!(mirror.get(&format!("/v2/library/app/blobs/{layer_digest}")).await.status(), StatusCode::OK);
    // What is not cached reports the upstream's trouble.
    let missing = mirror.get("/v2/library/app/manifests/2.0").await;
    assert!(matches!(missing.status().as_u16(), 502 | 503), "{}", missing.status());
    assert_eq!(oci_error_code(missing).await, "UNAVAILABLE");

    // With the upstream gone entirely, and the mirror restarted on the same cache.
    let dir = mirror.dir;
    let url = upstream.url();
    drop(upstream);
    let restarted = TestMirror::start_in(dir, &[("docker.io", &url)], Duration::ZERO).await;
    assert_eq!(restarted.get("/v2/library/app/manifests/1.0").await.status(), StatusCode::OK);
    assert_eq!(
        restarted.get("/v2/app/manifests/1.0").await.status(),
        StatusCode::OK,
        "library/ is implied on docker.io"
    );
    let body = read_body(restarted.get(&format!("/v2/library/app/blobs/{layer_digest}")).await).await.unwrap();
    assert_eq!(sha256(&body), layer_digest);
}

#[tokio::test]
async fn a_manifest_with_the_wrong_digest_is_refused() {
    let manifest = Bytes::from_static(br#"{"schemaVersion":2,"config":{},"layers":[]}"#);
    let upstream = FakeUpstream::start(move |_| manifest_reply(&manifest)).await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;
    let other = sha256(b"something else");
    let response = mirror.get(&format!("/v2/library/app/manifests/{other}")).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(oci_error_code(response).await, "MANIFEST_INVALID");
    assert_eq!(mirror.metric("regmirror_digest_mismatches_total"), 1.0);
    assert_eq!(walk_files(&mirror.dir.path().join("manifests")), 0);
}

#[tokio::test]
async fn oversized_manifests_are_refused() {
    let huge = Bytes::from(format!(r#"{{"schemaVersion":2,"pad":"{}"}}"#, "x".repeat(5 << 20)));
    let upstream = FakeUpstream::start(move |_| manifest_reply(&huge)).await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;
    let response = mirror.get("/v2/library/app/manifests/big").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(oci_error_code(response).await, "MANIFEST_INVALID");
}

#[tokio::test]
async fn a_rate_limited_upstream_passes_429_with_retry_after() {
    let upstream = FakeUpstream::start(|_| {
        Reply::status(StatusCode::TOO_MANY_REQUESTS)
            .with_header("retry-after", "42")
            .with_header("ratelimit-remaining", "0;w=21600")
    })
    .await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;
    let response = mirror.get("/v2/library/app/manifests/1.0").await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "42");
    assert_eq!(oci_error_code(response).await, "TOOMANYREQUESTS");
    assert_eq!(mirror.metric("regmirror_upstream_ratelimit_remaining{upstream=\"docker.io\"}"), 0.0);
}

#[tokio::test]
async fn unknown_upstreams_are_refused_without_contacting_anyone() {
    let upstream = FakeUpstream::start(|_| Reply::status(StatusCode::NOT_FOUND)).await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;
    for ns in ["evil.example.com", "127.0.0.1:22", "docker.io%2F..%2F"] {
        let response = mirror.get(&format!("/v2/library/app/manifests/1.0?ns={ns}")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{ns}");
        assert_eq!(oci_error_code(response).await, "NAME_UNKNOWN");
    }
    assert_eq!(upstream.request_count(), 0);
    // The configured name works, as containerd sends it.
    let response = mirror.get("/v2/library/app/manifests/1.0?ns=docker.io").await;
    assert_eq!(oci_error_code(response).await, "MANIFEST_UNKNOWN");
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn hostile_requests_get_oci_errors_and_touch_nothing() {
    let upstream = FakeUpstream::start(|_| Reply::status(StatusCode::NOT_FOUND)).await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;
    let cases = [
        (reqwest::Method::PUT, "/v2/library/app/manifests/1.0", StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        (reqwest::Method::DELETE, "/v2/library/app/manifests/1.0", StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        (reqwest::Method::POST, "/v2/library/app/blobs/uploads/", StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        (reqwest::Method::GET, "/v2/a/..%2f..%2fetc/manifests/x", StatusCode::BAD_REQUEST, "NAME_INVALID"),
        (reqwest::Method::GET, "/v2/library/app/blobs/sha256:..%2f..%2fx", StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        (reqwest::Method::GET, "/v2/library/app/manifests/bad~tag", StatusCode::BAD_REQUEST, "TAG_INVALID"),
        (reqwest::Method::GET, "/v2/nothing-here", StatusCode::NOT_FOUND, "NOT_FOUND"),
    ];
    for (method, path, status, code) in cases {
        let response = mirror.request(method.clone(), path, &[]).await;
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(oci_error_code(response).await, code, "{method} {path}");
    }
    for dots in ["/v2/../../etc/passwd/manifests/x", "/v2/a/../../../b/blobs/sha256:00", "/v2/a/./b/manifests/x"] {
        assert_eq!(raw_status(&mirror, dots).await, 400, "{dots}");
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn blob_redirects_never_carry_the_upstream_token_and_tokens_are_cached() {
    let (data, digest) = blob(200_000, 8);
    let served = data.clone();
    let cdn = FakeUpstream::start(move |_| Reply::ok(served.clone())).await;
    let cdn_url = cdn.url();
    let registry_url = Arc::new(std::sync::OnceLock::<String>::new());
    let realm = registry_url.clone();
    let upstream = FakeUpstream::start(move |seen| {
        if seen.path == "/token" {
            return Reply::ok(r#"{"token":"secret-token","expires_in":300}"#);
        }
        if seen.header("authorization") != Some("Bearer secret-token") {
            let challenge = format!(
                r#"Bearer realm="{}/token",service="fake",scope="repository:library/app:pull""#,
                realm.get().unwrap()
            );
            return Reply::status(StatusCode::UNAUTHORIZED).with_header("www-authenticate", challenge);
        }
        Reply::Full {
            status: StatusCode::TEMPORARY_REDIRECT,
            headers: vec![("location", format!("{cdn_url}/layer?sig=1"))],
            body: Bytes::new(),
        }
    })
    .await;
    registry_url.set(upstream.url()).unwrap();
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;

    let body = read_body(mirror.get(&format!("/v2/library/app/blobs/{digest}")).await).await.unwrap();
    assert_eq!(body, data);
    let (_, second) = blob(1000, 9);
    let _ = mirror.get(&format!("/v2/library/app/blobs/{second}")).await;
    let cdn_requests = cdn.requests_to("/layer");
    assert_eq!(cdn_requests.len(), 2);
    assert!(cdn_requests.iter().all(|r| r.header("authorization").is_none()), "no token to the redirect target");
    assert_eq!(upstream.requests_to("/token").len(), 1, "the token is cached for the scope");
}

#[tokio::test]
async fn head_on_a_cold_blob_asks_the_upstream_without_downloading() {
    let (data, digest) = blob(50_000, 10);
    let served = data.clone();
    let upstream = FakeUpstream::start(move |_| Reply::ok(served.clone())).await;
    let mirror = TestMirror::start(&[("docker.io", &upstream.url())], Duration::from_secs(60)).await;
    let response = mirror.request(reqwest::Method::HEAD, &format!("/v2/library/app/blobs/{digest}"), &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-length"], data.len().to_string().as_str());
    assert_eq!(response.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(upstream.requests_to(&digest)[0].method, "HEAD");
    assert_eq!(mirror.cached_blobs(), 0);
}

#[tokio::test]
async fn a_full_disk_streams_through_uncached_and_keeps_nothing_partial() {
    let disk = SmallDisk::mount("4m");
    let cache = disk.dir.path().join("cache");
    let (data, digest) = blob(6_000_000, 11);
    let served = data.clone();
    let upstream = FakeUpstream::start(move |_| Reply::Slow {
        body: served.clone(),
        chunk: 512 * 1024,
        delay: Duration::from_millis(2),
    })
    .await;
    std::fs::create_dir_all(&cache).unwrap();
    let dir = tempfile::TempDir::new_in(&cache).unwrap();
    let mirror = TestMirror::start_in(dir, &[("docker.io", &upstream.url())], Duration::from_secs(60)).await;

    let path = format!("/v2/library/app/blobs/{digest}");
    let (first, second) = tokio::join!(download(&mirror, &path), download(&mirror, &path));
    assert_eq!(first.unwrap(), data, "the client gets its bytes although the disk is full");
    assert_eq!(second.unwrap(), data);
    assert!(mirror.metric("regmirror_cache_store_failures_total") >= 1.0);
    assert_eq!(mirror.cached_blobs(), 0, "nothing partial is kept");
    assert_eq!(mirror.temp_files(), 0);
    assert_eq!(upstream.requests_to(&digest).len(), 1);
}
