//! Faults only a hand-written upstream can produce, against an in-process mirror: wrong bytes
//! for a digest, downloads cut mid-blob, slow fills shared by many readers, a dead or
//! rate-limiting upstream, hostile requests. The real registry covers everything else.

mod fake_upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;
use regmirror::config::{Config, UpstreamConfig};
use regmirror::mirror::Mirror;
use sha2::{Digest as _, Sha256};

use fake_upstream::{FakeUpstream, Reply, Seen};

/// A mirror served in-process on an ephemeral port, with its own cache directory.
struct TestMirror {
    url: String,
    dir: tempfile::TempDir,
    mirror: Arc<Mirror>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TestMirror {
    async fn start(upstreams: &[(&str, &str)], tag_ttl: Duration) -> TestMirror {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, upstreams, tag_ttl).await
    }

    async fn start_in(dir: tempfile::TempDir, upstreams: &[(&str, &str)], tag_ttl: Duration) -> TestMirror {
        // The mirror's log, shown for failing tests (`RUST_LOG` picks the level).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            cache_dir: dir.path().to_owned(),
            max_cache_size: 1 << 30,
            tag_ttl,
            upstreams: upstreams
                .iter()
                .map(|(name, url)| UpstreamConfig {
                    name: name.to_string(),
                    url: url.parse().unwrap(),
                    credentials: None,
                    repository_prefix: None,
                    max_concurrent_fetches: 8,
                    timeout: Duration::from_secs(5),
                })
                .collect(),
        };
        let mirror = Mirror::open(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(regmirror::server::run(listener, mirror.clone(), async move {
            let _ = stopped.await;
        }));
        TestMirror { url, dir, mirror, _stop: stop }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path, &[]).await
    }

    async fn request(&self, method: reqwest::Method, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = client().request(method, format!("{}{path}", self.url));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("the mirror answers")
    }

    /// Committed blob files, counted on disk.
    fn cached_blobs(&self) -> usize {
        walk_files(&self.dir.path().join("blobs"))
    }

    /// Files left in tmp/ (a finished fill leaves none).
    fn temp_files(&self) -> usize {
        walk_files(&self.dir.path().join("tmp"))
    }

    /// The sum of a metric's samples whose line starts with `prefix`.
    fn metric(&self, prefix: &str) -> f64 {
        let text = String::from_utf8(self.mirror.metrics().encode()).unwrap();
        text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }
}

fn walk_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.file_type().unwrap().is_dir() { walk_files(&e.path()) } else { 1 }).sum()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn blob(len: usize, seed: u64) -> (Bytes, String) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let digest = sha256(&data);
    (Bytes::from(data), digest)
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Serves `data` whole, or from the `Range: bytes=N-` offset with a 206.
fn blob_reply(seen: &Seen, data: &Bytes) -> Reply {
    let start = seen.header("range").and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse::<usize>().ok());
    match start {
        Some(start) => Reply::Full {
            status: StatusCode::PARTIAL_CONTENT,
            headers: vec![("content-range", format!("bytes {start}-{}/{}", data.len() - 1, data.len()))],
            body: data.slice(start..),
        },
        None => Reply::ok(data.clone()),
    }
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn manifest_reply(body: &Bytes) -> Reply {
    Reply::ok(body.clone()).with_header("content-type", OCI_MANIFEST).with_header("docker-content-digest", sha256(body))
}

/// Reads a whole body; `Err` if the transfer broke.
async fn read_body(response: reqwest::Response) -> Result<Bytes, reqwest::Error> {
    response.bytes().await
}

/// A blob download as a client sees it: `Err` for an error status or a broken transfer.
async fn download(mirror: &TestMirror, path: &str) -> Result<Bytes, String> {
    let response = mirror.get(path).await;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    response.bytes().await.map_err(|e| e.to_string())
}

/// Sends a request line as written, without the URL normalisation HTTP clients apply.
async fn raw_status(mirror: &TestMirror, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(mirror.url.trim_start_matches("http://")).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer.split(' ').nth(1).unwrap().parse().unwrap()
}

async fn oci_error_code(response: reqwest::Response) -> String {
    let json: serde_json::Value = response.json().await.expect("an OCI error body");
    json["errors"][0]["code"].as_str().expect("an error code").to_owned()
}

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
    assert_eq!(missing.status(), StatusCode::BAD_GATEWAY);
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

/// A tmpfs mounted for one test, unmounted on drop. Needs root, as the suite does.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount(8) from util-linux is needed: apt-get install -y mount");
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
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
