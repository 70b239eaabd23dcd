//! Memory benchmark: the marketplace's resident memory with many open MCP sessions
//! (issue 7 target: ≤ 64 MiB with 1,000 sessions).
//!
//! ```text
//! cargo run --release --example sessions -- --sessions 1000 [--catalog-tools 10000] [--shared-connection] [--idle-timeout 10s]
//! ```
//!
//! It prepares a fresh SQLite marketplace (an echo upstream registered, approved and
//! installed for an account, optionally `--catalog-tools` more tools in 20 installed
//! servers written straight into the catalog), then runs the marketplace alone in a
//! child process (this program re-executed with `--serve`, so the client's memory is
//! not counted) and opens the sessions against it: each `initialize`,
//! `notifications/initialized` and `tools/list`, then kept open. By default every
//! session has its own keep-alive HTTP/1.1 connection, as separate clients would;
//! `--shared-connection` sends every session over one connection. With
//! `--idle-timeout 10s` the marketplace runs with that `http_idle_timeout` (longer than
//! opening the sessions takes, which is checked), and the
//! memory is measured again once it has closed the idle connections (clients between
//! requests: their sessions stay open, and each is asked for `tools/list` again
//! afterwards to show it). It prints the
//! child's VmRSS and VmHWM (from `/proc/PID/status`) after start, after warm-up and
//! with all sessions open, and the growth per session; and how long each session's
//! `tools/list` took as the client saw it (request sent to answer parsed, p50 and p90:
//! with `--catalog-tools 10000` the whole path of a 10,000-tool answer, serialization
//! and transfer included). Linux only (it reads `/proc`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mcp_marketplace::app::App;
use mcp_marketplace::auth::Scope;
use mcp_marketplace::auth::accounts::create_account;
use mcp_marketplace::auth::keys::{NewKey, create_key};
use mcp_marketplace::catalog::NewServer;
use mcp_marketplace::config::Config;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

/// Servers the optional extra catalog tools are spread over.
const CATALOG_SERVERS: usize = 20;

/// How long the marketplace is left to settle before a measurement: 500 ms.
const SETTLE: Duration = Duration::from_millis(500);

/// How long after the idle timeout the memory is measured again: 1 s for the
/// connections to close, 11 s for jemalloc's decay (`dirty_decay_ms`, 10 s by default)
/// to return the freed pages to the OS.
const DECAY: Duration = Duration::from_secs(12);

/// The product binary's allocator ([`mcp_marketplace::Allocator`]), counting the bytes live on
/// the heap (printed next to VmRSS: what the program holds, as opposed to what the
/// allocator keeps from the OS).
struct Counting;

static LIVE_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: every call is forwarded to jemalloc unchanged; only a counter is updated
// besides.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract is jemalloc's.
        let p = unsafe { std::alloc::GlobalAlloc::alloc(&mcp_marketplace::ALLOCATOR, layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::GlobalAlloc::dealloc(&mcp_marketplace::ALLOCATOR, ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe {
            std::alloc::GlobalAlloc::realloc(&mcp_marketplace::ALLOCATOR, ptr, layout, new_size)
        };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size, std::sync::atomic::Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[path = "support/mod.rs"]
mod support;
use support::{first_message, spawn_echo};

// ---------------------------------------------------------------- the marketplace

/// The configuration of both the preparing and the serving process: no rate limits
/// and no quota (1,000 sessions of one key would be rate limited otherwise).
fn config(database_url: &str, listen: &str) -> Result<Config> {
    let mut config = Config {
        listen: listen.to_owned(),
        public_url: format!("http://{listen}"),
        database_url: database_url.to_owned(),
        allow_upstream_hosts: vec!["127.0.0.1".into()],
        ..Config::default()
    };
    support::unlimited(&mut config)?;
    Ok(config)
}

/// Writes the world into `database_url` and returns the user's key.
async fn prepare(database_url: &str, upstream: &str, catalog_tools: usize) -> Result<String> {
    let app = App::new(config(database_url, "127.0.0.1:0")?).await?;
    let creator = create_account(&app.store, "creator").await?;
    let user = create_account(&app.store, "user").await?;
    let new = NewServer {
        name: "Echo".into(),
        slug: Some("echo".into()),
        endpoints: vec![upstream.to_owned()],
        pricing: "0.0001_per_request".into(),
        ..NewServer::default()
    };
    app.catalog.register(&creator.id, &new, &app.policy).await?;
    app.approve("echo").await?;
    app.install(&user.id, "echo").await?;
    let per_server = catalog_tools.div_ceil(CATALOG_SERVERS);
    for s in 0..CATALOG_SERVERS.min(catalog_tools) {
        let slug = format!("srv{s:02}");
        let new = NewServer {
            name: format!("Server {s}"),
            slug: Some(slug.clone()),
            // Never contacted: the tools are written straight into the catalog.
            endpoints: vec![format!("http://127.0.0.1:9/{slug}")],
            pricing: "0.0001_per_request".into(),
            ..NewServer::default()
        };
        let (server, _) = app.catalog.register(&creator.id, &new, &app.policy).await?;
        let tools: Vec<Value> = (0..per_server)
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
        app.catalog.replace_tools(&server, &tools).await?;
        app.catalog
            .approve_tools(&server.id, None, "sessions")
            .await?;
        app.catalog
            .set_status(&slug, mcp_marketplace::catalog::ServerStatus::Active)
            .await?;
        app.install(&user.id, &slug).await?;
    }
    let key = create_key(
        &app.store,
        "user",
        &NewKey {
            scopes: vec![Scope::Invoke],
            ..NewKey::default()
        },
    )
    .await?
    .1;
    app.store.close().await;
    Ok(key)
}

/// The child: serves the prepared database until its stdin closes, with
/// `http_idle_timeout` `idle` when given (else the default).
async fn serve(database_url: &str, idle: Option<Duration>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut config = config(database_url, &addr.to_string())?;
    if let Some(idle) = idle {
        config.http.idle_timeout = idle;
    }
    let app = App::new(config).await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (app, shutdown) = (app.clone(), shutdown.clone());
        async move { app.serve(listener, shutdown).await }
    });
    println!("listening {addr}");
    // Each line on stdin asks for the live heap bytes; end of input stops.
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {
        println!(
            "heap {}",
            LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    shutdown.cancel();
    let _ = task.await;
    Ok(())
}

// ---------------------------------------------------------------- the client

/// An open MCP session: its HTTP client (and connection) and its headers (key, id).
struct Session {
    http: reqwest::Client,
    headers: reqwest::header::HeaderMap,
}

impl Session {
    /// `tools/list` again in this session; the number of tools listed.
    async fn list(&self, url: &str, id: u64) -> Result<usize> {
        let (_, list) = post(
            &self.http,
            url,
            &self.headers,
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"}),
        )
        .await?;
        list.as_ref()
            .and_then(|m| m.pointer("/result/tools"))
            .and_then(Value::as_array)
            .map(Vec::len)
            .with_context(|| format!("not a tools/list result: {list:?}"))
    }
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    headers: &reqwest::header::HeaderMap,
    body: Value,
) -> Result<(reqwest::header::HeaderMap, Option<Value>)> {
    let r = http
        .post(url)
        .headers(headers.clone())
        .body(body.to_string())
        .send()
        .await?;
    ensure!(r.status().is_success(), "HTTP {}", r.status());
    let h = r.headers().clone();
    let ct = h
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = r.bytes().await?;
    let message = if bytes.is_empty() {
        None
    } else {
        Some(first_message(&ct, &bytes)?)
    };
    Ok((h, message))
}

/// `initialize`, `notifications/initialized`, `tools/list`; returns the session, the
/// number of tools listed and how long the `tools/list` took as the client saw it
/// (request sent to answer parsed).
async fn open(http: reqwest::Client, url: &str, key: &str) -> Result<(Session, usize, Duration)> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("accept", "application/json, text/event-stream".parse()?);
    headers.insert("content-type", "application/json".parse()?);
    headers.insert("authorization", format!("Bearer {key}").parse()?);
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "sessions", "version": "1"}}});
    let (h, _) = post(&http, url, &headers, init).await?;
    let id = h
        .get("mcp-session-id")
        .cloned()
        .context("no Mcp-Session-Id")?;
    headers.insert("mcp-session-id", id);
    headers.insert("mcp-protocol-version", "2025-06-18".parse()?);
    post(
        &http,
        url,
        &headers,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await?;
    let session = Session { http, headers };
    let asked = Instant::now();
    let tools = session.list(url, 1).await?;
    let listed_in = asked.elapsed();
    Ok((session, tools, listed_in))
}

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .build()?)
}

/// `VmRSS` and `VmHWM` of `pid`, KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("a number")?
            .parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Asks the child for its live heap bytes (one line on its stdin, one answer).
async fn heap_bytes(
    stdin: &mut tokio::process::ChildStdin,
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> Result<u64> {
    use tokio::io::AsyncWriteExt;
    stdin.write_all(b"stats\n").await?;
    stdin.flush().await?;
    loop {
        let line = lines.next_line().await?.context("the marketplace exited")?;
        if let Some(n) = line.strip_prefix("heap ") {
            return Ok(n.trim().parse()?);
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

struct Args {
    sessions: usize,
    catalog_tools: usize,
    shared: bool,
    /// The marketplace's `http_idle_timeout`; `Some`: measure again once it closed the
    /// idle connections.
    idle_timeout: Option<Duration>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let mut args = Args {
        sessions: 1000,
        catalog_tools: 0,
        shared: false,
        idle_timeout: None,
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sessions" => args.sessions = it.next().context("--sessions N")?.parse()?,
            "--catalog-tools" => {
                args.catalog_tools = it.next().context("--catalog-tools N")?.parse()?
            }
            "--shared-connection" => args.shared = true,
            "--idle-timeout" => {
                let d = it.next().context("--idle-timeout DURATION, e.g. 2s")?;
                args.idle_timeout = Some(
                    humantime::parse_duration(&d)
                        .with_context(|| format!("--idle-timeout {d}: not a duration"))?,
                );
            }
            "--help" | "-h" => {
                println!(
                    "usage: sessions [--sessions 1000] [--catalog-tools N] [--shared-connection] \
                     [--idle-timeout 10s]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (try --help)"),
        }
    }
    ensure!(
        (1..=10_000).contains(&args.sessions),
        "--sessions is 1 to 10000"
    );
    ensure!(
        args.idle_timeout
            .is_none_or(|d| d >= Duration::from_millis(100)),
        "--idle-timeout is at least 100ms"
    );
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<()> {
    mcp_marketplace::install_crypto_provider();
    mcp_marketplace::start_allocator_purging()?;
    let mut argv = std::env::args().skip(1);
    let first = argv.next();
    if first.as_deref() == Some("--serve") {
        let database_url = argv.next().context("--serve DATABASE_URL [IDLE_TIMEOUT]")?;
        let idle = argv
            .next()
            .map(|d| humantime::parse_duration(&d))
            .transpose()?;
        return serve(&database_url, idle).await;
    }
    let args = parse_args(first.into_iter().chain(argv))?;

    let cancel = CancellationToken::new();
    let upstream = spawn_echo(cancel.clone()).await?;
    let dir = tempfile::tempdir()?;
    let database_url = format!("sqlite://{}", dir.path().join("sessions.db").display());
    let key = prepare(&database_url, &upstream, args.catalog_tools).await?;

    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--serve")
        .arg(&database_url)
        .args(
            args.idle_timeout
                .map(|d| humantime::format_duration(d).to_string()),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the marketplace process")?;
    let pid = child.id().context("the child's pid")?;
    let stdout = child.stdout.take().context("the child's stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next_line().await?.context("the marketplace exited")?;
        if let Some(a) = line.strip_prefix("listening ") {
            break a.to_owned();
        }
    };
    let url = format!("http://{addr}/mcp");
    let mut stdin = child.stdin.take().context("the child's stdin")?;
    let started = memory_kib(pid)?;
    let heap_started = heap_bytes(&mut stdin, &mut lines).await?;

    // Warm-up: one session builds the catalog snapshot and the tools/list answer.
    let shared = client()?;
    let (warm, tools, _) = open(shared.clone(), &url, &key).await?;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let warmed = memory_kib(pid)?;
    let heap_warmed = heap_bytes(&mut stdin, &mut lines).await?;

    let t0 = Instant::now();
    let mut sessions = Vec::with_capacity(args.sessions);
    let mut listings = Vec::with_capacity(args.sessions);
    for _ in 0..args.sessions {
        let http = if args.shared {
            shared.clone()
        } else {
            client()?
        };
        let (s, n, listed_in) = open(http, &url, &key).await?;
        ensure!(n == tools, "a session listed {n} tools, not {tools}");
        sessions.push(s);
        listings.push(listed_in);
    }
    let opened = t0.elapsed();
    // Let the marketplace settle (freed request buffers returned to the allocator).
    tokio::time::sleep(SETTLE).await;
    if let Some(idle) = args.idle_timeout {
        // The first sessions' connections have been idle since they were opened: with a
        // shorter idle timeout they would be closed already, and the row measured with
        // every connection open would not be.
        ensure!(
            t0.elapsed() < idle,
            "--idle-timeout {} is shorter than opening the sessions took ({:.1} s); give a \
             longer one",
            humantime::format_duration(idle),
            t0.elapsed().as_secs_f64()
        );
    }
    let open_mem = memory_kib(pid)?;
    let heap_open = heap_bytes(&mut stdin, &mut lines).await?;

    println!(
        "sessions: {} open MCP sessions ({}), each initialize + tools/list of {tools} tools, opened in {:.1} s",
        args.sessions,
        if args.shared {
            "one shared HTTP/1.1 connection"
        } else {
            "one HTTP/1.1 connection each"
        },
        opened.as_secs_f64()
    );
    listings.sort();
    if !listings.is_empty() {
        let at =
            |q: f64| listings[((listings.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
        println!(
            "  tools/list of {tools} tools, as the client saw it (sent to parsed): p50 {:.2} ms, p90 {:.2} ms",
            at(0.5),
            at(0.9)
        );
    }
    println!("  marketplace process {pid} (VmRSS / VmHWM / live heap):");
    let row = |label: &str, m: (u64, u64), heap: u64| {
        println!(
            "    {label:<20} {:7.1} MiB / {:7.1} MiB / {:7.1} MiB",
            mib(m.0),
            mib(m.1),
            heap as f64 / 1048576.0
        )
    };
    row("started:", started, heap_started);
    row("after one session:", warmed, heap_warmed);
    row(
        &format!("{} sessions open:", args.sessions),
        open_mem,
        heap_open,
    );
    println!(
        "    per session:         {:7.1} KiB resident, {:7.1} KiB live heap",
        open_mem.0.saturating_sub(warmed.0) as f64 / args.sessions as f64,
        heap_open.saturating_sub(heap_warmed) as f64 / 1024.0 / args.sessions as f64
    );
    let mut targets = vec![("each session's connection open", open_mem.0)];
    if let Some(idle) = args.idle_timeout {
        // The connections close after `idle` without a request; the allocator returns
        // freed pages to the OS over its decay time (jemalloc: 10 s).
        tokio::time::sleep(idle + DECAY).await;
        let closed = memory_kib(pid)?;
        let heap_closed = heap_bytes(&mut stdin, &mut lines).await?;
        row("connections closed:", closed, heap_closed);
        println!(
            "    per session:         {:7.1} KiB resident, {:7.1} KiB live heap",
            closed.0.saturating_sub(warmed.0) as f64 / args.sessions as f64,
            heap_closed.saturating_sub(heap_warmed) as f64 / 1024.0 / args.sessions as f64
        );
        for (i, s) in sessions.iter().enumerate() {
            let n = s
                .list(&url, 2 + i as u64)
                .await
                .with_context(|| format!("session {i} after its connection was closed idle"))?;
            ensure!(n == tools, "a session listed {n} tools, not {tools}");
        }
        println!("  every session answered tools/list again, over a new connection",);
        targets.push(("connections closed after idle", closed.0));
    }
    // The target is about 1,000 sessions; fewer say nothing about it.
    if args.sessions >= 1_000 {
        for (label, kib) in targets {
            println!(
                "  target: <= 64 MiB resident with 1,000 sessions ({label}): {}",
                if mib(kib) <= 64.0 { "met" } else { "MISSED" }
            );
        }
    }

    drop(sessions);
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    cancel.cancel();
    Ok(())
}
