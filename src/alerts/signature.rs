//! The webhook signature (documented in README "Alerts and metrics"): every delivery
//! carries `X-MCP-Marketplace-Signature: t=UNIX,v1=HEX`, where `HEX` is the lowercase
//! hex HMAC-SHA256 (RFC 2104, FIPS 180-4) keyed with the account's signing secret over
//! the bytes `"{t}.{body}"`. The same scheme as Stripe's, so receivers know it: the
//! timestamp inside the MAC stops replays of old deliveries (a receiver rejects a `t`
//! older than its tolerance, e.g. [`DEFAULT_TOLERANCE_SECS`]), and several `v1=` values
//! may appear during a secret rotation.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-mcp-marketplace-signature";
/// The header carrying the event id (the idempotency key; also `id` in the body).
pub const EVENT_ID_HEADER: &str = "x-mcp-marketplace-event-id";
/// The header carrying the event kind (also `kind` in the body).
pub const EVENT_KIND_HEADER: &str = "x-mcp-marketplace-event";
/// How far a receiver should accept `t` from its own clock, seconds (5 minutes).
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is missing `t=` or any `v1=`, or `t` is not an integer.
    #[error("the signature header is malformed")]
    Malformed,
    /// No `v1=` value matches the body and secret.
    #[error("the signature does not match")]
    Mismatch,
    /// The signature matches but `t` is further than the tolerance from now (seconds).
    #[error("the signature is {0} s away from now")]
    Stale(i64),
}

fn mac(secret: &str, t: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC-SHA256 accepts a key of any length");
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value `t={t_secs},v1={hex}` signing `body` with `secret` at `t_secs`
/// (Unix seconds).
pub fn sign(secret: &str, t_secs: i64, body: &[u8]) -> String {
    let t = t_secs.to_string();
    let tag = mac(secret, &t, body).finalize().into_bytes();
    format!("t={t},v1={}", hex::encode(tag))
}

/// Verifies `header` (a [`SIGNATURE_HEADER`] value) over `body` with `secret` at
/// `now_secs`, accepting `t` within `tolerance_secs`. What a receiver runs; the
/// comparison is constant-time.
///
/// # Errors
/// [`SignatureError::Malformed`], [`SignatureError::Mismatch`], then
/// [`SignatureError::Stale`] (checked after the MAC, so a forger learns nothing).
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let mut t = None;
    let mut tags = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) if t.is_none() => t = Some(v),
            Some(("v1", v)) => tags.push(v),
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    let t_secs: i64 = t.parse().map_err(|_| SignatureError::Malformed)?;
    if tags.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let mac = mac(secret, t, body);
    if !tags
        .iter()
        .any(|tag| hex::decode(tag).is_ok_and(|b| mac.clone().verify_slice(&b).is_ok()))
    {
        return Err(SignatureError::Mismatch);
    }
    let age = (now_secs - t_secs).abs();
    if age > tolerance_secs {
        return Err(SignatureError::Stale(age));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_any_change_breaks_it() {
        let body = br#"{"id":"e1","kind":"incident"}"#;
        let header = sign("whsec_test", 1_700_000_000, body);
        assert!(header.starts_with("t=1700000000,v1="));
        assert_eq!(
            verify("whsec_test", &header, body, 1_700_000_010, 300),
            Ok(())
        );
        assert_eq!(
            verify("whsec_other", &header, body, 1_700_000_010, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("whsec_test", &header, br#"{"id":"e2"}"#, 1_700_000_010, 300),
            Err(SignatureError::Mismatch)
        );
        // Moving the timestamp breaks the MAC, so a replay cannot be freshened.
        let moved = header.replace("t=1700000000", "t=1700000999");
        assert_eq!(
            verify("whsec_test", &moved, body, 1_700_000_999, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("whsec_test", &header, body, 1_700_001_000, 300),
            Err(SignatureError::Stale(1000))
        );
        assert_eq!(
            verify("whsec_test", "v1=abcd", body, 0, 300),
            Err(SignatureError::Malformed)
        );
    }
}
