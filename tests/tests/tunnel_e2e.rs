//! An unmodified MCP client (PyPI `mcp`, httpx) honouring `HTTPS_PROXY`:
//! it asks a real CONNECT proxy on a guarded port for a tunnel to
//! `mcp.test:8443` and speaks TLS inside. kya forwards the CONNECT, follows
//! the tunnel and decides every call with the tunnel's target as the server,
//! judged on the MCP server's own record.

use kya_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const PROXY: &str = "127.0.0.5:3128";

const POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"

[[rule]]
id = "docs-ok"
tool = "search_docs"
verdict = "allow"

[[rule]]
id = "no-delete"
tool = "delete_*"
verdict = "deny"

[[rule]]
id = "transfer-only-on-mcp-test"
tool = "transfer"
server = "mcp.test"
verdict = "allow"
"#;

fn ran(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("peer.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The real Python client in the cgroup, trusting only kya's CA, with
/// `HTTPS_PROXY` naming the proxy.
fn client(cg: &TestCgroup, dir: &Path, trust: &Path, args: &[&str]) -> Value {
    let prog = vec![
        peers().join(".venv/bin/python"),
        peers().join("client.py"),
        PathBuf::from("https://mcp.test:8443/mcp"),
    ];
    let proxy = PathBuf::from(format!("http://{PROXY}"));
    let none = PathBuf::from("");
    run_in_agent_ns(
        cg,
        dir,
        &prog,
        args,
        &[
            ("SSL_CERT_FILE", trust),
            ("HTTPS_PROXY", &proxy),
            ("NO_PROXY", &none),
        ],
    )
}

#[test]
fn an_agent_behind_https_proxy_is_decided_through_the_tunnel() {
    if !privileged("an_agent_behind_https_proxy_is_decided_through_the_tunnel") {
        return;
    }
    let _g = serial();
    ensure_peers();
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    test_pki(d);
    std::fs::write(d.join("policy.toml"), POLICY).expect("policy");
    let cg = TestCgroup::new("tunnel");
    let _server = Hypercorn::start_tls(d, &["127.0.0.2:8443"]);
    let proxy = ConnectProxy::start(d, PROXY);
    let mut opts = DaemonOptions::new(937).args([
        "--policy",
        d.join("policy.toml").to_str().expect("utf-8"),
        "--cgroup",
        &cg.rel,
        "--port",
        "3128",
        "--upstream-ca",
        d.join("test-ca.pem").to_str().expect("utf-8"),
    ]);
    opts.hosts = Some(d.join("hosts"));
    let daemon = Daemon::start(opts);
    let kya_ca = daemon.state_dir.path().join("ca.pem");

    let r = client(&cg, d, &kya_ca, &["search_docs", r#"{"query": "proxy"}"#]);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about proxy", "{r}");
    let r = client(&cg, d, &kya_ca, &["delete_records", r#"{"table": "t"}"#]);
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("kya denied"),
        "{r}"
    );
    // Allowed only where the server is mcp.test: policy sees the tunnel's
    // target, not the proxy's address.
    let r = client(
        &cg,
        d,
        &kya_ca,
        &["transfer", r#"{"amount": 1, "to": "alice"}"#],
    );
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(
        ran(d),
        vec!["search_docs", "transfer"],
        "the server's own record"
    );
    let tunnels = proxy.tunnels();
    assert!(
        !tunnels.is_empty() && tunnels.iter().all(|t| t == "mcp.test:8443"),
        "every call went through the proxy: {tunnels:?}"
    );
    assert!(
        daemon.log_text().contains("following a CONNECT tunnel"),
        "{}",
        daemon.log_text()
    );
}
