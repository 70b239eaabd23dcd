//! The double-entry, two-phase ledger (DESIGN.md "Ledger"). Every write to a ledger
//! table (`ledger_accounts`, `ledger_transfers`, `ledger_entries`, `calls`,
//! `usage_counters`, `key_spend_counters`) happens in a method of [`Ledger`], in one
//! transaction.
//!
//! Ledger accounts: `wallet:{account}` (never below zero, a CHECK in the schema),
//! `holds`, `earnings:{account}`, `platform:revenue`, `platform:included_credits` and
//! `platform:losses` (contra-revenue: credits the platform gives with plans, and payments
//! reversed after their credits were spent), `external:topups`, `external:payouts`. A
//! transfer is a set of entries that sum to zero, written in one transaction together
//! with the running balances it changes. Credits are positive amounts, debits negative; a
//! ledger account's balance is the sum of its entries. Transfers and entries are
//! immutable (database triggers); corrections are new transfers.
//!
//! Transfer kinds: `topup` (external → wallet: grants and Stripe payments), `reserve`,
//! `settle`, `refund` (the two phases of a call), `subscription` (wallet → revenue, a
//! plan's monthly fee), `included_credits` (platform:included_credits → wallet),
//! `reversal` (wallet, and platform:losses for what the wallet no longer holds →
//! external:topups: a refunded or disputed payment), `payout` (earnings →
//! external:payouts), `adjustment`.
//!
//! A call is billed in two phases, TigerBeetle style: `reserve` (pending) moves the
//! price from the wallet to `holds`; then exactly one of `settle` (post: holds →
//! creator earnings + platform revenue) or `refund` (void: holds → wallet). The call
//! row's status moves `reserved → settled|refunded` with a guarded UPDATE, and a unique
//! index on `(call_id, kind)` makes a second reserve, settle or refund impossible even
//! if code tried. A reservation whose hold outlived its deadline (the process died
//! mid-call) is refunded by [`Ledger::sweep_expired_holds`].
//!
//! The reserve also enforces, in the same transaction so concurrent calls cannot pass
//! them together: the key's spend limits (its counter of each limited period in
//! `key_spend_counters`, which every priced reservation of the key adds to and its
//! refund takes back from; see `count_key_spend`), the plan's monthly call quota (a
//! guarded increment of `usage_counters`), and the wallet balance (a guarded debit).
//! The debit returns the wallet's low-balance threshold with the new balance, so
//! detecting a crossing costs no extra query.
//!
//! Lock order. On PostgreSQL two transactions that lock the same rows in different
//! orders can deadlock; every transaction here locks in one order: the call row, the
//! key, the usage counter, the key's spend counters, then ledger accounts ranked
//! wallet < holds < earnings < platform < external (see [`lock_rank`];
//! `write_entries` sorts by it). The call path's batches (`group.rs`) first take one
//! advisory lock, so call rows, keys, usage counters and spend counters are only ever
//! locked by one batch at a time, and lock every ledger account they move up front, in
//! that rank order.
//!
//! The folder: this file holds the types, the money movements and their primitives;
//! `subscriptions.rs` plans and the booking of their monthly fees and credits;
//! `reads.rs` the queries invoices and payouts reconcile against; `verify.rs` `ledger
//! verify`.
//!
//! Speed. The call path's reserve, settle and refund are group-committed on both
//! backends (`group.rs`: many calls' writes in one transaction and one fsync, each call
//! answered only after its own batch committed).
//! How several replicas could reserve without a database round trip per call and never
//! overdraw (leasing slices of a wallet's balance to a replica) is designed in
//! `docs/ledger.md`.
//!
//! Time. Every transfer of one operation carries one timestamp `at` from the ledger's
//! [`Clock`], and a call's `created_at`/`finished_at` equal its reserve and settle/refund
//! transfers' times, so month boundaries cut the ledger and the usage log identically.

use std::sync::Arc;

use sqlx::{AnyConnection, Row};

use super::period::{Clock, Month, SystemClock};
use super::plans::PlanBook;
use crate::store::{Backend, Store, StoreError, Tx, is_check_violation};

mod group;
mod reads;
mod subscriptions;
mod verify;

pub use group::{MAX_BATCH, PG_MAX_BATCH};
pub use reads::WalletMovement;
pub use subscriptions::{BookedPeriod, CurrentPlan, PlanChange, PlanHistoryEntry};

/// The ledger account that holds reserved money.
pub const HOLDS: &str = "holds";
/// The platform's revenue ledger account.
pub const PLATFORM_REVENUE: &str = "platform:revenue";
/// Contra-revenue: credits the platform granted with plans (its balance is ≤ 0).
pub const PLATFORM_INCLUDED_CREDITS: &str = "platform:included_credits";
/// Contra-revenue: reversed payments whose credits were already spent (balance ≤ 0).
pub const PLATFORM_LOSSES: &str = "platform:losses";
/// The source of money granted or paid in from outside.
pub const EXTERNAL_TOPUPS: &str = "external:topups";
/// The sink of money paid out to creators.
pub const EXTERNAL_PAYOUTS: &str = "external:payouts";
/// Most server owners the ledger keeps in memory (beyond it, they are read each time).
const MAX_CACHED_OWNERS: usize = 100_000;
/// Micros in one US cent: payouts are whole cents.
pub const CENT_MICROS: i64 = 10_000;

/// The wallet ledger account of `account_id`.
pub fn wallet_id(account_id: &str) -> String {
    format!("wallet:{account_id}")
}

/// The earnings ledger account of `account_id`.
pub fn earnings_id(account_id: &str) -> String {
    format!("earnings:{account_id}")
}

/// Errors of the billing domain.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The wallet cannot cover the price (amounts in micros).
    #[error(
        "insufficient credits: the call costs {price_micros} micros, the wallet holds {balance_micros}"
    )]
    InsufficientCredits {
        /// The call's price.
        price_micros: i64,
        /// The wallet's balance at the time.
        balance_micros: i64,
    },
    /// The key's spend limit for the period cannot cover the price (micros).
    #[error("spend limit reached: {spent_micros} of {limit_micros} micros spent this {period}")]
    SpendLimit {
        /// The key's limit per period.
        limit_micros: i64,
        /// Spent (settled or held) in the current period.
        spent_micros: i64,
        /// `day` or `month`.
        period: String,
    },
    /// The plan's monthly call quota is used up.
    #[error("the {plan} plan's quota of {quota} calls this month is used up")]
    QuotaExceeded {
        /// The plan's name.
        plan: String,
        /// Calls allowed per month.
        quota: i64,
        /// When the quota resets (the next month's start, epoch ms).
        resets_at_ms: i64,
    },
    /// The call was already settled or refunded (by the hold sweep, say).
    #[error("call {0} is no longer reserved")]
    NotReserved(String),
    /// No such call.
    #[error("no call {0}")]
    UnknownCall(String),
    /// An amount was zero, negative or too large.
    #[error("invalid amount: {0}")]
    InvalidAmount(String),
    /// No plan of that id is configured.
    #[error("no plan '{0}' (see `billing plans list`)")]
    UnknownPlan(String),
    /// A request that cannot be carried out as asked (the message says why).
    #[error("{0}")]
    Invalid(String),
    /// The month has not ended long enough ago to be closed.
    #[error("{month} cannot be closed before {closable_at}")]
    MonthOpen {
        /// The month.
        month: String,
        /// When it may be closed (RFC 3339).
        closable_at: String,
    },
    /// The month is not closed yet.
    #[error("{0} is not closed yet; run `billing close --month {0}` first")]
    MonthNotClosed(String),
    /// The stored data contradict each other (a bug or tampering; `ledger verify` says more).
    #[error("the ledger does not reconcile: {0}")]
    Unreconciled(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The group commit holding this operation failed as a whole (see `group.rs`):
    /// nothing of it was written.
    #[error("ledger commit failed: {0}")]
    Commit(String),
}

impl From<sqlx::Error> for BillingError {
    fn from(err: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(err))
    }
}

/// What a reservation writes: one `calls` row and one `reserve` transfer.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// The call's UUIDv7.
    pub call_id: String,
    /// The paying account's id.
    pub account_id: String,
    /// The API key used.
    pub key_id: String,
    /// The server called.
    pub server_id: String,
    /// The upstream tool name (not namespaced).
    pub tool: String,
    /// The price in micros (0 for free tools and for the server's own owner).
    pub price_micros: i64,
    /// The platform fee in basis points.
    pub fee_bps: u32,
    /// When the hold may be swept as abandoned (epoch ms).
    pub hold_expires_at: i64,
    /// The key's spend limits `(micros, "day"|"month")`, each checked.
    pub spend_limits: Vec<(i64, String)>,
    /// Size of the call's arguments as JSON, bytes (the usage log's bytes in).
    pub request_bytes: i64,
}

/// How a call ended, for the usage log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Time from forwarding to the answer, ms.
    pub latency_ms: i64,
    /// Size of the result returned to the client as JSON (before the receipt), bytes.
    pub response_bytes: i64,
}

/// The final state of a call after settle or refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Charged: holds → earnings + revenue.
    Settled,
    /// Not charged: holds → wallet.
    Refunded,
}

impl Outcome {
    /// `settled` or `refunded`, as in receipts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Settled => "settled",
            Self::Refunded => "refunded",
        }
    }
}

/// The balances of one account, in micros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AccountBalance {
    /// Spendable credits.
    pub wallet_micros: i64,
    /// Reserved for calls in flight.
    pub holds_micros: i64,
    /// Creator earnings not yet paid out.
    pub earnings_micros: i64,
}

/// The platform's balances, in micros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PlatformBalance {
    /// Fees earned (platform fees on calls and plan fees).
    pub revenue_micros: i64,
    /// Money held for calls in flight, all accounts together.
    pub holds_micros: i64,
    /// Credits granted with plans (≤ 0).
    pub included_credits_micros: i64,
    /// Reversed payments the wallets could no longer cover (≤ 0).
    pub losses_micros: i64,
}

/// An account's calls and spend in one UTC month (reserved or settled; refunded calls
/// are taken back), from `usage_counters`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MonthUsage {
    /// Calls counted against the quota.
    pub calls: i64,
    /// Their prices, micros.
    pub spent_micros: i64,
}

/// An account's low-balance settings and state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LowBalance {
    /// The threshold in micros; `None` = no alert.
    pub threshold_micros: Option<i64>,
    /// True from an alert until a credit from outside lifts the wallet over the threshold.
    pub alerted: bool,
}

/// The ledger over a [`Store`], with the [`Clock`] it stamps transfers with and the
/// configured plans. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Store,
    clock: Arc<dyn Clock>,
    plans: Arc<PlanBook>,
    /// The group commit of the call path's writes, shared by clones.
    group: Arc<group::GroupCommit>,
    /// Server id → owner account id (immutable facts), shared by clones.
    owners: Arc<dashmap::DashMap<String, String>>,
}

impl Ledger {
    /// A ledger on `store` with the system clock and the built-in plans.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            clock: Arc::new(SystemClock),
            plans: Arc::new(PlanBook::builtin()),
            group: Arc::default(),
            owners: Arc::default(),
        }
    }

    /// The same ledger reading time from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The same ledger with the configured `plans`.
    pub fn with_plans(mut self, plans: Arc<PlanBook>) -> Self {
        self.plans = plans;
        self
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configured plans.
    pub fn plans(&self) -> &PlanBook {
        &self.plans
    }

    /// The ledger's current time, epoch ms.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Creates the wallet and earnings ledger accounts of a new account inside `tx`.
    ///
    /// # Errors
    /// [`BillingError::Store`] when the insert fails.
    pub async fn open_accounts(tx: &mut Tx<'_>, account_id: &str) -> Result<(), BillingError> {
        let now = crate::store::now_ms();
        for (id, kind) in [
            (wallet_id(account_id), "wallet"),
            (earnings_id(account_id), "earnings"),
        ] {
            sqlx::query(
                "INSERT INTO ledger_accounts (id, kind, balance, created_at) VALUES ($1, $2, 0, $3) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(id)
            .bind(kind)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// Grants `amount_micros` (> 0, at most [`super::pricing::MAX_GRANT_MICROS`]) to the
    /// account's wallet: a `topup` transfer from `external:topups`. Returns the new
    /// wallet balance in micros.
    ///
    /// # Errors
    /// [`BillingError::InvalidAmount`], or [`BillingError::Store`].
    pub async fn topup(
        &self,
        account_id: &str,
        amount_micros: i64,
        memo: &str,
    ) -> Result<i64, BillingError> {
        let mut tx = self.store.begin().await?;
        self.credit_wallet_in(&mut tx, account_id, amount_micros, memo, self.now_ms())
            .await?;
        let balance = balance_of(&mut tx, &wallet_id(account_id)).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(balance)
    }

    /// Books a `topup` of `amount_micros` into the account's wallet inside `tx` (a grant
    /// or a paid top-up) and re-arms its low-balance alert. Returns the transfer id.
    pub(crate) async fn credit_wallet_in(
        &self,
        tx: &mut Tx<'_>,
        account_id: &str,
        amount_micros: i64,
        memo: &str,
        at: i64,
    ) -> Result<String, BillingError> {
        if amount_micros <= 0 || amount_micros > super::pricing::MAX_GRANT_MICROS {
            return Err(BillingError::InvalidAmount(format!(
                "{amount_micros} micros is not a grant between 1 and {}",
                super::pricing::MAX_GRANT_MICROS
            )));
        }
        let wallet = wallet_id(account_id);
        let id = post_transfer(
            tx,
            "topup",
            None,
            amount_micros,
            &[(EXTERNAL_TOPUPS, -amount_micros), (&wallet, amount_micros)],
            memo,
            at,
        )
        .await?;
        rearm_low_balance(tx, &wallet).await?;
        Ok(id)
    }

    /// Reserves a call (DESIGN.md call path step 5): in one transaction, checks the key's
    /// spend limit and the plan's monthly quota, moves the price from the wallet to
    /// `holds` and writes the call row; records a low-balance alert when this debit takes
    /// the wallet below its threshold. Returns the wallet balance after the reservation,
    /// in micros.
    ///
    /// # Errors
    /// [`BillingError::InsufficientCredits`], [`BillingError::SpendLimit`] or
    /// [`BillingError::QuotaExceeded`] with nothing written; [`BillingError::Store`].
    pub async fn reserve(&self, r: &Reservation) -> Result<i64, BillingError> {
        let at = self.now_ms();
        self.group
            .submit(self.clone(), group::Op::Reserve(r.clone()), at)
            .await
    }

    /// The reservation of [`Ledger::reserve`] inside `tx`, stamped `at` (epoch ms).
    async fn reserve_in(
        &self,
        tx: &mut Tx<'_>,
        r: &Reservation,
        at: i64,
    ) -> Result<i64, BillingError> {
        let (creator_micros, fee_micros) = super::pricing::split_price(r.price_micros, r.fee_bps);
        let month = Month::of_ms(at);
        if !r.spend_limits.is_empty() && self.store.backend() == Backend::Postgres {
            // Serializes reservations of one key so two concurrent calls cannot both
            // pass the limit check (SQLite's single writer does this by itself).
            sqlx::query("SELECT id FROM api_keys WHERE id = $1 FOR UPDATE")
                .bind(&r.key_id)
                .execute(&mut **tx)
                .await?;
        }
        for (limit_micros, period) in &r.spend_limits {
            let spent = key_spent(tx, &r.key_id, period, at).await?;
            if spent + r.price_micros > *limit_micros {
                return Err(BillingError::SpendLimit {
                    limit_micros: *limit_micros,
                    spent_micros: spent,
                    period: period.clone(),
                });
            }
        }
        // The quota: a guarded increment of this month's counter (an upsert whose update
        // only happens under the quota), so concurrent calls cannot pass it together.
        let plan = self.plan_in_effect(tx, &r.account_id, at).await?.plan;
        let quota = plan.monthly_calls.unwrap_or(i64::MAX);
        let counted = if quota <= 0 {
            None
        } else {
            sqlx::query(
                "INSERT INTO usage_counters (account_id, month, calls, spent_micros) VALUES ($1, $2, 1, $3) \
                 ON CONFLICT (account_id, month) DO UPDATE \
                 SET calls = usage_counters.calls + 1, spent_micros = usage_counters.spent_micros + $3 \
                 WHERE usage_counters.calls < $4 RETURNING calls",
            )
            .bind(&r.account_id)
            .bind(month.to_string())
            .bind(r.price_micros)
            .bind(quota)
            .fetch_optional(&mut **tx)
            .await?
        };
        if counted.is_none() {
            return Err(BillingError::QuotaExceeded {
                plan: plan.name.clone(),
                quota,
                resets_at_ms: month.end_ms(),
            });
        }
        // The key's spend counters, before the ledger accounts (the lock order); a later
        // refusal rolls them back with the rest.
        let limited: Vec<&str> = r
            .spend_limits
            .iter()
            .map(|(_, p)| spend_period(p))
            .collect();
        count_key_spend(tx, &r.key_id, &limited, at, r.price_micros).await?;
        let wallet = wallet_id(&r.account_id);
        let balance = if r.price_micros > 0 {
            debit_wallet(tx, &r.account_id, r.price_micros, at, Some(&r.call_id)).await?
        } else {
            balance_of(tx, &wallet).await?
        };
        sqlx::query(
            "INSERT INTO calls (id, account_id, key_id, server_id, tool, price_micros, creator_micros, \
             fee_micros, status, hold_expires_at, created_at, request_bytes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'reserved', $9, $10, $11)",
        )
        .bind(&r.call_id)
        .bind(&r.account_id)
        .bind(&r.key_id)
        .bind(&r.server_id)
        .bind(&r.tool)
        .bind(r.price_micros)
        .bind(creator_micros)
        .bind(fee_micros)
        .bind(r.hold_expires_at)
        .bind(at)
        .bind(r.request_bytes.max(0))
        .execute(&mut **tx)
        .await?;
        let transfer =
            insert_transfer(tx, "reserve", Some(&r.call_id), r.price_micros, "", at).await?;
        // The guarded debit above already moved the wallet's balance; only holds moves here.
        write_entries(
            tx,
            &transfer,
            &[(&wallet, -r.price_micros), (HOLDS, r.price_micros)],
            |account| account == HOLDS,
        )
        .await?;
        Ok(balance)
    }

    /// Settles a reserved call (step 7, success): holds → creator earnings (price − fee)
    /// and platform revenue (fee), and completes its usage-log row with `stats`. Returns
    /// the payer's wallet balance afterwards.
    ///
    /// # Errors
    /// [`BillingError::NotReserved`] when the call was already settled or refunded (then
    /// nothing changes), [`BillingError::UnknownCall`], [`BillingError::Store`].
    pub async fn settle(&self, call_id: &str, stats: CallStats) -> Result<i64, BillingError> {
        self.finish(call_id, Outcome::Settled, None, stats).await
    }

    /// Refunds a reserved call (step 7, failure): holds → wallet, recording `error_kind`,
    /// and takes the call back from the month's quota count. Returns the payer's wallet
    /// balance afterwards.
    ///
    /// # Errors
    /// As [`Ledger::settle`].
    pub async fn refund(
        &self,
        call_id: &str,
        error_kind: &str,
        stats: CallStats,
    ) -> Result<i64, BillingError> {
        self.finish(call_id, Outcome::Refunded, Some(error_kind), stats)
            .await
    }

    async fn finish(
        &self,
        call_id: &str,
        outcome: Outcome,
        error_kind: Option<&str>,
        stats: CallStats,
    ) -> Result<i64, BillingError> {
        let at = self.now_ms();
        let op = group::Op::Finish {
            call_id: call_id.to_owned(),
            outcome,
            error_kind: error_kind.map(str::to_owned),
            stats,
        };
        self.group.submit(self.clone(), op, at).await
    }

    /// The settle or refund of [`Ledger::finish`] inside `tx`, stamped `at` (epoch ms).
    async fn finish_in(
        &self,
        tx: &mut Tx<'_>,
        call_id: &str,
        outcome: Outcome,
        error_kind: Option<&str>,
        stats: CallStats,
        at: i64,
    ) -> Result<i64, BillingError> {
        let row = sqlx::query(
            "UPDATE calls SET status = $1, error_kind = $2, finished_at = $3, latency_ms = $4, \
             response_bytes = $5 WHERE id = $6 AND status = 'reserved' \
             RETURNING account_id, price_micros, creator_micros, fee_micros, server_id, created_at, \
             key_id",
        )
        .bind(outcome.as_str())
        .bind(error_kind)
        .bind(at)
        .bind(stats.latency_ms.max(0))
        .bind(stats.response_bytes.max(0))
        .bind(call_id)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else {
            let exists = sqlx::query("SELECT id FROM calls WHERE id = $1")
                .bind(call_id)
                .fetch_optional(&mut **tx)
                .await?
                .is_some();
            return Err(if exists {
                BillingError::NotReserved(call_id.to_owned())
            } else {
                BillingError::UnknownCall(call_id.to_owned())
            });
        };
        let account_id: String = row.try_get(0)?;
        let price: i64 = row.try_get(1)?;
        let creator: i64 = row.try_get(2)?;
        let fee: i64 = row.try_get(3)?;
        let server_id: String = row.try_get(4)?;
        let created_at: i64 = row.try_get(5)?;
        let key_id: String = row.try_get(6)?;
        let wallet = wallet_id(&account_id);
        match outcome {
            Outcome::Settled => {
                let owner = self.owner_of(tx, &server_id).await?;
                let earnings = earnings_id(&owner);
                post_transfer(
                    tx,
                    "settle",
                    Some(call_id),
                    price,
                    &[
                        (HOLDS, -price),
                        (&earnings, creator),
                        (PLATFORM_REVENUE, fee),
                    ],
                    "",
                    at,
                )
                .await?;
            }
            Outcome::Refunded => {
                // A refunded call does not count against the quota of the month it was made in.
                sqlx::query(
                    "UPDATE usage_counters SET calls = calls - 1, spent_micros = spent_micros - $1 \
                     WHERE account_id = $2 AND month = $3",
                )
                .bind(price)
                .bind(&account_id)
                .bind(Month::of_ms(created_at).to_string())
                .execute(&mut **tx)
                .await?;
                // Nor against its key's spend limits.
                count_key_spend(tx, &key_id, &SPEND_PERIODS, created_at, -price).await?;
                post_transfer(
                    tx,
                    "refund",
                    Some(call_id),
                    price,
                    &[(HOLDS, -price), (&wallet, price)],
                    error_kind.unwrap_or(""),
                    at,
                )
                .await?;
            }
        }
        balance_of(tx, &wallet).await
    }

    /// The owner account of `server_id`, whose earnings a settled call credits. A
    /// server's owner never changes (no statement updates `servers.owner_account_id`),
    /// so it is read once per server and kept.
    async fn owner_of(&self, tx: &mut Tx<'_>, server_id: &str) -> Result<String, BillingError> {
        if let Some(owner) = self.owners.get(server_id) {
            return Ok(owner.clone());
        }
        let owner: String = sqlx::query("SELECT owner_account_id FROM servers WHERE id = $1")
            .bind(server_id)
            .fetch_one(&mut **tx)
            .await?
            .try_get(0)?;
        if self.owners.len() < MAX_CACHED_OWNERS {
            self.owners.insert(server_id.to_owned(), owner.clone());
        }
        Ok(owner)
    }

    /// The balances of `account_id` in micros (wallet, its open holds, its earnings).
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn account_balance(&self, account_id: &str) -> Result<AccountBalance, BillingError> {
        let pool = self.store.pool();
        let wallet = scalar(pool, BALANCE_SQL, &wallet_id(account_id)).await?;
        let earnings = scalar(pool, BALANCE_SQL, &earnings_id(account_id)).await?;
        let holds = scalar(
            pool,
            "SELECT CAST(COALESCE(SUM(price_micros), 0) AS BIGINT) FROM calls \
             WHERE account_id = $1 AND status = 'reserved'",
            account_id,
        )
        .await?;
        Ok(AccountBalance {
            wallet_micros: wallet,
            holds_micros: holds,
            earnings_micros: earnings,
        })
    }

    /// The platform's balances, in micros.
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn platform_balance(&self) -> Result<PlatformBalance, BillingError> {
        let pool = self.store.pool();
        Ok(PlatformBalance {
            revenue_micros: scalar(pool, BALANCE_SQL, PLATFORM_REVENUE).await?,
            holds_micros: scalar(pool, BALANCE_SQL, HOLDS).await?,
            included_credits_micros: scalar(pool, BALANCE_SQL, PLATFORM_INCLUDED_CREDITS).await?,
            losses_micros: scalar(pool, BALANCE_SQL, PLATFORM_LOSSES).await?,
        })
    }

    /// The account's calls and spend counted in `month` (what the quota sees).
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn month_usage(
        &self,
        account_id: &str,
        month: Month,
    ) -> Result<MonthUsage, BillingError> {
        let row = sqlx::query(
            "SELECT calls, spent_micros FROM usage_counters WHERE account_id = $1 AND month = $2",
        )
        .bind(account_id)
        .bind(month.to_string())
        .fetch_optional(self.store.pool())
        .await?;
        Ok(match row {
            Some(r) => MonthUsage {
                calls: r.try_get(0)?,
                spent_micros: r.try_get(1)?,
            },
            None => MonthUsage::default(),
        })
    }

    /// What a key spent (settled or held) in its current spend-limit period (`day` or
    /// `month`, UTC), micros: its spend counter, kept only for the periods the key
    /// limits (0 for another).
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn key_spend(&self, key_id: &str, period: &str) -> Result<i64, BillingError> {
        let mut conn = self.store.pool().acquire().await?;
        key_spent(&mut conn, key_id, period, self.now_ms()).await
    }

    // ---- Low-balance alerts ---------------------------------------------------------

    /// Sets (or with `None` removes) the account's low-balance threshold, micros, and
    /// re-arms its alert.
    ///
    /// # Errors
    /// [`BillingError::InvalidAmount`] for a negative threshold,
    /// [`BillingError::Invalid`] for an unknown account, [`BillingError::Store`].
    pub async fn set_low_balance(
        &self,
        account_id: &str,
        threshold_micros: Option<i64>,
    ) -> Result<(), BillingError> {
        if threshold_micros.is_some_and(|t| !(0..=super::pricing::MAX_GRANT_MICROS).contains(&t)) {
            return Err(BillingError::InvalidAmount(
                "a low-balance threshold is between 0 and 1000000 USD".into(),
            ));
        }
        let updated = sqlx::query(
            "UPDATE ledger_accounts SET low_balance_micros = $1, low_balance_alerted = 0 WHERE id = $2",
        )
        .bind(threshold_micros)
        .bind(wallet_id(account_id))
        .execute(self.store.pool())
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(BillingError::Invalid("no such account".into()));
        }
        Ok(())
    }

    /// The account's low-balance threshold and alert state.
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn low_balance(&self, account_id: &str) -> Result<LowBalance, BillingError> {
        let row = sqlx::query(
            "SELECT low_balance_micros, low_balance_alerted FROM ledger_accounts WHERE id = $1",
        )
        .bind(wallet_id(account_id))
        .fetch_optional(self.store.pool())
        .await?;
        Ok(match row {
            Some(r) => LowBalance {
                threshold_micros: r.try_get(0)?,
                alerted: r.try_get::<i64, _>(1)? == 1,
            },
            None => LowBalance::default(),
        })
    }

    // ---- Payouts and payments (their domains keep their own tables) ---------------------

    /// Locks the creator's earnings row until `tx` ends (PostgreSQL; SQLite's single
    /// writer serializes anyway) and returns its balance, micros.
    pub(crate) async fn lock_earnings(
        &self,
        tx: &mut Tx<'_>,
        creator_id: &str,
    ) -> Result<i64, BillingError> {
        let id = earnings_id(creator_id);
        lock_ledger_account(tx, self.store.backend(), &id).await?;
        balance_of(tx, &id).await
    }

    /// Books a payout of `amount_micros` (whole cents) inside `tx`: earnings →
    /// `external:payouts`. Returns the transfer id.
    pub(crate) async fn book_payout_in(
        &self,
        tx: &mut Tx<'_>,
        creator_id: &str,
        amount_micros: i64,
        memo: &str,
        at: i64,
    ) -> Result<String, BillingError> {
        if amount_micros <= 0 || amount_micros % CENT_MICROS != 0 {
            return Err(BillingError::InvalidAmount(format!(
                "a payout is a positive number of whole cents, not {amount_micros} micros"
            )));
        }
        let earnings = earnings_id(creator_id);
        post_transfer(
            tx,
            "payout",
            None,
            amount_micros,
            &[
                (&earnings, -amount_micros),
                (EXTERNAL_PAYOUTS, amount_micros),
            ],
            memo,
            at,
        )
        .await
        .map_err(|e| match e {
            BillingError::InvalidAmount(_) => BillingError::Unreconciled(format!(
                "{earnings} cannot pay out {amount_micros} micros"
            )),
            other => other,
        })
    }

    /// Books the reversal of `amount_micros` of a payment inside `tx` (a refund or a
    /// dispute at the payment provider): the wallet gives back what it holds, up to the
    /// amount, and `platform:losses` the rest; both go to `external:topups`. Returns the
    /// transfer id and the loss, micros.
    pub(crate) async fn reverse_payment_in(
        &self,
        tx: &mut Tx<'_>,
        account_id: &str,
        amount_micros: i64,
        memo: &str,
        at: i64,
    ) -> Result<(String, i64), BillingError> {
        if amount_micros <= 0 {
            return Err(BillingError::InvalidAmount(format!(
                "a reversal is positive, not {amount_micros} micros"
            )));
        }
        let wallet = wallet_id(account_id);
        lock_ledger_account(tx, self.store.backend(), &wallet).await?;
        let balance = balance_of(tx, &wallet).await?;
        let from_wallet = balance.min(amount_micros);
        let loss = amount_micros - from_wallet;
        if from_wallet > 0 {
            debit_wallet(tx, account_id, from_wallet, at, None).await?;
        }
        let id = insert_transfer(tx, "reversal", None, amount_micros, memo, at).await?;
        write_entries(
            tx,
            &id,
            &[
                (&wallet, -from_wallet),
                (PLATFORM_LOSSES, -loss),
                (EXTERNAL_TOPUPS, amount_micros),
            ],
            |a| a != wallet,
        )
        .await?;
        Ok((id.0, loss))
    }

    /// Refunds every reservation whose hold expired before `now_ms` (a crash between
    /// reserve and settle left it), with error kind `abandoned`. Returns how many.
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn sweep_expired_holds(&self, now_ms: i64) -> Result<usize, BillingError> {
        let rows =
            sqlx::query("SELECT id FROM calls WHERE status = 'reserved' AND hold_expires_at < $1")
                .bind(now_ms)
                .fetch_all(self.store.pool())
                .await?;
        let mut refunded = 0;
        for row in rows {
            let id: String = row.try_get(0)?;
            match self.refund(&id, "abandoned", CallStats::default()).await {
                Ok(_) => refunded += 1,
                // Finished meanwhile by the call itself: nothing to sweep.
                Err(BillingError::NotReserved(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(refunded)
    }
}

const BALANCE_SQL: &str =
    "SELECT CAST(COALESCE(MAX(balance), 0) AS BIGINT) FROM ledger_accounts WHERE id = $1";

/// The spend-limit periods, as `key_spend_counters.period` names them.
const SPEND_PERIODS: [&str; 2] = ["day", "month"];

/// The period a spend limit names, as `key_spend_counters` stores it: `month`, else
/// `day` (as [`period_start_ms`] reads it; keys store only these two).
fn spend_period(period: &str) -> &'static str {
    if period == "month" { "month" } else { "day" }
}

/// The start of the spend-limit period containing `now_ms` (UTC day or month), epoch ms.
fn period_start_ms(period: &str, now_ms: i64) -> i64 {
    if period == "month" {
        return Month::of_ms(now_ms).start_ms();
    }
    now_ms - now_ms.rem_euclid(86_400_000)
}

/// What `key_id` spent in the spend-limit `period` (`day`|`month`) containing `at`
/// (epoch ms), micros: its counter in `key_spend_counters` (none yet: nothing).
async fn key_spent(
    conn: &mut AnyConnection,
    key_id: &str,
    period: &str,
    at: i64,
) -> Result<i64, BillingError> {
    let row = sqlx::query(
        "SELECT spent_micros FROM key_spend_counters \
         WHERE key_id = $1 AND period = $2 AND period_start = $3",
    )
    .bind(key_id)
    .bind(spend_period(period))
    .bind(period_start_ms(period, at))
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some(row) => row.try_get(0)?,
        None => 0,
    })
}

/// Adds `delta` micros to the spend counters of `key_id` for `periods` (`day`, `month`)
/// containing `made_at`, the call's `created_at` (epoch ms).
///
/// The rule (migration 0011): a priced reservation adds its price to its key's counter
/// of each period the key limits, creating it if new; its refund takes the price back
/// from the counters of the call's day and month that exist. A key's limits are fixed
/// when it is created (`auth::keys::create_key`), so a counter holds every
/// non-refunded price of its key in its period, and a key without limits costs its
/// calls no counter write. A negative delta only lowers existing counters, and never
/// below zero: a refund must not fail over a limit's bookkeeping (a counter that
/// drifted from its calls is `ledger verify`'s to report).
///
/// # Errors
/// [`BillingError::Store`].
async fn count_key_spend(
    tx: &mut Tx<'_>,
    key_id: &str,
    periods: &[&str],
    made_at: i64,
    delta: i64,
) -> Result<(), BillingError> {
    for &period in periods {
        let sql = if delta > 0 {
            "INSERT INTO key_spend_counters (key_id, period, period_start, spent_micros) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (key_id, period, period_start) \
             DO UPDATE SET spent_micros = key_spend_counters.spent_micros + $4"
        } else if delta < 0 {
            "UPDATE key_spend_counters \
             SET spent_micros = CASE WHEN spent_micros + $4 < 0 THEN 0 ELSE spent_micros + $4 END \
             WHERE key_id = $1 AND period = $2 AND period_start = $3"
        } else {
            return Ok(());
        };
        sqlx::query(sql)
            .bind(key_id)
            .bind(period)
            .bind(period_start_ms(period, made_at))
            .bind(delta)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// The guarded debit of a wallet: moves `amount` out only if the wallet holds it, and
/// records a low-balance alert when the debit crosses the wallet's threshold (once: the
/// alert stays set until a credit from outside lifts the balance back over it). Returns
/// the new balance; the caller writes the entry.
///
/// # Errors
/// [`BillingError::InsufficientCredits`] with nothing changed.
async fn debit_wallet(
    tx: &mut Tx<'_>,
    account_id: &str,
    amount: i64,
    at: i64,
    call_id: Option<&str>,
) -> Result<i64, BillingError> {
    let wallet = wallet_id(account_id);
    let row = sqlx::query(
        "UPDATE ledger_accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1 \
         RETURNING balance, low_balance_micros, low_balance_alerted",
    )
    .bind(amount)
    .bind(&wallet)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        let balance_micros = balance_of(tx, &wallet).await.unwrap_or(0);
        return Err(BillingError::InsufficientCredits {
            price_micros: amount,
            balance_micros,
        });
    };
    let balance: i64 = row.try_get(0)?;
    let threshold: Option<i64> = row.try_get(1)?;
    let alerted: i64 = row.try_get(2)?;
    if let Some(threshold) = threshold
        && balance < threshold
        && alerted == 0
    {
        let first = sqlx::query(
            "UPDATE ledger_accounts SET low_balance_alerted = 1 WHERE id = $1 AND low_balance_alerted = 0",
        )
        .bind(&wallet)
        .execute(&mut **tx)
        .await?
        .rows_affected()
            == 1;
        if first {
            sqlx::query(
                "INSERT INTO balance_alerts (id, account_id, kind, threshold_micros, balance_micros, call_id, created_at) \
                 VALUES ($1, $2, 'low_balance', $3, $4, $5, $6)",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(account_id)
            .bind(threshold)
            .bind(balance)
            .bind(call_id)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(balance)
}

/// Re-arms the low-balance alert of `wallet` once a credit from outside lifted it to
/// its threshold or above (a call's refund does not re-arm it, so a balance hovering at
/// the threshold alerts once).
async fn rearm_low_balance(tx: &mut Tx<'_>, wallet: &str) -> Result<(), BillingError> {
    sqlx::query(
        "UPDATE ledger_accounts SET low_balance_alerted = 0 \
         WHERE id = $1 AND low_balance_alerted = 1 AND balance >= low_balance_micros",
    )
    .bind(wallet)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Locks a ledger account's row until the transaction ends (PostgreSQL `FOR UPDATE`;
/// SQLite has one writer, so nothing to do).
async fn lock_ledger_account(
    tx: &mut Tx<'_>,
    backend: Backend,
    id: &str,
) -> Result<(), BillingError> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT id FROM ledger_accounts WHERE id = $1 FOR UPDATE")
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn scalar(pool: &sqlx::AnyPool, sql: &'static str, arg: &str) -> Result<i64, BillingError> {
    Ok(sqlx::query(sql)
        .bind(arg)
        .fetch_one(pool)
        .await?
        .try_get(0)?)
}

async fn balance_of(conn: &mut AnyConnection, ledger_account: &str) -> Result<i64, BillingError> {
    Ok(
        sqlx::query("SELECT balance FROM ledger_accounts WHERE id = $1")
            .bind(ledger_account)
            .fetch_one(conn)
            .await?
            .try_get(0)?,
    )
}

fn is_foreign_key_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| c == "23503" || c == "787")
                || db.message().contains("FOREIGN KEY constraint failed")
        }
        _ => false,
    }
}

/// The id of a written transfer, to attach entries to.
struct TransferId(String);

async fn insert_transfer(
    tx: &mut Tx<'_>,
    kind: &str,
    call_id: Option<&str>,
    amount: i64,
    memo: &str,
    at: i64,
) -> Result<TransferId, BillingError> {
    let id = uuid::Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO ledger_transfers (id, kind, call_id, amount, memo, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(kind)
    .bind(call_id)
    .bind(amount)
    .bind(memo)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(TransferId(id))
}

/// The place of a ledger account in the lock order: wallets, then holds, then
/// earnings, then the platform's accounts, then the external ones (the PostgreSQL
/// batch read in `group/bulk.rs` sorts its `FOR UPDATE` by the same ranks, in SQL). Every transaction
/// that moves several balances moves them in this order, so two can never wait on each
/// other in a cycle (PostgreSQL would abort one as a deadlock).
pub fn lock_rank(ledger_account: &str) -> u8 {
    if ledger_account.starts_with("wallet:") {
        0
    } else if ledger_account == HOLDS {
        1
    } else if ledger_account.starts_with("earnings:") {
        2
    } else if ledger_account.starts_with("platform:") {
        3
    } else {
        4
    }
}

async fn write_entries(
    tx: &mut Tx<'_>,
    transfer: &TransferId,
    entries: &[(&str, i64)],
    update_balance: impl Fn(&str) -> bool,
) -> Result<(), BillingError> {
    debug_assert_eq!(entries.iter().map(|(_, a)| a).sum::<i64>(), 0);
    let mut ordered: Vec<&(&str, i64)> = entries.iter().filter(|(_, a)| *a != 0).collect();
    ordered.sort_by_key(|(account, _)| (lock_rank(account), *account));
    if ordered.is_empty() {
        return Ok(());
    }
    // One statement for all entries (a transfer has two or three).
    let mut sql =
        String::from("INSERT INTO ledger_entries (transfer_id, ledger_account_id, amount) VALUES ");
    for i in 0..ordered.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("($1, ${}, ${})", 2 * i + 2, 2 * i + 3));
    }
    // Only placeholders are spliced in; every value is bound.
    let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&transfer.0);
    for (account, amount) in &ordered {
        insert = insert.bind(*account).bind(*amount);
    }
    insert.execute(&mut **tx).await?;
    let moved: Vec<&(&str, i64)> = ordered
        .into_iter()
        .filter(|(account, _)| update_balance(account))
        .collect();
    if tx.backend_name() == "SQLite" && moved.len() > 1 {
        // SQLite has one writer, so no lock order to keep: one statement moves them all.
        let mut sql = String::from("UPDATE ledger_accounts SET balance = balance + CASE id");
        for i in 0..moved.len() {
            sql.push_str(&format!(" WHEN ${} THEN ${}", 2 * i + 1, 2 * i + 2));
        }
        sql.push_str(" END WHERE id IN (");
        for i in 0..moved.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", 2 * i + 1));
        }
        sql.push(')');
        let mut update = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (account, amount) in &moved {
            update = update.bind(*account).bind(*amount);
        }
        let updated = update
            .execute(&mut **tx)
            .await
            .map_err(|e| balance_error(e, "a ledger account"))?
            .rows_affected();
        if updated != moved.len() as u64 {
            return Err(BillingError::InvalidAmount(
                "a ledger account of the transfer does not exist".into(),
            ));
        }
        return Ok(());
    }
    // PostgreSQL: one row at a time, in the lock order (see `lock_rank`).
    for (account, amount) in moved {
        let updated =
            sqlx::query("UPDATE ledger_accounts SET balance = balance + $1 WHERE id = $2")
                .bind(*amount)
                .bind(*account)
                .execute(&mut **tx)
                .await
                .map_err(|e| balance_error(e, account))?
                .rows_affected();
        if updated != 1 {
            return Err(BillingError::InvalidAmount(format!(
                "no ledger account {account}"
            )));
        }
    }
    Ok(())
}

fn balance_error(e: sqlx::Error, account: &str) -> BillingError {
    if is_check_violation(&e) {
        BillingError::InvalidAmount(format!("{account} would go below zero"))
    } else {
        BillingError::from(e)
    }
}

/// Writes a transfer and its entries, and moves every touched balance. Returns its id.
async fn post_transfer(
    tx: &mut Tx<'_>,
    kind: &str,
    call_id: Option<&str>,
    amount: i64,
    entries: &[(&str, i64)],
    memo: &str,
    at: i64,
) -> Result<String, BillingError> {
    let id = insert_transfer(tx, kind, call_id, amount, memo, at).await?;
    write_entries(tx, &id, entries, |_| true).await?;
    Ok(id.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_order_puts_wallets_first_and_external_last() {
        let mut accounts = vec![
            EXTERNAL_TOPUPS,
            PLATFORM_REVENUE,
            "earnings:a",
            HOLDS,
            "wallet:b",
        ];
        accounts.sort_by_key(|a| (lock_rank(a), *a));
        assert_eq!(
            accounts,
            vec![
                "wallet:b",
                HOLDS,
                "earnings:a",
                PLATFORM_REVENUE,
                EXTERNAL_TOPUPS
            ]
        );
    }

    #[test]
    fn spend_limit_periods_start_at_utc_midnight_and_month_start() {
        let t = super::super::period::parse_instant("2026-11-15T13:45:00Z").unwrap();
        assert_eq!(
            period_start_ms("day", t),
            super::super::period::parse_instant("2026-11-15").unwrap()
        );
        assert_eq!(
            period_start_ms("month", t),
            super::super::period::parse_instant("2026-11").unwrap()
        );
    }
}
