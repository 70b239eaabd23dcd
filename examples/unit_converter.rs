//! Standalone `unit-converter` example MCP server.
//!
//! ```text
//! cargo run --example unit_converter -- --listen 127.0.0.1:9101
//! ```
//!
//! Serves MCP Streamable HTTP at `http://ADDR/mcp` until Ctrl-C. If the
//! environment variable `EXAMPLE_MCP_SECRET` is set (non-empty), requests must
//! carry it in the `X-MCP-Marketplace-Secret` header or get HTTP 401.
#![allow(dead_code)] // this binary uses only part of the shared `upstreams` module

#[path = "upstreams/mod.rs"]
mod upstreams;

const DEFAULT_LISTEN: &str = "127.0.0.1:9101";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let listen = match listen_address("unit_converter", DEFAULT_LISTEN) {
        Ok(listen) => listen,
        Err(code) => std::process::exit(code),
    };
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|error| format!("cannot listen on {listen}: {error}"))?;
    let secret = std::env::var("EXAMPLE_MCP_SECRET")
        .ok()
        .filter(|secret| !secret.is_empty());
    let require_secret = secret.is_some();
    let server = upstreams::spawn_unit_converter(listener, upstreams::secret_slot(secret)).await?;
    println!("unit-converter MCP server listening on {}", server.url);
    if require_secret {
        println!("requests must carry the X-MCP-Marketplace-Secret header (EXAMPLE_MCP_SECRET)");
    }
    tokio::signal::ctrl_c().await?;
    println!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// Parses `--listen ADDR` / `--listen=ADDR` (default `default`). On `--help`
/// or a usage error, prints to stdout/stderr and returns the exit code.
fn listen_address(program: &str, default: &str) -> Result<String, i32> {
    let usage = format!(
        "usage: {program} [--listen ADDR]   (default {default}; env EXAMPLE_MCP_SECRET sets the required X-MCP-Marketplace-Secret)"
    );
    let mut listen = default.to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--listen" {
            match args.next() {
                Some(value) => listen = value,
                None => {
                    eprintln!("--listen needs an address\n{usage}");
                    return Err(2);
                }
            }
        } else if let Some(value) = arg.strip_prefix("--listen=") {
            listen = value.to_owned();
        } else if arg == "--help" || arg == "-h" {
            println!("{usage}");
            return Err(0);
        } else {
            eprintln!("unexpected argument {arg:?}\n{usage}");
            return Err(2);
        }
    }
    Ok(listen)
}
