//! The two-sided marketplace (issue 5), end to end over real listeners: registration by
//! the CLI, REST and MCP (one code path, one result), verification keeping failing
//! servers out, creator isolation on every route, price changes versus reserved calls,
//! search on a 50+ server fixture catalog, installs and `list_changed`,
//! `marketplace__call_tool` metering, reviews, reputation and `servers sync`.

mod common;

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{
    Backend, Market, TestDb, UNITS_PRICE, World, args, backends, bind, client_at, error_kind,
    receipt_of, wait_until,
};
use mcp_marketplace::auth::Scope;
use mcp_marketplace::catalog::{NewServer, ServerStatus};
use mcp_marketplace::demo::upstreams::{SecretSlot, spawn_unit_converter};
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};
use sqlx::Row;

fn bin<S: AsRef<std::ffi::OsStr>>(db: &str, argv: &[S]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mcp-marketplace"))
        .args(argv)
        .env("MCP_MARKETPLACE_DATABASE_URL", db)
        .env("MCP_MARKETPLACE_LOG", "warn")
        .env("MCP_MARKETPLACE_ALLOW_UPSTREAM_HOSTS", "127.0.0.1")
        .env("MCP_MARKETPLACE_MASTER_KEY", common::TEST_MASTER_KEY)
        .output()
        .expect("the binary runs")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// One REST request; returns the status and the JSON body (Null when none).
async fn rest(method: &str, url: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .request(method.parse().expect("a method"), url)
        .bearer_auth(key);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("request sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn call(
    client: &RunningService<RoleClient, impl rmcp::service::Service<RoleClient>>,
    name: &str,
    arguments: Value,
) -> CallToolResult {
    client
        .call_tool(CallToolRequestParams::new(name.to_owned()).with_arguments(args(arguments)))
        .await
        .unwrap_or_else(|e| panic!("{name} failed: {e}"))
}

fn structured(r: &CallToolResult) -> Value {
    assert_ne!(r.is_error, Some(true), "tool error: {r:?}");
    r.structured_content.clone().expect("structured content")
}

/// Counts `notifications/tools/list_changed`.
#[derive(Debug, Clone, Default)]
struct Watcher(Arc<AtomicUsize>);

impl ClientHandler for Watcher {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

async fn watching_client(url: &str, key: &str) -> (RunningService<RoleClient, Watcher>, Watcher) {
    mcp_marketplace::install_crypto_provider();
    let watcher = Watcher::default();
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(url).auth_header(key),
    );
    let client = watcher
        .clone()
        .serve(transport)
        .await
        .expect("MCP client connects");
    (client, watcher)
}

async fn tool_names(
    client: &RunningService<RoleClient, impl rmcp::service::Service<RoleClient>>,
) -> Vec<String> {
    client
        .list_all_tools()
        .await
        .expect("tools/list")
        .into_iter()
        .map(|t| t.name.to_string())
        .collect()
}

async fn count(market: &Market, sql: &str) -> i64 {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(market.app.store.pool())
        .await
        .expect("count")
        .try_get::<i64, _>(0)
        .expect("a count")
}

/// A closed port on 127.0.0.1: connections are refused.
async fn dead_endpoint() -> String {
    let l = bind().await;
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}/mcp")
}

// The CLI runs as a blocking child process: the marketplace needs its own threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_through_cli_rest_and_mcp_gives_the_same_result() {
    for backend in backends() {
        let upstream = spawn_unit_converter(bind().await, SecretSlot::default())
            .await
            .expect("upstream");
        let market = Market::start(TestDb::new(backend).await).await;
        market.account("maker").await;
        let key = market
            .key(
                "maker",
                &[Scope::ServersWrite, Scope::CatalogRead, Scope::Invoke],
            )
            .await;
        let description = "Converts units of length, mass and temperature.";
        // 1. REST.
        let (status, rest_out) = rest(
            "POST",
            &format!("{}/api/v1/servers", market.base),
            &key,
            Some(
                json!({"name": "Units", "slug": "units-rest", "description": description,
                        "categories": ["utilities"], "endpoint": upstream.url,
                        "pricing": "0.02_per_request", "tool_prices": {"convert": "0.05"}}),
            ),
        )
        .await;
        assert_eq!(status, 201, "{rest_out}");
        // 2. MCP.
        let client = client_at(&market.mcp_url(), &key).await;
        let mcp_out = structured(
            &call(
                &client,
                "marketplace__register_server",
                json!({"name": "Units", "slug": "units-mcp", "description": description,
                       "categories": ["utilities"], "endpoint": upstream.url,
                       "pricing": "0.02_per_request", "tool_prices": {"convert": "0.05"}}),
            )
            .await,
        );
        // 3. CLI (against the running marketplace's REST API).
        let cli_out = json_of(&bin(
            &market.db.url,
            &[
                "register",
                "--marketplace",
                &market.base,
                "--api-key",
                &key,
                "--name",
                "Units",
                "--slug",
                "units-cli",
                "--description",
                description,
                "--category",
                "utilities",
                "--endpoint",
                &upstream.url,
                "--pricing",
                "0.02_per_request",
                "--tool-price",
                "convert=0.05",
                "--json",
            ],
        ));
        let mut secrets = Vec::new();
        let mut stored = Vec::new();
        for (out, slug) in [
            (&rest_out, "units-rest"),
            (&mcp_out, "units-mcp"),
            (&cli_out, "units-cli"),
        ] {
            assert_eq!(out["slug"], json!(slug), "{out}");
            assert_eq!(out["status"], json!("pending_review"), "{out}");
            assert_eq!(out["verification"]["ok"], json!(true), "{out}");
            assert_eq!(out["verification"]["failed_checks"], json!([]), "{out}");
            let secret = out["secret"].as_str().expect("secret").to_owned();
            assert!(secret.starts_with("mms_"));
            secrets.push(secret);
            let s = market.app.catalog.get(slug).await.unwrap();
            let v = market
                .app
                .catalog
                .latest_verification(&s.id)
                .await
                .unwrap()
                .expect("a stored verification report");
            assert!(v.passed && v.kind == "registration", "{v:?}");
            stored.push((
                s.name,
                s.description,
                s.categories,
                s.endpoints,
                s.price_micros,
                s.tool_prices,
                s.status,
                s.timeout_ms,
            ));
        }
        assert!(stored.windows(2).all(|w| w[0] == w[1]), "{stored:?}");
        assert_eq!(stored[0].4, 20_000);
        assert_eq!(stored[0].5.get("convert"), Some(&50_000));
        secrets.dedup();
        assert_eq!(secrets.len(), 3, "each server gets its own secret");
        // Pending servers are not listed anywhere.
        let (_, listed) = rest(
            "GET",
            &format!("{}/api/v1/servers", market.base),
            &key,
            None,
        )
        .await;
        assert_eq!(listed["servers"], json!([]), "{listed}");
        // After approval the three list alike.
        for slug in ["units-rest", "units-mcp", "units-cli"] {
            market.app.approve(slug).await.expect("approve");
        }
        market.app.catalog.refresh_reputations().await.unwrap();
        let (_, listed) = rest(
            "GET",
            &format!("{}/api/v1/servers?q=units", market.base),
            &key,
            None,
        )
        .await;
        let views: Vec<Value> = listed["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                let mut v = v.clone();
                v["slug"] = Value::Null;
                v["tools"] = json!(v["tools"].as_array().map(|t| t.len()));
                v
            })
            .collect();
        assert_eq!(views.len(), 3, "{listed}");
        assert!(views.windows(2).all(|w| w[0] == w[1]), "{views:?}");
        assert!(listed["servers"][0]["reputation"]["score"].is_number());
        client.cancel().await.ok();
        market.stop().await;
        upstream.shutdown().await;
    }
}

#[tokio::test]
async fn auto_approval_lists_passing_servers_and_never_failing_ones() {
    for backend in backends() {
        let upstream = spawn_unit_converter(bind().await, SecretSlot::default())
            .await
            .expect("upstream");
        let market = Market::start_with(TestDb::new(backend).await, |c| {
            c.marketplace.auto_approve = true;
        })
        .await;
        market.account("maker").await;
        market.account("agent").await;
        let key = market.key("maker", &[Scope::ServersWrite]).await;
        let agent = market
            .key("agent", &[Scope::CatalogRead, Scope::Invoke])
            .await;
        let api = format!("{}/api/v1/servers", market.base);
        let (status, ok) = rest(
            "POST",
            &api,
            &key,
            Some(json!({"name": "Units", "endpoint": upstream.url, "pricing": "free"})),
        )
        .await;
        assert_eq!((status, &ok["status"]), (201, &json!("active")), "{ok}");
        // A server that cannot be reached fails its verification and stays out.
        let dead = dead_endpoint().await;
        let (status, bad) = rest(
            "POST",
            &api,
            &key,
            Some(
                json!({"name": "Broken Units", "slug": "broken", "endpoint": dead,
                        "pricing": "free", "description": "units"}),
            ),
        )
        .await;
        assert_eq!(status, 201, "{bad}");
        assert_eq!(bad["status"], json!("pending_review"));
        assert_eq!(bad["verification"]["ok"], json!(false));
        assert!(
            bad["verification"]["failed_checks"]
                .as_array()
                .unwrap()
                .contains(&json!("initialize")),
            "{bad}"
        );
        // Never listed: not by search, not by MCP, not approvable.
        let (_, listed) = rest("GET", &format!("{api}?q=units"), &agent, None).await;
        let slugs: Vec<&str> = listed["servers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["slug"].as_str())
            .collect();
        assert_eq!(slugs, vec!["units"], "{listed}");
        let client = client_at(&market.mcp_url(), &agent).await;
        let found = structured(
            &call(
                &client,
                "marketplace__search_servers",
                json!({"query": "broken units"}),
            )
            .await,
        );
        assert!(!found.to_string().contains("\"broken\""), "{found}");
        let r = call(
            &client,
            "marketplace__install_server",
            json!({"slug": "broken"}),
        )
        .await;
        assert_eq!(error_kind(&r).as_deref(), Some("unknown_server"));
        let err = market.app.approve("broken").await.expect_err("refused");
        assert!(err.to_string().contains("failed its verification"), "{err}");
        let admin = market.key("maker", &[Scope::Admin]).await;
        let (status, e) = rest("POST", &format!("{api}/broken/approve"), &admin, None).await;
        assert_eq!(status, 409, "{e}");
        assert_eq!(
            market.app.catalog.get("broken").await.unwrap().status,
            ServerStatus::PendingReview
        );
        // Re-verifying (still dead) keeps it out.
        let (_, v) = rest("POST", &format!("{api}/broken/verify"), &key, None).await;
        assert_eq!(v["verification"]["ok"], json!(false), "{v}");
        assert_eq!(v["status"], json!("pending_review"));
        client.cancel().await.ok();
        market.stop().await;
        upstream.shutdown().await;
    }
}

#[tokio::test]
async fn a_creator_cannot_touch_another_creators_server_on_any_route() {
    for backend in backends() {
        let w = World::start(backend, 1_000_000).await;
        let m = &w.market;
        m.account("intruder").await;
        let intruder = m
            .key(
                "intruder",
                &[Scope::ServersWrite, Scope::CatalogRead, Scope::Invoke],
            )
            .await;
        let owner = m.key("creator", &[Scope::ServersWrite]).await;
        // A review to reply to, so the reply route has something to hit.
        let client = w.market.client(&w.key).await;
        call(
            &client,
            "units__convert",
            json!({"value": 1, "from": "km", "to": "m"}),
        )
        .await;
        let review = structured(
            &call(
                &client,
                "marketplace__rate_server",
                json!({"slug": "units", "rating": 4}),
            )
            .await,
        );
        let review_id = review["review"]["id"].as_str().unwrap().to_owned();
        let api = format!("{}/api/v1/servers/units", m.base);
        let before = common::snapshot(m).await;
        let prices_before = count(m, "SELECT CAST(COUNT(*) AS BIGINT) FROM price_changes").await;
        let probes_before = count(m, "SELECT CAST(COUNT(*) AS BIGINT) FROM probe_results").await;
        let routes: Vec<(&str, String, Option<Value>)> = vec![
            (
                "PATCH",
                api.clone(),
                Some(json!({"description": "mine now"})),
            ),
            ("GET", format!("{api}/pricing"), None),
            (
                "PUT",
                format!("{api}/pricing"),
                Some(json!({"pricing": "free"})),
            ),
            ("POST", format!("{api}/unlist"), None),
            ("POST", format!("{api}/list"), None),
            ("POST", format!("{api}/verify"), None),
            ("GET", format!("{api}/verification"), None),
            ("GET", format!("{api}/probes"), None),
            ("GET", format!("{api}/analytics"), None),
            (
                "POST",
                format!("{api}/reviews/{review_id}/reply"),
                Some(json!({"reply": "thanks"})),
            ),
            ("GET", format!("{api}/credentials"), None),
            (
                "PUT",
                format!("{api}/credentials"),
                Some(json!({"headers": {"X-Key": "v"}})),
            ),
            ("DELETE", format!("{api}/credentials"), None),
            ("POST", format!("{api}/secret"), None),
        ];
        for (method, url, body) in &routes {
            let (status, e) = rest(method, url, &intruder, body.clone()).await;
            assert_eq!(status, 404, "{method} {url}: {e}");
            assert_eq!(e["error"]["kind"], json!("not_found"), "{method} {url}");
        }
        // Approval is an admin's, not a creator's.
        let (status, _) = rest("POST", &format!("{api}/approve"), &intruder, None).await;
        assert_eq!(status, 403);
        // Over MCP too.
        let ic = client_at(&m.mcp_url(), &intruder).await;
        let r = call(
            &ic,
            "marketplace__server_analytics",
            json!({"slug": "units"}),
        )
        .await;
        assert_eq!(error_kind(&r).as_deref(), Some("unknown_server"));
        // Nothing moved.
        assert_eq!(common::snapshot(m).await, before);
        assert_eq!(
            count(m, "SELECT CAST(COUNT(*) AS BIGINT) FROM price_changes").await,
            prices_before
        );
        assert_eq!(
            count(m, "SELECT CAST(COUNT(*) AS BIGINT) FROM probe_results").await,
            probes_before
        );
        let units = m.app.catalog.get("units").await.unwrap();
        assert!(units.listed && units.description.is_empty() && units.price_micros == UNITS_PRICE);
        assert!(
            m.app.catalog.reviews(&units.id).await.unwrap()[0]
                .reply
                .is_none()
        );
        // The owner may, on the same routes.
        let (status, _) = rest("GET", &format!("{api}/analytics"), &owner, None).await;
        assert_eq!(status, 200);
        let (status, v) = rest(
            "POST",
            &format!("{api}/reviews/{review_id}/reply"),
            &owner,
            Some(json!({"reply": "thanks"})),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        client.cancel().await.ok();
        ic.cancel().await.ok();
        w.stop().await;
    }
}

#[tokio::test]
async fn a_price_change_never_changes_a_call_already_reserved() {
    for backend in backends() {
        let (market, fault, user, key) = common::faulty_world(backend).await;
        let owner = market.key("creator", &[Scope::ServersWrite]).await;
        let client = market.client(&key).await;
        let pending = {
            let peer = client.peer().clone();
            tokio::spawn(async move {
                peer.call_tool(
                    CallToolRequestParams::new("faulty__sleep")
                        .with_arguments(args(json!({"ms": 1500}))),
                )
                .await
            })
        };
        // The call is reserved (its price is in `calls`), still running.
        wait_until(|| async {
            count(
                &market,
                "SELECT CAST(COUNT(*) AS BIGINT) FROM calls WHERE status = 'reserved'",
            )
            .await
                == 1
        })
        .await;
        let (status, v) = rest(
            "PUT",
            &format!("{}/api/v1/servers/faulty/pricing", market.base),
            &owner,
            Some(json!({"pricing": "0.10_per_request"})),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let first = pending.await.unwrap().expect("the slow call answers");
        let receipt = receipt_of(&first);
        assert_eq!(
            (receipt.outcome.as_str(), receipt.charged_micros),
            ("settled", 50_000),
            "the reserved call keeps its price"
        );
        let second = call(&client, "faulty__add", json!({"a": 1, "b": 2})).await;
        assert_eq!(receipt_of(&second).charged_micros, 100_000);
        assert_eq!(
            market.balance(&user).await.wallet_micros,
            1_000_000 - 150_000
        );
        // A change effective later is recorded but does not apply yet.
        let later = chrono::Utc::now() + chrono::Duration::days(1);
        let (status, v) = rest(
            "PUT",
            &format!("{}/api/v1/servers/faulty/pricing", market.base),
            &owner,
            Some(
                json!({"pricing": "0.20_per_request", "tool_prices": {"add": "0.01"},
                        "effective_at": later.to_rfc3339()}),
            ),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["price_micros"], json!(100_000), "{v}");
        let third = call(&client, "faulty__add", json!({"a": 1, "b": 2})).await;
        assert_eq!(receipt_of(&third).charged_micros, 100_000);
        let (_, history) = rest(
            "GET",
            &format!("{}/api/v1/servers/faulty/pricing", market.base),
            &owner,
            None,
        )
        .await;
        let scheduled = history["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["applied_at"].is_null())
            .count();
        assert_eq!(scheduled, 2, "{history}");
        // Bad prices change nothing.
        for body in [
            json!({"pricing": "-1_per_request"}),
            json!({}),
            json!({"tool_prices": {"": "0.01"}}),
        ] {
            let (status, _) = rest(
                "PUT",
                &format!("{}/api/v1/servers/faulty/pricing", market.base),
                &owner,
                Some(body),
            )
            .await;
            assert_eq!(status, 400);
        }
        assert_eq!(
            count(
                &market,
                "SELECT CAST(COUNT(*) AS BIGINT) FROM price_changes"
            )
            .await,
            1 + 1 + 2
        );
        market.assert_ledger_ok().await;
        client.cancel().await.ok();
        market.stop().await;
        fault.stop().await;
    }
}

/// One fixture server: (slug, name, category, description, tools as (name, description)).
type FixtureServer = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

/// A fixture catalog of realistic servers.
fn fixture() -> Vec<FixtureServer> {
    vec![
        (
            "weather",
            "Weather Forecasts",
            "data",
            "Current conditions and seven-day weather forecasts: temperature, rain, wind and humidity for any city.",
            vec![
                ("forecast", "Seven-day forecast for a city."),
                ("current", "Current weather conditions."),
            ],
        ),
        (
            "units",
            "Unit Converter",
            "utilities",
            "Convert lengths, masses, temperatures, volumes and speeds between metric and imperial units.",
            vec![(
                "convert",
                "Convert a value from one unit to another, e.g. km to miles.",
            )],
        ),
        (
            "calendar",
            "Team Calendar",
            "productivity",
            "Create, move and cancel meetings and events in shared team calendars; find free slots.",
            vec![
                ("create_event", "Create a calendar event."),
                ("free_slots", "Find free time slots for attendees."),
            ],
        ),
        (
            "email",
            "Email Sender",
            "communication",
            "Send transactional email with attachments and track delivery, bounces and opens.",
            vec![("send_email", "Send an email message.")],
        ),
        (
            "sms",
            "SMS Gateway",
            "communication",
            "Send text messages (SMS) to phone numbers worldwide and receive delivery receipts.",
            vec![("send_sms", "Send a text message to a phone number.")],
        ),
        (
            "translate",
            "Translator",
            "language",
            "Translate text between more than 100 languages with automatic language detection.",
            vec![("translate_text", "Translate text into a target language.")],
        ),
        (
            "stocks",
            "Stock Quotes",
            "finance",
            "Real-time and historical stock prices, dividends and market capitalization for listed companies.",
            vec![("quote", "Latest stock price for a ticker symbol.")],
        ),
        (
            "crypto",
            "Crypto Prices",
            "finance",
            "Bitcoin, Ethereum and altcoin prices, trading volume and exchange rates against fiat currencies.",
            vec![("coin_price", "Price of a cryptocurrency.")],
        ),
        (
            "fx",
            "Currency Exchange",
            "finance",
            "Foreign exchange rates and currency conversion between dollars, euros, yen and 150 other currencies.",
            vec![("exchange_rate", "Exchange rate between two currencies.")],
        ),
        (
            "maps",
            "Maps and Directions",
            "travel",
            "Geocode addresses, compute driving and walking directions and travel times between places.",
            vec![("directions", "Directions between two addresses.")],
        ),
        (
            "flights",
            "Flight Search",
            "travel",
            "Search airline flights, fares and seat availability between airports.",
            vec![("search_flights", "Find flights between airports on a date.")],
        ),
        (
            "hotels",
            "Hotel Booking",
            "travel",
            "Find and book hotel rooms by city, dates, price and guest rating.",
            vec![("book_room", "Book a hotel room.")],
        ),
        (
            "github",
            "GitHub Issues",
            "developer",
            "Open, label, comment on and close GitHub issues and pull requests in your repositories.",
            vec![("create_issue", "Open a GitHub issue.")],
        ),
        (
            "sql",
            "SQL Runner",
            "developer",
            "Run read-only SQL queries against PostgreSQL and MySQL databases and return rows as JSON.",
            vec![("run_query", "Run a read-only SQL query.")],
        ),
        (
            "pdf",
            "PDF Tools",
            "documents",
            "Extract text and tables from PDF files, merge and split PDF documents.",
            vec![("extract_text", "Extract the text of a PDF.")],
        ),
        (
            "ocr",
            "OCR",
            "documents",
            "Optical character recognition: read printed and handwritten text from scanned images and photos.",
            vec![("read_image", "Recognize text in an image.")],
        ),
        (
            "images",
            "Image Generator",
            "media",
            "Generate illustrations and photorealistic pictures from a text prompt.",
            vec![("generate_image", "Generate an image from a prompt.")],
        ),
        (
            "resize",
            "Image Resizer",
            "media",
            "Resize, crop, compress and convert images between PNG, JPEG and WebP formats.",
            vec![("resize_image", "Resize an image.")],
        ),
        (
            "speech",
            "Text to Speech",
            "media",
            "Turn written text into natural sounding spoken audio in many voices.",
            vec![("speak", "Synthesize speech audio from text.")],
        ),
        (
            "transcribe",
            "Transcription",
            "media",
            "Transcribe audio recordings and podcasts into text with speaker labels.",
            vec![("transcribe_audio", "Transcribe an audio file.")],
        ),
        (
            "news",
            "News Headlines",
            "data",
            "Top news headlines and articles by topic, source and country.",
            vec![("headlines", "Latest news headlines.")],
        ),
        (
            "wiki",
            "Encyclopedia",
            "knowledge",
            "Look up encyclopedia articles, summaries and facts about people, places and events.",
            vec![("lookup", "Summary of an encyclopedia article.")],
        ),
        (
            "dictionary",
            "Dictionary",
            "language",
            "Word definitions, synonyms, antonyms, pronunciation and example sentences.",
            vec![("define", "Define a word.")],
        ),
        (
            "math",
            "Math Solver",
            "education",
            "Solve equations, integrals and derivatives step by step; symbolic algebra.",
            vec![("solve", "Solve an equation.")],
        ),
        (
            "recipes",
            "Recipe Finder",
            "food",
            "Find cooking recipes by ingredients, cuisine and diet, with nutrition facts.",
            vec![("find_recipe", "Find recipes using ingredients.")],
        ),
        (
            "nutrition",
            "Nutrition Facts",
            "health",
            "Calories, protein, fat and vitamins of foods and meals.",
            vec![("nutrients", "Nutrition facts of a food.")],
        ),
        (
            "fitness",
            "Workout Planner",
            "health",
            "Plan strength and cardio workouts and track exercise progress.",
            vec![("plan_workout", "Plan a workout.")],
        ),
        (
            "crm",
            "CRM Contacts",
            "sales",
            "Manage customer contacts, leads and deals in a sales pipeline.",
            vec![("add_contact", "Add a customer contact.")],
        ),
        (
            "invoices",
            "Invoicing",
            "finance",
            "Create and send invoices, track payments and overdue bills.",
            vec![("create_invoice", "Create an invoice.")],
        ),
        (
            "tax",
            "Sales Tax",
            "finance",
            "Calculate VAT and sales tax rates for addresses and products.",
            vec![("tax_rate", "Sales tax rate for an address.")],
        ),
        (
            "shipping",
            "Parcel Tracking",
            "logistics",
            "Track parcels and shipments across carriers such as UPS, FedEx and DHL.",
            vec![("track_parcel", "Track a parcel by tracking number.")],
        ),
        (
            "dns",
            "DNS Lookup",
            "developer",
            "Resolve DNS records (A, AAAA, MX, TXT) and check domain configuration.",
            vec![("resolve", "Look up DNS records of a domain.")],
        ),
        (
            "whois",
            "Domain WHOIS",
            "developer",
            "WHOIS registration data and expiry dates of domain names.",
            vec![("whois", "WHOIS data of a domain.")],
        ),
        (
            "uptime",
            "Website Monitor",
            "developer",
            "Check whether a website is up, its response time and SSL certificate expiry.",
            vec![("check_site", "Check a website.")],
        ),
        (
            "qr",
            "QR Codes",
            "utilities",
            "Generate and decode QR codes and barcodes.",
            vec![("make_qr", "Generate a QR code.")],
        ),
        (
            "passwords",
            "Password Generator",
            "security",
            "Generate strong random passwords and passphrases and check password strength.",
            vec![("generate_password", "Generate a password.")],
        ),
        (
            "vuln",
            "Vulnerability Scanner",
            "security",
            "Scan software dependencies for known security vulnerabilities (CVEs).",
            vec![("scan_dependencies", "Scan dependencies for CVEs.")],
        ),
        (
            "notes",
            "Notes",
            "productivity",
            "A private notes store: add, list, search, read and delete notes.",
            vec![("add_note", "Add a note.")],
        ),
        (
            "todo",
            "Task List",
            "productivity",
            "Manage to-do lists, tasks, due dates and reminders.",
            vec![("add_task", "Add a task.")],
        ),
        (
            "slack",
            "Team Chat",
            "communication",
            "Post messages to team chat channels and read channel history.",
            vec![("post_message", "Post a message to a channel.")],
        ),
        (
            "sheets",
            "Spreadsheets",
            "productivity",
            "Read and write rows and cells of online spreadsheets.",
            vec![("append_row", "Append a row to a spreadsheet.")],
        ),
        (
            "timezones",
            "Time Zones",
            "utilities",
            "Convert times between time zones and find the current local time in any city.",
            vec![("convert_time", "Convert a time between time zones.")],
        ),
        (
            "holidays",
            "Public Holidays",
            "data",
            "Public and bank holidays by country and year.",
            vec![("holidays", "Public holidays of a country.")],
        ),
        (
            "air",
            "Air Quality",
            "environment",
            "Air quality index, pollen and pollution levels (PM2.5, ozone) by location.",
            vec![("aqi", "Air quality index of a place.")],
        ),
        (
            "earthquakes",
            "Earthquake Alerts",
            "environment",
            "Recent earthquakes with magnitude and location, and seismic alerts.",
            vec![("recent_quakes", "Recent earthquakes.")],
        ),
        (
            "movies",
            "Movie Database",
            "entertainment",
            "Movie and TV show details, cast, ratings and where to stream them.",
            vec![("movie_info", "Details of a movie.")],
        ),
        (
            "music",
            "Music Catalog",
            "entertainment",
            "Search songs, albums and artists, lyrics and release dates.",
            vec![("find_song", "Find a song.")],
        ),
        (
            "sports",
            "Sports Scores",
            "entertainment",
            "Live football, basketball and baseball scores, fixtures and league tables.",
            vec![("scores", "Live sports scores.")],
        ),
        (
            "jobs",
            "Job Board",
            "career",
            "Search job postings by title, location and salary.",
            vec![("search_jobs", "Search job postings.")],
        ),
        (
            "realestate",
            "Property Listings",
            "real-estate",
            "Homes for sale and rent with prices, photos and neighborhood data.",
            vec![("listings", "Property listings in an area.")],
        ),
        (
            "legal",
            "Contract Review",
            "legal",
            "Summarize contracts and flag risky clauses in legal documents.",
            vec![("review_contract", "Review a contract.")],
        ),
        (
            "sentiment",
            "Sentiment Analysis",
            "ai",
            "Detect sentiment and emotion in customer reviews and social media posts.",
            vec![("analyze_sentiment", "Sentiment of a text.")],
        ),
    ]
}

async fn load_fixture(market: &Market) -> mcp_marketplace::auth::accounts::Account {
    let creator = market.account("fixture-creator").await;
    for (i, (slug, name, category, description, tools)) in fixture().into_iter().enumerate() {
        let new = NewServer {
            name: name.to_owned(),
            slug: Some(slug.to_owned()),
            description: description.to_owned(),
            categories: vec![category.to_owned()],
            endpoints: vec![format!("https://x.example.com/{slug}/mcp")],
            // Prices from 0.001 to 0.052 USD.
            pricing: format!("0.{:03}_per_request", i + 1),
            ..NewServer::default()
        };
        let (server, _) = market
            .app
            .catalog
            .register(&creator.id, &new, &market.app.policy)
            .await
            .expect("fixture server");
        let defs: Vec<Value> = tools
            .iter()
            .map(|(n, d)| json!({"name": n, "description": d, "inputSchema": {"type": "object"}}))
            .collect();
        market
            .app
            .catalog
            .replace_tools(&server, &defs)
            .await
            .unwrap();
        market
            .app
            .catalog
            .approve_tools(&server.id, None, "test")
            .await
            .unwrap();
        market
            .app
            .catalog
            .set_status(slug, ServerStatus::Active)
            .await
            .unwrap();
    }
    creator
}

#[tokio::test]
async fn search_puts_the_relevant_server_first_on_a_fixture_catalog() {
    assert!(fixture().len() >= 50);
    for backend in backends() {
        let market = Market::start(TestDb::new(backend).await).await;
        load_fixture(&market).await;
        market.account("agent").await;
        let key = market
            .key("agent", &[Scope::CatalogRead, Scope::Invoke])
            .await;
        let queries = [
            ("will it rain in Paris tomorrow", "weather"),
            ("convert 10 km to miles", "units"),
            ("schedule a meeting with my team", "calendar"),
            ("send a text message to a phone", "sms"),
            ("translate this paragraph into Spanish", "translate"),
            ("bitcoin price", "crypto"),
            ("exchange rate euros to dollars", "fx"),
            ("read text from a scanned photo", "ocr"),
            ("track my FedEx parcel", "shipping"),
            ("is my website up", "uptime"),
            ("check dependencies for CVEs", "vuln"),
            ("transcribe a podcast recording", "transcribe"),
            ("pollen and pollution levels", "air"),
            ("open a GitHub issue", "github"),
        ];
        for (q, expected) in queries {
            let hits = market
                .app
                .catalog
                .search_servers(q, &Default::default(), 5)
                .await
                .unwrap();
            assert_eq!(
                hits.first().map(|h| h.server.slug.as_str()),
                Some(expected),
                "query '{q}' ({backend:?}): {:?}",
                hits.iter()
                    .map(|h| (&h.server.slug, h.rank))
                    .collect::<Vec<_>>()
            );
        }
        // The same through REST and MCP.
        let (_, r) = rest(
            "GET",
            &format!(
                "{}/api/v1/servers?q=convert%2010%20km%20to%20miles",
                market.base
            ),
            &key,
            None,
        )
        .await;
        assert_eq!(r["servers"][0]["slug"], json!("units"), "{r}");
        let client = client_at(&market.mcp_url(), &key).await;
        let found = structured(
            &call(
                &client,
                "marketplace__search_servers",
                json!({"query": "bitcoin price"}),
            )
            .await,
        );
        assert_eq!(found["servers"][0]["slug"], json!("crypto"));
        // Filters: category, price ceiling, status, minimum rating.
        let (_, r) = rest(
            "GET",
            &format!("{}/api/v1/servers?category=finance", market.base),
            &key,
            None,
        )
        .await;
        let mut finance: Vec<&str> = r["servers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["slug"].as_str())
            .collect();
        finance.sort();
        assert_eq!(finance, vec!["crypto", "fx", "invoices", "stocks", "tax"]);
        let (_, r) = rest(
            "GET",
            &format!("{}/api/v1/servers?q=weather&max_price=0.0005", market.base),
            &key,
            None,
        )
        .await;
        assert_eq!(r["servers"], json!([]), "weather costs 0.001");
        let (_, r) = rest(
            "GET",
            &format!("{}/api/v1/servers?q=weather&status=degraded", market.base),
            &key,
            None,
        )
        .await;
        assert_eq!(r["servers"], json!([]));
        let (_, r) = rest(
            "GET",
            &format!("{}/api/v1/servers?q=weather&min_rating=4", market.base),
            &key,
            None,
        )
        .await;
        assert_eq!(r["servers"], json!([]), "no reviews yet");
        // Reputation breaks ties between equally relevant servers.
        let news = market.app.catalog.get("news").await.unwrap();
        let wiki = market.app.catalog.get("wiki").await.unwrap();
        for s in [&news, &wiki] {
            market
                .app
                .catalog
                .refresh_reputation(&s.id, 0)
                .await
                .unwrap();
        }
        sqlx::query("UPDATE server_reputation SET score = 90 WHERE server_id = $1")
            .bind(&wiki.id)
            .execute(market.app.store.pool())
            .await
            .unwrap();
        let hits = market
            .app
            .catalog
            .search_servers("articles", &Default::default(), 5)
            .await
            .unwrap();
        assert_eq!(
            hits[0].server.slug,
            "wiki",
            "{:?}",
            hits.iter()
                .map(|h| (&h.server.slug, h.rank))
                .collect::<Vec<_>>()
        );
        // Tools across the catalog by task.
        let tools = structured(
            &call(
                &client,
                "marketplace__search_tools",
                json!({"query": "convert a value from km to miles"}),
            )
            .await,
        );
        assert_eq!(
            tools["tools"][0]["name"],
            json!("units__convert"),
            "{tools}"
        );
        // Unlisted servers leave search.
        let creator_key = market.key("fixture-creator", &[Scope::ServersWrite]).await;
        let (status, _) = rest(
            "POST",
            &format!("{}/api/v1/servers/units/unlist", market.base),
            &creator_key,
            None,
        )
        .await;
        assert_eq!(status, 200);
        let hits = market
            .app
            .catalog
            .search_servers("convert km to miles", &Default::default(), 5)
            .await
            .unwrap();
        assert!(hits.iter().all(|h| h.server.slug != "units"));
        client.cancel().await.ok();
        market.stop().await;
    }
}

#[tokio::test]
async fn install_and_uninstall_change_tools_list_and_notify_the_session() {
    for backend in backends() {
        let w = World::start(backend, 1_000_000).await;
        for slug in ["units", "notes"] {
            w.market.app.uninstall(&w.user.id, slug).await.unwrap();
        }
        let (client, watcher) = watching_client(&w.market.mcp_url(), &w.key).await;
        let before = tool_names(&client).await;
        assert!(
            before.iter().all(|n| n.starts_with("marketplace__")),
            "{before:?}"
        );
        // An agent with nothing installed finds the tool for its task and installs it,
        // listing only the tool it wants.
        let found = structured(
            &call(
                &client,
                "marketplace__search_tools",
                json!({"query": "convert kilometres to miles"}),
            )
            .await,
        );
        assert_eq!(found["tools"][0]["server"], json!("units"), "{found}");
        let r = structured(
            &call(
                &client,
                "marketplace__install_server",
                json!({"slug": "units", "tools": ["convert"]}),
            )
            .await,
        );
        assert_eq!(r["changed"], json!(true));
        wait_until(|| async { watcher.0.load(Ordering::SeqCst) >= 1 }).await;
        let after = tool_names(&client).await;
        assert!(after.contains(&"units__convert".to_owned()), "{after:?}");
        assert!(
            !after.contains(&"units__list_units".to_owned()),
            "{after:?}"
        );
        let r = call(
            &client,
            "units__convert",
            json!({"value": 10, "from": "km", "to": "mi"}),
        )
        .await;
        assert_eq!(receipt_of(&r).charged_micros, UNITS_PRICE);
        // An unknown tool choice changes nothing.
        let r = call(
            &client,
            "marketplace__install_server",
            json!({"slug": "notes", "tools": ["nope"]}),
        )
        .await;
        assert_eq!(error_kind(&r).as_deref(), Some("invalid_arguments"));
        assert!(
            w.market
                .app
                .catalog
                .installed_slugs(&w.user.id)
                .await
                .unwrap()
                == vec!["units".to_owned()]
        );
        structured(
            &call(
                &client,
                "marketplace__uninstall_server",
                json!({"slug": "units"}),
            )
            .await,
        );
        wait_until(|| async { watcher.0.load(Ordering::SeqCst) >= 2 }).await;
        let gone = tool_names(&client).await;
        assert!(gone.iter().all(|n| !n.starts_with("units__")), "{gone:?}");
        client.cancel().await.ok();
        w.stop().await;
    }
}

#[tokio::test]
async fn call_tool_meters_like_a_direct_call() {
    for backend in backends() {
        let w = World::start(backend, 1_000_000).await;
        let m = &w.market;
        let agent = m.account("agent").await;
        m.app
            .ledger
            .topup(&agent.id, 1_000_000, "test")
            .await
            .unwrap();
        let agent_key = m.key("agent", &[Scope::Invoke, Scope::CatalogRead]).await;
        let arguments = json!({"value": 10, "from": "km", "to": "mi"});
        // Direct, by the world's user (installed).
        let direct_client = m.client(&w.key).await;
        let earnings0 = m.balance(&w.creator).await.earnings_micros;
        let revenue0 = m.platform().await.revenue_micros;
        let direct = call(&direct_client, "units__convert", arguments.clone()).await;
        let earnings1 = m.balance(&w.creator).await.earnings_micros;
        let revenue1 = m.platform().await.revenue_micros;
        // Through marketplace__call_tool, by an agent that installed nothing.
        let client = m.client(&agent_key).await;
        let through = call(
            &client,
            "marketplace__call_tool",
            json!({"name": "units__convert", "arguments": arguments}),
        )
        .await;
        let earnings2 = m.balance(&w.creator).await.earnings_micros;
        let revenue2 = m.platform().await.revenue_micros;
        let (a, b) = (receipt_of(&direct), receipt_of(&through));
        assert_eq!(
            (
                a.outcome.as_str(),
                a.charged_micros,
                a.server.as_str(),
                a.tool.as_str()
            ),
            (
                b.outcome.as_str(),
                b.charged_micros,
                b.server.as_str(),
                b.tool.as_str()
            )
        );
        assert_eq!(b.charged_micros, UNITS_PRICE);
        assert_eq!(b.account, "agent");
        assert_eq!(direct.content, through.content);
        assert_eq!(earnings2 - earnings1, earnings1 - earnings0);
        assert_eq!(revenue2 - revenue1, revenue1 - revenue0);
        assert_eq!(
            m.balance(&agent).await.wallet_micros,
            1_000_000 - UNITS_PRICE
        );
        assert_eq!(
            count(
                m,
                &format!(
                    "SELECT CAST(COUNT(*) AS BIGINT) FROM calls WHERE account_id = '{}' AND status = 'settled'",
                    agent.id
                )
            )
            .await,
            1
        );
        // A failing tool is refunded the same way; bad targets are refused.
        let units_before = m.balance(&agent).await.wallet_micros;
        let r = call(
            &client,
            "marketplace__call_tool",
            json!({"name": "units__convert", "arguments": {"value": 1, "from": "km", "to": "parsec-nope"}}),
        )
        .await;
        if r.is_error == Some(true) {
            assert_eq!(receipt_of(&r).charged_micros, 0);
            assert_eq!(m.balance(&agent).await.wallet_micros, units_before);
        }
        let r = call(
            &client,
            "marketplace__call_tool",
            json!({"name": "marketplace__get_balance"}),
        )
        .await;
        assert_eq!(error_kind(&r).as_deref(), Some("invalid_arguments"));
        let err = client
            .call_tool(
                CallToolRequestParams::new("marketplace__call_tool")
                    .with_arguments(args(json!({"name": "nope__nothing"}))),
            )
            .await
            .expect_err("unknown tool");
        assert!(err.to_string().contains("Unknown tool"), "{err}");
        m.assert_ledger_ok().await;
        client.cancel().await.ok();
        direct_client.cancel().await.ok();
        w.stop().await;
    }
}

#[tokio::test]
async fn reviews_need_a_paid_call_and_creators_reply_once() {
    for backend in backends() {
        let w = World::start(backend, 1_000_000).await;
        let m = &w.market;
        let client = m.client(&w.key).await;
        let api = format!("{}/api/v1/servers/units/reviews", m.base);
        let before = count(m, "SELECT CAST(COUNT(*) AS BIGINT) FROM reviews").await;
        // No paid call yet: refused on MCP and REST.
        let r = call(
            &client,
            "marketplace__rate_server",
            json!({"slug": "units", "rating": 5}),
        )
        .await;
        assert_eq!(error_kind(&r).as_deref(), Some("review_refused"));
        let (status, e) = rest(
            "POST",
            &api,
            &w.key,
            Some(json!({"rating": 5, "review": "great"})),
        )
        .await;
        assert_eq!(status, 403, "{e}");
        assert_eq!(
            count(m, "SELECT CAST(COUNT(*) AS BIGINT) FROM reviews").await,
            before
        );
        // After a paid call: accepted, then edited (one per account per server).
        call(
            &client,
            "units__convert",
            json!({"value": 1, "from": "km", "to": "m"}),
        )
        .await;
        let (status, first) = rest(
            "POST",
            &api,
            &w.key,
            Some(json!({"rating": 5, "review": "great"})),
        )
        .await;
        assert_eq!((status, &first["created"]), (201, &json!(true)), "{first}");
        let r = structured(
            &call(
                &client,
                "marketplace__rate_server",
                json!({"slug": "units", "rating": 3, "review": "ok after all"}),
            )
            .await,
        );
        assert_eq!(r["created"], json!(false));
        assert_eq!(r["review"]["id"], first["review"]["id"]);
        assert_eq!(
            count(m, "SELECT CAST(COUNT(*) AS BIGINT) FROM reviews").await,
            before + 1
        );
        // Bad ratings are refused.
        for body in [
            json!({"rating": 0}),
            json!({"rating": 6}),
            json!({"rating": 3, "review": "x".repeat(2001)}),
        ] {
            let (status, _) = rest("POST", &api, &w.key, Some(body)).await;
            assert_eq!(status, 400);
        }
        // The creator replies once, and cannot review their own server.
        let owner = m
            .key(
                "creator",
                &[Scope::ServersWrite, Scope::Invoke, Scope::CatalogRead],
            )
            .await;
        let id = first["review"]["id"].as_str().unwrap();
        let (status, _) = rest(
            "POST",
            &format!("{api}/{id}/reply"),
            &owner,
            Some(json!({"reply": "thank you"})),
        )
        .await;
        assert_eq!(status, 200);
        let (status, _) = rest(
            "POST",
            &format!("{api}/{id}/reply"),
            &owner,
            Some(json!({"reply": "again"})),
        )
        .await;
        assert_eq!(status, 409);
        let (status, _) = rest("POST", &api, &owner, Some(json!({"rating": 5}))).await;
        assert_eq!(status, 403);
        // Shown with the server.
        let detail =
            structured(&call(&client, "marketplace__get_server", json!({"slug": "units"})).await);
        assert_eq!(detail["reviews"][0]["rating"], json!(3), "{detail}");
        assert_eq!(detail["reviews"][0]["reply"], json!("thank you"));
        client.cancel().await.ok();
        w.stop().await;
    }
}

#[tokio::test]
async fn reputation_matches_hand_computed_values_from_stored_rows() {
    for backend in backends() {
        let market = Market::start(TestDb::new(backend).await).await;
        load_fixture(&market).await;
        let user = market.account("user").await;
        let other_user = market.account("other").await;
        let server = market.app.catalog.get("weather").await.unwrap();
        let other = market.app.catalog.get("news").await.unwrap();
        let now = mcp_marketplace::store::now_ms();
        let pool = market.app.store.pool();
        // 10 probes, 9 ok; ok latencies with median 300 ms (B); one probe older than
        // 30 days that must not count.
        let latencies = [490, 100, 150, 200, 220, 300, 400, 450, 480];
        for (i, l) in latencies.iter().enumerate() {
            insert_probe(pool, &server.id, now - 1000 * i as i64, Some(*l), true).await;
        }
        insert_probe(pool, &server.id, now - 50_000, None, false).await;
        insert_probe(pool, &server.id, now - 31 * 86_400_000, None, false).await;
        // 18 settled, 2 refunded by the upstream, 1 cancelled by the client.
        for i in 0..21 {
            let (status, kind) = match i {
                0..18 => ("settled", None),
                18 | 19 => ("refunded", Some("upstream_error")),
                _ => ("refunded", Some("cancelled")),
            };
            sqlx::query(
                "INSERT INTO calls (id, account_id, key_id, server_id, tool, price_micros, creator_micros, \
                 fee_micros, status, error_kind, hold_expires_at, created_at, finished_at, latency_ms) \
                 VALUES ($1, $2, 'k', $3, 'forecast', 1000, 700, 300, $4, $5, $6, $6, $6, 10)",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&user.id)
            .bind(&server.id)
            .bind(status)
            .bind(kind)
            .bind(now - 5000)
            .execute(pool)
            .await
            .unwrap();
        }
        // Reviews: 5 and 4 on this server, 1 on another (global mean 10/3).
        for (account, s, stars) in [
            (&user, &server, 5),
            (&other_user, &server, 4),
            (&user, &other, 1),
        ] {
            sqlx::query(
                "INSERT INTO reviews (id, server_id, account_id, rating, body, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, '', $5, $5)",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&s.id)
            .bind(&account.id)
            .bind(stars as i64)
            .bind(now)
            .execute(pool)
            .await
            .unwrap();
        }
        let rep = market
            .app
            .catalog
            .refresh_reputation(&server.id, now)
            .await
            .unwrap();
        // U = 0.9, S = (18+9)/(20+10) = 0.9, L = B = 0.75, R = (5·10/3 + 9)/7 = 3.6667:
        // 100 × (0.315 + 0.225 + 0.1125 + 0.25 × 0.6667) = 81.9.
        assert_eq!(rep.score, 81.9, "{rep:?}");
        assert_eq!(rep.latency_grade, "B");
        assert_eq!((rep.probes, rep.calls, rep.reviews), (10, 20, 2));
        assert_eq!(rep.rating, Some(4.5));
        // Stored and shown with the server.
        let stored = market
            .app
            .catalog
            .reputation(&server.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored, rep);
        market.app.catalog.refresh_reputations().await.unwrap();
        let view = mcp_marketplace::market::server_view(&market.app, &server, false)
            .await
            .unwrap();
        assert_eq!(view["reputation"]["score"], json!(81.9));
        // The other server: no probes, no calls, one 1-star review:
        // U = 0, S = 0.9, L = F, R = (5·10/3 + 1)/6 = 2.9444 → 100 × (0.225 + 0.25 × 0.4861) = 34.65 → 34.7.
        let other_rep = market
            .app
            .catalog
            .reputation(&other.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(other_rep.score, 34.7, "{other_rep:?}");
        market.stop().await;
    }
}

async fn table_counts(m: &Market, tables: &[&str]) -> Vec<i64> {
    let mut out = Vec::new();
    for t in tables {
        out.push(count(m, &format!("SELECT CAST(COUNT(*) AS BIGINT) FROM {t}")).await);
    }
    out
}

async fn insert_probe(
    pool: &sqlx::AnyPool,
    server_id: &str,
    at: i64,
    latency: Option<i64>,
    ok: bool,
) {
    sqlx::query(
        "INSERT INTO probe_results (id, server_id, endpoint_position, kind, started_at, duration_ms, latency_ms, \
         grade, ok, checks) VALUES ($1, $2, 0, 'scheduled', $3, 5, $4, 'A', $5, '[]')",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(server_id)
    .bind(at)
    .bind(latency)
    .bind(i64::from(ok))
    .execute(pool)
    .await
    .unwrap();
}

// The CLI runs as a blocking child process: the marketplace needs its own threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_sync_is_idempotent_and_reports_changes() {
    for backend in backends() {
        let upstream = spawn_unit_converter(bind().await, SecretSlot::default())
            .await
            .expect("upstream");
        let market = Market::start(TestDb::new(backend).await).await;
        let dir = tempfile::tempdir().unwrap();
        let manifest = |description: &str, pricing: &str| {
            format!(
                "slug = \"units\"\nname = \"Unit Converter\"\ndescription = \"{description}\"\n\
                 categories = [\"utilities\"]\nendpoints = [\"{}\"]\npricing = \"{pricing}\"\n\
                 timeout = \"10s\"\nowner = \"ops\"\n[tool_prices]\nlist_units = \"free\"\n",
                upstream.url
            )
        };
        std::fs::write(
            dir.path().join("units.toml"),
            manifest("Converts units.", "0.002_per_request"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("broken.toml"),
            "slug = \"broken\"\nname = \"B\"\nendpoints = []\npricing = \"free\"\nbad_key = 1\n",
        )
        .unwrap();
        let first = mcp_marketplace::market::sync::sync(&market.app, dir.path())
            .await
            .unwrap();
        assert_eq!(first.created.len(), 1, "{first:?}");
        assert_eq!(first.created[0].slug, "units");
        assert!(first.created[0].verification_ok);
        assert_eq!(first.failed.len(), 1, "the bad manifest is reported");
        let tables = [
            "servers",
            "server_endpoints",
            "tool_prices",
            "price_changes",
            "probe_results",
            "accounts",
            "audit_log",
        ];
        let before = table_counts(&market, &tables).await;
        let updated_before = sqlx::query("SELECT updated_at FROM servers WHERE slug = 'units'")
            .fetch_one(market.app.store.pool())
            .await
            .unwrap()
            .try_get::<i64, _>(0)
            .unwrap();
        // Second run, through the CLI: nothing to change.
        let out = bin(
            &market.db.url,
            &[
                "servers",
                "sync",
                &dir.path().display().to_string(),
                "--json",
            ],
        );
        let second: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(second["created"], json!([]), "{second}");
        assert_eq!(second["updated"], json!([]), "{second}");
        assert_eq!(second["unchanged"], json!(["units"]));
        assert_eq!(table_counts(&market, &tables).await, before);
        let updated_after = sqlx::query("SELECT updated_at FROM servers WHERE slug = 'units'")
            .fetch_one(market.app.store.pool())
            .await
            .unwrap()
            .try_get::<i64, _>(0)
            .unwrap();
        assert_eq!(updated_before, updated_after);
        // A change in git is applied and reported, then again nothing.
        std::fs::write(
            dir.path().join("units.toml"),
            manifest("Converts units fast.", "0.003_per_request"),
        )
        .unwrap();
        let third = mcp_marketplace::market::sync::sync(&market.app, dir.path())
            .await
            .unwrap();
        assert_eq!(third.updated.len(), 1, "{third:?}");
        assert_eq!(third.updated[0].changed, vec!["description", "pricing"]);
        let s = market.app.catalog.get("units").await.unwrap();
        assert_eq!(
            (s.description.as_str(), s.price_micros),
            ("Converts units fast.", 3_000)
        );
        let fourth = mcp_marketplace::market::sync::sync(&market.app, dir.path())
            .await
            .unwrap();
        assert!(fourth.is_noop(), "{fourth:?}");
        market.stop().await;
        upstream.shutdown().await;
    }
}

// The CLI runs as a blocking child process: the marketplace needs its own threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creator_goes_from_nothing_to_earnings_with_the_cli_only() {
    for backend in backends() {
        let upstream = spawn_unit_converter(bind().await, SecretSlot::default())
            .await
            .expect("upstream");
        let market = Market::start(TestDb::new(backend).await).await;
        let db = market.db.url.clone();
        // The operator: accounts and keys.
        json_of(&bin(&db, &["accounts", "create", "maker", "--json"]));
        let key = json_of(&bin(
            &db,
            &[
                "keys",
                "create",
                "--account",
                "maker",
                "--scopes",
                "servers:write,catalog:read",
                "--json",
            ],
        ))["key"]
            .as_str()
            .unwrap()
            .to_owned();
        let remote = [
            "--marketplace",
            market.base.as_str(),
            "--api-key",
            key.as_str(),
        ];
        let with_remote = |argv: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
            v.extend(remote.iter().map(|a| (*a).to_owned()));
            v.push("--json".into());
            v
        };
        // The creator registers (verified at once), the operator approves.
        let reg = json_of(&bin(
            &db,
            &with_remote(&[
                "register",
                "--name",
                "Units",
                "--slug",
                "units",
                "--endpoint",
                &upstream.url,
                "--pricing",
                "0.02_per_request",
            ]),
        ));
        assert_eq!(reg["verification"]["ok"], json!(true), "{reg}");
        *upstream.secret.write().unwrap() = Some(reg["secret"].as_str().unwrap().to_owned());
        let v = json_of(&bin(
            &db,
            &with_remote(&["creator", "verification", "--slug", "units"]),
        ));
        assert_eq!(v["verification"]["passed"], json!(true), "{v}");
        json_of(&bin(&db, &["servers", "approve", "units", "--json"]));
        // The creator prices a tool and describes the server.
        json_of(&bin(
            &db,
            &with_remote(&[
                "creator",
                "pricing",
                "--slug",
                "units",
                "--tool-price",
                "convert=0.05",
            ]),
        ));
        json_of(&bin(
            &db,
            &with_remote(&[
                "creator",
                "update",
                "--slug",
                "units",
                "--description",
                "Unit conversions",
                "--category",
                "utilities",
            ]),
        ));
        // A user calls it.
        let user = market.account("user").await;
        market
            .app
            .ledger
            .topup(&user.id, 1_000_000, "test")
            .await
            .unwrap();
        let user_key = market
            .key("user", &[Scope::Invoke, Scope::CatalogRead])
            .await;
        let client = client_at(&market.mcp_url(), &user_key).await;
        let r = call(
            &client,
            "marketplace__call_tool",
            json!({"name": "units__convert", "arguments": {"value": 1, "from": "km", "to": "m"}}),
        )
        .await;
        assert_eq!(receipt_of(&r).charged_micros, 50_000);
        // The creator sees the earnings.
        let a = json_of(&bin(
            &db,
            &with_remote(&["creator", "analytics", "--slug", "units"]),
        ));
        assert_eq!(a["analytics"]["total"]["calls"], json!(1), "{a}");
        assert_eq!(
            a["analytics"]["total"]["earnings_micros"],
            json!(35_000),
            "{a}"
        );
        assert_eq!(a["analytics"]["per_tool"][0][0], json!("convert"));
        assert!(a["analytics"]["total"]["p50_latency_ms"].is_number());
        let probes = json_of(&bin(
            &db,
            &with_remote(&["creator", "probes", "--slug", "units"]),
        ));
        assert_eq!(probes["probes"][0]["kind"], json!("registration"));
        client.cancel().await.ok();
        market.stop().await;
        upstream.shutdown().await;
    }
}

#[tokio::test]
async fn a_creator_goes_from_nothing_to_earnings_with_mcp_tools_only() {
    for backend in backends() {
        let upstream = spawn_unit_converter(bind().await, SecretSlot::default())
            .await
            .expect("upstream");
        let market = Market::start_with(TestDb::new(backend).await, |c| {
            c.marketplace.auto_approve = true;
        })
        .await;
        market.account("maker").await;
        let key = market
            .key(
                "maker",
                &[Scope::ServersWrite, Scope::CatalogRead, Scope::Invoke],
            )
            .await;
        let creator = client_at(&market.mcp_url(), &key).await;
        let reg = structured(
            &call(
                &creator,
                "marketplace__register_server",
                json!({"name": "Units", "slug": "units", "endpoint": upstream.url,
                       "pricing": "0.02_per_request", "description": "Convert units"}),
            )
            .await,
        );
        assert_eq!(reg["status"], json!("active"), "{reg}");
        *upstream.secret.write().unwrap() = Some(reg["secret"].as_str().unwrap().to_owned());
        // An agent with an empty install list finds and calls the right tool.
        let agent = market.account("agent").await;
        market
            .app
            .ledger
            .topup(&agent.id, 1_000_000, "test")
            .await
            .unwrap();
        let agent_key = market
            .key("agent", &[Scope::Invoke, Scope::CatalogRead])
            .await;
        let ac = client_at(&market.mcp_url(), &agent_key).await;
        let found = structured(
            &call(
                &ac,
                "marketplace__search_tools",
                json!({"query": "convert units"}),
            )
            .await,
        );
        let name = found["tools"][0]["name"].as_str().unwrap().to_owned();
        assert_eq!(name, "units__convert");
        structured(&call(&ac, "marketplace__install_server", json!({"slug": "units"})).await);
        let r = call(&ac, &name, json!({"value": 1, "from": "km", "to": "m"})).await;
        assert_eq!(receipt_of(&r).charged_micros, 20_000);
        // The creator sees the earnings over MCP.
        let stats = structured(
            &call(
                &creator,
                "marketplace__server_analytics",
                json!({"slug": "units"}),
            )
            .await,
        );
        assert_eq!(
            stats["analytics"]["total"]["earnings_micros"],
            json!(14_000),
            "{stats}"
        );
        let balance = structured(&call(&creator, "marketplace__get_balance", json!({})).await);
        assert_eq!(balance["earnings_micros"], json!(14_000));
        creator.cancel().await.ok();
        ac.cancel().await.ok();
        market.stop().await;
        upstream.shutdown().await;
    }
}

#[allow(dead_code)]
fn _backend_is_used(_: Backend) {}
