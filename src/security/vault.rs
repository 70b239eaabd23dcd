//! The master key and encryption at rest (issue 3 item 4): AES-256-GCM (`aes-gcm`,
//! NIST SP 800-38D) with a fresh random 96-bit nonce per encryption and associated
//! data that binds each ciphertext to its place (a server and a header), so a
//! ciphertext copied to another row does not decrypt.
//!
//! The 32-byte master key comes from `MCP_MARKETPLACE_MASTER_KEY` (base64 or 64 hex
//! digits) or from a key file (`master_key_file`; default `FILE.master-key` beside an
//! SQLite database `FILE`, `./mcp-marketplace.master-key` otherwise), created with mode
//! 0600 on first start. Replicas sharing a PostgreSQL database must share the key. A
//! check value in `settings` makes a wrong key fail at start instead of at the first
//! forward.

use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use sqlx::Row;

use crate::store::{Store, StoreError};

/// The variable that carries the master key.
pub const MASTER_KEY_VAR: &str = "MCP_MARKETPLACE_MASTER_KEY";
/// Bytes of an AES-GCM nonce.
const NONCE_LEN: usize = 12;
/// The `settings` row holding the key check value.
const CHECK_SETTING: &str = "master_key_check";
/// What the check value encrypts.
const CHECK_PLAINTEXT: &[u8] = b"mcp-marketplace master key check";

/// Errors of the vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The key material is not 32 bytes in base64 or hex. Never echoes the material.
    #[error("the master key must be 32 bytes, given as base64 or 64 hex digits")]
    BadKey,
    /// The key file could not be read or created.
    #[error("master key file {0}: {1}")]
    File(String, std::io::Error),
    /// The stored check value does not decrypt with this key.
    #[error(
        "the master key does not match the one this database's credentials were encrypted with \
         (set {MASTER_KEY_VAR} or master_key_file to the original key)"
    )]
    WrongKey,
    /// A ciphertext did not decrypt (tampered, moved to another row, or another key).
    #[error("a stored credential could not be decrypted")]
    Decrypt,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for VaultError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

/// Where the master key comes from. `Debug` never shows key material.
#[derive(Clone)]
pub enum MasterKeySource {
    /// Key material given directly (the variable).
    Material(String),
    /// A key file, created on first use.
    File(PathBuf),
}

impl std::fmt::Debug for MasterKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Material(_) => f.write_str("Material(<redacted>)"),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

impl MasterKeySource {
    /// The default key file for `database_url`: `FILE.master-key` beside an SQLite
    /// file, else `mcp-marketplace.master-key` in the working directory.
    pub fn default_file(database_url: &str) -> PathBuf {
        let path = database_url
            .strip_prefix("sqlite://")
            .or_else(|| database_url.strip_prefix("sqlite:"))
            .map(|p| p.split('?').next().unwrap_or(p))
            .filter(|p| !p.is_empty() && !p.starts_with(":memory:"));
        match path {
            Some(p) => PathBuf::from(format!("{p}.master-key")),
            None => PathBuf::from("mcp-marketplace.master-key"),
        }
    }
}

/// Parses 32 bytes of key material from base64 (standard or URL-safe, padded or not)
/// or 64 hex digits.
///
/// # Errors
/// [`VaultError::BadKey`].
pub fn parse_key(text: &str) -> Result<[u8; 32], VaultError> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| VaultError::BadKey)?
    } else {
        [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(text).ok())
            .ok_or(VaultError::BadKey)?
    };
    bytes.try_into().map_err(|_| VaultError::BadKey)
}

/// Encrypts and decrypts under the master key. `Debug` shows nothing of the key.
#[derive(Clone)]
pub struct Vault {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vault(<master key>)")
    }
}

impl Vault {
    /// A vault over a 32-byte key.
    pub fn from_key(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// Loads the master key from `source`; a missing key file is created (mode 0600 on
    /// Unix) holding a fresh random key.
    ///
    /// # Errors
    /// [`VaultError::BadKey`], [`VaultError::File`].
    pub fn load(source: &MasterKeySource) -> Result<Self, VaultError> {
        match source {
            MasterKeySource::Material(m) => Ok(Self::from_key(&parse_key(m)?)),
            MasterKeySource::File(path) => Ok(Self::from_key(&load_or_create_file(path)?)),
        }
    }

    /// Encrypts `plaintext` bound to `aad`: base64 of nonce ‖ ciphertext ‖ tag.
    pub fn encrypt(&self, aad: &[u8], plaintext: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source is available");
        let sealed = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        STANDARD.encode(out)
    }

    /// Decrypts what [`Vault::encrypt`] made with the same `aad`.
    ///
    /// # Errors
    /// [`VaultError::Decrypt`] when the text is malformed, was tampered with, belongs
    /// to other associated data, or another key made it.
    pub fn decrypt(&self, aad: &[u8], text: &str) -> Result<Vec<u8>, VaultError> {
        let raw = STANDARD.decode(text).map_err(|_| VaultError::Decrypt)?;
        if raw.len() < NONCE_LEN + 16 {
            return Err(VaultError::Decrypt);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| VaultError::Decrypt)?;
        self.cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: sealed, aad })
            .map_err(|_| VaultError::Decrypt)
    }

    /// Checks this key against the database's check value, writing one on first use.
    ///
    /// # Errors
    /// [`VaultError::WrongKey`], [`VaultError::Store`].
    pub async fn check(&self, store: &Store) -> Result<(), VaultError> {
        let fresh = self.encrypt(CHECK_SETTING.as_bytes(), CHECK_PLAINTEXT);
        // Two replicas starting at once: one insert wins, both verify the winner.
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(CHECK_SETTING)
        .bind(&fresh)
        .execute(store.pool())
        .await?;
        let stored: String = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(CHECK_SETTING)
            .fetch_one(store.pool())
            .await?
            .try_get(0)?;
        match self.decrypt(CHECK_SETTING.as_bytes(), &stored) {
            Ok(p) if p == CHECK_PLAINTEXT => Ok(()),
            _ => Err(VaultError::WrongKey),
        }
    }
}

fn load_or_create_file(path: &Path) -> Result<[u8; 32], VaultError> {
    let shown = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            warn_if_readable_by_others(path);
            parse_key(&text)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).expect("the OS random source is available");
            match write_new_key_file(path, &STANDARD.encode(key)) {
                Ok(()) => {
                    tracing::info!(path = %shown, "created a new master key file (keep it safe: stored credentials need it)");
                    Ok(key)
                }
                // Another process created it first: use its key.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text =
                        std::fs::read_to_string(path).map_err(|e| VaultError::File(shown, e))?;
                    parse_key(&text)
                }
                Err(e) => Err(VaultError::File(shown, e)),
            }
        }
        Err(e) => Err(VaultError::File(shown, e)),
    }
}

/// Writes a new key file atomically: the key goes to a private temporary file beside
/// it, which is then hard-linked into place (failing if another process made the file
/// first, whose key then wins), so no reader ever sees a partly written key.
fn write_new_key_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.to_path_buf()
        }
        None => PathBuf::from("."),
    };
    let tmp = dir.join(format!(".master-key-{}", uuid::Uuid::now_v7().simple()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    written
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "the master key file is readable by other users; chmod 600 it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_binds_associated_data() {
        let v = Vault::from_key(&[7u8; 32]);
        let c = v.encrypt(b"server-1|authorization", b"Bearer s3cret");
        assert!(!c.contains("s3cret"));
        assert_eq!(
            v.decrypt(b"server-1|authorization", &c).unwrap(),
            b"Bearer s3cret"
        );
        assert!(v.decrypt(b"server-2|authorization", &c).is_err());
        assert!(
            Vault::from_key(&[8u8; 32])
                .decrypt(b"server-1|authorization", &c)
                .is_err()
        );
        assert_ne!(c, v.encrypt(b"server-1|authorization", b"Bearer s3cret"));
    }

    #[test]
    fn parses_key_material() {
        let hex = "00".repeat(32);
        assert_eq!(parse_key(&hex).unwrap(), [0u8; 32]);
        assert_eq!(parse_key(&STANDARD.encode([1u8; 32])).unwrap(), [1u8; 32]);
        assert!(parse_key("short").is_err());
        assert!(parse_key(&STANDARD.encode([1u8; 31])).is_err());
    }

    #[test]
    fn creates_a_private_key_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k").join("master-key");
        let a = load_or_create_file(&path).unwrap();
        let b = load_or_create_file(&path).unwrap();
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            MasterKeySource::default_file("sqlite:///var/lib/m.db?mode=rwc"),
            PathBuf::from("/var/lib/m.db.master-key")
        );
        assert_eq!(
            MasterKeySource::default_file("postgres://x/y"),
            PathBuf::from("mcp-marketplace.master-key")
        );
    }
}
