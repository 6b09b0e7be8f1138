//! The client side: one [`Upstream`] per configured registry, speaking the distribution API
//! with authentication, retries, redirects and metrics.
//!
//! Only configured upstreams are ever contacted on a client's behalf. The two exceptions are
//! chosen by the upstream itself, never by a client: the token realm named in its
//! `WWW-Authenticate` challenge, and blob redirects (Docker Hub serves layers from a CDN).
//! Redirect targets never receive the upstream's `Authorization` header.

pub mod auth;
pub mod bandwidth;
pub mod health;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use url::Url;

use crate::config::UpstreamConfig;
use crate::metrics::{Kind, Metrics};
use crate::reference::{Digest, RepoName};
use auth::{Challenge, TokenCache, TokenResponse};
use bandwidth::Bandwidth;
use health::Health;

/// What went wrong talking to an upstream. Knows nothing of how a client is answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream} unreachable: {source}")]
    Unreachable {
        upstream: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("upstream {upstream} answered {status}")]
    Status { upstream: String, status: StatusCode, retry_after: Option<HeaderValue> },
    #[error("authentication with upstream {upstream} failed: {reason}")]
    Auth { upstream: String, reason: String },
    #[error("upstream {upstream} sent a bad answer: {reason}")]
    Invalid { upstream: String, reason: String },
    /// Not asked at all: offline mode, or marked down after repeated failures.
    #[error("upstream {upstream} is not contacted: {reason}")]
    Unavailable { upstream: String, reason: String },
}

impl UpstreamError {
    /// Whether asking again may help: network trouble and the 5xx answers of a struggling
    /// server, not a 404 or a refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. } => true,
            UpstreamError::Status { status, .. } => status.is_server_error(),
            _ => false,
        }
    }
}

/// The Accept list sent for manifests when the client's own list is not needed: every
/// manifest kind a current client can use, indexes first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Idempotent requests are retried this many times on transient failures.
const RETRIES: u32 = 2;
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
const MAX_REDIRECTS: usize = 5;

pub struct Upstream {
    config: UpstreamConfig,
    http: reqwest::Client,
    tokens: TokenCache,
    /// Set once the upstream challenged with `Basic`: credentials are then sent up front.
    wants_basic: AtomicBool,
    metrics: Arc<Metrics>,
    /// Bounds concurrent blob downloads toward this upstream.
    fetch_permits: Arc<Semaphore>,
    health: Health,
    bandwidth: Option<Bandwidth>,
    /// Offline mode: never contacted.
    offline: bool,
}

impl Upstream {
    pub fn new(config: UpstreamConfig, metrics: Arc<Metrics>, offline: bool) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.timeout)
            .read_timeout(config.timeout)
            .danger_accept_invalid_certs(config.insecure);
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| ClientError::CaFile(path.clone(), e.to_string()))?;
            let bundle = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ClientError::CaFile(path.clone(), e.to_string()))?;
            for certificate in bundle {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder.build().map_err(ClientError::Build)?;
        metrics.register_upstream(&config.name);
        metrics.upstream_up.with_label_values(&[config.name.as_str()]).set(1);
        Ok(Upstream {
            http,
            tokens: TokenCache::default(),
            wants_basic: AtomicBool::new(false),
            metrics,
            fetch_permits: Arc::new(Semaphore::new(config.max_concurrent_fetches)),
            health: Health::default(),
            bandwidth: config.max_bandwidth.map(Bandwidth::new),
            offline,
            config,
        })
    }

    /// `Some(remaining)` while the upstream is marked down after repeated failures.
    pub fn down_for(&self) -> Option<Duration> {
        self.health.down_for()
    }

    /// Waits for this upstream's bandwidth cap to allow `bytes` more.
    pub async fn throttle(&self, bytes: u64) {
        if let Some(bandwidth) = &self.bandwidth {
            bandwidth.take(bytes).await;
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Waits for a slot to download a blob from this upstream.
    pub async fn fetch_permit(&self) -> OwnedSemaphorePermit {
        self.fetch_permits.clone().acquire_owned().await.expect("the semaphore is never closed")
    }

    /// The repository name as the upstream knows it: the configured prefix and, on Docker
    /// Hub, `library/` for single-component names.
    pub fn remote_name(&self, repo: &RepoName) -> RepoName {
        let mut name = repo.clone();
        if self.config.is_docker_hub() && name.is_single_component() {
            name = name.with_prefix("library").unwrap_or(name);
        }
        if let Some(prefix) = &self.config.repository_prefix {
            name = name.with_prefix(prefix).unwrap_or(name);
        }
        name
    }

    /// `GET` or `HEAD` a manifest. `accept` is passed on verbatim.
    pub async fn manifest(
        &self,
        method: Method,
        repo: &RepoName,
        reference: &str,
        accept: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut headers = HeaderMap::new();
        headers
            .insert(header::ACCEPT, HeaderValue::from_str(accept).unwrap_or(HeaderValue::from_static(MANIFEST_ACCEPT)));
        self.send(method, repo, &format!("manifests/{reference}"), "", headers, Kind::Manifest).await
    }

    /// `GET` a blob from byte `offset` on (a Range request when non-zero), following redirects.
    pub async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut headers = HeaderMap::new();
        if offset > 0 {
            headers.insert(header::RANGE, HeaderValue::from_str(&format!("bytes={offset}-")).expect("ascii"));
        }
        self.send(Method::GET, repo, &format!("blobs/{digest}"), "", headers, Kind::Blob).await
    }

    /// `HEAD` a blob: its size, without downloading it.
    pub async fn head_blob(&self, repo: &RepoName, digest: &Digest) -> Result<reqwest::Response, UpstreamError> {
        self.send(Method::HEAD, repo, &format!("blobs/{digest}"), "", HeaderMap::new(), Kind::Blob).await
    }

    /// `GET <name>/<suffix>?<query>` for the small JSON endpoints (tags/list, referrers).
    pub async fn get_json(
        &self,
        repo: &RepoName,
        suffix: &str,
        query: &str,
        kind: Kind,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send(Method::GET, repo, suffix, query, HeaderMap::new(), kind).await
    }

    /// Sends a request for `/v2/<remote name>/<suffix>`, retrying transient failures, and
    /// returns the final response whatever its status; [`Self::check`] turns statuses into
    /// errors where the caller wants that.
    async fn send(
        &self,
        method: Method,
        repo: &RepoName,
        suffix: &str,
        query: &str,
        headers: HeaderMap,
        kind: Kind,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.check_available()?;
        let remote = self.remote_name(repo);
        let mut url = self.config.url.join(&format!("v2/{remote}/{suffix}")).map_err(|e| self.invalid(e))?;
        if !query.is_empty() {
            url.set_query(Some(query));
        }
        if let Some(ns) = &self.config.upstream_ns {
            url.query_pairs_mut().append_pair("ns", ns);
        }
        let scope = format!("repository:{remote}:pull");
        let mut attempt = 0;
        loop {
            let result = self.send_authorized(&method, &url, &headers, &scope, kind).await;
            let transient = match &result {
                Ok(r) => matches!(r.status().as_u16(), 502..=504),
                Err(e) => e.is_transient(),
            };
            if !transient || attempt == RETRIES {
                self.record_health(&result);
                return result;
            }
            attempt += 1;
            tracing::debug!(upstream = %self.config.name, attempt, "retrying upstream request");
            tokio::time::sleep(RETRY_BACKOFF * 4u32.pow(attempt - 1)).await;
        }
    }

    /// One request with authentication: answer a 401 challenge once, then give up.
    async fn send_authorized(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        scope: &str,
        kind: Kind,
    ) -> Result<reqwest::Response, UpstreamError> {
        let authorization = self.authorization_for(scope)?;
        let response = self.send_following_redirects(method, url, headers, authorization.as_deref(), kind).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenge = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::parse_challenge);
        let authorization = match challenge {
            Some(Challenge::Bearer { realm, service, scope: challenged }) => {
                self.tokens.remove(scope);
                let (token, lifetime) =
                    self.fetch_token(&realm, service.as_deref(), challenged.as_deref().unwrap_or(scope)).await?;
                let value = format!("Bearer {token}");
                self.tokens.insert(scope, token, lifetime);
                value
            }
            Some(Challenge::Basic) if self.config.credentials.is_some() => {
                self.wants_basic.store(true, Ordering::Relaxed);
                self.basic_authorization()?.expect("credentials are configured")
            }
            _ => return Ok(response),
        };
        self.send_following_redirects(method, url, headers, Some(&authorization), kind).await
    }

    /// The Authorization header to send before any challenge: a cached token for the scope,
    /// or Basic credentials for an upstream known to want them.
    fn authorization_for(&self, scope: &str) -> Result<Option<String>, UpstreamError> {
        if let Some(token) = self.tokens.get(scope) {
            return Ok(Some(format!("Bearer {token}")));
        }
        if self.wants_basic.load(Ordering::Relaxed) {
            return self.basic_authorization();
        }
        Ok(None)
    }

    fn basic_authorization(&self) -> Result<Option<String>, UpstreamError> {
        let Some(credentials) = &self.config.credentials else { return Ok(None) };
        let password = credentials.password().map_err(|e| UpstreamError::Auth {
            upstream: self.config.name.clone(),
            reason: format!("cannot read the password: {e}"),
        })?;
        Ok(Some(auth::basic_header(&credentials.username, &password)))
    }

    /// Asks a token realm for a Bearer token, with the configured credentials if any.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(String, Duration), UpstreamError> {
        let auth_error = |reason: String| UpstreamError::Auth { upstream: self.config.name.clone(), reason };
        let mut url = Url::parse(realm).map_err(|e| auth_error(format!("bad token realm: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(auth_error("token realm is not http(s)".into()));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
        }
        let mut request = self.http.get(url);
        if let Some(basic) = self.basic_authorization()? {
            request = request.header(header::AUTHORIZATION, basic);
        }
        let response = self.timed(Kind::Token, request).await?;
        if !response.status().is_success() {
            return Err(auth_error(format!("token endpoint answered {}", response.status())));
        }
        let body = read_limited(response, 64 * 1024).await.map_err(|e| auth_error(e.to_string()))?;
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|_| auth_error("token endpoint sent no JSON".into()))?;
        parsed.into_token().ok_or_else(|| auth_error("token endpoint sent no token".into()))
    }

    /// Counts the outcome of one request (after its retries) toward the upstream's health:
    /// an answer below 500 is health, no answer or a 5xx is a failure.
    fn record_health(&self, result: &Result<reqwest::Response, UpstreamError>) {
        let answered = match result {
            Ok(r) => !r.status().is_server_error(),
            Err(e) => !e.is_transient(),
        };
        let name = self.config.name.as_str();
        if self.health.record(answered) {
            tracing::warn!(upstream = %name, "upstream marked down after repeated failures");
        }
        let up = self.health.down_for().is_none();
        self.metrics.upstream_up.with_label_values(&[name]).set(i64::from(up));
    }

    /// Fails at once in offline mode or while the upstream is marked down.
    fn check_available(&self) -> Result<(), UpstreamError> {
        let reason = if self.offline {
            "offline mode".to_owned()
        } else if let Some(remaining) = self.down_for() {
            format!("marked down after repeated failures, next try in {}s", remaining.as_secs() + 1)
        } else {
            return Ok(());
        };
        Err(UpstreamError::Unavailable { upstream: self.config.name.clone(), reason })
    }

    /// Sends one request; for blobs, follows redirects without the Authorization header.
    async fn send_following_redirects(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        authorization: Option<&str>,
        kind: Kind,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut request = self.http.request(method.clone(), url.clone()).headers(headers.clone());
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let mut response = self.timed(kind, request).await?;
        let mut current = url.clone();
        for _ in 0..MAX_REDIRECTS {
            if kind != Kind::Blob || !response.status().is_redirection() {
                return Ok(response);
            }
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| self.invalid("redirect without Location"))?;
            current = current.join(location).map_err(|e| self.invalid(format!("bad redirect: {e}")))?;
            if !matches!(current.scheme(), "http" | "https") {
                return Err(self.invalid("redirect to a non-http URL"));
            }
            let request = self.http.request(method.clone(), current.clone()).headers(headers.clone());
            response = self.timed(kind, request).await?;
        }
        Err(self.invalid("too many redirects"))
    }

    /// Sends a request, recording its status, latency and rate-limit headers.
    async fn timed(&self, kind: Kind, request: reqwest::RequestBuilder) -> Result<reqwest::Response, UpstreamError> {
        let name = &self.config.name;
        let started = Instant::now();
        let result = request.send().await;
        self.metrics.upstream_duration(name, kind).observe(started.elapsed().as_secs_f64());
        let status = match &result {
            Ok(r) => r.status().as_str().to_owned(),
            Err(_) => "error".to_owned(),
        };
        self.metrics.upstream_requests.with_label_values(&[name.as_str(), kind.as_str(), status.as_str()]).inc();
        let response = result
            .map_err(|source| UpstreamError::Unreachable { upstream: name.clone(), source: source.without_url() })?;
        if let Some(remaining) = ratelimit_remaining(response.headers()) {
            self.metrics.upstream_ratelimit_remaining.with_label_values(&[name.as_str()]).set(remaining);
        }
        Ok(response)
    }

    /// Turns a non-success status into an error.
    pub fn check(&self, response: reqwest::Response) -> Result<reqwest::Response, UpstreamError> {
        if response.status().is_success() {
            return Ok(response);
        }
        Err(UpstreamError::Status {
            upstream: self.config.name.clone(),
            status: response.status(),
            retry_after: response.headers().get(header::RETRY_AFTER).cloned(),
        })
    }

    pub fn invalid(&self, reason: impl std::fmt::Display) -> UpstreamError {
        UpstreamError::Invalid { upstream: self.config.name.clone(), reason: reason.to_string() }
    }

    /// Counts body bytes received from this upstream.
    pub fn count_bytes(&self, n: u64) {
        self.metrics.upstream_bytes.with_label_values(&[self.config.name.as_str()]).inc_by(n);
    }
}

/// Docker Hub's `ratelimit-remaining: 76;w=21600`.
fn ratelimit_remaining(headers: &HeaderMap) -> Option<i64> {
    let value = headers.get("ratelimit-remaining")?.to_str().ok()?;
    value.split(';').next()?.trim().parse().ok()
}

/// Reads a whole body of at most `limit` bytes; larger bodies are refused before and while
/// reading, so a hostile upstream cannot make us buffer without end.
pub async fn read_limited(response: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut body = BytesMut::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Read(e.without_url()))?;
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Why an upstream's HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot use CA file {0}: {1}")]
    CaFile(std::path::PathBuf, String),
    #[error(transparent)]
    Build(reqwest::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the body failed: {0}")]
    Read(reqwest::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str, prefix: Option<&str>) -> Upstream {
        let mut config = UpstreamConfig::new(name, Url::parse("http://127.0.0.1:1").unwrap());
        config.repository_prefix = prefix.map(str::to_owned);
        Upstream::new(config, Arc::new(Metrics::new()), false).unwrap()
    }

    #[test]
    fn docker_hub_names_get_library_and_prefixes_apply() {
        let alpine = RepoName::parse("alpine").unwrap();
        let org = RepoName::parse("org/tool").unwrap();
        assert_eq!(upstream("docker.io", None).remote_name(&alpine).as_str(), "library/alpine");
        assert_eq!(upstream("docker.io", None).remote_name(&org).as_str(), "org/tool");
        assert_eq!(upstream("ghcr.io", None).remote_name(&alpine).as_str(), "alpine");
        assert_eq!(upstream("harbor.local", Some("proxy")).remote_name(&org).as_str(), "proxy/org/tool");
        assert_eq!(upstream("docker.io", Some("hub")).remote_name(&alpine).as_str(), "hub/library/alpine");
    }

    #[test]
    fn ratelimit_header_is_parsed() {
        let mut h = HeaderMap::new();
        h.insert("ratelimit-remaining", HeaderValue::from_static("76;w=21600"));
        assert_eq!(ratelimit_remaining(&h), Some(76));
        h.insert("ratelimit-remaining", HeaderValue::from_static("junk"));
        assert_eq!(ratelimit_remaining(&h), None);
    }
}
