//! The HTTP server's connections: accepted, capped, timed out and shut down gracefully.
//!
//! axum's own `serve` takes every connection the kernel hands it and keeps an idle
//! keep-alive connection, or one whose request headers never complete (slowloris), open
//! for as long as its client likes, each holding about 27 KiB of hyper's buffers and
//! state (README "Performance"). This loop serves the same router with hyper's
//! connection builder configured:
//!
//! - **Idle and slow connections close** after [`HttpLimits::idle_timeout`]: hyper's
//!   HTTP/1.1 header read timeout, which runs from the moment a connection waits for a
//!   request's head (idle between requests, or its head arriving slowly) until the head is
//!   complete. A response in progress, such as a long call's SSE stream or a session's
//!   `GET` stream, is never cut by it. A client whose idle connection was closed opens a
//!   new one; its MCP session lives on (sessions are not bound to connections, MCP
//!   2025-06-18 "Streamable HTTP").
//! - **At most [`HttpLimits::max_connections`] open connections**: past it, new
//!   connections wait in the kernel's accept queue until one closes, instead of growing
//!   the process without bound.
//! - `TCP_NODELAY` on every connection (DESIGN.md "Measured pitfalls": without it a
//!   small SSE answer waits ~40 ms for a delayed ACK).
//! - **Graceful shutdown** as axum's: once `signal` completes, no new connection is
//!   accepted, every open one finishes the response in progress and closes, and
//!   [`serve`] returns when all have.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Default [`HttpLimits::idle_timeout`]: 30 s, hyper's default header read timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`HttpLimits::max_connections`]: 10,000 (about 270 MiB of connection state
/// at hyper's ~27 KiB each).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// How long the accept loop pauses after an error that is not one connection's own
/// (e.g. `EMFILE`, out of file descriptors): 1 s, as axum's `serve`.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Limits on the server's connections (config keys `http_idle_timeout` and
/// `max_connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// How long a connection may wait for a request's complete head: idle between
    /// requests, or receiving a head slowly. Then it is closed.
    pub idle_timeout: Duration,
    /// Most connections open at once; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Serves `router` on `listener` under `limits` (HTTP/1.1, and HTTP/2 when a client
/// opens with its preface) until `signal` completes, then shuts down gracefully (module
/// documentation) and returns once every connection has closed.
///
/// Errors of one connection (a reset, a timeout, a malformed request) end that
/// connection only; accept errors are logged and retried.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    signal: impl Future<Output = ()> + Send,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout);
    // `max_connections` of 0 would accept nothing; the configuration refuses it.
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
            () = &mut signal => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut signal => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::error!(error = %e, "accepting a connection failed; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Errors of the connection being accepted (its client already gave up), after which
/// the next one can be accepted at once (as hyper's and axum's accept loops).
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
