//! The registry of open downstream MCP sessions, so catalog changes reach clients as
//! `notifications/tools/list_changed` (MCP 2025-06-18 "Tools: List Changed
//! Notification").

use std::sync::Mutex;

use rmcp::{Peer, RoleServer};

#[derive(Debug)]
struct Entry {
    account_id: String,
    /// `None` for `/mcp`; the slug for `/servers/{slug}/mcp`.
    slug: Option<String>,
    peer: Peer<RoleServer>,
}

/// Open sessions by account and scope. Closed sessions are pruned as they are found.
#[derive(Debug, Default)]
pub struct Notifier {
    entries: Mutex<Vec<Entry>>,
}

impl Notifier {
    /// Registers the session of `peer` for `account_id` (`slug` for a one-server
    /// endpoint).
    pub fn register(&self, account_id: &str, slug: Option<&str>, peer: Peer<RoleServer>) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|e| !e.peer.is_transport_closed());
            entries.push(Entry {
                account_id: account_id.to_owned(),
                slug: slug.map(str::to_owned),
                peer,
            });
        }
    }

    /// Number of open sessions.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    /// True when no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends `notifications/tools/list_changed` to the `/mcp` sessions of `accounts`
    /// and, when `slug` is given, to every `/servers/{slug}/mcp` session. Sends happen
    /// on spawned tasks so a slow client never blocks the caller.
    pub fn tools_changed(&self, accounts: &[String], slug: Option<&str>) {
        let peers: Vec<Peer<RoleServer>> = match self.entries.lock() {
            Ok(mut entries) => {
                entries.retain(|e| !e.peer.is_transport_closed());
                entries
                    .iter()
                    .filter(|e| match &e.slug {
                        None => accounts.contains(&e.account_id),
                        Some(s) => Some(s.as_str()) == slug,
                    })
                    .map(|e| e.peer.clone())
                    .collect()
            }
            Err(_) => return,
        };
        for peer in peers {
            tokio::spawn(async move {
                if let Err(e) = peer.notify_tool_list_changed().await {
                    tracing::debug!(error = %e, "could not send tools/list_changed");
                }
            });
        }
    }
}
