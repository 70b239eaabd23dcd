//! The official MCP Python SDK (PyPI `mcp`) as an independent client: it initializes
//! against the marketplace's streamable-HTTP `/mcp`, lists the namespaced tools, makes a
//! paid call whose signed receipt verifies against the JWKS, reads its balance, and gets
//! a JSON-RPC error for an unknown tool — and the ledger moves by exactly one call.
//!
//! The interpreter is `MCP_TEST_PYTHON`, else `target/py-venv/bin/python`, created with
//! `python3 -m venv` + `pip install mcp` when missing. A missing Python fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{UNITS_PRICE, World, backends};
use mcp_marketplace::auth::signing::keys_from_jwks;
use mcp_marketplace::billing::Receipt;
use serde_json::{Value, json};

const FUNDS: i64 = 1_000_000;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn python_sdk_client_calls_tools_and_is_billed() {
    let python = python_with_mcp_sdk();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/client.py");
    for backend in backends() {
        let w = World::start(backend, FUNDS).await;
        let wallet_before = w.market.balance(&w.user).await.wallet_micros;
        let earnings_before = w.market.balance(&w.creator).await.earnings_micros;
        let revenue_before = w.market.platform().await.revenue_micros;

        let out = run_client(&python, &script, &w.market.mcp_url(), &w.key).await;

        let tools: Vec<&str> = out["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for expected in ["units__convert", "marketplace__get_balance"] {
            assert!(
                tools.contains(&expected),
                "{expected} missing from {tools:?} ({backend:?})"
            );
        }

        let convert = &out["convert"];
        assert_eq!(convert["is_error"], json!(false), "{convert} ({backend:?})");
        let text = convert["text"].as_str().expect("convert text");
        assert!(text.contains("6.21"), "10 km in miles: {text}");
        let receipt_json = convert["meta"]
            .get("mcp-marketplace/receipt")
            .expect("receipt in the result's _meta");
        let receipt = Receipt::from_json(receipt_json).expect("receipt parses");
        receipt
            .verify(&keys_from_jwks(&w.market.jwks().await))
            .expect("receipt signature verifies against the JWKS");
        assert_eq!(receipt.outcome, "settled");
        assert_eq!(receipt.charged_micros, UNITS_PRICE);
        assert_eq!(
            (receipt.server.as_str(), receipt.tool.as_str()),
            ("units", "convert")
        );
        assert_eq!(receipt.account, "user");

        assert_eq!(
            out["balance"]["balance_micros"],
            json!(FUNDS - UNITS_PRICE),
            "{} ({backend:?})",
            out["balance"]
        );

        let unknown = out["unknown_tool_error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error for an unknown tool: {out}"));
        assert!(unknown.contains("Unknown tool"), "{unknown}");

        let user = w.market.balance(&w.user).await;
        assert_eq!(
            wallet_before - user.wallet_micros,
            UNITS_PRICE,
            "wallet ({backend:?})"
        );
        assert_eq!(user.holds_micros, 0);
        assert_eq!(
            w.market.balance(&w.creator).await.earnings_micros - earnings_before,
            UNITS_PRICE * 70 / 100
        );
        let platform = w.market.platform().await;
        assert_eq!(
            platform.revenue_micros - revenue_before,
            UNITS_PRICE * 30 / 100
        );
        assert_eq!(platform.holds_micros, 0);
        w.market.assert_ledger_ok().await;
        w.stop().await;
    }
}

/// The Python SDK client sees `marketplace__install_server` / `uninstall_server`
/// change its `tools/list` in an open session, announced by
/// `notifications/tools/list_changed` (issue 5 item 4).
#[tokio::test]
async fn python_sdk_client_gets_list_changed_on_install_and_uninstall() {
    let python = python_with_mcp_sdk();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/list_changed.py");
    for backend in backends() {
        let w = World::start(backend, FUNDS).await;
        // The world's user starts with both servers installed: start from none.
        for slug in ["units", "notes"] {
            w.market.app.uninstall(&w.user.id, slug).await.unwrap();
        }
        let out = run_script(&python, &script, &[&w.market.mcp_url(), &w.key, "units"]).await;
        let names = |k: &str| -> Vec<String> {
            out[k]
                .as_array()
                .unwrap_or_else(|| panic!("{k} missing: {out}"))
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        assert!(
            !names("before").iter().any(|n| n.starts_with("units__")),
            "{out}"
        );
        assert!(
            names("after_install").contains(&"units__convert".to_owned()),
            "{out}"
        );
        assert!(
            !names("after_uninstall")
                .iter()
                .any(|n| n.starts_with("units__")),
            "{out}"
        );
        assert!(out["notifications"].as_i64().unwrap_or(0) >= 2, "{out}");
        w.stop().await;
    }
}

/// Runs `client.py` and parses the one JSON object it prints.
async fn run_client(python: &Path, script: &Path, url: &str, key: &str) -> Value {
    run_script(python, script, &[url, key]).await
}

/// Runs a Python client script with `args` and parses the one JSON object it prints.
async fn run_script(python: &Path, script: &Path, args: &[&str]) -> Value {
    let child = tokio::process::Command::new(python)
        .arg(script)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(CLIENT_TIMEOUT, child)
        .await
        .unwrap_or_else(|_| panic!("the Python client did not finish within {CLIENT_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client failed ({}):\n{stderr}\nstdout: {stdout}",
        output.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("client output is not JSON ({e}): {stdout}\n{stderr}"))
}

/// A Python interpreter that can `import mcp`, creating `target/py-venv` if needed.
fn python_with_mcp_sdk() -> PathBuf {
    if let Some(python) = std::env::var_os("MCP_TEST_PYTHON").filter(|p| !p.is_empty()) {
        let python = PathBuf::from(python);
        assert!(
            has_mcp_sdk(&python),
            "MCP_TEST_PYTHON={} cannot `import mcp`",
            python.display()
        );
        return python;
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let venv = target.join("py-venv");
    let python = venv.join("bin/python");
    if has_mcp_sdk(&python) {
        return python;
    }
    std::fs::create_dir_all(&target).expect("create target/");
    let _lock = DirLock::acquire(target.join("py-venv.lock"));
    if !has_mcp_sdk(&python) {
        if !python.exists() {
            run_setup(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        }
        run_setup(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "mcp"]));
        assert!(
            has_mcp_sdk(&python),
            "{} still cannot `import mcp` after pip install",
            python.display()
        );
    }
    python
}

fn has_mcp_sdk(python: &Path) -> bool {
    python.exists()
        && Command::new(python)
            .args(["-c", "import mcp.client.streamable_http"])
            .output()
            .is_ok_and(|o| o.status.success())
}

fn run_setup(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("Python SDK setup: cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "Python SDK setup failed: {shown} ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A cross-process mutex: `create_dir` is atomic. A lock older than ten minutes is stale.
struct DirLock(PathBuf);

impl DirLock {
    fn acquire(path: PathBuf) -> Self {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            match std::fs::create_dir(&path) {
                Ok(()) => return Self(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok());
                    if age.is_some_and(|a| a > Duration::from_secs(600)) {
                        let _ = std::fs::remove_dir(&path);
                    }
                    assert!(
                        Instant::now() < deadline,
                        "timed out waiting for the lock {}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("cannot create the lock {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
