//! Trust policies: per-server, per-account and per-key overrides of the configured
//! defaults (rate limits, concurrency cap, scan mode, redaction), kept in the
//! `trust_policies` table and set with `mcp-marketplace policy set`.
//!
//! How one call's effective policy is decided ([`Effective::resolve`], the rules also
//! in README.md):
//!
//! - per account per server: the account's override, else the account's
//!   [`AccountLimitSource`] (a plan), else the server's override, else the default;
//! - per account and per key: the account's override (the key's own for per key), else
//!   the source, else the default;
//! - concurrency cap: the server's override, else the default;
//! - scan mode: the strictest of the server's and the account's overrides when either
//!   is set (`off` < `flag` < `block`), else the default; so either side can ask for
//!   more scrutiny and `off` needs nobody asking for more;
//! - redaction: the server's paths and the key's paths together.
//!
//! Which field each subject may set: a server `per_account_per_server`,
//! `max_concurrency`, `scan`, `redact`; an account the three rates and `scan`; a key
//! `per_key` and `redact`.

use serde_json::Value;
use sqlx::Row;

use super::ratelimit::{AccountLimits, Limits, Rate, RateError};
use super::redact::{self, RedactError};
use super::scan::{ScanMode, ScanModeError};
use crate::store::{Store, StoreError, now_ms};

/// What a policy belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind {
    /// A server (by id).
    Server,
    /// An account (by id).
    Account,
    /// An API key (by id).
    Key,
}

impl SubjectKind {
    /// `server`, `account` or `key`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Account => "account",
            Self::Key => "key",
        }
    }
}

/// Errors of policy handling.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A rate that does not parse.
    #[error(transparent)]
    Rate(#[from] RateError),
    /// A scan mode that does not parse.
    #[error(transparent)]
    Scan(#[from] ScanModeError),
    /// A bad redaction path.
    #[error(transparent)]
    Redact(#[from] RedactError),
    /// A field this kind of subject cannot set.
    #[error("a {0} policy cannot set {1}")]
    NotApplicable(&'static str, &'static str),
    /// A concurrency cap outside 1–10 000.
    #[error("max_concurrency must be between 1 and 10000")]
    Concurrency,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for PolicyError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

/// The overrides of one subject; `None` (or an empty `redact`) inherits.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Policy {
    /// Rate per account per server.
    pub per_account_per_server: Option<Rate>,
    /// Rate per account overall.
    pub per_account: Option<Rate>,
    /// Rate per key.
    pub per_key: Option<Rate>,
    /// Most concurrent calls to a server.
    pub max_concurrency: Option<u32>,
    /// Scan mode.
    pub scan: Option<ScanMode>,
    /// Redaction paths (RFC 9535 JSONPath).
    pub redact: Vec<String>,
}

impl Policy {
    /// Checks the fields against what `kind` may set, the concurrency range and the
    /// redaction paths.
    ///
    /// # Errors
    /// [`PolicyError::NotApplicable`], [`PolicyError::Concurrency`],
    /// [`PolicyError::Redact`].
    pub fn validate(&self, kind: SubjectKind) -> Result<(), PolicyError> {
        let k = kind.as_str();
        let set = [
            (
                "per_account_per_server",
                self.per_account_per_server.is_some(),
            ),
            ("per_account", self.per_account.is_some()),
            ("per_key", self.per_key.is_some()),
            ("max_concurrency", self.max_concurrency.is_some()),
            ("scan", self.scan.is_some()),
            ("redact", !self.redact.is_empty()),
        ];
        let allowed: &[&str] = match kind {
            SubjectKind::Server => &[
                "per_account_per_server",
                "max_concurrency",
                "scan",
                "redact",
            ],
            SubjectKind::Account => &["per_account_per_server", "per_account", "per_key", "scan"],
            SubjectKind::Key => &["per_key", "redact"],
        };
        if let Some((field, _)) = set.iter().find(|(f, on)| *on && !allowed.contains(f)) {
            return Err(PolicyError::NotApplicable(k, field));
        }
        if self
            .max_concurrency
            .is_some_and(|c| !(1..=10_000).contains(&c))
        {
            return Err(PolicyError::Concurrency);
        }
        redact::validate(&self.redact)?;
        Ok(())
    }
}

/// The configured defaults the overrides replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    /// Rate limits.
    pub limits: Limits,
    /// Concurrency cap per server.
    pub max_concurrency: u32,
    /// Scan mode.
    pub scan: ScanMode,
}

/// The policy that applies to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    /// Rate limits.
    pub limits: Limits,
    /// Concurrency cap of the server.
    pub max_concurrency: u32,
    /// Scan mode.
    pub scan: ScanMode,
    /// Redaction paths.
    pub redact: Vec<String>,
}

impl Effective {
    /// Applies the rules of the module docs.
    pub fn resolve(
        defaults: &Defaults,
        server: &Policy,
        account: &Policy,
        key: &Policy,
        source: &AccountLimits,
    ) -> Self {
        let d = &defaults.limits;
        let limits = Limits {
            per_account_per_server: account
                .per_account_per_server
                .or(source.per_account_per_server)
                .or(server.per_account_per_server)
                .unwrap_or(d.per_account_per_server),
            per_account: account
                .per_account
                .or(source.per_account)
                .unwrap_or(d.per_account),
            per_key: key
                .per_key
                .or(account.per_key)
                .or(source.per_key)
                .unwrap_or(d.per_key),
        };
        let scan = match (server.scan, account.scan) {
            (None, None) => defaults.scan,
            (a, b) => a.max(b).unwrap_or(defaults.scan),
        };
        let mut redact = server.redact.clone();
        redact.extend(key.redact.iter().cloned());
        Self {
            limits,
            max_concurrency: server.max_concurrency.unwrap_or(defaults.max_concurrency),
            scan,
            redact,
        }
    }
}

/// The policies of the subjects of one call.
#[derive(Debug, Clone, Default)]
pub struct CallSubjects {
    /// The server's.
    pub server: Policy,
    /// The account's.
    pub account: Policy,
    /// The key's.
    pub key: Policy,
}

fn parse_row(row: &sqlx::any::AnyRow) -> Result<Policy, PolicyError> {
    let rate = |i: usize| -> Result<Option<Rate>, PolicyError> {
        Ok(row
            .try_get::<Option<String>, _>(i)?
            .map(|s| s.parse())
            .transpose()?)
    };
    let redact: Option<String> = row.try_get(7)?;
    let redact = redact
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| serde_json::from_value::<Vec<String>>(v).ok())
        .unwrap_or_default();
    Ok(Policy {
        per_account_per_server: rate(2)?,
        per_account: rate(3)?,
        per_key: rate(4)?,
        max_concurrency: row
            .try_get::<Option<i64>, _>(5)?
            .and_then(|c| u32::try_from(c).ok()),
        scan: row
            .try_get::<Option<String>, _>(6)?
            .map(|s| s.parse())
            .transpose()?,
        redact,
    })
}

/// The `trust_policies` table. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Policies {
    store: Store,
}

impl Policies {
    /// Policies on `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The overrides of one subject (all inherit when it has none).
    ///
    /// # Errors
    /// [`PolicyError::Store`].
    pub async fn get(&self, kind: SubjectKind, id: &str) -> Result<Policy, PolicyError> {
        let row = sqlx::query(
            "SELECT subject_kind, subject_id, per_account_per_server, per_account, per_key, \
             max_concurrency, scan_mode, redact FROM trust_policies WHERE subject_kind = $1 AND subject_id = $2",
        )
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(self.store.pool())
        .await?;
        row.as_ref()
            .map(parse_row)
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// Replaces the overrides of one subject with `policy` (validated first); an
    /// all-inherit policy removes the row.
    ///
    /// # Errors
    /// As [`Policy::validate`], [`PolicyError::Store`].
    pub async fn set(
        &self,
        kind: SubjectKind,
        id: &str,
        policy: &Policy,
    ) -> Result<(), PolicyError> {
        policy.validate(kind)?;
        if *policy == Policy::default() {
            sqlx::query("DELETE FROM trust_policies WHERE subject_kind = $1 AND subject_id = $2")
                .bind(kind.as_str())
                .bind(id)
                .execute(self.store.pool())
                .await?;
            self.store
                .versions()
                .invalidate(crate::store::versions::Domain::Auth);
            return Ok(());
        }
        let redact = (!policy.redact.is_empty())
            .then(|| serde_json::to_string(&policy.redact).unwrap_or_default());
        sqlx::query(
            "INSERT INTO trust_policies (subject_kind, subject_id, per_account_per_server, per_account, per_key, \
             max_concurrency, scan_mode, redact, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (subject_kind, subject_id) DO UPDATE SET per_account_per_server = EXCLUDED.per_account_per_server, \
             per_account = EXCLUDED.per_account, per_key = EXCLUDED.per_key, max_concurrency = EXCLUDED.max_concurrency, \
             scan_mode = EXCLUDED.scan_mode, redact = EXCLUDED.redact, updated_at = EXCLUDED.updated_at",
        )
        .bind(kind.as_str())
        .bind(id)
        .bind(policy.per_account_per_server.map(|r| r.to_string()))
        .bind(policy.per_account.map(|r| r.to_string()))
        .bind(policy.per_key.map(|r| r.to_string()))
        .bind(policy.max_concurrency.map(i64::from))
        .bind(policy.scan.map(|s| s.as_str().to_owned()))
        .bind(redact)
        .bind(now_ms())
        .execute(self.store.pool())
        .await?;
        self.store
            .versions()
            .invalidate(crate::store::versions::Domain::Auth);
        Ok(())
    }

    /// The policies of a call's server (when it is an upstream's), account and key, in
    /// one query.
    ///
    /// # Errors
    /// [`PolicyError::Store`].
    pub async fn for_call(
        &self,
        server_id: Option<&str>,
        account_id: &str,
        key_id: &str,
    ) -> Result<CallSubjects, PolicyError> {
        let rows = sqlx::query(
            "SELECT subject_kind, subject_id, per_account_per_server, per_account, per_key, \
             max_concurrency, scan_mode, redact FROM trust_policies WHERE \
             (subject_kind = 'server' AND subject_id = $1) OR (subject_kind = 'account' AND subject_id = $2) \
             OR (subject_kind = 'key' AND subject_id = $3)",
        )
        .bind(server_id.unwrap_or(""))
        .bind(account_id)
        .bind(key_id)
        .fetch_all(self.store.pool())
        .await?;
        let mut out = CallSubjects::default();
        for row in &rows {
            let policy = parse_row(row)?;
            match row.try_get::<String, _>(0)?.as_str() {
                "server" => out.server = policy,
                "account" => out.account = policy,
                _ => out.key = policy,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::ratelimit::Period;

    fn defaults() -> Defaults {
        Defaults {
            limits: Limits::default(),
            max_concurrency: 32,
            scan: ScanMode::Flag,
        }
    }

    #[test]
    fn most_specific_rate_wins_and_strictest_scan_wins() {
        let server = Policy {
            per_account_per_server: Some(Rate::per(5, Period::Minute)),
            scan: Some(ScanMode::Off),
            max_concurrency: Some(2),
            redact: vec!["$.a".into()],
            ..Policy::default()
        };
        let none = Policy::default();
        let e = Effective::resolve(
            &defaults(),
            &server,
            &none,
            &none,
            &AccountLimits::default(),
        );
        assert_eq!(
            e.limits.per_account_per_server,
            Rate::per(5, Period::Minute)
        );
        assert_eq!(e.scan, ScanMode::Off);
        assert_eq!(e.max_concurrency, 2);
        let account = Policy {
            per_account_per_server: Some(Rate::per(50, Period::Minute)),
            scan: Some(ScanMode::Block),
            ..Policy::default()
        };
        let key = Policy {
            redact: vec!["$.b".into()],
            ..Policy::default()
        };
        let e = Effective::resolve(
            &defaults(),
            &server,
            &account,
            &key,
            &AccountLimits::default(),
        );
        assert_eq!(
            e.limits.per_account_per_server,
            Rate::per(50, Period::Minute)
        );
        assert_eq!(e.scan, ScanMode::Block);
        assert_eq!(e.redact, vec!["$.a".to_owned(), "$.b".to_owned()]);
        let plan = AccountLimits {
            per_account: Some(Rate::per(7, Period::Second)),
            ..AccountLimits::default()
        };
        let e = Effective::resolve(&defaults(), &none, &none, &none, &plan);
        assert_eq!(e.limits.per_account, Rate::per(7, Period::Second));
        assert_eq!(e.scan, ScanMode::Flag);
    }

    #[test]
    fn subjects_set_only_their_fields() {
        let p = Policy {
            per_account: Some(Rate::Off),
            ..Policy::default()
        };
        assert!(p.validate(SubjectKind::Account).is_ok());
        assert!(p.validate(SubjectKind::Server).is_err());
        assert!(p.validate(SubjectKind::Key).is_err());
        let p = Policy {
            max_concurrency: Some(0),
            ..Policy::default()
        };
        assert!(p.validate(SubjectKind::Server).is_err());
    }
}
