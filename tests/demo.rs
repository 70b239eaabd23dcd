//! `mcp-marketplace demo`, run as the real binary as a newcomer would: a real MCP client
//! added with the printed URL and key lists and calls the demo tools and is charged the
//! manifest's prices; SIGTERM stops it cleanly.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{args, client_at};
use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

#[tokio::test]
async fn demo_serves_what_it_prints_and_charges_the_manifest_prices() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-marketplace"))
        .args(["demo", "--listen", "127.0.0.1:0", "--json"])
        .env("MCP_MARKETPLACE_LOG", "warn")
        .env_remove("MCP_MARKETPLACE_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(60), line)
        .await
        .expect("demo prints its URL within a minute")
        .expect("join")
        .expect("read stdout");
    let info: Value = serde_json::from_str(line.trim()).expect("demo --json prints JSON");
    let url = info["mcp_url"].as_str().expect("mcp_url").to_owned();
    let key = info["key"].as_str().expect("key").to_owned();
    assert!(key.starts_with("mkt_"));
    assert_eq!(info["servers"], json!(["unit-converter", "notes"]));

    let client = client_at(&url, &key).await;
    let names: Vec<String> = client
        .list_all_tools()
        .await
        .expect("tools/list")
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    for expected in [
        "unit-converter__convert",
        "unit-converter__list_units",
        "notes__add_note",
        "notes__list_notes",
        "marketplace__get_balance",
    ] {
        assert!(
            names.contains(&expected.to_owned()),
            "{expected} in {names:?}"
        );
    }
    let account = url.trim_end_matches("/mcp").to_owned() + "/api/v1/account";
    let balance = || async {
        let v: Value = reqwest::Client::new()
            .get(&account)
            .bearer_auth(&key)
            .send()
            .await
            .expect("GET /api/v1/account")
            .json()
            .await
            .expect("JSON");
        v["balance_micros"].as_i64().expect("balance_micros")
    };
    assert_eq!(balance().await, 10_000_000, "the demo account holds 10 USD");

    let r = client
        .call_tool(
            CallToolRequestParams::new("unit-converter__convert")
                .with_arguments(args(json!({"value": 10, "from": "km", "to": "mi"}))),
        )
        .await
        .expect("convert");
    assert_ne!(r.is_error, Some(true), "{r:?}");
    assert_eq!(
        balance().await,
        10_000_000 - 2_000,
        "convert costs 0.002 (tools-catalog/unit-converter.toml)"
    );
    // A per-tool override from the manifests: list_units is free, add_note costs 0.02.
    client
        .call_tool(
            CallToolRequestParams::new("unit-converter__list_units")
                .with_arguments(args(json!({}))),
        )
        .await
        .expect("list_units");
    assert_eq!(balance().await, 10_000_000 - 2_000);
    let r = client
        .call_tool(
            CallToolRequestParams::new("notes__add_note")
                .with_arguments(args(json!({"title": "demo", "body": "it works"}))),
        )
        .await
        .expect("add_note");
    assert_ne!(r.is_error, Some(true), "{r:?}");
    assert_eq!(balance().await, 10_000_000 - 2_000 - 20_000);
    client.cancel().await.ok();

    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()), "SIGTERM sent");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "demo exits 0 on SIGTERM: {status:?}");
}
