//! A reverse proxy in front of the real upstream registry that behaves like
//! Docker Hub's rate limiting, so the mirror has a `ratelimit-remaining`
//! header to turn into `regmirror_upstream_ratelimit_remaining`.
//!
//! The distribution registry sends no such header, and the dashboard's
//! rate-limit panel and the rate-limit alert need the series. Every answer
//! carries `ratelimit-remaining: N;w=21600`, and every manifest GET uses up
//! one pull, as on Docker Hub. Requests for [`BROKEN_REPOSITORY`] are
//! answered 503 without reaching the registry, so that the upstream-error
//! series exist as well. Everything else passes through unchanged, streamed.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

/// The repository whose requests the proxy fails with 503.
pub const BROKEN_REPOSITORY: &str = "library/broken";

/// Docker Hub's window: six hours.
const WINDOW: &str = "w=21600";

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// The proxy, on its own runtime; stops when dropped.
pub struct RateLimitedUpstream {
    url: String,
    remaining: Arc<AtomicI64>,
    runtime: Option<Runtime>,
}

struct State {
    upstream: String,
    client: reqwest::Client,
    remaining: Arc<AtomicI64>,
}

impl RateLimitedUpstream {
    /// Proxies to `upstream_url` (`http://127.0.0.1:PORT`), starting with
    /// `limit` pulls left.
    pub fn start(upstream_url: &str, limit: i64) -> Result<RateLimitedUpstream> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rate-limited-upstream")
            .enable_all()
            .build()
            .context("starting the proxy's runtime")?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).context("binding the proxy")?;
        let url = format!("http://{}", listener.local_addr()?);
        let remaining = Arc::new(AtomicI64::new(limit));
        let state = Arc::new(State {
            upstream: upstream_url.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build()?,
            remaining: remaining.clone(),
        });
        runtime.spawn(serve(listener, state));
        Ok(RateLimitedUpstream { url, remaining, runtime: Some(runtime) })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The pulls left, as the last answer told the mirror.
    pub fn remaining(&self) -> i64 {
        self.remaining.load(Ordering::SeqCst)
    }
}

impl Drop for RateLimitedUpstream {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        let state = state.clone();
        let service = service_fn(move |request| forward(state.clone(), request));
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn forward(state: Arc<State>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path();
    if path.starts_with(&format!("/v2/{BROKEN_REPOSITORY}/")) {
        return Ok(with_rate_limit(error(StatusCode::SERVICE_UNAVAILABLE), state.remaining.load(Ordering::SeqCst)));
    }
    let remaining = if request.method() == http::Method::GET && path.contains("/manifests/") {
        let previous = state.remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some((n - 1).max(0)));
        (previous.unwrap_or_default() - 1).max(0)
    } else {
        state.remaining.load(Ordering::SeqCst)
    };

    let target = format!("{}{}", state.upstream, request.uri().path_and_query().map_or("/", |p| p.as_str()));
    let mut headers = request.headers().clone();
    headers.remove(header::HOST);
    let answer = state.client.request(request.method().clone(), target).headers(headers).send().await;
    let response = match answer {
        Ok(answer) => {
            let (status, headers) = (answer.status(), answer.headers().clone());
            let body = answer.bytes_stream().map_ok(Frame::data).map_err(io::Error::other);
            let mut response = Response::new(StreamBody::new(body).boxed_unsync());
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response.headers_mut().remove(header::TRANSFER_ENCODING);
            response.headers_mut().remove(header::CONNECTION);
            response
        }
        Err(_) => error(StatusCode::BAD_GATEWAY),
    };
    Ok(with_rate_limit(response, remaining))
}

fn with_rate_limit(mut response: Response<Body>, remaining: i64) -> Response<Body> {
    let value = HeaderValue::from_str(&format!("{remaining};{WINDOW}")).expect("digits and `;w=` are a valid header");
    response.headers_mut().insert("ratelimit-remaining", value);
    response
}

fn error(status: StatusCode) -> Response<Body> {
    let body =
        Bytes::from_static(br#"{"errors":[{"code":"UNAVAILABLE","message":"the test proxy fails this repository"}]}"#);
    let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
