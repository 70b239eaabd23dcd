//! Fuzzes what the marketplace does with a raw JSON-RPC POST body before rmcp's
//! session logic (`mcp_marketplace::security::fuzzing::jsonrpc_entry`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mcp_marketplace::security::fuzzing::jsonrpc_entry(data);
});
