//! The marketplace's Ed25519 signing key: made on first start and kept in the store
//! (`signing_keys`), published at `GET /.well-known/jwks.json` (RFC 7517, OKP keys per
//! RFC 8037), used for the EdDSA `X-MCP-Marketplace-Token` JWT (RFC 7519) sent upstream
//! and for receipts.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::store::{Store, StoreError, now_ms};

/// Lifetime of an upstream token (DESIGN.md: exp ≤ 60 s).
pub const UPSTREAM_TOKEN_TTL_SECS: i64 = 60;

/// Errors of signing and verification.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// The stored key is corrupt.
    #[error("the stored signing key is malformed")]
    MalformedKey,
    /// No key with that id is known.
    #[error("unknown signing key id '{0}'")]
    UnknownKid(String),
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// Serializing a JWT's claims failed.
    #[error("could not sign token: {0}")]
    Jwt(#[from] serde_json::Error),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for SigningError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

/// Claims of the upstream token (DESIGN.md "What an upstream receives").
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UpstreamClaims {
    /// The marketplace's public URL.
    pub iss: String,
    /// The server's slug.
    pub aud: String,
    /// A stable per-(account, server) pseudonym.
    pub sub: String,
    /// The call id.
    pub jti: String,
    /// Issued at, epoch seconds.
    pub iat: i64,
    /// Expiry, epoch seconds (iat + 60).
    pub exp: i64,
    /// The upstream tool name.
    pub tool: String,
    /// The call's price in micros.
    pub price_micros: i64,
}

/// The active signing key plus every known public key. Cheap to clone.
#[derive(Clone)]
pub struct Signer {
    kid: String,
    key: SigningKey,
    /// The upstream tokens' JOSE header, base64url-encoded and followed by `.`: the
    /// same for every token of this key, so encoded once here.
    token_header: String,
    public: BTreeMap<String, VerifyingKey>,
    pseudonym_salt: [u8; 32],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn random_32() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source is available");
    b
}

fn decode_32(text: &str) -> Result<[u8; 32], SigningError> {
    STANDARD
        .decode(text)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
        .ok_or(SigningError::MalformedKey)
}

impl Signer {
    /// Loads the newest signing key from the store, creating one (and the pseudonym
    /// salt) on first start. Concurrent first starts of several replicas converge on
    /// one key: inserts are idempotent and the newest row wins.
    ///
    /// # Errors
    /// [`SigningError::MalformedKey`] for a corrupt row, [`SigningError::Store`].
    pub async fn load_or_create(store: &Store) -> Result<Self, SigningError> {
        let pool = store.pool();
        let have = sqlx::query("SELECT kid FROM signing_keys")
            .fetch_optional(pool)
            .await?;
        if have.is_none() {
            let key = SigningKey::from_bytes(&random_32());
            let public = key.verifying_key().to_bytes();
            let kid = super::keys::hex_lower(&Sha256::digest(public)[..8]);
            sqlx::query(
                "INSERT INTO signing_keys (kid, seed, public_key, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (kid) DO NOTHING",
            )
            .bind(&kid)
            .bind(STANDARD.encode(key.to_bytes()))
            .bind(STANDARD.encode(public))
            .bind(now_ms())
            .execute(pool)
            .await?;
        }
        sqlx::query("INSERT INTO settings (key, value) VALUES ('pseudonym_salt', $1) ON CONFLICT (key) DO NOTHING")
            .bind(STANDARD.encode(random_32()))
            .execute(pool)
            .await?;
        let salt: String = sqlx::query("SELECT value FROM settings WHERE key = 'pseudonym_salt'")
            .fetch_one(pool)
            .await?
            .try_get(0)?;
        let rows = sqlx::query(
            "SELECT kid, seed, public_key FROM signing_keys ORDER BY created_at DESC, kid",
        )
        .fetch_all(pool)
        .await?;
        let mut public = BTreeMap::new();
        let mut active = None;
        for row in rows {
            let kid: String = row.try_get(0)?;
            let seed: String = row.try_get(1)?;
            let pk = VerifyingKey::from_bytes(&decode_32(&row.try_get::<String, _>(2)?)?)
                .map_err(|_| SigningError::MalformedKey)?;
            public.insert(kid.clone(), pk);
            if active.is_none() {
                active = Some((kid, SigningKey::from_bytes(&decode_32(&seed)?)));
            }
        }
        let (kid, key) = active.ok_or(SigningError::MalformedKey)?;
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": kid});
        let mut token_header = URL_SAFE_NO_PAD.encode(header.to_string());
        token_header.push('.');
        Ok(Self {
            kid,
            key,
            token_header,
            public,
            pseudonym_salt: decode_32(&salt)?,
        })
    }

    /// The active key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs `message` with the active key; returns the 64-byte signature, base64url
    /// without padding.
    pub fn sign(&self, message: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(self.key.sign(message).to_bytes())
    }

    /// Verifies a base64url signature over `message` by key `kid`.
    ///
    /// # Errors
    /// [`SigningError::UnknownKid`], [`SigningError::BadSignature`].
    pub fn verify(&self, kid: &str, message: &[u8], sig: &str) -> Result<(), SigningError> {
        let key = self
            .public
            .get(kid)
            .ok_or_else(|| SigningError::UnknownKid(kid.to_owned()))?;
        verify_with(key, message, sig)
    }

    /// The JWKS document: every known public key as an OKP/Ed25519 JWK (RFC 8037).
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self
            .public
            .iter()
            .map(|(kid, pk)| {
                serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                    "kid": kid, "x": URL_SAFE_NO_PAD.encode(pk.to_bytes()),
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// A stable pseudonym for `account_id` at `server_id`: base64url of
    /// SHA-256(salt ‖ account ‖ 0 ‖ server), first 22 characters. Upstreams can tell
    /// callers apart without learning who they are.
    pub fn pseudonym(&self, account_id: &str, server_id: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.pseudonym_salt);
        h.update(account_id.as_bytes());
        h.update([0]);
        h.update(server_id.as_bytes());
        let mut s = URL_SAFE_NO_PAD.encode(h.finalize());
        s.truncate(22);
        s
    }

    /// Signs the upstream token for one call: a JWT (RFC 7519) in JWS compact
    /// serialization (RFC 7515 §7.1), `{"alg":"EdDSA","typ":"JWT","kid":…}` (RFC 8037
    /// §3.1), signed with the active key; it verifies against `GET
    /// /.well-known/jwks.json` with any JWT library.
    ///
    /// Signed here with the key already held rather than through `jsonwebtoken::encode`,
    /// which parses the PKCS#8 key and derives its public key again for every token:
    /// a second scalar multiplication per call (57 µs per token that way, 34 µs here,
    /// of which the signature is 24 µs: `cargo bench --bench hot_path -- signing`).
    ///
    /// # Errors
    /// [`SigningError::Jwt`] when the claims cannot be serialized.
    pub fn upstream_token(&self, claims: &UpstreamClaims) -> Result<String, SigningError> {
        let mut token = self.token_header.clone();
        URL_SAFE_NO_PAD.encode_string(serde_json::to_vec(claims)?, &mut token);
        let signature = self.sign(token.as_bytes());
        token.push('.');
        token.push_str(&signature);
        Ok(token)
    }
}

/// Verifies a base64url Ed25519 signature over `message` with `key`.
///
/// # Errors
/// [`SigningError::BadSignature`].
pub fn verify_with(key: &VerifyingKey, message: &[u8], sig: &str) -> Result<(), SigningError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| SigningError::BadSignature)?;
    let sig = Signature::from_slice(&bytes).map_err(|_| SigningError::BadSignature)?;
    key.verify(message, &sig)
        .map_err(|_| SigningError::BadSignature)
}

/// Reads the Ed25519 keys of a JWKS document into `kid → key`.
pub fn keys_from_jwks(jwks: &serde_json::Value) -> BTreeMap<String, VerifyingKey> {
    let mut out = BTreeMap::new();
    for k in jwks
        .get("keys")
        .and_then(|k| k.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(kid), Some(x)) = (
            k.get("kid").and_then(|v| v.as_str()),
            k.get("x").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        if let Some(pk) = URL_SAFE_NO_PAD
            .decode(x)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        {
            out.insert(kid.to_owned(), pk);
        }
    }
    out
}

/// Current time as epoch seconds, for JWT claims.
pub fn now_secs() -> i64 {
    now_ms() / 1000
}
