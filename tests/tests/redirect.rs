//! Issue 2 acceptance: the eBPF redirect of selected, unmodified processes
//! through kya's interceptor, checked against the peers' own records.

use kya_e2e::*;
use serde_json::Value;
use std::process::Command;

const GUARDED: &str = "8443";

fn probe_tcp(host: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["tcp".to_string(), host.to_string(), GUARDED.to_string()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn plain(program: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// The daemon's record of the connection made by `pid`.
fn record_for(daemon: &Daemon, pid: u64) -> Value {
    let conns = daemon.wait_connections(1);
    conns
        .iter()
        .find(|c| c["pid"].as_u64() == Some(pid))
        .cloned()
        .unwrap_or_else(|| panic!("no intercepted connection logged for pid {pid}; got {conns:#?}"))
}

#[test]
fn selected_cgroup_is_redirected_attributed_and_transparent() {
    if !privileged("selected_cgroup_is_redirected_attributed_and_transparent") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("sel");
    let echo = TcpEcho::start_with_owners("127.0.0.2:8443");
    let daemon = Daemon::start(
        DaemonOptions::new(901)
            .splice(8443)
            .args(["--cgroup", &cg.rel, "--port", GUARDED]),
    );
    let probe = probe_bin();

    let out = run_json(cg.command(
        &probe,
        &refs(&probe_tcp("127.0.0.2", &["--payload", "ping-sel"])),
    ));
    assert_eq!(out["reply"], "ping-sel", "{out}");
    assert_eq!(
        out["peer"], "127.0.0.2:8443",
        "getpeername must report the original peer: {out}"
    );

    // The server's own record: its peer is the daemon's socket, not the client's.
    let peers = echo.peers_with_owners();
    assert_eq!(peers.len(), 1, "{peers:?}");
    let (peer, owner) = peers[0];
    assert_ne!(
        peer.to_string(),
        out["local"].as_str().unwrap_or(""),
        "server saw the client directly"
    );
    assert_eq!(
        owner,
        Some(daemon.pid),
        "server's peer socket must belong to the daemon"
    );

    let rec = record_for(&daemon, out["pid"].as_u64().unwrap());
    assert_eq!(rec["uid"], 0);
    assert_eq!(rec["comm"], "kya-probe");
    assert_eq!(rec["exe"], probe.display().to_string());
    assert_eq!(rec["dst"], "127.0.0.2:8443");
    assert_eq!(rec["cgroup"], cg.rel);
}

#[test]
fn unselected_process_goes_direct() {
    if !privileged("unselected_process_goes_direct") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("unsel");
    let echo = TcpEcho::start("127.0.0.2:8443");
    let daemon = Daemon::start(
        DaemonOptions::new(902)
            .splice(8443)
            .args(["--cgroup", &cg.rel, "--port", GUARDED]),
    );
    let probe = probe_bin();
    let out = run_json(plain(
        &probe,
        &refs(&probe_tcp("127.0.0.2", &["--payload", "direct"])),
    ));
    assert_eq!(out["reply"], "direct", "{out}");
    assert_eq!(
        echo.peers().first().map(|p| p.to_string()),
        out["local"].as_str().map(str::to_string),
        "server must see the client itself"
    );
    assert!(
        daemon.connections().is_empty(),
        "interceptor saw an unselected connection"
    );
}

#[test]
fn children_and_threads_of_a_selected_process_are_selected() {
    if !privileged("children_and_threads_of_a_selected_process_are_selected") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("kids");
    let _echo = TcpEcho::start("127.0.0.2:8443");
    let daemon = Daemon::start(
        DaemonOptions::new(903)
            .splice(8443)
            .args(["--cgroup", &cg.rel, "--port", GUARDED]),
    );
    let probe = probe_bin();

    let t = run_json(cg.command(
        &probe,
        &refs(&probe_tcp(
            "127.0.0.2",
            &["--thread", "--payload", "thread"],
        )),
    ));
    assert_eq!(t["reply"], "thread", "{t}");
    assert_eq!(t["in_thread"], true);
    assert_ne!(
        t["tid"], t["pid"],
        "the connect must come from a non-leader thread"
    );
    let rec = record_for(&daemon, t["pid"].as_u64().unwrap());
    assert_eq!(rec["tid"], t["tid"]);

    let f = run_json(cg.command(
        &probe,
        &refs(&probe_tcp(
            "127.0.0.2",
            &["--fork-exec", "--payload", "child"],
        )),
    ));
    assert_eq!(f["child"]["reply"], "child", "{f}");
    assert_ne!(f["child"]["pid"], f["pid"]);
    assert_eq!(f["child"]["peer"], "127.0.0.2:8443");
    record_for(&daemon, f["child"]["pid"].as_u64().unwrap());

    // A descendant cgroup is covered too.
    let sub = cg.child("sub");
    let d = run_json(in_cgroup(
        &sub,
        &probe,
        &refs(&probe_tcp("127.0.0.2", &["--payload", "sub"])),
    ));
    assert_eq!(d["reply"], "sub");
    record_for(&daemon, d["pid"].as_u64().unwrap());
}

#[test]
fn ipv6_and_ipv4_mapped_connects_are_redirected() {
    if !privileged("ipv6_and_ipv4_mapped_connects_are_redirected") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("v6");
    let echo4 = TcpEcho::start_with_owners("127.0.0.2:8443");
    let echo6 = TcpEcho::start_with_owners("[::1]:8443");
    let daemon = Daemon::start(
        DaemonOptions::new(904)
            .splice(8443)
            .args(["--cgroup", &cg.rel, "--port", GUARDED]),
    );
    let probe = probe_bin();

    let v6 = run_json(cg.command(&probe, &refs(&probe_tcp("::1", &["--payload", "six"]))));
    assert_eq!(v6["reply"], "six", "{v6}");
    assert_eq!(v6["peer"], "[::1]:8443");
    assert_eq!(
        echo6.peers_with_owners().first().and_then(|p| p.1),
        Some(daemon.pid)
    );
    assert_eq!(
        record_for(&daemon, v6["pid"].as_u64().unwrap())["dst"],
        "[::1]:8443"
    );

    let mapped = run_json(cg.command(
        &probe,
        &refs(&probe_tcp("::ffff:127.0.0.2", &["--payload", "mapped"])),
    ));
    assert_eq!(mapped["reply"], "mapped", "{mapped}");
    assert_eq!(mapped["peer"], "[::ffff:127.0.0.2]:8443");
    assert_eq!(
        echo4.peers_with_owners().first().and_then(|p| p.1),
        Some(daemon.pid)
    );
    record_for(&daemon, mapped["pid"].as_u64().unwrap());
}

#[test]
fn udp_to_guarded_port_is_refused_for_selected_processes_only() {
    if !privileged("udp_to_guarded_port_is_refused_for_selected_processes_only") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("udp");
    let _udp = UdpEcho::start("127.0.0.2:8443");
    let _daemon = Daemon::start(
        DaemonOptions::new(905)
            .splice(8443)
            .args(["--cgroup", &cg.rel, "--port", GUARDED]),
    );
    let probe = probe_bin();
    let args = ["udp", "127.0.0.2", GUARDED];

    let refused = run_json(cg.command(&probe, &args));
    let errno = refused["errno"].as_i64();
    assert!(
        errno == Some(libc::EPERM as i64) || errno == Some(libc::ECONNREFUSED as i64),
        "selected UDP must fail with EPERM/ECONNREFUSED: {refused}"
    );
    let ok = run_json(plain(&probe, &args));
    assert_eq!(ok["reply"], "udp-probe", "unselected UDP must work: {ok}");
}

#[test]
fn selection_by_uid() {
    if !privileged("selection_by_uid") {
        return;
    }
    let _g = serial();
    const UID: &str = "45678";
    let copy = ProbeCopy::new("kya-probe");
    let _echo = TcpEcho::start("127.0.0.2:8443");
    let daemon = Daemon::start(
        DaemonOptions::new(906)
            .splice(8443)
            .args(["--uid", UID, "--port", GUARDED]),
    );
    let mut as_user = Command::new("setpriv");
    as_user
        .args(["--reuid", UID, "--regid", UID, "--clear-groups", "--"])
        .arg(&copy.path)
        .args(["tcp", "127.0.0.2", GUARDED, "--payload", "by-uid"]);
    let out = run_json(as_user);
    assert_eq!(out["reply"], "by-uid", "{out}");
    let rec = record_for(&daemon, out["pid"].as_u64().unwrap());
    assert_eq!(rec["uid"], 45678);
    // root is not selected.
    let root = run_json(plain(&copy.path, &["tcp", "127.0.0.2", GUARDED]));
    assert!(root["reply"].is_string());
    assert!(daemon.connections().iter().all(|c| c["pid"] != root["pid"]));
}

#[test]
fn selection_by_pid_covers_the_process_and_its_children() {
    if !privileged("selection_by_pid_covers_the_process_and_its_children") {
        return;
    }
    let _g = serial();
    let probe = probe_bin();
    let _echo = TcpEcho::start("127.0.0.2:8443");
    let itself = WaitingProbe::spawn(plain(
        &probe,
        &[
            "tcp",
            "127.0.0.2",
            GUARDED,
            "--wait-stdin",
            "--payload",
            "pid",
        ],
    ));
    let parent = WaitingProbe::spawn(plain(
        &probe,
        &["tcp", "127.0.0.2", GUARDED, "--wait-stdin", "--fork-exec"],
    ));
    let (p1, p2) = (itself.pid().to_string(), parent.pid().to_string());
    let daemon = Daemon::start(
        DaemonOptions::new(907)
            .splice(8443)
            .args(["--pid", &p1, "--pid", &p2, "--port", GUARDED]),
    );
    let a = itself.go();
    assert_eq!(a["reply"], "pid", "{a}");
    record_for(&daemon, a["pid"].as_u64().unwrap());
    let b = parent.go();
    assert_eq!(b["child"]["peer"], "127.0.0.2:8443", "{b}");
    record_for(&daemon, b["child"]["pid"].as_u64().unwrap());
}

#[test]
fn selection_by_executable_before_and_after_start() {
    if !privileged("selection_by_executable_before_and_after_start") {
        return;
    }
    let _g = serial();
    let agent = ProbeCopy::new("agent-e2e-bin");
    let _echo = TcpEcho::start("127.0.0.2:8443");
    // Started before the daemon, acts after it is up.
    let early = WaitingProbe::spawn(plain(
        &agent.path,
        &[
            "tcp",
            "127.0.0.2",
            GUARDED,
            "--wait-stdin",
            "--payload",
            "early",
        ],
    ));
    let glob = agent.path.with_file_name("agent-e2e-*");
    let daemon = Daemon::start(DaemonOptions::new(908).splice(8443).args([
        "--exe",
        &glob.display().to_string(),
        "--port",
        GUARDED,
    ]));

    // Started after the daemon: connects immediately after exec.
    let late = run_json(plain(
        &agent.path,
        &["tcp", "127.0.0.2", GUARDED, "--payload", "late"],
    ));
    assert_eq!(late["reply"], "late", "{late}");
    let rec = record_for(&daemon, late["pid"].as_u64().unwrap());
    assert_eq!(rec["exe"], agent.path.display().to_string());

    let e = early.go();
    assert_eq!(e["reply"], "early", "{e}");
    record_for(&daemon, e["pid"].as_u64().unwrap());

    // Another executable is not selected.
    let other = run_json(plain(&probe_bin(), &["tcp", "127.0.0.2", GUARDED]));
    assert!(daemon
        .connections()
        .iter()
        .all(|c| c["pid"] != other["pid"]));
}

#[test]
fn killed_daemon_fails_closed_and_restart_replaces_pins() {
    if !privileged("killed_daemon_fails_closed_and_restart_replaces_pins") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("kill");
    let echo = TcpEcho::start("127.0.0.2:8443");
    let opts = || {
        DaemonOptions::new(909)
            .splice(8443)
            .args(["--cgroup", cg.rel.as_str(), "--port", GUARDED])
    };
    let before = attached_programs();
    let mut daemon = Daemon::start(opts());
    let ours = attached_programs().difference(&before).count();
    assert!(ours > 0, "the daemon attached nothing");
    assert!(
        skip_tgids().contains(&daemon.pid),
        "the daemon's own connections are skipped by its tgid"
    );
    daemon.kill9();
    // The exit tracepoint forgets the dead daemon's tgid at once: a process
    // that later gets the same pid is refused like any selected one.
    assert!(
        !skip_tgids().contains(&daemon.pid),
        "a killed daemon's tgid stayed in the pinned skip map"
    );

    let probe = probe_bin();
    let refused = run_json(cg.command(&probe, &["tcp", "127.0.0.2", GUARDED]));
    assert_eq!(
        refused["errno"],
        libc::ECONNREFUSED,
        "selected connect must be refused while kya is down: {refused}"
    );
    let direct = run_json(plain(
        &probe,
        &["tcp", "127.0.0.2", GUARDED, "--payload", "still-up"],
    ));
    assert_eq!(
        direct["reply"], "still-up",
        "the server must stay reachable for unselected processes"
    );
    assert!(
        echo.peers().len() == 1,
        "the refused connect must not reach the server"
    );

    // Restart on the same pin dir: the stale pins are replaced, not stacked.
    let mut o = opts();
    o.reuse_pins = true;
    let mut again = Daemon::start(o);
    assert_eq!(
        attached_programs().difference(&before).count(),
        ours,
        "restart stacked a second set of programs"
    );
    let ok = run_json(cg.command(&probe, &["tcp", "127.0.0.2", GUARDED, "--payload", "again"]));
    assert_eq!(ok["reply"], "again", "{ok}");
    record_for(&again, ok["pid"].as_u64().unwrap());
    assert!(again.terminate().success());
    assert!(attached_programs().difference(&before).next().is_none());
}

#[test]
fn fail_open_daemon_leaves_nothing_behind_when_killed() {
    if !privileged("fail_open_daemon_leaves_nothing_behind_when_killed") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("open");
    let echo = TcpEcho::start("127.0.0.2:8443");
    let before = attached_programs();
    let mut daemon = Daemon::start(DaemonOptions::new(910).splice(8443).args([
        "--cgroup",
        &cg.rel,
        "--port",
        GUARDED,
        "--fail-open",
    ]));
    daemon.kill9();
    let out = run_json(cg.command(
        probe_bin(),
        &["tcp", "127.0.0.2", GUARDED, "--payload", "open"],
    ));
    assert_eq!(
        out["reply"], "open",
        "fail-open must let the agent through directly: {out}"
    );
    assert_eq!(
        echo.peers().last().map(|p| p.to_string()),
        out["local"].as_str().map(str::to_string)
    );
    assert!(
        attached_programs().difference(&before).next().is_none(),
        "fail-open left programs attached"
    );
}

#[test]
fn clean_shutdown_leaves_no_pins_and_no_programs() {
    if !privileged("clean_shutdown_leaves_no_pins_and_no_programs") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("clean");
    let before = attached_programs();
    let mut daemon = Daemon::start(
        DaemonOptions::new(911)
            .splice(8443)
            .args(["--cgroup", &cg.rel, "--port", GUARDED]),
    );
    let ours: Vec<_> = attached_programs().difference(&before).cloned().collect();
    assert!(!ours.is_empty());
    assert!(
        daemon.pin_dir.exists(),
        "fail-closed daemon must pin its links"
    );
    assert!(daemon.terminate().success(), "{}", daemon.log_text());
    let after = attached_programs();
    for p in &ours {
        assert!(
            !after.contains(p),
            "program {p:?} still attached after a clean exit"
        );
    }
    assert!(
        !daemon.pin_dir.exists(),
        "pin dir {} left behind",
        daemon.pin_dir.display()
    );
}

#[test]
fn interceptor_inside_the_selected_cgroup_does_not_loop() {
    if !privileged("interceptor_inside_the_selected_cgroup_does_not_loop") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("loop");
    let echo = TcpEcho::start_with_owners("127.0.0.2:8443");
    let mut opts = DaemonOptions::new(912)
        .splice(8443)
        .args(["--cgroup", &cg.rel, "--port", GUARDED]);
    opts.in_cgroup = Some(cg.path.clone());
    let daemon = Daemon::start(opts);
    assert!(
        cg.pids().contains(&daemon.pid),
        "daemon is not inside the selected cgroup"
    );
    let out = run_json(cg.command(
        probe_bin(),
        &["tcp", "127.0.0.2", GUARDED, "--payload", "no-loop"],
    ));
    assert_eq!(out["reply"], "no-loop", "{out}");
    assert_eq!(
        echo.peers_with_owners().first().and_then(|p| p.1),
        Some(daemon.pid)
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        daemon.connections().len(),
        1,
        "the daemon's upstream connection was redirected to itself"
    );
}

#[test]
fn run_help_documents_the_contract() {
    let out = Command::new(kya_bin())
        .args(["run", "--help"])
        .output()
        .expect("kya run --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--policy",
        "--agents",
        "--cgroup",
        "--uid",
        "--exe",
        "--pid",
        "--port",
        "--listen-port",
        "--pin-dir",
        "--state-dir",
        "--audit",
        "--upstream-ca",
        "--metrics",
        "--fail-open",
    ] {
        assert!(text.contains(flag), "kya run --help lacks {flag}");
    }
}

#[test]
fn status_reports_pins_selection_and_counters() {
    if !privileged("status_reports_pins_selection_and_counters") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("status");
    let _echo = TcpEcho::start("127.0.0.2:8443");
    let daemon = Daemon::start(
        DaemonOptions::new(913)
            .splice(8443)
            .args(["--cgroup", &cg.rel, "--port", GUARDED]),
    );
    let out = run_json(cg.command(probe_bin(), &["tcp", "127.0.0.2", GUARDED]));
    assert!(out["reply"].is_string(), "{out}");
    daemon.wait_connections(1);
    let state = daemon.state_dir.path().display().to_string();
    let status = Command::new(kya_bin())
        .args(["status", "--json", "--state-dir", &state])
        .output()
        .expect("kya status");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let s: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(s["pid"], daemon.pid);
    assert_eq!(s["pins_present"], true);
    assert_eq!(s["listen_port"], 913);
    assert_eq!(s["selection"]["cgroups"][0], cg.rel.as_str());
    assert!(s["kernel"]["redirected4"].as_u64() >= Some(1), "{s}");
    assert!(s["kernel"]["established"].as_u64() >= Some(1), "{s}");
    assert!(s["interceptor"]["accepted"].as_u64() >= Some(1), "{s}");
    let human = Command::new(kya_bin())
        .args(["status", "--state-dir", &state])
        .output()
        .expect("kya status");
    assert!(String::from_utf8_lossy(&human.stdout).contains("kernel.redirected4"));
    // No daemon: a clear error, exit 1.
    let none = Command::new(kya_bin())
        .args(["status", "--state-dir", "/nonexistent-kya"])
        .output()
        .expect("kya status");
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("cannot reach the kya daemon"));
}

#[test]
fn metrics_endpoint_counts_redirected_connections() {
    if !privileged("metrics_endpoint_counts_redirected_connections") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("metrics");
    let _echo = TcpEcho::start("127.0.0.2:8443");
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr")
    };
    let daemon = Daemon::start(DaemonOptions::new(914).splice(8443).args([
        "--cgroup",
        &cg.rel,
        "--port",
        GUARDED,
        "--metrics",
        &addr.to_string(),
    ]));
    for i in 0..3 {
        let out = run_json(cg.command(
            probe_bin(),
            &["tcp", "127.0.0.2", GUARDED, "--payload", &format!("m{i}")],
        ));
        assert_eq!(out["reply"], format!("m{i}"));
    }
    daemon.wait_connections(3);
    let body = http_get(addr, "/metrics");
    let value = |name: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing from:\n{body}"))
    };
    assert_eq!(value("kya_intercept_accepted_total "), 3);
    assert_eq!(value("kya_kernel_redirected_total "), 3);
    assert_eq!(value("kya_kernel_established_total "), 3);
}
