//! MCP sessions of the streamable-HTTP endpoints, held in memory: one per `initialize`,
//! named by the `Mcp-Session-Id` header (MCP 2025-06-18, "Transports", "Streamable HTTP",
//! "Session Management").
//!
//! rmcp's own `LocalSessionManager` puts a worker task between the HTTP handlers and the
//! MCP service of each session, with five tokio channels of its own, and every message
//! crosses that task: a request is handed to the worker and on to the service, its answer
//! back to the worker and on to the HTTP stream. A tokio channel allocates a block of 32
//! message slots when it is made (32 × 376 bytes for a server message), so an idle session
//! held about 64 KiB of channel blocks (issue 7: ≤ 64 MiB with 1,000 open sessions).
//! [`Sessions`] has no task of its own: the HTTP handler puts a client's message straight
//! into the service's inbound channel (8-byte slots: messages are boxed), and the
//! service's transport, [`SessionTransport`], routes each server message straight to the
//! SSE stream it belongs on, under a short lock.
//!
//! Where a server message goes (the spec's "Sending Messages to the Server" and
//! "Listening for Messages from the Server"):
//! - a response or an error to the stream of the `POST` that carried its request, which
//!   then ends; nowhere when that stream has ended already (its client cancelled the
//!   request): a response never rides the standalone stream;
//! - a progress notification to the stream of the request whose progress token it names,
//!   a cancellation to the stream of the request it cancels, a server request made while
//!   handling a client request to that request's stream;
//! - anything else (e.g. `notifications/tools/list_changed`) to the standalone stream of
//!   the session's `GET`; when its reader has left, it is held for a resume, and before
//!   any `GET` it goes nowhere.
//!
//! Resumability ("Resumability and Redelivery"): every event has an id, `{n}/{stream}` on
//! a request's stream and `{n}` on the standalone one. A `GET` with `Last-Event-ID`
//! re-attaches to a request still in progress, or to the standalone stream, and replays
//! the events after `n` that are still held (the last [`HELD_EVENTS`] of each). A request
//! that has completed cannot be resumed: its answer was delivered, or its client left.
//!
//! One standalone stream gets the session's messages ("Multiple Connections"). A `GET`
//! while that one's reader is still there gets a stream that stands by (kept open,
//! idle), so that two `EventSource` connections of one client do not keep replacing
//! each other (rmcp's manager does the same); it takes over as soon as the first one's
//! reader has left, with the held events it has not had (a broken stream is often
//! noticed only after its client has resumed).
//!
//! A session ends on `DELETE`, when its service stops, or after [`SESSION_IDLE`] without
//! a message from its client while none of its requests is in progress.
//!
//! A session belongs to the account and endpoint of the key that initialized it
//! ([`Sessions::owned_by`]): the MCP handler refuses another's messages, and
//! [`super::require_key`] another's `GET` and `DELETE`, which reach no handler.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rmcp::RoleServer;
use rmcp::model::{
    ClientJsonRpcMessage, ClientNotification, ClientRequest, ErrorData, GetExtensions, GetMeta,
    JsonRpcError, JsonRpcRequest, ProgressToken, RequestId, ServerJsonRpcMessage,
    ServerNotification,
};
use rmcp::service::OriginatingRequestId;
use rmcp::transport::Transport;
use rmcp::transport::common::server_side_http::session_id;
use rmcp::transport::streamable_http_server::SessionManager;
use rmcp::transport::streamable_http_server::session::{ServerSseMessage, SessionId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a session lives without a message from its client while none of its
/// requests is in progress: 300 s, rmcp's default, so that sessions whose client left
/// without `DELETE` do not pile up. A client that comes back gets 404 and initializes
/// again (MCP 2025-06-18, "Session Management", 4).
pub const SESSION_IDLE: Duration = Duration::from_secs(300);

/// The SSE `retry` hint on each request's stream: 3 s, as rmcp's HTTP service sends on
/// the streams it makes itself (`StreamableHttpServerConfig::default`).
pub const SSE_RETRY: Duration = Duration::from_secs(3);

/// How many of a stream's latest events are held for a `Last-Event-ID` resume: 16 (on
/// a request's stream only those between its priming event and its answer: nothing
/// resumes from before the first or after the last).
pub const HELD_EVENTS: usize = 16;

/// Client messages waiting for the session's service: 16 (the HTTP handler waits for
/// room beyond that).
const INBOUND_MESSAGES: usize = 16;

/// `GET` streams of one session standing by while its standalone stream is read: at
/// most 32 (as rmcp's manager); a newer one lets the oldest go.
const STANDING_BY: usize = 32;

/// Server messages waiting for a slow reader of the standalone `GET` stream: 16; later
/// ones are dropped for that reader (a resume from the last event it read replays the
/// held ones). A request's stream is unbounded: it carries that request's answer and
/// the few notifications the handler sends before it.
const STANDALONE_MESSAGES: usize = 16;

/// What a session operation can fail with. rmcp's HTTP service answers a failed session
/// operation with HTTP 500, a failed resume with an empty stream; an unknown session is
/// caught before, by [`SessionManager::has_session`] (404). A
/// [`SessionError::DuplicateRequestId`] does not reach it: the request's stream carries
/// a JSON-RPC error instead.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No session has this id (never made, deleted, or ended idle).
    #[error("session not found")]
    NotFound,
    /// The session's service has stopped.
    #[error("session closed")]
    Closed,
    /// The first message of a session was not a request.
    #[error("the first message of a session must be the initialize request")]
    NotARequest,
    /// A request reused the id of a request of the same session still in progress
    /// (MCP 2025-06-18, "Base Protocol", "Requests": an id MUST NOT be reused within a
    /// session).
    #[error("request id {0} is already in progress in this session")]
    DuplicateRequestId(RequestId),
    /// A `Last-Event-ID` this session never gave, or of a request that has completed.
    #[error("no stream to resume from event {0:?}")]
    UnknownEvent(String),
}

/// The MCP sessions of the marketplace (`/mcp` and `/servers/{slug}/mcp` share one set;
/// each session records the endpoint it was initialized on); rmcp's
/// `StreamableHttpService` calls it for each HTTP request that names a session. See the
/// module documentation.
#[derive(Debug)]
pub struct Sessions {
    sessions: RwLock<HashMap<SessionId, Arc<Session>>>,
    /// The `retry` hint (SSE, in ms on the wire) sent first on each request's stream,
    /// whose event id lets a client resume it; `None` sends none.
    sse_retry: Option<Duration>,
    idle: Duration,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new(Some(SSE_RETRY), SESSION_IDLE)
    }
}

impl Sessions {
    /// Sessions that send `sse_retry` first on each request's stream (rmcp's HTTP service
    /// sends its own on the standalone stream and the `initialize` answer) and end after
    /// `idle` without a client message while no request is in progress.
    pub fn new(sse_retry: Option<Duration>, idle: Duration) -> Self {
        Self {
            sessions: RwLock::new(HashMap::new()),
            sse_retry,
            idle,
        }
    }

    /// Whether session `id` may be used by a key of `account_id` on the endpoint of
    /// `slug` (`None`: `/mcp`): it is theirs, it has no owner, or there is no such session
    /// (rmcp answers that one with 404).
    pub fn owned_by(&self, id: &str, account_id: &str, slug: Option<&str>) -> bool {
        read(&self.sessions)
            .get(id)
            .and_then(|session| session.owner.get())
            .is_none_or(|(owner, owner_slug)| owner == account_id && owner_slug.as_deref() == slug)
    }

    fn session(&self, id: &SessionId) -> Result<Arc<Session>, SessionError> {
        read(&self.sessions)
            .get(id)
            .cloned()
            .ok_or(SessionError::NotFound)
    }
}

/// One session: the way in to its service and the routes of its open streams.
#[derive(Debug)]
struct Session {
    /// The account and endpoint (`None`: `/mcp`) whose key initialized the session;
    /// unset where no key was asked for (rmcp's service served without
    /// [`super::require_key`], as in tests).
    owner: OnceLock<(String, Option<String>)>,
    inbound: mpsc::Sender<Box<ClientJsonRpcMessage>>,
    /// Cancelled when the session is closed; its transport then reports the end.
    closed: CancellationToken,
    routes: Mutex<Routes>,
}

/// Where the session's server messages go.
#[derive(Debug, Default)]
struct Routes {
    next_stream: u64,
    /// The streams of requests in progress, by stream number.
    requests: HashMap<u64, RequestStream>,
    by_request_id: HashMap<RequestId, u64>,
    by_progress_token: HashMap<ProgressToken, u64>,
    standalone: Standalone,
}

/// The stream of one `POST`ed request, open until its answer was sent.
#[derive(Debug)]
struct RequestStream {
    tx: mpsc::UnboundedSender<ServerSseMessage>,
    request_id: RequestId,
    progress_token: Option<ProgressToken>,
    events: HeldEvents,
}

/// The stream of the session's `GET`; `tx` is `None` until one was opened, and no event
/// is held before.
#[derive(Debug, Default)]
struct Standalone {
    tx: Option<mpsc::Sender<ServerSseMessage>>,
    /// Later `GET` streams, newest last, opened while `tx`'s reader was still there,
    /// each with the number of the last event its reader had.
    standing_by: Vec<(mpsc::Sender<ServerSseMessage>, u64)>,
    /// Whether a task watches for `tx`'s reader to leave (one per session at most).
    watched: bool,
    events: HeldEvents,
}

impl Standalone {
    /// Attaches a `GET` stream whose reader had the events up to `after` (`None`: a new
    /// reader): the one that gets the session's messages when the current one's reader
    /// has left, with the held events after `after`; else one that stands by, and then,
    /// when no task watches the current stream yet, also the current stream's sender for
    /// the caller to watch ([`Session::attach_standalone`]). Events are numbered from 1:
    /// rmcp's HTTP service sends a priming event named `0` first.
    fn attach(
        &mut self,
        after: Option<u64>,
    ) -> (
        mpsc::Receiver<ServerSseMessage>,
        Option<mpsc::Sender<ServerSseMessage>>,
    ) {
        self.events.next = self.events.next.max(1);
        self.standing_by.retain(|(tx, _)| !tx.is_closed());
        let (tx, rx) = mpsc::channel(STANDALONE_MESSAGES.max(HELD_EVENTS));
        match &self.tx {
            Some(current) if !current.is_closed() => {
                if self.standing_by.len() == STANDING_BY {
                    self.standing_by.remove(0);
                }
                let had = after.unwrap_or(self.events.next - 1);
                self.standing_by.push((tx, had));
                let watch = (!self.watched).then(|| current.clone());
                self.watched = true;
                (rx, watch)
            }
            _ => {
                for event in after.into_iter().flat_map(|n| self.events.after(n)) {
                    let _ = tx.try_send(event);
                }
                self.tx = Some(tx);
                (rx, None)
            }
        }
    }

    /// When the current stream's reader has left, the newest stream standing by takes
    /// over, with the held events its reader has not had (some may have reached the
    /// reader that left: a message on this stream is delivered at least once).
    fn take_over(&mut self) {
        while self.tx.as_ref().is_some_and(mpsc::Sender::is_closed) {
            let Some((next, had)) = self.standing_by.pop() else {
                break;
            };
            for event in self.events.after(had) {
                let _ = next.try_send(event);
            }
            self.tx = Some(next);
        }
    }
}

/// The next event number of a stream and its latest [`HELD_EVENTS`] events.
#[derive(Debug, Default)]
struct HeldEvents {
    next: u64,
    held: VecDeque<(u64, ServerSseMessage)>,
}

impl HeldEvents {
    /// Numbers and names (`{n}/{stream}` or `{n}`) the next event, without holding it:
    /// for events no resume replays (a priming event, the answer that ends its stream).
    fn name(&mut self, stream: Option<u64>, mut event: ServerSseMessage) -> ServerSseMessage {
        let n = self.next;
        self.next += 1;
        event.event_id = Some(match stream {
            Some(stream) => format!("{n}/{stream}"),
            None => n.to_string(),
        });
        event
    }

    /// Numbers, names and holds the next event (see [`HeldEvents::name`]).
    fn record(&mut self, stream: Option<u64>, event: ServerSseMessage) -> ServerSseMessage {
        let n = self.next;
        let event = self.name(stream, event);
        if self.held.len() == HELD_EVENTS {
            self.held.pop_front();
        }
        self.held.push_back((n, event.clone()));
        event
    }

    /// The held events numbered after `n`, oldest first.
    fn after(&self, n: u64) -> impl Iterator<Item = ServerSseMessage> + '_ {
        self.held
            .iter()
            .filter(move |(i, _)| *i > n)
            .map(|(_, event)| event.clone())
    }
}

/// Reads an event id this module gave: `{n}/{stream}` or `{n}`.
fn parse_event_id(id: &str) -> Option<(u64, Option<u64>)> {
    match id.split_once('/') {
        Some((n, stream)) => Some((n.parse().ok()?, Some(stream.parse().ok()?))),
        None => Some((id.parse().ok()?, None)),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps are left consistent by every critical section (no `await`, no
    // panicking call inside), so a poisoned lock holds usable state.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

impl Routes {
    /// Opens the stream of `request`, with a priming event (an id and the `retry` hint)
    /// when `retry` is set.
    fn open(
        &mut self,
        request: &JsonRpcRequest<ClientRequest>,
        retry: Option<Duration>,
    ) -> Result<(u64, mpsc::UnboundedReceiver<ServerSseMessage>), SessionError> {
        if self.by_request_id.contains_key(&request.id) {
            return Err(SessionError::DuplicateRequestId(request.id.clone()));
        }
        let stream = self.next_stream;
        self.next_stream += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut events = HeldEvents::default();
        if let Some(retry) = retry {
            let _ = tx.send(events.name(Some(stream), ServerSseMessage::retry(retry)));
        }
        let progress_token = request.request.get_meta().get_progress_token();
        if let Some(token) = &progress_token {
            self.by_progress_token.insert(token.clone(), stream);
        }
        self.by_request_id.insert(request.id.clone(), stream);
        self.requests.insert(
            stream,
            RequestStream {
                tx,
                request_id: request.id.clone(),
                progress_token,
                events,
            },
        );
        Ok((stream, rx))
    }

    /// Ends a request's stream (its answer was sent, or its client cancelled it).
    fn finish(&mut self, stream: u64) {
        if let Some(done) = self.requests.remove(&stream) {
            self.by_request_id.remove(&done.request_id);
            // Another request of the session may have reused the token since.
            if let Some(token) = done.progress_token
                && self.by_progress_token.get(&token) == Some(&stream)
            {
                self.by_progress_token.remove(&token);
            }
        }
    }

    /// Where `message` goes. The rules are the module documentation's.
    fn route(&self, message: &ServerJsonRpcMessage) -> Route {
        // The request stream found, else `otherwise`.
        let on = |stream: Option<&u64>, ends: bool, otherwise: Route| match stream {
            Some(&stream) => Route::Request { stream, ends },
            None => otherwise,
        };
        let by_id = |id: Option<&RequestId>| id.and_then(|id| self.by_request_id.get(id));
        match message {
            // The answer to a request whose stream has ended (its client cancelled it)
            // goes nowhere: a response never rides the standalone stream (MCP
            // 2025-06-18, "Listening for Messages from the Server", 4).
            ServerJsonRpcMessage::Response(response) => {
                on(by_id(Some(&response.id)), true, Route::Nowhere)
            }
            ServerJsonRpcMessage::Error(error) => {
                on(by_id(error.id.as_ref()), true, Route::Nowhere)
            }
            ServerJsonRpcMessage::Notification(n) => match &n.notification {
                ServerNotification::ProgressNotification(p) => on(
                    self.by_progress_token.get(&p.params.progress_token),
                    false,
                    Route::Standalone,
                ),
                ServerNotification::CancelledNotification(c) => on(
                    by_id(c.params.request_id.as_ref()),
                    false,
                    Route::Standalone,
                ),
                _ => Route::Standalone,
            },
            ServerJsonRpcMessage::Request(request) => {
                let origin = request.request.extensions().get::<OriginatingRequestId>();
                on(by_id(origin.map(|o| &o.0)), false, Route::Standalone)
            }
        }
    }

    /// Sends `message` where it belongs; a stream whose reader left drops it.
    fn deliver(&mut self, message: ServerJsonRpcMessage) {
        match self.route(&message) {
            Route::Request { stream, ends } => {
                if let Some(open) = self.requests.get_mut(&stream) {
                    let event = ServerSseMessage::from_message(message);
                    // The answer ends the stream, after which there is nothing to resume.
                    let event = if ends {
                        open.events.name(Some(stream), event)
                    } else {
                        open.events.record(Some(stream), event)
                    };
                    let _ = open.tx.send(event);
                }
                if ends {
                    self.finish(stream);
                }
            }
            Route::Standalone => {
                if self.standalone.tx.is_none() {
                    tracing::trace!("no standalone stream; server message dropped");
                    return;
                }
                self.standalone.take_over();
                let event = self
                    .standalone
                    .events
                    .record(None, ServerSseMessage::from_message(message));
                let sent = self
                    .standalone
                    .tx
                    .as_ref()
                    .is_some_and(|tx| tx.try_send(event).is_ok());
                if !sent {
                    tracing::debug!("standalone stream closed or full; server message held only");
                }
            }
            Route::Nowhere => {
                tracing::debug!("answer to a request whose stream has ended; dropped");
            }
        }
    }
}

/// Where a server message goes ([`Routes::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The stream of a request in progress; `ends` when the message is its answer.
    Request { stream: u64, ends: bool },
    /// The session's `GET` stream.
    Standalone,
    /// No stream: an answer whose request's stream has ended.
    Nowhere,
}

impl Session {
    /// A session whose service reads the client's messages from `inbound`'s receiver.
    fn new(inbound: mpsc::Sender<Box<ClientJsonRpcMessage>>) -> Arc<Self> {
        Arc::new(Self {
            owner: OnceLock::new(),
            inbound,
            closed: CancellationToken::new(),
            routes: Mutex::new(Routes::default()),
        })
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        lock(&self.routes)
    }

    /// Hands a client message to the session's service, waiting for room.
    async fn push(&self, message: ClientJsonRpcMessage) -> Result<(), SessionError> {
        self.inbound
            .send(Box::new(message))
            .await
            .map_err(|_| SessionError::Closed)
    }

    /// Opens the stream of the request `message` and hands the request to the service.
    async fn request(
        &self,
        message: ClientJsonRpcMessage,
        retry: Option<Duration>,
    ) -> Result<mpsc::UnboundedReceiver<ServerSseMessage>, SessionError> {
        let ClientJsonRpcMessage::Request(request) = &message else {
            return Err(SessionError::NotARequest);
        };
        let (stream, rx) = self.routes().open(request, retry)?;
        if let Err(e) = self.push(message).await {
            self.routes().finish(stream);
            return Err(e);
        }
        Ok(rx)
    }

    /// Attaches a `GET` stream ([`Standalone::attach`]); one that stands by takes over
    /// as soon as the current stream's reader has left. One task per session watches
    /// for that, while any stream stands by, and ends with the session.
    fn attach_standalone(self: &Arc<Self>, after: Option<u64>) -> mpsc::Receiver<ServerSseMessage> {
        let (rx, watch) = self.routes().standalone.attach(after);
        if let Some(mut current) = watch {
            let session = Arc::clone(self);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = current.closed() => {}
                        () = session.closed.cancelled() => return,
                    }
                    let mut routes = session.routes();
                    let standalone = &mut routes.standalone;
                    standalone.take_over();
                    standalone.standing_by.retain(|(tx, _)| !tx.is_closed());
                    match &standalone.tx {
                        Some(next) if !standalone.standing_by.is_empty() => {
                            current = next.clone();
                        }
                        _ => {
                            standalone.watched = false;
                            return;
                        }
                    }
                }
            });
        }
        rx
    }

    /// Ends the session: its transport reports the end to the service, open streams end.
    fn close(&self) {
        self.closed.cancel();
        let mut routes = self.routes();
        routes.requests.clear();
        routes.by_request_id.clear();
        routes.by_progress_token.clear();
        routes.standalone.tx = None;
        routes.standalone.standing_by.clear();
    }
}

/// The SSE events of one stream, as rmcp's HTTP service writes them out.
#[derive(Debug)]
enum EventStream {
    /// A request's stream; ends after the request's answer.
    Request(mpsc::UnboundedReceiver<ServerSseMessage>),
    /// A stream of `GET`; ends when the session ends.
    Standalone(mpsc::Receiver<ServerSseMessage>),
}

impl Stream for EventStream {
    type Item = ServerSseMessage;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            EventStream::Request(rx) => rx.poll_recv(cx),
            EventStream::Standalone(rx) => rx.poll_recv(cx),
        }
    }
}

/// The transport rmcp's service runs a session over: client messages from the HTTP
/// handlers in, server messages routed to the session's streams out.
#[derive(Debug)]
pub struct SessionTransport {
    inbound: mpsc::Receiver<Box<ClientJsonRpcMessage>>,
    session: Arc<Session>,
    idle: Duration,
}

impl Transport<RoleServer> for SessionTransport {
    type Error = SessionError;

    fn send(
        &mut self,
        item: ServerJsonRpcMessage,
    ) -> impl Future<Output = Result<(), SessionError>> + Send + 'static {
        self.session.routes().deliver(item);
        std::future::ready(Ok(()))
    }

    async fn receive(&mut self) -> Option<ClientJsonRpcMessage> {
        loop {
            tokio::select! {
                message = self.inbound.recv() => return message.map(|m| *m),
                () = self.session.closed.cancelled() => return None,
                () = tokio::time::sleep(self.idle) => {
                    if self.session.routes().requests.is_empty() {
                        tracing::debug!("session idle; closing it");
                        return None;
                    }
                }
            }
        }
    }

    async fn close(&mut self) -> Result<(), SessionError> {
        self.session.closed.cancel();
        Ok(())
    }
}

impl SessionManager for Sessions {
    type Error = SessionError;
    type Transport = SessionTransport;

    async fn create_session(&self) -> Result<(SessionId, SessionTransport), SessionError> {
        let id = session_id();
        let (inbound, rx) = mpsc::channel(INBOUND_MESSAGES);
        let session = Session::new(inbound);
        write(&self.sessions).insert(id.clone(), session.clone());
        let transport = SessionTransport {
            inbound: rx,
            session,
            idle: self.idle,
        };
        Ok((id, transport))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, SessionError> {
        let session = self.session(id)?;
        // rmcp put the HTTP request's parts, with the authenticated caller, in the
        // message's extensions.
        if let ClientJsonRpcMessage::Request(request) = &message
            && let Some(caller) = request
                .request
                .extensions()
                .get::<http::request::Parts>()
                .and_then(|parts| parts.extensions.get::<super::Caller>())
        {
            let _ = session
                .owner
                .set((caller.key.account_id.clone(), caller.slug.clone()));
        }
        let mut rx = session.request(message, None).await?;
        while let Some(event) = rx.recv().await {
            if let Some(answer) = event.message {
                return Ok(Arc::unwrap_or_clone(answer));
            }
        }
        Err(SessionError::Closed)
    }

    /// Whether the session is open; one whose service has stopped without closing it
    /// (it panicked) is not, and is let go, so that its client gets 404 and initializes
    /// again instead of 500 on every request.
    async fn has_session(&self, id: &SessionId) -> Result<bool, SessionError> {
        let stopped = match read(&self.sessions).get(id) {
            None => return Ok(false),
            Some(session) => session.inbound.is_closed(),
        };
        if stopped {
            self.close_session(id).await?;
        }
        Ok(!stopped)
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), SessionError> {
        let removed = write(&self.sessions).remove(id);
        if let Some(session) = removed {
            session.close();
        }
        Ok(())
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, SessionError> {
        match self.session(id)?.request(message, self.sse_retry).await {
            Ok(rx) => Ok(EventStream::Request(rx)),
            Err(SessionError::DuplicateRequestId(request_id)) => {
                // The client's mistake, answered on the stream as JSON-RPC's "Invalid
                // Request" (-32600); the request in progress under that id is untouched.
                let message = format!("request id {request_id} is already in progress");
                let error = ErrorData::invalid_request(message, None);
                let answer =
                    ServerJsonRpcMessage::Error(JsonRpcError::new(Some(request_id), error));
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = tx.send(ServerSseMessage::from_message(answer));
                Ok(EventStream::Request(rx))
            }
            Err(e) => Err(e),
        }
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), SessionError> {
        let session = self.session(id)?;
        if let ClientJsonRpcMessage::Notification(n) = &message
            && let ClientNotification::CancelledNotification(c) = &n.notification
            && let Some(request_id) = &c.params.request_id
        {
            // The client no longer wants the answer: its stream ends now (the service
            // cancels the handler when it reads the notification).
            let mut routes = session.routes();
            if let Some(stream) = routes.by_request_id.get(request_id).copied() {
                routes.finish(stream);
            }
        }
        session.push(message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, SessionError> {
        let rx = self.session(id)?.attach_standalone(None);
        Ok(EventStream::Standalone(rx))
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, SessionError> {
        let session = self.session(id)?;
        let unknown = || SessionError::UnknownEvent(last_event_id.clone());
        let (n, stream) = parse_event_id(&last_event_id).ok_or_else(unknown)?;
        let mut routes = session.routes();
        match stream {
            Some(stream) => {
                let open = routes.requests.get_mut(&stream).ok_or_else(unknown)?;
                let (tx, rx) = mpsc::unbounded_channel();
                for event in open.events.after(n) {
                    let _ = tx.send(event);
                }
                open.tx = tx;
                Ok(EventStream::Request(rx))
            }
            None => {
                if n >= routes.standalone.events.next.max(1) {
                    return Err(unknown());
                }
                drop(routes);
                Ok(EventStream::Standalone(session.attach_standalone(Some(n))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_read_back() {
        assert_eq!(parse_event_id("3/7"), Some((3, Some(7))));
        assert_eq!(parse_event_id("0"), Some((0, None)));
        for bad in ["", "x", "1/", "/2", "1/2/3", "-1"] {
            assert_eq!(parse_event_id(bad), None, "{bad:?}");
        }
    }

    fn request(id: i64, progress_token: Option<&str>) -> JsonRpcRequest<ClientRequest> {
        let mut params = serde_json::json!({"name": "units__convert", "arguments": {}});
        if let Some(token) = progress_token {
            params["_meta"] = serde_json::json!({"progressToken": token});
        }
        let message = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params});
        match serde_json::from_value(message).expect("a client message") {
            ClientJsonRpcMessage::Request(request) => request,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn server(message: serde_json::Value) -> ServerJsonRpcMessage {
        serde_json::from_value(message).expect("a server message")
    }

    fn answer(id: i64) -> ServerJsonRpcMessage {
        server(serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {"content": []}}))
    }

    fn progress(token: &str) -> ServerJsonRpcMessage {
        server(
            serde_json::json!({"jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": token, "progress": 1}}),
        )
    }

    fn kind(event: &ServerSseMessage) -> &'static str {
        match event.message.as_deref() {
            None => "priming",
            Some(ServerJsonRpcMessage::Response(_)) => "response",
            Some(ServerJsonRpcMessage::Notification(_)) => "notification",
            Some(_) => "other",
        }
    }

    #[test]
    fn each_message_takes_its_route() {
        let mut routes = Routes::default();
        let (tx, mut standalone) = mpsc::channel(STANDALONE_MESSAGES);
        routes.standalone.tx = Some(tx);
        let retry = Some(Duration::from_secs(3));
        let (s1, mut first) = routes.open(&request(1, Some("t")), retry).expect("opens");
        let primed = first.try_recv().expect("a priming event");
        assert_eq!(
            (kind(&primed), primed.event_id.as_deref()),
            ("priming", Some(format!("0/{s1}").as_str()))
        );

        // An id in progress cannot be opened again; the progress token can, and then
        // belongs to the newer request.
        assert!(matches!(
            routes.open(&request(1, None), None),
            Err(SessionError::DuplicateRequestId(_))
        ));
        let (s2, mut second) = routes.open(&request(2, Some("t")), None).expect("opens");
        routes.deliver(progress("t"));
        let event = second.try_recv().expect("the progress");
        assert_eq!(
            (kind(&event), event.event_id.as_deref()),
            ("notification", Some(format!("0/{s2}").as_str()))
        );
        assert!(first.try_recv().is_err());

        // The answer ends its stream, and only its own: the token still routes.
        routes.deliver(answer(1));
        let event = first.try_recv().expect("the answer");
        assert_eq!(
            (kind(&event), event.event_id.as_deref()),
            ("response", Some(format!("1/{s1}").as_str()))
        );
        assert!(matches!(
            first.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        routes.deliver(progress("t"));
        assert_eq!(
            kind(&second.try_recv().expect("the progress")),
            "notification"
        );

        // An answer whose stream has ended goes nowhere, not to the standalone stream;
        // a notification of no request goes there.
        routes.deliver(answer(1));
        assert!(standalone.try_recv().is_err());
        routes.deliver(server(
            serde_json::json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}),
        ));
        let event = standalone.try_recv().expect("the notification");
        assert_eq!(
            (kind(&event), event.event_id.as_deref()),
            ("notification", Some("0"))
        );

        routes.deliver(answer(2));
        assert!(routes.requests.is_empty() && routes.by_request_id.is_empty());
        assert!(routes.by_progress_token.is_empty());
    }

    #[test]
    fn a_second_get_stream_stands_by_until_the_first_ones_reader_leaves() {
        let mut routes = Routes::default();
        let list_changed = || {
            server(
                serde_json::json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}),
            )
        };
        let id = |event: ServerSseMessage| event.event_id.expect("an event id");
        let (mut first, watch) = routes.standalone.attach(None);
        assert!(watch.is_none(), "the first stream takes the messages");
        let (mut second, watch) = routes.standalone.attach(Some(0));
        assert!(watch.is_some(), "the second stands by");
        // A third stands by too, watched by the same task; its reader leaves at once.
        let (third, another) = routes.standalone.attach(None);
        assert!(another.is_none(), "one task watches the current stream");
        drop((watch, third));
        routes.deliver(list_changed());
        assert_eq!(id(first.try_recv().expect("the first stream gets it")), "1");
        assert!(second.try_recv().is_err(), "one stream gets each message");

        // The first reader leaves: the second takes over with what its reader has not
        // had (event 1: its reader had up to 0), then gets what follows.
        drop(first);
        routes.deliver(list_changed());
        assert_eq!(id(second.try_recv().expect("replayed")), "1");
        assert_eq!(id(second.try_recv().expect("the next")), "2");

        // A resume after every reader left replays what was missed.
        drop(second);
        routes.deliver(list_changed());
        let (mut fourth, watch) = routes.standalone.attach(Some(2));
        assert!(watch.is_none());
        assert_eq!(id(fourth.try_recv().expect("the held event")), "3");
        assert!(fourth.try_recv().is_err());
    }

    /// The id of `rx`'s next event, which must come within 5 s.
    async fn next(rx: &mut mpsc::Receiver<ServerSseMessage>) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("taken over at once")
            .expect("an event")
            .event_id
    }

    #[tokio::test]
    async fn a_stream_standing_by_takes_over_as_soon_as_the_reader_has_left() {
        let (inbound, _rx) = mpsc::channel(INBOUND_MESSAGES);
        let session = Session::new(inbound);
        let first = session.attach_standalone(None);
        let mut second = session.attach_standalone(Some(0));
        let mut third = session.attach_standalone(None);
        session.routes().deliver(server(serde_json::json!(
            {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        )));
        // The first reader leaves after the message was sent to it: the newest stream
        // standing by gets it without waiting for another message; when that reader
        // leaves too, the same task hands over to the other one.
        drop(first);
        assert_eq!(next(&mut third).await.as_deref(), Some("1"));
        drop(third);
        assert_eq!(next(&mut second).await.as_deref(), Some("1"));
        drop(second);

        // When the session ends, a stream standing by ends too (the watching task lets
        // the current stream's sender go).
        let current = session.attach_standalone(None);
        let mut standing_by = session.attach_standalone(None);
        session.close();
        drop(current);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), standing_by.recv())
                .await
                .expect("ends")
                .is_none()
        );
    }

    #[test]
    fn held_events_keep_the_latest_and_replay_after_a_number() {
        let mut events = HeldEvents::default();
        for _ in 0..HELD_EVENTS + 4 {
            events.record(Some(2), ServerSseMessage::retry(Duration::from_secs(1)));
        }
        let ids: Vec<String> = events.after(17).filter_map(|e| e.event_id).collect();
        assert_eq!(ids, ["18/2", "19/2"]);
        // The oldest four were let go.
        assert_eq!(events.after(0).count(), HELD_EVENTS);
    }
}
