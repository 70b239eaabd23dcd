//! Graceful shutdown (issue 4 item 6) of the real served binary: SIGTERM during 50
//! calls in flight lets them finish (or, past the grace, cancels and refunds them),
//! and leaves no open hold, on SQLite and PostgreSQL.

mod common;

use std::process::{Output, Stdio};

use common::{args, backends, client_at, fault::FaultServer};
use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

const CALLS: usize = 50;

fn bin(db: &str, argv: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mcp-marketplace"))
        .args(argv)
        .env("MCP_MARKETPLACE_DATABASE_URL", db)
        .env("MCP_MARKETPLACE_LOG", "warn")
        .env("MCP_MARKETPLACE_MASTER_KEY", common::TEST_MASTER_KEY)
        .output()
        .expect("the binary runs")
}

fn holds_and_verify(db: &str) -> i64 {
    let verify = bin(db, &["ledger", "verify"]);
    assert!(
        verify.status.success(),
        "ledger verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let out = bin(db, &["ledger", "balance", "--platform", "--json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["holds_micros"].as_i64().expect("holds_micros")
}

/// Serves `db` with the real binary, makes `CALLS` concurrent calls of
/// `faulty__sleep` for `sleep_ms`, sends SIGTERM once the upstream has all of them, and
/// returns (results that came back settled, results that came back refunded).
async fn sigterm_during_calls(
    db: &str,
    fault: &FaultServer,
    key: &str,
    grace: &str,
    sleep_ms: u64,
) -> (usize, usize) {
    let port = common::bind().await.local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mcp-marketplace"))
        .args(["serve", "--listen", &listen])
        .env("MCP_MARKETPLACE_DATABASE_URL", db)
        .env("MCP_MARKETPLACE_LOG", "warn")
        .env("MCP_MARKETPLACE_MASTER_KEY", common::TEST_MASTER_KEY)
        .env("MCP_MARKETPLACE_ALLOW_UPSTREAM_HOSTS", "127.0.0.1")
        .env("MCP_MARKETPLACE_RATE_LIMITS__PER_ACCOUNT_PER_SERVER", "off")
        .env("MCP_MARKETPLACE_RATE_LIMITS__PER_ACCOUNT", "off")
        .env("MCP_MARKETPLACE_RATE_LIMITS__PER_KEY", "off")
        .env("MCP_MARKETPLACE_MAX_CONCURRENCY_PER_SERVER", "100")
        .env("MCP_MARKETPLACE_SHUTDOWN_GRACE", grace)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("serve starts");
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    common::wait_until(|| async {
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let client = client_at(&format!("{base}/mcp"), key).await;
    let sent_before = fault.state.tool_calls();
    let mut calls = Vec::new();
    for _ in 0..CALLS {
        let peer = client.peer().clone();
        calls.push(tokio::spawn(async move {
            peer.call_tool(
                CallToolRequestParams::new("faulty__sleep")
                    .with_arguments(args(json!({"ms": sleep_ms}))),
            )
            .await
        }));
    }
    common::wait_until(|| async { fault.state.tool_calls() == sent_before + CALLS }).await;
    let pid = child.id().expect("a pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait())
        .await
        .expect("the server exits after SIGTERM")
        .expect("exit status");
    assert!(status.success(), "{status:?}");
    let (mut settled, mut refunded) = (0, 0);
    for c in calls {
        if let Ok(Ok(r)) = c.await {
            match common::receipt_of(&r).outcome.as_str() {
                "settled" => settled += 1,
                _ => refunded += 1,
            }
        }
    }
    client.cancel().await.ok();
    (settled, refunded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_50_calls_in_flight_leaves_no_open_hold() {
    for backend in backends() {
        // Set up in process, then serve the same database with the real binary.
        let (market, fault, user, key) = common::faulty_world(backend).await;
        market
            .app
            .ledger
            .topup(&user.id, 9_000_000, "test")
            .await
            .unwrap();
        let db = market.stop().await;

        // Calls shorter than the grace finish and are settled.
        let (settled, refunded) = sigterm_during_calls(&db.url, &fault, &key, "30s", 1_500).await;
        assert_eq!((settled, refunded), (CALLS, 0));
        assert_eq!(holds_and_verify(&db.url), 0);

        // Calls longer than the grace are cancelled upstream and refunded.
        let (settled, _) = sigterm_during_calls(&db.url, &fault, &key, "1s", 60_000).await;
        assert_eq!(settled, 0);
        assert_eq!(holds_and_verify(&db.url), 0);
        let out = bin(
            &db.url,
            &["ledger", "balance", "--account", "user", "--json"],
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(
            v["wallet_micros"].as_i64(),
            Some(10_000_000 - CALLS as i64 * 50_000),
            "only the finished calls were charged"
        );
        fault.stop().await;
    }
}
