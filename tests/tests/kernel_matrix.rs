//! The checks that depend on the kernel, in one test: run here on the
//! machine's own kernel by the normal suite, and booted on each kernel of the
//! matrix (Debian 12's 6.1, Debian's 6.12) by `cargo xtask kernel-matrix`,
//! which runs this same test binary inside the guest.
//!
//! Load and attach, redirect of a selected process with its original peer,
//! an unselected process untouched, one allowed and one denied MCP call with
//! their audit records, and fail closed after `kill -9` of the daemon. Judged
//! on the peers' own records (the echo server's peers, the MCP server's log
//! of the tools that really ran).

use kya_e2e::*;
use std::process::Command;

const ECHO_PORT: &str = "8453";
const MCP_PORT: u16 = 18095;

/// The peers' `search_docs` is allowed, `delete_*` denied, anything else denied.
const POLICY: &str = kya_e2e::DOCS_POLICY;

#[test]
fn kernel_dependent_guarantees_hold_on_this_kernel() {
    if !privileged("kernel_dependent_guarantees_hold_on_this_kernel") {
        return;
    }
    let _g = serial();
    ensure_peers();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let t0 = std::time::Instant::now();
    let step = |what: &str| {
        eprintln!(
            "kernel-matrix: [{:>5.1} s] {what}",
            t0.elapsed().as_secs_f32()
        )
    };
    step(&format!("kernel {}", release.trim()));

    let dir = tempfile::tempdir().expect("tempdir");
    let cg = TestCgroup::new("kmx");
    std::fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
    std::fs::write(
        dir.path().join("agents.toml"),
        format!(
            "[[agent]]\nname = \"matrix-agent\"\nowner = \"root\"\ncreated = \"2026-01-01\"\nmatch = {{ cgroup = \"{}\" }}\n",
            cg.rel
        ),
    )
    .expect("agents");
    let echo = TcpEcho::start("127.0.0.2:8453");
    let mcp = McpServer::start(dir.path(), MCP_PORT, "peer.log");
    let p = |f: &str| dir.path().join(f).display().to_string();

    step("peers started");
    // Load and attach.
    let before = attached_programs();
    let mut daemon = Daemon::start(DaemonOptions::new(961).splice(8453).args([
        "--cgroup",
        cg.rel.as_str(),
        "--port",
        ECHO_PORT,
        "--port",
        &MCP_PORT.to_string(),
        "--policy",
        &p("policy.toml"),
        "--agents",
        &p("agents.toml"),
    ]));
    assert!(
        attached_programs().difference(&before).count() >= 7,
        "the daemon did not attach its programs"
    );
    let status = kya_status(&daemon);
    assert_eq!(
        status["host_kernel"]["release"].as_str(),
        Some(release.trim()),
        "{status}"
    );
    assert!(
        status["host_kernel"]["features"]
            .as_array()
            .is_some_and(|f| !f.is_empty()),
        "{status}"
    );

    step("daemon attached");
    // A selected process is redirected and still sees its original peer.
    let probe = probe_bin();
    let out = run_json(cg.command(
        &probe,
        &["tcp", "127.0.0.2", ECHO_PORT, "--payload", "ping-matrix"],
    ));
    assert_eq!(out["reply"], "ping-matrix", "{out}");
    assert_eq!(out["peer"], "127.0.0.2:8453", "getpeername: {out}");
    let conns = daemon.wait_connections(1);
    assert!(
        conns.iter().any(|c| c["pid"] == out["pid"]
            && c["dst"] == "127.0.0.2:8453"
            && c["comm"] == "kya-probe"),
        "no record of the redirected connection with its process: {conns:#?}"
    );
    let peers = echo.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_ne!(
        Some(peers[0].to_string()),
        out["local"].as_str().map(str::to_string),
        "the server saw the selected client directly"
    );

    step("selected process redirected");
    // An unselected process goes direct.
    let direct = run_json({
        let mut c = Command::new(&probe);
        c.args(["tcp", "127.0.0.2", ECHO_PORT, "--payload", "direct"]);
        c
    });
    assert_eq!(direct["reply"], "direct", "{direct}");
    assert_eq!(
        echo.peers().last().map(|p| p.to_string()),
        direct["local"].as_str().map(str::to_string),
        "the server must see the unselected client itself"
    );
    assert_eq!(daemon.connections().len(), conns.len());

    step("unselected process went direct");
    // One allowed and one denied MCP call, judged on the server's own log.
    let url = mcp.url();
    let r = mcp_result(mcp_client(
        &cg,
        &url,
        &["search_docs", r#"{"query": "kya"}"#],
    ));
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about kya", "{r}");
    let r = mcp_result(mcp_client(
        &cg,
        &url,
        &["delete_records", r#"{"table": "users"}"#],
    ));
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("no-delete"),
        "{r}"
    );
    assert_eq!(mcp.ran(), vec!["search_docs".to_string()]);

    step("MCP calls decided");
    // Fail closed: after kill -9 the pinned programs refuse the selected
    // process; the unselected one still reaches the server.
    daemon.kill9();
    let refused = run_json(cg.command(&probe, &["tcp", "127.0.0.2", ECHO_PORT]));
    assert_eq!(
        refused["errno"],
        libc::ECONNREFUSED,
        "selected connect must be refused while kya is down: {refused}"
    );
    let still = run_json({
        let mut c = Command::new(&probe);
        c.args(["tcp", "127.0.0.2", ECHO_PORT, "--payload", "still-up"]);
        c
    });
    assert_eq!(still["reply"], "still-up", "{still}");
    assert_eq!(
        echo.peers().len(),
        3,
        "the refused connect reached the server"
    );

    step("failed closed after kill -9");
    // The audit log holds both decisions and verifies, after the crash too.
    let audit = daemon.state_dir.path().join("audit.jsonl");
    let log = std::fs::read_to_string(&audit).expect("audit log");
    let calls: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"method\":\"tools/call\""))
        .collect();
    assert_eq!(calls.len(), 2, "{log}");
    assert!(calls
        .iter()
        .any(|l| l.contains("search_docs") && l.contains("allow")));
    assert!(calls
        .iter()
        .any(|l| l.contains("delete_records") && l.contains("deny")));
    let v = Command::new(kya_bin())
        .args(["audit", "verify"])
        .arg(&audit)
        .arg("--key")
        .arg(daemon.state_dir.path().join("signing-key.pub.pem"))
        .output()
        .expect("kya audit verify");
    assert!(
        v.status.success(),
        "audit log must verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    step(&format!("all checks passed on {}", release.trim()));
}
