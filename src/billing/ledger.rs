//! The double-entry, two-phase ledger (DESIGN.md "Ledger").
//!
//! Ledger accounts: `wallet:{account}` (never below zero, a CHECK in the schema),
//! `holds`, `earnings:{account}`, `platform:revenue`, `external:topups`,
//! `external:payouts`. A transfer is a set of entries that sum to zero, written in one
//! transaction together with the running balances it changes. Credits are positive
//! amounts, debits negative; a ledger account's balance is the sum of its entries.
//!
//! A call is billed in two phases, TigerBeetle style: `reserve` (pending) moves the
//! price from the wallet to `holds`; then exactly one of `settle` (post: holds →
//! creator earnings + platform revenue) or `refund` (void: holds → wallet). The call
//! row's status moves `reserved → settled|refunded` with a guarded UPDATE, and a unique
//! index on `(call_id, kind)` makes a second reserve, settle or refund impossible even
//! if code tried. A reservation whose hold outlived its deadline (the process died
//! mid-call) is refunded by [`Ledger::sweep_expired_holds`].

use sqlx::Row;

use crate::store::{Backend, Store, StoreError, Tx, is_check_violation, now_ms};

/// The ledger account that holds reserved money.
pub const HOLDS: &str = "holds";
/// The platform's revenue ledger account.
pub const PLATFORM_REVENUE: &str = "platform:revenue";
/// The source of money granted or paid in from outside.
pub const EXTERNAL_TOPUPS: &str = "external:topups";
/// The sink of money paid out to creators.
pub const EXTERNAL_PAYOUTS: &str = "external:payouts";

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
    /// The call was already settled or refunded (by the hold sweep, say).
    #[error("call {0} is no longer reserved")]
    NotReserved(String),
    /// No such call.
    #[error("no call {0}")]
    UnknownCall(String),
    /// An amount was zero, negative or too large.
    #[error("invalid amount: {0}")]
    InvalidAmount(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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
    /// Fees earned.
    pub revenue_micros: i64,
    /// Money held for calls in flight, all accounts together.
    pub holds_micros: i64,
}

/// The ledger over a [`Store`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Store,
}

impl Ledger {
    /// A ledger on `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Creates the wallet and earnings ledger accounts of a new account inside `tx`.
    ///
    /// # Errors
    /// [`BillingError::Store`] when the insert fails.
    pub async fn open_accounts(tx: &mut Tx, account_id: &str) -> Result<(), BillingError> {
        let now = now_ms();
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
        if amount_micros <= 0 || amount_micros > super::pricing::MAX_GRANT_MICROS {
            return Err(BillingError::InvalidAmount(format!(
                "{amount_micros} micros is not a grant between 1 and {}",
                super::pricing::MAX_GRANT_MICROS
            )));
        }
        let mut tx = self.store.begin().await?;
        let wallet = wallet_id(account_id);
        post_transfer(
            &mut tx,
            "topup",
            None,
            amount_micros,
            &[(EXTERNAL_TOPUPS, -amount_micros), (&wallet, amount_micros)],
            memo,
        )
        .await?;
        let balance = balance_of(&mut tx, &wallet).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(balance)
    }

    /// Reserves a call (DESIGN.md call path step 5): in one transaction, checks the key's
    /// spend limit, moves the price from the wallet to `holds` and writes the call row.
    /// Returns the wallet balance after the reservation, in micros.
    ///
    /// # Errors
    /// [`BillingError::InsufficientCredits`] or [`BillingError::SpendLimit`] with nothing
    /// written; [`BillingError::Store`].
    pub async fn reserve(&self, r: &Reservation) -> Result<i64, BillingError> {
        let (creator_micros, fee_micros) = super::pricing::split_price(r.price_micros, r.fee_bps);
        let now = now_ms();
        let mut tx = self.store.begin().await?;
        if !r.spend_limits.is_empty() && self.store.backend() == Backend::Postgres {
            // Serializes reservations of one key so two concurrent calls cannot both
            // pass the limit check (SQLite's single writer does this by itself).
            sqlx::query("SELECT id FROM api_keys WHERE id = $1 FOR UPDATE")
                .bind(&r.key_id)
                .execute(&mut *tx)
                .await?;
        }
        for (limit_micros, period) in &r.spend_limits {
            let since = period_start_ms(period, now);
            let spent: i64 = sqlx::query(
                "SELECT CAST(COALESCE(SUM(price_micros), 0) AS BIGINT) FROM calls \
                 WHERE key_id = $1 AND created_at >= $2 AND status <> 'refunded'",
            )
            .bind(&r.key_id)
            .bind(since)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            if spent + r.price_micros > *limit_micros {
                return Err(BillingError::SpendLimit {
                    limit_micros: *limit_micros,
                    spent_micros: spent,
                    period: period.clone(),
                });
            }
        }
        let wallet = wallet_id(&r.account_id);
        if r.price_micros > 0 {
            // The guarded debit: zero rows means the wallet cannot cover the price.
            let updated = sqlx::query(
                "UPDATE ledger_accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1",
            )
            .bind(r.price_micros)
            .bind(&wallet)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                let balance_micros = balance_of(&mut tx, &wallet).await.unwrap_or(0);
                return Err(BillingError::InsufficientCredits {
                    price_micros: r.price_micros,
                    balance_micros,
                });
            }
        }
        sqlx::query(
            "INSERT INTO calls (id, account_id, key_id, server_id, tool, price_micros, creator_micros, \
             fee_micros, status, hold_expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'reserved', $9, $10)",
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
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let transfer =
            insert_transfer(&mut tx, "reserve", Some(&r.call_id), r.price_micros, "").await?;
        // The guarded debit above already moved the wallet's balance; only holds moves here.
        write_entries(
            &mut tx,
            &transfer,
            &[(&wallet, -r.price_micros), (HOLDS, r.price_micros)],
            |account| account == HOLDS,
        )
        .await?;
        let balance = balance_of(&mut tx, &wallet).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(balance)
    }

    /// Settles a reserved call (step 7, success): holds → creator earnings (price − fee)
    /// and platform revenue (fee). Returns the payer's wallet balance afterwards.
    ///
    /// # Errors
    /// [`BillingError::NotReserved`] when the call was already settled or refunded (then
    /// nothing changes), [`BillingError::UnknownCall`], [`BillingError::Store`].
    pub async fn settle(&self, call_id: &str, latency_ms: i64) -> Result<i64, BillingError> {
        self.finish(call_id, Outcome::Settled, None, latency_ms)
            .await
    }

    /// Refunds a reserved call (step 7, failure): holds → wallet, recording `error_kind`.
    /// Returns the payer's wallet balance afterwards.
    ///
    /// # Errors
    /// As [`Ledger::settle`].
    pub async fn refund(
        &self,
        call_id: &str,
        error_kind: &str,
        latency_ms: i64,
    ) -> Result<i64, BillingError> {
        self.finish(call_id, Outcome::Refunded, Some(error_kind), latency_ms)
            .await
    }

    async fn finish(
        &self,
        call_id: &str,
        outcome: Outcome,
        error_kind: Option<&str>,
        latency_ms: i64,
    ) -> Result<i64, BillingError> {
        let mut tx = self.store.begin().await?;
        let updated = sqlx::query(
            "UPDATE calls SET status = $1, error_kind = $2, finished_at = $3, latency_ms = $4 \
             WHERE id = $5 AND status = 'reserved'",
        )
        .bind(outcome.as_str())
        .bind(error_kind)
        .bind(now_ms())
        .bind(latency_ms)
        .bind(call_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            let exists = sqlx::query("SELECT id FROM calls WHERE id = $1")
                .bind(call_id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            return Err(if exists {
                BillingError::NotReserved(call_id.to_owned())
            } else {
                BillingError::UnknownCall(call_id.to_owned())
            });
        }
        let row = sqlx::query(
            "SELECT c.account_id, c.price_micros, c.creator_micros, c.fee_micros, s.owner_account_id \
             FROM calls c JOIN servers s ON s.id = c.server_id WHERE c.id = $1",
        )
        .bind(call_id)
        .fetch_one(&mut *tx)
        .await?;
        let account_id: String = row.try_get(0)?;
        let price: i64 = row.try_get(1)?;
        let creator: i64 = row.try_get(2)?;
        let fee: i64 = row.try_get(3)?;
        let owner: String = row.try_get(4)?;
        let wallet = wallet_id(&account_id);
        match outcome {
            Outcome::Settled => {
                let earnings = earnings_id(&owner);
                post_transfer(
                    &mut tx,
                    "settle",
                    Some(call_id),
                    price,
                    &[
                        (HOLDS, -price),
                        (&earnings, creator),
                        (PLATFORM_REVENUE, fee),
                    ],
                    "",
                )
                .await?;
            }
            Outcome::Refunded => {
                post_transfer(
                    &mut tx,
                    "refund",
                    Some(call_id),
                    price,
                    &[(HOLDS, -price), (&wallet, price)],
                    error_kind.unwrap_or(""),
                )
                .await?;
            }
        }
        let balance = balance_of(&mut tx, &wallet).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(balance)
    }

    /// The balances of `account_id` in micros (wallet, its open holds, its earnings).
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn account_balance(&self, account_id: &str) -> Result<AccountBalance, BillingError> {
        let pool = self.store.pool();
        let wallet = scalar(
            pool,
            "SELECT CAST(COALESCE(MAX(balance), 0) AS BIGINT) FROM ledger_accounts WHERE id = $1",
            &wallet_id(account_id),
        )
        .await?;
        let earnings = scalar(
            pool,
            "SELECT CAST(COALESCE(MAX(balance), 0) AS BIGINT) FROM ledger_accounts WHERE id = $1",
            &earnings_id(account_id),
        )
        .await?;
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

    /// The platform's revenue and total holds, in micros.
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn platform_balance(&self) -> Result<PlatformBalance, BillingError> {
        let pool = self.store.pool();
        let q: &'static str =
            "SELECT CAST(COALESCE(MAX(balance), 0) AS BIGINT) FROM ledger_accounts WHERE id = $1";
        Ok(PlatformBalance {
            revenue_micros: scalar(pool, q, PLATFORM_REVENUE).await?,
            holds_micros: scalar(pool, q, HOLDS).await?,
        })
    }

    /// Checks every invariant of DESIGN.md "Ledger" and returns the broken ones (empty
    /// when all hold): entries sum to zero overall and per transfer; every balance equals
    /// the sum of its entries; `holds` equals the open reservations; no wallet is
    /// negative; every call has one reserve and at most one of settle/refund, matching
    /// its status.
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn verify(&self) -> Result<Vec<String>, BillingError> {
        let pool = self.store.pool();
        let mut broken = Vec::new();
        let total: i64 =
            sqlx::query("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger_entries")
                .fetch_one(pool)
                .await?
                .try_get(0)?;
        if total != 0 {
            broken.push(format!("entries sum to {total} micros, not zero"));
        }
        for row in sqlx::query(
            "SELECT transfer_id FROM ledger_entries GROUP BY transfer_id HAVING SUM(amount) <> 0",
        )
        .fetch_all(pool)
        .await?
        {
            let id: String = row.try_get(0)?;
            broken.push(format!("transfer {id} does not sum to zero"));
        }
        for row in sqlx::query(
            "SELECT a.id, a.balance, CAST(COALESCE(e.total, 0) AS BIGINT) FROM ledger_accounts a \
             LEFT JOIN (SELECT ledger_account_id, SUM(amount) AS total FROM ledger_entries \
                        GROUP BY ledger_account_id) e ON e.ledger_account_id = a.id \
             WHERE a.balance <> COALESCE(e.total, 0)",
        )
        .fetch_all(pool)
        .await?
        {
            let id: String = row.try_get(0)?;
            let balance: i64 = row.try_get(1)?;
            let sum: i64 = row.try_get(2)?;
            broken.push(format!(
                "{id}: balance {balance} but its entries sum to {sum}"
            ));
        }
        let holds = scalar(
            pool,
            "SELECT CAST(COALESCE(MAX(balance), 0) AS BIGINT) FROM ledger_accounts WHERE id = $1",
            HOLDS,
        )
        .await?;
        let open: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(price_micros), 0) AS BIGINT) FROM calls WHERE status = 'reserved'",
        )
        .fetch_one(pool)
        .await?
        .try_get(0)?;
        if holds != open {
            broken.push(format!(
                "holds is {holds} but open reservations sum to {open}"
            ));
        }
        for row in sqlx::query(
            "SELECT id, balance FROM ledger_accounts WHERE kind = 'wallet' AND balance < 0",
        )
        .fetch_all(pool)
        .await?
        {
            let id: String = row.try_get(0)?;
            let balance: i64 = row.try_get(1)?;
            broken.push(format!("{id} is negative: {balance}"));
        }
        for row in sqlx::query(
            "SELECT c.id, c.status, \
               CAST((SELECT COUNT(*) FROM ledger_transfers t WHERE t.call_id = c.id AND t.kind = 'reserve') AS BIGINT), \
               CAST((SELECT COUNT(*) FROM ledger_transfers t WHERE t.call_id = c.id AND t.kind = 'settle') AS BIGINT), \
               CAST((SELECT COUNT(*) FROM ledger_transfers t WHERE t.call_id = c.id AND t.kind = 'refund') AS BIGINT) \
             FROM calls c",
        )
        .fetch_all(pool)
        .await?
        {
            let id: String = row.try_get(0)?;
            let status: String = row.try_get(1)?;
            let (reserve, settle, refund): (i64, i64, i64) =
                (row.try_get(2)?, row.try_get(3)?, row.try_get(4)?);
            let consistent = reserve == 1
                && match status.as_str() {
                    "reserved" => settle == 0 && refund == 0,
                    "settled" => settle == 1 && refund == 0,
                    "refunded" => settle == 0 && refund == 1,
                    _ => false,
                };
            if !consistent {
                broken.push(format!(
                    "call {id} ({status}) has {reserve} reserve, {settle} settle, {refund} refund transfers"
                ));
            }
        }
        Ok(broken)
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
            match self.refund(&id, "abandoned", 0).await {
                Ok(_) => refunded += 1,
                // Finished meanwhile by the call itself: nothing to sweep.
                Err(BillingError::NotReserved(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(refunded)
    }
}

/// The start of the spend-limit period containing `now_ms` (UTC day or month), epoch ms.
fn period_start_ms(period: &str, now_ms: i64) -> i64 {
    use chrono::{Datelike, TimeZone, Utc};
    let now = Utc
        .timestamp_millis_opt(now_ms)
        .single()
        .unwrap_or_else(Utc::now);
    let day = now.date_naive();
    let start = if period == "month" {
        day.with_day(1).unwrap_or(day)
    } else {
        day
    };
    start
        .and_hms_opt(0, 0, 0)
        .map(|t| Utc.from_utc_datetime(&t).timestamp_millis())
        .unwrap_or(now_ms)
}

async fn scalar(pool: &sqlx::AnyPool, sql: &'static str, arg: &str) -> Result<i64, BillingError> {
    Ok(sqlx::query(sql)
        .bind(arg)
        .fetch_one(pool)
        .await?
        .try_get(0)?)
}

async fn balance_of(tx: &mut Tx, ledger_account: &str) -> Result<i64, BillingError> {
    Ok(
        sqlx::query("SELECT balance FROM ledger_accounts WHERE id = $1")
            .bind(ledger_account)
            .fetch_one(&mut **tx)
            .await?
            .try_get(0)?,
    )
}

/// The id of a written transfer, to attach entries to.
struct TransferId(String);

async fn insert_transfer(
    tx: &mut Tx,
    kind: &str,
    call_id: Option<&str>,
    amount: i64,
    memo: &str,
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
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(TransferId(id))
}

async fn write_entries(
    tx: &mut Tx,
    transfer: &TransferId,
    entries: &[(&str, i64)],
    update_balance: impl Fn(&str) -> bool,
) -> Result<(), BillingError> {
    debug_assert_eq!(entries.iter().map(|(_, a)| a).sum::<i64>(), 0);
    for (account, amount) in entries {
        if *amount == 0 {
            continue;
        }
        sqlx::query("INSERT INTO ledger_entries (transfer_id, ledger_account_id, amount) VALUES ($1, $2, $3)")
            .bind(&transfer.0)
            .bind(*account)
            .bind(*amount)
            .execute(&mut **tx)
            .await?;
        if update_balance(account) {
            let updated =
                sqlx::query("UPDATE ledger_accounts SET balance = balance + $1 WHERE id = $2")
                    .bind(*amount)
                    .bind(*account)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| {
                        if is_check_violation(&e) {
                            BillingError::InvalidAmount(format!("{account} would go below zero"))
                        } else {
                            BillingError::from(e)
                        }
                    })?
                    .rows_affected();
            if updated != 1 {
                return Err(BillingError::InvalidAmount(format!(
                    "no ledger account {account}"
                )));
            }
        }
    }
    Ok(())
}

/// Writes a transfer and its entries, and moves every touched balance.
async fn post_transfer(
    tx: &mut Tx,
    kind: &str,
    call_id: Option<&str>,
    amount: i64,
    entries: &[(&str, i64)],
    memo: &str,
) -> Result<(), BillingError> {
    let id = insert_transfer(tx, kind, call_id, amount, memo).await?;
    write_entries(tx, &id, entries, |_| true).await
}
