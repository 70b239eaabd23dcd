//! The command line, run as the real binary against a real database, with `register`
//! talking to a running marketplace over HTTP.

mod common;

use std::process::Output;

use common::{Market, TestDb, args, backends, bind, client_at};
use mcp_marketplace::demo::upstreams::{SecretSlot, spawn_unit_converter};
use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

fn bin(db: &str, argv: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mcp-marketplace"))
        .args(argv)
        .env("MCP_MARKETPLACE_DATABASE_URL", db)
        .env("MCP_MARKETPLACE_LOG", "warn")
        // The admin's commands read the same configuration as the server: the test
        // upstreams run on 127.0.0.1.
        .env("MCP_MARKETPLACE_ALLOW_UPSTREAM_HOSTS", "127.0.0.1")
        .env("MCP_MARKETPLACE_MASTER_KEY", common::TEST_MASTER_KEY)
        .output()
        .expect("the binary runs")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
async fn admin_commands_manage_accounts_keys_credits_and_the_ledger() {
    for backend in backends() {
        let db = TestDb::new(backend).await;
        let url = db.url.clone();
        let a = json_of(&bin(&url, &["accounts", "create", "alice", "--json"]));
        assert_eq!(a["account"], json!("alice"));
        // Bad input: a clear error, exit non-zero, nothing written.
        let out = bin(&url, &["accounts", "create", "bad name!", "--json"]);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("invalid account name")
        );
        let out = bin(&url, &["accounts", "create", "alice"]);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("already exists")
        );

        let k = json_of(&bin(
            &url,
            &[
                "keys",
                "create",
                "--account",
                "alice",
                "--scopes",
                "invoke,catalog:read",
                "--json",
            ],
        ));
        let key = k["key"].as_str().unwrap();
        assert!(key.starts_with("mkt_") && key.len() >= 36);
        assert_eq!(k["prefix"].as_str().unwrap(), &key[..12]);
        assert_eq!(k["scopes"], json!(["invoke", "catalog:read"]));
        let out = bin(
            &url,
            &["keys", "create", "--account", "alice", "--scopes", "root"],
        );
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown scope")
        );
        let listed = json_of(&bin(
            &url,
            &["keys", "list", "--account", "alice", "--json"],
        ));
        assert_eq!(listed["keys"].as_array().unwrap().len(), 1);
        assert!(
            !listed.to_string().contains(key),
            "a key is shown once only"
        );

        let g = json_of(&bin(
            &url,
            &[
                "credits",
                "grant",
                "--account",
                "alice",
                "--amount",
                "10.00",
                "--json",
            ],
        ));
        assert_eq!(g["wallet_micros"], json!(10_000_000));
        for bad in ["-5", "0", "abc", "1e3", "0.0000001", "99999999"] {
            let out = bin(
                &url,
                &["credits", "grant", "--account", "alice", "--amount", bad],
            );
            assert!(!out.status.success(), "grant of {bad} refused");
        }
        let out = bin(
            &url,
            &["credits", "grant", "--account", "nobody", "--amount", "1"],
        );
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no account")
        );
        let b = json_of(&bin(
            &url,
            &["ledger", "balance", "--account", "alice", "--json"],
        ));
        assert_eq!(
            b,
            json!({"account": "alice", "wallet_micros": 10_000_000, "holds_micros": 0, "earnings_micros": 0})
        );
        let p = json_of(&bin(&url, &["ledger", "balance", "--platform", "--json"]));
        assert_eq!(p, json!({"revenue_micros": 0, "holds_micros": 0}));
        assert_eq!(
            json_of(&bin(&url, &["ledger", "verify", "--json"]))["ok"],
            json!(true)
        );

        let r = json_of(&bin(&url, &["keys", "revoke", &key[..12], "--json"]));
        assert_eq!(r["revoked"], json!(true));
        let out = bin(&url, &["keys", "revoke", "mkt_nothere0"]);
        assert!(!out.status.success());

        // ledger verify notices a tampered balance.
        let store = mcp_marketplace::store::Store::connect(&url).await.unwrap();
        sqlx::query("UPDATE ledger_accounts SET balance = balance + 1 WHERE kind = 'wallet'")
            .execute(store.pool())
            .await
            .unwrap();
        store.close().await;
        let out = bin(&url, &["ledger", "verify"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stdout).contains("entries sum to"));
    }
}

// Multi-threaded: the binary runs blocking while the in-process marketplace serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creator_registers_with_the_cli_and_an_admin_approves() {
    for backend in backends() {
        let market = Market::start(TestDb::new(backend).await).await;
        let url = market.db.url.clone();
        let units = spawn_unit_converter(bind().await, SecretSlot::default())
            .await
            .unwrap();
        json_of(&bin(&url, &["accounts", "create", "maker", "--json"]));
        json_of(&bin(&url, &["accounts", "create", "agent", "--json"]));
        let maker_key = json_of(&bin(
            &url,
            &[
                "keys",
                "create",
                "--account",
                "maker",
                "--scopes",
                "servers:write",
                "--json",
            ],
        ))["key"]
            .as_str()
            .unwrap()
            .to_owned();
        let register = |extra: &[&str]| {
            let mut argv = vec![
                "register",
                "--marketplace",
                &market.base,
                "--api-key",
                &maker_key,
                "--name",
                "Unit Converter",
                "--json",
            ];
            argv.extend_from_slice(extra);
            bin(&url, &argv)
        };
        // Refused: bad URL, slug, price.
        for extra in [
            &[
                "--endpoint",
                "ftp://x.example.com/mcp",
                "--pricing",
                "0.02_per_request",
            ][..],
            &[
                "--endpoint",
                &units.url,
                "--pricing",
                "0.02_per_request",
                "--slug",
                "Bad_Slug",
            ][..],
            &["--endpoint", &units.url, "--pricing", "-0.02_per_request"][..],
            &[
                "--endpoint",
                &units.url,
                "--pricing",
                "0.02_per_request",
                "--tool-price",
                "convert",
            ][..],
        ] {
            let out = register(extra);
            assert!(!out.status.success(), "{extra:?} should be refused");
            assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
        }
        assert!(
            json_of(&bin(&url, &["servers", "list", "--json"]))["servers"]
                .as_array()
                .unwrap()
                .is_empty()
        );

        let created = json_of(&register(&[
            "--endpoint",
            &units.url,
            "--pricing",
            "0.02_per_request",
            "--slug",
            "units",
            "--tool-price",
            "list_units=0.001",
        ]));
        assert_eq!(created["slug"], json!("units"));
        assert_eq!(created["status"], json!("pending_review"));
        *units.secret.write().unwrap() = Some(created["secret"].as_str().unwrap().to_owned());

        let approved = json_of(&bin(&url, &["servers", "approve", "units", "--json"]));
        assert_eq!(approved["status"], json!("active"));
        assert!(approved["tools"].as_u64().unwrap() >= 2);
        json_of(&bin(
            &url,
            &[
                "servers",
                "install",
                "units",
                "--account",
                "agent",
                "--json",
            ],
        ));
        json_of(&bin(
            &url,
            &[
                "credits",
                "grant",
                "--account",
                "agent",
                "--amount",
                "1",
                "--json",
            ],
        ));
        let agent_key = json_of(&bin(
            &url,
            &[
                "keys",
                "create",
                "--account",
                "agent",
                "--scopes",
                "invoke",
                "--json",
            ],
        ))["key"]
            .as_str()
            .unwrap()
            .to_owned();

        // The running marketplace serves what the CLI set up.
        let client = client_at(&market.mcp_url(), &agent_key).await;
        let r = client
            .call_tool(
                CallToolRequestParams::new("units__list_units").with_arguments(args(json!({}))),
            )
            .await
            .unwrap();
        let receipt = r.meta.as_ref().unwrap().0["mcp-marketplace/receipt"].clone();
        assert_eq!(
            receipt["charged_micros"],
            json!(1_000),
            "per-tool price override"
        );
        client.cancel().await.ok();

        // receipt verify: the receipt verifies; a tampered one does not.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("receipt.json");
        std::fs::write(&file, receipt.to_string()).unwrap();
        let ok = json_of(&bin(
            &url,
            &["receipt", "verify", file.to_str().unwrap(), "--json"],
        ));
        assert_eq!(ok["valid"], json!(true));
        let jwks_url = format!("{}/.well-known/jwks.json", market.base);
        let ok = json_of(&bin(
            &url,
            &[
                "receipt",
                "verify",
                file.to_str().unwrap(),
                "--jwks",
                &jwks_url,
                "--json",
            ],
        ));
        assert_eq!(ok["valid"], json!(true));
        let mut tampered = receipt.clone();
        tampered["charged_micros"] = json!(0);
        std::fs::write(&file, tampered.to_string()).unwrap();
        let out = bin(&url, &["receipt", "verify", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));

        let suspended = json_of(&bin(&url, &["servers", "suspend", "units", "--json"]));
        assert_eq!(suspended["status"], json!("suspended"));
        assert_eq!(
            json_of(&bin(&url, &["ledger", "verify", "--json"]))["ok"],
            json!(true)
        );
        market.stop().await;
        units.shutdown().await;
    }
}

#[test]
fn config_file_and_variables_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("from-file.db").display());
    let cfg = dir.path().join("market.toml");
    std::fs::write(
        &cfg,
        format!("database_url = \"{db}\"\nplatform_fee_bps = 2500\n"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-marketplace"))
        .args([
            "accounts",
            "create",
            "carol",
            "--config",
            cfg.to_str().unwrap(),
            "--json",
        ])
        .env_remove("MCP_MARKETPLACE_DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dir.path().join("from-file.db").exists(),
        "the file's database_url was used"
    );
    // Every setting is also a variable, which wins over the file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-marketplace"))
        .args(["--config", cfg.to_str().unwrap(), "ledger", "verify"])
        .env("MCP_MARKETPLACE_PLATFORM_FEE_BPS", "12000")
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("platform_fee_bps"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-marketplace"))
        .args(["--config", "/nonexistent/market.toml", "ledger", "verify"])
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("cannot read config file")
    );
}

fn fails_with(out: &Output, needle: &str) {
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(needle),
        "expected a failure mentioning '{needle}': {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// The trust layer's commands: two spend limits per key, credentials and secret
// rotation (creator, over REST; admin, on the database), policies, tool approvals and
// the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_commands_set_limits_credentials_policies_and_read_the_audit_log() {
    let market = Market::start(TestDb::new(common::Backend::Sqlite).await).await;
    let url = market.db.url.clone();
    let units = spawn_unit_converter(bind().await, SecretSlot::default())
        .await
        .unwrap();
    json_of(&bin(&url, &["accounts", "create", "maker", "--json"]));
    let k = json_of(&bin(
        &url,
        &[
            "keys",
            "create",
            "--account",
            "maker",
            "--scopes",
            "servers:write,invoke",
            "--spend-limit",
            "5/day",
            "--spend-limit",
            "50.00/month",
            "--json",
        ],
    ));
    let maker_key = k["key"].as_str().unwrap().to_owned();
    let listed = json_of(&bin(
        &url,
        &["keys", "list", "--account", "maker", "--json"],
    ));
    assert_eq!(listed["keys"][0]["daily_limit_micros"], json!(5_000_000));
    assert_eq!(listed["keys"][0]["monthly_limit_micros"], json!(50_000_000));
    fails_with(
        &bin(
            &url,
            &[
                "keys",
                "create",
                "--account",
                "maker",
                "--spend-limit",
                "1/day,2/day",
            ],
        ),
        "spend limit",
    );
    // Register with a credential; it is never printed back.
    let remote = [
        "--marketplace",
        market.base.as_str(),
        "--api-key",
        maker_key.as_str(),
    ];
    let mut argv = vec![
        "register",
        "--name",
        "Units",
        "--slug",
        "units",
        "--endpoint",
        &units.url,
        "--pricing",
        "0.01_per_request",
        "--credential",
        "X-Api-Key: k-7e2b",
        "--json",
    ];
    argv.extend_from_slice(&remote);
    let created = json_of(&bin(&url, &argv));
    assert!(!created.to_string().contains("k-7e2b"));
    *units.secret.write().unwrap() = Some(created["secret"].as_str().unwrap().to_owned());
    json_of(&bin(&url, &["servers", "approve", "units", "--json"]));
    let mut argv = vec!["credentials", "list", "--slug", "units", "--json"];
    argv.extend_from_slice(&remote);
    let creds = json_of(&bin(&url, &argv));
    assert_eq!(creds["headers"][0]["header"], json!("x-api-key"));
    assert!(!creds.to_string().contains("k-7e2b"));
    let mut argv = vec![
        "credentials",
        "set",
        "--slug",
        "units",
        "--header",
        "Authorization Bearer x",
        "--json",
    ];
    argv.extend_from_slice(&remote);
    let out = bin(&url, &argv);
    fails_with(&out, "Name: value");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("Bearer x"));
    let mut argv = vec!["credentials", "rotate-secret", "--slug", "units", "--json"];
    argv.extend_from_slice(&remote);
    let rotated = json_of(&bin(&url, &argv))["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let admin_rotated = json_of(&bin(&url, &["servers", "rotate-secret", "units", "--json"]));
    assert_ne!(admin_rotated["secret"].as_str().unwrap(), rotated);
    // Policies: set, show, refuse what a server cannot set, clear.
    let set = json_of(&bin(
        &url,
        &[
            "policy",
            "set",
            "--server",
            "units",
            "--per-account-per-server",
            "5/min",
            "--scan",
            "block",
            "--max-concurrency",
            "3",
            "--redact",
            "$.email",
            "--json",
        ],
    ));
    assert_eq!(set["policy"]["per_account_per_server"], json!("5/min"));
    assert_eq!(set["policy"]["scan"], json!("block"));
    let shown = json_of(&bin(
        &url,
        &["policy", "show", "--server", "units", "--json"],
    ));
    assert_eq!(shown["policy"]["max_concurrency"], json!(3));
    assert_eq!(shown["policy"]["redact"], json!(["$.email"]));
    fails_with(
        &bin(
            &url,
            &["policy", "set", "--server", "units", "--per-key", "5/min"],
        ),
        "cannot set per_key",
    );
    fails_with(
        &bin(
            &url,
            &[
                "policy",
                "set",
                "--account",
                "maker",
                "--per-account",
                "5/week",
            ],
        ),
        "invalid rate",
    );
    fails_with(
        &bin(
            &url,
            &[
                "policy",
                "set",
                "--key",
                k["key_id"].as_str().unwrap(),
                "--redact",
                "email",
            ],
        ),
        "redaction path",
    );
    json_of(&bin(
        &url,
        &[
            "policy",
            "set",
            "--account",
            "maker",
            "--per-account",
            "off",
            "--json",
        ],
    ));
    json_of(&bin(
        &url,
        &[
            "policy",
            "set",
            "--key",
            k["prefix"].as_str().unwrap(),
            "--per-key",
            "10/sec",
            "--json",
        ],
    ));
    let cleared = json_of(&bin(
        &url,
        &["policy", "clear", "--server", "units", "--json"],
    ));
    assert_eq!(cleared["policy"]["scan"], Value::Null);
    // Tool approvals: nothing is held back after the first approval.
    let changes = json_of(&bin(&url, &["servers", "changes", "units", "--json"]));
    assert_eq!(changes["pending"], json!([]));
    let approved = json_of(&bin(
        &url,
        &["servers", "approve", "units", "--tools", "--json"],
    ));
    assert_eq!(approved["approved_tools"], json!([]));
    // The audit log: who did what.
    json_of(&bin(
        &url,
        &["keys", "revoke", k["prefix"].as_str().unwrap(), "--json"],
    ));
    let log = json_of(&bin(&url, &["audit", "--since", "1h", "--json"]));
    let actions: Vec<&str> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for expected in [
        "key.create",
        "key.revoke",
        "server.approve",
        "server.credentials_set",
        "server.secret_rotate",
        "policy.set",
    ] {
        assert!(
            actions.contains(&expected),
            "{expected} missing from {actions:?}"
        );
    }
    let only = json_of(&bin(&url, &["audit", "--action", "key.revoke", "--json"]));
    assert_eq!(only["entries"].as_array().unwrap().len(), 1);
    assert!(
        only["entries"][0]["actor"]
            .as_str()
            .unwrap()
            .starts_with("cli:")
    );
    assert!(!log.to_string().contains("k-7e2b") && !log.to_string().contains(&rotated));
    market.stop().await;
    units.shutdown().await;
}
#[tokio::test]
async fn billing_commands_manage_plans_invoices_the_close_and_payouts() {
    for backend in backends() {
        let db = TestDb::new(backend).await;
        let url = db.url.clone();
        // One command line, words separated by spaces.
        let run = |line: &str| bin(&url, &line.split_whitespace().collect::<Vec<_>>());
        let ok = |line: &str| json_of(&run(line));
        let fails_with = |line: &str, text: &str| {
            let out = run(line);
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(
                !out.status.success() && stderr.contains(text),
                "{line}: {stderr}"
            );
        };
        ok("accounts create buyer --json");
        ok("accounts create maker --json");

        let plans = ok("billing plans list --json");
        assert_eq!(plans["default_plan"], "free");
        let ids: Vec<_> = plans["plans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, ["enterprise", "free", "pro"]);

        // Plans: refusals first, then a change paid from the wallet.
        fails_with(
            "billing plans set --account buyer --plan pro",
            "insufficient credits",
        );
        fails_with(
            "billing plans set --account buyer --plan gold",
            "no plan 'gold'",
        );
        fails_with(
            "billing plans set --account buyer --plan pro --from soon",
            "is not a time",
        );
        fails_with(
            "billing plans set --account nobody --plan pro",
            "no account named",
        );
        ok("credits grant --account buyer --amount 30.00 --json");
        let set = ok("billing plans set --account buyer --plan pro --json");
        let fee = set["booked"]["fee_micros"].as_i64().unwrap();
        assert!(fee > 0 && fee <= 20_000_000, "{set}");
        let shown = ok("billing plans show --account buyer --json");
        assert_eq!(shown["plan"]["id"], "pro");
        assert_eq!(shown["history"].as_array().unwrap().len(), 1);

        // Alerts and payees.
        let low = ok("billing low-balance --account buyer --threshold 5.00 --json");
        assert_eq!(low["low_balance_threshold_micros"], 5_000_000);
        fails_with(
            "billing low-balance --account buyer --threshold lots",
            "not an amount",
        );
        ok("billing payee --account maker --paypal maker@example.com --json");
        fails_with(
            "billing payee --account maker --stripe maker@example.com",
            "acct_",
        );

        // This month's invoice is a draft; the month cannot be closed yet.
        let month = mcp_marketplace::billing::Month::of_ms(mcp_marketplace::store::now_ms());
        let draft = ok(&format!(
            "billing invoice --account buyer --month {month} --json"
        ));
        assert_eq!(draft["status"], "draft");
        assert_eq!(draft["totals"]["subscription_micros"], fee);
        let csv = run(&format!(
            "billing invoice --account buyer --month {month} --format csv"
        ));
        assert!(String::from_utf8_lossy(&csv.stdout).starts_with("invoice,account,month,kind"));
        fails_with(
            &format!("billing close --month {month}"),
            "cannot be closed before",
        );
        fails_with("billing close --month 2026-13", "is not a month");
        fails_with("billing payouts --month 2020-02", "not closed yet");

        // A past month closes once; its payouts write both batch files.
        let closed = ok("billing close --month 2020-01 --json");
        assert_eq!(
            (
                closed["invoices"].as_i64(),
                closed["already_closed"].as_bool()
            ),
            (Some(0), Some(false))
        );
        assert_eq!(
            ok("billing close --month 2020-01 --json")["already_closed"],
            true
        );
        let out_dir = tempfile::tempdir().unwrap();
        let payouts = ok(&format!(
            "billing payouts --month 2020-01 --out-dir {} --json",
            out_dir.path().display()
        ));
        assert_eq!(payouts["payouts"], json!([]));
        let stripe =
            std::fs::read_to_string(out_dir.path().join("payouts-2020-01-stripe.csv")).unwrap();
        assert_eq!(
            stripe,
            "destination,amount,currency,description,transfer_group,idempotency_key\n"
        );
        assert!(out_dir.path().join("payouts-2020-01-paypal.csv").exists());

        let usage = run("billing usage --account buyer");
        assert_eq!(
            String::from_utf8_lossy(&usage.stdout).lines().next(),
            Some(
                mcp_marketplace::billing::usage::CSV_HEADER
                    .join(",")
                    .as_str()
            )
        );
        assert_eq!(ok("billing renew --json")["booked"], 0);
        assert_eq!(
            ok("ledger balance --platform --json")["revenue_micros"],
            fee
        );
        assert_eq!(ok("ledger verify --json")["ok"], true);
    }
}

#[test]
fn plans_come_from_the_config_file_and_variables() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("plans.db").display());
    let cfg = dir.path().join("market.toml");
    std::fs::write(
        &cfg,
        format!(
            "database_url = \"{db}\"\n[billing]\npayout_threshold = \"25.00\"\n\
             [plans.team]\nname = \"Team\"\nmonthly_fee = \"50.00\"\nmonthly_calls = 50000\n\
             rate_limits = {{ per_key = \"100/min\" }}\n"
        ),
    )
    .unwrap();
    let run = |extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-marketplace"));
        cmd.args([
            "--config",
            cfg.to_str().unwrap(),
            "billing",
            "plans",
            "list",
            "--json",
        ])
        .env_remove("MCP_MARKETPLACE_DATABASE_URL");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let plans = json_of(&run(&[(
        "MCP_MARKETPLACE_PLANS__PRO__MONTHLY_FEE",
        "25.00",
    )]));
    let plan = |id: &str| {
        plans["plans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(plan("team")["monthly_fee_micros"], 50_000_000);
    assert_eq!(plan("team")["monthly_calls"], 50_000);
    assert_eq!(plan("team")["rate_limits"]["per_key"], "100/min");
    assert_eq!(
        plan("pro")["monthly_fee_micros"],
        25_000_000,
        "the variable wins"
    );
    assert_eq!(
        plan("pro")["included_credits_micros"],
        20_000_000,
        "the rest is built in"
    );
    let out = run(&[("MCP_MARKETPLACE_PLANS__PRO__MONTHLY_CALLS", "many")]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("monthly_calls"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[("MCP_MARKETPLACE_BILLING__DEFAULT_PLAN", "team")]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("must be free"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `http_idle_timeout` and `max_connections` (README "Configuration"): a value that
/// could serve nothing is refused at start, naming the setting.
#[test]
fn http_limits_out_of_range_are_refused() {
    for (var, value, needle) in [
        (
            "MCP_MARKETPLACE_HTTP_IDLE_TIMEOUT",
            "0s",
            "http_idle_timeout",
        ),
        (
            "MCP_MARKETPLACE_HTTP_IDLE_TIMEOUT",
            "soon",
            "http_idle_timeout",
        ),
        ("MCP_MARKETPLACE_MAX_CONNECTIONS", "0", "max_connections"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}", dir.path().join("market.db").display());
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-marketplace"))
            .args(["ledger", "verify"])
            .env("MCP_MARKETPLACE_DATABASE_URL", &db)
            .env(var, value)
            .output()
            .unwrap();
        fails_with(&out, needle);
        assert!(
            !dir.path().join("market.db").exists(),
            "{var}={value}: nothing was created"
        );
    }
}
