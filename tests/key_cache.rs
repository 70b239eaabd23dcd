//! The key cache on the hot path keeps revocation effective within one second: a key
//! revoked by another process on the same database (the CLI, another replica) stops
//! working in an open session once the cache entry expires (500 ms), and a key revoked
//! through this process's store at once (tests/bad_input.rs pins that case). SQLite
//! and PostgreSQL.

mod common;

use common::{World, backends};
use mcp_marketplace::auth::key_cache::KEY_CACHE_TTL;
use mcp_marketplace::auth::keys::revoke_key;
use mcp_marketplace::store::Store;

#[tokio::test]
async fn a_key_revoked_by_another_process_stops_working_in_an_open_session_within_a_second() {
    for backend in backends() {
        let w = World::start(backend, 100_000).await;
        let client = w.market.client(&w.key).await;
        // Several requests on one session: the key is read once, then served from memory.
        for _ in 0..3 {
            assert!(!client.list_all_tools().await.unwrap().is_empty());
        }
        assert_eq!(w.market.app.keys.len(), 1, "{backend:?}: one cached key");

        // Another process: its own connection pool (and its own key epoch).
        let other = Store::connect(&w.market.db.url).await.expect("second store");
        revoke_key(&other, &w.key[..12]).await.expect("revoke");
        other.close().await;

        // The rule is one second; the cache's bound is KEY_CACHE_TTL (500 ms).
        assert!(KEY_CACHE_TTL <= std::time::Duration::from_millis(500));
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let err = client
            .list_all_tools()
            .await
            .expect_err("a key revoked a second ago is refused");
        assert!(
            format!("{err:?}").contains("AuthRequired"),
            "{backend:?}: the client is told to authenticate: {err:?}"
        );
        assert!(w.market.app.keys.is_empty(), "{backend:?}: nothing of it stays");
        client.cancel().await.ok();
        w.stop().await;
    }
}
