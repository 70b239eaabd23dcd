//! Upstream credentials (issue 3 item 4, DESIGN.md "What an upstream receives"): the
//! headers a creator configured for their server (e.g. `Authorization: Bearer …`),
//! stored encrypted with the [`Vault`], injected server-side on every upstream request
//! together with `X-MCP-Marketplace-Secret`, and never returned by any API or tool,
//! never logged, never part of an error.
//!
//! Header values are marked sensitive (`HeaderValue::set_sensitive`), so `Debug` of a
//! request or of an upstream session prints `Sensitive` in their place.

use http::{HeaderMap, HeaderName, HeaderValue};
use sqlx::Row;

use super::vault::{Vault, VaultError};
use crate::store::{Store, StoreError, now_ms};
use crate::upstream::client::SECRET_HEADER;

/// Most credential headers per server.
pub const MAX_CREDENTIALS: usize = 16;
/// Longest credential value, bytes.
pub const MAX_VALUE_BYTES: usize = 8 * 1024;

/// Headers a credential may not set: framing and hop-by-hop headers, the ones the
/// marketplace itself sends, and MCP's own (RFC 9110 §7.6.1, MCP "Transports").
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "accept",
    "accept-encoding",
    "proxy-authorization",
    "proxy-connection",
    "mcp-session-id",
    "mcp-protocol-version",
    "mcp-method",
    "mcp-name",
    "last-event-id",
    "x-request-id",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// Errors of credential handling. Messages name headers, never values.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// Not a valid HTTP header name (RFC 9110 §5.1 token).
    #[error("'{0}' is not a valid HTTP header name")]
    InvalidName(String),
    /// A header the marketplace or HTTP itself controls.
    #[error("the header '{0}' cannot be set as an upstream credential")]
    Reserved(String),
    /// Empty, too long, or with characters not allowed in a header value (CR, LF, NUL…).
    #[error("the value of '{0}' is empty, longer than 8 KiB or not valid header text")]
    InvalidValue(String),
    /// The same header twice.
    #[error("the header '{0}' is given twice")]
    Duplicate(String),
    /// More than [`MAX_CREDENTIALS`].
    #[error("at most {MAX_CREDENTIALS} credential headers per server")]
    TooMany,
    /// Decryption failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for CredentialError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

/// A stored credential as listed: the header name and when it was set, never the value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CredentialInfo {
    /// Lowercase header name.
    pub header: String,
    /// When it was set, epoch ms.
    pub updated_at: i64,
}

/// Validates credential headers `(name, value)`: valid names not reserved, valid
/// values of at most 8 KiB, no duplicates, at most [`MAX_CREDENTIALS`]. Returns them
/// with lowercase names.
///
/// # Errors
/// The first [`CredentialError`] found; nothing is stored by a failed validation.
pub fn validate(
    headers: &[(String, String)],
) -> Result<Vec<(HeaderName, String)>, CredentialError> {
    if headers.len() > MAX_CREDENTIALS {
        return Err(CredentialError::TooMany);
    }
    let mut out: Vec<(HeaderName, String)> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        // Echo at most the first word of a bad name: a pasted "Authorization Bearer …"
        // must not put the token into an error message.
        let shown: String = name
            .trim()
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != ':')
            .take(40)
            .collect();
        let header = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| CredentialError::InvalidName(shown.clone()))?;
        let lower = header.as_str();
        if RESERVED.contains(&lower) || lower.starts_with("x-mcp-marketplace-") {
            return Err(CredentialError::Reserved(lower.to_owned()));
        }
        if value.is_empty()
            || value.len() > MAX_VALUE_BYTES
            || HeaderValue::from_str(value).is_err()
            || value.bytes().any(|b| b < 0x20 && b != b'\t')
        {
            return Err(CredentialError::InvalidValue(lower.to_owned()));
        }
        if out.iter().any(|(h, _)| h == header) {
            return Err(CredentialError::Duplicate(lower.to_owned()));
        }
        out.push((header, value.clone()));
    }
    Ok(out)
}

/// Parses a `Name: value` line (the CLI's `--header`).
///
/// # Errors
/// [`CredentialError::InvalidName`] when there is no colon.
pub fn parse_header_line(line: &str) -> Result<(String, String), CredentialError> {
    let (name, value) = line.split_once(':').ok_or_else(|| {
        CredentialError::InvalidName(
            line.trim()
                .chars()
                .take_while(|c| !c.is_whitespace())
                .take(40)
                .collect(),
        )
    })?;
    Ok((name.trim().to_owned(), value.trim().to_owned()))
}

fn aad(server_id: &str, header: &str) -> Vec<u8> {
    format!("mcp-marketplace/credential/v1|{server_id}|{header}").into_bytes()
}

/// Replaces the credentials of `server_id` with `headers` (validated, then encrypted)
/// in one transaction. An empty list removes them all.
///
/// # Errors
/// As [`validate`], [`CredentialError::Store`].
pub async fn set_credentials(
    store: &Store,
    vault: &Vault,
    server_id: &str,
    headers: &[(String, String)],
) -> Result<Vec<CredentialInfo>, CredentialError> {
    let headers = validate(headers)?;
    let now = now_ms();
    let mut tx = store.begin().await?;
    sqlx::query("DELETE FROM server_credentials WHERE server_id = $1")
        .bind(server_id)
        .execute(&mut *tx)
        .await?;
    for (name, value) in &headers {
        sqlx::query(
            "INSERT INTO server_credentials (server_id, header, ciphertext, updated_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(server_id)
        .bind(name.as_str())
        .bind(vault.encrypt(&aad(server_id, name.as_str()), value.as_bytes()))
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    store
        .versions()
        .invalidate(crate::store::versions::Domain::Auth);
    Ok(headers
        .iter()
        .map(|(h, _)| CredentialInfo {
            header: h.as_str().to_owned(),
            updated_at: now,
        })
        .collect())
}

/// The credential headers of `server_id`, names only.
///
/// # Errors
/// [`CredentialError::Store`].
pub async fn list_credentials(
    store: &Store,
    server_id: &str,
) -> Result<Vec<CredentialInfo>, CredentialError> {
    sqlx::query(
        "SELECT header, updated_at FROM server_credentials WHERE server_id = $1 ORDER BY header",
    )
    .bind(server_id)
    .fetch_all(store.pool())
    .await?
    .into_iter()
    .map(|r| {
        Ok(CredentialInfo {
            header: r.try_get(0)?,
            updated_at: r.try_get(1)?,
        })
    })
    .collect()
}

/// The headers every upstream request of `server_id` carries: `X-MCP-Marketplace-Secret`
/// and the decrypted credentials, all marked sensitive.
///
/// # Errors
/// [`CredentialError::Vault`] when a stored value does not decrypt,
/// [`CredentialError::Store`].
pub async fn upstream_headers(
    store: &Store,
    vault: &Vault,
    server_id: &str,
    secret: &str,
) -> Result<HeaderMap, CredentialError> {
    let mut map = HeaderMap::new();
    if let Ok(mut v) = HeaderValue::from_str(secret) {
        v.set_sensitive(true);
        map.insert(HeaderName::from_static(SECRET_HEADER), v);
    }
    for row in sqlx::query("SELECT header, ciphertext FROM server_credentials WHERE server_id = $1")
        .bind(server_id)
        .fetch_all(store.pool())
        .await?
    {
        let header: String = row.try_get(0)?;
        let ciphertext: String = row.try_get(1)?;
        let plain = vault.decrypt(&aad(server_id, &header), &ciphertext)?;
        let (Ok(name), Ok(mut value)) = (
            HeaderName::from_bytes(header.as_bytes()),
            HeaderValue::from_bytes(&plain),
        ) else {
            return Err(VaultError::Decrypt.into());
        };
        value.set_sensitive(true);
        map.insert(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: &str, v: &str) -> (String, String) {
        (n.to_owned(), v.to_owned())
    }

    #[test]
    fn refuses_injection_and_reserved_headers() {
        assert!(validate(&[h("Authorization", "Bearer abc"), h("X-Api-Key", "k")]).is_ok());
        for bad in [
            h("Bad Name", "v"),
            h("X-Foo\r\nX-Evil", "v"),
            h("", "v"),
            h("Host", "evil.example"),
            h("Content-Length", "0"),
            h("Transfer-Encoding", "chunked"),
            h("X-MCP-Marketplace-Secret", "forged"),
            h("X-MCP-Marketplace-Token", "forged"),
            h("Mcp-Session-Id", "s"),
            h("Authorization", "Bearer a\r\nX-Evil: 1"),
            h("Authorization", "Bearer a\nb"),
            h("Authorization", "a\0b"),
            h("Authorization", ""),
            h("Authorization", &"a".repeat(MAX_VALUE_BYTES + 1)),
        ] {
            assert!(validate(std::slice::from_ref(&bad)).is_err(), "{bad:?}");
        }
        assert!(matches!(
            validate(&[h("A", "1"), h("a", "2")]),
            Err(CredentialError::Duplicate(_))
        ));
        let many: Vec<_> = (0..=MAX_CREDENTIALS)
            .map(|i| h(&format!("x-k{i}"), "v"))
            .collect();
        assert!(matches!(validate(&many), Err(CredentialError::TooMany)));
    }
}
