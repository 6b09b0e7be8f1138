//! HTTP framing: a request in, a response out. Routes the request, calls the mirror, and
//! writes the registry headers (`Docker-Content-Digest`, `Content-Type`, `Content-Length`,
//! `Content-Range`, `Docker-Distribution-Api-Version`). Also the one place that logs each
//! request and counts it in `regmirror_http_*`.

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use tokio::time::Instant;
use tracing::Instrument;

use crate::access::{Access, Refusal};
use crate::error::Error;
use crate::fetch::{BlobHandle, Origin};
use crate::metrics::{Metrics, Source};
use crate::mirror::Mirror;
use crate::range::{self, RangeRequest};
use crate::reference::Digest;
use crate::routes::{self, Route};

pub type Body = UnsyncBoxBody<Bytes, io::Error>;

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");

/// Answers one request from `peer`. Never fails: every error becomes an OCI error response.
pub async fn handle<B: hyper::body::Body>(
    mirror: Arc<Mirror>,
    access: Arc<Access>,
    peer: IpAddr,
    request: Request<B>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let span = tracing::info_span!("request", %method, path = %truncate(&path));
    async move {
        let route = routes::parse(&method, &path);
        let label = route.as_ref().map_or("unknown", Route::label);
        let response = match (route, admit(&access, peer, &request)) {
            (_, Err(refused)) => Err(refused),
            (Ok(route), Ok(())) => dispatch(&mirror, route, &request).await,
            (Err(e), Ok(())) => Err(Error::from(e)),
        };
        let mut response = response.unwrap_or_else(|error| error_response(&error));
        if path.starts_with("/v2") {
            response.headers_mut().insert("docker-distribution-api-version", API_VERSION);
        }
        let status = response.status();
        let metrics = mirror.metrics();
        metrics.http_requests.with_label_values(&[method_label(&method), label, status.as_str()]).inc();
        metrics.http_request_duration.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
        let note = response.extensions_mut().remove::<Note>().unwrap_or_default();
        let bytes: u64 =
            response.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
        let elapsed_ms = (started.elapsed().as_secs_f64() * 1e4).round() / 10.0;
        let (status, cache) = (status.as_u16(), note.cache.unwrap_or("-"));
        let upstream = note.upstream.as_deref().unwrap_or("-");
        if status >= 500 {
            tracing::warn!(status, route = label, bytes, elapsed_ms, cache, upstream, "request failed");
        } else {
            tracing::info!(status, route = label, bytes, elapsed_ms, cache, upstream, "request");
        }
        Ok(response)
    }
    .instrument(span)
    .await
}

/// What the request log line says beyond the response itself: which upstream the request was
/// for and whether the cache answered. Set by `dispatch` as a response extension.
#[derive(Clone, Default)]
struct Note {
    upstream: Option<String>,
    cache: Option<&'static str>,
}

fn noted(mut response: Response<Body>, upstream: &str, from_cache: Option<bool>) -> Response<Body> {
    let cache = from_cache.map(|hit| if hit { "hit" } else { "miss" });
    response.extensions_mut().insert(Note { upstream: Some(upstream.to_owned()), cache });
    response
}

/// The gates before any routing: the client's network, its credentials, and no request body
/// (a read-only mirror has no use for one, and an unread body only ties up the connection).
fn admit<B: hyper::body::Body>(access: &Access, peer: IpAddr, request: &Request<B>) -> Result<(), Error> {
    let open = matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics");
    let authorization = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match access.check(peer, open, authorization) {
        Err(Refusal::Network) => return Err(Error::Denied),
        Err(Refusal::Credentials) => return Err(Error::Unauthorized),
        Ok(()) => {}
    }
    let has_body = !request.body().is_end_stream() && request.body().size_hint().upper() != Some(0);
    let announced = request.headers().contains_key(header::TRANSFER_ENCODING)
        || request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() != "0");
    if has_body && announced && matches!(*request.method(), Method::GET | Method::HEAD) {
        return Err(Error::BodyNotAllowed);
    }
    Ok(())
}

async fn dispatch<B>(mirror: &Arc<Mirror>, route: Route, request: &Request<B>) -> Result<Response<Body>, Error> {
    let head = request.method() == Method::HEAD;
    let ns = query_param(request.uri().query(), "ns");
    match route {
        Route::ApiBase => Ok(json_response(StatusCode::OK, Bytes::from_static(b"{}"))),
        Route::Healthz => Ok(text_response(StatusCode::OK, "ok\n")),
        Route::Readyz => Ok(readiness(mirror)),
        Route::Metrics => {
            let mut response = Response::new(full(Bytes::from(mirror.metrics().encode())));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            Ok(response)
        }
        Route::Catalog => {
            let upstream = mirror.upstream(ns.as_deref())?;
            let repositories = paginate(mirror.catalog(upstream).await?, request.uri().query());
            let body = serde_json::json!({ "repositories": repositories });
            Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
        }
        Route::Manifest { name, reference } => {
            let (upstream, name) = mirror.route(ns.as_deref(), &name)?;
            let accept = joined_header(request, header::ACCEPT);
            let forwarded = request.headers().contains_key(crate::cluster::PEER_HEADER);
            let manifest = mirror.manifest(upstream, &name, &reference, accept.as_deref(), forwarded).await?;
            if !head {
                mirror.metrics().served(manifest.source, manifest.bytes.len() as u64);
            }
            let mut response = Response::new(if head { empty() } else { full(manifest.bytes.clone()) });
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, header_value(&manifest.media_type));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(manifest.bytes.len()));
            headers.insert("docker-content-digest", header_value(&manifest.digest.to_string()));
            headers.insert(header::ETAG, header_value(&format!("\"{}\"", manifest.digest)));
            if let (true, Some(checked_at)) = (forwarded, manifest.checked_at) {
                headers.insert(crate::cluster::CHECKED_AT_HEADER, HeaderValue::from(checked_at));
            }
            Ok(noted(response, upstream.name(), Some(manifest.source == Source::Cache)))
        }
        Route::Blob { name, digest } => {
            let (upstream, name) = mirror.route(ns.as_deref(), &name)?;
            if head {
                let size = mirror.blob_size(upstream, &name, &digest).await?;
                return Ok(noted(blob_response(StatusCode::OK, &digest, size, None, empty()), upstream.name(), None));
            }
            let forwarded = request.headers().contains_key(crate::cluster::PEER_HEADER);
            let (blob, origin) = mirror.blob(upstream, &name, &digest, forwarded).await?;
            let range = request.headers().get(header::RANGE).and_then(|v| v.to_str().ok());
            let response = serve_blob(mirror.metrics_arc(), blob, origin, &digest, range).await?;
            Ok(noted(response, upstream.name(), Some(origin == Origin::Cache)))
        }
        Route::TagsList { name } => {
            let (upstream, name) = mirror.route(ns.as_deref(), &name)?;
            let answer =
                mirror.tags_list(upstream, &name, &forwarded_query(request.uri().query(), &["n", "last"])).await?;
            Ok(json_answer(answer))
        }
        Route::Referrers { name, digest } => {
            let (upstream, name) = mirror.route(ns.as_deref(), &name)?;
            let artifact_type = query_param(request.uri().query(), "artifactType");
            Ok(json_answer(mirror.referrers(upstream, &name, &digest, artifact_type.as_deref()).await?))
        }
    }
}

/// A blob body, whole (200) or one range of it (206).
async fn serve_blob(
    metrics: Arc<Metrics>,
    mut blob: BlobHandle,
    origin: Origin,
    digest: &Digest,
    range_header: Option<&str>,
) -> Result<Response<Body>, Error> {
    let source = match origin {
        Origin::Cache => Source::Cache,
        Origin::Fill => Source::Upstream,
    };
    let Some(range_header) = range_header else {
        let size = blob.size();
        let body = counted_body(blob.stream(0, None), metrics, source);
        return Ok(
            blob_response(StatusCode::OK, digest, size.unwrap_or(0), None, body).without_length_if(size.is_none())
        );
    };
    let size = blob.wait_size().await.map_err(Error::Storage)?;
    match range::parse(Some(range_header), size) {
        RangeRequest::Full => {
            let body = counted_body(blob.stream(0, None), metrics, source);
            Ok(blob_response(StatusCode::OK, digest, size, None, body))
        }
        RangeRequest::Partial(r) => {
            let body = counted_body(blob.stream(r.start, Some(r.end)), metrics, source);
            Ok(blob_response(StatusCode::PARTIAL_CONTENT, digest, r.len(), Some(r.content_range(size)), body))
        }
        RangeRequest::Unsatisfiable => Err(Error::RangeNotSatisfiable { size }),
    }
}

fn blob_response(
    status: StatusCode,
    digest: &Digest,
    length: u64,
    content_range: Option<String>,
    body: Body,
) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert("docker-content-digest", header_value(&digest.to_string()));
    headers.insert(header::ETAG, header_value(&format!("\"{digest}\"")));
    if let Some(range) = content_range {
        headers.insert(header::CONTENT_RANGE, header_value(&range));
    }
    response
}

/// Responses whose length is unknown go out chunked.
trait WithoutLength {
    fn without_length_if(self, unknown: bool) -> Self;
}

impl WithoutLength for Response<Body> {
    fn without_length_if(mut self, unknown: bool) -> Self {
        if unknown {
            self.headers_mut().remove(header::CONTENT_LENGTH);
        }
        self
    }
}

/// Counts the bytes a body actually sent in `regmirror_bytes_served_total`.
fn counted_body(
    stream: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    metrics: Arc<Metrics>,
    source: Source,
) -> Body {
    let counted = stream.inspect_ok(move |chunk| metrics.served(source, chunk.len() as u64));
    StreamBody::new(Box::pin(counted).map_ok(Frame::data)).boxed_unsync()
}

/// `/readyz`: 503 while the cache cannot take writes; 200 otherwise, naming the upstreams
/// that are marked down (the cache still answers for them).
fn readiness(mirror: &Mirror) -> Response<Body> {
    let mut body = String::new();
    let status = if mirror.is_ready() {
        body.push_str("ready\n");
        StatusCode::OK
    } else {
        body.push_str("not ready: the cache directory is not writable\n");
        StatusCode::SERVICE_UNAVAILABLE
    };
    for (name, down_for) in mirror.upstream_health() {
        match down_for {
            Some(d) => body.push_str(&format!("upstream {name}: down, next try in {}s\n", d.as_secs() + 1)),
            None => body.push_str(&format!("upstream {name}: up\n")),
        }
    }
    // The shared tier being down degrades a replica but does not stop it: it keeps serving
    // its local tier, so it stays in the load balancer (status 200) and says so here.
    if let Some((store, down_for)) = mirror.shared_health() {
        match down_for {
            Some(d) => body.push_str(&format!(
                "shared storage {store}: down, serving the local tier only; next try in {}s\n",
                d.as_secs() + 1
            )),
            None => body.push_str(&format!("shared storage {store}: up\n")),
        }
    }
    plain_text(status, Bytes::from(body))
}

fn error_response(error: &Error) -> Response<Body> {
    let (status, headers, body) = error.to_response_parts();
    let mut response = json_response(status, body);
    for (name, value) in headers {
        response.headers_mut().insert(name, value);
    }
    response
}

fn json_answer(answer: crate::mirror::JsonAnswer) -> Response<Body> {
    let mut response = json_response(StatusCode::OK, answer.body);
    response.headers_mut().insert(header::CONTENT_TYPE, header_value(&answer.content_type));
    for (name, value) in answer.headers {
        response.headers_mut().insert(name, value);
    }
    response
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let length = body.len();
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    plain_text(status, Bytes::from_static(text.as_bytes()))
}

fn plain_text(status: StatusCode, text: Bytes) -> Response<Body> {
    let length = text.len();
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

fn empty() -> Body {
    full(Bytes::new())
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// All values of a header joined by `, ` (clients may send Accept several times).
fn joined_header<B>(request: &Request<B>, name: header::HeaderName) -> Option<String> {
    let values: Vec<&str> = request.headers().get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// The decoded value of one query parameter.
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

/// Re-encodes only the named query parameters: nothing else a client sends reaches an upstream.
fn forwarded_query(query: Option<&str>, keys: &[&str]) -> String {
    let Some(query) = query else { return String::new() };
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if keys.contains(&k.as_ref()) {
            out.append_pair(&k, &v);
        }
    }
    out.finish()
}

/// `n` and `last` pagination over a sorted list, as the distribution spec describes.
fn paginate(items: Vec<String>, query: Option<&str>) -> Vec<String> {
    let last = query_param(query, "last");
    let n = query_param(query, "n").and_then(|n| n.parse::<usize>().ok()).unwrap_or(usize::MAX);
    items.into_iter().filter(|item| last.as_ref().is_none_or(|l| item > l)).take(n).collect()
}

/// A fixed label for the method (arbitrary client methods must not become label values).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        assert_eq!(query_param(Some("ns=docker.io&x=1"), "ns").as_deref(), Some("docker.io"));
        assert_eq!(query_param(Some("ns=ghcr.io%3A443"), "ns").as_deref(), Some("ghcr.io:443"));
        assert_eq!(query_param(None, "ns"), None);
        assert_eq!(forwarded_query(Some("n=5&last=a&ns=docker.io&evil=1"), &["n", "last"]), "n=5&last=a");
    }

    #[test]
    fn pagination() {
        let items = vec!["a".to_owned(), "b".into(), "c".into()];
        assert_eq!(paginate(items.clone(), Some("n=2")), vec!["a", "b"]);
        assert_eq!(paginate(items.clone(), Some("last=a&n=1")), vec!["b"]);
        assert_eq!(paginate(items, None).len(), 3);
    }
}
