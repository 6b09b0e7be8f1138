//! A mirror served in-process (the library's `Mirror` + `server::run` on an ephemeral port),
//! for tests that script a [`super::fake_upstream`], inspect the cache directory directly, or
//! need a small disk. Faster than a process, and the metrics are read without HTTP.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use regmirror::config::{Config, UpstreamConfig};
use regmirror::mirror::Mirror;
use sha2::{Digest as _, Sha256};

use super::fake_upstream::{Reply, Seen};

/// A mirror served in-process on an ephemeral port, with its own cache directory.
pub struct TestMirror {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub mirror: Arc<Mirror>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TestMirror {
    pub async fn start(upstreams: &[(&str, &str)], tag_ttl: Duration) -> TestMirror {
        Self::launch(tempfile::tempdir().unwrap(), upstreams, tag_ttl, 1 << 30).await
    }

    pub async fn start_in(dir: tempfile::TempDir, upstreams: &[(&str, &str)], tag_ttl: Duration) -> TestMirror {
        Self::launch(dir, upstreams, tag_ttl, 1 << 30).await
    }

    /// A mirror whose cache holds at most `max_cache_size` bytes.
    pub async fn start_bounded(upstreams: &[(&str, &str)], max_cache_size: u64) -> TestMirror {
        Self::launch(tempfile::tempdir().unwrap(), upstreams, Duration::from_secs(300), max_cache_size).await
    }

    /// A bounded mirror on an existing cache directory (a restart).
    pub async fn start_in_bounded(
        dir: tempfile::TempDir,
        upstreams: &[(&str, &str)],
        max_cache_size: u64,
    ) -> TestMirror {
        Self::launch(dir, upstreams, Duration::from_secs(300), max_cache_size).await
    }

    async fn launch(
        dir: tempfile::TempDir,
        upstreams: &[(&str, &str)],
        tag_ttl: Duration,
        max_cache_size: u64,
    ) -> TestMirror {
        let mut config = Self::config(&dir, upstreams);
        config.tag_ttl = tag_ttl;
        config.max_cache_size = max_cache_size;
        Self::start_config(dir, config).await
    }

    /// The config the other constructors start from, for tests that need more knobs.
    pub fn config(dir: &tempfile::TempDir, upstreams: &[(&str, &str)]) -> Config {
        Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            cache_dir: dir.path().to_owned(),
            max_cache_size: 1 << 30,
            tag_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
            offline: false,
            tls: None,
            allow_cidrs: Vec::new(),
            htpasswd_file: None,
            max_connections: 1024,
            pinned: Vec::new(),
            upstreams: upstreams
                .iter()
                .map(|(name, url)| {
                    let mut upstream = UpstreamConfig::new(name, url.parse().unwrap());
                    upstream.max_concurrent_fetches = 8;
                    upstream.timeout = Duration::from_secs(5);
                    upstream
                })
                .collect(),
            storage: None,
            cluster: None,
        }
    }

    /// A mirror with exactly `config` (its `cache_dir` should be `dir`).
    pub async fn start_config(dir: tempfile::TempDir, config: Config) -> TestMirror {
        // The mirror's log, shown for failing tests (`RUST_LOG` picks the level).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mirror = Mirror::open(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let options = regmirror::server::ServeOptions::default();
        tokio::spawn(regmirror::server::run(listener, mirror.clone(), options, async move {
            let _ = stopped.await;
        }));
        TestMirror { url, dir, mirror, _stop: stop }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path, &[]).await
    }

    pub async fn request(&self, method: reqwest::Method, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = client().request(method, format!("{}{path}", self.url));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("the mirror answers")
    }

    /// Committed blob files, counted on disk.
    pub fn cached_blobs(&self) -> usize {
        walk_files(&self.dir.path().join("blobs"))
    }

    /// Files left in tmp/ (a finished fill leaves none).
    pub fn temp_files(&self) -> usize {
        walk_files(&self.dir.path().join("tmp"))
    }

    /// The sum of a metric's samples whose line starts with `prefix`.
    pub fn metric(&self, prefix: &str) -> f64 {
        let text = String::from_utf8(self.mirror.metrics().encode()).unwrap();
        text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }
}

pub fn walk_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.file_type().unwrap().is_dir() { walk_files(&e.path()) } else { 1 }).sum()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn blob(len: usize, seed: u64) -> (Bytes, String) {
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

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Serves `data` whole, or from the `Range: bytes=N-` offset with a 206.
pub fn blob_reply(seen: &Seen, data: &Bytes) -> Reply {
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

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

pub fn manifest_reply(body: &Bytes) -> Reply {
    Reply::ok(body.clone()).with_header("content-type", OCI_MANIFEST).with_header("docker-content-digest", sha256(body))
}

/// Reads a whole body; `Err` if the transfer broke.
pub async fn read_body(response: reqwest::Response) -> Result<Bytes, reqwest::Error> {
    response.bytes().await
}

/// A blob download as a client sees it: `Err` for an error status or a broken transfer.
pub async fn download(mirror: &TestMirror, path: &str) -> Result<Bytes, String> {
    let response = mirror.get(path).await;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    response.bytes().await.map_err(|e| e.to_string())
}

/// Sends a request line as written, without the URL normalisation HTTP clients apply.
pub async fn raw_status(mirror: &TestMirror, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(mirror.url.trim_start_matches("http://")).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer.split(' ').nth(1).unwrap().parse().unwrap()
}

pub async fn oci_error_code(response: reqwest::Response) -> String {
    let json: serde_json::Value = response.json().await.expect("an OCI error body");
    json["errors"][0]["code"].as_str().expect("an error code").to_owned()
}

/// A tmpfs mounted for one test, unmounted on drop. Needs root, as the suite does.
pub struct SmallDisk {
    pub dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(size: &str) -> SmallDisk {
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
