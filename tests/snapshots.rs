//! The in-memory snapshots' change versions (issue 7 item 2): writes to the catalog or
//! auth tables by any process bump the database's version, the poller turns that into
//! a new generation; writes to per-call tables do not. On both backends.

mod common;

use common::{Backend, TestDb, backends};
use mcp_marketplace::store::{Domain, Store};

async fn exec(store: &Store, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_by_another_process_move_the_generation_of_their_domain_only() {
    for backend in backends() {
        versions_case(backend).await;
    }
}

async fn versions_case(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ours = Store::connect(&db.url).await.expect("store");
    // Another process on the same database: its own pool, its own Versions.
    let other = Store::connect(&db.url).await.expect("second store");
    let v = ours.versions().clone();
    // The first poll records the database's versions.
    v.poll_once().await.expect("poll");
    assert!(
        v.poll_once().await.expect("poll").is_empty(),
        "{backend:?}: nothing changed"
    );
    let (cat, auth) = (v.generation(Domain::Catalog), v.generation(Domain::Auth));

    // A catalog write by the other process.
    exec(
        &other,
        "INSERT INTO accounts (id, name, created_at) VALUES ('a1', 'alice', 1)",
    )
    .await;
    assert_eq!(
        v.poll_once().await.expect("poll"),
        vec![Domain::Auth],
        "{backend:?}: accounts are auth data"
    );
    exec(
        &other,
        "INSERT INTO servers (id, slug, name, owner_account_id, price_micros, status, secret, timeout_ms, created_at, updated_at) \
         VALUES ('s1', 'calendar', 'Calendar', 'a1', 20000, 'active', 'x', 5000, 1, 1)",
    )
    .await;
    assert_eq!(
        v.poll_once().await.expect("poll"),
        vec![Domain::Catalog],
        "{backend:?}"
    );
    assert!(v.generation(Domain::Catalog) > cat);
    assert!(v.generation(Domain::Auth) > auth);

    // Each catalog table the call path reads bumps the catalog version.
    for sql in [
        "UPDATE servers SET price_micros = 30000 WHERE id = 's1'",
        "UPDATE servers SET status = 'suspended' WHERE id = 's1'",
        "INSERT INTO server_endpoints (server_id, position, url) VALUES ('s1', 0, 'http://127.0.0.1:1/mcp')",
        "INSERT INTO tool_prices (server_id, tool, price_micros) VALUES ('s1', 'create', 5)",
        "INSERT INTO upstream_tools (server_id, name, namespaced_name, definition, position, hash) VALUES ('s1', 'create', 'calendar__create', '{}', 0, 'h')",
        "INSERT INTO tool_pins (server_id, tool, hash, approved_at, approved_by) VALUES ('s1', 'create', 'h', 1, 'test')",
        "INSERT INTO installs (account_id, server_id, created_at) VALUES ('a1', 's1', 1)",
        "INSERT INTO install_tools (account_id, server_id, tool) VALUES ('a1', 's1', 'create')",
        "INSERT INTO price_changes (id, server_id, tool, price_micros, effective_at, created_at) VALUES ('p1', 's1', '', 1, 1, 1)",
        "DELETE FROM installs WHERE account_id = 'a1'",
    ] {
        let before = v.generation(Domain::Catalog);
        exec(&other, sql).await;
        assert_eq!(
            v.poll_once().await.expect("poll"),
            vec![Domain::Catalog],
            "{backend:?}: {sql}"
        );
        assert!(v.generation(Domain::Catalog) > before, "{backend:?}: {sql}");
    }
    for sql in [
        "INSERT INTO api_keys (id, account_id, prefix, hash, scopes, created_at) VALUES ('k1', 'a1', 'mkt_abcdefgh', 'h1', 'invoke', 1)",
        "UPDATE api_keys SET revoked_at = 2 WHERE id = 'k1'",
    ] {
        exec(&other, sql).await;
        assert_eq!(
            v.poll_once().await.expect("poll"),
            vec![Domain::Auth],
            "{backend:?}: {sql}"
        );
    }

    // Bookkeeping columns and per-call tables move nothing.
    let (cat, auth) = (v.generation(Domain::Catalog), v.generation(Domain::Auth));
    exec(
        &other,
        "UPDATE servers SET tools_fetched_at = 5, updated_at = 5 WHERE id = 's1'",
    )
    .await;
    exec(
        &other,
        "INSERT INTO server_health (server_id, probe_failures, updated_at) VALUES ('s1', 1, 1)",
    )
    .await;
    assert!(v.poll_once().await.expect("poll").is_empty(), "{backend:?}");
    assert_eq!(v.generation(Domain::Catalog), cat);
    assert_eq!(v.generation(Domain::Auth), auth);

    // A write in this process moves the generation at once, without a poll.
    v.invalidate(Domain::Catalog);
    assert_eq!(v.generation(Domain::Catalog), cat + 1);
    assert_eq!(v.generation(Domain::Auth), auth);

    ours.close().await;
    other.close().await;
}

// ---------------------------------------------------------------------------------
// The catalog snapshot, as a user sees it: a change made through the product takes
// effect on the very next tools/list and tools/call; the same change written by another
// process (another connection pool on the same database, as the CLI or a replica
// would) within one second (polled every 20 ms, failing after 1 s).

use std::time::{Duration, Instant};

use common::{World, args, error_kind, receipt_of};
use mcp_marketplace::catalog::ServerStatus;
use mcp_marketplace::catalog::creator::PriceChange;
use mcp_marketplace::upstream::health::{self, Source};
use rmcp::RoleClient;
use rmcp::model::{CallToolRequestParams, CallToolResult, Tool};
use rmcp::service::RunningService;
use serde_json::json;

/// The bound on a change written by another process.
const OTHER_PROCESS_BOUND: Duration = Duration::from_secs(1);

async fn tools(client: &RunningService<RoleClient, ()>) -> Vec<Tool> {
    client.list_all_tools().await.expect("tools/list")
}

fn price_of(tools: &[Tool], name: &str) -> Option<i64> {
    let t = tools.iter().find(|t| t.name == name)?;
    t.meta.as_ref()?.0.get("mcp-marketplace/price")?["micros"].as_i64()
}

fn names(tools: &[Tool]) -> Vec<String> {
    tools.iter().map(|t| t.name.to_string()).collect()
}

async fn convert(client: &RunningService<RoleClient, ()>) -> Result<CallToolResult, String> {
    client
        .call_tool(
            CallToolRequestParams::new("units__convert")
                .with_arguments(args(json!({"value": 10, "from": "km", "to": "mi"}))),
        )
        .await
        .map_err(|e| e.to_string())
}

/// Polls `check` (a fresh tools/list each time) until it holds, for at most
/// [`OTHER_PROCESS_BOUND`]; panics with `what` after.
async fn within_one_second(
    client: &RunningService<RoleClient, ()>,
    what: &str,
    check: impl Fn(&[Tool]) -> bool,
) {
    let start = Instant::now();
    loop {
        if check(&tools(client).await) {
            return;
        }
        assert!(
            start.elapsed() < OTHER_PROCESS_BOUND,
            "{what}: not seen within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn product_changes_take_effect_on_the_next_request() {
    for backend in backends() {
        product_case(backend).await;
    }
}

async fn product_case(backend: Backend) {
    let w = World::start(backend, 10_000_000).await;
    let client = w.market.client(&w.key).await;
    let app = &w.market.app;
    let listed = tools(&client).await;
    assert_eq!(
        price_of(&listed, "units__convert"),
        Some(common::UNITS_PRICE)
    );

    // A price change by the creator: the next list and call use it.
    let units = app.catalog.get("units").await.expect("units");
    app.catalog
        .change_prices(
            &units,
            &PriceChange {
                pricing: Some("0.03_per_request".into()),
                ..PriceChange::default()
            },
        )
        .await
        .expect("price change");
    assert_eq!(
        price_of(&tools(&client).await, "units__convert"),
        Some(30_000),
        "{backend:?}: new price listed at once"
    );
    let r = convert(&client).await.expect("call");
    assert_eq!(receipt_of(&r).charged_micros, 30_000, "{backend:?}");

    // A scheduled price change: in effect from its time on, at the first request after.
    let effective_at = mcp_marketplace::store::now_ms() + 300;
    app.catalog
        .change_prices(
            &units,
            &PriceChange {
                pricing: Some("0.04_per_request".into()),
                effective_at: Some(effective_at),
                ..PriceChange::default()
            },
        )
        .await
        .expect("scheduled price change");
    assert_eq!(
        price_of(&tools(&client).await, "units__convert"),
        Some(30_000),
        "{backend:?}: not yet"
    );
    while mcp_marketplace::store::now_ms() <= effective_at {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        price_of(&tools(&client).await, "units__convert"),
        Some(40_000),
        "{backend:?}: due"
    );
    let r = convert(&client).await.expect("call");
    assert_eq!(receipt_of(&r).charged_micros, 40_000, "{backend:?}");

    // Uninstall and install.
    assert!(app.uninstall(&w.user.id, "units").await.expect("uninstall"));
    let after = names(&tools(&client).await);
    assert!(
        !after.iter().any(|n| n.starts_with("units__")),
        "{backend:?}: {after:?}"
    );
    assert!(convert(&client).await.is_err(), "{backend:?}: unknown tool");
    assert!(app.install(&w.user.id, "units").await.expect("install"));
    assert!(names(&tools(&client).await).contains(&"units__convert".to_owned()));
    assert!(convert(&client).await.is_ok());

    // Suspension: hidden and not callable at once.
    app.suspend("units").await.expect("suspend");
    assert!(
        !names(&tools(&client).await).contains(&"units__convert".to_owned()),
        "{backend:?}: suspended server hidden"
    );
    assert!(
        convert(&client).await.is_err(),
        "{backend:?}: unknown tool once suspended"
    );
    app.approve("units").await.expect("approve again");
    assert!(names(&tools(&client).await).contains(&"units__convert".to_owned()));

    // A status change to inactive (the health status machine): hidden, and a call
    // answers upstream_unavailable, uncharged.
    let units = app.catalog.get("units").await.expect("units");
    assert!(
        health::transition(
            app,
            &units,
            ServerStatus::Active,
            ServerStatus::Inactive,
            Source::Probe,
            "test"
        )
        .await
        .expect("transition")
    );
    assert!(
        !names(&tools(&client).await).contains(&"units__convert".to_owned()),
        "{backend:?}: inactive server hidden"
    );
    let before = w.market.balance(&w.user).await;
    let r = convert(&client).await.expect("a tool result");
    assert_eq!(
        error_kind(&r).as_deref(),
        Some("upstream_unavailable"),
        "{backend:?}"
    );
    assert_eq!(
        w.market.balance(&w.user).await.wallet_micros,
        before.wallet_micros,
        "{backend:?}: not charged"
    );

    client.cancel().await.ok();
    w.market.assert_ledger_ok().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_by_another_process_take_effect_within_one_second() {
    for backend in backends() {
        other_process_case(backend).await;
    }
}

async fn other_process_case(backend: Backend) {
    let w = World::start(backend, 10_000_000).await;
    let client = w.market.client(&w.key).await;
    // Another process on the same database: its own pool, nothing shared in memory.
    let other = Store::connect(&w.market.db.url).await.expect("other store");
    assert_eq!(
        price_of(&tools(&client).await, "units__convert"),
        Some(common::UNITS_PRICE)
    );

    // A price change.
    exec(
        &other,
        "UPDATE servers SET price_micros = 50000 WHERE slug = 'units'",
    )
    .await;
    within_one_second(&client, "price change", |t| {
        price_of(t, "units__convert") == Some(50_000)
    })
    .await;
    let r = convert(&client).await.expect("call");
    assert_eq!(
        receipt_of(&r).charged_micros,
        50_000,
        "{backend:?}: the call reserves the new price"
    );

    // An uninstall, then an install.
    exec(
        &other,
        &format!(
            "DELETE FROM installs WHERE account_id = '{}' AND server_id = (SELECT id FROM servers WHERE slug = 'units')",
            w.user.id
        ),
    )
    .await;
    within_one_second(&client, "uninstall", |t| {
        !names(t).contains(&"units__convert".to_owned())
    })
    .await;
    exec(
        &other,
        &format!(
            "INSERT INTO installs (account_id, server_id, created_at) SELECT '{}', id, 1 FROM servers WHERE slug = 'units'",
            w.user.id
        ),
    )
    .await;
    within_one_second(&client, "install", |t| {
        names(t).contains(&"units__convert".to_owned())
    })
    .await;

    // A suspension.
    exec(
        &other,
        "UPDATE servers SET status = 'suspended' WHERE slug = 'units'",
    )
    .await;
    within_one_second(&client, "suspension", |t| {
        !names(t).contains(&"units__convert".to_owned())
    })
    .await;
    assert!(convert(&client).await.is_err(), "{backend:?}: unknown tool");

    // Back, then inactive.
    exec(
        &other,
        "UPDATE servers SET status = 'active' WHERE slug = 'units'",
    )
    .await;
    within_one_second(&client, "reactivation", |t| {
        names(t).contains(&"units__convert".to_owned())
    })
    .await;
    exec(
        &other,
        "UPDATE servers SET status = 'inactive' WHERE slug = 'units'",
    )
    .await;
    within_one_second(&client, "inactive", |t| {
        !names(t).contains(&"units__convert".to_owned())
    })
    .await;
    let r = convert(&client).await.expect("a tool result");
    assert_eq!(
        error_kind(&r).as_deref(),
        Some("upstream_unavailable"),
        "{backend:?}"
    );

    other.close().await;
    client.cancel().await.ok();
    w.market.assert_ledger_ok().await;
    w.stop().await;
}
