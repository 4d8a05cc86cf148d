//! No port is a way out: with `[intercept] ports = "all"` every TCP
//! connection of a selected process goes through kya. MCP over TLS and
//! plaintext HTTP on ports nobody listed is decided (judged on the server's
//! own record), other protocols are refused unless their port is a splice
//! port, and processes that are not selected are not touched.

use kya_e2e::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// Unlisted ports: nothing in the configuration names them.
const MCP_PLAIN: &str = "127.0.0.1:28091";
const MCP_TLS_PORT: u16 = 28443;
const ECHO_REFUSED: &str = "127.0.0.3:28222";
const ECHO_REFUSED6: &str = "[::1]:28224";
const ECHO_SPLICED: &str = "127.0.0.3:28223";
/// UDP: refused on a listed port (`--port`), untouched elsewhere.
const UDP_LISTED: &str = "127.0.0.3:28226";
const UDP_UNLISTED: &str = "127.0.0.3:28227";
/// A CONNECT proxy on an unlisted port.
const PROXY: &str = "127.0.0.6:28128";

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
"#;

fn ran(dir: &Path, tool: &str) -> usize {
    std::fs::read_to_string(dir.join("peer.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == tool)
        .count()
}

/// Wait until the server's record stops changing.
fn settled(dir: &Path, tool: &str) -> usize {
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut last = ran(dir, tool);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = ran(dir, tool);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// One call through `bypass.py` (the agent) from the selected cgroup.
fn call(cg: &TestCgroup, dir: &Path, case: Value) -> Value {
    let prog = [peers_python(), peers().join("bypass.py")];
    run_in_agent_ns(cg, dir, &prog, &[&case.to_string()], &[])
}

#[test]
fn every_tcp_port_of_a_selected_process_is_inspected_or_refused() {
    if !privileged("every_tcp_port_of_a_selected_process_is_inspected_or_refused") {
        return;
    }
    let _g = serial();
    ensure_peers();
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    test_pki(d);
    std::fs::write(d.join("policy.toml"), POLICY).expect("policy");
    std::fs::write(
        d.join("kya.toml"),
        "[intercept]\nports = \"all\"\nsplice_ports = [28223]\nfirst_bytes_timeout = \"1s\"\n",
    )
    .expect("config");
    let cg = TestCgroup::new("allports");
    let tls_bind = format!("127.0.0.2:{MCP_TLS_PORT}");
    let _tls = Hypercorn::start_tls(d, &[&tls_bind]);
    let _plain = Hypercorn::start_plain(d, &[MCP_PLAIN]);
    let refused = TcpEcho::start(ECHO_REFUSED);
    let refused6 = TcpEcho::start(ECHO_REFUSED6);
    let spliced = TcpEcho::start(ECHO_SPLICED);
    let _udp_listed = UdpEcho::start(UDP_LISTED);
    let _udp_unlisted = UdpEcho::start(UDP_UNLISTED);
    let proxy = ConnectProxy::start(d, PROXY);
    let mut opts = DaemonOptions::new(936).args([
        "--policy",
        d.join("policy.toml").to_str().expect("utf-8"),
        "--cgroup",
        &cg.rel,
        "--port",
        "28226",
        "--upstream-ca",
        d.join("test-ca.pem").to_str().expect("utf-8"),
    ]);
    opts.config = Some(d.join("kya.toml"));
    opts.hosts = Some(d.join("hosts"));
    let daemon = Daemon::start(opts);
    let kya_ca = daemon.state_dir.path().join("ca.pem");

    let status = kya_status(&daemon);
    assert_eq!(status["redirect_mode"], "all_tcp_ports", "{status}");
    assert_eq!(
        status["splice_ports"],
        serde_json::json!([28223]),
        "{status}"
    );

    // MCP on unlisted ports, plaintext and TLS: decided.
    let (plain_host, plain_port) = MCP_PLAIN.split_once(':').expect("host:port");
    let cases = [
        serde_json::json!({
            "transport": "plain", "host": plain_host,
            "port": plain_port.parse::<u16>().expect("port"), "ca": "",
        }),
        serde_json::json!({
            "transport": "tls", "host": "127.0.0.2", "port": MCP_TLS_PORT,
            "sni": "mcp.test", "ca": kya_ca.display().to_string(),
        }),
    ];
    for case in cases {
        let mut denied = case.clone();
        denied["tool"] = "delete_records".into();
        let before = ran(d, "delete_records");
        let seen = call(&cg, d, denied);
        assert_eq!(seen["outcome"], "answered", "{case}: {seen}");
        assert_eq!(
            settled(d, "delete_records"),
            before,
            "{case}: the denied call ran: {seen}"
        );
        assert!(
            seen["detail"].as_str().unwrap_or("").contains("kya denied"),
            "{case}: {seen}"
        );
        let mut allowed = case.clone();
        allowed["tool"] = "search_docs".into();
        let before = ran(d, "search_docs");
        let seen = call(&cg, d, allowed);
        assert_eq!(
            settled(d, "search_docs"),
            before + 1,
            "{case}: the allowed call did not run: {seen}"
        );
    }

    // A protocol that is neither TLS nor HTTP on an unlisted port: refused
    // (the server never sees it), over IPv4 and IPv6.
    let probe = probe_bin();
    for echo in [&refused, &refused6] {
        let (host, port) = (echo.addr.ip().to_string(), echo.addr.port().to_string());
        let out = run_json(cg.command(&probe, &["tcp", &host, &port, "--payload", "PING"]));
        assert_ne!(out["reply"], "PING", "{}: {out}", echo.addr);
        assert!(
            echo.peers().is_empty(),
            "{}: the server saw the selected process: {out}",
            echo.addr
        );
    }
    // ... reached on a splice port, through kya.
    let (host, port) = (
        spliced.addr.ip().to_string(),
        spliced.addr.port().to_string(),
    );
    let out = run_json(cg.command(&probe, &["tcp", &host, &port, "--payload", "PONG"]));
    assert_eq!(out["reply"], "PONG", "{out}");
    assert_eq!(
        out["peer"], ECHO_SPLICED,
        "getpeername is the original: {out}"
    );
    assert!(
        daemon
            .connections()
            .iter()
            .any(|c| c["dst"] == ECHO_SPLICED),
        "the spliced connection did not go through kya"
    );

    // Through a CONNECT proxy on an unlisted port, the splice rule looks at
    // the tunnel's target port: spliced to a splice port, refused elsewhere.
    for (target, spliced) in [(ECHO_SPLICED, true), (ECHO_REFUSED, false)] {
        let seen = call(
            &cg,
            d,
            serde_json::json!({
                "transport": "plain", "host": "127.0.0.3", "port": 0, "ca": "",
                "proxy": PROXY, "connect": target, "echo": "HELLO kya\r\n",
            }),
        );
        if spliced {
            assert_eq!(seen["detail"], "HELLO kya\r\n", "{target}: {seen}");
        } else {
            assert_eq!(seen["outcome"], "refused", "{target}: {seen}");
        }
    }
    assert_eq!(
        proxy.tunnels(),
        vec![ECHO_SPLICED.to_string(), ECHO_REFUSED.to_string()],
        "both tunnels went through the proxy"
    );

    // Datagrams keep the listed ports' rule: refused there, untouched elsewhere.
    let refused_udp = run_json(cg.command(&probe, &["udp", "127.0.0.3", "28226"]));
    let errno = refused_udp["errno"].as_i64();
    assert!(
        errno == Some(libc::EPERM as i64) || errno == Some(libc::ECONNREFUSED as i64),
        "UDP to a listed port must be refused: {refused_udp}"
    );
    let udp = run_json(cg.command(&probe, &["udp", "127.0.0.3", "28227"]));
    assert_eq!(
        udp["reply"], "udp-probe",
        "UDP elsewhere is untouched: {udp}"
    );

    // A process that is not selected is not touched, on any port.
    let (host, port) = (
        refused.addr.ip().to_string(),
        refused.addr.port().to_string(),
    );
    let mut direct = std::process::Command::new(&probe);
    direct.args(["tcp", &host, &port, "--payload", "DIRECT"]);
    let out = run_json(direct);
    assert_eq!(out["reply"], "DIRECT", "{out}");
    assert_eq!(
        refused.peers().last().map(|p| p.to_string()),
        out["local"].as_str().map(str::to_string),
        "the server must see the unselected client itself"
    );

    // The refusals are on the record, with the process.
    let ev = std::process::Command::new(kya_bin())
        .args(["events", "--json", "--state-dir"])
        .arg(daemon.state_dir.path())
        .output()
        .expect("kya events");
    let text = String::from_utf8_lossy(&ev.stdout);
    for port in ["28222", "28224"] {
        assert!(
            text.contains(&format!("neither TLS nor HTTP on guarded port {port}")),
            "no audited refusal on port {port}"
        );
    }
    assert!(
        text.contains(&format!(
            "neither TLS nor HTTP on the CONNECT tunnel to {ECHO_REFUSED}"
        )),
        "no audited refusal in the tunnel"
    );
}
