//! A short-lived cache of authenticated keys for the hot path: one key lookup per key
//! per [`KEY_CACHE_TTL`] instead of one per request.
//!
//! # Revocation
//! A key is revoked by `keys revoke`, through this process's store or through another
//! process on the same database (the CLI, another replica on PostgreSQL). The rule (see
//! [`super::keys::authenticate`]) is that a revoked key stops working within one
//! second, open sessions included. Two mechanisms keep it:
//! - a revocation through this process's store bumps the store's key epoch
//!   ([`Store::keys_changed`]); an entry read under an older epoch is never served, so
//!   the very next request is refused;
//! - any other revocation is seen once the entry expires: an entry is served at most
//!   [`KEY_CACHE_TTL`] (500 ms) after it was read from the store.
//!
//! An expiry is checked on every request against the cached `expires_at`, so it is
//! exact. Only successful look-ups are cached (unknown keys always go to the store, so
//! random keys cannot fill the cache), entries are keyed by the key's SHA-256 hash (the
//! raw key is never kept), and the cache holds at most [`KEY_CACHE_MAX_ENTRIES`].

use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::keys::{KeyContext, KeyError, authenticate_hashed, hash_key, is_well_formed};
use crate::store::{Store, now_ms};

/// How long an authenticated key is served from memory (a revocation by another process
/// takes effect within this time, 500 ms).
pub const KEY_CACHE_TTL: Duration = Duration::from_millis(500);
/// Most keys cached at once (a full cache drops its stale entries, then everything).
pub const KEY_CACHE_MAX_ENTRIES: usize = 100_000;

#[derive(Debug)]
struct Entry {
    key: KeyContext,
    read_at: Instant,
    epoch: u64,
}

/// The cache: key hash → the authenticated key, when and under which key epoch it was
/// read. One per process (`App::keys`).
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: DashMap<String, Entry>,
}

impl KeyCache {
    /// Authenticates `presented` like [`super::keys::authenticate`], from memory when
    /// the same key was read from `store` less than [`KEY_CACHE_TTL`] ago and no key was
    /// revoked through `store` since.
    ///
    /// # Errors
    /// [`KeyError::Unauthorized`] (one answer for every reason), [`KeyError::Store`].
    pub async fn authenticate(
        &self,
        store: &Store,
        presented: &str,
    ) -> Result<KeyContext, KeyError> {
        if !is_well_formed(presented) {
            return Err(KeyError::Unauthorized);
        }
        let hash = hash_key(presented);
        // Read before the look-up: a revocation racing with it bumps the epoch after,
        // so this entry is stale at once.
        let epoch = store.keys_epoch();
        if let Some(entry) = self.entries.get(&hash)
            && entry.epoch == epoch
            && entry.read_at.elapsed() < KEY_CACHE_TTL
        {
            if entry.key.expires_at.is_some_and(|t| t <= now_ms()) {
                return Err(KeyError::Unauthorized);
            }
            return Ok(entry.key.clone());
        }
        let read_at = Instant::now();
        match authenticate_hashed(store, &hash).await {
            Ok(key) => {
                if self.entries.len() >= KEY_CACHE_MAX_ENTRIES {
                    self.entries
                        .retain(|_, e| e.epoch == epoch && e.read_at.elapsed() < KEY_CACHE_TTL);
                    if self.entries.len() >= KEY_CACHE_MAX_ENTRIES {
                        self.entries.clear();
                    }
                }
                self.entries.insert(
                    hash,
                    Entry {
                        key: key.clone(),
                        read_at,
                        epoch,
                    },
                );
                Ok(key)
            }
            Err(e) => {
                // Revoked, expired or unknown: nothing of it stays.
                self.entries.remove(&hash);
                Err(e)
            }
        }
    }

    /// How many keys are cached (fresh or not).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no key is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
