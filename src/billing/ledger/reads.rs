//! Reads of the ledger for invoices and payouts: an account's funds at an instant, its
//! wallet movements and charges in a period, a creator's earnings in a period.

use sqlx::{AnyConnection, Row};

use super::{BillingError, Ledger, earnings_id, wallet_id};

/// A wallet movement other than a call's reserve/refund, for invoices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletMovement {
    /// The transfer kind (`topup`, `subscription`, `included_credits`, `reversal`, `adjustment`).
    pub kind: String,
    /// The transfer's memo.
    pub memo: String,
    /// When (epoch ms).
    pub at: i64,
    /// The wallet entry, micros (credit > 0, debit < 0).
    pub amount: i64,
}

impl Ledger {
    /// Earnings credited to the creator by settled calls in `[from, to)` (epoch ms), micros.
    pub(crate) async fn earnings_between(
        conn: &mut AnyConnection,
        creator_id: &str,
        from: i64,
        to: i64,
    ) -> Result<i64, BillingError> {
        Ok(sqlx::query(
            "SELECT CAST(COALESCE(SUM(e.amount), 0) AS BIGINT) FROM ledger_entries e \
             JOIN ledger_transfers t ON t.id = e.transfer_id \
             WHERE e.ledger_account_id = $1 AND t.kind = 'settle' AND t.created_at >= $2 AND t.created_at < $3",
        )
        .bind(earnings_id(creator_id))
        .bind(from)
        .bind(to)
        .fetch_one(conn)
        .await?
        .try_get(0)?)
    }

    /// Accounts with earnings from calls settled before `to` (epoch ms), by id.
    pub(crate) async fn creators_before(&self, to: i64) -> Result<Vec<String>, BillingError> {
        let rows = sqlx::query(
            "SELECT DISTINCT e.ledger_account_id FROM ledger_entries e \
             JOIN ledger_transfers t ON t.id = e.transfer_id \
             WHERE t.kind = 'settle' AND t.created_at < $1 AND e.ledger_account_id LIKE 'earnings:%' \
             ORDER BY e.ledger_account_id",
        )
        .bind(to)
        .fetch_all(self.store.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(0)?;
                Ok(id.trim_start_matches("earnings:").to_owned())
            })
            .collect()
    }

    /// The account's funds at instant `t` (epoch ms): its wallet plus what it had on hold
    /// for calls in flight then, micros. An invoice's opening and closing balance.
    pub(crate) async fn funds_at(
        conn: &mut AnyConnection,
        account_id: &str,
        t: i64,
    ) -> Result<i64, BillingError> {
        let wallet: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(e.amount), 0) AS BIGINT) FROM ledger_entries e \
             JOIN ledger_transfers t ON t.id = e.transfer_id \
             WHERE e.ledger_account_id = $1 AND t.created_at < $2",
        )
        .bind(wallet_id(account_id))
        .bind(t)
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
        let held: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(price_micros), 0) AS BIGINT) FROM calls \
             WHERE account_id = $1 AND created_at < $2 AND (finished_at IS NULL OR finished_at >= $2)",
        )
        .bind(account_id)
        .bind(t)
        .fetch_one(conn)
        .await?
        .try_get(0)?;
        Ok(wallet + held)
    }

    /// The account's wallet movements in `[from, to)` other than calls' reserves and
    /// refunds (those only move money to holds and back), oldest first.
    pub(crate) async fn wallet_movements(
        conn: &mut AnyConnection,
        account_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<WalletMovement>, BillingError> {
        let rows = sqlx::query(
            "SELECT t.kind, t.memo, t.created_at, e.amount FROM ledger_entries e \
             JOIN ledger_transfers t ON t.id = e.transfer_id \
             WHERE e.ledger_account_id = $1 AND t.created_at >= $2 AND t.created_at < $3 \
             AND t.kind NOT IN ('reserve', 'refund') ORDER BY t.created_at, t.id",
        )
        .bind(wallet_id(account_id))
        .bind(from)
        .bind(to)
        .fetch_all(conn)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(WalletMovement {
                    kind: r.try_get(0)?,
                    memo: r.try_get(1)?,
                    at: r.try_get(2)?,
                    amount: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// The sum of `settle` transfers of the account's calls in `[from, to)`, micros.
    pub(crate) async fn settled_between(
        conn: &mut AnyConnection,
        account_id: &str,
        from: i64,
        to: i64,
    ) -> Result<i64, BillingError> {
        Ok(sqlx::query(
            "SELECT CAST(COALESCE(SUM(t.amount), 0) AS BIGINT) FROM ledger_transfers t \
             JOIN calls c ON c.id = t.call_id \
             WHERE t.kind = 'settle' AND c.account_id = $1 AND t.created_at >= $2 AND t.created_at < $3",
        )
        .bind(account_id)
        .bind(from)
        .bind(to)
        .fetch_one(conn)
        .await?
        .try_get(0)?)
    }

    /// Accounts that need an invoice for `[from, to)`, by name: those whose wallet moved
    /// in the period, with a call finished in it or in flight at either end, or with
    /// funds at its start (a dormant account at zero gets none).
    pub(crate) async fn accounts_to_invoice(
        conn: &mut AnyConnection,
        from: i64,
        to: i64,
    ) -> Result<Vec<String>, BillingError> {
        let rows = sqlx::query(
            "SELECT a.id FROM accounts a WHERE \
               EXISTS (SELECT 1 FROM ledger_entries e JOIN ledger_transfers t ON t.id = e.transfer_id \
                       WHERE e.ledger_account_id = 'wallet:' || a.id AND t.created_at >= $1 AND t.created_at < $2) \
               OR EXISTS (SELECT 1 FROM calls c WHERE c.account_id = a.id AND c.created_at < $2 \
                          AND (c.finished_at IS NULL OR c.finished_at >= $1)) \
               OR (SELECT COALESCE(SUM(e.amount), 0) FROM ledger_entries e JOIN ledger_transfers t ON t.id = e.transfer_id \
                   WHERE e.ledger_account_id = 'wallet:' || a.id AND t.created_at < $1) <> 0 \
             ORDER BY a.name",
        )
        .bind(from)
        .bind(to)
        .fetch_all(conn)
        .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }
}
