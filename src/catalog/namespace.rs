//! Namespaced tool names (DESIGN.md "Words"): `{slug}__{tool}`, at most 64 characters
//! of `[A-Za-z0-9_-]` — what Claude, Cursor and Windsurf accept. A tool name that does
//! not fit (too long, or with other characters) is shortened with a stable hash suffix,
//! never dropped; the mapping is stored with the cached tool.

use sha2::{Digest, Sha256};

/// Longest namespaced name, in characters.
pub const MAX_TOOL_NAME_LEN: usize = 64;
/// Separator between slug and tool.
pub const SEPARATOR: &str = "__";
/// Hex digits of the hash suffix.
const HASH_LEN: usize = 8;

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// The namespaced name of upstream tool `tool` of server `slug`.
///
/// When `{slug}__{tool}` is within 64 characters of `[A-Za-z0-9_-]` it is used as is.
/// Otherwise other characters become `_`, the tool part is cut to fit, and `_` plus the
/// first 8 hex digits of SHA-256(tool) are appended, so different tools never share a
/// name and the same tool always gets the same one.
pub fn namespaced_name(slug: &str, tool: &str) -> String {
    let plain = format!("{slug}{SEPARATOR}{tool}");
    if plain.len() <= MAX_TOOL_NAME_LEN && tool.chars().all(allowed) {
        return plain;
    }
    let hash: String = Sha256::digest(tool.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..HASH_LEN]
        .to_owned();
    let budget = MAX_TOOL_NAME_LEN - slug.len() - SEPARATOR.len() - 1 - HASH_LEN;
    let stem: String = tool
        .chars()
        .map(|c| if allowed(c) { c } else { '_' })
        .take(budget)
        .collect();
    format!("{slug}{SEPARATOR}{stem}_{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_names_are_kept() {
        assert_eq!(
            namespaced_name("calendar", "create_event"),
            "calendar__create_event"
        );
    }

    #[test]
    fn long_or_odd_names_get_a_stable_hash_suffix() {
        let long = "a".repeat(80);
        let n = namespaced_name("calendar", &long);
        assert_eq!(n.len(), 64);
        assert_eq!(n, namespaced_name("calendar", &long));
        assert_ne!(namespaced_name("x", "a.b"), namespaced_name("x", "a/b"));
        assert!(namespaced_name("x", "a.b").starts_with("x__a_b_"));
    }

    proptest! {
        #[test]
        fn always_fits_the_client_rule(slug in "[a-z0-9][a-z0-9-]{0,31}", tool in "\\PC{1,100}") {
            let n = namespaced_name(&slug, &tool);
            prop_assert!(n.len() <= 64);
            prop_assert!(n.chars().all(allowed));
            let prefix = format!("{slug}__");
            prop_assert!(n.starts_with(&prefix));
        }
    }
}
