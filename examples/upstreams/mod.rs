//! Example upstream MCP servers that the marketplace aggregates: a unit
//! converter and a per-user notebook.
//!
//! Both are served over MCP Streamable HTTP (stateful sessions) at `/mcp` on
//! an axum server by [`spawn_unit_converter`] and [`spawn_notes`]. The same
//! source is compiled into the `unit_converter` and `notes` example binaries
//! and into the library (for the `demo` command and integration tests), so it
//! uses only external crates, never `crate::` paths.
//!
//! Requests only reach MCP when they pass the [`SecretSlot`] check: with a
//! secret configured, the `X-MCP-Marketplace-Secret` header must equal it,
//! otherwise the server answers `401 Unauthorized` with a JSON body
//! `{"error": "unauthorized", "message": "..."}`. rmcp's defaults still apply
//! behind that: only `Host` headers naming `localhost`, `127.0.0.1` or `::1`
//! are accepted (DNS-rebinding protection).

pub mod notes;
pub mod unit_converter;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    serve::ListenerExt as _,
};
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use sha2::{Digest as _, Sha256};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// Request header that must carry the shared secret when one is configured.
pub const SECRET_HEADER: &str = "x-mcp-marketplace-secret";

/// How long [`ExampleServer::shutdown`] waits for open connections to finish
/// before aborting the server task.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The secret an example server expects in the `X-MCP-Marketplace-Secret`
/// header. `None` accepts every request (standalone use); `Some(secret)`
/// rejects requests whose header is missing or different with HTTP 401.
/// The slot is read on every request, so it can be set or changed while the
/// server runs.
pub type SecretSlot = std::sync::Arc<std::sync::RwLock<Option<String>>>;

/// Creates a [`SecretSlot`] holding `secret`.
pub fn secret_slot(secret: Option<String>) -> SecretSlot {
    Arc::new(RwLock::new(secret))
}

/// A running example server. Stop it with [`ExampleServer::shutdown`];
/// dropping the handle also signals the server to stop, without waiting.
pub struct ExampleServer {
    /// The address the server listens on.
    pub addr: SocketAddr,
    /// The MCP endpoint, `http://{addr}/mcp` (with a loopback address in place
    /// of an unspecified one such as `0.0.0.0`).
    pub url: String,
    /// The expected `X-MCP-Marketplace-Secret`, shared with the running server.
    pub secret: SecretSlot,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl ExampleServer {
    /// Stops accepting connections, closes all MCP sessions and waits (up to
    /// 5 seconds, then aborts) for in-flight requests to finish.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!(addr = %self.addr, "example server did not stop in time; aborting it");
            self.task.abort();
        }
    }
}

impl Drop for ExampleServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl fmt::Debug for ExampleServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret_set = self
            .secret
            .read()
            .map(|secret| secret.is_some())
            .unwrap_or(true);
        f.debug_struct("ExampleServer")
            .field("addr", &self.addr)
            .field("url", &self.url)
            .field("secret_set", &secret_set)
            .finish_non_exhaustive()
    }
}

/// Serves the [`unit_converter::UnitConverter`] MCP server on `listener` at
/// `/mcp` (Streamable HTTP, stateful sessions) until shut down.
///
/// Errors only if the listener's local address cannot be read.
pub async fn spawn_unit_converter(
    listener: TcpListener,
    secret: SecretSlot,
) -> std::io::Result<ExampleServer> {
    spawn_server(listener, secret, unit_converter::UnitConverter::new)
}

/// Serves the [`notes::Notes`] MCP server on `listener` at `/mcp`
/// (Streamable HTTP, stateful sessions) until shut down. All sessions of the
/// returned server share one in-memory store; notes are lost on shutdown.
///
/// Errors only if the listener's local address cannot be read.
pub async fn spawn_notes(
    listener: TcpListener,
    secret: SecretSlot,
) -> std::io::Result<ExampleServer> {
    let notes = notes::Notes::new();
    spawn_server(listener, secret, move || notes.clone())
}

fn spawn_server<S>(
    listener: TcpListener,
    secret: SecretSlot,
    make_handler: impl Fn() -> S + Send + Sync + 'static,
) -> std::io::Result<ExampleServer>
where
    S: rmcp::ServerHandler + Send + 'static,
{
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let config =
        StreamableHttpServerConfig::default().with_cancellation_token(cancel.child_token());
    let service: StreamableHttpService<S, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(make_handler()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let router = axum::Router::new().nest_service("/mcp", service).layer(
        axum::middleware::from_fn_with_state(secret.clone(), require_secret),
    );
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on an accepted connection");
        }
    });
    let shutdown = cancel.clone();
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(%addr, %error, "example MCP server failed");
        }
    });
    Ok(ExampleServer {
        addr,
        url: format!("http://{}/mcp", reachable(addr)),
        secret,
        cancel,
        task,
    })
}

/// Replaces an unspecified IP (`0.0.0.0`, `::`) by loopback so the address
/// can be used in a URL.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// Compares in time independent of where the inputs differ (the digests have
/// a fixed length).
fn secrets_match(given: &[u8], expected: &[u8]) -> bool {
    let given = Sha256::digest(given);
    let expected = Sha256::digest(expected);
    given
        .iter()
        .zip(expected.iter())
        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
        == 0
}

/// Axum middleware: lets a request through only if no secret is configured or
/// its `X-MCP-Marketplace-Secret` header equals the configured one.
async fn require_secret(
    State(secret): State<SecretSlot>,
    request: Request,
    next: Next,
) -> Response {
    let expected = match secret.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let Some(expected) = expected else {
        return next.run(request).await;
    };
    let authorized = request
        .headers()
        .get(SECRET_HEADER)
        .is_some_and(|given| secrets_match(given.as_bytes(), expected.as_bytes()));
    if authorized {
        return next.run(request).await;
    }
    let body = serde_json::json!({
        "error": "unauthorized",
        "message": "missing or wrong X-MCP-Marketplace-Secret header",
    });
    let mut response = (StatusCode::UNAUTHORIZED, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
