//! Upstream credentials and secrets never reach a log line (issue 3 item 4): the whole
//! life of a credential — set, injected on calls that succeed and fail, rotated,
//! removed — runs with every log target at TRACE captured, and neither the credential
//! nor the per-server secret appears. (Errors, receipts, the REST API and tool output
//! are checked in `tests/trust.rs`; `/metrics` joins when the reliability layer adds
//! it.) Its own test binary: the capturing subscriber is process-wide.

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
    for backend in backends() {
        let (market, fault, _, key) = common::faulty_world(backend).await;
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
        assert_eq!(
            s.call(1, "faulty__add", json!({"a": 1, "b": 1}))
                .await
                .tool_error_kind(),
            None
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
        market.stop().await;
    }
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
}
