//! Fuzzes upstream endpoint URL validation and its invariants
//! (`mcp_marketplace::security::fuzzing::url_validation`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mcp_marketplace::security::fuzzing::url_validation(data);
});
