//! Signed receipts (DESIGN.md call path step 8): every call's result carries
//! `_meta["mcp-marketplace/receipt"]`, whose `sig` is base64url Ed25519 over the
//! RFC 8785 (JCS) canonical JSON of all other fields.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;

use crate::auth::signing::{Signer, SigningError, verify_with};

/// The `_meta` key receipts travel under.
pub const RECEIPT_META_KEY: &str = "mcp-marketplace/receipt";

/// One call's receipt. Amounts in micros; `issued_at` is RFC 3339.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Receipt {
    /// The call's UUIDv7.
    pub call_id: String,
    /// The paying account's name.
    pub account: String,
    /// The key used.
    pub key_id: String,
    /// The server's slug.
    pub server: String,
    /// The upstream tool name.
    pub tool: String,
    /// The price in micros.
    pub price_micros: i64,
    /// What was charged: the price when settled, 0 when refunded.
    pub charged_micros: i64,
    /// `settled` or `refunded`.
    pub outcome: String,
    /// The wallet balance after the call, in micros.
    pub balance_after_micros: i64,
    /// When the receipt was issued (RFC 3339).
    pub issued_at: String,
    /// The signing key's id (see `/.well-known/jwks.json`).
    pub kid: String,
    /// base64url Ed25519 signature over the JCS form of the other fields.
    pub sig: String,
}

/// Errors of receipt handling.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// Not a receipt object.
    #[error("not a receipt: {0}")]
    Malformed(String),
    /// The signature is wrong or the key unknown.
    #[error(transparent)]
    Signature(#[from] SigningError),
}

fn signing_input(receipt: &Receipt) -> Result<Vec<u8>, ReceiptError> {
    let mut value =
        serde_json::to_value(receipt).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
    if let Some(obj) = value.as_object_mut() {
        obj.remove("sig");
    }
    serde_jcs::to_vec(&value).map_err(|e| ReceiptError::Malformed(e.to_string()))
}

impl Receipt {
    /// Fills `kid` and `sig` by signing the other fields with `signer`.
    ///
    /// # Errors
    /// [`ReceiptError::Malformed`] if the receipt cannot be canonicalized.
    pub fn sign(mut self, signer: &Signer) -> Result<Self, ReceiptError> {
        self.kid = signer.kid().to_owned();
        let input = signing_input(&self)?;
        self.sig = signer.sign(&input);
        Ok(self)
    }

    /// Verifies the signature against `keys` (`kid → public key`, e.g. from the JWKS).
    ///
    /// # Errors
    /// [`SigningError::UnknownKid`] / [`SigningError::BadSignature`] inside
    /// [`ReceiptError::Signature`].
    pub fn verify(&self, keys: &BTreeMap<String, VerifyingKey>) -> Result<(), ReceiptError> {
        let key = keys
            .get(&self.kid)
            .ok_or_else(|| SigningError::UnknownKid(self.kid.clone()))?;
        verify_with(key, &signing_input(self)?, &self.sig)?;
        Ok(())
    }

    /// Parses a receipt from JSON: either the receipt object itself, or a tool result /
    /// `_meta` object that carries it under `mcp-marketplace/receipt`.
    ///
    /// # Errors
    /// [`ReceiptError::Malformed`].
    pub fn from_json(value: &serde_json::Value) -> Result<Self, ReceiptError> {
        let inner = value
            .pointer("/_meta/mcp-marketplace~1receipt")
            .or_else(|| value.get(RECEIPT_META_KEY))
            .unwrap_or(value);
        serde_json::from_value(inner.clone()).map_err(|e| ReceiptError::Malformed(e.to_string()))
    }
}
