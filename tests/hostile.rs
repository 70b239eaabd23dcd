//! The hostile suite (issue 3 "Tests it must have"): a table of hostile inputs — SSRF
//! bypasses, header and JSON-RPC injection, oversize and deeply nested JSON,
//! unicode-confusable slugs, bad prices, SQL metacharacters — each sent to a real
//! marketplace and each asserting a clear refusal and no change to the ledger or the
//! catalog. One World per backend; the upstreams are allowed by exact `HOST:PORT`, so
//! every other loopback address is as forbidden as in production.

mod common;

use common::raw::{Answer, INIT, RawSession};
use common::{Backend, UNITS_PRICE, World, backends, snapshot};
use mcp_marketplace::auth::Scope;
use serde_json::{Value, json};

enum Case {
    /// `POST /api/v1/servers` with this body: 4xx with an error kind and message.
    Register(Value),
    /// `PUT /api/v1/servers/{slug}/credentials` with this body: 4xx.
    Credentials(&'static str, Value),
    /// A raw POST to the aggregated endpoint's session: an HTTP error, a JSON-RPC
    /// error, or a tool error result.
    Mcp(String),
    /// The same on `/servers/units/mcp`.
    OneServer(String),
    /// `initialize` with these headers instead of a valid key: 401.
    Auth(Vec<(&'static str, String)>),
    /// A REST GET of this path: 404.
    RestGet(String),
}

fn register_with(field: &str, value: Value) -> Case {
    let mut body = base_server();
    body[field] = value;
    Case::Register(body)
}

fn base_server() -> Value {
    json!({"name": "Hostile", "slug": "hostile", "endpoint": "https://public.test/mcp",
           "pricing": "0.02_per_request"})
}

fn endpoint(url: &str) -> Case {
    register_with("endpoint", json!(url))
}

fn tool_call(name: Value, arguments: Value) -> String {
    json!({"jsonrpc": "2.0", "id": 42, "method": "tools/call",
           "params": {"name": name, "arguments": arguments}})
    .to_string()
}

fn convert(name: &str) -> String {
    tool_call(json!(name), json!({"value": 1, "from": "m", "to": "cm"}))
}

fn cases() -> Vec<(&'static str, Case)> {
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{{"name":"units__convert","arguments":{{"x":{}{}}}}}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{{"name":"units__convert","arguments":{{"x":"{}"}}}}}}"#,
        "a".repeat(2 << 20)
    );
    vec![
        // SSRF: scheme, userinfo, fragment.
        ("http to a public name", endpoint("http://public.test/mcp")),
        ("http decimal loopback", endpoint("http://2130706433/")),
        ("file scheme", endpoint("file:///etc/passwd")),
        ("gopher scheme", endpoint("gopher://public.test/")),
        ("userinfo", endpoint("https://user:pass@public.test/mcp")),
        ("userinfo hiding a private host", endpoint("https://public.test@10.0.0.1/mcp")),
        ("fragment", endpoint("https://public.test/mcp#x")),
        // SSRF: hostile spellings of private addresses.
        ("decimal IPv4", endpoint("https://2130706433/mcp")),
        ("hex short IPv4", endpoint("https://0x7f.1/mcp")),
        ("hex IPv4", endpoint("https://0x7f000001/mcp")),
        ("octal IPv4", endpoint("https://0177.0.0.1/mcp")),
        ("short IPv4", endpoint("https://127.1/mcp")),
        ("IPv4-mapped loopback", endpoint("https://[::ffff:127.0.0.1]/mcp")),
        ("IPv4-mapped metadata in hex", endpoint("https://[::ffff:a9fe:a9fe]/mcp")),
        ("IPv4-compatible loopback", endpoint("https://[::127.0.0.1]/mcp")),
        ("NAT64 metadata", endpoint("https://[64:ff9b::a9fe:a9fe]/mcp")),
        ("cloud metadata", endpoint("https://169.254.169.254/latest/meta-data/")),
        ("AWS IPv6 metadata", endpoint("https://[fd00:ec2::254]/")),
        ("RFC 1918 10/8", endpoint("https://10.0.0.1/mcp")),
        ("RFC 1918 172.16/12", endpoint("https://172.16.5.4/mcp")),
        ("RFC 1918 192.168/16", endpoint("https://192.168.1.1/mcp")),
        ("CGNAT", endpoint("https://100.64.0.1/mcp")),
        ("this network", endpoint("https://0.0.0.0/mcp")),
        ("IPv6 loopback", endpoint("https://[::1]/mcp")),
        ("IPv6 unspecified", endpoint("https://[::]/mcp")),
        ("multicast", endpoint("https://224.0.0.1/mcp")),
        ("broadcast", endpoint("https://255.255.255.255/mcp")),
        ("TEST-NET-1", endpoint("https://192.0.2.10/mcp")),
        ("TEST-NET-2", endpoint("https://198.51.100.10/mcp")),
        ("TEST-NET-3", endpoint("https://203.0.113.10/mcp")),
        ("benchmarking", endpoint("https://198.18.0.1/mcp")),
        ("IPv6 link-local", endpoint("https://[fe80::1]/mcp")),
        ("IPv6 ULA", endpoint("https://[fc00::1]/mcp")),
        ("IPv6 documentation", endpoint("https://[2001:db8::1]/mcp")),
        ("allowed host on another port", endpoint("http://127.0.0.1:1/mcp")),
        ("loopback https on another port", endpoint("https://127.0.0.1:1/mcp")),
        // SSRF: names whose resolver answers with forbidden addresses.
        ("localhost", endpoint("https://localhost/mcp")),
        ("trailing-dot localhost", endpoint("https://localhost./mcp")),
        ("name resolving private", endpoint("https://private.test/mcp")),
        ("trailing-dot name resolving private", endpoint("https://private.test./mcp")),
        ("name resolving to metadata", endpoint("https://metadata.test/mcp")),
        ("name with one private address among public", endpoint("https://mixed.test/mcp")),
        ("AAAA IPv4-mapped loopback", endpoint("https://mapped.test/mcp")),
        ("AAAA ULA metadata", endpoint("https://ula.test/mcp")),
        ("name resolving CGNAT", endpoint("https://cgnat.test/mcp")),
        ("name resolving to nothing", endpoint("https://empty.test/mcp")),
        ("name that does not resolve", endpoint("https://nxdomain.test/mcp")),
        // Unicode-confusable and invisible names.
        ("Cyrillic i in slug", register_with("slug", json!("un\u{0456}ts"))),
        ("fullwidth slug", register_with("slug", json!("\u{ff55}\u{ff4e}\u{ff49}\u{ff54}\u{ff53}"))),
        ("zero-width space in slug", register_with("slug", json!("units\u{200b}"))),
        ("uppercase slug", register_with("slug", json!("Units"))),
        ("bidi override in name", register_with("name", json!("Calendar\u{202e}PCM"))),
        ("zero-width in name", register_with("name", json!("Cal\u{200b}endar"))),
        ("unicode tags in description", register_with("description", json!("ok\u{e0041}\u{e0042}"))),
        // Prices.
        ("negative price", register_with("pricing", json!("-0.02_per_request"))),
        ("zero-width in price", register_with("pricing", json!("0.02\u{200b}_per_request"))),
        ("exponent price", register_with("pricing", json!("1e308_per_request"))),
        ("huge price", register_with("pricing", json!("99999999999999999999_per_request"))),
        ("price above the maximum", register_with("pricing", json!("100.000001_per_request"))),
        ("NaN price", register_with("pricing", json!("NaN_per_request"))),
        ("infinite price", register_with("pricing", json!("Infinity_per_request"))),
        ("hex price", register_with("pricing", json!("0x10_per_request"))),
        ("plus-signed price", register_with("pricing", json!("+1_per_request"))),
        ("fullwidth digit price", register_with("pricing", json!("\u{ff11}_per_request"))),
        ("negative tool price", register_with("tool_prices", json!({"convert": "-1"}))),
        ("exponent tool price", register_with("tool_prices", json!({"convert": "1e3"}))),
        ("negative timeout", register_with("timeout", json!("-5s"))),
        // SQL metacharacters where they are not valid.
        ("SQL in slug", register_with("slug", json!("a'; DROP TABLE servers; --"))),
        ("SQL quote in slug", register_with("slug", json!("x\" OR 1=1"))),
        ("SQL in pricing", register_with("pricing", json!("0.02_per_request'; --"))),
        ("comma in category", register_with("categories", json!(["a,b'; --"]))),
        ("SQL in server path", Case::RestGet("/api/v1/servers/units'%20OR%20'1'='1".into())),
        ("SQL in one-server path", Case::RestGet("/api/v1/servers/%25'%20--".into())),
        // Header injection.
        ("CRLF in name", register_with("name", json!("x\r\nX-Evil: 1"))),
        ("credential name with CRLF", Case::Credentials("units", json!({"headers": {"X-A\r\nX-Evil": "v"}}))),
        ("credential value with CRLF", Case::Credentials("units", json!({"headers": {"Authorization": "Bearer a\r\nX-Evil: 1"}}))),
        ("credential value with NUL", Case::Credentials("units", json!({"headers": {"Authorization": "a\u{0}b"}}))),
        ("credential sets Host", Case::Credentials("units", json!({"headers": {"Host": "evil.test"}}))),
        ("credential forges the secret", Case::Credentials("units", json!({"headers": {"X-MCP-Marketplace-Secret": "forged"}}))),
        ("credential sets Transfer-Encoding", Case::Credentials("units", json!({"headers": {"Transfer-Encoding": "chunked"}}))),
        ("credentials of someone else's server", Case::Credentials("notes-of-other", json!({"headers": {"Authorization": "x"}}))),
        ("credentials at registration with a reserved header", register_with("credentials", json!({"Host": "x"}))),
        ("SQL in a key", Case::Auth(vec![("x-api-key", "mkt_' OR '1'='1".into())])),
        ("key with trailing junk", Case::Auth(vec![("authorization", "Bearer mkt_AAAA extra".into())])),
        ("10 KB key", Case::Auth(vec![("authorization", format!("Bearer mkt_{}", "A".repeat(10_000)))])),
        ("Basic auth", Case::Auth(vec![("authorization", "Basic dXNlcjpwYXNz".into())])),
        // JSON-RPC injection.
        ("NUL in tool name", Case::Mcp(convert("units__convert\u{0}"))),
        ("path traversal in tool name", Case::Mcp(convert("units__../notes__add_note"))),
        ("object as tool name", Case::Mcp(tool_call(json!({"$ne": null}), json!({})))),
        ("case-folded tool name", Case::Mcp(convert("UNITS__CONVERT"))),
        ("trailing space in tool name", Case::Mcp(convert("units__convert "))),
        ("confusable tool name", Case::Mcp(convert("un\u{0456}ts__convert"))),
        ("10k-character tool name", Case::Mcp(convert(&"a".repeat(10_000)))),
        ("arguments as a string", Case::Mcp(tool_call(json!("units__convert"), json!("1 OR 1=1")))),
        ("method with a trailing space", Case::Mcp(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call ","params":{"name":"units__convert"}}"#.into())),
        ("JSON-RPC 1.0", Case::Mcp(r#"{"jsonrpc":"1.0","id":8,"method":"tools/call","params":{"name":"units__convert","arguments":{}}}"#.into())),
        ("params as an array", Case::Mcp(r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":["units__convert"]}"#.into())),
        ("object as request id", Case::Mcp(r#"{"jsonrpc":"2.0","id":{"a":1},"method":"tools/call","params":{"name":"units__convert","arguments":{}}}"#.into())),
        ("batch of calls", Case::Mcp(format!("[{},{}]", convert("units__convert"), convert("notes__list_notes")))),
        ("SQL through a marketplace tool", Case::Mcp(tool_call(json!("marketplace__get_server"), json!({"slug": "units' OR '1'='1"})))),
        ("SQL through install", Case::Mcp(tool_call(json!("marketplace__install_server"), json!({"slug": "x'; DELETE FROM installs; --"})))),
        ("unprefixed name on /mcp", Case::Mcp(convert("convert"))),
        ("namespaced name on the one-server endpoint", Case::OneServer(convert("units__convert"))),
        ("another server's tool on the one-server endpoint", Case::OneServer(convert("add_note"))),
        // Oversize and deeply nested JSON.
        ("2 MiB body", Case::Mcp(huge)),
        ("100 000-deep arguments", Case::Mcp(deep)),
    ]
}

fn refused_mcp(a: &Answer) -> bool {
    a.status >= 400
        || a.message.as_ref().is_some_and(|m| {
            m.get("error").is_some()
                || m.pointer("/result/isError") == Some(&json!(true))
                || m.as_array()
                    .is_some_and(|items| items.iter().all(|i| i.get("error").is_some()))
        })
}

#[tokio::test]
async fn hostile_inputs_are_refused_and_change_nothing() {
    for backend in backends() {
        let w = World::start_with(backend, 1_000_000, |c, upstreams| {
            c.allow_upstream_hosts = upstreams.to_vec();
        })
        .await;
        let m = &w.market;
        let creator_key = m.key("creator", &[Scope::ServersWrite]).await;
        // A server of another creator, whose credentials the creator may not touch.
        let other = m.account("other-creator").await;
        let units_url = m.app.catalog.get("units").await.unwrap().endpoints[0].clone();
        m.register(&other, "notes-of-other", &units_url, "free")
            .await;
        let aggregated = RawSession::open(&m.mcp_url(), &w.key).await;
        let one_server = RawSession::open(&format!("{}/servers/units/mcp", m.base), &w.key).await;
        let http = reqwest::Client::new();
        let cases = cases();
        assert!(cases.len() >= 60, "the suite holds {} cases", cases.len());
        for (label, case) in &cases {
            let before = snapshot(m).await;
            match case {
                Case::Register(body) => {
                    let r = http
                        .post(format!("{}/api/v1/servers", m.base))
                        .bearer_auth(&creator_key)
                        .json(body)
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let e: Value = r.json().await.unwrap_or(Value::Null);
                    assert!((400..500).contains(&status), "{label}: HTTP {status} {e}");
                    assert!(
                        e["error"]["kind"].is_string()
                            && e["error"]["message"]
                                .as_str()
                                .is_some_and(|s| !s.is_empty()),
                        "{label}: a clear error: {e}"
                    );
                    assert!(
                        !e.to_string().contains("pass@"),
                        "{label}: no credentials echoed"
                    );
                }
                Case::Credentials(slug, body) => {
                    let r = http
                        .put(format!("{}/api/v1/servers/{slug}/credentials", m.base))
                        .bearer_auth(&creator_key)
                        .json(body)
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    assert!(
                        status == 400 || status == 404,
                        "{label}: HTTP {status} {text}"
                    );
                    assert!(
                        !text.contains("Bearer a"),
                        "{label}: no value echoed: {text}"
                    );
                }
                Case::Mcp(body) | Case::OneServer(body) => {
                    let session = match case {
                        Case::Mcp(_) => &aggregated,
                        _ => &one_server,
                    };
                    let a = session.post(body).await;
                    assert!(
                        refused_mcp(&a),
                        "{label}: not refused: {} {}",
                        a.status,
                        a.body
                    );
                }
                Case::Auth(headers) => {
                    let mut req = http
                        .post(m.mcp_url())
                        .header("accept", "application/json, text/event-stream")
                        .header("content-type", "application/json")
                        .body(INIT);
                    for (k, v) in headers {
                        req = req.header(*k, v.as_str());
                    }
                    let r = req.send().await.unwrap();
                    assert_eq!(r.status(), 401, "{label}");
                    assert!(r.headers().contains_key("www-authenticate"), "{label}");
                }
                Case::RestGet(path) => {
                    let r = http
                        .get(format!("{}{path}", m.base))
                        .bearer_auth(&w.key)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 404, "{label}");
                }
            }
            assert_eq!(
                snapshot(m).await,
                before,
                "{label}: nothing changed ({backend:?})"
            );
        }
        // The sessions still work, and the base registration the cases mutate is valid.
        let ok = aggregated
            .call(
                99,
                "units__convert",
                json!({"value": 1, "from": "m", "to": "cm"}),
            )
            .await;
        assert_eq!(ok.tool_error_kind(), None, "{}", ok.body);
        let r = http
            .post(format!("{}/api/v1/servers", m.base))
            .bearer_auth(&creator_key)
            .json(&base_server())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        // SQL metacharacters in free-text fields are stored verbatim and do nothing.
        let sql = "'; DROP TABLE servers; -- \" OR 1=1";
        let mut body = base_server();
        body["slug"] = json!("verbatim");
        body["name"] = json!(sql);
        body["description"] = json!(sql);
        body["categories"] = json!(["'; DELETE FROM installs; --"]);
        let r = http
            .post(format!("{}/api/v1/servers", m.base))
            .bearer_auth(&creator_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let stored = m.app.catalog.get("verbatim").await.unwrap();
        assert_eq!(
            (stored.name.as_str(), stored.description.as_str()),
            (sql, sql)
        );
        assert_eq!(
            m.balance(&w.user).await.wallet_micros,
            1_000_000 - UNITS_PRICE
        );
        m.assert_ledger_ok().await;
        w.stop().await;
    }
}

#[tokio::test]
async fn a_name_that_turns_private_after_registration_is_refused_at_connect() {
    for backend in backends() {
        let w = World::start(backend, 1_000_000).await;
        let m = &w.market;
        // Registered while it resolves to a public address.
        let secret = m
            .register(
                &w.creator,
                "rebind",
                "https://rebind.test/mcp",
                "0.05_per_request",
            )
            .await;
        assert!(!secret.is_empty());
        let server = m.app.catalog.get("rebind").await.unwrap();
        // Approved with a cached tool list (never fetched: nothing may connect to the
        // public address in a test).
        let tool =
            json!({"name": "echo", "description": "Echo.", "inputSchema": {"type": "object"}});
        m.app.catalog.replace_tools(&server, &[tool]).await.unwrap();
        m.app
            .catalog
            .approve_tools(&server.id, None, "test")
            .await
            .unwrap();
        m.app
            .catalog
            .set_status("rebind", mcp_marketplace::catalog::ServerStatus::Active)
            .await
            .unwrap();
        m.app.install(&w.user.id, "rebind").await.unwrap();
        // Now the name answers with a private address (DNS rebinding).
        m.dns.set("rebind.test", &["10.0.0.7".parse().unwrap()]);
        let before = m.balance(&w.user).await;
        for (url, name) in [
            (m.mcp_url(), "rebind__echo"),
            (format!("{}/servers/rebind/mcp", m.base), "echo"),
        ] {
            let s = RawSession::open(&url, &w.key).await;
            let a = s.call(3, name, json!({"text": "hi"})).await;
            assert_eq!(
                a.tool_error_kind().as_deref(),
                Some("upstream_unavailable"),
                "{}",
                a.body
            );
            assert!(
                !a.body.contains("10.0.0.7") && !a.body.contains("rebind.test"),
                "{}",
                a.body
            );
            let receipt = a
                .message
                .as_ref()
                .unwrap()
                .pointer("/result/_meta/mcp-marketplace~1receipt")
                .cloned()
                .unwrap();
            assert_eq!(receipt["charged_micros"], json!(0));
        }
        assert_eq!(m.balance(&w.user).await, before, "refunded ({backend:?})");
        m.assert_ledger_ok().await;
        w.stop().await;
    }
}

#[tokio::test]
async fn an_endpoint_the_policy_no_longer_allows_is_refused_at_connect() {
    let w = World::start(Backend::Sqlite, 1_000_000).await;
    let World {
        market,
        user,
        key,
        units,
        notes,
        ..
    } = w;
    // The operator narrows the allow list and restarts: the stored http://127.0.0.1:PORT
    // endpoints (an IP literal, which no resolver sees) are refused before connecting.
    let db = market.stop().await;
    let market =
        common::Market::start_with(db, |c| c.allow_upstream_hosts = vec!["127.0.0.1:1".into()])
            .await;
    let s = RawSession::open(&market.mcp_url(), &key).await;
    let a = s
        .call(
            1,
            "units__convert",
            json!({"value": 1, "from": "m", "to": "cm"}),
        )
        .await;
    assert_eq!(
        a.tool_error_kind().as_deref(),
        Some("upstream_unavailable"),
        "{}",
        a.body
    );
    assert_eq!(market.balance(&user).await.wallet_micros, 1_000_000);
    market.assert_ledger_ok().await;
    market.stop().await;
    units.shutdown().await;
    notes.shutdown().await;
}

/// Reads from `stream` until it closes (`true`) or `within` passes (`false`); what was
/// read goes to `into`.
async fn closed_within(
    stream: &mut tokio::net::TcpStream,
    within: std::time::Duration,
    into: &mut Vec<u8>,
) -> bool {
    use tokio::io::AsyncReadExt;
    let read_to_end = async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => into.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read_to_end).await.is_ok()
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// Reads `/healthz`'s answer from `stream` (after `answer`, what was read before) and
/// asserts it is 200 `ok`.
async fn read_healthz(stream: &mut tokio::net::TcpStream, mut answer: Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"ok") {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// Sends `GET /healthz` on a new keep-alive connection and reads its answer.
async fn healthz_connection(addr: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(HEALTHZ).await.expect("send");
    read_healthz(&mut stream, Vec::new()).await;
    stream
}

/// `faulty__add` of `a` and `b` through `client`.
async fn add(
    client: &rmcp::service::RunningService<rmcp::RoleClient, ()>,
    a: i64,
    b: i64,
) -> rmcp::model::CallToolResult {
    client
        .call_tool(
            rmcp::model::CallToolRequestParams::new("faulty__add")
                .with_arguments(common::args(json!({"a": a, "b": b}))),
        )
        .await
        .expect("the call is answered")
}

/// Slowloris and idle keep-alive connections (README "HTTP": `http_idle_timeout`): a
/// connection idle between requests, or sending a request's head too slowly, is closed
/// after the idle timeout; a response in progress (a call longer than it, a session's
/// `GET` stream) is not cut; a client whose idle connection was closed goes on in its
/// session over a new one, charged once per call.
#[tokio::test]
async fn idle_and_slow_connections_are_closed_but_responses_in_progress_are_not() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    const IDLE: Duration = Duration::from_millis(300);
    for backend in backends() {
        let market = common::Market::start_with(common::TestDb::new(backend).await, |c| {
            c.http.idle_timeout = IDLE;
        })
        .await;
        let (market, fault, user, key) = common::with_faulty(market).await;
        let addr = market.base.trim_start_matches("http://").to_owned();

        // Idle after an answer: closed.
        let mut idle = healthz_connection(&addr).await;
        let mut rest = Vec::new();
        assert!(
            closed_within(&mut idle, Duration::from_secs(5), &mut rest).await,
            "an idle keep-alive connection stayed open"
        );

        // A head sent a byte every 100 ms, never complete: closed, never answered.
        let mut slow = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .await
            .expect("send");
        let mut answer = Vec::new();
        let mut closed = false;
        for _ in 0..50 {
            if slow.write_all(b"a").await.is_err()
                || closed_within(&mut slow, Duration::from_millis(100), &mut answer).await
            {
                closed = true;
                break;
            }
        }
        assert!(closed, "a slowly sent head kept its connection for 5 s");
        assert!(
            !String::from_utf8_lossy(&answer).contains(" 200 "),
            "a slowly sent head was answered: {}",
            String::from_utf8_lossy(&answer)
        );

        // A session's `GET` stream lasts past the idle timeout.
        let raw = RawSession::open(&market.mcp_url(), &key).await;
        let mut stream = reqwest::Client::new()
            .get(market.mcp_url())
            .header("accept", "text/event-stream")
            .header("mcp-protocol-version", "2025-06-18")
            .header(
                "mcp-session-id",
                raw.session.as_deref().expect("session id"),
            )
            .bearer_auth(&key)
            .send()
            .await
            .expect("GET stream");
        assert_eq!(stream.status(), 200);
        let until = tokio::time::Instant::now() + 3 * IDLE;
        while let Ok(chunk) = tokio::time::timeout_at(until, stream.chunk()).await {
            assert!(
                chunk.expect("stream reads").is_some(),
                "the GET stream was closed by the idle timeout"
            );
        }

        // A call three times longer than the idle timeout is answered and charged; the
        // client's connection is then closed while idle, and its next call in the same
        // session goes over a new one.
        let client = market.client(&key).await;
        fault.state.delay_ms.store(900, Ordering::SeqCst);
        fault.set_mode(common::fault::SLOW);
        let wallet = market.balance(&user).await.wallet_micros;
        let r = add(&client, 2, 2).await;
        assert_eq!(common::text_of(&r), "4");
        assert_eq!(common::receipt_of(&r).outcome, "settled");
        fault.set_mode(common::fault::NORMAL);
        tokio::time::sleep(3 * IDLE).await;
        let r = add(&client, 1, 2).await;
        assert_eq!(common::text_of(&r), "3");
        assert_eq!(
            market.balance(&user).await.wallet_micros,
            wallet - 2 * 50_000,
            "two calls, each charged once"
        );
        client.cancel().await.ok();
        market.assert_ledger_ok().await;
        market.stop().await;
        fault.stop().await;
    }
}

/// `max_connections`: a connection past the cap waits to be served until one of the
/// open ones closes, and is then answered.
#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    let market = common::Market::start_with(common::TestDb::new(Backend::Sqlite).await, |c| {
        c.http.max_connections = 2;
    })
    .await;
    let addr = market.base.trim_start_matches("http://").to_owned();
    let first = healthz_connection(&addr).await;
    let _second = healthz_connection(&addr).await;
    let mut third = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    third.write_all(HEALTHZ).await.expect("send");
    let mut answer = Vec::new();
    assert!(
        !closed_within(&mut third, Duration::from_millis(500), &mut answer).await
            && answer.is_empty(),
        "a third connection was served past a cap of 2: {}",
        String::from_utf8_lossy(&answer)
    );
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), read_healthz(&mut third, answer))
        .await
        .expect("the waiting connection is served once one closes");
    market.stop().await;
}
