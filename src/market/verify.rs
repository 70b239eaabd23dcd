//! Verification: the reliability layer's probe ([`crate::upstream::probe::probe_server`]:
//! handshake, tools/list with schema validation, malformed JSON, unknown method,
//! missing-secret refusal, A–F grade) run at registration (kind `registration`) and on
//! a creator's request (kind `manual`); its report is stored in `probe_results` by the
//! probe itself.
//!
//! A verification passes when every check of every endpoint passed, with one
//! exception: at registration the creator's server cannot know its
//! `X-MCP-Marketplace-Secret` yet (it is in the registration's answer), so a failed
//! `secret_required` check is reported but does not fail a `registration`
//! verification. A `manual` verification (after the creator configured the secret) and
//! the scheduled probes require it.

use crate::app::{App, AppError};
use crate::catalog::CatalogError;
use crate::upstream::probe::{ProbeError, ProbeReport, probe_server};

pub use crate::upstream::probe::ProbeKind;

pub use crate::catalog::creator::{SECRET_CHECK, counts, stored_passed};

/// The outcome of a verification.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verification {
    /// Passed (module docs).
    pub ok: bool,
    /// Why the probe ran.
    pub kind: ProbeKind,
    /// The worst endpoint's grade, `A`–`F`.
    pub grade: String,
    /// The probe's full report (every check of every endpoint).
    pub report: ProbeReport,
}

impl Verification {
    /// The names of the checks that failed and count (module docs), deduplicated.
    pub fn failed_checks(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .report
            .checks
            .iter()
            .filter(|c| !c.ok && counts(self.kind.as_str(), &c.name))
            .map(|c| c.name.clone())
            .collect();
        out.dedup();
        out
    }
}

/// Probes `server` (every endpoint) with `kind`, storing the report, and judges it.
///
/// # Errors
/// [`AppError::Catalog`] ([`CatalogError::InvalidField`] for a server without
/// endpoints), [`AppError::Credential`]-like failures as [`AppError::Catalog`],
/// [`AppError::Store`]. An unreachable or broken server is a failed verification, not
/// an error.
pub async fn run(
    app: &App,
    server: &crate::catalog::Server,
    kind: ProbeKind,
) -> Result<Verification, AppError> {
    let report = probe_server(app, server, kind).await.map_err(|e| match e {
        ProbeError::Store(s) => AppError::Store(s),
        ProbeError::NoEndpoint => AppError::Catalog(CatalogError::InvalidField(
            "endpoints: between 1 and 8 URLs",
        )),
        ProbeError::Credentials => AppError::Catalog(CatalogError::InvalidField(
            "credentials: the server's credentials cannot be read",
        )),
    })?;
    let ok = report
        .checks
        .iter()
        .all(|c| c.ok || !counts(kind.as_str(), &c.name))
        && !report.checks.is_empty();
    Ok(Verification {
        ok,
        kind,
        grade: report.grade.as_str().to_owned(),
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn registration_does_not_require_the_secret_check() {
        let checks =
            json!([{"name": "initialize", "ok": true}, {"name": "secret_required", "ok": false}]);
        assert!(stored_passed("registration", &checks));
        assert!(!stored_passed("manual", &checks));
        assert!(!stored_passed("registration", &json!([])));
        let bad = json!([{"name": "tools_list", "ok": false}]);
        assert!(!stored_passed("registration", &bad));
    }
}
