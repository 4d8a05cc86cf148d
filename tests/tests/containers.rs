//! Agents in real containers (Podman, images built on the machine, a bridge
//! network with a private subnet the test creates): the unmodified MCP client
//! inside a container is intercepted in the container's own network
//! namespace, decided (also on its container identity) and audited with its
//! container id. Containers are selected by name, by id, by a cgroup glob
//! and by image (both pick up containers started after kya; policy decides
//! on the image too). A container whose namespace
//! kya cannot serve reaches nothing (fail closed), and a stopped container's
//! namespace is no longer served. Judged on the MCP server's own record of
//! the tools it ran.

use kya_e2e::podman::{self, CgroupParent, TestContainer, TestImage, TestNetwork};
use kya_e2e::*;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Instant;

const LISTEN: u16 = 957;
/// The MCP server, on the host at the test network's gateway address.
const MCP_PORT: u16 = 18460;

/// `search_docs` is allowed, except the query "secrets" from any Podman
/// container (a rule on the container identity); `delete_*` denied.
const POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"

[[rule]]
id = "no-secrets-from-containers"
tool = "search_docs"
when = 'process.container.runtime == "podman" && args.query == "secrets"'
verdict = "deny"
reason = "containers may not search for secrets"

[[rule]]
id = "docs-ok"
tool = "search_docs"
verdict = "allow"

[[rule]]
id = "no-delete"
tool = "delete_*"
verdict = "deny"
reason = "deleting records is not allowed from agents"
"#;

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
    let deadline = Instant::now() + patience() * 30;
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

/// The real MCP client, run inside the container with `podman exec`.
fn mcp_in(c: &TestContainer, url: &str, args: &[&str]) -> Value {
    let python = peers_python();
    let script = peers().join("client.py");
    let mut all = vec![
        python.to_str().expect("utf-8"),
        script.to_str().expect("utf-8"),
        url,
    ];
    all.extend_from_slice(args);
    let out = c.exec(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "client in {} printed no JSON ({e}): {stdout} {}",
            c.name,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The decisions naming container `id`.
fn events_of(daemon: &Daemon, id: &str) -> Vec<Value> {
    tool_call_events(daemon)
        .into_iter()
        .filter(|e| e["process"]["container_id"] == id)
        .collect()
}

#[test]
fn mcp_clients_in_podman_containers_are_intercepted_in_their_namespaces() {
    let name = "mcp_clients_in_podman_containers_are_intercepted_in_their_namespaces";
    if !privileged(name) || !podman::available(name) {
        return;
    }
    let _g = serial();
    ensure_peers();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("policy.toml"), POLICY).expect("policy");
    let image = TestImage::new("img");
    let net = TestNetwork::new("net");
    // Containers selected one by one (by name, by id) live under one parent,
    // those selected by the glob under another.
    let named = CgroupParent::new("named");
    let globbed = CgroupParent::new("globbed");
    let sleep: &[&str] = &["sleep", "600"];
    // Started before kya: selected by name and by id.
    let a = TestContainer::run(&image, &net, &named, "a", sleep);
    let b = TestContainer::run(&image, &net, &named, "b", sleep);
    // Started before kya, matched by the glob, and squatting kya's listener
    // port inside its namespace: kya cannot serve it.
    let squat = format!(
        "import socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', {LISTEN}))\ns.listen()\ntime.sleep(600)"
    );
    let python = peers_python();
    let python = python.to_str().expect("utf-8");
    let squatter = TestContainer::run(&image, &net, &globbed, "squat", &[python, "-c", &squat]);
    // The bridge exists now: the server listens on its gateway address.
    let _server = McpServer::start_on(d, &net.gateway, MCP_PORT, &[], "peer.log");
    let url = format!("http://{}:{MCP_PORT}/mcp", net.gateway);
    let ran = || -> Vec<String> {
        std::fs::read_to_string(d.join("peer.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    // The path to the server works for every container while kya is not running.
    let r = mcp_in(&squatter, &url, &["search_docs", r#"{"query": "before"}"#]);
    assert_eq!(r["text"], "found 3 documents about before", "{r}");
    assert_eq!(ran(), ["search_docs"]);

    let glob = format!("{}/libpod-*", globbed.rel);
    let daemon = Daemon::start(
        DaemonOptions::new(LISTEN)
            .args(["--policy", d.join("policy.toml").to_str().expect("utf-8")])
            .args(["--port", &MCP_PORT.to_string()])
            .args(["--container", &a.name])
            .args(["--container", &b.id[..16]])
            .args(["--cgroup-glob", &glob]),
    );
    let log = daemon.log_text();
    assert!(
        log.contains(&format!("cgroup={}", a.cgroup())) || log.contains(&a.id),
        "{log}"
    );

    // a: selected by name
    let ns_a = wait_served(&daemon, a.netns_inode(), Some("ready")).expect("served");
    assert_eq!(ns_a["container"]["id"], a.id, "{ns_a}");
    assert_eq!(ns_a["container"]["runtime"], "podman", "{ns_a}");
    let r = mcp_in(&a, &url, &["search_docs", r#"{"query": "kya"}"#]);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about kya");
    let r = mcp_in(&a, &url, &["delete_records", r#"{"table": "users"}"#]);
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("no-delete"),
        "{r}"
    );
    // decided on the container identity
    let r = mcp_in(&a, &url, &["search_docs", r#"{"query": "secrets"}"#]);
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"]
            .as_str()
            .unwrap_or("")
            .contains("no-secrets-from-containers"),
        "{r}"
    );
    assert_eq!(
        ran(),
        ["search_docs", "search_docs"],
        "only the allowed call reached the server"
    );
    let ev = events_of(&daemon, &a.id);
    assert_eq!(ev.len(), 3, "{ev:?}");
    for e in &ev {
        assert_eq!(e["process"]["container_runtime"], "podman", "{e}");
        assert_eq!(e["process"]["netns"], a.netns_inode(), "{e}");
    }
    let audit: String = std::fs::read_dir(daemon.state_dir.path())
        .expect("state dir")
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().contains("audit"))
        .filter_map(|f| std::fs::read_to_string(f.path()).ok())
        .collect();
    assert!(
        audit.contains(&a.id),
        "the audit log records the container id"
    );

    // b: selected by an id prefix
    wait_served(&daemon, b.netns_inode(), Some("ready"));
    let r = mcp_in(&b, &url, &["search_docs", r#"{"query": "by id"}"#]);
    assert_eq!(r["text"], "found 3 documents about by id", "{r}");
    assert_eq!(ran().len(), 3);
    assert_eq!(events_of(&daemon, &b.id).len(), 1);

    // The squatter's namespace cannot be served: its processes reach nothing.
    let failed = wait_served(&daemon, squatter.netns_inode(), Some("failed")).expect("listed");
    assert!(failed["error"].is_string(), "{failed}");
    let out = squatter.exec(&[
        python,
        peers().join("client.py").to_str().expect("utf-8"),
        &url,
        "search_docs",
        r#"{"query": "unserved"}"#,
    ]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("found 3 documents"),
        "{out:?}"
    );
    let probe = "import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)\n    print('connected')\nexcept OSError as e:\n    print('errno', e.errno)";
    let out = squatter.exec(&[python, "-c", probe, &net.gateway, &MCP_PORT.to_string()]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "errno 111",
        "refused: {out:?}"
    );
    assert_eq!(
        ran().len(),
        3,
        "nothing from the squatter reached the server"
    );

    // A container started after kya, matched by the glob: served as it
    // appears, decided and audited with its id.
    let late = TestContainer::run(&image, &net, &globbed, "late", sleep);
    let late_ns = late.netns_inode();
    let ns = wait_served(&daemon, late_ns, Some("ready")).expect("served");
    assert_eq!(ns["container"]["id"], late.id, "{ns}");
    let r = mcp_in(&late, &url, &["search_docs", r#"{"query": "late"}"#]);
    assert_eq!(r["text"], "found 3 documents about late", "{r}");
    let r = mcp_in(&late, &url, &["delete_records", r#"{"table": "t"}"#]);
    assert_eq!(r["isError"], true, "{r}");
    assert_eq!(ran().len(), 4, "the denied call never reached the server");
    assert_eq!(events_of(&daemon, &late.id).len(), 2);
    let human = kya_cli(&daemon, &["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains(&format!("net:[{late_ns}]")),
        "kya status lists the namespace: {human}"
    );

    // Stopping a container: its namespace is no longer served.
    late.remove();
    wait_served(&daemon, late_ns, None);
    let human = kya_cli(&daemon, &["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(!human.contains(&format!("net:[{late_ns}]")), "{human}");
    // the others still are
    wait_served(&daemon, a.netns_inode(), Some("ready"));
}

#[test]
fn a_container_name_that_no_engine_knows_stops_the_start() {
    let name = "a_container_name_that_no_engine_knows_stops_the_start";
    if !privileged(name) || !podman::available(name) {
        return;
    }
    let _g = serial();
    let state = tempfile::tempdir().expect("state dir");
    let pins = format!("/sys/fs/bpf/kya-e2e-{}-958", std::process::id());
    for (sel, why) in [
        (
            "kya-test-no-such-container",
            "no running container is named",
        ),
        ("{{.Id}}", "or a container name"),
        ("--rm", "or a container name"),
    ] {
        let out = std::process::Command::new(kya_bin())
            .args(["run", "--config", "/dev/null", "--listen-port", "958"])
            .args(["--pin-dir", &pins, "--state-dir"])
            .arg(state.path())
            .arg(format!("--container={sel}"))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("kya run");
        let _ = std::fs::remove_dir_all(&pins);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sel}: {err}");
        assert!(err.contains(why), "{sel}: {err}");
    }
    let out = std::process::Command::new(kya_bin())
        .args(["run", "--config", "/dev/null", "--listen-port", "958"])
        .args(["--pin-dir", &pins, "--state-dir"])
        .arg(state.path())
        .args(["--cgroup-glob", "libpod-*"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("kya run");
    let _ = std::fs::remove_dir_all(&pins);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("must start with '/'"), "{err}");
}

/// `kya status --json` of kya running as a container.
fn status_of(kya: &podman::KyaContainer) -> Value {
    let out = kya.cli(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}\n{}", kya.logs());
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

#[test]
fn kya_runs_as_a_container_with_the_documented_privileges() {
    let name = "kya_runs_as_a_container_with_the_documented_privileges";
    if !privileged(name) || !podman::available(name) {
        return;
    }
    let _g = serial();
    ensure_peers();
    // The README's run line has exactly these privileges.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README");
    let section = readme
        .split("## Containers and Kubernetes")
        .nth(1)
        .expect("a Containers and Kubernetes section");
    for p in podman::KYA_PRIVILEGES {
        assert!(section.contains(p), "the README's run line lacks {p}");
    }

    const PORT: u16 = 18461;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("policy.toml"), POLICY).expect("policy");
    let image = TestImage::new("agentimg");
    let net = TestNetwork::new("knet");
    let parent = CgroupParent::new("kctr");
    let agent = TestContainer::run(&image, &net, &parent, "agent", &["sleep", "600"]);
    let _server = McpServer::start_on(d, &net.gateway, PORT, &[], "peer.log");
    let url = format!("http://{}:{PORT}/mcp", net.gateway);
    let cg = TestCgroup::new("kyactr");
    let runtime = TestImage::runtime("kya", &kya_bin());
    let kya = podman::KyaContainer::start(
        &runtime,
        959,
        &[format!("--volume={0}:{0}:ro", d.display())],
        &[
            "--policy",
            d.join("policy.toml").to_str().expect("utf-8"),
            "--port",
            &PORT.to_string(),
            "--cgroup",
            &cg.rel,
            "--container",
            &agent.id,
        ],
    );
    let ran = || -> Vec<String> {
        std::fs::read_to_string(d.join("peer.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };

    // A process on the host, selected by its cgroup: governed.
    let r = mcp_result(mcp_client(
        &cg,
        &url,
        &["search_docs", r#"{"query": "host"}"#],
    ));
    assert_eq!(
        r["text"],
        "found 3 documents about host",
        "{r}\n{}",
        kya.logs()
    );
    let r = mcp_result(mcp_client(
        &cg,
        &url,
        &["delete_records", r#"{"table": "t"}"#],
    ));
    assert_eq!(r["isError"], true, "{r}");
    assert_eq!(
        ran(),
        ["search_docs"],
        "the denied call never reached the server"
    );

    // A process in a container: served in its own namespace (kya entered it).
    let inode = agent.netns_inode();
    let deadline = Instant::now() + patience() * 30;
    loop {
        let ns = status_of(&kya)["namespaces"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["inode"] == inode).cloned());
        if ns.as_ref().is_some_and(|n| n["state"] == "ready") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's namespace is not served: {ns:?}\n{}",
            kya.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let r = mcp_in(&agent, &url, &["search_docs", r#"{"query": "inside"}"#]);
    assert_eq!(r["text"], "found 3 documents about inside", "{r}");
    let r = mcp_in(&agent, &url, &["delete_records", r#"{"table": "t"}"#]);
    assert_eq!(r["isError"], true, "{r}");
    assert_eq!(ran(), ["search_docs", "search_docs"]);
    let ev = kya.cli(&["events", "--json"]);
    let ev: Vec<Value> = String::from_utf8_lossy(&ev.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &Value| {
            e["process"]["container_id"] == agent.id && e["mcp"]["method"] == "tools/call"
        })
        .collect();
    assert_eq!(ev.len(), 2, "{ev:?}");

    // A clean stop: exit 0, nothing left pinned.
    assert_eq!(kya.stop(), 0, "{}", kya.logs());
    assert!(
        !kya.pin_dir.exists(),
        "pins left: {}",
        kya.pin_dir.display()
    );
}

/// Hosts with containers carry firewall rules keyed on socket marks
/// (Podman's netavark masquerades 0x2000, kube-proxy 0x4000, ...). kya's own
/// connections carry kya's mark: no such rule may take them for its own, or
/// the destination would see a rewritten source. Here a namespace of the
/// test's rewrites the source port of any connection whose mark has one of
/// those bits; kya's connection from that namespace keeps its own.
#[test]
fn firewall_rules_on_other_softwares_mark_bits_leave_kyas_connections_alone() {
    let name = "firewall_rules_on_other_softwares_mark_bits_leave_kyas_connections_alone";
    if !privileged(name) {
        return;
    }
    let _g = serial();
    const ECHO_PORT: u16 = 18465;
    const REWRITTEN: std::ops::RangeInclusive<u16> = 18466..=18469;
    let scene = AgentScene::new("ctrmark", kya_e2e::DOCS_POLICY);
    let ns = TestNetns::new("mark", 0, true);
    for bits in ["0x1", "0x0f00", "0x2000", "0x4000", "0x8000", "0xffff0000"] {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "iptables", "-t", "nat", "-A"])
            .args(["POSTROUTING", "-p", "tcp", "-m", "mark", "--mark"])
            .arg(format!("{bits}/{bits}"))
            .args(["-j", "MASQUERADE", "--to-ports", "18466-18469"])
            .output()
            .expect("iptables");
        assert!(out.status.success(), "{out:?}");
    }
    let echo = TcpEcho::start(&format!("{}:{ECHO_PORT}", ns.host_addr));
    let peer_port = |i: usize| echo.peers().get(i).map(|p| p.port()).expect("a peer");
    // the rules work: a socket marked 0x2000 is rewritten
    let probe = "import socket, sys\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, 36, 0x2000)\ns.connect((sys.argv[1], int(sys.argv[2])))\ns.sendall(b'x')\ns.recv(1)";
    let out = ns
        .command(
            None,
            "python3",
            &["-c", probe, &ns.host_addr, &ECHO_PORT.to_string()],
        )
        .output()
        .expect("python");
    assert!(out.status.success(), "{out:?}");
    assert!(REWRITTEN.contains(&peer_port(0)), "{:?}", echo.peers());

    let _sleeper = {
        let c = ns
            .command(Some(&scene.cg.path), "sleep", &["600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("sleeper");
        Proc(c)
    };
    let daemon = Daemon::start(scene.daemon_options(958, ECHO_PORT).splice(ECHO_PORT));
    let deadline = Instant::now() + patience() * 30;
    while served(&daemon, ns.inode).map(|n| n["state"] == "ready") != Some(true) {
        assert!(Instant::now() < deadline, "{}", daemon.log_text());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let v = run_json(ns.command(
        Some(&scene.cg.path),
        probe_bin(),
        &[
            "tcp",
            &ns.host_addr,
            &ECHO_PORT.to_string(),
            "--payload",
            "kya",
        ],
    ));
    assert_eq!(v["reply"], "kya", "{v}");
    let conns = daemon.wait_connections(1);
    assert!(!conns.is_empty(), "kya carried it: {conns:?}");
    assert_eq!(echo.peers().len(), 2);
    assert!(
        !REWRITTEN.contains(&peer_port(1)),
        "kya's connection was rewritten by a rule for another software's mark: {:?}",
        echo.peers()
    );
}

/// A process killed on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon's containers selected by image now (`kya status`).
fn image_matches(daemon: &Daemon) -> Vec<Value> {
    kya_status(daemon)["images"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Wait until the containers selected by image are exactly `ids`.
fn wait_image_matches(daemon: &Daemon, ids: &[&str]) -> Vec<Value> {
    let deadline = Instant::now() + patience() * 30;
    loop {
        let now = image_matches(daemon);
        let mut got: Vec<&str> = now.iter().filter_map(|m| m["container"].as_str()).collect();
        got.sort_unstable();
        let mut want = ids.to_vec();
        want.sort_unstable();
        if got == want {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "containers selected by image: {now:?}, wanted {ids:?}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `--image`: a container started after kya from a matching image (built on
/// the machine) is selected as it appears, and its unmodified client is
/// decided on `process.container.image`; the audit record and the OCSF
/// export carry the image. A container of another image (running before
/// kya) is not selected, one selected by a glob gets its image from the
/// lookup its first connection starts, and a stopped one is dropped.
/// Judged on the MCP server's own record.
#[test]
fn containers_are_selected_by_their_image_and_decided_on_it() {
    let name = "containers_are_selected_by_their_image_and_decided_on_it";
    if !privileged(name) || !podman::available(name) {
        return;
    }
    let _g = serial();
    ensure_peers();
    const LISTEN: u16 = 992;
    const PORT: u16 = 18560;
    let image = TestImage::new("imgsel");
    let other_image = TestImage::new("imgother");
    // `localhost/kya-test-imgsel-PID:latest` is selected as `kya-test-imgsel-PID`
    let short = image
        .name
        .strip_prefix("localhost/")
        .and_then(|n| n.strip_suffix(":latest"))
        .expect("a localhost/...:latest name")
        .to_string();
    let policy = format!(
        r#"
[defaults]
verdict = "deny"
methods = "allow"

[[rule]]
id = "agent-image-no-secrets"
tool = "search_docs"
when = 'process.container.image == "{img}" && args.query == "secrets"'
verdict = "deny"
reason = "the agent image may not search for secrets"

[[rule]]
id = "agent-image-docs"
tool = "search_docs"
when = 'process.container.image == "{img}" && process.container.image_id != ""'
verdict = "allow"
"#,
        img = image.name
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("policy.toml"), policy).expect("policy");
    let sink = d.join("ocsf.jsonl");
    std::fs::write(
        d.join("kya.toml"),
        format!("[audit]\nsinks = [\"file:{}\"]\n", sink.display()),
    )
    .expect("config");
    let net = TestNetwork::new("imgnet");
    let parent = CgroupParent::new("imgsel");
    // containers selected by a glob, not by image, under a parent of their own
    let globbed = CgroupParent::new("imgglob");
    let sleep: &[&str] = &["sleep", "600"];
    // A container of another image, running before kya: it brings up the
    // bridge (the gateway address the server listens on exists only while a
    // container runs on the network), and it is never selected.
    let other = TestContainer::run(&other_image, &net, &parent, "imgother", sleep);
    let _server = McpServer::start_on(d, &net.gateway, PORT, &[], "peer.log");
    let url = format!("http://{}:{PORT}/mcp", net.gateway);
    let ran = || -> Vec<String> {
        std::fs::read_to_string(d.join("peer.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };

    // No container runs the image yet: not an error.
    let mut opts = DaemonOptions::new(LISTEN)
        .args(["--policy", d.join("policy.toml").to_str().expect("utf-8")])
        .args(["--port", &PORT.to_string()])
        .args(["--image", &short])
        .args(["--cgroup-glob", &format!("{}/libpod-*", globbed.rel)]);
    opts.config = Some(d.join("kya.toml"));
    let daemon = Daemon::start(opts);
    assert!(image_matches(&daemon).is_empty());
    assert_eq!(
        kya_status(&daemon)["images"]["selectors"],
        serde_json::json!([short])
    );

    // Started after kya from the selected image: selected as it appears.
    let agent = TestContainer::run(&image, &net, &parent, "imgagent", sleep);
    let m = wait_image_matches(&daemon, &[&agent.id]);
    assert_eq!(m[0]["image"], image.name.as_str(), "{m:?}");
    assert_eq!(m[0]["refs"], serde_json::json!([short]), "{m:?}");
    assert_eq!(m[0]["cgroup"], agent.cgroup().as_str(), "{m:?}");
    let image_id = m[0]["image_id"].as_str().expect("image id").to_string();
    assert_eq!(image_id.len(), 64, "{m:?}");
    let human = kya_cli(&daemon, &["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains(&format!("image container {}", &agent.id[..12]))
            && human.contains(&image.name),
        "{human}"
    );
    let ns = wait_served(&daemon, agent.netns_inode(), Some("ready")).expect("served");
    assert_eq!(ns["container"]["id"], agent.id, "{ns}");

    // Decided on its image: allowed (the rule needs the image), and the
    // query the image may not make denied before the server.
    let r = mcp_in(&agent, &url, &["search_docs", r#"{"query": "kya"}"#]);
    assert_eq!(r["text"], "found 3 documents about kya", "{r}");
    let r = mcp_in(&agent, &url, &["search_docs", r#"{"query": "secrets"}"#]);
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"]
            .as_str()
            .unwrap_or("")
            .contains("agent-image-no-secrets"),
        "{r}"
    );
    assert_eq!(ran(), ["search_docs"], "only the allowed call ran");
    let ev = events_of(&daemon, &agent.id);
    assert_eq!(ev.len(), 2, "{ev:?}");
    for e in &ev {
        assert_eq!(e["process"]["container_image"], image.name.as_str(), "{e}");
        assert_eq!(e["process"]["container_image_id"], image_id.as_str(), "{e}");
    }
    // the OCSF export carries it as actor.process.container.image
    let deadline = Instant::now() + patience() * 30;
    let ocsf = loop {
        let lines: Vec<Value> = std::fs::read_to_string(&sink)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &Value| {
                v["api"]["operation"] == "tools/call"
                    && v["actor"]["process"]["container"]["uid"] == agent.id.as_str()
            })
            .collect();
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(ocsf.len(), 2, "{ocsf:#?}");
    for o in &ocsf {
        let img = &o["actor"]["process"]["container"]["image"];
        assert_eq!(img["name"], image.name.as_str(), "{o}");
        assert_eq!(img["uid"], image_id.as_str(), "{o}");
    }

    // The other image's container is not selected: its call goes straight
    // to the server (kya would have denied it: the rules need the agent image).
    assert!(served(&daemon, other.netns_inode()).is_none());
    let r = mcp_in(&other, &url, &["search_docs", r#"{"query": "secrets"}"#]);
    assert_eq!(r["text"], "found 3 documents about secrets", "{r}");
    assert_eq!(ran(), ["search_docs", "search_docs"]);
    assert!(events_of(&daemon, &other.id).is_empty());

    // A container selected otherwise (the glob) of another image: its image
    // is asked of the engine as its first connection arrives, and recorded
    // from the decision that finds it known on (never waited for); its
    // calls are denied (the rules need the agent image).
    let globbed_other = TestContainer::run(&other_image, &net, &globbed, "imgglobbed", sleep);
    wait_served(&daemon, globbed_other.netns_inode(), Some("ready"));
    let deadline = Instant::now() + patience() * 30;
    loop {
        let r = mcp_in(
            &globbed_other,
            &url,
            &["search_docs", r#"{"query": "kya"}"#],
        );
        assert_eq!(r["isError"], true, "{r}");
        let ev = events_of(&daemon, &globbed_other.id);
        if ev
            .iter()
            .any(|e| e["process"]["container_image"] == other_image.name.as_str())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the image never reached the record: {ev:?}\n{}",
            daemon.log_text()
        );
    }
    assert_eq!(
        ran(),
        ["search_docs", "search_docs"],
        "nothing from the globbed container ran"
    );
    assert_eq!(
        image_matches(&daemon).len(),
        1,
        "the globbed container is not an image match"
    );

    // A stopped container is dropped from the selection.
    let agent_ns = agent.netns_inode();
    agent.remove();
    wait_image_matches(&daemon, &[]);
    wait_served(&daemon, agent_ns, None);
}

/// A malformed or hostile `--image` stops the start, naming what is wrong;
/// nothing of it reaches a shell or an engine.
#[test]
fn a_malformed_image_reference_stops_the_start() {
    let state = tempfile::tempdir().expect("state dir");
    let pins = format!("/sys/fs/bpf/kya-e2e-{}-993", std::process::id());
    for (reference, why) in [
        ("agent;id", "may hold only letters"),
        ("$(touch /tmp/kya-pwned)", "may hold only letters"),
        ("Agent", "lowercase components"),
        ("agent@sha256:abc", "a digest must be sha256"),
        ("", "image reference is empty"),
    ] {
        let out = Command::new(kya_bin())
            .args(["run", "--config", "/dev/null", "--listen-port", "993"])
            .args(["--pin-dir", &pins, "--state-dir"])
            .arg(state.path())
            .arg(format!("--image={reference}"))
            .stdin(Stdio::null())
            .output()
            .expect("kya run");
        let _ = std::fs::remove_dir_all(&pins);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{reference:?}: {err}");
        assert!(err.contains(why), "{reference:?}: {err}");
    }
    assert!(!std::path::Path::new("/tmp/kya-pwned").exists());
}
