//! Issue 3 end to end over TLS: an unmodified MCP client (PyPI `mcp`, httpx)
//! in a selected cgroup calls `https://mcp.test:8443/mcp` (resolved to
//! 127.0.0.2 by an /etc/hosts of its own mount namespace) and trusts only
//! kya's CA, the way a host that ran `kya ca install` would. The server
//! (hypercorn) has a certificate from a test CA that only kya trusts
//! (`--upstream-ca`). A passthrough host is spliced without decryption, and an
//! upstream whose certificate kya cannot verify is refused.

use kya_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn ran(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("peer.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The real Python client, in the cgroup and in a mount namespace whose
/// /etc/hosts names mcp.test; it trusts only `trust` (`SSL_CERT_FILE`).
fn client(cg: &TestCgroup, dir: &Path, trust: &Path, url: &str, args: &[&str]) -> Value {
    let mut prog = vec![peers().join(".venv/bin/python"), peers().join("client.py")];
    prog.push(PathBuf::from(url));
    run_in_agent_ns(cg, dir, &prog, args, &[("SSL_CERT_FILE", trust)])
}

/// The real Node client (npm @modelcontextprotocol/sdk), the same way; Node
/// takes extra roots from `NODE_EXTRA_CA_CERTS`.
fn node_client(cg: &TestCgroup, dir: &Path, trust: &Path, url: &str, args: &[&str]) -> Value {
    let prog = vec![
        PathBuf::from("node"),
        peers().join("client.mjs"),
        PathBuf::from(url),
    ];
    run_in_agent_ns(cg, dir, &prog, args, &[("NODE_EXTRA_CA_CERTS", trust)])
}

/// The peers' `search_docs` is allowed, `delete_*` denied, anything else denied.
const POLICY: &str = kya_e2e::DOCS_POLICY;

fn setup(tag: &str) -> (tempfile::TempDir, TestCgroup) {
    ensure_peers();
    let dir = tempfile::tempdir().expect("tempdir");
    test_pki(dir.path());
    std::fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
    let sink = dir.path().join("ocsf.jsonl");
    std::fs::write(
        dir.path().join("kya.toml"),
        format!(
            "[intercept]\npassthrough = [\"pinned.test\"]\n[audit]\nsinks = [\"file:{}\"]\n",
            sink.display()
        ),
    )
    .expect("config");
    (dir, TestCgroup::new(tag))
}

#[test]
fn tls_is_terminated_with_kyas_ca_and_every_call_decided() {
    if !privileged("tls_is_terminated_with_kyas_ca_and_every_call_decided") {
        return;
    }
    let _g = serial();
    let (dir, cg) = setup("tls");
    let d = dir.path();
    let _server = Hypercorn::start_tls(d, &["127.0.0.2:8443"]);
    let mut opts = DaemonOptions::new(931).args([
        "--policy",
        d.join("policy.toml").to_str().expect("utf-8"),
        "--cgroup",
        &cg.rel,
        "--port",
        "8443",
        "--upstream-ca",
        d.join("test-ca.pem").to_str().expect("utf-8"),
    ]);
    opts.config = Some(d.join("kya.toml"));
    // The daemon resolves the passthrough name (pinned.test) the way the agent does.
    opts.hosts = Some(d.join("hosts"));
    let daemon = Daemon::start(opts);
    let kya_ca = daemon.state_dir.path().join("ca.pem");
    assert!(kya_ca.exists(), "kya run must create its CA");

    // The client trusts only kya's CA: it can only succeed through kya.
    let url = "https://mcp.test:8443/mcp";
    let r = client(
        &cg,
        d,
        &kya_ca,
        url,
        &["search_docs", r#"{"query": "tls"}"#],
    );
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about tls");
    let r = client(
        &cg,
        d,
        &kya_ca,
        url,
        &["delete_records", r#"{"table": "t"}"#],
    );
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("no-delete"),
        "{r}"
    );
    assert_eq!(ran(d), vec!["search_docs"], "the server's own record");

    // The Node SDK client, trusting kya's CA the way Node does.
    let r = node_client(
        &cg,
        d,
        &kya_ca,
        url,
        &["search_docs", r#"{"query": "node"}"#],
    );
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about node");
    let r = node_client(
        &cg,
        d,
        &kya_ca,
        url,
        &["delete_records", r#"{"table": "t"}"#],
    );
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"]
            .as_str()
            .unwrap_or("")
            .contains("kya denied this call"),
        "{r}"
    );
    assert_eq!(
        ran(d),
        vec!["search_docs", "search_docs"],
        "the server's own record"
    );

    // The export sink got every tool-call decision as OCSF API Activity.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ocsf = loop {
        let lines: Vec<Value> = std::fs::read_to_string(d.join("ocsf.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &Value| v["api"]["operation"] == "tools/call")
            .collect();
        if lines.len() >= 4 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ocsf.len(), 4, "{ocsf:#?}");
    assert!(ocsf.iter().all(|v| v["class_uid"] == 6003), "{ocsf:#?}");
    assert_eq!(
        ocsf.iter().filter(|v| v["disposition_id"] == 2).count(),
        2,
        "two blocked: {ocsf:#?}"
    );
    let status = Command::new(kya_bin())
        .args(["status", "--json", "--state-dir"])
        .arg(daemon.state_dir.path())
        .output()
        .expect("kya status");
    let status: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert!(
        status["sinks"][0]["written"].as_u64() >= Some(4),
        "{status}"
    );
    assert_eq!(status["sinks"][0]["failures"], 0, "{status}");

    // Passthrough: spliced untouched, so the client sees the real certificate
    // (it trusts only the test CA here) and kya decides nothing.
    let before = daemon.log_text().matches("\"tools/call\"").count();
    let r = client(
        &cg,
        d,
        &d.join("test-ca.pem"),
        "https://pinned.test:8443/mcp",
        &["search_docs", r#"{"query": "pinned"}"#],
    );
    assert_eq!(r["text"], "found 3 documents about pinned", "{r}");
    assert!(
        daemon.log_text().contains("passthrough host"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(daemon.log_text().matches("\"tools/call\"").count(), before);
}

#[test]
fn an_upstream_certificate_kya_cannot_verify_is_refused() {
    if !privileged("an_upstream_certificate_kya_cannot_verify_is_refused") {
        return;
    }
    let _g = serial();
    let (dir, cg) = setup("badcert");
    let d = dir.path();
    let _server = Hypercorn::start_tls(d, &["127.0.0.2:8443"]);
    // No --upstream-ca: the test CA is unknown to kya.
    let daemon = Daemon::start(DaemonOptions::new(932).args([
        "--policy",
        d.join("policy.toml").to_str().expect("utf-8"),
        "--cgroup",
        &cg.rel,
        "--port",
        "8443",
    ]));
    let kya_ca = daemon.state_dir.path().join("ca.pem");
    let r = client(
        &cg,
        d,
        &kya_ca,
        "https://mcp.test:8443/mcp",
        &["search_docs", r#"{"query": "x"}"#],
    );
    assert!(
        r.get("error").is_some(),
        "the agent must fail, not be served unverified: {r}"
    );
    assert!(ran(d).is_empty(), "nothing may reach the server");
    let log = daemon.log_text();
    assert!(log.contains("upstream TLS failed"), "{log}");
    // The refusal is audited (and on the live stream).
    let ev = Command::new(kya_bin())
        .args(["events", "--json", "--state-dir"])
        .arg(daemon.state_dir.path())
        .output()
        .expect("kya events");
    let text = String::from_utf8_lossy(&ev.stdout);
    assert!(
        text.contains("kya:protocol") && text.contains("upstream TLS"),
        "{text}"
    );
}
