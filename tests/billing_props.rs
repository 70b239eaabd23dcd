//! Property tests of the ledger under concurrency, on SQLite and PostgreSQL: random
//! rounds of top-ups, calls (settled, refunded or left in flight), plan changes, alert
//! thresholds and payouts, each round run by 2–3 concurrent tasks; between rounds the
//! clock moves (sometimes across a month's end, which renews plans and closes the month).
//! Buyer 1's key has a daily and a monthly spend limit. After every round `ledger
//! verify` finds nothing broken, no wallet is negative, no operation fails other than by
//! the refusals a user can see, no day or month of buyer 1's calls costs more than its
//! limit, and money is neither created nor lost: what the external accounts hold is
//! exactly what came in by top-ups and went out by payouts.
//!
//! Cases are few and short so CI stays fast (`PROPTEST_CASES` overrides: 24 on SQLite,
//! 10 on PostgreSQL, where each case makes a database). A failure prints the shrunk case,
//! and proptest saves its seed in `billing_props.proptest-regressions` to replay it first.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};

use common::books::{Books, End, ms};
use common::{Backend, backends};
use mcp_marketplace::billing::invoices::{self, CLOSE_GRACE_MS};
use mcp_marketplace::billing::payouts::{self, PayoutMethod};
use mcp_marketplace::billing::plans::{PlanBook, PlanFile, QuotaSetting, UsdSetting};
use mcp_marketplace::billing::{BillingError, Month};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use sqlx::Row;

/// Prices of the three servers, micros: an ordinary call, a tiny one (the fee rounds
/// down to zero), a dear one.
const PRICES: [i64; 3] = [20_000, 7, 330_000];
/// Top-up amounts, micros.
const TOPUPS: [i64; 3] = [50_000, 300_000, 2_000_000];
const PLANS: [&str; 3] = ["free", "pro", "max"];
/// Buyer 1's spend limits, micros: two dear calls a day, four a month.
const LIMITS: [(i64, &str); 2] = [(700_000, "day"), (1_400_000, "month")];

#[derive(Debug, Clone)]
enum Op {
    Topup {
        buyer: usize,
        amount: usize,
    },
    Call {
        buyer: usize,
        server: usize,
        end: u8,
    },
    Plan {
        buyer: usize,
        plan: usize,
        next_month: bool,
    },
    Alert {
        buyer: usize,
    },
    Payout,
}

#[derive(Debug, Clone)]
struct Round {
    tasks: Vec<Vec<Op>>,
    advance_hours: u32,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, 0..3usize).prop_map(|(buyer, amount)| Op::Topup { buyer, amount }),
        8 => (0..2usize, 0..3usize, 0..3u8).prop_map(|(buyer, server, end)| Op::Call { buyer, server, end }),
        2 => (0..2usize, 0..3usize, any::<bool>()).prop_map(|(buyer, plan, next_month)| Op::Plan { buyer, plan, next_month }),
        1 => (0..2usize).prop_map(|buyer| Op::Alert { buyer }),
        2 => Just(Op::Payout),
    ]
}

fn rounds() -> impl Strategy<Value = Vec<Round>> {
    let round = (
        prop::collection::vec(prop::collection::vec(op(), 1..6), 2..4),
        prop_oneof![2 => 0..48u32, 1 => 300..800u32],
    )
        .prop_map(|(tasks, advance_hours)| Round {
            tasks,
            advance_hours,
        });
    prop::collection::vec(round, 1..5)
}

fn plans() -> PlanBook {
    let plan = |fee: &str, credits: &str, calls: Option<i64>| PlanFile {
        monthly_fee: Some(UsdSetting::Text(fee.into())),
        included_credits: Some(UsdSetting::Text(credits.into())),
        monthly_calls: Some(match calls {
            Some(n) => QuotaSetting::Number(n),
            None => QuotaSetting::Text("unlimited".into()),
        }),
        ..PlanFile::default()
    };
    let files = BTreeMap::from([
        ("free".to_owned(), plan("0", "0", Some(8))),
        ("pro".to_owned(), plan("0.30", "0.20", Some(20))),
        ("max".to_owned(), plan("1.00", "1.50", None)),
    ]);
    PlanBook::from_config(&files, None).expect("test plans")
}

/// No UTC day or month of buyer 1's (`key-b1`) non-refunded calls costs more than its
/// limit in [`LIMITS`], reckoned from the calls themselves.
async fn within_limits(b: &Books) -> Result<(), TestCaseError> {
    let mut months: BTreeMap<Month, i64> = BTreeMap::new();
    for row in sqlx::query(
        "SELECT created_at - created_at % 86400000, CAST(SUM(price_micros) AS BIGINT) FROM calls \
         WHERE key_id = 'key-b1' AND status <> 'refunded' GROUP BY created_at - created_at % 86400000",
    )
    .fetch_all(b.store.pool())
    .await
    .expect("daily spend")
    {
        let (day, spent): (i64, i64) = (row.get(0), row.get(1));
        check(spent <= LIMITS[0].0, || format!("key-b1 spent {spent} on day {day}"))?;
        *months.entry(Month::of_ms(day)).or_default() += spent;
    }
    for (month, spent) in months {
        check(spent <= LIMITS[1].0, || {
            format!("key-b1 spent {spent} in {month}")
        })?;
    }
    Ok(())
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if ok {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

/// A refusal a user can see is part of the game; anything else fails the case.
fn expected(r: Result<(), BillingError>) -> Result<(), TestCaseError> {
    match r {
        Ok(())
        | Err(BillingError::InsufficientCredits { .. })
        | Err(BillingError::QuotaExceeded { .. })
        | Err(BillingError::SpendLimit { .. })
        | Err(BillingError::Invalid(_)) => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!("unexpected error: {e}"))),
    }
}

async fn run_case(backend: Backend, rounds: Vec<Round>) -> Result<(), TestCaseError> {
    let b = Books::open_with(backend, "2026-11-20T00:00:00Z", plans()).await;
    let buyers = [b.account("b0").await, b.account("b1").await];
    let creators = [b.account("c0").await, b.account("c1").await];
    let servers = [
        b.server(&creators[0], "s0", "0.02_per_request").await,
        b.server(&creators[1], "s1", "0.000007_per_request").await,
        b.server(&creators[0], "s2", "0.33_per_request").await,
    ];
    payouts::set_payee(
        &b.ledger,
        &creators[0].id,
        PayoutMethod::Paypal,
        "c0@example.com",
    )
    .await
    .expect("payee");
    let topped = AtomicI64::new(0);
    let paid_out = AtomicI64::new(0);
    let mut last_closed: Option<Month> = None;

    for round in rounds {
        let last = last_closed;
        let tasks = round.tasks.iter().map(|ops| {
            let (b, buyers, servers, topped, paid_out) =
                (&b, &buyers, &servers, &topped, &paid_out);
            async move {
                for op in ops {
                    b.clock.advance(1);
                    match *op {
                        Op::Topup { buyer, amount } => {
                            b.ledger
                                .topup(&buyers[buyer].id, TOPUPS[amount], "grant")
                                .await
                                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                            topped.fetch_add(TOPUPS[amount], Ordering::SeqCst);
                        }
                        Op::Call { buyer, server, end } => {
                            let limits: &[(i64, &str)] = if buyer == 1 { &LIMITS } else { &[] };
                            let reserved = b
                                .reserve_under(
                                    &buyers[buyer],
                                    &servers[server],
                                    "t",
                                    PRICES[server],
                                    3000,
                                    limits,
                                )
                                .await;
                            match reserved {
                                Ok(id) => {
                                    let end = [End::Settle, End::Refund, End::Open][end as usize];
                                    b.end(&id, end).await;
                                }
                                Err(e) => expected(Err(e))?,
                            }
                        }
                        Op::Plan {
                            buyer,
                            plan,
                            next_month,
                        } => {
                            let at = next_month.then(|| Month::of_ms(b.now()).end_ms());
                            expected(
                                b.ledger
                                    .change_plan(&buyers[buyer].id, PLANS[plan], at)
                                    .await
                                    .map(|_| ()),
                            )?;
                        }
                        Op::Alert { buyer } => {
                            b.ledger
                                .set_low_balance(&buyers[buyer].id, Some(100_000))
                                .await
                                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        }
                        Op::Payout => {
                            if let Some(m) = last {
                                let run = payouts::run(&b.ledger, m, 50_000)
                                    .await
                                    .map_err(|e| TestCaseError::fail(format!("payouts: {e}")))?;
                                let new: i64 = run
                                    .payouts
                                    .iter()
                                    .filter(|p| p.new)
                                    .map(|p| p.amount_micros)
                                    .sum();
                                paid_out.fetch_add(new, Ordering::SeqCst);
                            }
                        }
                    }
                }
                Ok::<(), TestCaseError>(())
            }
        });
        for r in futures::future::join_all(tasks).await {
            r?;
        }

        // Between rounds: time moves on, never landing within a minute of a month's end
        // (a round's operations must not straddle it), renewals run, ended months close.
        let mut next = b.now() + i64::from(round.advance_hours) * 3_600_000;
        let end = Month::of_ms(next).end_ms();
        if next > end - 60_000 {
            next = end + CLOSE_GRACE_MS + 1_000;
        }
        let start = Month::of_ms(next).start_ms();
        if next < start + CLOSE_GRACE_MS + 1_000 {
            next = start + CLOSE_GRACE_MS + 1_000;
        }
        b.clock.set(next);
        b.ledger
            .renew_subscriptions()
            .await
            .map_err(|e| TestCaseError::fail(format!("renewal: {e}")))?;
        let mut m = last_closed.map_or(Month::of_ms(ms("2026-11-01")), Month::next);
        while m.end_ms() + CLOSE_GRACE_MS <= b.now() {
            invoices::close_month(&b.ledger, m)
                .await
                .map_err(|e| TestCaseError::fail(format!("close {m}: {e}")))?;
            last_closed = Some(m);
            m = m.next();
        }

        let broken = b.ledger.verify().await.expect("verify");
        check(broken.is_empty(), || format!("{backend:?}: {broken:?}"))?;
        within_limits(&b).await?;
    }

    // Money is neither created nor lost.
    let balances: Vec<(String, i64)> = sqlx::query("SELECT id, balance FROM ledger_accounts")
        .fetch_all(b.store.pool())
        .await
        .expect("balances")
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
        .collect();
    let of = |id: &str| {
        balances
            .iter()
            .find(|(a, _)| a == id)
            .map_or(0, |(_, v)| *v)
    };
    let inside: i64 = balances
        .iter()
        .filter(|(id, _)| !id.starts_with("external:"))
        .map(|(_, v)| v)
        .sum();
    let (topped, paid_out) = (
        topped.load(Ordering::SeqCst),
        paid_out.load(Ordering::SeqCst),
    );
    check(of("external:topups") == -topped, || {
        format!(
            "external:topups is {} after {topped} of top-ups",
            of("external:topups")
        )
    })?;
    check(of("external:payouts") == paid_out, || {
        format!(
            "external:payouts is {} after {paid_out} paid out",
            of("external:payouts")
        )
    })?;
    check(inside == topped - paid_out, || {
        format!("{inside} inside the marketplace, but {topped} came in and {paid_out} went out")
    })?;
    check(
        balances
            .iter()
            .all(|(id, v)| !id.starts_with("wallet:") || *v >= 0),
        || format!("a negative wallet: {balances:?}"),
    )?;
    b.close().await;
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(24),
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_ledger_reconciles_under_concurrent_billing_on_sqlite(rounds in rounds()) {
        runtime().block_on(run_case(Backend::Sqlite, rounds))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(10),
        max_shrink_iters: 16,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_ledger_reconciles_under_concurrent_billing_on_postgres(rounds in rounds()) {
        if backends().contains(&Backend::Postgres) {
            runtime().block_on(run_case(Backend::Postgres, rounds))?;
        }
    }
}
