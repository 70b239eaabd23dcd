//! Upstream credentials and secrets never reach a log line (issue 3 item 4): the whole
//! life of a credential — set, injected on calls that succeed and fail, rotated,
//! removed — runs with every log target at TRACE captured, and neither the credential
//! nor the per-server secret appears, nor in `/metrics`, nor in the alert outbox's
//! payloads and `last_error`s (a webhook whose receiver is down). Log lines of a call
//! carry its call id. (Errors, receipts, the REST API and tool output are checked in
//! `tests/trust.rs`.) Its own test binary: the capturing subscriber is process-wide.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::backends;
use common::fault::HTTP_500;
use common::raw::RawSession;
use mcp_marketplace::security::audit::Actor;
use serde_json::json;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_secrets_never_appear_in_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let credential = "Bearer s3cr3t-credential-4f9a";
    let mut secrets = vec![credential.to_owned()];
    let mut exposed = String::new();
    let mut call_ids = Vec::new();
    for backend in backends() {
        let market = common::Market::start_with(common::TestDb::new(backend).await, |c| {
            c.alerts.poll_interval = std::time::Duration::from_millis(30);
            c.alerts.retry_base = std::time::Duration::from_millis(40);
            c.alerts.retry_max = std::time::Duration::from_millis(200);
        })
        .await;
        let (market, fault, _, key) = common::with_faulty(market).await;
        secrets.push(fault.secret.read().unwrap().clone().unwrap());
        let actor = Actor::Cli("admin".into());
        market
            .app
            .set_credentials(
                &actor,
                "faulty",
                &[("Authorization".into(), credential.into())],
            )
            .await
            .unwrap();
        *fault.state.required_header.write().unwrap() =
            Some(("authorization".into(), credential.into()));
        let s = RawSession::open(&market.mcp_url(), &key).await;
        let first = s.call(1, "faulty__add", json!({"a": 1, "b": 1})).await;
        assert_eq!(first.tool_error_kind(), None);
        call_ids.push(
            first
                .message
                .as_ref()
                .and_then(|m| m.pointer("/result/_meta/mcp-marketplace~1receipt/call_id"))
                .and_then(|v| v.as_str())
                .expect("a receipt")
                .to_owned(),
        );
        // Failures: the upstream errors, then refuses the credential, then is gone.
        fault.set_mode(HTTP_500);
        assert!(
            s.call(2, "faulty__add", json!({"a": 1, "b": 1}))
                .await
                .tool_error_kind()
                .is_some()
        );
        fault.set_mode(common::fault::NORMAL);
        *fault.state.required_header.write().unwrap() =
            Some(("authorization".into(), "other".into()));
        assert!(
            s.call(3, "faulty__add", json!({"a": 1, "b": 1}))
                .await
                .tool_error_kind()
                .is_some()
        );
        secrets.push(market.app.rotate_secret(&actor, "faulty").await.unwrap());
        // A bad credential is refused without echoing its value.
        let err = market
            .app
            .set_credentials(
                &actor,
                "faulty",
                &[("Authorization".into(), format!("{credential}\r\nX-Evil: 1"))],
            )
            .await
            .unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        market
            .app
            .set_credentials(&actor, "faulty", &[])
            .await
            .unwrap();
        fault.stop().await;
        assert!(
            s.call(4, "faulty__add", json!({"a": 1, "b": 1}))
                .await
                .tool_error_kind()
                .is_some()
        );
        // Alerts: the creator's webhook is down; an incident is retried, and what the outbox keeps is checked below.
        let creator = mcp_marketplace::auth::accounts::find_account(&market.app.store, "creator")
            .await
            .unwrap();
        let dead = common::bind().await.local_addr().unwrap();
        mcp_marketplace::alerts::channels::set_webhook(
            &market.app.store,
            &market.app.vault,
            &market.app.policy,
            &creator.id,
            &format!("http://{dead}/hook?token=hooktoken-77"),
        )
        .await
        .unwrap();
        let mut tx = market.app.store.begin().await.unwrap();
        mcp_marketplace::alerts::enqueue(
            &mut tx,
            &creator.id,
            &mcp_marketplace::alerts::AlertEvent::Incident {
                slug: "faulty".into(),
                summary: "calls failed in a row".into(),
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let store = market.app.store.clone();
        common::wait_until(|| async {
            use sqlx::Row;
            sqlx::query(
                "SELECT CAST(MIN(attempts) AS BIGINT) FROM alert_outbox WHERE kind = 'incident'",
            )
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get::<Option<i64>, _>(0)
            .is_some_and(|n| n >= 2)
        })
        .await;
        {
            use sqlx::Row;
            for r in sqlx::query("SELECT payload, COALESCE(last_error, '') FROM alert_outbox")
                .fetch_all(market.app.store.pool())
                .await
                .unwrap()
            {
                let last_error: String = r.get(1);
                assert!(!last_error.contains("hooktoken") && !last_error.contains("127.0.0.1"));
                exposed.push_str(&r.get::<String, _>(0));
                exposed.push_str(&last_error);
            }
        }
        exposed.push_str(
            &reqwest::get(format!("{}/metrics", market.base))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
        market.stop().await;
    }
    assert!(exposed.contains("mcp_marketplace_calls_total"));
    assert!(exposed.contains("calls failed in a row"));
    for secret in &secrets {
        assert!(
            !exposed.contains(secret.as_str()),
            "a secret leaked into /metrics or an alert"
        );
    }
    assert!(!exposed.contains("s3cr3t"));
    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(
        logs.contains("faulty"),
        "the capture saw the run ({} bytes)",
        logs.len()
    );
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret leaked into the logs"
        );
    }
    assert!(
        !logs.contains("s3cr3t"),
        "part of the credential leaked into the logs"
    );
    for id in &call_ids {
        assert!(
            logs.contains(&format!("call_id={id}")),
            "the call's span carries its call id"
        );
    }
}
