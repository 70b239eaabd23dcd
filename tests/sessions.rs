//! The marketplace's MCP sessions (`gateway::session`) over real HTTP, as a client
//! sees them: a call whose stream broke is resumed with `Last-Event-ID` and charged
//! once; a request id reused while its request is in progress is refused and changes
//! nothing; a notification sent while the `GET` stream was broken is replayed when it
//! is resumed; `DELETE` ends a session; an idle session ends, one with a request in
//! progress does not; another account's key (or another endpoint) cannot listen to,
//! resume or delete a session.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fault::{FaultState, Faulty};
use common::raw::{RawSession, parse};
use common::{backends, wait_until};
use mcp_marketplace::auth::Scope;
use mcp_marketplace::gateway::session::Sessions;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Where a test's requests go and as whom: an endpoint, a key and a session id.
#[derive(Clone, Copy)]
struct As<'a> {
    url: &'a str,
    key: &'a str,
    session: &'a str,
}

impl<'a> From<&'a RawSession> for As<'a> {
    fn from(s: &'a RawSession) -> Self {
        As {
            url: &s.url,
            key: &s.key,
            session: s.session.as_deref().expect("a session id"),
        }
    }
}

/// A request of `session` with its headers, not yet sent.
fn request<'a>(session: impl Into<As<'a>>, method: reqwest::Method) -> reqwest::RequestBuilder {
    let session = session.into();
    reqwest::Client::new()
        .request(method, session.url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-protocol-version", "2025-06-18")
        .header("mcp-session-id", session.session)
        .bearer_auth(session.key)
}

fn sleep_call(id: u64, tool: &str, ms: u64) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": {"ms": ms}}})
    .to_string()
}

/// POSTs `body` and reads its SSE stream only until the first whole event, then drops
/// the connection (a client's network breaking mid-call); returns that event's id.
async fn post_and_break(session: &RawSession, body: String) -> String {
    let mut response = request(session, reqwest::Method::POST)
        .body(body)
        .send()
        .await
        .expect("the marketplace answers");
    assert_eq!(response.status(), 200);
    let mut seen = String::new();
    while !seen.contains("\n\n") {
        let chunk = response
            .chunk()
            .await
            .expect("the stream reads")
            .expect("an event before the stream ends");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen.lines()
        .find_map(|l| l.strip_prefix("id:"))
        .map(|id| id.trim().to_owned())
        .unwrap_or_else(|| panic!("the first event has an id: {seen:?}"))
}

/// `GET` with `Last-Event-ID: last`; the status and the whole body (the stream ends
/// after the resumed request's answer, at once when there is nothing to resume).
async fn resume<'a>(session: impl Into<As<'a>>, last: &str) -> (u16, String) {
    let response = request(session, reqwest::Method::GET)
        .header("accept", "text/event-stream")
        .header("last-event-id", last)
        .send()
        .await
        .expect("the marketplace answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test]
async fn a_call_whose_stream_broke_is_resumed_with_last_event_id_and_charged_once() {
    for backend in backends() {
        let (market, fault, user, key) = common::faulty_world(backend).await;
        let session = RawSession::open(&market.mcp_url(), &key).await;

        // The call's stream breaks after its first event; the call goes on upstream.
        let first = post_and_break(&session, sleep_call(7, "faulty__sleep", 1_500)).await;
        wait_until(|| async { fault.state.tool_calls() == 1 }).await;

        // The same id again while that call is in progress: an "Invalid Request" error
        // for that id, not forwarded, nothing held for it.
        let again = session.call(7, "faulty__sleep", json!({"ms": 1})).await;
        assert_eq!(again.status, 200, "{}", again.body);
        let error = again.message.expect("a JSON-RPC answer");
        assert_eq!(error["id"], 7);
        assert_eq!(error["error"]["code"], -32600, "{error}");
        assert_eq!(market.balance(&user).await.holds_micros, 50_000);
        assert_eq!(fault.state.tool_calls(), 1);

        // Resumed from the first event: the call's answer, with its receipt.
        let (status, body) = resume(&session, &first).await;
        assert_eq!(status, 200);
        let answer: Value = parse(&body).unwrap_or_else(|| panic!("an answer: {body:?}"));
        assert_eq!(answer["id"], 7);
        assert_eq!(
            answer.pointer("/result/content/0/text"),
            Some(&json!("slept"))
        );
        assert!(
            answer
                .pointer("/result/_meta/mcp-marketplace~1receipt")
                .is_some(),
            "{answer}"
        );
        let balance = market.balance(&user).await;
        assert_eq!(balance.wallet_micros, 950_000, "charged once");
        assert_eq!(balance.holds_micros, 0);
        assert_eq!(fault.state.tool_calls(), 1);

        // The request has completed: nothing to resume, an empty stream (not an error
        // a browser's EventSource would retry forever).
        let (status, body) = resume(&session, &first).await;
        assert_eq!(status, 200);
        assert_eq!(parse(&body), None, "{body:?}");
        // Nor from an id the session never gave.
        for unknown in ["9/99", "not-an-id"] {
            let (status, body) = resume(&session, unknown).await;
            assert_eq!(status, 200);
            assert_eq!(parse(&body), None, "{body:?}");
        }

        // The session still serves, and the id is free again.
        let next = session
            .call(7, "faulty__add", json!({"a": 1, "b": 2}))
            .await;
        assert_eq!(
            next.message.expect("an answer")["result"]["content"][0]["text"],
            "3"
        );
        assert_eq!(market.balance(&user).await.wallet_micros, 900_000);
        market.assert_ledger_ok().await;
        market.stop().await;
        fault.stop().await;
    }
}

/// Reads `response`'s SSE stream until `want` appears (at most 10 s); everything read.
async fn read_until(response: &mut reqwest::Response, want: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(want) {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} within 10 s: {seen:?}"))
            .expect("the stream reads")
            .unwrap_or_else(|| panic!("the stream ended without {want:?}: {seen:?}"));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

#[tokio::test]
async fn a_notification_sent_while_the_get_stream_was_broken_is_replayed_on_resume() {
    let (market, fault, user, key) = common::faulty_world(common::Backend::Sqlite).await;
    let session = RawSession::open(&market.mcp_url(), &key).await;
    let get = || request(&session, reqwest::Method::GET).header("accept", "text/event-stream");

    // The session's GET stream: its first event (the priming one) read, then broken.
    let mut stream = get().send().await.expect("the marketplace answers");
    assert_eq!(stream.status(), 200);
    let first = read_until(&mut stream, "\n\n").await;
    let last_id = first
        .lines()
        .find_map(|l| l.strip_prefix("id:"))
        .map(|id| id.trim().to_owned())
        .unwrap_or_else(|| panic!("the first event has an id: {first:?}"));
    drop(stream);

    // The tool list changes while no GET stream is open.
    assert!(
        market
            .app
            .uninstall(&user.id, "faulty")
            .await
            .expect("uninstalls")
    );

    // Resumed from the last event the client read: the notification arrives.
    let mut resumed = get()
        .header("last-event-id", last_id)
        .send()
        .await
        .expect("the marketplace answers");
    assert_eq!(resumed.status(), 200);
    read_until(&mut resumed, "notifications/tools/list_changed").await;
    drop(resumed);
    market.stop().await;
    fault.stop().await;
}

#[tokio::test]
async fn a_deleted_session_is_gone() {
    let (market, fault, user, key) = common::faulty_world(common::Backend::Sqlite).await;
    let session = RawSession::open(&market.mcp_url(), &key).await;
    let listed = session
        .post(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#)
        .await;
    assert_eq!(listed.status, 200);

    let deleted = request(&session, reqwest::Method::DELETE)
        .send()
        .await
        .expect("the marketplace answers");
    assert!(deleted.status().is_success(), "{}", deleted.status());

    // MCP 2025-06-18, "Session Management", 4: a request naming an ended session gets 404.
    let after = session
        .call(3, "faulty__add", json!({"a": 1, "b": 2}))
        .await;
    assert_eq!(after.status, 404, "{}", after.body);
    assert_eq!(fault.state.tool_calls(), 0);
    assert_eq!(market.balance(&user).await.wallet_micros, 1_000_000);
    // A new session works.
    let fresh = RawSession::open(&market.mcp_url(), &key).await;
    assert_eq!(
        fresh
            .call(3, "faulty__add", json!({"a": 1, "b": 2}))
            .await
            .status,
        200
    );
    market.assert_ledger_ok().await;
    market.stop().await;
    fault.stop().await;
}

#[tokio::test]
async fn another_accounts_key_cannot_listen_to_resume_or_delete_a_session() {
    let (market, fault, user, key) = common::faulty_world(common::Backend::Sqlite).await;
    let session = RawSession::open(&market.mcp_url(), &key).await;
    let intruder = market.account("intruder").await;
    let intruder_key = market
        .key(&intruder.name, &[Scope::Invoke, Scope::CatalogRead])
        .await;
    let id = session.session.clone().expect("a session id");
    let as_intruder = As {
        url: &session.url,
        key: &intruder_key,
        session: &id,
    };
    // The owner's call in progress, its stream broken after the first event.
    let first = post_and_break(&session, sleep_call(7, "faulty__sleep", 1_000)).await;

    // With another account's key, the session is not found: no GET stream, no resume
    // of the owner's call, no DELETE.
    let listen = request(as_intruder, reqwest::Method::GET)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("the marketplace answers");
    assert_eq!(listen.status(), 404);
    let (status, body) = resume(as_intruder, &first).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(parse(&body), None);
    let deleted = request(as_intruder, reqwest::Method::DELETE)
        .send()
        .await
        .expect("the marketplace answers");
    assert_eq!(deleted.status(), 404);
    // Nor with the owner's key on another endpoint.
    let one_server = format!("{}/servers/faulty/mcp", market.base);
    let elsewhere = As {
        url: &one_server,
        key: &key,
        session: &id,
    };
    let (status, _) = resume(elsewhere, &first).await;
    assert_eq!(status, 404);

    // The owner still resumes the call and gets its answer, charged once.
    let (status, body) = resume(&session, &first).await;
    assert_eq!(status, 200);
    let answer = parse(&body).unwrap_or_else(|| panic!("an answer: {body:?}"));
    assert_eq!(
        answer.pointer("/result/content/0/text"),
        Some(&json!("slept"))
    );
    assert_eq!(market.balance(&user).await.wallet_micros, 950_000);
    assert_eq!(market.balance(&intruder).await.wallet_micros, 0);
    market.assert_ledger_ok().await;
    market.stop().await;
    fault.stop().await;
}

/// The fault server's handler served by [`Sessions`] that end after `idle`.
async fn serve_with_idle(idle: Duration) -> (String, CancellationToken) {
    let listener = common::bind().await;
    let addr = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    let handler = Faulty(Arc::new(FaultState::default()));
    let service = StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(Sessions::new(Some(Duration::from_secs(3)), idle)),
        StreamableHttpServerConfig::default().with_cancellation_token(cancel.child_token()),
    );
    let router = axum::Router::new().route_service("/mcp", service);
    let stop = cancel.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    (format!("http://{addr}/mcp"), cancel)
}

#[tokio::test]
async fn an_idle_session_ends_but_not_while_a_request_is_in_progress() {
    let (url, cancel) = serve_with_idle(Duration::from_millis(300)).await;

    // A call that takes three idle periods is answered: its session is not idle.
    let busy = RawSession::open(&url, "unused").await;
    let answer = busy.post(&sleep_call(2, "sleep", 1_000)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer
            .message
            .expect("an answer")
            .pointer("/result/content/0/text"),
        Some(&json!("slept"))
    );

    // Without messages for longer than the idle period, the session is gone.
    let idle = RawSession::open(&url, "unused").await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let late = idle.post(&sleep_call(3, "sleep", 1)).await;
    assert_eq!(late.status, 404, "{}", late.body);
    cancel.cancel();
}
