//! Shared test harness: a real marketplace on 127.0.0.1:0 over a real SQLite file or a
//! fresh PostgreSQL database, real example upstreams, real rmcp clients.
#![allow(dead_code)]

pub mod books;
pub mod fault;
pub mod raw;

use std::sync::Arc;

use mcp_marketplace::app::App;
use mcp_marketplace::auth::Scope;
use mcp_marketplace::auth::accounts::{Account, create_account};
use mcp_marketplace::auth::keys::{NewKey, create_key};
use mcp_marketplace::billing::ledger::{AccountBalance, PlatformBalance};
use mcp_marketplace::catalog::NewServer;
use mcp_marketplace::config::Config;
use mcp_marketplace::demo::upstreams::{self, ExampleServer, SecretSlot};
use mcp_marketplace::security::ssrf::StaticLookup;
use mcp_marketplace::security::vault::MasterKeySource;
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// SQLite always; PostgreSQL too when `TEST_DATABASE_URL` is set (CI sets it).
pub fn backends() -> Vec<Backend> {
    let mut b = vec![Backend::Sqlite];
    if std::env::var("TEST_DATABASE_URL").is_ok_and(|v| !v.is_empty()) {
        b.push(Backend::Postgres);
    }
    b
}

/// A fresh, empty database, removed when dropped, with a temporary directory for its
/// master key file.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("market.db").display());
                Self {
                    url,
                    backend,
                    dir,
                    pg: None,
                }
            }
            Backend::Postgres => {
                let admin = std::env::var("TEST_DATABASE_URL").expect("TEST_DATABASE_URL");
                let name = format!("mkt_test_{}", uuid::Uuid::now_v7().simple());
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("connect to TEST_DATABASE_URL");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let mut url = url::Url::parse(&admin).expect("TEST_DATABASE_URL is a URL");
                url.set_path(&format!("/{name}"));
                Self {
                    url: url.to_string(),
                    backend,
                    dir: tempfile::tempdir().expect("temp dir"),
                    pg: Some((admin, name)),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut conn)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

/// A running marketplace.
pub struct Market {
    pub app: Arc<App>,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub db: TestDb,
    /// The DNS answers upstream names get (no test ever asks a real DNS server).
    pub dns: Arc<StaticLookup>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A public address that names in tests resolve to. Registration only checks it; no
/// test ever connects to it.
pub const PUBLIC_TEST_IP: &str = "93.184.215.14";

/// Names the test DNS knows: a public one (the registration tests'), and the standard
/// hostile answers of the SSRF tests.
pub fn test_dns() -> Arc<StaticLookup> {
    let dns = Arc::new(StaticLookup::new(None));
    let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("an IP") };
    for name in [
        "calendar.example.com",
        "x.example.com",
        "public.test",
        "rebind.test",
    ] {
        dns.set(name, &[ip(PUBLIC_TEST_IP)]);
    }
    dns.set("localhost", &[ip("127.0.0.1"), ip("::1")]);
    dns.set("private.test", &[ip("10.1.2.3")]);
    dns.set("metadata.test", &[ip("169.254.169.254")]);
    dns.set("mixed.test", &[ip(PUBLIC_TEST_IP), ip("192.168.0.10")]);
    dns.set("mapped.test", &[ip("::ffff:127.0.0.1")]);
    dns.set("ula.test", &[ip("fd00:ec2::254")]);
    dns.set("cgnat.test", &[ip("100.64.1.1")]);
    dns.set("empty.test", &[]);
    dns
}

/// The master key of in-process test marketplaces (64 hex digits); the CLI tests give
/// it to the binary as `MCP_MARKETPLACE_MASTER_KEY`.
pub const TEST_MASTER_KEY: &str =
    "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

pub fn test_config(db: &TestDb) -> Config {
    Config {
        listen: "127.0.0.1:0".into(),
        database_url: db.url.clone(),
        allow_upstream_hosts: vec!["127.0.0.1".into()],
        master_key: MasterKeySource::Material(TEST_MASTER_KEY.into()),
        ..Config::default()
    }
}

impl Market {
    pub async fn start(db: TestDb) -> Self {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: TestDb, tweak: impl FnOnce(&mut Config)) -> Self {
        mcp_marketplace::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = test_config(&db);
        config.listen = addr.to_string();
        config.public_url = format!("http://{addr}");
        let dns = test_dns();
        config.lookup = Some(dns.clone());
        tweak(&mut config);
        let app = App::new(config).await.expect("marketplace starts");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let app = app.clone();
            let shutdown = shutdown.clone();
            async move {
                app.serve(listener, shutdown).await;
            }
        });
        Self {
            app,
            base: format!("http://{addr}"),
            db,
            dns,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) -> TestDb {
        self.shutdown.cancel();
        let _ = self.task.await;
        self.app.store.close().await;
        self.db
    }

    pub fn mcp_url(&self) -> String {
        format!("{}/mcp", self.base)
    }

    /// `GET /.well-known/jwks.json`: the keys receipts and upstream tokens verify with.
    pub async fn jwks(&self) -> serde_json::Value {
        reqwest::get(format!("{}/.well-known/jwks.json", self.base))
            .await
            .expect("GET jwks")
            .json()
            .await
            .expect("jwks is JSON")
    }

    pub async fn account(&self, name: &str) -> Account {
        create_account(&self.app.store, name)
            .await
            .expect("account")
    }

    pub async fn key(&self, account: &str, scopes: &[Scope]) -> String {
        create_key(
            &self.app.store,
            account,
            &NewKey {
                scopes: scopes.to_vec(),
                ..NewKey::default()
            },
        )
        .await
        .expect("key")
        .1
    }

    /// Registers `url` as `slug` owned by `owner` (pending review); returns the secret.
    pub async fn register(&self, owner: &Account, slug: &str, url: &str, pricing: &str) -> String {
        let new = NewServer {
            name: slug.to_owned(),
            slug: Some(slug.to_owned()),
            endpoints: vec![url.to_owned()],
            pricing: pricing.to_owned(),
            timeout_ms: Some(5_000),
            ..NewServer::default()
        };
        self.app
            .catalog
            .register(&owner.id, &new, &self.app.policy)
            .await
            .expect("register")
            .1
    }

    pub async fn balance(&self, account: &Account) -> AccountBalance {
        self.app
            .ledger
            .account_balance(&account.id)
            .await
            .expect("balance")
    }

    pub async fn platform(&self) -> PlatformBalance {
        self.app
            .ledger
            .platform_balance()
            .await
            .expect("platform balance")
    }

    pub async fn assert_ledger_ok(&self) {
        let broken = self.app.ledger.verify().await.expect("verify");
        assert!(broken.is_empty(), "ledger invariants broken: {broken:?}");
    }

    pub async fn client(&self, key: &str) -> RunningService<RoleClient, ()> {
        client_at(&self.mcp_url(), key).await
    }
}

pub async fn client_at(url: &str, key: &str) -> RunningService<RoleClient, ()> {
    mcp_marketplace::install_crypto_provider();
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(url).auth_header(key),
    );
    ().serve(transport).await.expect("MCP client connects")
}

/// Prices of the standard world, micros.
pub const UNITS_PRICE: i64 = 20_000;
pub const NOTES_PRICE: i64 = 10_000;

/// The standard world: a creator with the two example servers approved, a user who
/// installed both and holds `funds` micros, and the user's key.
pub struct World {
    pub market: Market,
    pub creator: Account,
    pub user: Account,
    pub key: String,
    pub units: ExampleServer,
    pub notes: ExampleServer,
}

impl World {
    pub async fn start(backend: Backend, funds: i64) -> Self {
        Self::start_with(backend, funds, |_, _| {}).await
    }

    /// As [`World::start`], with `tweak` adjusting the marketplace's configuration; it
    /// also gets the `HOST:PORT` of the two upstreams.
    pub async fn start_with(
        backend: Backend,
        funds: i64,
        tweak: impl FnOnce(&mut Config, &[String]),
    ) -> Self {
        let units = upstreams::spawn_unit_converter(bind().await, SecretSlot::default())
            .await
            .expect("units");
        let notes = upstreams::spawn_notes(bind().await, SecretSlot::default())
            .await
            .expect("notes");
        let addrs = [units.addr.to_string(), notes.addr.to_string()];
        let market = Market::start_with(TestDb::new(backend).await, |c| tweak(c, &addrs)).await;
        let creator = market.account("creator").await;
        let user = market.account("user").await;
        for (slug, server, pricing) in [
            ("units", &units, "0.02_per_request"),
            ("notes", &notes, "0.01_per_request"),
        ] {
            let secret = market.register(&creator, slug, &server.url, pricing).await;
            *server.secret.write().expect("secret slot") = Some(secret);
            market.app.approve(slug).await.expect("approve");
            market.app.install(&user.id, slug).await.expect("install");
        }
        if funds > 0 {
            market
                .app
                .ledger
                .topup(&user.id, funds, "test")
                .await
                .expect("topup");
        }
        let key = market
            .key("user", &[Scope::Invoke, Scope::CatalogRead])
            .await;
        Self {
            market,
            creator,
            user,
            key,
            units,
            notes,
        }
    }

    pub async fn stop(self) {
        self.market.stop().await;
        self.units.shutdown().await;
        self.notes.shutdown().await;
    }
}

pub async fn bind() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
}

/// `arguments` of a tool call from a JSON object literal.
pub fn args(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().cloned().expect("arguments are an object")
}

/// Counts that a refused request must not move: catalog rows (servers, endpoints,
/// installs, pins, credentials, policies), keys, ledger transfers and entries, calls,
/// the sum of every wallet, and what the keys' spend counters hold.
pub async fn snapshot(market: &Market) -> Vec<i64> {
    use sqlx::Row;
    let pool = market.app.store.pool();
    let mut out = Vec::new();
    for q in [
        "SELECT CAST(COUNT(*) AS BIGINT) FROM servers",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM server_endpoints",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM installs",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM tool_pins",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM server_credentials",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM trust_policies",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM api_keys",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM ledger_transfers",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM ledger_entries",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM calls",
        "SELECT CAST(COALESCE(SUM(balance), 0) AS BIGINT) FROM ledger_accounts WHERE kind = 'wallet'",
        "SELECT CAST(COALESCE(SUM(spent_micros), 0) AS BIGINT) FROM key_spend_counters",
    ] {
        out.push(
            sqlx::query(q)
                .fetch_one(pool)
                .await
                .expect("snapshot query")
                .try_get::<i64, _>(0)
                .expect("a count"),
        );
    }
    out
}

/// The receipt in a tool result's `_meta`.
pub fn receipt_of(result: &rmcp::model::CallToolResult) -> mcp_marketplace::billing::Receipt {
    let meta = result.meta.as_ref().expect("result has _meta");
    let value = meta
        .0
        .get("mcp-marketplace/receipt")
        .expect("receipt in _meta");
    serde_json::from_value(value.clone()).expect("receipt parses")
}

/// `_meta["mcp-marketplace/error"].kind` of a tool result.
pub fn error_kind(result: &rmcp::model::CallToolResult) -> Option<String> {
    result
        .meta
        .as_ref()?
        .0
        .get("mcp-marketplace/error")?
        .get("kind")?
        .as_str()
        .map(str::to_owned)
}

/// The text content of a tool result, joined.
pub fn text_of(result: &rmcp::model::CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("")
}

/// Waits until `cond` holds, up to 10 s (no sleep-and-hope: polls every 20 ms).
pub async fn wait_until<F: std::future::Future<Output = bool>>(mut cond: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A market with the fault server (`fault::FaultServer`) registered as `faulty` at
/// 0.05 per call by `creator`, approved, installed for `user` who holds 1 USD; returns
/// the market, the server, the user and the user's key (invoke, catalog:read).
pub async fn faulty_world(backend: Backend) -> (Market, fault::FaultServer, Account, String) {
    with_faulty(Market::start(TestDb::new(backend).await).await).await
}

/// As [`faulty_world`] on an already started `market`.
pub async fn with_faulty(market: Market) -> (Market, fault::FaultServer, Account, String) {
    let creator = market.account("creator").await;
    let user = market.account("user").await;
    let fault = fault::FaultServer::start().await;
    let secret = market
        .register(&creator, "faulty", &fault.url, "0.05_per_request")
        .await;
    *fault.secret.write().unwrap() = Some(secret);
    market.app.approve("faulty").await.expect("approve");
    market.app.install(&user.id, "faulty").await.unwrap();
    market
        .app
        .ledger
        .topup(&user.id, 1_000_000, "test")
        .await
        .unwrap();
    let key = market
        .key("user", &[Scope::Invoke, Scope::CatalogRead])
        .await;
    (market, fault, user, key)
}

/// Sets the trust policy of one subject.
pub async fn set_policy(
    market: &Market,
    kind: mcp_marketplace::security::policy::SubjectKind,
    id: &str,
    policy: mcp_marketplace::security::policy::Policy,
) {
    market
        .app
        .policies
        .set(kind, id, &policy)
        .await
        .expect("policy set");
}
