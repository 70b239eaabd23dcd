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
