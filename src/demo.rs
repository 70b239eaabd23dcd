//! `mcp-marketplace demo`: the whole product on one machine. Starts the example
//! upstream servers of `examples/` on 127.0.0.1, serves the marketplace, registers the
//! examples through the REST API as a creator would, approves and installs them, funds
//! a demo account and prints the MCP URL, the key and client configuration.

#[path = "../examples/upstreams/mod.rs"]
pub mod upstreams;

use std::sync::Arc;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::{App, AppError};
use crate::auth::Scope;
use crate::auth::accounts::create_account;
use crate::auth::keys::{NewKey, create_key};
use crate::billing::pricing::format_usd;
use crate::catalog::manifest::{BUILT_IN, Manifest};
use crate::config::Config;

/// Credits granted to the demo account (10 USD in micros).
pub const DEMO_CREDITS_MICROS: i64 = 10_000_000;

/// A fresh SQLite file for one demo run, in the system's temporary directory.
pub fn demo_database_url() -> String {
    let path =
        std::env::temp_dir().join(format!("mcp-marketplace-demo-{}.db", uuid::Uuid::now_v7()));
    format!("sqlite://{}", path.display())
}

/// What a ready demo offers a client.
#[derive(Debug, Clone)]
pub struct DemoInfo {
    /// The aggregated MCP URL.
    pub mcp_url: String,
    /// The demo account's key (scopes invoke, catalog:read).
    pub key: String,
    /// Slugs of the installed example servers.
    pub slugs: Vec<String>,
}

/// A running demo: marketplace plus example upstreams.
pub struct Demo {
    /// The marketplace.
    pub app: Arc<App>,
    /// URL, key, slugs.
    pub info: DemoInfo,
    examples: Vec<(Manifest, upstreams::ExampleServer)>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Demo {
    /// Starts everything: examples on 127.0.0.1:0, the marketplace on `config.listen`,
    /// registration through `POST /api/v1/servers`, approval, install, 10 USD of credits.
    ///
    /// # Errors
    /// [`AppError`] when a listener, the store or a setup step fails.
    pub async fn start(mut config: Config) -> Result<Self, AppError> {
        // One example per built-in manifest, keyed by its slug.
        let mut examples = Vec::new();
        for (file, text) in BUILT_IN {
            let manifest =
                Manifest::parse(text, file).map_err(|e| std::io::Error::other(e.to_string()))?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let slot = upstreams::SecretSlot::default();
            let server = match manifest.slug.as_str() {
                "unit-converter" => upstreams::spawn_unit_converter(listener, slot).await?,
                "notes" => upstreams::spawn_notes(listener, slot).await?,
                other => {
                    return Err(std::io::Error::other(format!(
                        "no example server for the built-in manifest '{other}'"
                    ))
                    .into());
                }
            };
            examples.push((manifest, server));
        }
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot listen on {}: {e} (choose another with --listen)",
                        config.listen
                    ),
                )
            })?;
        let addr = listener.local_addr()?;
        config.listen = addr.to_string();
        if config.public_url.is_empty()
            || config.public_url.ends_with(":8080")
            || config.public_url.ends_with(":0")
        {
            config.public_url = format!("http://{addr}");
        }
        config.allow_upstream_hosts.push("127.0.0.1".to_owned());
        let app = App::new(config).await?;
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(app.clone().serve(listener, shutdown.clone()));

        let creator = create_account(&app.store, "demo-creator").await?;
        let user = create_account(&app.store, "demo").await?;
        let creator_key = create_key(
            &app.store,
            &creator.name,
            &NewKey {
                scopes: vec![Scope::ServersWrite, Scope::CatalogRead],
                ..NewKey::default()
            },
        )
        .await?
        .1;
        crate::install_crypto_provider();
        let http = reqwest::Client::new();
        let mut slugs = Vec::new();
        for (manifest, example) in &examples {
            let slug = manifest.slug.clone();
            // Registered as a creator would, through the REST API, at the endpoint of the
            // example started above instead of the manifest's fixed port.
            let response = http
                .post(format!("http://{addr}/api/v1/servers"))
                .bearer_auth(&creator_key)
                .json(&json!({"name": manifest.name, "slug": slug, "description": manifest.description,
                              "categories": manifest.categories, "endpoint": example.url,
                              "pricing": manifest.pricing, "tool_prices": manifest.tool_prices,
                              "timeout": manifest.timeout}))
                .send()
                .await
                .map_err(|e| std::io::Error::other(format!("registering {slug}: {e}")))?;
            let body: serde_json::Value = response
                .json()
                .await
                .map_err(|e| std::io::Error::other(format!("registering {slug}: {e}")))?;
            let secret = body["secret"].as_str().ok_or_else(|| {
                std::io::Error::other(format!("registering {slug} failed: {body}"))
            })?;
            // The creator configures its server to require the secret.
            if let Ok(mut s) = example.secret.write() {
                *s = Some(secret.to_owned());
            }
            app.approve(&slug).await?;
            app.install(&user.id, &slug).await?;
            slugs.push(slug);
        }
        app.ledger
            .topup(&user.id, DEMO_CREDITS_MICROS, "demo credits")
            .await?;
        let key = create_key(
            &app.store,
            &user.name,
            &NewKey {
                scopes: vec![Scope::Invoke, Scope::CatalogRead],
                ..NewKey::default()
            },
        )
        .await?
        .1;
        let info = DemoInfo {
            mcp_url: format!("http://{addr}/mcp"),
            key,
            slugs,
        };
        Ok(Self {
            app,
            info,
            examples,
            shutdown,
            server,
        })
    }

    /// Stops the marketplace and the examples.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.server.await;
        for (_, e) in self.examples {
            e.shutdown().await;
        }
    }
}

/// The text `demo` prints: URL, key, and configuration for Claude Code, Cursor and
/// Windsurf.
pub fn instructions(info: &DemoInfo) -> String {
    let cursor = json!({"mcpServers": {"marketplace": {"url": info.mcp_url, "headers": {"Authorization": format!("Bearer {}", info.key)}}}});
    let windsurf = json!({"mcpServers": {"marketplace": {"serverUrl": info.mcp_url, "headers": {"Authorization": format!("Bearer {}", info.key)}}}});
    format!(
        "mcp-marketplace demo is running.\n\n\
         MCP URL: {url}\nAPI key: {key}\nInstalled: {slugs} (the demo account holds ${credits})\n\n\
         Claude Code:\n  claude mcp add --transport http marketplace {url} --header \"Authorization: Bearer {key}\"\n\n\
         Cursor (~/.cursor/mcp.json):\n{cursor}\n\n\
         Windsurf (~/.codeium/windsurf/mcp_config.json):\n{windsurf}\n\n\
         Try: curl -s {url_base}/api/v1/account -H \"Authorization: Bearer {key}\"\n\
         Press Ctrl-C to stop.",
        url = info.mcp_url,
        key = info.key,
        slugs = info.slugs.join(", "),
        credits = format_usd(DEMO_CREDITS_MICROS),
        cursor = serde_json::to_string_pretty(&cursor).unwrap_or_default(),
        windsurf = serde_json::to_string_pretty(&windsurf).unwrap_or_default(),
        url_base = info.mcp_url.trim_end_matches("/mcp"),
    )
}

/// Runs the demo until Ctrl-C or SIGTERM.
///
/// # Errors
/// As [`Demo::start`].
pub async fn run(config: Config, json_mode: bool) -> Result<(), AppError> {
    let db = config.database_url.clone();
    let demo = Demo::start(config).await?;
    if json_mode {
        println!(
            "{}",
            json!({"mcp_url": demo.info.mcp_url, "key": demo.info.key, "servers": demo.info.slugs})
        );
    } else {
        println!("{}", instructions(&demo.info));
    }
    crate::cli::shutdown_signal().await;
    demo.stop().await;
    if let Some(path) = db.strip_prefix("sqlite://")
        && path.contains("mcp-marketplace-demo-")
    {
        for suffix in ["", "-wal", "-shm", ".master-key"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
    Ok(())
}
