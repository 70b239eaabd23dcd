//! `/metrics` (issue 4 item 8): a call's counters and latency histogram appear in the
//! Prometheus text, by server, tool and outcome; the ledger holds gauge is there; the
//! call id of the receipt is the `X-Request-Id` the upstream saw. SQLite always,
//! PostgreSQL with `TEST_DATABASE_URL`. Its own test binary: the recorder is
//! process-wide, so figures are compared before and after.

mod common;

use common::fault::HTTP_500;
use common::raw::RawSession;
use common::{backends, faulty_world};
use serde_json::json;

/// The value of the sample `name{labels}` (labels as rendered, sorted by the
/// exporter), or 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(base: &str) -> String {
    let r = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()[http::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_calls_by_server_tool_and_outcome() {
    let ok = r#"mcp_marketplace_calls_total{server="faulty",tool="echo",outcome="ok"}"#;
    let failed =
        r#"mcp_marketplace_calls_total{server="faulty",tool="echo",outcome="upstream_error"}"#;
    let hist = r#"mcp_marketplace_call_duration_seconds_count{server="faulty",tool="echo"}"#;
    for backend in backends() {
        let (market, fault, _, key) = faulty_world(backend).await;
        let before = scrape(&market.base).await;
        let s = RawSession::open(&market.mcp_url(), &key).await;
        let a = s.call(1, "faulty__echo", json!({"text": "hi"})).await;
        assert_eq!(a.tool_error_kind(), None, "{}", a.body);
        fault.set_mode(HTTP_500);
        let b = s.call(2, "faulty__echo", json!({"text": "hi"})).await;
        assert_eq!(b.tool_error_kind().as_deref(), Some("upstream_error"));
        fault.set_mode(common::fault::NORMAL);
        let after = scrape(&market.base).await;
        assert_eq!(sample(&after, ok) - sample(&before, ok), 1.0, "{after}");
        assert_eq!(sample(&after, failed) - sample(&before, failed), 1.0);
        assert_eq!(sample(&after, hist) - sample(&before, hist), 2.0);
        assert!(after.contains(
            r#"mcp_marketplace_call_duration_seconds_bucket{server="faulty",tool="echo",le="0.005"}"#
        ));
        assert!(after.contains("# TYPE mcp_marketplace_calls_total counter"));
        // No call is in flight: nothing is held.
        assert_eq!(sample(&after, "mcp_marketplace_ledger_holds_micros"), 0.0);
        assert!(after.contains("mcp_marketplace_ledger_holds_micros 0"));
        // The receipt's call id went upstream as X-Request-Id.
        let call_id = a
            .message
            .as_ref()
            .and_then(|m| m.pointer("/result/_meta/mcp-marketplace~1receipt/call_id"))
            .and_then(|v| v.as_str())
            .expect("a receipt")
            .to_owned();
        let seen = fault.state.seen.lock().unwrap().clone();
        assert!(
            seen.iter()
                .any(|h| h.get("x-request-id").and_then(|v| v.to_str().ok()) == Some(&call_id)),
            "the upstream saw X-Request-Id {call_id}"
        );
        // A call refused before any forward (the server is not callable) counts too.
        let refused = r#"mcp_marketplace_calls_total{server="faulty",tool="echo",outcome="upstream_unavailable"}"#;
        market
            .app
            .catalog
            .set_status("faulty", mcp_marketplace::catalog::ServerStatus::Inactive)
            .await
            .unwrap();
        let c = s.call(3, "faulty__echo", json!({"text": "hi"})).await;
        assert_eq!(c.tool_error_kind().as_deref(), Some("upstream_unavailable"));
        let refusing = scrape(&market.base).await;
        assert_eq!(sample(&refusing, refused) - sample(&after, refused), 1.0);
        assert_eq!(
            sample(&refusing, hist),
            sample(&after, hist),
            "no duration for a refusal"
        );
        market
            .app
            .catalog
            .set_status("faulty", mcp_marketplace::catalog::ServerStatus::Active)
            .await
            .unwrap();
        // The reliability layer's metrics land in the same exposition: a manual probe.
        let server = market.app.catalog.get("faulty").await.unwrap();
        mcp_marketplace::upstream::probe::probe_server(
            &market.app,
            &server,
            mcp_marketplace::upstream::probe::ProbeKind::Manual,
        )
        .await
        .unwrap();
        let probed = scrape(&market.base).await;
        assert!(
            probed.contains(r#"mcp_marketplace_probes_total{server="faulty""#),
            "{probed}"
        );
        assert!(probed.contains(r#"mcp_marketplace_probe_latency_seconds_count{server="faulty"}"#));
        market.stop().await;
        fault.stop().await;
    }
}
