//! The accept loop: HTTP/1.1 and HTTP/2 (h2c, or h2 over TLS) served by hyper, hardened for
//! a LAN service facing clients it does not control:
//!
//! - at most `max_connections` at once: past that, new connections wait in the kernel's
//!   backlog instead of exhausting file descriptors;
//! - a header read timeout, which also closes idle keep-alive connections, so slow-header
//!   (slowloris) clients cannot pin connections; bounded header sizes;
//! - TLS handshakes with a deadline, done in the connection's own task so a slow handshake
//!   never stalls the loop;
//! - a graceful shutdown that lets in-flight responses finish within a grace period. Fills
//!   are detached and commit only verified, complete blobs, so whatever is cut short leaves
//!   at most a temp file, removed at the next start.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::access::Access;
use crate::handler;
use crate::mirror::Mirror;
use crate::tls::Tls;

/// How long a client may take to send its request headers (and how long an idle
/// keep-alive connection stays open).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight responses may run after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// The most a client's request head may take (hyper's buffer, and HTTP/2's header list).
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How the listener serves, beyond the mirror itself.
pub struct ServeOptions {
    pub tls: Option<Arc<Tls>>,
    pub access: Arc<Access>,
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { tls: None, access: Arc::default(), max_connections: 4096 }
    }
}

/// Serves `mirror` on `listener` until `shutdown` completes, then drains connections.
pub async fn run(
    listener: TcpListener,
    mirror: Arc<Mirror>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_HEADER_BYTES);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(MAX_HEADER_BYTES as u32);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(options.max_connections.max(1)));
    if let Some(tls) = &options.tls {
        tls.spawn_reloader();
    }
    tokio::pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            permit = connections.clone().acquire_owned() => {
                let permit = permit.expect("the semaphore is never closed");
                tokio::select! {
                    accepted = listener.accept() => accepted.map(|connection| (connection, permit)),
                    () = &mut shutdown => break,
                }
            }
            () = &mut shutdown => break,
        };
        let ((stream, peer), permit) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, usually: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (mirror, access) = (mirror.clone(), options.access.clone());
        let service = service_fn(move |request| handler::handle(mirror.clone(), access.clone(), peer.ip(), request));
        let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), options.tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let result = match tls {
                None => watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await,
                Some(tls) => {
                    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream)).await;
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => return tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }

    tracing::info!("shutting down: draining connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("grace period over: closing remaining connections"),
    }
}
