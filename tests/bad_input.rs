//! Bad input gets a clear error, never a panic, and changes neither the ledger nor the
//! catalog: raw HTTP against /mcp and the REST API, plus refusals seen by a real client.

mod common;

use common::{World, args, backends, snapshot};
use mcp_marketplace::auth::Scope;
use rmcp::model::{CallToolRequestParams, ErrorCode};
use serde_json::{Value, json};

use common::raw::INIT;

fn post(url: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(url)
        .header("accept", "application/json, text/event-stream")
}

#[tokio::test]
async fn mcp_endpoint_refuses_bad_requests_cleanly() {
    for backend in backends() {
        let w = World::start(backend, 100_000).await;
        let before = snapshot(&w.market).await;
        let url = w.market.mcp_url();

        // Missing and invalid keys: 401 with WWW-Authenticate: Bearer.
        for auth in [
            None,
            Some("Bearer nope"),
            Some("Bearer mkt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            Some("Basic dXNlcjpwYXNz"),
        ] {
            let mut req = post(&url)
                .header("content-type", "application/json")
                .body(INIT);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{auth:?}");
            let challenge = r
                .headers()
                .get("www-authenticate")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            assert!(challenge.starts_with("Bearer"), "{challenge}");
        }
        // X-API-Key works as well as Authorization.
        let r = post(&url)
            .header("x-api-key", &w.key)
            .header("content-type", "application/json")
            .body(INIT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);

        // Malformed JSON.
        let r = post(&url)
            .bearer_auth(&w.key)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_client_error(),
            "malformed JSON got {}",
            r.status()
        );
        // Wrong content type.
        let r = post(&url)
            .bearer_auth(&w.key)
            .header("content-type", "text/plain")
            .body(INIT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415);
        // Unknown session id.
        let r = post(&url)
            .bearer_auth(&w.key)
            .header("content-type", "application/json")
            .header("mcp-session-id", "no-such-session")
            .header("mcp-protocol-version", "2025-06-18")
            .body(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        // Body over the 1 MiB limit.
        let huge = format!(
            r#"{{"jsonrpc":"2.0","id":3,"method":"ping","params":{{"x":"{}"}}}}"#,
            "a".repeat(2 << 20)
        );
        let r = post(&url)
            .bearer_auth(&w.key)
            .header("content-type", "application/json")
            .body(huge)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);

        // The marketplace still serves after all of that.
        let client = w.market.client(&w.key).await;
        assert!(!client.list_all_tools().await.unwrap().is_empty());
        client.cancel().await.ok();
        assert_eq!(
            snapshot(&w.market).await,
            before,
            "nothing changed ({backend:?})"
        );
        w.market.assert_ledger_ok().await;
        w.stop().await;
    }
}

#[tokio::test]
async fn unknown_and_forbidden_tools_answer_alike() {
    let w = World::start(common::Backend::Sqlite, 100_000).await;
    // A key that may only use notes tools, and one without `invoke`.
    let (_, notes_only) = mcp_marketplace::auth::keys::create_key(
        &w.market.app.store,
        "user",
        &mcp_marketplace::auth::keys::NewKey {
            scopes: vec![Scope::Invoke],
            allow_tools: vec!["notes__*".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let read_only = w.market.key("user", &[Scope::CatalogRead]).await;
    let before = snapshot(&w.market).await;

    let cases = [
        (&w.key, "nope__nothing"),
        (&notes_only, "units__convert"),
        (&read_only, "units__convert"),
        (&w.key, "units__no_such_tool"),
    ];
    for (key, tool) in cases {
        let client = w.market.client(key).await;
        let err = client
            .call_tool(
                CallToolRequestParams::new(tool)
                    .with_arguments(args(json!({"value": 1, "from": "m", "to": "cm"}))),
            )
            .await
            .expect_err("refused");
        let rmcp::ServiceError::McpError(e) = err else {
            panic!("expected a JSON-RPC error, got {err:?}")
        };
        assert_eq!(e.code, ErrorCode::INVALID_PARAMS);
        assert_eq!(e.message, format!("Unknown tool: {tool}"));
        assert_eq!(e.data, Some(json!({"kind": "unknown_tool"})));
        client.cancel().await.ok();
    }
    // The allow-listed key sees only what it may call.
    let client = w.market.client(&notes_only).await;
    let names: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap()
        .iter()
        .map(|t| t.name.to_string())
        .collect();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.starts_with("notes__")),
        "{names:?}"
    );
    client.cancel().await.ok();
    assert_eq!(snapshot(&w.market).await, before);
    w.stop().await;
}

#[tokio::test]
async fn revoked_keys_stop_working_on_open_sessions_and_sessions_stay_with_their_account() {
    let w = World::start(common::Backend::Sqlite, 100_000).await;
    let client = w.market.client(&w.key).await;
    assert!(!client.list_all_tools().await.unwrap().is_empty());
    // Another account's key cannot ride this session.
    let other = w.market.account("intruder").await;
    let intruder_key = w.market.key(&other.name, &[Scope::Invoke]).await;
    let init = post(&w.market.mcp_url())
        .bearer_auth(&w.key)
        .header("content-type", "application/json")
        .body(INIT)
        .send()
        .await
        .unwrap();
    let session = init
        .headers()
        .get("mcp-session-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let r = post(&w.market.mcp_url())
        .bearer_auth(&intruder_key)
        .header("content-type", "application/json")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-06-18")
        .body(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{}}"#)
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    assert!(body.contains("another account"), "{body}");

    let prefix = &w.key[..12];
    mcp_marketplace::auth::keys::revoke_key(&w.market.app.store, prefix)
        .await
        .unwrap();
    let err = client
        .list_all_tools()
        .await
        .expect_err("a revoked key is refused at once");
    assert!(
        format!("{err:?}").contains("AuthRequired"),
        "the client is told to authenticate: {err:?}"
    );
    client.cancel().await.ok();
    // A new session with the revoked key is refused too.
    let r = post(&w.market.mcp_url())
        .bearer_auth(&w.key)
        .header("content-type", "application/json")
        .body(INIT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    w.stop().await;
}

#[tokio::test]
async fn register_refuses_bad_servers_without_changing_the_catalog() {
    for backend in backends() {
        let w = World::start(backend, 0).await;
        let creator_key = w.market.key("creator", &[Scope::ServersWrite]).await;
        let reader_key = w.market.key("creator", &[Scope::CatalogRead]).await;
        let before = snapshot(&w.market).await;
        let api = format!("{}/api/v1/servers", w.market.base);
        let good = json!({"name": "Calendar", "slug": "calendar", "endpoint": "https://calendar.example.com/mcp", "pricing": "0.02_per_request"});
        let with = |k: &str, v: Value| {
            let mut b = good.clone();
            b[k] = v;
            b
        };
        let bad_bodies = [
            with("endpoint", json!("ftp://calendar.example.com/mcp")),
            with("endpoint", json!("http://calendar.example.com/mcp")),
            with(
                "endpoint",
                json!("https://user:pass@calendar.example.com/mcp"),
            ),
            with("endpoint", json!("not a url")),
            with("endpoint", json!("")),
            with("slug", json!("Bad Slug")),
            with("slug", json!("a".repeat(33))),
            with("slug", json!("-leading")),
            with("slug", json!("marketplace")),
            with("slug", json!("units")),
            with("slug", json!("calendar'; DROP TABLE servers; --")),
            with("pricing", json!("-1_per_request")),
            with("pricing", json!("abc")),
            with("pricing", json!("0.0000001_per_request")),
            with("pricing", json!("1000_per_request")),
            with("pricing", json!("0.02")),
            with("name", json!("")),
            with("timeout", json!("10m")),
            with("unknown_field", json!(1)),
        ];
        for body in &bad_bodies {
            let r = reqwest::Client::new()
                .post(&api)
                .bearer_auth(&creator_key)
                .json(body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            assert!(status == 400 || status == 409, "{body} got {status}");
            let e: Value = r.json().await.unwrap();
            assert!(
                e["error"]["kind"].is_string()
                    && e["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                "{e}"
            );
            assert!(
                !e.to_string().contains("user:pass"),
                "no credentials echoed: {e}"
            );
        }
        // Wrong content type, malformed JSON, missing scope, no key.
        let r = reqwest::Client::new()
            .post(&api)
            .bearer_auth(&creator_key)
            .header("content-type", "text/plain")
            .body(good.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415);
        let r = reqwest::Client::new()
            .post(&api)
            .bearer_auth(&creator_key)
            .header("content-type", "application/json")
            .body("{oops")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let r = reqwest::Client::new()
            .post(&api)
            .bearer_auth(&reader_key)
            .json(&good)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let r = reqwest::Client::new()
            .post(&api)
            .json(&good)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(
            snapshot(&w.market).await,
            before,
            "catalog and ledger unchanged ({backend:?})"
        );

        // The good one registers, pending review, and shows its secret once.
        let r = reqwest::Client::new()
            .post(&api)
            .bearer_auth(&creator_key)
            .json(&good)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let created: Value = r.json().await.unwrap();
        assert_eq!(created["status"], json!("pending_review"));
        assert!(created["secret"].as_str().is_some_and(|s| s.len() > 20));
        // Pending servers are not callable, listed or installable.
        let client = w.market.client(&w.key).await;
        let err = client
            .call_tool(
                CallToolRequestParams::new("marketplace__install_server")
                    .with_arguments(args(json!({"slug": "calendar"}))),
            )
            .await
            .unwrap();
        assert_eq!(err.is_error, Some(true));
        client.cancel().await.ok();
        w.market.assert_ledger_ok().await;
        w.stop().await;
    }
}

#[tokio::test]
async fn install_and_uninstall_notify_open_sessions() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Clone, Default)]
    struct Counting(Arc<AtomicUsize>);
    impl rmcp::ClientHandler for Counting {
        async fn on_tool_list_changed(
            &self,
            _ctx: rmcp::service::NotificationContext<rmcp::RoleClient>,
        ) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    let w = World::start(common::Backend::Sqlite, 0).await;
    w.market.app.uninstall(&w.user.id, "notes").await.unwrap();
    let counting = Counting::default();
    mcp_marketplace::install_crypto_provider();
    let transport = rmcp::transport::StreamableHttpClientTransport::from_config(
        rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(
            w.market.mcp_url(),
        )
        .auth_header(w.key.clone()),
    );
    let client = rmcp::ServiceExt::serve(counting.clone(), transport)
        .await
        .unwrap();
    let names = |tools: Vec<rmcp::model::Tool>| {
        tools.iter().map(|t| t.name.to_string()).collect::<Vec<_>>()
    };
    assert!(!names(client.list_all_tools().await.unwrap()).contains(&"notes__add_note".to_owned()));

    let r = client
        .call_tool(
            CallToolRequestParams::new("marketplace__install_server")
                .with_arguments(args(json!({"slug": "notes"}))),
        )
        .await
        .unwrap();
    assert_ne!(r.is_error, Some(true), "{r:?}");
    wait_for(|| counting.0.load(Ordering::SeqCst) >= 1).await;
    assert!(names(client.list_all_tools().await.unwrap()).contains(&"notes__add_note".to_owned()));

    client
        .call_tool(
            CallToolRequestParams::new("marketplace__uninstall_server")
                .with_arguments(args(json!({"slug": "notes"}))),
        )
        .await
        .unwrap();
    wait_for(|| counting.0.load(Ordering::SeqCst) >= 2).await;
    assert!(!names(client.list_all_tools().await.unwrap()).contains(&"notes__add_note".to_owned()));

    client.cancel().await.ok();
    w.stop().await;
}

async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..100 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("condition not reached within 5 s");
}
