//! `mcp-marketplace`: parses the command line and runs it (see `mcp_marketplace::cli`).

use std::process::ExitCode;

use clap::Parser;
use mcp_marketplace::cli::{Cli, run};

/// The package's allocator ([`mcp_marketplace::Allocator`]: jemalloc, and why).
#[global_allocator]
static ALLOCATOR: mcp_marketplace::Allocator = mcp_marketplace::ALLOCATOR;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MCP_MARKETPLACE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmcp=warn,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = mcp_marketplace::start_allocator_purging() {
        tracing::debug!(error = %e, "jemalloc's background threads are off");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
