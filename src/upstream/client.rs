//! A JSON-RPC client for one upstream MCP session over streamable HTTP
//! (MCP 2025-06-18 "Transports"), written for forwarding rather than for an SDK's
//! convenience:
//!
//! - the marketplace chooses its own JSON-RPC ids (a counter per session), so requests
//!   in flight never share an id whatever the clients sent (DESIGN.md pitfalls);
//! - each request carries its own headers (the per-call token and `X-Request-Id`);
//! - a POST may be answered with `application/json` or with an SSE stream; on a stream,
//!   notifications and requests that precede the response are handed to the caller
//!   (progress, log messages, `list_changed`);
//! - the response body is capped in bytes, and failures are classified so the call
//!   path can pick the error kind (connect → unavailable, HTTP ≥ 500, timeout, …);
//! - an HTTP 404 on a request that carried `Mcp-Session-Id` means the upstream lost the
//!   session: the session is re-initialized once and the request resent (it was never
//!   processed, so this is safe even for non-idempotent tools);
//! - redirects are never followed, no proxy is used, and names resolve only through
//!   the SSRF-checking resolver (`security::ssrf`); `TCP_NODELAY` is set;
//! - every request carries the session's fixed headers: `X-MCP-Marketplace-Secret`
//!   and the creator's credentials, marked sensitive so `Debug` never shows them;
//! - while calls are in flight on a session, its standalone GET stream is kept open
//!   (MCP 2025-06-18 "Listening for Messages from the Server") and what the upstream
//!   sends there, such as log messages, reaches those calls ([`UpstreamSession::subscribe`]);
//!   it is resumed with `Last-Event-ID` after a break ("Resumability and Redelivery").

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};

use crate::store::now_ms;

/// The protocol version the marketplace offers upstreams in `initialize`.
pub const UPSTREAM_PROTOCOL_VERSION: &str = "2025-06-18";
/// Default cap on one upstream response body (10 MiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 10 * 1024 * 1024;
/// TCP connect timeout toward upstreams.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The header carrying the per-server secret.
pub const SECRET_HEADER: &str = "x-mcp-marketplace-secret";
/// The header carrying the per-call token.
pub const TOKEN_HEADER: &str = "x-mcp-marketplace-token";
/// The header carrying the call id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// How long the first call of a session waits for the standalone stream to open, so
/// that what the upstream sends there during the call is not missed.
const STREAM_OPEN_WAIT: Duration = Duration::from_secs(1);
/// After the standalone stream failed or ended, no new attempt before this long.
const STREAM_RETRY_PAUSE_MS: i64 = 5_000;

/// Why an upstream exchange failed. Messages never carry the upstream URL or secrets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// No TCP/TLS connection could be made (refused, unreachable, DNS).
    #[error("the upstream server could not be reached")]
    Connect,
    /// The exchange outlived its deadline.
    #[error("the upstream server did not answer in time")]
    Timeout,
    /// The upstream answered with an HTTP error status.
    #[error("the upstream server answered HTTP {0}")]
    HttpStatus(u16),
    /// The upstream lost our session (HTTP 404 on a request with `Mcp-Session-Id`).
    #[error("the upstream server lost the session")]
    SessionExpired,
    /// The response was not valid MCP over streamable HTTP.
    #[error("the upstream server sent an invalid response: {0}")]
    Protocol(String),
    /// A JSON-RPC error response.
    #[error("the upstream server returned JSON-RPC error {code}: {message}")]
    JsonRpc {
        /// JSON-RPC error code.
        code: i64,
        /// Its message.
        message: String,
    },
    /// The response body exceeded the cap (bytes).
    #[error("the upstream response exceeded {0} bytes")]
    TooLarge(usize),
    /// The connection broke mid-exchange.
    #[error("the connection to the upstream server broke")]
    Transport,
}

impl UpstreamError {
    /// The client-facing error kind of DESIGN.md "Errors a client sees".
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect => "upstream_unavailable",
            Self::Timeout => "upstream_timeout",
            Self::TooLarge(_) => "response_too_large",
            Self::HttpStatus(_)
            | Self::SessionExpired
            | Self::Protocol(_)
            | Self::JsonRpc { .. }
            | Self::Transport => "upstream_error",
        }
    }

    fn from_reqwest(err: &reqwest::Error) -> Self {
        if err.is_timeout() {
            Self::Timeout
        } else if err.is_connect() {
            Self::Connect
        } else {
            Self::Transport
        }
    }
}

/// Builds the shared HTTP client for upstream traffic: no redirects, no proxy (a proxy
/// would resolve names itself), every name resolved through `resolver` (the SSRF
/// check at every connect, DNS-rebinding safe), `TCP_NODELAY`, rustls.
///
/// # Errors
/// [`UpstreamError::Protocol`] if the TLS backend cannot be initialized.
pub fn http_client(
    resolver: crate::security::ssrf::GuardedResolver,
) -> Result<reqwest::Client, UpstreamError> {
    crate::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(std::sync::Arc::new(resolver))
        .tcp_nodelay(true)
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("mcp-marketplace/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| UpstreamError::Protocol(format!("HTTP client: {e}")))
}

#[derive(Debug, Clone)]
struct SessionInfo {
    session_id: Option<String>,
    protocol_version: String,
}

/// One MCP session with one upstream endpoint. Shared by the calls of one
/// (account, server) pair; requests may run concurrently.
#[derive(Debug)]
pub struct UpstreamSession {
    http: reqwest::Client,
    /// The endpoint, parsed once (reqwest would parse a string on every request).
    url: reqwest::Url,
    /// Sent on every request: the per-server secret and the creator's credentials.
    fixed: HeaderMap,
    state: tokio::sync::Mutex<Option<SessionInfo>>,
    next_id: AtomicI64,
    last_used_ms: AtomicI64,
    max_response_bytes: usize,
    /// The calls hearing the standalone stream, and that stream's state.
    listeners: Arc<Mutex<Listeners>>,
}

impl Drop for UpstreamSession {
    fn drop(&mut self) {
        lock(&self.listeners).stop_stream();
    }
}

/// Who hears the upstream's standalone GET stream, and how that stream stands.
#[derive(Debug, Default)]
struct Listeners {
    next_subscription: u64,
    /// (subscription id, downstream client session, sender), oldest first.
    subscribers: Vec<(u64, String, tokio::sync::mpsc::UnboundedSender<Value>)>,
    /// The task reading the stream, its number, and the upstream session id it reads.
    stream: Option<(tokio::task::AbortHandle, u64, Option<String>)>,
    streams_opened: u64,
    /// The upstream answered the GET with 405: it offers no standalone stream.
    unsupported: bool,
    /// No new attempt before this, epoch ms (after a failure or an end).
    retry_at_ms: i64,
    /// The `id` of the last SSE event read, sent as `Last-Event-ID` when resuming.
    last_event_id: Option<String>,
}

impl Listeners {
    fn stop_stream(&mut self) {
        if let Some((task, _, _)) = self.stream.take() {
            task.abort();
        }
    }

    /// Hands `message` to the calls in flight: a progress notification to every one (each
    /// keeps only its own token), anything else to one call per downstream client session
    /// (the oldest), so a client with several calls in flight sees it once.
    fn route(&self, message: &Value) {
        let progress =
            message.get("method").and_then(Value::as_str) == Some("notifications/progress");
        let mut reached: Vec<&str> = Vec::new();
        for (_, client, tx) in &self.subscribers {
            if !progress {
                if reached.contains(&client.as_str()) {
                    continue;
                }
                reached.push(client);
            }
            let _ = tx.send(message.clone());
        }
    }
}

/// Locks `listeners`, recovering from a panic of another holder (the state stays valid:
/// every change under the lock is a single assignment or push/retain).
fn lock(listeners: &Mutex<Listeners>) -> MutexGuard<'_, Listeners> {
    listeners
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Keeps a call subscribed to its session's standalone stream
/// ([`UpstreamSession::subscribe`]); dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    listeners: Arc<Mutex<Listeners>>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.listeners)
            .subscribers
            .retain(|(id, _, _)| *id != self.id);
    }
}

/// Receives the notifications and requests an upstream sends before its response.
pub type OnMessage<'a> = &'a (dyn Fn(Value) + Send + Sync);

impl UpstreamSession {
    /// A session (not yet initialized) with the endpoint `url`, sending the `fixed` headers
    /// (`X-MCP-Marketplace-Secret` and credentials, see
    /// `security::credentials::upstream_headers`) on every request and capping response
    /// bodies at `max_response_bytes`.
    pub fn new(
        http: reqwest::Client,
        url: reqwest::Url,
        fixed: HeaderMap,
        max_response_bytes: usize,
    ) -> Self {
        Self {
            http,
            url,
            fixed,
            state: tokio::sync::Mutex::new(None),
            next_id: AtomicI64::new(1),
            last_used_ms: AtomicI64::new(now_ms()),
            max_response_bytes,
            listeners: Arc::default(),
        }
    }

    /// Subscribes a call to what the upstream sends on the session's standalone GET
    /// stream (MCP 2025-06-18 "Listening for Messages from the Server"; rmcp upstreams
    /// send their log messages there, not on the call's own stream) until the returned
    /// [`Subscription`] is dropped. `client` names the downstream client session: a
    /// message other than progress goes to one subscribed call per client session.
    /// The stream itself is opened by the next [`UpstreamSession::request_tracked`].
    pub fn subscribe(
        &self,
        client: String,
        tx: tokio::sync::mpsc::UnboundedSender<Value>,
    ) -> Subscription {
        let mut listeners = lock(&self.listeners);
        listeners.next_subscription += 1;
        let id = listeners.next_subscription;
        listeners.subscribers.push((id, client, tx));
        Subscription {
            listeners: self.listeners.clone(),
            id,
        }
    }

    /// Opens the standalone stream of session `info` when calls are subscribed and it is
    /// not open (or was opened for a session the upstream since lost), then waits up to
    /// [`STREAM_OPEN_WAIT`] for the upstream to accept it. An upstream without a stream
    /// (HTTP 405) is not asked again; after any other failure, not for
    /// [`STREAM_RETRY_PAUSE_MS`]. Never fails the call.
    async fn ensure_listening(&self, info: &SessionInfo) {
        let opened = {
            let mut listeners = lock(&self.listeners);
            if listeners.subscribers.is_empty() || listeners.unsupported {
                return;
            }
            match &listeners.stream {
                Some((_, _, session)) if *session == info.session_id => return,
                Some(_) => {
                    // The upstream renewed the session: the old stream is dead.
                    listeners.stop_stream();
                    listeners.last_event_id = None;
                    listeners.retry_at_ms = 0;
                }
                None => {}
            }
            if now_ms() < listeners.retry_at_ms {
                return;
            }
            listeners.streams_opened += 1;
            let number = listeners.streams_opened;
            let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
            let stream = StandaloneStream {
                http: self.http.clone(),
                url: self.url.clone(),
                fixed: self.fixed.clone(),
                info: info.clone(),
                resume_from: listeners.last_event_id.clone(),
                listeners: self.listeners.clone(),
                number,
            };
            let task = tokio::spawn(stream.run(opened_tx));
            listeners.stream = Some((task.abort_handle(), number, info.session_id.clone()));
            opened_rx
        };
        let _ = tokio::time::timeout(STREAM_OPEN_WAIT, opened).await;
    }

    /// When the session last sent a request, epoch ms.
    pub fn last_used_ms(&self) -> i64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    /// Sends request `method` with `params` and `extra` headers, initializing the
    /// session first if needed and once more if the upstream lost it. Returns the
    /// JSON-RPC `result`. Messages that arrive before the response go to `on_message`.
    /// The caller bounds the time (drop the future to abort).
    ///
    /// # Errors
    /// Every [`UpstreamError`] but `SessionExpired`, which is handled here.
    pub async fn request(
        &self,
        method: &str,
        params: Value,
        extra: &HeaderMap,
        on_message: OnMessage<'_>,
    ) -> Result<Value, UpstreamError> {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
        let mut reinitialized = false;
        loop {
            let info = self.session(reinitialized).await?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
            match self
                .post(&body, Some(&info), extra, Some(id), on_message)
                .await
            {
                Err(UpstreamError::SessionExpired) if !reinitialized => {
                    tracing::debug!("upstream lost the session; re-initializing once");
                    reinitialized = true;
                }
                Err(UpstreamError::SessionExpired) => return Err(UpstreamError::HttpStatus(404)),
                Ok(Some(result)) => return Ok(result),
                Ok(None) => return Err(UpstreamError::Protocol("no response to a request".into())),
                Err(e) => return Err(e),
            }
        }
    }

    /// As [`UpstreamSession::request`], reporting progress to `track`: `track.sent` is
    /// set right before the request itself is posted (after any `initialize`) and
    /// `track.id` holds the JSON-RPC id it carries (for `notifications/cancelled`). A
    /// failure with `sent` unset, or [`UpstreamError::Connect`], never reached the
    /// upstream, so it may be retried whatever the tool (issue 4 "retries only when
    /// safe").
    ///
    /// # Errors
    /// As [`UpstreamSession::request`].
    pub async fn request_tracked(
        &self,
        method: &str,
        params: Value,
        extra: &HeaderMap,
        on_message: OnMessage<'_>,
        track: &Track,
    ) -> Result<Value, UpstreamError> {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
        let mut reinitialized = false;
        loop {
            let info = self.session(reinitialized).await?;
            self.ensure_listening(&info).await;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            track.id.store(id, Ordering::SeqCst);
            track.sent.store(true, Ordering::SeqCst);
            let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
            match self
                .post(&body, Some(&info), extra, Some(id), on_message)
                .await
            {
                Err(UpstreamError::SessionExpired) if !reinitialized => {
                    // A 404 for the session: the request was not processed.
                    track.sent.store(false, Ordering::SeqCst);
                    reinitialized = true;
                }
                Err(UpstreamError::SessionExpired) => return Err(UpstreamError::HttpStatus(404)),
                Ok(Some(result)) => return Ok(result),
                Ok(None) => return Err(UpstreamError::Protocol("no response to a request".into())),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends the notification `method` with `params` on the session (no answer is
    /// expected; e.g. `notifications/cancelled`, MCP 2025-06-18 "Cancellation"). Does
    /// nothing when the session was never initialized.
    ///
    /// # Errors
    /// Any connect/transport/HTTP error of the POST.
    pub async fn notify(&self, method: &str, params: Value) -> Result<(), UpstreamError> {
        let info = self.state.lock().await.clone();
        let Some(info) = info else { return Ok(()) };
        let body = json!({"jsonrpc": "2.0", "method": method, "params": params});
        self.post(&body, Some(&info), &HeaderMap::new(), None, &|_| {})
            .await
            .map(|_| ())
    }

    /// Runs the `initialize` handshake now unless the session has one (the probe times
    /// it on its own).
    ///
    /// # Errors
    /// Any [`UpstreamError`] of `initialize` or `notifications/initialized`.
    pub async fn initialize_now(&self) -> Result<(), UpstreamError> {
        self.session(false).await.map(|_| ())
    }

    /// POSTs `body` as is (it need not be JSON) and reads at most
    /// [`RAW_ANSWER_CAP`] bytes of the answer, for probes of how an upstream handles what
    /// no client should send. `in_session` adds the session's headers (initializing it if
    /// needed); `omit_secret` leaves out `X-MCP-Marketplace-Secret` (the creator's other
    /// credentials are still sent).
    ///
    /// # Errors
    /// Connect, timeout and transport errors; an HTTP error status is an `Ok` answer.
    pub async fn post_raw(
        &self,
        body: &str,
        in_session: bool,
        omit_secret: bool,
    ) -> Result<RawAnswer, UpstreamError> {
        let mut fixed = self.fixed.clone();
        if omit_secret {
            fixed.remove(SECRET_HEADER);
        }
        let mut req = self
            .http
            .post(self.url.clone())
            .header(http::header::ACCEPT, "application/json, text/event-stream")
            .header(http::header::CONTENT_TYPE, "application/json")
            .headers(fixed)
            .body(body.to_owned());
        if in_session {
            let info = self.session(false).await?;
            if let Some(id) = &info.session_id {
                req = req.header("mcp-session-id", id);
            }
            req = req.header("mcp-protocol-version", &info.protocol_version);
        }
        let mut response = req
            .send()
            .await
            .map_err(|e| UpstreamError::from_reqwest(&e))?;
        let status = response.status().as_u16();
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| UpstreamError::from_reqwest(&e))?
        {
            bytes.extend_from_slice(&chunk);
            if bytes.len() >= RAW_ANSWER_CAP {
                break;
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        // A JSON body, or the first JSON `data:` line of an SSE stream.
        let message = serde_json::from_str::<Value>(text.trim()).ok().or_else(|| {
            text.lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .find_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        });
        Ok(RawAnswer { status, message })
    }

    /// Ends the session: `DELETE` with `Mcp-Session-Id` (best effort), after closing
    /// its standalone stream.
    pub async fn close(&self) {
        lock(&self.listeners).stop_stream();
        let info = self.state.lock().await.take();
        if let Some(SessionInfo {
            session_id: Some(id),
            protocol_version,
        }) = info
        {
            let _ = self
                .http
                .delete(self.url.clone())
                .header("mcp-session-id", id)
                .header("mcp-protocol-version", protocol_version)
                .headers(self.fixed.clone())
                .timeout(Duration::from_secs(5))
                .send()
                .await;
        }
    }

    /// The current session, initialized if there is none or `renew` is set.
    async fn session(&self, renew: bool) -> Result<SessionInfo, UpstreamError> {
        let mut state = self.state.lock().await;
        if renew {
            *state = None;
        }
        if let Some(info) = state.as_ref() {
            return Ok(info.clone());
        }
        let info = self.initialize().await?;
        *state = Some(info.clone());
        Ok(info)
    }

    async fn initialize(&self) -> Result<SessionInfo, UpstreamError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({
            "jsonrpc": "2.0", "id": id, "method": "initialize",
            "params": {
                "protocolVersion": UPSTREAM_PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mcp-marketplace", "version": env!("CARGO_PKG_VERSION")},
            }
        });
        let (session_id, result) = self.post_initialize(&body, id).await?;
        let protocol_version = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or(UPSTREAM_PROTOCOL_VERSION)
            .to_owned();
        let info = SessionInfo {
            session_id,
            protocol_version,
        };
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.post(&note, Some(&info), &HeaderMap::new(), None, &|_| {})
            .await?;
        Ok(info)
    }

    async fn post_initialize(
        &self,
        body: &Value,
        id: i64,
    ) -> Result<(Option<String>, Value), UpstreamError> {
        let response = self.send(body, None, &HeaderMap::new()).await?;
        let session_id = response
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let result = self.read_response(response, Some(id), &|_| {}).await?;
        let result =
            result.ok_or_else(|| UpstreamError::Protocol("no initialize result".into()))?;
        Ok((session_id, result))
    }

    async fn send(
        &self,
        body: &Value,
        info: Option<&SessionInfo>,
        extra: &HeaderMap,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut req = self
            .http
            .post(self.url.clone())
            .header(http::header::ACCEPT, "application/json, text/event-stream")
            .header(http::header::CONTENT_TYPE, "application/json")
            .headers(self.fixed.clone())
            .headers(extra.clone())
            .body(body.to_string());
        if let Some(info) = info {
            if let Some(id) = &info.session_id {
                req = req.header("mcp-session-id", id);
            }
            req = req.header("mcp-protocol-version", &info.protocol_version);
        }
        let response = req
            .send()
            .await
            .map_err(|e| UpstreamError::from_reqwest(&e))?;
        let status = response.status();
        if status == http::StatusCode::NOT_FOUND && info.is_some_and(|i| i.session_id.is_some()) {
            return Err(UpstreamError::SessionExpired);
        }
        if !status.is_success() {
            return Err(UpstreamError::HttpStatus(status.as_u16()));
        }
        Ok(response)
    }

    async fn post(
        &self,
        body: &Value,
        info: Option<&SessionInfo>,
        extra: &HeaderMap,
        expect_id: Option<i64>,
        on_message: OnMessage<'_>,
    ) -> Result<Option<Value>, UpstreamError> {
        let response = self.send(body, info, extra).await?;
        self.read_response(response, expect_id, on_message).await
    }

    /// Reads a POST's answer: 202/empty for notifications, a JSON body, or an SSE stream
    /// that ends with the response to `expect_id`.
    async fn read_response(
        &self,
        response: reqwest::Response,
        expect_id: Option<i64>,
        on_message: OnMessage<'_>,
    ) -> Result<Option<Value>, UpstreamError> {
        let Some(expect_id) = expect_id else {
            return Ok(None);
        };
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let cap = self.max_response_bytes;
        if content_type.starts_with("text/event-stream") {
            let seen = Arc::new(AtomicUsize::new(0));
            let over = Arc::new(AtomicBool::new(false));
            let (seen2, over2) = (seen.clone(), over.clone());
            let bytes = response.bytes_stream().map(move |chunk| {
                let chunk = chunk.map_err(|e| CapError(e.to_string()))?;
                if seen2.fetch_add(chunk.len(), Ordering::Relaxed) + chunk.len() > cap {
                    over2.store(true, Ordering::Relaxed);
                    return Err(CapError("response too large".into()));
                }
                Ok(chunk)
            });
            let mut events = std::pin::pin!(sse_stream::SseStream::from_bytes_stream(bytes));
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(e) => e,
                    Err(_) if over.load(Ordering::Relaxed) => {
                        return Err(UpstreamError::TooLarge(cap));
                    }
                    Err(_) => return Err(UpstreamError::Transport),
                };
                let Some(data) = event.data.filter(|d| !d.trim().is_empty()) else {
                    continue;
                };
                let message: Value = serde_json::from_str(&data)
                    .map_err(|_| UpstreamError::Protocol("an SSE event is not JSON".into()))?;
                match match_response(message, expect_id)? {
                    Ok(result) => return Ok(Some(result)),
                    Err(other) => on_message(other),
                }
            }
            Err(UpstreamError::Protocol(
                "the stream ended without a response".into(),
            ))
        } else if content_type.starts_with("application/json") {
            let mut body = Vec::new();
            let mut response = response;
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| UpstreamError::from_reqwest(&e))?
            {
                if body.len() + chunk.len() > cap {
                    return Err(UpstreamError::TooLarge(cap));
                }
                body.extend_from_slice(&chunk);
            }
            let message: Value = serde_json::from_slice(&body)
                .map_err(|_| UpstreamError::Protocol("the body is not JSON".into()))?;
            let messages = match message {
                Value::Array(batch) => batch,
                one => vec![one],
            };
            for m in messages {
                match match_response(m, expect_id)? {
                    Ok(result) => return Ok(Some(result)),
                    Err(other) => on_message(other),
                }
            }
            Err(UpstreamError::Protocol("no response with our id".into()))
        } else {
            Err(UpstreamError::Protocol("unexpected content type".into()))
        }
    }

    /// Opens the standalone GET SSE stream of the session (MCP "Listening for Messages
    /// from the Server") and hands each message to `on_message` until the stream ends.
    ///
    /// # Errors
    /// [`UpstreamError::HttpStatus`] when the upstream offers no stream (405), or any
    /// connect/transport error.
    pub async fn listen(&self, on_message: OnMessage<'_>) -> Result<(), UpstreamError> {
        let info = self.session(false).await?;
        let mut req = self
            .http
            .get(self.url.clone())
            .header(http::header::ACCEPT, "text/event-stream")
            .headers(self.fixed.clone())
            .header("mcp-protocol-version", &info.protocol_version);
        if let Some(id) = &info.session_id {
            req = req.header("mcp-session-id", id);
        }
        let response = req
            .send()
            .await
            .map_err(|e| UpstreamError::from_reqwest(&e))?;
        if !response.status().is_success() {
            return Err(UpstreamError::HttpStatus(response.status().as_u16()));
        }
        let bytes = response
            .bytes_stream()
            .map(|c| c.map_err(|e| CapError(e.to_string())));
        let mut events = std::pin::pin!(sse_stream::SseStream::from_bytes_stream(bytes));
        while let Some(event) = events.next().await {
            let Ok(event) = event else {
                return Err(UpstreamError::Transport);
            };
            if let Some(message) = event
                .data
                .and_then(|d| serde_json::from_str::<Value>(&d).ok())
            {
                on_message(message);
            }
        }
        Ok(())
    }
}

/// The task reading one upstream session's standalone GET stream for the calls
/// subscribed to it.
struct StandaloneStream {
    http: reqwest::Client,
    url: reqwest::Url,
    fixed: HeaderMap,
    info: SessionInfo,
    resume_from: Option<String>,
    listeners: Arc<Mutex<Listeners>>,
    number: u64,
}

impl StandaloneStream {
    /// Opens the stream (resuming after `resume_from` when set), tells `opened` once
    /// the upstream accepted it or refused it, then routes every message until the
    /// stream ends, breaks or the task is aborted.
    async fn run(self, opened: tokio::sync::oneshot::Sender<()>) {
        let mut req = self
            .http
            .get(self.url.clone())
            .header(http::header::ACCEPT, "text/event-stream")
            .headers(self.fixed.clone())
            .header("mcp-protocol-version", &self.info.protocol_version);
        if let Some(id) = &self.info.session_id {
            req = req.header("mcp-session-id", id);
        }
        if let Some(last) = &self.resume_from {
            req = req.header("last-event-id", last);
        }
        let response = req.send().await;
        let _ = opened.send(());
        let response = match response {
            Ok(r) if r.status().is_success() => r,
            Ok(r) if r.status() == http::StatusCode::METHOD_NOT_ALLOWED => {
                tracing::debug!("the upstream offers no standalone stream");
                self.ended(true);
                return;
            }
            Ok(r) => {
                tracing::debug!(
                    status = r.status().as_u16(),
                    "the upstream refused its standalone stream"
                );
                self.ended(false);
                return;
            }
            Err(e) => {
                tracing::debug!(error = %UpstreamError::from_reqwest(&e), "cannot open the upstream's standalone stream");
                self.ended(false);
                return;
            }
        };
        let bytes = response
            .bytes_stream()
            .map(|c| c.map_err(|e| CapError(e.to_string())));
        let mut events = std::pin::pin!(sse_stream::SseStream::from_bytes_stream(bytes));
        // A resumed stream starts again at the last event read before (rmcp replays from
        // the index given, inclusive): that one is skipped.
        let mut repeat = self.resume_from.clone();
        while let Some(Ok(event)) = events.next().await {
            // Events without data (priming, keep-alive) carry nothing to route.
            let Some(message) = event
                .data
                .filter(|d| !d.trim().is_empty())
                .and_then(|d| serde_json::from_str::<Value>(&d).ok())
            else {
                continue;
            };
            if let Some(id) = event.id.filter(|id| !id.is_empty()) {
                if repeat.take().as_deref() == Some(id.as_str()) {
                    continue;
                }
                lock(&self.listeners).last_event_id = Some(id);
            }
            lock(&self.listeners).route(&message);
        }
        self.ended(false);
    }

    /// Forgets this stream (unless a newer one replaced it) and sets when to try again.
    fn ended(&self, unsupported: bool) {
        let mut listeners = lock(&self.listeners);
        if matches!(listeners.stream, Some((_, n, _)) if n == self.number) {
            listeners.stream = None;
        }
        listeners.unsupported |= unsupported;
        listeners.retry_at_ms = now_ms() + STREAM_RETRY_PAUSE_MS;
    }
}

/// Most bytes [`UpstreamSession::post_raw`] reads of an answer.
pub const RAW_ANSWER_CAP: usize = 64 * 1024;

/// What [`UpstreamSession::post_raw`] got back.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    /// The HTTP status.
    pub status: u16,
    /// The JSON-RPC message of the body (JSON or the first SSE event), if any.
    pub message: Option<Value>,
}

impl RawAnswer {
    /// `error.code` of a JSON-RPC error answer.
    pub fn error_code(&self) -> Option<i64> {
        self.message.as_ref()?.pointer("/error/code")?.as_i64()
    }
}

/// Where [`UpstreamSession::request_tracked`] reports how far a request got.
#[derive(Debug, Default)]
pub struct Track {
    /// Set once the request itself was handed to the connection.
    pub sent: AtomicBool,
    /// The JSON-RPC id of the request toward the upstream (0 before it is sent).
    pub id: AtomicI64,
}

/// An error inside the capped byte stream.
#[derive(Debug)]
struct CapError(String);

impl std::fmt::Display for CapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CapError {}

/// Sorts one message of an answer: the response to `id` gives its `result` (taken, not
/// copied: a result may be megabytes) or its error as `Err`; any other message comes
/// back as `Ok(Err(message))` for the caller's `on_message`.
fn match_response(message: Value, id: i64) -> Result<Result<Value, Value>, UpstreamError> {
    if message.get("method").is_some() || message.get("id").and_then(Value::as_i64) != Some(id) {
        return Ok(Err(message));
    }
    if let Some(error) = message.get("error") {
        return Err(UpstreamError::JsonRpc {
            code: error.get("code").and_then(Value::as_i64).unwrap_or(-32603),
            message: error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .chars()
                .take(500)
                .collect(),
        });
    }
    match message {
        Value::Object(mut fields) => fields
            .remove("result")
            .map(Ok)
            .ok_or_else(|| UpstreamError::Protocol("a response without result or error".into())),
        _ => Err(UpstreamError::Protocol(
            "a response without result or error".into(),
        )),
    }
}

/// Builds a header map from pairs, skipping values that are not valid header text.
pub fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(value) {
            map.insert(HeaderName::from_static(name), v);
        }
    }
    map
}
