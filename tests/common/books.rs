//! Billing at the ledger level with a manual clock: accounts, servers and calls placed
//! at chosen instants (to cross month boundaries), on a real SQLite file or PostgreSQL.

use std::collections::BTreeMap;
use std::sync::Arc;

use mcp_marketplace::auth::accounts::{Account, create_account};
use mcp_marketplace::billing::ledger::{AccountBalance, PlatformBalance};
use mcp_marketplace::billing::period::{Clock, ManualClock, parse_instant};
use mcp_marketplace::billing::plans::{PlanBook, PlanFile, QuotaSetting};
use mcp_marketplace::billing::{BillingError, CallStats, Ledger, Reservation};
use mcp_marketplace::catalog::{Catalog, NewServer};
use mcp_marketplace::security::EndpointPolicy;
use mcp_marketplace::store::Store;
use sqlx::Row;

use super::{Backend, TestDb};

/// A ledger on a fresh database whose clock the test moves.
pub struct Books {
    pub db: TestDb,
    pub store: Store,
    pub ledger: Ledger,
    pub clock: Arc<ManualClock>,
    pub catalog: Catalog,
}

/// How a test call ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Settle,
    Refund,
    /// Left reserved (in flight).
    Open,
}

impl Books {
    /// Books at instant `start` (RFC 3339) with the built-in plans.
    pub async fn open(backend: Backend, start: &str) -> Self {
        Self::open_with(backend, start, PlanBook::builtin()).await
    }

    pub async fn open_with(backend: Backend, start: &str, plans: PlanBook) -> Self {
        let db = TestDb::new(backend).await;
        let store = Store::connect(&db.url).await.expect("store");
        let clock = Arc::new(ManualClock::new(ms(start)));
        let ledger = Ledger::new(store.clone())
            .with_clock(clock.clone())
            .with_plans(Arc::new(plans));
        Self {
            catalog: Catalog::new(store.clone()),
            db,
            store,
            ledger,
            clock,
        }
    }

    /// Moves the clock to `instant` (RFC 3339).
    pub fn at(&self, instant: &str) {
        self.clock.set(ms(instant));
    }

    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    pub async fn account(&self, name: &str) -> Account {
        create_account(&self.store, name).await.expect("account")
    }

    pub async fn account_named(&self, name: &str) -> Account {
        mcp_marketplace::auth::accounts::find_account(&self.store, name)
            .await
            .expect("account")
    }

    pub async fn server_id(&self, slug: &str) -> String {
        self.catalog.get(slug).await.expect("server").id
    }

    /// Registers a server of `owner` priced `pricing`; returns its id.
    pub async fn server(&self, owner: &Account, slug: &str, pricing: &str) -> String {
        let new = NewServer {
            name: slug.to_owned(),
            slug: Some(slug.to_owned()),
            endpoints: vec![format!("http://127.0.0.1:9/{slug}")],
            pricing: pricing.to_owned(),
            ..NewServer::default()
        };
        let policy = EndpointPolicy::new(
            vec!["127.0.0.1".into()],
            std::sync::Arc::new(mcp_marketplace::security::ssrf::StaticLookup::new(None)),
        );
        self.catalog
            .register(&owner.id, &new, &policy)
            .await
            .expect("register")
            .0
            .id
    }

    /// Reserves a call now with the 30 % fee.
    pub async fn reserve(
        &self,
        payer: &Account,
        server_id: &str,
        tool: &str,
        price: i64,
    ) -> Result<String, BillingError> {
        self.reserve_with(payer, server_id, tool, price, 3000).await
    }

    pub async fn reserve_with(
        &self,
        payer: &Account,
        server_id: &str,
        tool: &str,
        price: i64,
        fee_bps: u32,
    ) -> Result<String, BillingError> {
        self.reserve_under(payer, server_id, tool, price, fee_bps, &[])
            .await
    }

    /// Reserves a call now by the payer's key (`key-{name}`) under its spend `limits`
    /// (`(micros, "day"|"month")`).
    pub async fn reserve_under(
        &self,
        payer: &Account,
        server_id: &str,
        tool: &str,
        price: i64,
        fee_bps: u32,
        limits: &[(i64, &str)],
    ) -> Result<String, BillingError> {
        let call_id = uuid::Uuid::now_v7().to_string();
        self.ledger
            .reserve(&Reservation {
                call_id: call_id.clone(),
                account_id: payer.id.clone(),
                key_id: format!("key-{}", payer.name),
                server_id: server_id.to_owned(),
                tool: tool.to_owned(),
                price_micros: price,
                fee_bps,
                hold_expires_at: i64::MAX,
                spend_limits: limits.iter().map(|(m, p)| (*m, (*p).to_owned())).collect(),
                request_bytes: 10,
            })
            .await?;
        Ok(call_id)
    }

    /// A whole call now: reserve, then settle or refund (or leave it open).
    pub async fn call(
        &self,
        payer: &Account,
        server_id: &str,
        tool: &str,
        price: i64,
        end: End,
    ) -> String {
        let id = self
            .reserve(payer, server_id, tool, price)
            .await
            .expect("reserve");
        self.end(&id, end).await;
        id
    }

    pub async fn end(&self, call_id: &str, end: End) {
        let stats = CallStats {
            latency_ms: 5,
            response_bytes: 100,
        };
        match end {
            End::Settle => {
                self.ledger.settle(call_id, stats).await.expect("settle");
            }
            End::Refund => {
                self.ledger
                    .refund(call_id, "upstream_error", stats)
                    .await
                    .expect("refund");
            }
            End::Open => {}
        }
    }

    pub async fn balance(&self, a: &Account) -> AccountBalance {
        self.ledger.account_balance(&a.id).await.expect("balance")
    }

    pub async fn platform(&self) -> PlatformBalance {
        self.ledger.platform_balance().await.expect("platform")
    }

    pub async fn assert_ok(&self) {
        let broken = self.ledger.verify().await.expect("verify");
        assert!(broken.is_empty(), "ledger invariants broken: {broken:?}");
    }

    /// Row counts and balances that a refused operation must leave as they were.
    pub async fn snapshot(&self) -> Vec<i64> {
        let mut out = Vec::new();
        for q in [
            "SELECT CAST(COUNT(*) AS BIGINT) FROM ledger_transfers",
            "SELECT CAST(COUNT(*) AS BIGINT) FROM ledger_entries",
            "SELECT CAST(COUNT(*) AS BIGINT) FROM calls",
            "SELECT CAST(COUNT(*) AS BIGINT) FROM account_plans",
            "SELECT CAST(COUNT(*) AS BIGINT) FROM subscription_periods",
            "SELECT CAST(COUNT(*) AS BIGINT) FROM payouts",
            "SELECT CAST(COUNT(*) AS BIGINT) FROM invoices",
            "SELECT CAST(COALESCE(SUM(calls), 0) AS BIGINT) FROM usage_counters",
            "SELECT CAST(COUNT(*) AS BIGINT) FROM key_spend_counters",
            "SELECT CAST(COALESCE(SUM(spent_micros), 0) AS BIGINT) FROM key_spend_counters",
            "SELECT CAST(COALESCE(SUM(ABS(balance)), 0) AS BIGINT) FROM ledger_accounts",
        ] {
            out.push(
                sqlx::query(q)
                    .fetch_one(self.store.pool())
                    .await
                    .expect("snapshot")
                    .try_get::<i64, _>(0)
                    .expect("count"),
            );
        }
        out
    }

    pub async fn close(self) {
        self.store.close().await;
    }
}

/// Epoch ms of an RFC 3339 instant, a day or a month.
pub fn ms(instant: &str) -> i64 {
    parse_instant(instant).expect("a test instant")
}

/// The built-in plans with Free limited to `calls` calls a month.
pub fn plans_with_free_quota(calls: i64) -> PlanBook {
    let files = BTreeMap::from([(
        "free".to_owned(),
        PlanFile {
            monthly_calls: Some(QuotaSetting::Number(calls)),
            ..PlanFile::default()
        },
    )]);
    PlanBook::from_config(&files, None).expect("test plans")
}
