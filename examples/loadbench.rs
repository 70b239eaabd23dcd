//! Load benchmark: what the marketplace adds to a `tools/call`, measured against the
//! direct call in the same run.
//!
//! ```text
//! cargo run --release --example loadbench -- --connections 1,32 --seconds 15
//! cargo run --release --example loadbench -- --connections 1,32 --message-bytes 262144
//! ```
//!
//! It starts a fast upstream (an rmcp streamable-HTTP echo server with two tools,
//! `echo` priced 0.0001 USD per call and `echo_free`), the marketplace on a fresh SQLite
//! file (and on a fresh PostgreSQL database when `TEST_DATABASE_URL` is set), registers,
//! approves and installs the echo server, funds an account, and then, for each
//! connection count, drives `tools/call` over established MCP sessions (one session and
//! one keep-alive HTTP/1.1 connection per concurrent client, each client sending its
//! next request when the previous answer arrived), alternating three modes in rounds:
//!
//! - `a direct`: straight to the upstream;
//! - `b free`: through the marketplace's `/mcp` on the free tool (auth, resolve,
//!   forward, a zero-price reserve and settle, receipt);
//! - `c paid`: through `/mcp` on the paid tool (full metering: reserve, settle 70/30,
//!   signed receipt).
//!
//! Each call sends a message the echo sends back as its result's text: `hello` by
//! default, or `--message-bytes N` bytes of ASCII prose, to measure what the
//! marketplace adds to a large result (it parses, scans and meters every result).
//!
//! It prints, per mode, requests/s, p50/p90/p99 latency, the process's CPU time per
//! call (user + system of all its threads: client, marketplace and upstream, from
//! `/proc/self/stat`; not the PostgreSQL server's, a process of its own) and its context
//! switches per call (voluntary and involuntary, summed over `/proc/self/task/*/status`:
//! each is a thread that went to sleep or was preempted), and the ratios b/a and c/a;
//! with `--threads` also both of the latter per thread name (tokio's workers, the
//! ledger's SQLite writer, sqlx's SQLite threads, …), to see which threads a mode wakes.
//! Linux only. CPU per call is steadier than requests/s from run to run; c − a is what
//! the marketplace itself spends on a paid call, and on two cores no more than
//! 2 s / (c's CPU per call) calls a second can be reached, whatever the waits.
//!
//! Every response must be a successful tool result (any other answer aborts the run),
//! and afterwards `ledger verify` must hold and the paid calls must equal the settled
//! ones. The client runs on the same two cores as the servers, in every mode alike.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hdrhistogram::Histogram;
use mcp_marketplace::app::App;
use mcp_marketplace::auth::Scope;
use mcp_marketplace::auth::accounts::create_account;
use mcp_marketplace::auth::keys::{NewKey, create_key};
use mcp_marketplace::catalog::NewServer;
use mcp_marketplace::config::Config;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Price of the paid echo tool: 0.0001 USD.
const PAID_PRICE_MICROS: i64 = 100;
/// Funds of the benchmark account: enough for every paid call of any run.
const FUNDS_MICROS: i64 = 1_000_000 * 1_000_000;
/// Rounds in which the three modes alternate.
const ROUNDS: u32 = 3;
/// The largest `--message-bytes`: the request must stay under the marketplace's
/// default request body cap of 1 MiB.
const MAX_MESSAGE_BYTES: usize = 1_000_000;
/// Unmeasured time each mode runs before its first measured round.
const WARMUP: Duration = Duration::from_secs(1);

#[path = "support/mod.rs"]
mod support;
use support::{first_message, spawn_echo};

// ---------------------------------------------------------------- the marketplace

struct Marketplace {
    app: Arc<App>,
    mcp_url: String,
    key: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

async fn fresh_postgres(admin: &str) -> Result<String> {
    use sqlx::Connection;
    let name = format!("mkt_bench_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(admin).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let mut url = url::Url::parse(admin)?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

async fn start_marketplace(database: &str, upstream: &str) -> Result<Marketplace> {
    let (database_url, dir) = if database == "sqlite" {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        (url, Some(dir))
    } else {
        (fresh_postgres(database).await?, None)
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut config = Config {
        listen: addr.to_string(),
        public_url: format!("http://{addr}"),
        database_url,
        allow_upstream_hosts: vec!["127.0.0.1".into()],
        ..Config::default()
    };
    support::unlimited(&mut config)?;
    let app = App::new(config).await.context("the marketplace starts")?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (app, shutdown) = (app.clone(), shutdown.clone());
        async move {
            app.serve(listener, shutdown).await;
        }
    });
    let creator = create_account(&app.store, "bench-creator").await?;
    let user = create_account(&app.store, "bench").await?;
    let new = NewServer {
        name: "Echo".into(),
        slug: Some("echo".into()),
        endpoints: vec![upstream.to_owned()],
        pricing: format!("0.{PAID_PRICE_MICROS:06}_per_request"),
        tool_prices: [("echo_free".to_owned(), "free".to_owned())].into(),
        ..NewServer::default()
    };
    app.catalog.register(&creator.id, &new, &app.policy).await?;
    app.approve("echo").await?;
    app.install(&user.id, "echo").await?;
    app.ledger
        .topup(&user.id, FUNDS_MICROS, "loadbench")
        .await?;
    let key = create_key(
        &app.store,
        "bench",
        &NewKey {
            scopes: vec![Scope::Invoke],
            ..NewKey::default()
        },
    )
    .await?
    .1;
    Ok(Marketplace {
        app,
        mcp_url: format!("http://{addr}/mcp"),
        key,
        shutdown,
        task,
        _dir: dir,
    })
}

// ---------------------------------------------------------------- the client

/// One MCP session over one keep-alive HTTP/1.1 connection.
struct Session {
    http: reqwest::Client,
    /// Parsed once: reqwest parses a string URL on every request.
    url: reqwest::Url,
    headers: reqwest::header::HeaderMap,
    next_id: u64,
    /// The text each call sends and expects back.
    message: Arc<str>,
}

impl Session {
    async fn open(url: &str, key: Option<&str>, message: Arc<str>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .http1_only()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1)
            .build()?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("accept", "application/json, text/event-stream".parse()?);
        headers.insert("content-type", "application/json".parse()?);
        if let Some(key) = key {
            headers.insert("authorization", format!("Bearer {key}").parse()?);
        }
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "loadbench", "version": "1"}}});
        let r = http
            .post(url)
            .headers(headers.clone())
            .body(init.to_string())
            .send()
            .await?;
        ensure!(r.status().is_success(), "initialize: HTTP {}", r.status());
        let session = r
            .headers()
            .get("mcp-session-id")
            .cloned()
            .context("no Mcp-Session-Id")?;
        let _ = r.bytes().await?;
        headers.insert("mcp-session-id", session);
        headers.insert("mcp-protocol-version", "2025-06-18".parse()?);
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let r = http
            .post(url)
            .headers(headers.clone())
            .body(note.to_string())
            .send()
            .await?;
        ensure!(r.status().is_success(), "initialized: HTTP {}", r.status());
        let _ = r.bytes().await?;
        Ok(Self {
            http,
            url: reqwest::Url::parse(url)?,
            headers,
            next_id: 1,
            message,
        })
    }

    /// One `tools/call`; fails unless the answer is a successful tool result.
    async fn call(&mut self, tool: &str) -> Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                          "params": {"name": tool, "arguments": {"message": &*self.message}}});
        let r = self
            .http
            .post(self.url.clone())
            .headers(self.headers.clone())
            .body(body.to_string())
            .send()
            .await?;
        ensure!(r.status().is_success(), "tools/call: HTTP {}", r.status());
        let content_type = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = r.bytes().await?;
        let message = first_message(&content_type, &bytes)?;
        ensure!(
            message["id"] == json!(id),
            "an answer to another id: {message}"
        );
        let result = message
            .get("result")
            .with_context(|| format!("not a result: {message}"))?;
        ensure!(
            result.get("isError") != Some(&Value::Bool(true)),
            "a failed call: {result}"
        );
        ensure!(
            result.pointer("/content/0/text").and_then(Value::as_str) == Some(&*self.message),
            "an unexpected result: {result:.200}"
        );
        Ok(())
    }
}

// ---------------------------------------------------------------- the driver

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Free,
    Paid,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Direct, Mode::Free, Mode::Paid];

    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "a direct",
            Mode::Free => "b marketplace, free tool",
            Mode::Paid => "c marketplace, paid tool",
        }
    }
}

struct Measured {
    calls: u64,
    elapsed: Duration,
    /// Process CPU time (user + system) while the mode ran.
    cpu: Duration,
    /// Context switches of the process's threads while the mode ran.
    switches: u64,
    /// Per thread name (`--threads`): context switches and CPU ticks while the mode ran.
    threads: BTreeMap<String, ThreadUse>,
    latency_us: Histogram<u64>,
}

impl Measured {
    fn new() -> Result<Self> {
        Ok(Self {
            calls: 0,
            elapsed: Duration::ZERO,
            cpu: Duration::ZERO,
            switches: 0,
            threads: BTreeMap::new(),
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        })
    }

    fn rps(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    /// CPU time per call, µs.
    fn cpu_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / (self.calls.max(1) as f64)
    }

    /// Context switches per call.
    fn switches_per_call(&self) -> f64 {
        self.switches as f64 / (self.calls.max(1) as f64)
    }
}

/// What the threads of one name used: context switches (voluntary and involuntary) and
/// CPU time in `USER_HZ` ticks.
#[derive(Debug, Clone, Copy, Default)]
struct ThreadUse {
    switches: u64,
    ticks: u64,
}

/// [`ThreadUse`] so far of this process's threads, summed per thread name (proc(5):
/// `/proc/self/task/*/stat` fields 2, 14 and 15, and `status`'s
/// `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches`). tokio names its workers
/// `tokio-rt-worker`, sqlx its SQLite connection threads `sqlx-sqlite-wor` (names are
/// cut at 15 bytes); the ledger's SQLite writer is `ledger-writer`. A thread that ended
/// no longer counts, so take differences over a span in which the threads live on:
/// tokio's workers, sqlx's and the ledger writer (started by the first call).
fn thread_use() -> Result<BTreeMap<String, ThreadUse>> {
    let mut by_name = BTreeMap::<String, ThreadUse>::new();
    for task in std::fs::read_dir("/proc/self/task").context("read /proc/self/task")? {
        let path = task?.path();
        let (Ok(stat), Ok(status)) = (
            std::fs::read_to_string(path.join("stat")),
            std::fs::read_to_string(path.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let (name, ticks) = cpu_ticks(&stat).with_context(|| format!("read {}", path.display()))?;
        let mut switches = 0;
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += n
                    .trim()
                    .parse::<u64>()
                    .context("a switch count is not a number")?;
            }
        }
        let entry = by_name.entry(name.to_owned()).or_default();
        entry.switches += switches;
        entry.ticks += ticks;
    }
    Ok(by_name)
}

/// Clock ticks per second of `/proc/PID/stat`'s times (`USER_HZ`, fixed at 100 by the
/// Linux ABI whatever the kernel's own tick rate; proc(5)).
const USER_HZ: u64 = 100;

/// The name (field 2) and the user + system CPU time (fields 14 and 15, `USER_HZ`
/// ticks) of a process's or a thread's `stat` (proc(5)).
fn cpu_ticks(stat: &str) -> Result<(&str, u64)> {
    // `pid (name) state …`: the name may hold spaces and parentheses.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        bail!("no name in a stat line");
    };
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // The fields after the name start at field 3 (state).
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .context("a stat line is too short")?
            .parse::<u64>()
            .context("a time in a stat line is not a number")
    };
    Ok((&stat[open + 1..close], field(14)? + field(15)?))
}

/// CPU time this process used so far, all threads (those that ended too), user +
/// system (`/proc/self/stat`).
fn process_cpu() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
    let (_, ticks) = cpu_ticks(&stat)?;
    Ok(Duration::from_millis(ticks * 1000 / USER_HZ))
}

/// Runs `sessions` concurrently for `length`, each calling `tool` back to back.
async fn drive(
    sessions: &mut Vec<Session>,
    tool: &'static str,
    length: Duration,
    into: Option<&mut Measured>,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let cpu_before = process_cpu()?;
    let threads_before = thread_use()?;
    let mut tasks = Vec::new();
    for mut session in sessions.drain(..) {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut calls = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                session.call(tool).await?;
                h.record(t.elapsed().as_micros().max(1) as u64)?;
                calls += 1;
            }
            anyhow::Ok((session, h, calls))
        }));
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut measured = into;
    for task in tasks {
        let (session, h, calls) = task.await??;
        sessions.push(session);
        if let Some(m) = measured.as_deref_mut() {
            m.latency_us.add(&h)?;
            m.calls += calls;
        }
    }
    if let Some(m) = measured {
        m.elapsed += started.elapsed();
        m.cpu += process_cpu()?.saturating_sub(cpu_before);
        for (name, now) in thread_use()? {
            let before = threads_before.get(&name).copied().unwrap_or_default();
            let used = m.threads.entry(name).or_default();
            let switched = now.switches.saturating_sub(before.switches);
            used.switches += switched;
            used.ticks += now.ticks.saturating_sub(before.ticks);
            m.switches += switched;
        }
    }
    Ok(())
}

struct Args {
    connections: Vec<usize>,
    seconds: u64,
    /// Length of each call's message in bytes; `None`: `hello`.
    message_bytes: Option<usize>,
    /// Print each mode's context switches and CPU per call by thread name.
    threads: bool,
}

impl Args {
    /// The text every call sends: `hello`, or `message_bytes` bytes of prose (words
    /// and spaces, so the result scan reads ordinary text).
    fn message(&self) -> Arc<str> {
        match self.message_bytes {
            None => "hello".into(),
            Some(n) => {
                const WORDS: &str =
                    "the quick brown fox jumps over the lazy dog and keeps running ";
                WORDS.chars().cycle().take(n).collect::<String>().into()
            }
        }
    }
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        connections: vec![1, 32],
        seconds: 15,
        message_bytes: None,
        threads: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--connections" => {
                args.connections = it
                    .next()
                    .context("--connections needs a list, e.g. 1,32")?
                    .split(',')
                    .map(|c| c.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--connections takes numbers, e.g. 1,32")?;
            }
            "--seconds" => {
                args.seconds = it
                    .next()
                    .context("--seconds needs a number")?
                    .parse()
                    .context("--seconds takes a number")?;
            }
            "--message-bytes" => {
                args.message_bytes = Some(
                    it.next()
                        .context("--message-bytes needs a number")?
                        .parse()
                        .context("--message-bytes takes a number of bytes")?,
                );
            }
            "--threads" => args.threads = true,
            "--help" | "-h" => {
                println!(
                    "usage: loadbench [--connections 1,32] [--seconds 15] [--message-bytes N] \
                     [--threads]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (try --help)"),
        }
    }
    ensure!(
        args.connections.iter().all(|c| (1..=1024).contains(c)),
        "connections must be between 1 and 1024"
    );
    ensure!(args.seconds >= 3, "--seconds must be at least 3");
    ensure!(
        args.message_bytes
            .is_none_or(|n| (1..=MAX_MESSAGE_BYTES).contains(&n)),
        "--message-bytes must be between 1 and {MAX_MESSAGE_BYTES}"
    );
    Ok(args)
}

async fn bench_backend(database: &str, label: &str, args: &Args) -> Result<()> {
    let cancel = CancellationToken::new();
    let upstream = spawn_echo(cancel.clone()).await?;
    let market = start_marketplace(database, &upstream).await?;
    let per_round = Duration::from_secs(args.seconds) / ROUNDS;
    let message = args.message();
    let mut paid_calls = 0u64;
    for &connections in &args.connections {
        let mut sessions = Vec::new();
        let mut results = Vec::new();
        for mode in Mode::ALL {
            let mut s = Vec::new();
            for _ in 0..connections {
                s.push(match mode {
                    Mode::Direct => Session::open(&upstream, None, message.clone()).await?,
                    _ => Session::open(&market.mcp_url, Some(&market.key), message.clone()).await?,
                });
            }
            let tool = tool_of(mode);
            drive(&mut s, tool, WARMUP, None).await?;
            sessions.push(s);
            results.push(Measured::new()?);
        }
        for _ in 0..ROUNDS {
            for (i, mode) in Mode::ALL.into_iter().enumerate() {
                drive(
                    &mut sessions[i],
                    tool_of(mode),
                    per_round,
                    Some(&mut results[i]),
                )
                .await?;
            }
        }
        // The warm-up calls were paid too.
        paid_calls += results[2].calls;
        print_table(label, connections, &results);
        if args.threads {
            print_threads(&results);
        }
    }
    let broken = market.app.ledger.verify().await?;
    ensure!(broken.is_empty(), "ledger verify failed: {broken:?}");
    let settled: i64 = sqlx::query_scalar(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM calls WHERE status = 'settled' AND price_micros > 0",
    )
    .fetch_one(market.app.store.pool())
    .await?;
    ensure!(
        settled as u64 >= paid_calls,
        "{settled} settled paid calls, fewer than the {paid_calls} measured"
    );
    println!(
        "ledger verify: ok ({settled} paid calls settled, {} micros revenue)\n",
        market.app.ledger.platform_balance().await?.revenue_micros
    );
    market.shutdown.cancel();
    let _ = market.task.await;
    cancel.cancel();
    Ok(())
}

fn tool_of(mode: Mode) -> &'static str {
    match mode {
        Mode::Direct => "echo",
        Mode::Free => "echo__echo_free",
        Mode::Paid => "echo__echo",
    }
}

fn print_table(label: &str, connections: usize, r: &[Measured]) {
    println!("{label}, {connections} connection(s):");
    println!(
        "  {:<26} {:>10} {:>9} {:>9} {:>9} {:>12} {:>14}",
        "mode", "req/s", "p50 ms", "p90 ms", "p99 ms", "CPU µs/call", "switches/call"
    );
    for (mode, m) in Mode::ALL.iter().zip(r) {
        println!(
            "  {:<26} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>12.0} {:>14.1}",
            mode.label(),
            m.rps(),
            m.ms(0.5),
            m.ms(0.9),
            m.ms(0.99),
            m.cpu_us(),
            m.switches_per_call()
        );
    }
    let a = &r[0];
    for (name, m) in [("b/a", &r[1]), ("c/a", &r[2])] {
        println!(
            "  {name}: {:.2}x req/s, {:+.3} ms p50, {:+.3} ms p99, {:+.0} µs CPU per call",
            m.rps() / a.rps().max(1e-9),
            m.ms(0.5) - a.ms(0.5),
            m.ms(0.99) - a.ms(0.99),
            m.cpu_us() - a.cpu_us()
        );
    }
}

/// Per mode, each thread name's context switches and CPU per call (`--threads`).
fn print_threads(r: &[Measured]) {
    for (mode, m) in Mode::ALL.iter().zip(r) {
        let calls = m.calls.max(1) as f64;
        let parts: Vec<String> = m
            .threads
            .iter()
            .filter_map(|(name, u)| {
                let switches = u.switches as f64 / calls;
                let cpu_us = (u.ticks * 1_000_000 / USER_HZ) as f64 / calls;
                // Threads that did next to nothing per call (the client's main thread,
                // jemalloc's) would only print zeros.
                (switches >= 0.05 || cpu_us >= 0.5)
                    .then(|| format!("{name} {switches:.1} sw, {cpu_us:.0} µs"))
            })
            .collect();
        println!("  {:<26} per call: {}", mode.label(), parts.join("; "));
    }
    println!();
}

/// The product binary's allocator ([`mcp_marketplace::Allocator`]), so the marketplace measured here
/// allocates as it does in production. The client and the echo upstream share this
/// process, so they use it too: the direct call (a) is faster with it than with
/// glibc's malloc, which makes the ratios to it stricter.
#[global_allocator]
static ALLOCATOR: mcp_marketplace::Allocator = mcp_marketplace::ALLOCATOR;

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    mcp_marketplace::install_crypto_provider();
    mcp_marketplace::start_allocator_purging()?;
    println!(
        "loadbench: {} s per connection count, modes alternating in {ROUNDS} rounds; {} CPU(s); \
         each call's message {} bytes\n",
        args.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.message().len()
    );
    bench_backend("sqlite", "SQLite", &args).await?;
    if let Ok(pg) = std::env::var("TEST_DATABASE_URL")
        && !pg.is_empty()
    {
        bench_backend(&pg, "PostgreSQL", &args).await?;
    }
    Ok(())
}
