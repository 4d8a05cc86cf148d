//! Agents in other network namespaces (containers without an engine): a
//! selected process in a namespace the test creates (`ip netns` and a veth
//! pair with private addresses) is redirected to a kya listener inside its
//! own namespace, decided and audited with the namespace, and kya's
//! connection to the destination is made from that namespace. Judged on the
//! servers' own records: the MCP server's log of the tools that really ran,
//! and an echo server that exists only inside the namespace.

use kya_e2e::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Instant;

const LISTEN: u16 = 963;
/// The MCP server, on the host end of the first namespace's veth.
const MCP_PORT: u16 = 28380;
/// A byte echo that exists only on 127.0.0.1 inside the first namespace.
const ECHO_PORT: u16 = 28381;
const ECONNREFUSED: i64 = 111;
/// The id of a container the test fakes: a cgroup named the way Docker
/// names a container's (`docker-<id>.scope`), selected with `--container`.
const CONTAINER_ID: &str = "5e1f0c2d3b4a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// The peers' `search_docs` is allowed, `delete_*` denied, anything else denied.
const POLICY: &str = kya_e2e::DOCS_POLICY;

/// A process killed on drop.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A selected, idle process in `ns` (it holds the namespace in the selection).
fn sleeper(ns: &TestNetns, cg: &TestCgroup) -> Proc {
    let child = ns
        .command(Some(&cg.path), "sleep", &["600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sleeper");
    let p = Proc(child);
    let deadline = Instant::now() + patience() * 10;
    while !cg.pids().contains(&p.pid()) {
        assert!(
            Instant::now() < deadline,
            "the sleeper never entered its cgroup"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    p
}

/// The real MCP client, in `ns` and the agent's cgroup.
fn mcp_in(ns: &TestNetns, cg: &TestCgroup, url: &str, args: &[&str]) -> Value {
    let script = peers().join("client.py");
    let mut all: Vec<&str> = vec![script.to_str().expect("utf-8"), url];
    all.extend_from_slice(args);
    let child = ns
        .command(Some(&cg.path), peers_python(), &all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start MCP client");
    mcp_result(child)
}

/// The daemon's view of namespace `inode`, or `None` when it does not serve it.
fn served(daemon: &Daemon, inode: u64) -> Option<Value> {
    kya_status(daemon)["namespaces"]
        .as_array()
        .expect("status has namespaces")
        .iter()
        .find(|n| n["inode"] == inode)
        .cloned()
}

/// Wait until namespace `inode` is in `state` (`None`: not served).
fn wait_served(daemon: &Daemon, inode: u64, state: Option<&str>) -> Option<Value> {
    let deadline = Instant::now() + patience() * 20;
    loop {
        let now = served(daemon, inode);
        if now.as_ref().map(|n| n["state"].as_str().unwrap_or("")) == state {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "namespace {inode} never became {state:?}: {now:?}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn ran(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("peer.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn selected_processes_in_other_network_namespaces_are_served_inside_them() {
    if !privileged("selected_processes_in_other_network_namespaces_are_served_inside_them") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("netns", POLICY);
    let (dir, cg) = (scene.dir.path(), &scene.cg);
    let a = TestNetns::new("a", 0, true);
    let _server = McpServer::start_on(dir, &a.host_addr, MCP_PORT, &[], "peer.log");
    let url = format!("http://{}:{MCP_PORT}/mcp", a.host_addr);
    // Reachable only from inside namespace a: kya's connection to it can
    // only succeed if it is made from there.
    let echo = a.run_inside(|| TcpEcho::start(&format!("127.0.0.1:{ECHO_PORT}")));
    // Selected before kya starts: found by the start-up scan.
    let _sleeper_a = sleeper(&a, cg);
    // A "container": selected only by --container (an id prefix), through
    // the cgroup its engine would have made.
    let engine = TestCgroup::new("netns-engine");
    let ctr = engine.child(&format!("docker-{CONTAINER_ID}.scope"));
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr")
    };
    let daemon = Daemon::start(
        scene
            .daemon_options(LISTEN, MCP_PORT)
            .args(["--port", &ECHO_PORT.to_string()])
            .args(["--container", &CONTAINER_ID[..16]])
            .args(["--metrics", &metrics.to_string()])
            .splice(ECHO_PORT),
    );

    let ns_a = wait_served(&daemon, a.inode, Some("ready")).expect("served");
    assert!(ns_a["cookie"].as_u64().unwrap_or(0) != 0, "{ns_a}");
    let listeners = ns_a["listeners"].to_string();
    assert!(listeners.contains(&format!("127.0.0.1:{LISTEN}")), "{ns_a}");
    let human = kya_cli(&daemon, &["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains(&format!("netns net:[{}]", a.inode)) && human.contains("ready"),
        "{human}"
    );

    // allow: the server really ran it
    let r = mcp_in(&a, cg, &url, &["search_docs", r#"{"query": "kya"}"#]);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about kya");
    assert_eq!(ran(dir), ["search_docs"]);
    // deny: the server never ran it
    let r = mcp_in(&a, cg, &url, &["delete_records", r#"{"table": "users"}"#]);
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("no-delete"),
        "{r}"
    );
    assert_eq!(
        ran(dir),
        ["search_docs"],
        "the denied call never reached the server"
    );
    // both decisions name the namespace
    let events = tool_call_events(&daemon);
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        assert_eq!(e["process"]["netns"], a.inode, "{e}");
        assert_eq!(e["agent"]["name"], "e2e-agent", "{e}");
    }
    let audit: String = std::fs::read_dir(daemon.state_dir.path())
        .expect("state dir")
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().contains("audit"))
        .filter_map(|f| std::fs::read_to_string(f.path()).ok())
        .collect();
    assert!(
        audit.contains(&format!("\"netns\":{}", a.inode)),
        "the audit log records the namespace"
    );

    // Bytes to a destination that exists only inside a: spliced through the
    // listener in a, and kya's leg was opened from a.
    let v = run_json(a.command(
        Some(&cg.path),
        probe_bin(),
        &[
            "tcp",
            "127.0.0.1",
            &ECHO_PORT.to_string(),
            "--payload",
            "in-ns",
        ],
    ));
    assert_eq!(v["reply"], "in-ns", "{v}");
    assert_eq!(
        v["peer"],
        format!("127.0.0.1:{ECHO_PORT}"),
        "getpeername: {v}"
    );
    assert_eq!(echo.peers().len(), 1, "one connection reached the echo");
    let pid = v["pid"].as_u64().expect("probe pid");
    let conns = daemon.wait_connections(3);
    let mine = conns
        .iter()
        .find(|c| c["pid"].as_u64() == Some(pid))
        .unwrap_or_else(|| panic!("kya did not intercept the probe: {conns:?}"));
    assert_eq!(mine["netns"], a.inode, "{mine}");

    // The container's process, in namespace a: selected by --container,
    // decided and recorded with its container id and runtime.
    let script = peers().join("client.py");
    let child = a
        .command(
            Some(&ctr),
            peers_python(),
            &[
                script.to_str().expect("utf-8"),
                &url,
                "search_docs",
                r#"{"query": "container"}"#,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start MCP client");
    let r = mcp_result(child);
    assert_eq!(r["text"], "found 3 documents about container", "{r}");
    assert_eq!(ran(dir), ["search_docs", "search_docs"]);
    let events = tool_call_events(&daemon);
    let e = events
        .iter()
        .find(|e| e["process"]["container_id"] == CONTAINER_ID)
        .unwrap_or_else(|| panic!("no decision names the container: {events:?}"));
    assert_eq!(e["process"]["container_runtime"], "docker", "{e}");
    assert_eq!(e["process"]["netns"], a.inode, "{e}");

    // A process of the same namespace that is not selected is untouched.
    let before = daemon.connections().len();
    let v = run_json(a.command(
        None,
        probe_bin(),
        &[
            "tcp",
            "127.0.0.1",
            &ECHO_PORT.to_string(),
            "--payload",
            "plain",
        ],
    ));
    assert_eq!(v["reply"], "plain", "{v}");
    assert_eq!(echo.peers().len(), 2);
    assert_eq!(daemon.connections().len(), before, "not intercepted");

    // A namespace that appears after kya started is served as its first
    // selected process shows up, and no longer once it is gone.
    let b = TestNetns::new("b", 1, true);
    let sleeper_b = sleeper(&b, cg);
    wait_served(&daemon, b.inode, Some("ready"));
    let r = mcp_in(&b, cg, &url, &["search_docs", r#"{"query": "late"}"#]);
    assert_eq!(r["text"], "found 3 documents about late", "{r}");
    assert_eq!(ran(dir), ["search_docs"; 3]);
    let late = tool_call_events(&daemon);
    assert!(
        late.iter().any(|e| e["process"]["netns"] == b.inode),
        "{late:?}"
    );
    drop(sleeper_b);
    wait_served(&daemon, b.inode, None);
    drop(b);

    // A namespace whose listener cannot be opened (its loopback is down):
    // its selected processes' connections are refused, never let through.
    let c = TestNetns::new("c", 2, false);
    let _sleeper_c = sleeper(&c, cg);
    let failed = wait_served(&daemon, c.inode, Some("failed")).expect("listed");
    assert!(failed["error"].is_string(), "{failed}");
    // the path to the server works for a process kya does not select ...
    let v = run_json(c.command(
        None,
        probe_bin(),
        &["tcp", &a.host_addr, &MCP_PORT.to_string()],
    ));
    assert!(
        v["error"].is_null(),
        "unselected processes reach the server: {v}"
    );
    // ... and is refused to a selected one
    let v = run_json(c.command(
        Some(&cg.path),
        probe_bin(),
        &["tcp", &a.host_addr, &MCP_PORT.to_string()],
    ));
    assert_eq!(v["errno"], ECONNREFUSED, "{v}");
    let r = c
        .command(
            Some(&cg.path),
            peers_python(),
            &[
                peers().join("client.py").to_str().expect("utf-8"),
                &url,
                "search_docs",
                r#"{"query": "unserved"}"#,
            ],
        )
        .output()
        .expect("MCP client");
    assert!(
        !String::from_utf8_lossy(&r.stdout).contains("found 3 documents"),
        "{r:?}"
    );
    assert_eq!(ran(dir), ["search_docs"; 3], "nothing reached the server");
    let refused = kya_status(&daemon)["kernel"]["refused_netns"]
        .as_u64()
        .unwrap_or(0);
    assert!(refused >= 2, "refused connects are counted: {refused}");
    let m = http_get(metrics, "/metrics");
    assert!(m.contains("\nkya_netns_served 1\n"), "{m}");
    assert!(m.contains("\nkya_netns_failed 1\n"), "{m}");
    assert!(m.contains("kya_kernel_refused_netns_total"), "{m}");

    // Deleting the namespace with its processes: no longer served.
    drop(_sleeper_c);
    drop(c);
    wait_served(&daemon, a.inode, Some("ready"));
    let deadline = Instant::now() + patience() * 20;
    while kya_status(&daemon)["namespaces"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0)
        != 1
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            kya_status(&daemon)["namespaces"]
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The MCP server over TLS, on the host end of the namespace's veth.
const TLS_PORT: u16 = 28383;

#[test]
fn tls_from_a_namespace_is_terminated_and_the_server_verified_from_there() {
    if !privileged("tls_from_a_namespace_is_terminated_and_the_server_verified_from_there") {
        return;
    }
    let _g = serial();
    ensure_peers();
    let scene = AgentScene::new("netnstls", POLICY);
    let (d, cg) = (scene.dir.path(), &scene.cg);
    let a = TestNetns::new("tls", 3, true);
    test_pki(d);
    // mcp.test is the server across the veth, for the agent and for kya
    std::fs::write(
        d.join("hosts"),
        format!("127.0.0.1 localhost\n{} mcp.test\n", a.host_addr),
    )
    .expect("hosts");
    let _server = Hypercorn::start_tls(d, &[&format!("{}:{TLS_PORT}", a.host_addr)]);
    let _sleeper = sleeper(&a, cg);
    let mut opts = scene.daemon_options(964, TLS_PORT).args([
        "--upstream-ca",
        d.join("test-ca.pem").to_str().expect("utf-8"),
    ]);
    opts.hosts = Some(d.join("hosts"));
    let daemon = Daemon::start(opts);
    wait_served(&daemon, a.inode, Some("ready"));
    let kya_ca = daemon.state_dir.path().join("ca.pem");

    // The client, in the namespace, the agent's cgroup and a mount namespace
    // whose /etc/hosts names mcp.test; it trusts only kya's CA, so it can only
    // succeed through kya.
    let call = |args: &[&str]| -> Value {
        let script = format!(
            "mount --bind {hosts} /etc/hosts && echo $$ > {procs} && exec \"$@\"",
            hosts = d.join("hosts").display(),
            procs = cg.path.join("cgroup.procs").display()
        );
        let client = peers().join("client.py");
        let python = peers_python();
        let url = format!("https://mcp.test:{TLS_PORT}/mcp");
        let mut all = vec![
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
            python.to_str().expect("utf-8"),
            client.to_str().expect("utf-8"),
            &url,
        ];
        all.extend_from_slice(args);
        let out = a
            .command(None, "unshare", &all)
            .env("SSL_CERT_FILE", &kya_ca)
            .output()
            .expect("client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
            panic!(
                "client printed no JSON ({e}): {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let r = call(&["search_docs", r#"{"query": "tls"}"#]);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about tls");
    let r = call(&["delete_records", r#"{"table": "t"}"#]);
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("no-delete"),
        "{r}"
    );
    assert_eq!(ran(d), ["search_docs"], "the server's own record");
    let events = tool_call_events(&daemon);
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        assert_eq!(e["process"]["netns"], a.inode, "{e}");
        assert_eq!(e["destination"]["host"], "mcp.test", "{e}");
    }
}

#[test]
fn a_container_selector_that_names_no_running_container_stops_the_start() {
    if !privileged("a_container_selector_that_names_no_running_container_stops_the_start") {
        return;
    }
    let _g = serial();
    let state = tempfile::tempdir().expect("state dir");
    let pins = format!("/sys/fs/bpf/kya-e2e-{}-965", std::process::id());
    for (id, why) in [
        ("0123456789abcdef0123", "no running container"),
        ("../../etc", "must be 12 to 64 lowercase hex digits"),
    ] {
        let out = std::process::Command::new(kya_bin())
            .args(["run", "--config", "/dev/null", "--listen-port", "965"])
            .args(["--pin-dir", &pins, "--state-dir"])
            .arg(state.path())
            .args(["--container", id])
            .stdin(Stdio::null())
            .output()
            .expect("kya run");
        let _ = std::fs::remove_dir_all(&pins);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{id}: {err}");
        assert!(err.contains(why), "{id}: {err}");
    }
}
