//! Limits under load (issue 3 items 2, 3, 5): rate limits answer HTTP 429 with
//! `Retry-After` and a `rate_limited` JSON-RPC error and never charge, also under
//! concurrency; spend limits per day and per month hold under concurrency on both
//! backends; the per-server concurrency cap refuses without charging; expiry and
//! revocation reach open sessions; on `/mcp` and `/servers/{slug}/mcp` alike.

mod common;

use std::sync::Arc;

use common::raw::RawSession;
use common::{Backend, Market, UNITS_PRICE, World, backends, error_kind, receipt_of, wait_until};
use futures::future::BoxFuture;
use mcp_marketplace::auth::Scope;
use mcp_marketplace::auth::keys::{NewKey, create_key};
use mcp_marketplace::security::policy::{Policy, SubjectKind};
use mcp_marketplace::security::ratelimit::{AccountLimitSource, AccountLimits, Period, Rate};
use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

fn convert_args() -> Value {
    json!({"value": 1, "from": "m", "to": "cm"})
}

/// An account limit source other than the billing plans.
#[derive(Debug)]
struct OneCallPerKey;

impl AccountLimitSource for OneCallPerKey {
    fn account_limits<'a>(&'a self, _account_id: &'a str) -> BoxFuture<'a, AccountLimits> {
        Box::pin(async move {
            AccountLimits {
                per_key: Some(Rate::per(1, Period::Minute)),
                ..AccountLimits::default()
            }
        })
    }
}

#[tokio::test]
async fn rate_limits_answer_429_and_never_charge() {
    for backend in backends() {
        let w = World::start_with(backend, 1_000_000, |c, _| {
            c.rate_limits.per_account_per_server = Rate::per(3, Period::Minute);
        })
        .await;
        let m = &w.market;
        let s = RawSession::open(&m.mcp_url(), &w.key).await;
        for i in 0..3 {
            let a = s.call(i, "units__convert", convert_args()).await;
            assert_eq!((a.status, a.tool_error_kind()), (200, None), "{}", a.body);
        }
        let a = s.call(77, "units__convert", convert_args()).await;
        assert_eq!(a.status, 429, "{}", a.body);
        let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=20).contains(&retry), "Retry-After {retry}");
        let body = a.message.clone().unwrap();
        assert_eq!(body["id"], json!(77), "the request id is echoed");
        assert_eq!(body["error"]["data"]["kind"], json!("rate_limited"));
        assert_eq!(
            body["error"]["data"]["limit"],
            json!("per_account_per_server")
        );
        assert_eq!(body["error"]["data"]["retry_after_s"], json!(retry));
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not charged")
        );
        // The one-server endpoint shares the account's limit on that server.
        let one = RawSession::open(&format!("{}/servers/units/mcp", m.base), &w.key).await;
        assert_eq!(one.call(1, "convert", convert_args()).await.status, 429);
        // Another server and the marketplace's own tools are not affected.
        let a = s.call(5, "notes__list_notes", json!({})).await;
        assert_eq!((a.status, a.tool_error_kind()), (200, None), "{}", a.body);
        assert_eq!(
            s.call(6, "marketplace__get_balance", json!({}))
                .await
                .status,
            200
        );
        assert_eq!(
            m.balance(&w.user).await.wallet_micros,
            1_000_000 - 3 * UNITS_PRICE - common::NOTES_PRICE,
            "only the calls that passed were charged ({backend:?})"
        );

        // Under concurrency: a fresh account with a limit of 3 fires 12 calls at once.
        let burst = m.account("burst").await;
        m.app
            .ledger
            .topup(&burst.id, 1_000_000, "test")
            .await
            .unwrap();
        m.app.install(&burst.id, "units").await.unwrap();
        let key = m.key("burst", &[Scope::Invoke]).await;
        let mut sessions = Vec::new();
        for _ in 0..4 {
            sessions.push(RawSession::open(&m.mcp_url(), &key).await);
        }
        let calls =
            (0..12).map(|i| sessions[i % 4].call(i as u64, "units__convert", convert_args()));
        let answers = futures::future::join_all(calls).await;
        let passed = answers.iter().filter(|a| a.status == 200).count();
        let limited = answers.iter().filter(|a| a.status == 429).count();
        assert_eq!((passed, limited), (3, 9), "{backend:?}");
        assert_eq!(
            m.balance(&burst).await.wallet_micros,
            1_000_000 - 3 * UNITS_PRICE
        );
        m.assert_ledger_ok().await;
        w.stop().await;
    }
}

#[tokio::test]
async fn overrides_and_plans_set_the_rate() {
    let w = World::start_with(Backend::Sqlite, 1_000_000, |c, _| {
        let team = mcp_marketplace::billing::plans::PlanFile {
            name: Some("Team".into()),
            rate_limits: mcp_marketplace::config::RateLimitsFile {
                per_account: Some("2/min".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        c.billing.plans = Arc::new(
            mcp_marketplace::billing::PlanBook::from_config(
                &[("team".to_owned(), team)].into(),
                None,
            )
            .expect("plans"),
        );
    })
    .await;
    let m = &w.market;
    let units = m.app.catalog.get("units").await.unwrap();
    // A server override: 1 call per minute per account.
    common::set_policy(
        m,
        SubjectKind::Server,
        &units.id,
        Policy {
            per_account_per_server: Some(Rate::per(1, Period::Minute)),
            ..Policy::default()
        },
    )
    .await;
    let s = RawSession::open(&m.mcp_url(), &w.key).await;
    assert_eq!(
        s.call(1, "units__convert", convert_args()).await.status,
        200
    );
    assert_eq!(
        s.call(2, "units__convert", convert_args()).await.status,
        429
    );
    // The account's own override wins over the server's: off.
    common::set_policy(
        m,
        SubjectKind::Account,
        &w.user.id,
        Policy {
            per_account_per_server: Some(Rate::Off),
            ..Policy::default()
        },
    )
    .await;
    for i in 0..5 {
        assert_eq!(
            s.call(10 + i, "units__convert", convert_args())
                .await
                .status,
            200
        );
    }
    // A key override: 2 per minute for this key, across servers.
    let (record, key) = create_key(
        &m.app.store,
        "user",
        &NewKey {
            scopes: vec![Scope::Invoke],
            ..NewKey::default()
        },
    )
    .await
    .unwrap();
    common::set_policy(
        m,
        SubjectKind::Key,
        &record.key_id,
        Policy {
            per_key: Some(Rate::per(2, Period::Minute)),
            ..Policy::default()
        },
    )
    .await;
    let k = RawSession::open(&m.mcp_url(), &key).await;
    assert_eq!(
        k.call(1, "units__convert", convert_args()).await.status,
        200
    );
    assert_eq!(k.call(2, "notes__list_notes", json!({})).await.status, 200);
    let a = k.call(3, "marketplace__get_balance", json!({})).await;
    assert_eq!(
        (a.status, a.error_kind().as_deref()),
        (429, Some("rate_limited"))
    );
    assert_eq!(
        a.message.unwrap()["error"]["data"]["limit"],
        json!("per_key")
    );
    // A billing plan's limits (config `[plans.team] rate_limits`): 2 per minute per
    // account for accounts on it, while the world's user stays on the default plan.
    let planned = m.account("planned").await;
    m.app.install(&planned.id, "units").await.unwrap();
    m.app
        .ledger
        .topup(&planned.id, 1_000_000, "test")
        .await
        .unwrap();
    m.app
        .ledger
        .change_plan(&planned.id, "team", None)
        .await
        .expect("the team plan is free of charge");
    let pk = m.key("planned", &[Scope::Invoke]).await;
    let p = RawSession::open(&m.mcp_url(), &pk).await;
    assert_eq!(
        p.call(1, "units__convert", convert_args()).await.status,
        200
    );
    assert_eq!(
        p.call(2, "marketplace__get_balance", json!({}))
            .await
            .status,
        200
    );
    let a = p.call(3, "units__convert", convert_args()).await;
    assert_eq!(a.status, 429);
    assert_eq!(
        a.message.unwrap()["error"]["data"]["limit"],
        json!("per_account")
    );
    assert_eq!(
        s.call(30, "units__convert", convert_args()).await.status,
        200,
        "accounts on other plans keep their limits"
    );
    // Any other source can be plugged in instead (here: 1 call per minute per key).
    m.app.set_account_limit_source(Arc::new(OneCallPerKey));
    let other = RawSession::open(&m.mcp_url(), &key).await;
    let a = other.call(40, "units__convert", convert_args()).await;
    assert_eq!(a.status, 429, "the key's earlier calls count against 1/min");
    m.assert_ledger_ok().await;
    w.stop().await;
}

/// Fires `n` concurrent calls of `units__convert` with `key` over 4 sessions; returns
/// (settled, refused with spend_limit).
async fn burst(m: &Market, key: &str, n: usize) -> (usize, usize) {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(m.client(key).await);
    }
    let calls = (0..n).map(|i| {
        let peer = clients[i % 4].peer().clone();
        async move {
            peer.call_tool(
                CallToolRequestParams::new("units__convert")
                    .with_arguments(common::args(convert_args())),
            )
            .await
            .expect("a tool result")
        }
    });
    let results = futures::future::join_all(calls).await;
    let mut out = (0, 0);
    for r in &results {
        match error_kind(r).as_deref() {
            None => {
                assert_eq!(receipt_of(r).charged_micros, UNITS_PRICE);
                out.0 += 1;
            }
            Some("spend_limit") => out.1 += 1,
            other => panic!("unexpected {other:?}: {r:?}"),
        }
    }
    for c in clients {
        c.cancel().await.ok();
    }
    out
}

#[tokio::test]
async fn spend_limits_per_day_and_month_hold_under_concurrency() {
    for backend in backends() {
        let w = World::start_with(backend, 10_000_000, |c, _| {
            c.rate_limits.per_account_per_server = Rate::Off;
        })
        .await;
        let m = &w.market;
        for (limits, allowed) in [
            (vec![(3 * UNITS_PRICE, "day")], 3),
            (vec![(2 * UNITS_PRICE, "month")], 2),
            (
                vec![(10 * UNITS_PRICE, "day"), (4 * UNITS_PRICE, "month")],
                4,
            ),
        ] {
            let (_, key) = create_key(
                &m.app.store,
                "user",
                &NewKey {
                    scopes: vec![Scope::Invoke],
                    spend_limits: limits.iter().map(|(a, p)| (*a, (*p).to_owned())).collect(),
                    ..NewKey::default()
                },
            )
            .await
            .unwrap();
            let before = m.balance(&w.user).await.wallet_micros;
            let (settled, refused) = burst(m, &key, 10).await;
            assert_eq!(
                (settled, refused),
                (allowed, 10 - allowed),
                "{limits:?} ({backend:?})"
            );
            assert_eq!(
                m.balance(&w.user).await.wallet_micros,
                before - allowed as i64 * UNITS_PRICE,
                "nothing charged past the limit"
            );
        }
        // Two limits of one period are refused.
        assert!(
            create_key(
                &m.app.store,
                "user",
                &NewKey {
                    scopes: vec![Scope::Invoke],
                    spend_limits: vec![(1, "day".into()), (2, "day".into())],
                    ..NewKey::default()
                },
            )
            .await
            .is_err()
        );
        m.assert_ledger_ok().await;
        w.stop().await;
    }
}

#[tokio::test]
async fn the_concurrency_cap_refuses_without_charging() {
    for backend in backends() {
        let (market, fault, user, key) = common::faulty_world(backend).await;
        let server = market.app.catalog.get("faulty").await.unwrap();
        common::set_policy(
            &market,
            SubjectKind::Server,
            &server.id,
            Policy {
                max_concurrency: Some(2),
                ..Policy::default()
            },
        )
        .await;
        let s = Arc::new(RawSession::open(&market.mcp_url(), &key).await);
        let slow: Vec<_> = (0..2)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move { s.call(i, "faulty__sleep", json!({"ms": 1500})).await })
            })
            .collect();
        // Both slow calls hold a permit and a reservation.
        let app = market.app.clone();
        let id = server.id.clone();
        let user_id = user.id.clone();
        wait_until(|| {
            let (app, id, user_id) = (app.clone(), id.clone(), user_id.clone());
            async move {
                app.concurrency.in_flight(&id) == 2
                    && app
                        .ledger
                        .account_balance(&user_id)
                        .await
                        .unwrap()
                        .holds_micros
                        == 100_000
            }
        })
        .await;
        let before = market.balance(&user).await;
        for (url, name) in [
            (market.mcp_url(), "faulty__add"),
            (format!("{}/servers/faulty/mcp", market.base), "add"),
        ] {
            let one = RawSession::open(&url, &key).await;
            let a = one.call(9, name, json!({"a": 1, "b": 2})).await;
            assert_eq!(
                a.tool_error_kind().as_deref(),
                Some("upstream_unavailable"),
                "{}",
                a.body
            );
            assert!(a.body.contains("concurrent"), "{}", a.body);
        }
        assert_eq!(
            market.balance(&user).await,
            before,
            "refused calls are not charged"
        );
        for h in slow {
            let a = h.await.unwrap();
            assert_eq!(a.tool_error_kind(), None, "{}", a.body);
        }
        assert_eq!(
            market.balance(&user).await.wallet_micros,
            1_000_000 - 2 * 50_000
        );
        market.assert_ledger_ok().await;
        market.stop().await;
        fault.stop().await;
    }
}

#[tokio::test]
async fn expiry_and_revocation_reach_open_sessions_on_both_endpoints() {
    let w = World::start(Backend::Sqlite, 1_000_000).await;
    let m = &w.market;
    for path in ["/mcp", "/servers/units/mcp"] {
        let (record, key) = create_key(
            &m.app.store,
            "user",
            &NewKey {
                scopes: vec![Scope::Invoke],
                expires_in: Some(std::time::Duration::from_secs(3600)),
                ..NewKey::default()
            },
        )
        .await
        .unwrap();
        let client = common::client_at(&format!("{}{path}", m.base), &key).await;
        assert!(!client.list_all_tools().await.unwrap().is_empty());
        // Another process (here a plain SQL write, as the CLI on the same database would
        // do) moves the key's expiry into the past: the open session is refused within
        // one second (the rule of `store::versions`; keys are served from memory).
        sqlx::query("UPDATE api_keys SET expires_at = $1 WHERE id = $2")
            .bind(mcp_marketplace::store::now_ms() - 1)
            .bind(&record.key_id)
            .execute(m.app.store.pool())
            .await
            .unwrap();
        let written = std::time::Instant::now();
        let err = loop {
            match client.list_all_tools().await {
                Err(err) => break err,
                Ok(_) => assert!(
                    written.elapsed() < std::time::Duration::from_secs(1),
                    "an expired key still worked 1 s after the write"
                ),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert!(format!("{err:?}").contains("AuthRequired"), "{err:?}");
        client.cancel().await.ok();
        // Revocation through the product: refused on the very next request.
        let key = m.key("user", &[Scope::Invoke]).await;
        let client = common::client_at(&format!("{}{path}", m.base), &key).await;
        assert!(!client.list_all_tools().await.unwrap().is_empty());
        let revoked_at = std::time::Instant::now();
        mcp_marketplace::auth::keys::revoke_key(&m.app.store, &key[..12])
            .await
            .unwrap();
        let err = client.list_all_tools().await.expect_err("revoked");
        assert!(format!("{err:?}").contains("AuthRequired"), "{err:?}");
        assert!(revoked_at.elapsed() < std::time::Duration::from_secs(1));
        client.cancel().await.ok();
    }
    w.stop().await;
}
