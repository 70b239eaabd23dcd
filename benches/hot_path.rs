//! Criterion micro-benchmarks of the call path's pieces, on a real SQLite file (and
//! on PostgreSQL too when `TEST_DATABASE_URL` is set):
//!
//! - `ledger/reserve+settle/N`: one paid call's two ledger phases, with `N` calls in
//!   flight at once (1 = each call alone, so one commit per phase and one fsync per
//!   call; 32 and 256 = the group commit batches concurrent calls, 256 being the most
//!   one batch takes). Throughput is settled calls per second;
//! - `ledger/reserve+refund/1`: a failed call's two phases;
//! - `ledger/reserve+settle limited/32`: the same by a key with a daily and a monthly
//!   spend limit, after it made 50,000 calls in the day (each reservation checks both
//!   limits);
//! - `catalog/resolve`: `{slug}__{tool}` → server and tool, for an account that
//!   installed 20 servers of 500 tools;
//! - `gateway/tools_list/10000`: the `tools/list` answer of that account (10,000
//!   catalog tools, each with its price in `_meta`);
//! - `gateway/tools_list_allow_list/10000`: the same for a key whose allow-list (two
//!   glob patterns) admits 1,000 of them;
//! - `scan/{english,french,japanese}/262144`: the response scan of a 256 KiB text
//!   result (`security::scan`, run on every result in the default `flag` mode);
//!   throughput in bytes.
//!
//! ```text
//! cargo bench --bench hot_path                 # all
//! cargo bench --bench hot_path -- ledger       # one group
//! ```
//!
//! Under `cargo test --all-targets` criterion runs every benchmark once, as a smoke test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mcp_marketplace::app::App;
use mcp_marketplace::auth::Scope;
use mcp_marketplace::auth::accounts::create_account;
use mcp_marketplace::auth::keys::{NewKey, authenticate, create_key, parse_allow_tools};
use mcp_marketplace::auth::signing::UpstreamClaims;
use mcp_marketplace::billing::plans::{PlanBook, PlanFile, QuotaSetting};
use mcp_marketplace::billing::{CallStats, Reservation};
use mcp_marketplace::catalog::{NewServer, ServerStatus};
use mcp_marketplace::config::Config;
use mcp_marketplace::gateway::Caller;
use serde_json::json;
use tokio::runtime::Runtime;

/// The product binary's allocator ([`mcp_marketplace::Allocator`]).
#[global_allocator]
static ALLOCATOR: mcp_marketplace::Allocator = mcp_marketplace::ALLOCATOR;

/// Servers × tools per server = the 10,000 tools of the `tools/list` benchmark.
const SERVERS: usize = 20;
const TOOLS_PER_SERVER: usize = 500;
/// Price of the benchmark's paid tool, micros.
const PRICE_MICROS: i64 = 100;

struct World {
    app: Arc<App>,
    caller: Caller,
    /// The same account through a key allowed `srv00__*,srv01__tool_*` (1,000 tools).
    allowed: Caller,
    account_id: String,
    key_id: String,
    /// A key of the same account with [`LIMITS`].
    limited_key_id: String,
    server_id: String,
    _dir: Option<tempfile::TempDir>,
}

/// The limited key's spend limits, micros: a day and a month, too high to refuse a call.
const LIMITS: [(i64, &str); 2] = [(1_000_000_000_000, "day"), (1_000_000_000_000, "month")];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

async fn fresh_postgres(admin: &str) -> String {
    use sqlx::Connection;
    let name = format!("mkt_bench_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .expect("connect to TEST_DATABASE_URL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create the benchmark database");
    let mut url = url::Url::parse(admin).expect("TEST_DATABASE_URL is a URL");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// A marketplace (not serving) with a funded account, a key, and `SERVERS` active,
/// installed servers of `TOOLS_PER_SERVER` approved tools each.
async fn world(backend: &str) -> World {
    mcp_marketplace::install_crypto_provider();
    let (database_url, dir) = if backend == "sqlite" {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        (url, Some(dir))
    } else {
        (fresh_postgres(backend).await, None)
    };
    let mut config = Config {
        database_url,
        allow_upstream_hosts: vec!["127.0.0.1".into()],
        ..Config::default()
    };
    // No monthly quota: the benchmark runs more calls than the default plan allows.
    let unlimited = PlanFile {
        monthly_calls: Some(QuotaSetting::Text("unlimited".into())),
        ..PlanFile::default()
    };
    config.billing.plans = Arc::new(
        PlanBook::from_config(&[("free".to_owned(), unlimited)].into(), None)
            .expect("an unlimited free plan"),
    );
    let app = App::new(config).await.expect("the marketplace starts");
    let creator = create_account(&app.store, "creator")
        .await
        .expect("account");
    let user = create_account(&app.store, "user").await.expect("account");
    app.ledger
        .topup(&user.id, 1_000_000 * 1_000_000, "bench")
        .await
        .expect("top-up");
    let key = create_key(
        &app.store,
        "user",
        &NewKey {
            scopes: vec![Scope::Invoke],
            ..NewKey::default()
        },
    )
    .await
    .expect("key")
    .1;
    let key = authenticate(&app.store, &key).await.expect("the key works");
    let limited = create_key(
        &app.store,
        "user",
        &NewKey {
            scopes: vec![Scope::Invoke],
            spend_limits: LIMITS.iter().map(|(m, p)| (*m, (*p).to_owned())).collect(),
            ..NewKey::default()
        },
    )
    .await
    .expect("key")
    .0
    .key_id;
    let allowed = create_key(
        &app.store,
        "user",
        &NewKey {
            scopes: vec![Scope::Invoke],
            allow_tools: parse_allow_tools("srv00__*,srv01__tool_*").expect("globs"),
            ..NewKey::default()
        },
    )
    .await
    .expect("key")
    .1;
    let allowed = authenticate(&app.store, &allowed)
        .await
        .expect("the key works");
    let mut server_id = String::new();
    for s in 0..SERVERS {
        let slug = format!("srv{s:02}");
        let new = NewServer {
            name: format!("Server {s}"),
            slug: Some(slug.clone()),
            // Never contacted: the tools are written straight into the catalog.
            endpoints: vec![format!("http://127.0.0.1:9/{slug}")],
            pricing: format!("0.{PRICE_MICROS:06}_per_request"),
            ..NewServer::default()
        };
        let (server, _secret) = app
            .catalog
            .register(&creator.id, &new, &app.policy)
            .await
            .expect("register");
        let tools: Vec<serde_json::Value> = (0..TOOLS_PER_SERVER)
            .map(|t| {
                json!({
                    "name": format!("tool_{t:03}"),
                    "description": format!("Tool {t} of server {s}: does one thing well."),
                    "inputSchema": {"type": "object", "properties": {
                        "query": {"type": "string", "description": "What to look for."},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 100}},
                        "required": ["query"]},
                    "annotations": {"readOnlyHint": true},
                })
            })
            .collect();
        app.catalog
            .replace_tools(&server, &tools)
            .await
            .expect("tools");
        app.catalog
            .approve_tools(&server.id, None, "bench")
            .await
            .expect("approve tools");
        app.catalog
            .set_status(&slug, ServerStatus::Active)
            .await
            .expect("activate");
        app.catalog.install(&user.id, &slug).await.expect("install");
        server_id = server.id;
    }
    World {
        caller: Caller {
            key: key.clone(),
            slug: None,
        },
        allowed: Caller {
            key: allowed,
            slug: None,
        },
        account_id: key.account_id,
        key_id: key.key_id,
        limited_key_id: limited,
        server_id,
        app,
        _dir: dir,
    }
}

/// A reservation of one call by the bench key or, when `limited`, by the key with
/// [`LIMITS`], so that the batch checks both (reading the key's spend counters).
fn reservation(w: &World, limited: bool) -> Reservation {
    Reservation {
        call_id: uuid::Uuid::now_v7().to_string(),
        account_id: w.account_id.clone(),
        key_id: if limited {
            w.limited_key_id.clone()
        } else {
            w.key_id.clone()
        },
        server_id: w.server_id.clone(),
        tool: "tool_001".into(),
        price_micros: PRICE_MICROS,
        fee_bps: 3000,
        hold_expires_at: mcp_marketplace::store::now_ms() + 60_000,
        spend_limits: if limited {
            LIMITS.iter().map(|(m, p)| (*m, (*p).to_owned())).collect()
        } else {
            Vec::new()
        },
        request_bytes: 20,
    }
}

/// Runs `iters` reserve+settle (or refund) pairs, `in_flight` at a time, under spend
/// limits when `limited`; returns the wall time.
async fn calls(
    w: &Arc<World>,
    iters: u64,
    in_flight: u64,
    settle: bool,
    limited: bool,
) -> Duration {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..in_flight {
        let w = w.clone();
        let n = iters / in_flight + u64::from(i < iters % in_flight);
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                let r = reservation(&w, limited);
                w.app.ledger.reserve(&r).await.expect("reserve");
                let stats = CallStats {
                    latency_ms: 1,
                    response_bytes: 40,
                };
                if settle {
                    w.app
                        .ledger
                        .settle(&r.call_id, stats)
                        .await
                        .expect("settle");
                } else {
                    w.app
                        .ledger
                        .refund(&r.call_id, "upstream_error", stats)
                        .await
                        .expect("refund");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("a benchmark task");
    }
    started.elapsed()
}

fn backends() -> Vec<(String, String)> {
    let mut b = vec![("sqlite".to_owned(), "sqlite".to_owned())];
    if let Ok(pg) = std::env::var("TEST_DATABASE_URL")
        && !pg.is_empty()
    {
        b.push(("postgres".to_owned(), pg));
    }
    b
}

/// Bytes of text (UTF-8) in each `scan` benchmark's result, at most.
const SCAN_BYTES: usize = 256 * 1024;
/// What the `scan` benchmarks repeat: ordinary text a tool returns, none of it a
/// finding.
const SCAN_PROSE: [(&str, &str); 3] = [
    (
        "english",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor \
         incididunt ut labore. The new report was updated today; see the rules below. \
         {\"id\": 12, \"name\": \"widget\", \"tags\": [\"a\", \"b\"]}\n",
    ),
    (
        "french",
        "Le système a été mis à jour ; les données précédentes sont conservées. \
         Prix élevés, café noir, règles inchangées.\n",
    ),
    (
        "japanese",
        "日本語のテキストです。素早い茶色の狐が怠惰な犬を飛び越える。新しい報告書。\n",
    ),
];

fn benches(c: &mut Criterion) {
    let rt = runtime();
    for (label, backend) in backends() {
        let w = Arc::new(rt.block_on(world(&backend)));

        let mut g = c.benchmark_group(format!("ledger_{label}"));
        g.throughput(Throughput::Elements(1));
        for in_flight in [1u64, 32, 256] {
            g.bench_function(BenchmarkId::new("reserve+settle", in_flight), |b| {
                b.iter_custom(|iters| rt.block_on(calls(&w, iters, in_flight, true, false)));
            });
        }
        g.bench_function(BenchmarkId::new("reserve+refund", 1), |b| {
            b.iter_custom(|iters| rt.block_on(calls(&w, iters, 1, false, false)));
        });
        // Before it is measured (only when it is run), the limited key makes 50,000 calls
        // (this day, this month; 100 in the smoke test of `cargo test`, which runs
        // without `--bench`): its spend-limit check must not cost more as its calls
        // accumulate.
        let mut earlier = if std::env::args().any(|a| a == "--bench") {
            50_000
        } else {
            100
        };
        g.bench_function(BenchmarkId::new("reserve+settle limited", 32), |b| {
            rt.block_on(calls(&w, std::mem::take(&mut earlier), 256, true, true));
            b.iter_custom(|iters| rt.block_on(calls(&w, iters, 32, true, true)));
        });
        g.finish();

        let mut g = c.benchmark_group(format!("catalog_{label}"));
        g.bench_function("resolve", |b| {
            b.iter(|| {
                rt.block_on(w.app.catalog.resolve(&w.account_id, "srv07__tool_123"))
                    .expect("resolve")
                    .expect("installed")
            });
        });
        g.finish();

        if label == "sqlite" {
            // The two Ed25519 signatures of every call: the upstream's per-call token
            // and the receipt.
            let mut g = c.benchmark_group("signing");
            let signer = &w.app.signer;
            g.bench_function("upstream_token", |b| {
                b.iter(|| {
                    signer
                        .upstream_token(&UpstreamClaims {
                            iss: "http://127.0.0.1:8080".into(),
                            aud: "srv07".into(),
                            sub: signer.pseudonym(&w.account_id, "srv07"),
                            jti: "0193a4d2-7c1e-7000-8000-000000000000".into(),
                            iat: 1_796_000_000,
                            exp: 1_796_000_060,
                            tool: "tool_123".into(),
                            price_micros: 100,
                        })
                        .expect("token")
                });
            });
            g.bench_function("receipt", |b| {
                b.iter(|| signer.sign(b"a receipt's canonical bytes, about this long"));
            });
            g.finish();

            let mut g = c.benchmark_group("scan");
            for (name, prose) in SCAN_PROSE {
                let text: String = prose
                    .chars()
                    .cycle()
                    .scan(0, |len, c| {
                        *len += c.len_utf8();
                        (*len <= SCAN_BYTES).then_some(c)
                    })
                    .collect();
                g.throughput(Throughput::Bytes(text.len() as u64));
                let result = json!({"content": [{"type": "text", "text": text}]});
                g.bench_function(BenchmarkId::new(name, SCAN_BYTES), |b| {
                    b.iter(|| {
                        let findings = mcp_marketplace::security::scan::scan(&result);
                        assert!(findings.is_empty(), "{name}: {findings:?}");
                    });
                });
            }
            g.finish();
        }

        let mut g = c.benchmark_group(format!("gateway_{label}"));
        g.sample_size(10);
        // The whole account's tools (its 10,000 and the marketplace's own), then the
        // 1,000 the allow-listed key admits.
        let whole: fn(usize) -> bool = |n| n >= SERVERS * TOOLS_PER_SERVER;
        let allowed: fn(usize) -> bool = |n| n == 2 * TOOLS_PER_SERVER;
        for (name, caller, expected) in [
            ("tools_list", &w.caller, whole),
            ("tools_list_allow_list", &w.allowed, allowed),
        ] {
            g.bench_function(BenchmarkId::new(name, SERVERS * TOOLS_PER_SERVER), |b| {
                b.iter(|| {
                    let tools = rt
                        .block_on(mcp_marketplace::gateway::tools::list(&w.app, caller))
                        .expect("tools/list");
                    assert!(expected(tools.len()), "{name}: {} tools", tools.len());
                    tools
                });
            });
        }
        g.finish();
        let broken = rt
            .block_on(w.app.ledger.verify())
            .expect("ledger verify runs");
        assert!(broken.is_empty(), "ledger verify: {broken:?}");
    }
}

criterion_group! {
    name = hot_path;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(hot_path);
