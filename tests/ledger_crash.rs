//! Group commit under a crash: a real child process runs many concurrent paid calls'
//! reserve and settle through the ledger and prints each call id once its settle
//! returned; the test kills it with SIGKILL mid-load, then shows on the database the
//! child left behind that no call it reported settled was lost, that no call was
//! charged twice, and that every ledger invariant holds once the sweep refunded the
//! holds of calls caught in flight. SQLite always, PostgreSQL when `TEST_DATABASE_URL`
//! is set.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{Backend, TestDb, backends};
use mcp_marketplace::app::App;
use mcp_marketplace::auth::Scope;
use mcp_marketplace::auth::accounts::create_account;
use mcp_marketplace::auth::keys::{NewKey, create_key, key_id_of};
use mcp_marketplace::billing::{CallStats, Ledger, Reservation};
use mcp_marketplace::catalog::NewServer;
use mcp_marketplace::store::Store;
use sqlx::Row;

const CHILD_ENV: &str = "MKT_LEDGER_CRASH_CHILD";
/// Calls the child has in flight at once.
const IN_FLIGHT: usize = 16;
/// Settled calls the parent waits for before the kill.
const SETTLED_BEFORE_KILL: usize = 200;
const PRICE: i64 = 1_000;
const FUNDS: i64 = 1_000_000_000;

/// What the child needs, passed in one environment variable.
#[derive(serde::Serialize, serde::Deserialize)]
struct ChildArgs {
    database_url: String,
    account_id: String,
    key_id: String,
    server_id: String,
}

/// The child: runs until killed. Not a test of its own (returns at once without the
/// variable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    let args: ChildArgs = serde_json::from_str(&args).expect("child arguments");
    let store = Store::connect(&args.database_url).await.expect("store");
    let ledger = Ledger::new(store);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for _ in 0..IN_FLIGHT {
        let (ledger, tx) = (ledger.clone(), tx.clone());
        let (account_id, key_id, server_id) = (
            args.account_id.clone(),
            args.key_id.clone(),
            args.server_id.clone(),
        );
        tokio::spawn(async move {
            loop {
                let r = Reservation {
                    call_id: uuid::Uuid::now_v7().to_string(),
                    account_id: account_id.clone(),
                    key_id: key_id.clone(),
                    server_id: server_id.clone(),
                    tool: "echo".into(),
                    price_micros: PRICE,
                    fee_bps: 3000,
                    // Already expired: the parent's sweep refunds whatever the kill
                    // caught between reserve and settle.
                    hold_expires_at: 0,
                    spend_limits: Vec::new(),
                    request_bytes: 1,
                };
                ledger.reserve(&r).await.expect("reserve");
                ledger
                    .settle(&r.call_id, CallStats::default())
                    .await
                    .expect("settle");
                if tx.send(r.call_id).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    while let Some(id) = rx.recv().await {
        // One line per settled call, flushed before the next: the parent trusts every
        // line it read.
        writeln!(out, "settled {id}").expect("stdout");
        out.flush().expect("stdout");
    }
}

async fn setup(db: &TestDb) -> ChildArgs {
    let mut config = common::test_config(db);
    config.allow_upstream_hosts = vec!["127.0.0.1".into()];
    let app = App::new(config).await.expect("app");
    let creator = create_account(&app.store, "creator")
        .await
        .expect("creator");
    let user = create_account(&app.store, "user").await.expect("user");
    let (server, _secret) = app
        .catalog
        .register(
            &creator.id,
            &NewServer {
                name: "Echo".into(),
                slug: Some("echo".into()),
                endpoints: vec!["http://127.0.0.1:9/mcp".into()],
                pricing: "0.001_per_request".into(),
                ..NewServer::default()
            },
            &app.policy,
        )
        .await
        .expect("register");
    app.ledger
        .topup(&user.id, FUNDS, "crash test")
        .await
        .expect("topup");
    let (record, _) = create_key(
        &app.store,
        "user",
        &NewKey {
            scopes: vec![Scope::Invoke],
            ..NewKey::default()
        },
    )
    .await
    .expect("key");
    assert_eq!(
        key_id_of(&app.store, &record.key_id).await.expect("key id"),
        record.key_id
    );
    app.store.close().await;
    ChildArgs {
        database_url: db.url.clone(),
        account_id: user.id,
        key_id: record.key_id,
        server_id: server.id,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_no_settled_call_and_charges_none_twice() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    for backend in backends() {
        run(backend).await;
    }
}

async fn run(backend: Backend) {
    let db = TestDb::new(backend).await;
    let args = setup(&db).await;
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, serde_json::to_string(&args).expect("json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("child stdout");
    // Read on a thread: the kill happens while lines are still coming.
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(id) = line.strip_prefix("settled ")
                && lines_tx.send(id.to_owned()).is_err()
            {
                return;
            }
        }
    });
    let mut settled = Vec::new();
    while settled.len() < SETTLED_BEFORE_KILL {
        match lines_rx.recv() {
            Ok(id) => settled.push(id),
            Err(_) => panic!("the child stopped after {} calls", settled.len()),
        }
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    assert!(!status.success(), "the child was killed");
    reader.join().expect("reader");
    settled.extend(lines_rx.try_iter());

    let store = Store::connect(&db.url).await.expect("reopen");
    let ledger = Ledger::new(store.clone());
    // Every call the child reported settled is settled, with one reserve and one settle.
    for id in &settled {
        let row = sqlx::query(
            "SELECT c.status, \
             CAST((SELECT COUNT(*) FROM ledger_transfers t WHERE t.call_id = c.id AND t.kind = 'reserve') AS BIGINT), \
             CAST((SELECT COUNT(*) FROM ledger_transfers t WHERE t.call_id = c.id AND t.kind = 'settle') AS BIGINT), \
             CAST((SELECT COUNT(*) FROM ledger_transfers t WHERE t.call_id = c.id AND t.kind = 'refund') AS BIGINT) \
             FROM calls c WHERE c.id = $1",
        )
        .bind(id)
        .fetch_optional(store.pool())
        .await
        .expect("query")
        .unwrap_or_else(|| panic!("{backend:?}: settled call {id} was lost"));
        let status: String = row.get(0);
        let (reserves, settles, refunds): (i64, i64, i64) = (row.get(1), row.get(2), row.get(3));
        assert_eq!(
            (status.as_str(), reserves, settles, refunds),
            ("settled", 1, 1, 0),
            "{backend:?}: call {id}"
        );
    }
    // Calls caught between reserve and settle hold money until the sweep refunds them.
    let swept = ledger
        .sweep_expired_holds(mcp_marketplace::store::now_ms())
        .await
        .expect("sweep");
    let broken = ledger.verify().await.expect("verify");
    assert!(broken.is_empty(), "{backend:?}: ledger verify: {broken:?}");
    // Charged exactly once per settled call: the wallet paid PRICE per settled row.
    let settled_rows: i64 =
        sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM calls WHERE status = 'settled'")
            .fetch_one(store.pool())
            .await
            .expect("count");
    assert!(settled_rows as usize >= settled.len());
    let balance = ledger
        .account_balance(&args.account_id)
        .await
        .expect("balance");
    assert_eq!(balance.holds_micros, 0, "{backend:?}: no hold left");
    assert_eq!(
        balance.wallet_micros,
        FUNDS - settled_rows * PRICE,
        "{backend:?}: the wallet paid once per settled call ({swept} swept)"
    );
    store.close().await;
}
