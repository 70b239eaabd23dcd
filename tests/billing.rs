//! The billing engine on the ledger, with a manual clock so calls, fees and payouts land
//! at chosen instants around the UTC month boundary; every figure is checked against a
//! hand-computed fixture and `ledger verify` after each test, on SQLite and PostgreSQL.

mod common;

use std::collections::BTreeMap;

use common::books::{Books, End, ms, plans_with_free_quota};
use common::{Backend, TestDb, backends};
use mcp_marketplace::billing::invoices::{self, InvoiceFormat};
use mcp_marketplace::billing::payouts::{self, PayoutMethod};
use mcp_marketplace::billing::{BillingError, Month, alerts};
use mcp_marketplace::store::Store;
use sqlx::Row;

fn month(m: &str) -> Month {
    m.parse().unwrap()
}

#[tokio::test]
async fn plans_book_prorated_fees_and_credits_and_lapse_when_unpaid() {
    for backend in backends() {
        let b = Books::open(backend, "2026-11-16T00:00:00Z").await;
        let alice = b.account("alice").await;
        let bob = b.account("bob").await;
        b.ledger
            .topup(&alice.id, 30_000_000, "grant")
            .await
            .unwrap();
        b.ledger.topup(&bob.id, 50_000_000, "grant").await.unwrap();
        assert_eq!(
            b.ledger.current_plan(&alice.id).await.unwrap().plan.id,
            "free"
        );

        // Refusals change nothing.
        let before = b.snapshot().await;
        assert!(matches!(
            b.ledger.change_plan(&alice.id, "gold", None).await,
            Err(BillingError::UnknownPlan(_))
        ));
        assert!(matches!(
            b.ledger
                .change_plan(&alice.id, "pro", Some(ms("2026-11-01")))
                .await,
            Err(BillingError::Invalid(_))
        ));
        assert!(matches!(
            b.ledger.change_plan(&alice.id, "free", None).await,
            Err(BillingError::Invalid(_))
        ));
        let poor = b.account("poor").await;
        assert!(matches!(
            b.ledger.change_plan(&poor.id, "pro", None).await,
            Err(BillingError::InsufficientCredits { .. })
        ));
        assert_eq!(b.snapshot().await, before, "{backend:?}");

        // Pro from the 16th: 15 of November's 30 days are left, so half the 20 USD fee
        // is charged and half the 20 USD of credits granted.
        for a in [&alice, &bob] {
            let booked = b
                .ledger
                .change_plan(&a.id, "pro", None)
                .await
                .unwrap()
                .booked
                .unwrap();
            assert_eq!(
                (booked.fee_micros, booked.credits_micros),
                (10_000_000, 10_000_000)
            );
        }
        assert_eq!(b.balance(&alice).await.wallet_micros, 30_000_000);
        let p = b.platform().await;
        assert_eq!(
            (p.revenue_micros, p.included_credits_micros),
            (20_000_000, -20_000_000)
        );
        // The limits the rate limiter reads.
        let limits = b.ledger.rate_limits_for(&alice.id).await.unwrap();
        assert_eq!(limits.per_account.unwrap().to_string(), "600/min");
        assert_eq!(limits.per_key, None, "inherits [rate_limits]");

        // Enterprise from December; nothing is due before then.
        let later = b
            .ledger
            .change_plan(&alice.id, "enterprise", Some(ms("2026-12-01")))
            .await
            .unwrap();
        assert!(later.booked.is_none());
        assert_eq!(b.ledger.renew_subscriptions().await.unwrap(), 0);
        assert_eq!(
            b.ledger.current_plan(&alice.id).await.unwrap().plan.id,
            "pro"
        );

        // December: bob's Pro renews in full; alice cannot pay Enterprise's 500 USD and
        // lapses to Free, charged nothing.
        b.at("2026-12-01T00:01:00Z");
        let alice_before = b.balance(&alice).await;
        assert_eq!(b.ledger.renew_subscriptions().await.unwrap(), 2);
        assert_eq!(
            b.ledger.renew_subscriptions().await.unwrap(),
            0,
            "idempotent"
        );
        assert_eq!(
            b.ledger.current_plan(&alice.id).await.unwrap().plan.id,
            "free"
        );
        assert_eq!(b.balance(&alice).await, alice_before);
        let history: Vec<_> = b
            .ledger
            .plan_history(&alice.id)
            .await
            .unwrap()
            .into_iter()
            .map(|h| (h.plan, h.reason))
            .collect();
        assert_eq!(
            history,
            [
                ("pro", "change"),
                ("enterprise", "change"),
                ("free", "lapsed")
            ]
            .map(|(p, r)| (p.to_owned(), r.to_owned()))
        );
        assert_eq!(b.balance(&bob).await.wallet_micros, 50_000_000);
        let p = b.platform().await;
        assert_eq!(
            (p.revenue_micros, p.included_credits_micros),
            (40_000_000, -40_000_000)
        );
        b.assert_ok().await;
        b.close().await;
    }
}

#[tokio::test]
async fn quota_exhaustion_is_never_charged_and_refunds_give_calls_back() {
    for backend in backends() {
        let b = Books::open_with(backend, "2026-11-30T23:00:00Z", plans_with_free_quota(3)).await;
        let user = b.account("user").await;
        let creator = b.account("creator").await;
        let units = b.server(&creator, "units", "0.02_per_request").await;
        b.ledger.topup(&user.id, 1_000_000, "grant").await.unwrap();

        let c: Vec<String> =
            futures::future::join_all((0..3).map(|_| b.reserve(&user, &units, "convert", 20_000)))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
        let before = b.snapshot().await;
        let wallet = b.balance(&user).await;
        match b.reserve(&user, &units, "convert", 20_000).await {
            Err(BillingError::QuotaExceeded {
                plan,
                quota,
                resets_at_ms,
            }) => {
                assert_eq!((plan.as_str(), quota), ("Free", 3));
                assert_eq!(resets_at_ms, ms("2026-12-01"));
            }
            other => panic!("expected quota_exceeded, got {other:?}"),
        }
        assert_eq!(b.snapshot().await, before, "a refused call writes nothing");
        assert_eq!(b.balance(&user).await, wallet, "and charges nothing");

        // A refunded call does not count: the fourth call fits now.
        b.end(&c[0], End::Refund).await;
        let fourth = b.reserve(&user, &units, "convert", 20_000).await.unwrap();
        b.end(&c[1], End::Settle).await;
        b.end(&c[2], End::Settle).await;
        let nov = b
            .ledger
            .month_usage(&user.id, month("2026-11"))
            .await
            .unwrap();
        assert_eq!((nov.calls, nov.spent_micros), (3, 60_000));

        // A new UTC month starts a new count; refunding November's call in December
        // gives the call back to November.
        b.at("2026-12-01T00:00:00Z");
        b.call(&user, &units, "convert", 20_000, End::Settle).await;
        b.end(&fourth, End::Refund).await;
        let nov = b
            .ledger
            .month_usage(&user.id, month("2026-11"))
            .await
            .unwrap();
        let dec = b
            .ledger
            .month_usage(&user.id, month("2026-12"))
            .await
            .unwrap();
        assert_eq!((nov.calls, dec.calls), (2, 1));

        // Concurrent calls cannot pass the quota together.
        let many = b.account("many").await;
        b.ledger.topup(&many.id, 1_000_000, "grant").await.unwrap();
        let results =
            futures::future::join_all((0..8).map(|_| b.reserve(&many, &units, "convert", 1_000)))
                .await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(BillingError::QuotaExceeded { .. })))
            .count();
        assert_eq!((ok, refused), (3, 5), "{backend:?}");
        assert_eq!(b.balance(&many).await.holds_micros, 3_000);
        b.assert_ok().await;
        b.close().await;
    }
}

/// Spend limits count the key's non-refunded prices of the UTC day and month the calls
/// were made in (its spend counters): a refusal changes nothing, a refund gives its
/// price back to the periods its call was made in (even once they are over), a new day
/// starts the day's limit afresh while the month's still counts, and a refund never
/// fails over a counter. `ledger verify` checks every counter against the calls, and
/// that a limited period with spending has one.
#[tokio::test]
async fn spend_limits_count_the_keys_calls_of_the_day_and_the_month() {
    for backend in backends() {
        let b = Books::open(backend, "2026-03-31T22:00:00Z").await;
        let user = b.account("user").await;
        let creator = b.account("creator").await;
        let units = b.server(&creator, "units", "0.02_per_request").await;
        let p = 20_000;
        b.ledger.topup(&user.id, 100 * p, "grant").await.unwrap();
        // The key `Books` reserves with, limited to 3 calls a day and 4 a month.
        let key = "key-user";
        let limits = [(3 * p, "day"), (4 * p, "month")];
        sqlx::query(
            "INSERT INTO api_keys (id, account_id, prefix, hash, scopes, daily_limit_micros, \
             monthly_limit_micros, created_at) VALUES ($1, $2, 'mkt_user', 'hash-of-key-user', 'invoke', $3, $4, 0)",
        )
        .bind(key)
        .bind(&user.id)
        .bind(limits[0].0)
        .bind(limits[1].0)
        .execute(b.store.pool())
        .await
        .unwrap();
        let spend = || async {
            (
                b.ledger.key_spend(key, "day").await.unwrap(),
                b.ledger.key_spend(key, "month").await.unwrap(),
            )
        };
        let reserve = || b.reserve_under(&user, &units, "convert", p, 3000, &limits);
        let refused = |r: Result<String, BillingError>| match r {
            Err(BillingError::SpendLimit {
                limit_micros,
                spent_micros,
                period,
            }) => (limit_micros, spent_micros, period),
            other => panic!("expected a spend-limit refusal ({backend:?}): {other:?}"),
        };
        let end = |id: String, how: End| {
            let b = &b;
            async move { b.end(&id, how).await }
        };

        end(reserve().await.unwrap(), End::Settle).await;
        end(reserve().await.unwrap(), End::Settle).await;
        end(reserve().await.unwrap(), End::Refund).await;
        assert_eq!(spend().await, (2 * p, 2 * p));
        let open = reserve().await.unwrap();
        let before = b.snapshot().await;
        assert_eq!(refused(reserve().await), (3 * p, 3 * p, "day".to_owned()));
        assert_eq!(b.snapshot().await, before, "a refusal changes nothing");
        // A refund makes room; this call is left in flight past midnight and the month.
        b.end(&open, End::Refund).await;
        let late = reserve().await.unwrap();
        assert_eq!(spend().await, (3 * p, 3 * p));

        b.at("2026-04-01T00:30:00Z");
        assert_eq!(spend().await, (0, 0));
        for _ in 0..3 {
            end(reserve().await.unwrap(), End::Settle).await;
        }
        assert_eq!(refused(reserve().await), (3 * p, 3 * p, "day".to_owned()));
        b.at("2026-04-02T09:00:00Z");
        end(reserve().await.unwrap(), End::Settle).await;
        assert_eq!(spend().await, (p, 4 * p));
        assert_eq!(refused(reserve().await), (4 * p, 4 * p, "month".to_owned()));
        // March's call, refunded in April, gives its price back to March.
        b.end(&late, End::Refund).await;
        assert_eq!(spend().await, (p, 4 * p));
        let counter = |period: &'static str, start: &'static str| {
            sqlx::query(
                "SELECT spent_micros FROM key_spend_counters \
                 WHERE key_id = $1 AND period = $2 AND period_start = $3",
            )
            .bind(key)
            .bind(period)
            .bind(ms(start))
            .fetch_one(b.store.pool())
        };
        for (period, start, spent) in [
            ("day", "2026-03-31", 2 * p),
            ("month", "2026-03", 2 * p),
            ("day", "2026-04-01", 3 * p),
            ("day", "2026-04-02", p),
            ("month", "2026-04", 4 * p),
        ] {
            let row = counter(period, start).await.unwrap();
            assert_eq!(
                row.get::<i64, _>(0),
                spent,
                "{period} {start} ({backend:?})"
            );
        }
        b.assert_ok().await;

        // A refund never fails over a counter that drifted below its price: the counter
        // stops at zero.
        b.at("2026-05-01T10:00:00Z");
        let drifted = reserve().await.unwrap();
        sqlx::query("UPDATE key_spend_counters SET spent_micros = 0 WHERE period_start >= $1")
            .bind(ms("2026-05"))
            .execute(b.store.pool())
            .await
            .unwrap();
        b.ledger
            .refund(&drifted, "upstream_error", Default::default())
            .await
            .expect("the refund goes through");
        assert_eq!(spend().await, (0, 0));
        b.assert_ok().await;

        // Verify sees a counter that drifted from the calls, and one that is missing.
        let pool = b.store.pool();
        sqlx::query(
            "UPDATE key_spend_counters SET spent_micros = spent_micros + 1 \
             WHERE period = 'day' AND period_start = $1",
        )
        .bind(ms("2026-04-02"))
        .execute(pool)
        .await
        .unwrap();
        sqlx::query("DELETE FROM key_spend_counters WHERE period = 'month' AND period_start = $1")
            .bind(ms("2026-03"))
            .execute(pool)
            .await
            .unwrap();
        let broken = b.ledger.verify().await.unwrap().join("\n");
        for expected in [
            "spend counter of key key-user for the day from 2026-04-02T00:00:00.000Z says 20001 micros, the calls say 20000",
            "key key-user spent 40000 micros in the month from 2026-03-01T00:00:00.000Z without a spend counter",
        ] {
            assert!(broken.contains(expected), "{expected} not in:\n{broken}");
        }
        b.close().await;
    }
}

#[tokio::test]
async fn a_low_balance_alert_is_recorded_once_per_crossing() {
    for backend in backends() {
        let b = Books::open(backend, "2026-11-10T00:00:00Z").await;
        let user = b.account("user").await;
        let creator = b.account("creator").await;
        let units = b.server(&creator, "units", "0.2_per_request").await;
        b.ledger.topup(&user.id, 1_500_000, "grant").await.unwrap();
        b.ledger
            .set_low_balance(&user.id, Some(1_000_000))
            .await
            .unwrap();
        let price = 200_000;
        let mut calls = Vec::new();
        for _ in 0..4 {
            // 1.30, 1.10, 0.90 (crosses), 0.70
            calls.push(b.call(&user, &units, "convert", price, End::Settle).await);
        }
        let pending = alerts::pending(&b.store, 10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].balance_micros, 900_000);
        assert_eq!(pending[0].threshold_micros, 1_000_000);
        assert_eq!(pending[0].call_id.as_deref(), Some(calls[2].as_str()));
        // A refund back over the threshold does not re-arm it; nor a credit that stays below.
        let c = b.call(&user, &units, "convert", price, End::Refund).await;
        assert!(!c.is_empty());
        b.call(&user, &units, "convert", price, End::Settle).await; // 0.50
        b.ledger.topup(&user.id, 200_000, "grant").await.unwrap(); // 0.70
        b.call(&user, &units, "convert", price, End::Settle).await; // 0.50
        assert_eq!(alerts::pending(&b.store, 10).await.unwrap().len(), 1);
        assert!(b.ledger.low_balance(&user.id).await.unwrap().alerted);
        // A top-up over the threshold re-arms it; the next crossing alerts again.
        b.ledger.topup(&user.id, 1_000_000, "grant").await.unwrap(); // 1.50
        assert!(!b.ledger.low_balance(&user.id).await.unwrap().alerted);
        for _ in 0..3 {
            b.call(&user, &units, "convert", price, End::Settle).await; // 1.30 1.10 0.90
        }
        let pending = alerts::pending(&b.store, 10).await.unwrap();
        assert_eq!(pending.len(), 2);
        let payload = pending[1].webhook_payload();
        assert_eq!(payload["type"], "balance.low");
        assert_eq!(payload["account"], "user");
        assert_eq!(payload["balance"], "0.90");
        assert_eq!(payload["threshold"], "1.00");
        // The outbox takes each alert once.
        assert!(
            alerts::mark_handed_off(&b.store, &pending[0].id, b.now())
                .await
                .unwrap()
        );
        assert!(
            !alerts::mark_handed_off(&b.store, &pending[0].id, b.now())
                .await
                .unwrap()
        );
        assert_eq!(alerts::pending(&b.store, 10).await.unwrap().len(), 1);

        // Concurrent debits across the threshold raise exactly one alert.
        let racer = b.account("racer").await;
        b.ledger.topup(&racer.id, 1_050_000, "grant").await.unwrap();
        b.ledger
            .set_low_balance(&racer.id, Some(1_000_000))
            .await
            .unwrap();
        futures::future::join_all((0..10).map(|_| b.reserve(&racer, &units, "convert", 10_000)))
            .await;
        let racer_alerts = alerts::of_account(&b.store, &racer.id, 10).await.unwrap();
        assert_eq!(racer_alerts.len(), 1, "{backend:?}");
        b.assert_ok().await;
        b.close().await;
    }
}

/// November 2026 for one buyer: a balance carried in from October, calls of 0.02 USD and
/// of 7 micros (whose 30 % fee rounds down per call), a refunded call, Pro from the 16th,
/// a grant, and calls on both sides of midnight UTC on the 30th.
async fn november(b: &Books) -> (String, String) {
    let buyer = b.account("buyer").await;
    let creator = b.account("creator").await;
    let units = b.server(&creator, "units", "0.02_per_request").await;
    let notes = b.server(&creator, "notes", "0.000007_per_request").await;
    b.at("2026-10-31T23:59:59.999Z");
    b.ledger
        .topup(&buyer.id, 30_000_000, "grant")
        .await
        .unwrap();
    b.at("2026-11-01T00:00:00Z");
    for _ in 0..3 {
        b.call(&buyer, &units, "convert", 20_000, End::Settle).await;
    }
    b.call(&buyer, &units, "convert", 20_000, End::Refund).await;
    b.at("2026-11-05T12:00:00Z");
    for _ in 0..100 {
        b.call(&buyer, &notes, "search", 7, End::Settle).await;
    }
    b.at("2026-11-16T00:00:00Z");
    b.ledger.change_plan(&buyer.id, "pro", None).await.unwrap();
    b.at("2026-11-20T00:00:00Z");
    b.ledger
        .topup(&buyer.id, 5_000_000, "credits grant")
        .await
        .unwrap();
    // Made and answered before midnight: November.
    b.at("2026-11-30T23:59:59Z");
    let late = b.reserve(&buyer, &units, "convert", 20_000).await.unwrap();
    b.at("2026-11-30T23:59:59.500Z");
    b.end(&late, End::Settle).await;
    // Made before midnight, answered at midnight: charged in December.
    b.at("2026-11-30T23:59:59.999Z");
    let straddling = b.reserve(&buyer, &units, "convert", 20_000).await.unwrap();
    b.at("2026-12-01T00:00:00Z");
    b.end(&straddling, End::Settle).await;
    (buyer.id, creator.id)
}

#[tokio::test]
async fn invoices_match_a_hand_computed_month_and_are_stored_once() {
    for backend in backends() {
        let b = Books::open(backend, "2026-10-31T00:00:00Z").await;
        let (buyer, creator) = november(&b).await;

        // The creator's share and the platform's fee of 100 calls at 7 micros are
        // floored per call: 100 × (7 − ⌊2.1⌋) = 500 and 100 × 2 = 200 (not 210).
        let nov = month("2026-11");
        let (draft, _) = invoices::invoice(&b.ledger, &buyer, nov)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(draft.status, "draft");
        let t = &draft.totals;
        assert_eq!(t.usage_micros, 4 * 20_000 + 100 * 7);
        assert_eq!(t.subscription_micros, 10_000_000);
        assert_eq!(t.total_micros, 10_080_700);
        assert_eq!((t.settled_calls, t.refunded_calls), (104, 1));
        assert_eq!(
            (t.credits_added_micros, t.included_credits_micros),
            (5_000_000, 10_000_000)
        );
        assert_eq!(draft.opening_balance_micros, 30_000_000);
        // The straddling call is still held at midnight: part of the closing balance.
        assert_eq!(draft.closing_balance_micros, 34_919_300);
        assert_eq!(
            b.balance(&b.account_named("creator").await)
                .await
                .earnings_micros,
            5 * 14_000 + 500
        );
        assert_eq!(
            b.platform().await.revenue_micros,
            5 * 6_000 + 200 + 10_000_000
        );

        // Not before the month is over (plus five minutes).
        b.at("2026-12-01T00:04:59.999Z");
        let before = b.snapshot().await;
        assert!(matches!(
            invoices::close_month(&b.ledger, nov).await,
            Err(BillingError::MonthOpen { .. })
        ));
        assert_eq!(b.snapshot().await, before);
        b.at("2026-12-01T00:10:00Z");
        let report = invoices::close_month(&b.ledger, nov).await.unwrap();
        assert_eq!(
            (report.invoices, report.already_closed),
            (1, false),
            "the creator bought nothing"
        );
        let (inv, stored) = invoices::invoice(&b.ledger, &buyer, nov)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(inv.status, "final");
        assert_eq!(inv.closed_at.as_deref(), Some("2026-12-01T00:10:00.000Z"));
        assert_eq!(
            (inv.lines.clone(), inv.totals.clone()),
            (draft.lines, draft.totals)
        );
        assert_eq!(
            stored.csv,
            "invoice,account,month,kind,description,quantity,unit_price_usd,amount_usd\n\
             INV-202611-buyer,buyer,2026-11,opening_balance,Balance at the start of the month,,,30.00\n\
             INV-202611-buyer,buyer,2026-11,subscription,\"Pro plan, 2026-11-16 to 2026-12-01\",1,10.00,10.00\n\
             INV-202611-buyer,buyer,2026-11,usage,notes__search,100,0.000007,0.0007\n\
             INV-202611-buyer,buyer,2026-11,usage,units__convert,4,0.02,0.08\n\
             INV-202611-buyer,buyer,2026-11,refunded,\"units__convert (refunded, not charged)\",1,0.02,0.00\n\
             INV-202611-buyer,buyer,2026-11,total,Total charged,,,10.0807\n\
             INV-202611-buyer,buyer,2026-11,included_credits,\"Pro plan credits, 2026-11 (2026-11-16T00:00:00.000Z)\",,,10.00\n\
             INV-202611-buyer,buyer,2026-11,topup,credits grant (2026-11-20T00:00:00.000Z),,,5.00\n\
             INV-202611-buyer,buyer,2026-11,closing_balance,Balance at the end of the month,,,34.9193\n"
        );
        assert!(stored.html.contains("<h1>Invoice INV-202611-buyer</h1>"));
        assert!(stored.html.contains("34.9193") && !stored.html.contains("Draft"));
        assert!(
            stored
                .get(InvoiceFormat::Json)
                .contains("\"number\": \"INV-202611-buyer\"")
        );

        // Later traffic changes neither the stored invoice nor what regenerating gives.
        let units = b.server_id("units").await;
        let buyer_account = b.account_named("buyer").await;
        b.call(&buyer_account, &units, "convert", 20_000, End::Settle)
            .await;
        let again = invoices::close_month(&b.ledger, nov).await.unwrap();
        assert!(again.already_closed);
        let (_, still) = invoices::invoice(&b.ledger, &buyer, nov)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(still, stored);
        let mut conn = b.store.pool().acquire().await.unwrap();
        let regenerated = invoices::build(
            &b.ledger,
            &mut conn,
            &buyer,
            nov,
            Some(ms("2026-12-01T00:10:00Z")),
        )
        .await
        .unwrap();
        drop(conn);
        assert_eq!(invoices::render(&regenerated), stored, "same bytes");

        // December's draft opens where November closed and holds the straddling call.
        let (dec, _) = invoices::invoice(&b.ledger, &buyer, month("2026-12"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(dec.opening_balance_micros, 34_919_300);
        assert_eq!(dec.totals.usage_micros, 2 * 20_000);
        assert!(
            invoices::invoice(&b.ledger, &creator, nov)
                .await
                .unwrap()
                .is_none()
        );
        b.assert_ok().await;
        b.close().await;
    }
}

#[tokio::test]
async fn payouts_pay_earnings_once_in_whole_cents_and_carry_the_rest() {
    for backend in backends() {
        let b = Books::open(backend, "2026-11-02T00:00:00Z").await;
        let buyer = b.account("buyer").await;
        let ann = b.account("ann").await;
        let bob = b.account("bob").await;
        let cat = b.account("cat").await;
        let ann_srv = b.server(&ann, "ann-srv", "1.234567_per_request").await;
        let bob_srv = b.server(&bob, "bob-srv", "0.05_per_request").await;
        let cat_srv = b.server(&cat, "cat-srv", "0.5_per_request").await;
        b.ledger
            .topup(&buyer.id, 100_000_000, "grant")
            .await
            .unwrap();
        payouts::set_payee(&b.ledger, &ann.id, PayoutMethod::Paypal, "ann@example.com")
            .await
            .unwrap();
        payouts::set_payee(&b.ledger, &bob.id, PayoutMethod::Stripe, "acct_bob1")
            .await
            .unwrap();
        for (bad_method, bad) in [
            (PayoutMethod::Paypal, "not-an-email"),
            (PayoutMethod::Stripe, "bob@example.com"),
            (PayoutMethod::Stripe, "acct_"),
        ] {
            assert!(matches!(
                payouts::set_payee(&b.ledger, &cat.id, bad_method, bad).await,
                Err(BillingError::Invalid(_))
            ));
        }
        // 1.234567 USD: fee ⌊370 370.1⌋ = 370 370, ann earns 864 197.
        b.call(&buyer, &ann_srv, "t", 1_234_567, End::Settle).await;
        b.call(&buyer, &bob_srv, "t", 50_000, End::Settle).await; // bob earns 35 000
        b.call(&buyer, &cat_srv, "t", 500_000, End::Settle).await; // cat earns 350 000
        b.call(&buyer, &ann_srv, "t", 1_234_567, End::Refund).await; // earns nothing
        b.at("2026-12-01T00:00:00Z");
        b.call(&buyer, &ann_srv, "t", 1_234_567, End::Settle).await; // December's

        let nov = month("2026-11");
        let threshold = 100_000; // 0.10 USD
        let before = b.snapshot().await;
        assert!(matches!(
            payouts::run(&b.ledger, nov, threshold).await,
            Err(BillingError::MonthNotClosed(_))
        ));
        assert_eq!(b.snapshot().await, before);
        b.at("2026-12-01T00:10:00Z");
        invoices::close_month(&b.ledger, nov).await.unwrap();
        let run = payouts::run(&b.ledger, nov, threshold).await.unwrap();
        let summary: Vec<_> = run
            .payouts
            .iter()
            .map(|p| {
                (
                    p.account.as_str(),
                    p.status.as_str(),
                    p.reason.as_str(),
                    p.amount_micros,
                    p.carried_out_micros,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("ann", "paid", "", 860_000, 4_197),
                ("bob", "held", "below_threshold", 0, 35_000),
                ("cat", "held", "no_payee", 0, 350_000),
            ]
        );
        assert_eq!((run.paid_micros, run.new_payouts), (860_000, 1));
        let ann_ref = payouts::reference(&ann.id, nov);
        assert_eq!(
            payouts::paypal_csv(nov, &run.payouts),
            format!("ann@example.com,0.86,USD,{ann_ref},mcp-marketplace earnings 2026-11,PAYPAL\n")
        );
        assert_eq!(
            payouts::stripe_csv(nov, &run.payouts),
            "destination,amount,currency,description,transfer_group,idempotency_key\n"
        );
        assert_eq!(
            b.ledger
                .account_balance(&ann.id)
                .await
                .unwrap()
                .earnings_micros,
            4_197 + 864_197
        );

        // Twice for the same month pays nothing twice and gives the same batch.
        let snapshot = b.snapshot().await;
        let rerun = payouts::run(&b.ledger, nov, threshold).await.unwrap();
        assert_eq!(rerun.new_payouts, 0);
        assert_eq!(
            payouts::paypal_csv(nov, &rerun.payouts),
            payouts::paypal_csv(nov, &run.payouts)
        );
        assert_eq!(b.snapshot().await, snapshot);

        // December: bob has 35 000 + 2 × 35 000 → 0.10 paid, 5 000 carried; ann her
        // carried 4 197 + 864 197 → 0.86 paid, 8 394 carried; cat, with a payee now, all.
        b.at("2026-12-10T00:00:00Z");
        b.call(&buyer, &bob_srv, "t", 50_000, End::Settle).await;
        b.call(&buyer, &bob_srv, "t", 50_000, End::Settle).await;
        payouts::set_payee(&b.ledger, &cat.id, PayoutMethod::Paypal, "cat@example.com")
            .await
            .unwrap();
        b.at("2027-01-01T00:10:00Z");
        let dec = month("2026-12");
        invoices::close_month(&b.ledger, dec).await.unwrap();
        // Three runs at once still pay each creator once.
        let runs =
            futures::future::join_all((0..3).map(|_| payouts::run(&b.ledger, dec, threshold)))
                .await;
        let runs: Vec<_> = runs.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            runs.iter().map(|r| r.new_payouts).sum::<usize>(),
            3,
            "{backend:?}"
        );
        let lines = payouts::of_month(&b.ledger, dec).await.unwrap();
        let summary: Vec<_> = lines
            .iter()
            .map(|p| {
                (
                    p.account.as_str(),
                    p.status.as_str(),
                    p.amount_micros,
                    p.carried_in_micros,
                    p.earned_micros,
                    p.carried_out_micros,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("ann", "paid", 860_000, 4_197, 864_197, 8_394),
                ("bob", "paid", 100_000, 0, 105_000, 5_000),
                ("cat", "paid", 350_000, 0, 350_000, 0),
            ]
        );
        assert_eq!(
            payouts::stripe_csv(dec, &lines),
            format!(
                "destination,amount,currency,description,transfer_group,idempotency_key\n\
                 acct_bob1,10,usd,mcp-marketplace earnings 2026-12,mcp-marketplace-2026-12,{}\n",
                payouts::reference(&bob.id, dec)
            )
        );
        // November, asked again after December was paid: unchanged.
        assert_eq!(payouts::of_month(&b.ledger, nov).await.unwrap().len(), 3);
        let p = b.platform().await;
        assert_eq!(p.revenue_micros, 2 * 370_370 + 3 * 15_000 + 150_000);
        let paid: i64 =
            sqlx::query("SELECT balance FROM ledger_accounts WHERE id = 'external:payouts'")
                .fetch_one(b.store.pool())
                .await
                .unwrap()
                .try_get(0)
                .unwrap();
        assert_eq!(paid, 860_000 + 860_000 + 100_000 + 350_000);
        b.assert_ok().await;
        b.close().await;
    }
}

/// A small deterministic generator, so the simulated month is the same on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[tokio::test]
async fn a_month_of_simulated_traffic_closes_into_invoices_and_payouts_that_reconcile() {
    for backend in backends() {
        let b = Books::open(backend, "2026-11-01T00:00:00Z").await;
        let buyers = [
            b.account("b0").await,
            b.account("b1").await,
            b.account("b2").await,
        ];
        let creators = [b.account("c0").await, b.account("c1").await];
        let servers = [
            (
                b.server(&creators[0], "s0", "0.02_per_request").await,
                20_000,
                0,
            ),
            (
                b.server(&creators[0], "s1", "0.000007_per_request").await,
                7,
                0,
            ),
            (
                b.server(&creators[1], "s2", "1.234567_per_request").await,
                1_234_567,
                1,
            ),
        ];
        for c in &creators {
            payouts::set_payee(
                &b.ledger,
                &c.id,
                PayoutMethod::Paypal,
                &format!("{}@example.com", c.name),
            )
            .await
            .unwrap();
        }
        // The model: what each buyer was charged and refunded, what each creator earned.
        let mut charged = [0i64; 3];
        let mut settled_calls = [0i64; 3];
        let mut refunded_calls = [0i64; 3];
        let mut credited = [0i64; 3];
        let mut fees = [0i64; 3];
        let mut earned = [0i64; 2];
        let mut platform = 0i64;
        let mut rng = Lcg(20261130);
        let start = ms("2026-11-01");
        for step in 0..100i64 {
            b.clock.set(start + step * 7 * 3_600_000 + 1);
            if step == 40 {
                let p = b.ledger.change_plan(&buyers[0].id, "pro", None).await;
                if let Ok(c) = p {
                    let booked = c.booked.unwrap();
                    fees[0] += booked.fee_micros;
                    credited[0] += booked.credits_micros;
                    platform += booked.fee_micros;
                }
            }
            for _ in 0..rng.next(4) {
                let who = rng.next(3) as usize;
                if b.balance(&buyers[who]).await.wallet_micros < 2_000_000 {
                    b.ledger
                        .topup(&buyers[who].id, 5_000_000, "grant")
                        .await
                        .unwrap();
                    credited[who] += 5_000_000;
                }
                let (server, price, owner) = &servers[rng.next(3) as usize];
                let end = if rng.next(100) < 85 {
                    End::Settle
                } else {
                    End::Refund
                };
                b.call(&buyers[who], server, "t", *price, end).await;
                if end == End::Settle {
                    let fee = price * 3000 / 10_000;
                    charged[who] += price;
                    settled_calls[who] += 1;
                    earned[*owner] += price - fee;
                    platform += fee;
                } else {
                    refunded_calls[who] += 1;
                }
            }
        }
        // One more call across midnight: December's.
        b.at("2026-11-30T23:59:59.999Z");
        let late = b
            .reserve(&buyers[1], &servers[0].0, "t", 20_000)
            .await
            .unwrap();
        b.at("2026-12-01T00:00:00.001Z");
        b.end(&late, End::Settle).await;

        b.at("2026-12-01T00:10:00Z");
        let nov = month("2026-11");
        let report = invoices::close_month(&b.ledger, nov).await.unwrap();
        assert_eq!(report.invoices, 3);
        for (i, buyer) in buyers.iter().enumerate() {
            let (inv, _) = invoices::invoice(&b.ledger, &buyer.id, nov)
                .await
                .unwrap()
                .unwrap();
            let t = &inv.totals;
            assert_eq!(t.usage_micros, charged[i], "{} {backend:?}", buyer.name);
            assert_eq!(
                (t.settled_calls, t.refunded_calls),
                (settled_calls[i], refunded_calls[i])
            );
            assert_eq!(t.subscription_micros, fees[i]);
            assert_eq!(
                t.credits_added_micros + t.included_credits_micros,
                credited[i]
            );
            assert_eq!(inv.opening_balance_micros, 0);
            assert_eq!(
                inv.closing_balance_micros,
                credited[i] - fees[i] - charged[i]
            );
        }
        let run = payouts::run(&b.ledger, nov, 1_000_000).await.unwrap();
        for (i, c) in creators.iter().enumerate() {
            let p = run.payouts.iter().find(|p| p.account == c.name).unwrap();
            assert_eq!(p.earned_micros, earned[i], "{} {backend:?}", c.name);
            assert_eq!(p.amount_micros + p.carried_out_micros, earned[i]);
            assert_eq!(p.amount_micros % 10_000, 0);
        }
        // Platform revenue: every fee, plus the straddling call's, plus plan fees.
        assert_eq!(b.platform().await.revenue_micros, platform + 6_000);
        b.assert_ok().await;
        b.close().await;
    }
}

#[tokio::test]
async fn the_usage_log_invoices_and_transfers_are_immutable_and_verify_sees_tampering() {
    for backend in backends() {
        let b = Books::open(backend, "2026-10-31T00:00:00Z").await;
        november(&b).await;
        b.at("2026-12-01T00:10:00Z");
        invoices::close_month(&b.ledger, month("2026-11"))
            .await
            .unwrap();
        b.assert_ok().await;
        let pool = b.store.pool();
        for sql in [
            "UPDATE calls SET price_micros = 1 WHERE status = 'settled'",
            "UPDATE calls SET status = 'refunded' WHERE status = 'settled'",
            "DELETE FROM calls",
            "UPDATE ledger_transfers SET amount = 0",
            "DELETE FROM ledger_entries",
            "UPDATE invoices SET total_micros = 0",
            "DELETE FROM invoices",
            "DELETE FROM billing_periods",
        ] {
            assert!(
                sqlx::query(sql).execute(pool).await.is_err(),
                "{sql} must be refused ({backend:?})"
            );
        }
        b.assert_ok().await;

        // With the guard removed by hand, verify still notices a changed invoice and a
        // balance that no longer matches its entries.
        let disable = match backend {
            Backend::Sqlite => "DROP TRIGGER invoices_immutable",
            Backend::Postgres => "ALTER TABLE invoices DISABLE TRIGGER invoices_immutable",
        };
        sqlx::query(disable).execute(pool).await.unwrap();
        sqlx::query("UPDATE invoices SET json = REPLACE(json, '10080700', '1'), usage_micros = 1")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE ledger_accounts SET balance = balance + 1 WHERE id = 'platform:revenue'",
        )
        .execute(pool)
        .await
        .unwrap();
        let broken = b.ledger.verify().await.unwrap().join("\n");
        for expected in [
            "platform:revenue: balance",
            "money was created or lost",
            "INV-202611-buyer: usage 1",
            "regenerating it from the ledger gives different bytes",
        ] {
            assert!(broken.contains(expected), "{expected} not in:\n{broken}");
        }
        b.close().await;
    }
}

#[tokio::test]
async fn the_billing_migration_keeps_existing_data() {
    for backend in backends() {
        let db = TestDb::new(backend).await;
        // A database at the foundation's schema, with money in it.
        let dir = tempfile::tempdir().unwrap();
        let sub = match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        };
        std::fs::copy(
            format!(
                "{}/migrations/{sub}/0001_foundation.sql",
                env!("CARGO_MANIFEST_DIR")
            ),
            dir.path().join("0001_foundation.sql"),
        )
        .unwrap();
        sqlx::any::install_default_drivers();
        let url = if backend == Backend::Sqlite {
            format!("{}?mode=rwc", db.url)
        } else {
            db.url.clone()
        };
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::migrate::Migrator::new(dir.path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        for sql in [
            "INSERT INTO accounts (id, name, created_at) VALUES ('a1', 'old', 1)",
            "INSERT INTO api_keys (id, account_id, prefix, hash, scopes, spend_limit_micros, spend_limit_period, created_at) \
             VALUES ('k', 'a1', 'mkt_old0', 'hash-of-k', 'invoke', 5000000, 'day', 1)",
            "INSERT INTO ledger_accounts (id, kind, balance, created_at) VALUES ('wallet:a1', 'wallet', 980000, 1), ('earnings:a1', 'earnings', 0, 1)",
            "INSERT INTO servers (id, slug, name, owner_account_id, price_micros, status, secret, timeout_ms, created_at, updated_at) \
             VALUES ('s1', 'old', 'old', 'a1', 20000, 'active', 'x', 1000, 1, 1)",
            "INSERT INTO ledger_transfers (id, kind, call_id, amount, memo, created_at) VALUES ('t1', 'topup', NULL, 1000000, '', 1), ('t2', 'reserve', 'c1', 20000, '', 2)",
            "INSERT INTO ledger_entries (transfer_id, ledger_account_id, amount) VALUES ('t1', 'external:topups', -1000000), ('t1', 'wallet:a1', 1000000), ('t2', 'wallet:a1', -20000), ('t2', 'holds', 20000)",
            "UPDATE ledger_accounts SET balance = -1000000 WHERE id = 'external:topups'",
            "UPDATE ledger_accounts SET balance = 20000 WHERE id = 'holds'",
            "INSERT INTO calls (id, account_id, key_id, server_id, tool, price_micros, creator_micros, fee_micros, status, hold_expires_at, created_at) \
             VALUES ('c1', 'a1', 'k', 's1', 'convert', 20000, 14000, 6000, 'reserved', 9, 2)",
            // A refunded call (it counts nowhere) the same day, and a reserved one in
            // the next month (day 40, 1970-02-10).
            "INSERT INTO ledger_transfers (id, kind, call_id, amount, memo, created_at) VALUES ('t3', 'reserve', 'c2', 20000, '', 3), ('t4', 'refund', 'c2', 20000, 'upstream_error', 4), ('t5', 'reserve', 'c3', 20000, '', 3456000000)",
            "INSERT INTO ledger_entries (transfer_id, ledger_account_id, amount) VALUES ('t3', 'wallet:a1', -20000), ('t3', 'holds', 20000), ('t4', 'holds', -20000), ('t4', 'wallet:a1', 20000), ('t5', 'wallet:a1', -20000), ('t5', 'holds', 20000)",
            "UPDATE ledger_accounts SET balance = 960000 WHERE id = 'wallet:a1'",
            "UPDATE ledger_accounts SET balance = 40000 WHERE id = 'holds'",
            "INSERT INTO calls (id, account_id, key_id, server_id, tool, price_micros, creator_micros, fee_micros, status, hold_expires_at, created_at) \
             VALUES ('c2', 'a1', 'k', 's1', 'convert', 20000, 14000, 6000, 'refunded', 9, 3), \
             ('c3', 'a1', 'k', 's1', 'convert', 20000, 14000, 6000, 'reserved', 9, 3456000000)",
        ] {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        pool.close().await;

        let store = Store::connect(&db.url).await.unwrap();
        let ledger = mcp_marketplace::billing::Ledger::new(store.clone());
        assert_eq!(
            ledger.verify().await.unwrap(),
            Vec::<String>::new(),
            "{backend:?}"
        );
        let b = ledger.account_balance("a1").await.unwrap();
        assert_eq!((b.wallet_micros, b.holds_micros), (960_000, 40_000));
        let old_month = Month::of_ms(2);
        assert_eq!(ledger.month_usage("a1", old_month).await.unwrap().calls, 1);
        // The key's spend counters of the period it limits were made from the calls
        // (`verify` above agrees).
        let counters: Vec<(String, i64, i64)> = sqlx::query(
            "SELECT period, period_start, spent_micros FROM key_spend_counters \
             WHERE key_id = 'k' ORDER BY period, period_start",
        )
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
        assert_eq!(
            counters,
            [
                ("day".to_owned(), 0, 20_000),
                ("day".to_owned(), 3_456_000_000, 20_000),
            ],
            "{backend:?}"
        );
        // The old holds can still be refunded, now with the new transfer kinds in place.
        assert_eq!(ledger.sweep_expired_holds(10).await.unwrap(), 2);
        assert_eq!(
            ledger.account_balance("a1").await.unwrap().wallet_micros,
            1_000_000
        );
        assert_eq!(ledger.verify().await.unwrap(), Vec::<String>::new());
        store.close().await;
    }
}

/// True when the store's next commit outside the ledger's batches waits for the disk:
/// SQLite's pooled connection is in `synchronous = FULL` (2), PostgreSQL's
/// `synchronous_commit` is `on`.
async fn commits_durably(b: &Books, backend: Backend) -> bool {
    let pool = b.store.pool();
    match backend {
        Backend::Sqlite => sqlx::query_scalar::<_, i64>("PRAGMA synchronous")
            .fetch_one(pool)
            .await
            .is_ok_and(|mode| mode == 2),
        Backend::Postgres => sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
            .fetch_one(pool)
            .await
            .is_ok_and(|mode| mode == "on"),
    }
}

/// Reservations and refunds commit without waiting for their flush (docs/ledger.md
/// "Durability"); nothing else commits relaxed: SQLite's pooled connection stays in
/// `synchronous = FULL` (2) through every such batch (a refused one included; the
/// ledger writer relaxes only its own connection, per batch: its unit test), and
/// PostgreSQL's `synchronous_commit` stays `on` outside the ledger's own transactions.
#[tokio::test]
async fn relaxed_reservations_leave_every_later_commit_durable() {
    for backend in backends() {
        let b = Books::open(backend, "2026-11-16T00:00:00Z").await;
        let user = b.account("user").await;
        let creator = b.account("creator").await;
        let units = b.server(&creator, "units", "0.02_per_request").await;
        b.ledger.topup(&user.id, 1_000_000, "grant").await.unwrap();
        let reserved = b.reserve(&user, &units, "convert", 20_000).await.unwrap();
        assert!(
            commits_durably(&b, backend).await,
            "{backend:?} after a reservation"
        );
        // A batch whose every operation is refused writes nothing but still commits.
        assert!(matches!(
            b.reserve(&user, &units, "convert", 2_000_000).await,
            Err(BillingError::InsufficientCredits { .. })
        ));
        assert!(
            commits_durably(&b, backend).await,
            "{backend:?} after a refused reservation"
        );
        b.end(&reserved, End::Refund).await;
        assert!(
            commits_durably(&b, backend).await,
            "{backend:?} after a refund"
        );
        // Concurrent reservations and refunds (batched together on SQLite).
        let calls =
            futures::future::join_all((0..16).map(|_| b.reserve(&user, &units, "convert", 1_000)))
                .await;
        futures::future::join_all(
            calls
                .into_iter()
                .map(|c| async { b.end(&c.unwrap(), End::Refund).await }),
        )
        .await;
        assert!(
            commits_durably(&b, backend).await,
            "{backend:?} after batches"
        );
        assert_eq!(b.balance(&user).await.wallet_micros, 1_000_000);
        b.assert_ok().await;
        b.close().await;
    }
}

/// The count of ledger batches run in `mode` (`set` or `per_operation`) so far, from
/// the `/metrics` text.
fn batches_run(text: &str, mode: &str) -> u64 {
    let prefix = format!("mcp_marketplace_ledger_batches_total{{mode=\"{mode}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().expect("a counter"))
}

/// Many calls in flight share one batch, which is read once, decided in memory and
/// written once (src/billing/ledger/group/bulk.rs): each call still gets the answer it
/// would get alone (a wallet covering 25 of 40 reservations, a settle sent twice at
/// once, an unknown call), and a batch holding what the set-wise form does not model
/// (two reservations with one call id) runs one operation at a time, failing only the
/// duplicate. On both backends, each running both forms.
#[tokio::test]
async fn concurrent_calls_get_the_answers_they_would_get_alone() {
    use mcp_marketplace::billing::{CallStats, Reservation};
    let metrics = mcp_marketplace::telemetry::install().expect("no other recorder in this test");
    for backend in backends() {
        let before = metrics.render();
        let b = Books::open(backend, "2026-11-16T00:00:00Z").await;
        let user = b.account("user").await;
        let creator = b.account("creator").await;
        let units = b.server(&creator, "units", "0.02_per_request").await;
        let price = 20_000;
        b.ledger.topup(&user.id, 25 * price, "grant").await.unwrap();

        let results =
            futures::future::join_all((0..40).map(|_| b.reserve(&user, &units, "convert", price)))
                .await;
        let reserved: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(BillingError::InsufficientCredits { .. })))
            .count();
        assert_eq!((reserved.len(), refused), (25, 15), "{backend:?}");
        assert_eq!(b.balance(&user).await.wallet_micros, 0);

        // Settle 15 (the first 5 twice at once), refund 10, finish an unknown call.
        let stats = CallStats {
            latency_ms: 5,
            response_bytes: 100,
        };
        let mut ends = Vec::new();
        let settles = reserved[..15].iter().chain(&reserved[..5]);
        for id in settles {
            let (ledger, id) = (b.ledger.clone(), id.clone());
            ends.push(tokio::spawn(async move {
                ("settle", ledger.settle(&id, stats).await)
            }));
        }
        let unknown = uuid::Uuid::now_v7().to_string();
        for id in reserved[15..].iter().chain([&unknown]) {
            let (ledger, id) = (b.ledger.clone(), id.clone());
            ends.push(tokio::spawn(async move {
                ("refund", ledger.refund(&id, "upstream_error", stats).await)
            }));
        }
        let mut tally = BTreeMap::new();
        for end in ends {
            let (what, result) = end.await.unwrap();
            let outcome = match result {
                Ok(_) => "ok",
                Err(BillingError::NotReserved(_)) => "not_reserved",
                Err(BillingError::UnknownCall(_)) => "unknown",
                Err(e) => panic!("{what}: {e}"),
            };
            *tally.entry((what, outcome)).or_insert(0) += 1;
        }
        assert_eq!(
            tally,
            BTreeMap::from([
                (("refund", "ok"), 10),
                (("refund", "unknown"), 1),
                (("settle", "not_reserved"), 5),
                (("settle", "ok"), 15),
            ]),
            "{backend:?}"
        );
        let balance = b.balance(&user).await;
        assert_eq!(
            (balance.wallet_micros, balance.holds_micros),
            (10 * price, 0)
        );
        assert_eq!(b.balance(&creator).await.earnings_micros, 15 * 14_000);
        let usage = b
            .ledger
            .month_usage(&user.id, month("2026-11"))
            .await
            .unwrap();
        assert_eq!((usage.calls, usage.spent_micros), (15, 15 * price));

        // Two reservations of one call id: one is written, the other fails alone.
        let twin = Reservation {
            call_id: uuid::Uuid::now_v7().to_string(),
            account_id: user.id.clone(),
            key_id: "key-user".into(),
            server_id: units.clone(),
            tool: "convert".into(),
            price_micros: price,
            fee_bps: 3000,
            hold_expires_at: i64::MAX,
            spend_limits: Vec::new(),
            request_bytes: 10,
        };
        let others = (0..6).map(|_| b.reserve(&user, &units, "convert", price));
        let (twins, others) = futures::future::join(
            futures::future::join_all([b.ledger.reserve(&twin), b.ledger.reserve(&twin)]),
            futures::future::join_all(others),
        )
        .await;
        assert_eq!(twins.iter().filter(|r| r.is_ok()).count(), 1, "{twins:?}");
        assert!(
            twins
                .iter()
                .any(|r| matches!(r, Err(BillingError::Store(_)))),
            "{twins:?}"
        );
        assert!(others.iter().all(Result::is_ok), "{others:?}");
        // That relaxed batch failed set-wise and ran again one operation at a time: the
        // connection is back in its durable mode all the same.
        assert!(commits_durably(&b, backend).await, "{backend:?}");
        let balance = b.balance(&user).await;
        assert_eq!(
            (balance.wallet_micros, balance.holds_micros),
            (3 * price, 7 * price)
        );
        b.assert_ok().await;
        // Both forms ran: set-wise batches, and the twins' one at a time.
        let after = metrics.render();
        for mode in ["set", "per_operation"] {
            assert!(
                batches_run(&after, mode) > batches_run(&before, mode),
                "{backend:?} {mode}: {after}"
            );
        }
        b.close().await;
    }
}

/// On SQLite the call path's batches run on the ledger writer's own connection while
/// top-ups (like plan fees and payouts) run in transactions of the store's pool: two
/// connections to one file, one write lock (docs/ledger.md "The ledger writer on
/// SQLite"). Run at once, none of them fails with a locked database and every micro
/// lands where it should; on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_ups_beside_the_call_batches_all_land() {
    for backend in backends() {
        let b = Books::open(backend, "2026-11-16T00:00:00Z").await;
        let user = b.account("user").await;
        let creator = b.account("creator").await;
        let units = b.server(&creator, "units", "0.02_per_request").await;
        let price = 20_000;
        b.ledger.topup(&user.id, 40 * price, "grant").await.unwrap();

        let calls = futures::future::join_all((0..40).map(|i| {
            let end = if i % 4 == 0 { End::Refund } else { End::Settle };
            b.call(&user, &units, "convert", price, end)
        }));
        let top_ups =
            futures::future::join_all((0..40).map(|_| b.ledger.topup(&user.id, 1_000, "top-up")));
        let (_, top_ups) = tokio::join!(calls, top_ups);
        for top_up in top_ups {
            top_up.expect("a top-up beside the batches");
        }

        // 30 of the 40 calls settled, 10 refunded; 40 top-ups of 1,000.
        let balance = b.balance(&user).await;
        assert_eq!(
            balance.wallet_micros,
            40 * price - 30 * price + 40 * 1_000,
            "{backend:?}"
        );
        assert_eq!(balance.holds_micros, 0, "{backend:?}");
        b.assert_ok().await;
        b.close().await;
    }
}
