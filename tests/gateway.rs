//! The aggregated MCP endpoint end to end: a real rmcp client against a real
//! marketplace and real upstreams, on SQLite and (with TEST_DATABASE_URL) PostgreSQL.

mod common;

use common::fault::HTTP_500;
use common::{
    Backend, Market, NOTES_PRICE, TestDb, UNITS_PRICE, World, args, backends, client_at,
    error_kind, faulty_world, receipt_of, text_of,
};
use mcp_marketplace::auth::Scope;
use mcp_marketplace::auth::signing::keys_from_jwks;
use mcp_marketplace::billing::Receipt;
use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

async fn verify_receipt(market: &Market, receipt: &Receipt) {
    receipt
        .verify(&keys_from_jwks(&market.jwks().await))
        .expect("receipt signature verifies against the JWKS");
}

#[tokio::test]
async fn lists_namespaced_tools_calls_them_and_bills_seventy_thirty() {
    for backend in backends() {
        let w = World::start(backend, 1_000_000).await;
        let client = w.market.client(&w.key).await;
        let tools = client.list_all_tools().await.expect("tools/list");
        let names: Vec<_> = tools.iter().map(|t| t.name.to_string()).collect();
        for expected in [
            "units__convert",
            "units__list_units",
            "notes__add_note",
            "notes__search_notes",
            "marketplace__get_balance",
            "marketplace__search_servers",
            "marketplace__install_server",
            "marketplace__uninstall_server",
        ] {
            assert!(
                names.contains(&expected.to_owned()),
                "{expected} missing from {names:?} ({backend:?})"
            );
        }
        assert!(names.iter().all(|n| {
            n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }));
        let convert = tools.iter().find(|t| t.name == "units__convert").unwrap();
        let price = &convert.meta.as_ref().expect("price meta").0["mcp-marketplace/price"];
        assert_eq!(
            price,
            &json!({"micros": UNITS_PRICE, "per": "call", "currency": "USD"})
        );
        assert!(
            convert.description.as_deref().unwrap_or("").len() > 10,
            "upstream description kept"
        );

        let result = client
            .call_tool(
                CallToolRequestParams::new("units__convert")
                    .with_arguments(args(json!({"value": 10, "from": "km", "to": "mi"}))),
            )
            .await
            .expect("tools/call");
        assert_ne!(result.is_error, Some(true), "{result:?}");
        assert!(
            text_of(&result).contains("6.21"),
            "10 km in miles: {}",
            text_of(&result)
        );
        let receipt = receipt_of(&result);
        assert_eq!(receipt.outcome, "settled");
        assert_eq!(receipt.price_micros, UNITS_PRICE);
        assert_eq!(receipt.charged_micros, UNITS_PRICE);
        assert_eq!(receipt.server, "units");
        assert_eq!(receipt.tool, "convert");
        assert_eq!(receipt.account, "user");
        assert_eq!(receipt.balance_after_micros, 1_000_000 - UNITS_PRICE);
        verify_receipt(&w.market, &receipt).await;

        let user = w.market.balance(&w.user).await;
        let creator = w.market.balance(&w.creator).await;
        let platform = w.market.platform().await;
        assert_eq!(user.wallet_micros, 1_000_000 - UNITS_PRICE);
        assert_eq!(user.holds_micros, 0);
        assert_eq!(creator.earnings_micros, UNITS_PRICE * 70 / 100);
        assert_eq!(platform.revenue_micros, UNITS_PRICE * 30 / 100);
        assert_eq!(platform.holds_micros, 0);

        // The notes tool is billed at its own price and keeps per-caller state.
        let added = client
            .call_tool(
                CallToolRequestParams::new("notes__add_note")
                    .with_arguments(args(json!({"title": "groceries", "body": "milk, eggs"}))),
            )
            .await
            .unwrap();
        assert_ne!(added.is_error, Some(true), "{added:?}");
        let found = client
            .call_tool(
                CallToolRequestParams::new("notes__search_notes")
                    .with_arguments(args(json!({"query": "milk"}))),
            )
            .await
            .unwrap();
        assert!(text_of(&found).contains("groceries"));
        assert_eq!(receipt_of(&found).charged_micros, NOTES_PRICE);
        assert_eq!(
            w.market.balance(&w.user).await.wallet_micros,
            1_000_000 - UNITS_PRICE - 2 * NOTES_PRICE
        );

        // The marketplace's own tools are free.
        let balance = client
            .call_tool(CallToolRequestParams::new("marketplace__get_balance"))
            .await
            .unwrap();
        let s = balance.structured_content.expect("structured balance");
        assert_eq!(
            s["balance_micros"],
            json!(1_000_000 - UNITS_PRICE - 2 * NOTES_PRICE)
        );
        assert_eq!(s["balance"], json!("0.96"));

        // GET /api/v1/account agrees.
        let account: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/account", w.market.base))
            .bearer_auth(&w.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(account["balance_micros"], json!(960_000));
        assert_eq!(account["balance"], json!("0.96"));
        assert_eq!(account["currency"], json!("USD"));

        w.market.assert_ledger_ok().await;
        client.cancel().await.ok();
        w.stop().await;
    }
}

#[tokio::test]
async fn failures_are_refunded_with_the_right_kind() {
    for backend in backends() {
        let (market, fault, user, key) = faulty_world(backend).await;
        let client = market.client(&key).await;
        let call = |name: &'static str, a: Value| {
            let client = &client;
            async move {
                client
                    .call_tool(CallToolRequestParams::new(name).with_arguments(args(a)))
                    .await
                    .expect("a failed upstream is a tool result, not a protocol error")
            }
        };

        // A success first, so the refunds below are measured against a charged baseline.
        let ok = call("faulty__add", json!({"a": 2, "b": 3})).await;
        assert_eq!(text_of(&ok), "5");
        let after_ok = market.balance(&user).await.wallet_micros;
        assert_eq!(after_ok, 1_000_000 - 50_000);

        // Upstream isError: passes through unchanged, marked upstream_error, refunded.
        let r = call("faulty__fail", json!({})).await;
        assert_eq!(r.is_error, Some(true));
        assert_eq!(text_of(&r), "deliberate failure");
        assert_eq!(error_kind(&r).as_deref(), Some("upstream_error"));
        let receipt = receipt_of(&r);
        assert_eq!(
            (receipt.outcome.as_str(), receipt.charged_micros),
            ("refunded", 0)
        );
        verify_receipt(&market, &receipt).await;

        // Timeout (the server's timeout is 5 s in the harness; sleep longer).
        let r = call("faulty__sleep", json!({"ms": 6_500})).await;
        assert_eq!(error_kind(&r).as_deref(), Some("upstream_timeout"), "{r:?}");
        assert_eq!(receipt_of(&r).charged_micros, 0);

        // HTTP 500.
        fault.set_mode(HTTP_500);
        let r = call("faulty__add", json!({"a": 1, "b": 1})).await;
        assert_eq!(r.is_error, Some(true));
        assert_eq!(error_kind(&r).as_deref(), Some("upstream_error"), "{r:?}");
        assert!(text_of(&r).contains("not charged"));
        assert!(
            !text_of(&r).contains("127.0.0.1"),
            "no upstream URL in messages"
        );

        // Connection refused.
        fault.stop().await;
        let r = call("faulty__add", json!({"a": 1, "b": 1})).await;
        assert_eq!(
            error_kind(&r).as_deref(),
            Some("upstream_unavailable"),
            "{r:?}"
        );
        assert_eq!(receipt_of(&r).outcome, "refunded");

        let b = market.balance(&user).await;
        assert_eq!(
            b.wallet_micros, after_ok,
            "no failure was charged ({backend:?})"
        );
        assert_eq!(b.holds_micros, 0);
        market.assert_ledger_ok().await;
        client.cancel().await.ok();
        market.stop().await;
    }
}

#[tokio::test]
async fn oversize_upstream_responses_are_refused_and_refunded() {
    for backend in backends() {
        let market_db = TestDb::new(backend).await;
        let market = Market::start_with(market_db, |c| c.max_response_bytes = 64 * 1024).await;
        let (market, fault, user, key) = common::with_faulty(market).await;
        let client = market.client(&key).await;
        let r = client
            .call_tool(
                CallToolRequestParams::new("faulty__big")
                    .with_arguments(args(json!({"bytes": 200_000}))),
            )
            .await
            .unwrap();
        assert_eq!(error_kind(&r).as_deref(), Some("response_too_large"));
        assert_eq!(market.balance(&user).await.wallet_micros, 1_000_000);
        market.assert_ledger_ok().await;
        client.cancel().await.ok();
        market.stop().await;
        fault.stop().await;
    }
}

#[tokio::test]
async fn concurrent_calls_never_overdraw_a_wallet() {
    const N: i64 = 8;
    for backend in backends() {
        let w = World::start(backend, N * UNITS_PRICE).await;
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(w.market.client(&w.key).await);
        }
        let mut calls = Vec::new();
        for i in 0..(2 * N) as usize {
            let peer = clients[i % clients.len()].peer().clone();
            calls.push(tokio::spawn(async move {
                peer.call_tool(
                    CallToolRequestParams::new("units__convert")
                        .with_arguments(args(json!({"value": i, "from": "m", "to": "cm"}))),
                )
                .await
            }));
        }
        let mut settled = 0;
        let mut refused = 0;
        for c in calls {
            let r = c.await.unwrap().expect("every call answers");
            if r.is_error == Some(true) {
                assert_eq!(error_kind(&r).as_deref(), Some("insufficient_credits"));
                refused += 1;
            } else {
                assert_eq!(receipt_of(&r).charged_micros, UNITS_PRICE);
                settled += 1;
            }
        }
        assert_eq!((settled, refused), (N, N), "{backend:?}");
        let b = w.market.balance(&w.user).await;
        assert_eq!(b.wallet_micros, 0);
        assert_eq!(b.holds_micros, 0);
        assert_eq!(
            w.market.balance(&w.creator).await.earnings_micros,
            N * UNITS_PRICE * 70 / 100
        );
        w.market.assert_ledger_ok().await;
        for c in clients {
            c.cancel().await.ok();
        }
        w.stop().await;
    }
}

#[tokio::test]
async fn a_hold_left_by_a_crash_is_refunded_at_start() {
    for backend in backends() {
        let w = World::start(backend, 100_000).await;
        let server = w.market.app.catalog.get("units").await.unwrap();
        // Simulate a process that reserved and died before settling.
        let reservation = mcp_marketplace::billing::Reservation {
            call_id: uuid::Uuid::now_v7().to_string(),
            account_id: w.user.id.clone(),
            key_id: "crashed".into(),
            server_id: server.id.clone(),
            tool: "convert".into(),
            price_micros: UNITS_PRICE,
            fee_bps: 3000,
            hold_expires_at: mcp_marketplace::store::now_ms() - 1,
            spend_limits: Vec::new(),
            request_bytes: 2,
        };
        w.market.app.ledger.reserve(&reservation).await.unwrap();
        assert_eq!(w.market.balance(&w.user).await.holds_micros, UNITS_PRICE);
        let World {
            market,
            user,
            units,
            notes,
            ..
        } = w;
        let db = market.stop().await;
        // Restart on the same database: the sweep at start refunds it.
        let market = Market::start(db).await;
        let b = market.balance(&user).await;
        assert_eq!((b.wallet_micros, b.holds_micros), (100_000, 0));
        market.assert_ledger_ok().await;
        market.stop().await;
        units.shutdown().await;
        notes.shutdown().await;
    }
}

#[tokio::test]
async fn insufficient_credits_is_refused_before_forwarding() {
    let w = World::start(Backend::Sqlite, UNITS_PRICE - 1).await;
    let client = w.market.client(&w.key).await;
    let r = client
        .call_tool(
            CallToolRequestParams::new("units__convert")
                .with_arguments(args(json!({"value": 1, "from": "m", "to": "cm"}))),
        )
        .await
        .unwrap();
    assert_eq!(r.is_error, Some(true));
    assert_eq!(error_kind(&r).as_deref(), Some("insufficient_credits"));
    assert!(text_of(&r).contains("Add credits"));
    assert_eq!(
        w.market.balance(&w.user).await.wallet_micros,
        UNITS_PRICE - 1
    );
    w.market.assert_ledger_ok().await;
    client.cancel().await.ok();
    w.stop().await;
}

#[tokio::test]
async fn owners_call_their_own_servers_free() {
    let w = World::start(Backend::Sqlite, 0).await;
    w.market.app.install(&w.creator.id, "units").await.unwrap();
    let key = w.market.key("creator", &[Scope::Invoke]).await;
    let client = w.market.client(&key).await;
    let r = client
        .call_tool(
            CallToolRequestParams::new("units__convert")
                .with_arguments(args(json!({"value": 1, "from": "kg", "to": "lb"}))),
        )
        .await
        .unwrap();
    assert_ne!(r.is_error, Some(true), "{r:?}");
    assert_eq!(receipt_of(&r).charged_micros, 0);
    assert_eq!(w.market.balance(&w.creator).await.earnings_micros, 0);
    w.market.assert_ledger_ok().await;
    client.cancel().await.ok();
    w.stop().await;
}

#[tokio::test]
async fn one_server_endpoint_uses_plain_names_and_is_metered() {
    for backend in backends() {
        let w = World::start(backend, 100_000).await;
        // No install is needed on /servers/{slug}/mcp: a fresh account sees the server.
        let other = w.market.account("other").await;
        w.market
            .app
            .ledger
            .topup(&other.id, 100_000, "test")
            .await
            .unwrap();
        let key = w.market.key("other", &[Scope::Invoke]).await;
        let client = client_at(&format!("{}/servers/units/mcp", w.market.base), &key).await;
        let names: Vec<_> = client
            .list_all_tools()
            .await
            .unwrap()
            .iter()
            .map(|t| t.name.to_string())
            .collect();
        assert!(
            names.contains(&"convert".to_owned()) && !names.iter().any(|n| n.contains("__")),
            "{names:?}"
        );
        let r = client
            .call_tool(
                CallToolRequestParams::new("convert")
                    .with_arguments(args(json!({"value": 0, "from": "C", "to": "F"}))),
            )
            .await
            .unwrap();
        assert!(text_of(&r).contains("32"), "{}", text_of(&r));
        assert_eq!(receipt_of(&r).charged_micros, UNITS_PRICE);
        assert_eq!(
            w.market.balance(&other).await.wallet_micros,
            100_000 - UNITS_PRICE
        );
        w.market.assert_ledger_ok().await;
        client.cancel().await.ok();
        w.stop().await;
    }
}
