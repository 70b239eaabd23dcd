//! The cargo-fuzz seed corpus as a normal test: every seed of `fuzz/corpus/<target>/`
//! goes through the same entry point the fuzz target calls, whose invariants are
//! assertions (`mcp_marketplace::security::fuzzing`).

use std::path::Path;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .map(|p| (p.display().to_string(), std::fs::read(&p).expect("a seed")))
        .collect();
    out.sort();
    out
}

#[test]
fn json_rpc_entry_seeds_hold_their_invariants() {
    let seeds = seeds("jsonrpc_entry");
    assert!(seeds.len() >= 15, "{} seeds", seeds.len());
    for (name, data) in seeds {
        let run =
            std::panic::catch_unwind(|| mcp_marketplace::security::fuzzing::jsonrpc_entry(&data));
        assert!(run.is_ok(), "seed {name} broke an invariant");
    }
}

#[test]
fn url_validation_seeds_hold_their_invariants() {
    let seeds = seeds("url_validation");
    assert!(seeds.len() >= 40, "{} seeds", seeds.len());
    for (name, data) in seeds {
        let run =
            std::panic::catch_unwind(|| mcp_marketplace::security::fuzzing::url_validation(&data));
        assert!(run.is_ok(), "seed {name} broke an invariant");
    }
}
