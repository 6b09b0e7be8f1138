//! A hand-written upstream for the faults the real registry cannot produce: wrong bytes for a
//! digest, a connection cut mid-blob, slow bodies, 429s, redirects to a second host. Each test
//! scripts its replies with a closure and reads back what the fake saw.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A request the fake received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How the fake answers.
pub enum Reply {
    /// A complete response.
    Full { status: StatusCode, headers: Vec<(&'static str, String)>, body: Bytes },
    /// Announces `length` bytes, sends `sent`, then drops the connection.
    Cut { headers: Vec<(&'static str, String)>, length: u64, sent: Bytes },
    /// Sends `body` in `chunk`-sized pieces with `delay` between them.
    Slow { body: Bytes, chunk: usize, delay: Duration },
}

impl Reply {
    pub fn ok(body: impl Into<Bytes>) -> Reply {
        Reply::Full { status: StatusCode::OK, headers: vec![], body: body.into() }
    }

    pub fn status(status: StatusCode) -> Reply {
        Reply::Full { status, headers: vec![], body: Bytes::from_static(b"{\"errors\":[]}") }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        match &mut self {
            Reply::Full { headers, .. } | Reply::Cut { headers, .. } => headers.push((name, value.into())),
            Reply::Slow { .. } => panic!("slow replies take no headers"),
        }
        self
    }
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

pub struct FakeUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: tokio::task::JoinHandle<()>,
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

impl FakeUpstream {
    pub async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake upstream");
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let log = seen.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (script, log) = (script.clone(), log.clone());
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let seen = Seen {
                        method: request.method().to_string(),
                        path: request.uri().path().to_owned(),
                        query: request.uri().query().map(str::to_owned),
                        headers: request.headers().clone(),
                    };
                    log.lock().unwrap().push(seen.clone());
                    let reply = script(&seen);
                    async move { Ok::<_, Infallible>(respond(reply)) }
                });
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        FakeUpstream { addr, seen, server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests seen so far whose path ends with `suffix`.
    pub fn requests_to(&self, suffix: &str) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|s| s.path.ends_with(suffix)).cloned().collect()
    }

    pub fn request_count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn respond(reply: Reply) -> Response<Body> {
    let (status, headers, body, length): (_, _, Body, _) = match reply {
        Reply::Full { status, headers, body } => {
            let length = body.len() as u64;
            let body = http_body_util::Full::new(body).map_err(|never| match never {}).boxed_unsync();
            (status, headers, body, Some(length))
        }
        Reply::Cut { headers, length, sent } => {
            let stream = futures_util::stream::iter([
                Ok(Frame::data(sent)),
                Err(std::io::Error::other("cut by the fake upstream")),
            ]);
            (StatusCode::OK, headers, StreamBody::new(stream).boxed_unsync(), Some(length))
        }
        Reply::Slow { body, chunk, delay } => {
            let length = body.len() as u64;
            let pieces: Vec<Bytes> = body.chunks(chunk).map(Bytes::copy_from_slice).collect();
            let stream = futures_util::stream::iter(pieces).then(move |piece| async move {
                tokio::time::sleep(delay).await;
                Ok(Frame::data(piece))
            });
            (StatusCode::OK, vec![], StreamBody::new(stream).boxed_unsync(), Some(length))
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let has_length = headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-length"));
    for (name, value) in headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    if let (Some(length), false) = (length, has_length) {
        response.headers_mut().insert("content-length", length.into());
    }
    response
}
