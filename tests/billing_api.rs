//! Billing as a client sees it: the plan quota on the MCP call path, the
//! `marketplace__get_usage` and `marketplace__get_balance` tools, and the REST usage
//! log and invoices — a real marketplace, real upstreams, a real rmcp client, on SQLite
//! and PostgreSQL.

mod common;

use std::sync::Arc;

use common::books::plans_with_free_quota;
use common::{World, args, backends};
use mcp_marketplace::auth::Scope;
use mcp_marketplace::auth::keys::{NewKey, create_key, list_keys};
use mcp_marketplace::billing::period::{ManualClock, rfc3339};
use mcp_marketplace::billing::usage::CSV_HEADER;
use mcp_marketplace::billing::{CallStats, Ledger, Month, Reservation, invoices};
use rmcp::RoleClient;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use serde_json::{Value, json};

async fn call(client: &RunningService<RoleClient, ()>, name: &str, a: Value) -> CallToolResult {
    client
        .call_tool(CallToolRequestParams::new(name.to_owned()).with_arguments(args(a)))
        .await
        .expect("a tool result")
}

fn error_meta(r: &CallToolResult) -> Option<Value> {
    r.meta.as_ref()?.0.get("mcp-marketplace/error").cloned()
}

fn structured(r: &CallToolResult) -> Value {
    r.structured_content.clone().expect("structured content")
}

fn convert() -> Value {
    json!({"value": 1, "from": "km", "to": "m"})
}

#[tokio::test]
async fn the_plan_quota_refuses_calls_uncharged_and_refunded_calls_do_not_count() {
    for backend in backends() {
        let w = World::start_with(backend, 1_000_000, |c, _| {
            c.billing.plans = Arc::new(plans_with_free_quota(2));
        })
        .await;
        let client = w.market.client(&w.key).await;
        // A failed call is refunded and gives its call back.
        let failed = call(
            &client,
            "units__convert",
            json!({"value": 1, "from": "km", "to": "parsecs-nope"}),
        )
        .await;
        assert_eq!(failed.is_error, Some(true));
        for _ in 0..2 {
            let ok = call(&client, "units__convert", convert()).await;
            assert_ne!(ok.is_error, Some(true), "{ok:?}");
        }
        let before = w.market.balance(&w.user).await;
        let refused = call(&client, "units__convert", convert()).await;
        assert_eq!(refused.is_error, Some(true));
        let meta = error_meta(&refused).expect("error meta");
        assert_eq!(meta["kind"], "quota_exceeded");
        assert!(meta["retry_after_s"].as_u64().unwrap() > 0);
        let text = refused.content[0].as_text().unwrap().text.clone();
        assert!(
            text.contains("Free plan allows 2 calls") && text.contains("not charged"),
            "{text}"
        );
        assert_eq!(w.market.balance(&w.user).await, before, "never charged");
        // Marketplace tools are not metered and stay available.
        let usage = structured(&call(&client, "marketplace__get_usage", json!({})).await);
        assert_eq!(usage["calls_this_month"], 2);
        assert_eq!(usage["calls_remaining"], 0);
        assert_eq!(usage["plan"]["id"], "free");
        assert_eq!(usage["spent_this_month_micros"], 2 * common::UNITS_PRICE);
        let units = &usage["by_tool"][0];
        assert_eq!(
            (
                units["server"].as_str(),
                units["settled"].as_i64(),
                units["refunded"].as_i64()
            ),
            (Some("units"), Some(2), Some(1))
        );
        client.cancel().await.ok();
        w.market.assert_ledger_ok().await;
        w.stop().await;
    }
}

#[tokio::test]
async fn get_balance_and_get_usage_show_spend_against_plan_and_limits() {
    for backend in backends() {
        let w = World::start(backend, 1_000_000).await;
        let (_, limited) = create_key(
            &w.market.app.store,
            "user",
            &NewKey {
                scopes: vec![Scope::Invoke],
                spend_limits: vec![(100_000, "day".into())],
                ..NewKey::default()
            },
        )
        .await
        .unwrap();
        w.market
            .app
            .ledger
            .set_low_balance(&w.user.id, Some(990_000))
            .await
            .unwrap();
        let client = w.market.client(&limited).await;
        call(&client, "units__convert", convert()).await;
        let b = structured(&call(&client, "marketplace__get_balance", json!({})).await);
        assert_eq!(b["balance_micros"], 1_000_000 - common::UNITS_PRICE);
        assert_eq!(b["plan"]["name"], "Free");
        assert_eq!(b["calls_this_month"], 1);
        assert_eq!(b["spent_this_month_micros"], common::UNITS_PRICE);
        assert_eq!(
            b["key_spend_limits"],
            json!([{"limit_micros": 100_000, "period": "day", "spent_micros": 20_000, "remaining_micros": 80_000}])
        );
        assert_eq!(b["low_balance_threshold_micros"], 990_000);
        assert_eq!(b["low_balance_alerted"], true);
        assert!(b["last_low_balance_alert_at"].is_string());

        let past = structured(
            &call(
                &client,
                "marketplace__get_usage",
                json!({"month": "2020-01"}),
            )
            .await,
        );
        assert_eq!(
            (past["month"].as_str(), past["calls_this_month"].as_i64()),
            (Some("2020-01"), Some(0))
        );
        for bad in [json!({"month": "2020-13"}), json!({"month": 202001})] {
            let r = call(&client, "marketplace__get_usage", bad).await;
            assert_eq!(error_meta(&r).unwrap()["kind"], "invalid_arguments");
        }
        client.cancel().await.ok();
        w.market.assert_ledger_ok().await;
        w.stop().await;
    }
}

async fn get(url: &str, key: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new().get(url);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn the_usage_log_is_filtered_paged_and_exported_over_rest() {
    for backend in backends() {
        let w = World::start(backend, 1_000_000).await;
        let client = w.market.client(&w.key).await;
        for _ in 0..3 {
            call(&client, "units__convert", convert()).await;
        }
        for i in 0..2 {
            call(
                &client,
                "notes__add_note",
                json!({"title": format!("n{i}"), "body": "b"}),
            )
            .await;
        }
        call(
            &client,
            "units__convert",
            json!({"value": 1, "from": "km", "to": "nope"}),
        )
        .await;
        client.cancel().await.ok();
        let key_id = list_keys(&w.market.app.store, "user").await.unwrap()[0]
            .key_id
            .clone();
        let usage = |q: &str| format!("{}/api/v1/usage{q}", w.market.base);

        let all: Value = get(&usage(""), Some(&w.key)).await.json().await.unwrap();
        let calls = all["calls"].as_array().unwrap();
        assert_eq!(calls.len(), 6);
        assert!(all["next_cursor"].is_null());
        let newest = &calls[0];
        assert_eq!(
            (
                newest["server"].as_str(),
                newest["outcome"].as_str(),
                newest["error_kind"].as_str()
            ),
            (Some("units"), Some("refunded"), Some("upstream_error"))
        );
        assert_eq!(newest["charged_micros"], 0);
        for c in calls {
            assert!(c["request_bytes"].as_i64().unwrap() > 0, "{c}");
            assert!(c["response_bytes"].as_i64().unwrap() > 0, "{c}");
            assert!(
                c["duration_ms"].is_i64() && c["finished_at"].is_string(),
                "{c}"
            );
            assert_eq!(c["key_id"], key_id.as_str());
        }
        let settled = calls.iter().filter(|c| c["outcome"] == "settled");
        assert!(
            settled
                .clone()
                .all(|c| c["charged_micros"] == c["price_micros"])
        );
        assert_eq!(settled.count(), 5);

        let this_month = Month::of_ms(mcp_marketplace::store::now_ms()).to_string();
        for (query, n) in [
            ("?server=notes".to_owned(), 2),
            ("?outcome=refunded".into(), 1),
            ("?tool=convert".into(), 4),
            (format!("?key={key_id}"), 6),
            ("?key=someone-else".into(), 0),
            (format!("?month={this_month}"), 6),
            ("?month=2020-01".into(), 0),
            ("?from=2999-01-01".into(), 0),
            ("?to=2020-01-01T00:00:00Z".into(), 0),
        ] {
            let page: Value = get(&usage(&query), Some(&w.key))
                .await
                .json()
                .await
                .unwrap();
            assert_eq!(
                page["calls"].as_array().unwrap().len(),
                n,
                "{query}: {page}"
            );
        }

        // Pages of two, newest first, every call once; the Link header names the next page.
        let mut seen = Vec::new();
        let mut query = "?limit=2".to_owned();
        loop {
            let r = get(&usage(&query), Some(&w.key)).await;
            let link = r
                .headers()
                .get("link")
                .map(|l| l.to_str().unwrap().to_owned());
            let page: Value = r.json().await.unwrap();
            seen.extend(
                page["calls"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["call_id"].clone()),
            );
            match page["next_cursor"].as_str() {
                Some(c) => {
                    assert!(link.unwrap().contains(&format!("cursor={c}")));
                    query = format!("?limit=2&cursor={c}");
                }
                None => {
                    assert!(link.is_none());
                    break;
                }
            }
        }
        let expected: Vec<_> = calls.iter().map(|c| c["call_id"].clone()).collect();
        assert_eq!(seen, expected);

        // CSV, by parameter or by Accept.
        for r in [
            get(&usage("?format=csv"), Some(&w.key)).await,
            reqwest::Client::new()
                .get(usage(""))
                .bearer_auth(&w.key)
                .header("accept", "text/csv")
                .send()
                .await
                .unwrap(),
        ] {
            assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
            let text = r.text().await.unwrap();
            let lines: Vec<_> = text.lines().collect();
            assert_eq!(lines[0], CSV_HEADER.join(","));
            assert_eq!(lines.len(), 7);
        }

        // Bad input: a clear 400, and no peeking at other accounts without admin.
        for bad in [
            "?limit=0",
            "?limit=5000",
            "?limit=x",
            "?outcome=bogus",
            "?cursor=garbage",
            "?month=2026-13",
            "?from=yesterday",
            "?foo=1",
            "?month=2026-11&from=2026-11-02",
            "?format=xml",
        ] {
            let r = get(&usage(bad), Some(&w.key)).await;
            assert_eq!(r.status(), 400, "{bad}");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["kind"], "invalid_request", "{bad}: {body}");
        }
        assert_eq!(get(&usage(""), None).await.status(), 401);
        assert_eq!(
            get(&usage("?account=creator"), Some(&w.key)).await.status(),
            403
        );
        let creator_key = w.market.key("creator", &[Scope::Invoke]).await;
        let theirs: Value = get(&usage(""), Some(&creator_key))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            theirs["calls"].as_array().unwrap().len(),
            0,
            "only one's own calls"
        );
        let admin = w.market.key("creator", &[Scope::Admin]).await;
        let as_admin: Value = get(&usage("?account=user"), Some(&admin))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(as_admin["calls"].as_array().unwrap().len(), 6);
        assert_eq!(
            get(&usage("?account=nobody"), Some(&admin)).await.status(),
            404
        );
        w.market.assert_ledger_ok().await;
        w.stop().await;
    }
}

#[tokio::test]
async fn invoices_are_served_as_drafts_and_once_closed_as_stored() {
    for backend in backends() {
        let w = World::start(backend, 1_000_000).await;
        let client = w.market.client(&w.key).await;
        call(&client, "units__convert", convert()).await;
        call(&client, "units__convert", convert()).await;
        client.cancel().await.ok();
        let invoice = |m: &str, q: &str| format!("{}/api/v1/invoices/{m}{q}", w.market.base);
        let now = mcp_marketplace::store::now_ms();
        let this_month = Month::of_ms(now);

        let draft: Value = get(&invoice(&this_month.to_string(), ""), Some(&w.key))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(draft["status"], "draft");
        assert_eq!(draft["totals"]["usage_micros"], 2 * common::UNITS_PRICE);
        let r = get(
            &invoice(&this_month.to_string(), "?format=html"),
            Some(&w.key),
        )
        .await;
        assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
        assert!(r.text().await.unwrap().contains("Draft"));
        let r = get(
            &invoice(&this_month.to_string(), "?format=csv"),
            Some(&w.key),
        )
        .await;
        assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");

        // Two months back, written by a ledger whose clock stands in that month, then closed.
        let past = this_month.prev().prev();
        let clock = Arc::new(ManualClock::new(past.start_ms() + 86_400_000));
        let ledger = Ledger::new(w.market.app.store.clone()).with_clock(clock.clone());
        ledger
            .topup(&w.user.id, 3_000_000, "credits grant")
            .await
            .unwrap();
        let units = w.market.app.catalog.get("units").await.unwrap();
        let call_id = uuid::Uuid::now_v7().to_string();
        ledger
            .reserve(&Reservation {
                call_id: call_id.clone(),
                account_id: w.user.id.clone(),
                key_id: "past".into(),
                server_id: units.id.clone(),
                tool: "convert".into(),
                price_micros: common::UNITS_PRICE,
                fee_bps: 3000,
                hold_expires_at: i64::MAX,
                spend_limits: Vec::new(),
                request_bytes: 10,
            })
            .await
            .unwrap();
        ledger.settle(&call_id, CallStats::default()).await.unwrap();
        clock.set(past.end_ms() + 10 * 60_000);
        invoices::close_month(&ledger, past).await.unwrap();
        let (_, stored) = invoices::invoice(&ledger, &w.user.id, past)
            .await
            .unwrap()
            .unwrap();
        let served = get(&invoice(&past.to_string(), ""), Some(&w.key))
            .await
            .text()
            .await
            .unwrap();
        assert_eq!(served, stored.json, "the stored bytes");
        let served: Value = serde_json::from_str(&served).unwrap();
        assert_eq!(served["status"], "final");
        assert_eq!(served["closed_at"], rfc3339(past.end_ms() + 10 * 60_000));
        assert_eq!(served["totals"]["usage_micros"], common::UNITS_PRICE);
        assert_eq!(
            served["closing_balance_micros"],
            3_000_000 - common::UNITS_PRICE
        );
        let csv = get(&invoice(&past.to_string(), "?format=csv"), Some(&w.key))
            .await
            .text()
            .await
            .unwrap();
        assert_eq!(csv, stored.csv);

        // The creator bought nothing that month: no invoice.
        let creator_key = w.market.key("creator", &[Scope::Invoke]).await;
        let r = get(&invoice(&past.to_string(), ""), Some(&creator_key)).await;
        assert_eq!(r.status(), 404);
        for (m, q, status) in [
            ("2026-13", "", 400),
            ("november", "", 400),
            (&*this_month.to_string(), "?format=pdf", 400),
            (&*this_month.to_string(), "?account=creator", 403),
            (&*this_month.to_string(), "?bogus=1", 400),
        ] {
            assert_eq!(
                get(&invoice(m, q), Some(&w.key)).await.status(),
                status,
                "{m}{q}"
            );
        }
        assert_eq!(
            get(&invoice(&past.to_string(), ""), None).await.status(),
            401
        );
        w.market.assert_ledger_ok().await;
        w.stop().await;
    }
}
