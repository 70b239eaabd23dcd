//! Accounts: the tenants that own keys, a wallet and earnings (DESIGN.md "Words").

use sqlx::Row;

use crate::billing::Ledger;
use crate::store::{Store, StoreError, is_unique_violation, now_ms};

/// Longest account name, in characters.
pub const MAX_ACCOUNT_NAME_LEN: usize = 64;

/// Errors of account handling.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// Not 1–64 characters of `[A-Za-z0-9._-]`.
    #[error("invalid account name '{0}': use 1-64 characters of letters, digits, '.', '_' or '-'")]
    InvalidName(String),
    /// The name is taken.
    #[error("an account named '{0}' already exists")]
    Exists(String),
    /// No such account.
    #[error("no account named '{0}'")]
    Unknown(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for AccountError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

impl From<crate::billing::BillingError> for AccountError {
    fn from(e: crate::billing::BillingError) -> Self {
        match e {
            crate::billing::BillingError::Store(s) => Self::Store(s),
            other => Self::Store(StoreError::Database(sqlx::Error::Protocol(
                other.to_string(),
            ))),
        }
    }
}

/// An account.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Account {
    /// UUIDv7.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Creation time, epoch ms.
    pub created_at: i64,
}

/// Creates an account with its wallet and earnings ledger accounts, in one transaction.
///
/// # Errors
/// [`AccountError::InvalidName`], [`AccountError::Exists`], [`AccountError::Store`].
pub async fn create_account(store: &Store, name: &str) -> Result<Account, AccountError> {
    if name.is_empty()
        || name.chars().count() > MAX_ACCOUNT_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(AccountError::InvalidName(name.to_owned()));
    }
    let account = Account {
        id: uuid::Uuid::now_v7().to_string(),
        name: name.to_owned(),
        created_at: now_ms(),
    };
    let mut tx = store.begin().await?;
    sqlx::query("INSERT INTO accounts (id, name, created_at) VALUES ($1, $2, $3)")
        .bind(&account.id)
        .bind(&account.name)
        .bind(account.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                AccountError::Exists(name.to_owned())
            } else {
                e.into()
            }
        })?;
    Ledger::open_accounts(&mut tx, &account.id).await?;
    tx.commit().await?;
    Ok(account)
}

/// Finds an account by name.
///
/// # Errors
/// [`AccountError::Unknown`], [`AccountError::Store`].
pub async fn find_account(store: &Store, name: &str) -> Result<Account, AccountError> {
    let row = sqlx::query("SELECT id, name, created_at FROM accounts WHERE name = $1")
        .bind(name)
        .fetch_optional(store.pool())
        .await?
        .ok_or_else(|| AccountError::Unknown(name.to_owned()))?;
    Ok(Account {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        created_at: row.try_get(2)?,
    })
}
