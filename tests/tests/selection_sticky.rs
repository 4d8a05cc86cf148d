//! Selection sticks to the process, scripts are selectable, and a
//! connection's identity is the one the kernel saw at `connect`: checked
//! with the real daemon, judged on the upstream's own record (its peer
//! socket belongs to the daemon when, and only when, kya redirected the
//! connection).

use kya_e2e::*;
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GUARDED: &str = "8443";
/// An address of its own, so other test binaries running at the same time
/// never share the echo server.
const UPSTREAM: &str = "127.0.0.71";

fn upstream() -> TcpEcho {
    TcpEcho::start_with_owners(&format!("{UPSTREAM}:{GUARDED}"))
}

/// Options for a daemon whose guarded port carries the echo protocol (not
/// TLS or HTTP): the one place to say how such bytes are let through.
fn echo_daemon(listen_port: u16) -> DaemonOptions {
    // The echo protocol is neither TLS nor HTTP: spliced only where configured.
    DaemonOptions::new(listen_port).splice(8443)
}

/// The daemon's record of the connection made by `pid`.
fn record_for(daemon: &Daemon, pid: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let conns = daemon.connections();
        if let Some(c) = conns.iter().find(|c| c["pid"].as_u64() == Some(pid)) {
            return c.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no intercepted connection logged for pid {pid}; got {conns:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The upstream saw this connection from the daemon (redirected), judged by
/// which process owns the peer socket the upstream accepted.
fn assert_redirected(echo: &TcpEcho, daemon: &Daemon, out: &Value, what: &str) {
    let local = out["local"].as_str().unwrap_or("");
    let peers = echo.peers_with_owners();
    assert!(
        peers.iter().all(|(p, _)| p.to_string() != local),
        "{what}: the upstream saw the client directly ({local}): {peers:?}"
    );
    assert!(
        peers.iter().any(|(_, owner)| *owner == Some(daemon.pid)),
        "{what}: no upstream connection came from the daemon: {peers:?}"
    );
}

fn probe_args(payload: &str) -> Vec<String> {
    ["tcp", UPSTREAM, GUARDED, "--payload", payload]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// `sh -c SCRIPT` with `$0`.. bound to `args`.
fn sh(script: &str, args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).args(args);
    c
}

/// Wait until `pid` is in the cgroup directory `dir`.
fn wait_in_cgroup(dir: &Path, pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.lines().any(|l| l.trim() == pid.to_string()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pid} never reached {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_process_selected_by_cgroup_that_moves_out_stays_selected_with_its_children() {
    if !privileged("a_process_selected_by_cgroup_that_moves_out_stays_selected_with_its_children") {
        return;
    }
    let _g = serial();
    let selected = TestCgroup::new("stick-sel");
    let elsewhere = TestCgroup::new("stick-out");
    let echo = upstream();
    let probe = probe_bin();

    // Already in the selected cgroup when kya starts (the start-up scan).
    let early = WaitingProbe::spawn(sh(
        "echo $$ > \"$0/cgroup.procs\"; read go; echo $$ > \"$1/cgroup.procs\"; exec \"$2\" tcp \"$3\" \"$4\" --payload early --fork-exec",
        &[
            selected.path.to_str().unwrap(),
            elsewhere.path.to_str().unwrap(),
            probe.to_str().unwrap(),
            UPSTREAM,
            GUARDED,
        ],
    ));
    wait_in_cgroup(&selected.path, early.pid());
    let daemon =
        Daemon::start(echo_daemon(971).args(["--cgroup", &selected.rel, "--port", GUARDED]));

    // Started after: enters the selected cgroup, moves itself out, then
    // connects from the unselected one.
    let mut late = sh(
        "out=$1; shift; echo $$ > \"$0/cgroup.procs\" && echo $$ > \"$out/cgroup.procs\" && exec \"$@\"",
        &[
            selected.path.to_str().unwrap(),
            elsewhere.path.to_str().unwrap(),
            probe.to_str().unwrap(),
        ],
    );
    late.args(probe_args("moved-out"));
    let out = run_json(late);
    assert_eq!(out["reply"], "moved-out", "{out}");
    assert_redirected(&echo, &daemon, &out, "moved out of the selected cgroup");
    let rec = record_for(&daemon, out["pid"].as_u64().unwrap());
    assert_eq!(
        rec["cgroup"], elsewhere.rel,
        "the record names the cgroup it connected from"
    );

    // The early one moves out after kya started, then forks a child that
    // connects: both are still selected.
    let e = early.go();
    assert_eq!(e["child"]["reply"], "early", "{e}");
    assert_eq!(e["child"]["peer"], format!("{UPSTREAM}:{GUARDED}"));
    record_for(&daemon, e["child"]["pid"].as_u64().unwrap());
    assert_redirected(&echo, &daemon, &e["child"], "child of a moved process");

    // A process that was never in the selected cgroup is not selected.
    let stranger = run_json(elsewhere.command(&probe, &["tcp", UPSTREAM, GUARDED]));
    assert!(stranger["reply"].is_string(), "{stranger}");
    let local = stranger["local"].as_str().unwrap_or("");
    assert!(
        echo.peers().iter().any(|p| p.to_string() == local),
        "an unselected process must go direct"
    );
}

#[test]
fn a_process_selected_by_uid_that_changes_uid_stays_selected() {
    if !privileged("a_process_selected_by_uid_that_changes_uid_stays_selected") {
        return;
    }
    let _g = serial();
    let agent = TestUser::new("kya-e2e-stk-a");
    let other = TestUser::new("kya-e2e-stk-b");
    let copy = ProbeCopy::new("kya-probe");
    let echo = upstream();
    let daemon =
        Daemon::start(echo_daemon(972).args(["--uid", &agent.uid.to_string(), "--port", GUARDED]));
    let (b_uid, b_gid) = (other.uid.to_string(), other.gid.to_string());

    // Real uid = the selected user, effective uid root (what a setuid
    // binary or `sudo` gives): it becomes the other user, then runs the
    // client, which forks a child that connects.
    let mut c = Command::new("setpriv");
    c.args(["--ruid", &agent.uid.to_string(), "--"]);
    c.args([
        "setpriv",
        "--reuid",
        &b_uid,
        "--regid",
        &b_gid,
        "--clear-groups",
        "--",
    ]);
    c.arg(&copy.path);
    c.args(probe_args("changed-uid"));
    c.arg("--fork-exec");
    let out = run_json(c);
    let child = &out["child"];
    assert_eq!(child["reply"], "changed-uid", "{out}");
    assert_redirected(&echo, &daemon, child, "after a change of uid");
    let rec = record_for(&daemon, child["pid"].as_u64().unwrap());
    assert_eq!(rec["uid"], other.uid, "the record has the uid at connect");

    // The other user on its own is not selected.
    let direct = run_json({
        let mut c = other.command(&copy.path);
        c.args(probe_args("other-direct"));
        c
    });
    assert_eq!(direct["reply"], "other-direct", "{direct}");
    let local = direct["local"].as_str().unwrap_or("");
    assert!(
        echo.peers().iter().any(|p| p.to_string() == local),
        "a process that never had the selected uid must go direct"
    );
}

#[test]
fn an_exe_selected_process_that_execs_another_binary_stays_selected() {
    if !privileged("an_exe_selected_process_that_execs_another_binary_stays_selected") {
        return;
    }
    let _g = serial();
    let shell = ProbeCopy::of(Path::new("/bin/sh"), "agent-e2e-shell");
    let echo = upstream();
    let daemon = Daemon::start(echo_daemon(973).args([
        "--exe",
        shell.path.to_str().unwrap(),
        "--port",
        GUARDED,
    ]));
    let probe = probe_bin();
    let mut c = Command::new(&shell.path);
    c.args(["-c", "exec \"$0\" \"$@\""]).arg(&probe);
    c.args(probe_args("exec-other"));
    let out = run_json(c);
    assert_eq!(out["reply"], "exec-other", "{out}");
    assert_redirected(&echo, &daemon, &out, "after exec of another binary");
    let rec = record_for(&daemon, out["pid"].as_u64().unwrap());
    assert_eq!(
        rec["exe"],
        probe.display().to_string(),
        "the record names the image that connected"
    );
}

/// A Python agent script: connects, sends `argv[1]`, prints what it saw.
const AGENT_PY: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys
s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
local, peer = s.getsockname(), s.getpeername()
s.sendall(sys.argv[1].encode())
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    reply += b
print(json.dumps({"pid": os.getpid(), "local": "%s:%d" % local[:2],
                  "peer": "%s:%d" % peer[:2], "reply": reply.decode()}))
"#;

fn script_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("kya-e2e-script-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

#[test]
fn a_script_given_to_exe_is_selected_via_shebang_and_via_its_interpreter() {
    if !privileged("a_script_given_to_exe_is_selected_via_shebang_and_via_its_interpreter") {
        return;
    }
    let _g = serial();
    let dir = script_dir();
    let script = write_script(dir.path(), "agent-e2e.py", AGENT_PY);
    // the way npm installs CLIs: a symlink in a bin directory
    let link = dir.path().join("agent-e2e");
    std::os::unix::fs::symlink(&script, &link).expect("symlink");
    let echo = upstream();
    let daemon =
        Daemon::start(echo_daemon(974).args(["--exe", link.to_str().unwrap(), "--port", GUARDED]));
    let run = |mut c: Command, payload: &str, what: &str| {
        c.args([payload, UPSTREAM, GUARDED]);
        let out = run_json(c);
        assert_eq!(out["reply"], payload, "{what}: {out}");
        assert_eq!(out["peer"], format!("{UPSTREAM}:{GUARDED}"), "{what}");
        assert_redirected(&echo, &daemon, &out, what);
        record_for(&daemon, out["pid"].as_u64().unwrap());
    };
    // #!/usr/bin/env python3: script -> env -> python3, one process
    run(
        Command::new(&link),
        "shebang-link",
        "run through its #! (symlink)",
    );
    run(Command::new(&script), "shebang", "run through its #!");
    let mut c = Command::new("python3");
    c.arg(&script);
    run(c, "interp-abs", "python3 /path/script");
    let mut c = Command::new("python3");
    c.arg("agent-e2e.py").current_dir(dir.path());
    run(c, "interp-rel", "python3 ./script (relative)");

    // Another Python program is not selected.
    let other = write_script(dir.path(), "not-the-agent.py", AGENT_PY);
    let mut c = Command::new("python3");
    c.arg(&other).args(["other", UPSTREAM, GUARDED]);
    let out = run_json(c);
    assert_eq!(out["reply"], "other", "{out}");
    let local = out["local"].as_str().unwrap_or("");
    assert!(
        echo.peers().iter().any(|p| p.to_string() == local),
        "another script must go direct"
    );
    assert!(daemon.connections().iter().all(|c| c["pid"] != out["pid"]));
}

/// A client in `cg` that connects to `host:port`, moves itself to `after`,
/// then execs another binary (a copy of sh running `shell`, which finds the
/// socket on fd 9 and ends in `cat <&9`). The daemon is held stopped until
/// the exec is done, so it only accepts (and looks at the process) after.
/// Returns the client (still running) and the interpreter that connected.
fn connect_then_exec(
    daemon: &Daemon,
    cg: &TestCgroup,
    after: &TestCgroup,
    host: &str,
    port: &str,
    shell: &str,
) -> (std::process::Child, PathBuf) {
    let dir = script_dir();
    let script = write_script(
        dir.path(),
        "connect-then-exec.py",
        r#"import os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
with open(os.path.join(sys.argv[3], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
s.setblocking(True)  # the exec'd shell and cat block on it
os.dup2(s.fileno(), 9)  # dup2 makes it inheritable
os.execv(sys.argv[4], [sys.argv[4], "-c", sys.argv[5]])
"#,
    );
    let later = ProbeCopy::of(Path::new("/bin/sh"), "later-e2e-shell");
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP the daemon");
    let _resume = Resume(daemon.pid);
    let child = cg
        .command(
            &python,
            &[
                script.to_str().unwrap(),
                host,
                port,
                after.path.to_str().unwrap(),
                later.path.to_str().unwrap(),
                shell,
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    // the later shell, then the cat it execs (the first image is the sh
    // that moves into the cgroup, then the interpreter that connects)
    let cat = std::fs::canonicalize("/bin/cat").expect("cat");
    while !std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p == later.path || p == cat)
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "the client never exec'd: {:?}",
            std::fs::read_link(format!("/proc/{pid}/exe"))
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, python)
}

#[test]
fn the_identity_is_the_one_at_connect_even_after_exec_and_a_cgroup_move() {
    if !privileged("the_identity_is_the_one_at_connect_even_after_exec_and_a_cgroup_move") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("ident");
    let after = TestCgroup::new("ident-after");
    let _echo = upstream();
    let mut daemon = Daemon::start(echo_daemon(975).args(["--cgroup", &cg.rel, "--port", GUARDED]));
    let (mut child, python) = connect_then_exec(
        &daemon,
        &cg,
        &after,
        UPSTREAM,
        GUARDED,
        "printf later >&9; exec cat <&9",
    );
    let rec = record_for(&daemon, u64::from(child.id()));
    assert_eq!(
        rec["exe"],
        python.display().to_string(),
        "the connection belongs to the image that connected, not the one that wrote: {rec}"
    );
    assert_eq!(
        rec["cgroup"], cg.rel,
        "the connection belongs to the cgroup it connected from: {rec}"
    );
    let _ = child.kill();
    let _ = child.wait();
    daemon.kill9();
}

#[test]
fn the_decision_record_names_the_process_as_it_was_at_connect() {
    if !privileged("the_decision_record_names_the_process_as_it_was_at_connect") {
        return;
    }
    let _g = serial();
    ensure_peers();
    let cg = TestCgroup::new("ident-mcp");
    let after = TestCgroup::new("ident-mcp-after");
    let dir = tempfile::tempdir().expect("tempdir");
    const PORT: u16 = 18471;
    let server = McpServer::start(dir.path(), PORT, "ran.log");
    let mut daemon = Daemon::start(DaemonOptions::new(977).args([
        "--cgroup",
        &cg.rel,
        "--port",
        &PORT.to_string(),
    ]));
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_docs","arguments":{"query":"kya"}}}"#;
    let request = format!(
        "POST /mcp HTTP/1.1\\r\\nHost: 127.0.0.1:{PORT}\\r\\nContent-Type: application/json\\r\\nAccept: application/json, text/event-stream\\r\\nContent-Length: {}\\r\\n\\r\\n{body}",
        body.len()
    );
    let shell = format!("printf '%b' '{request}' >&9; exec cat <&9");
    let (mut child, python) =
        connect_then_exec(&daemon, &cg, &after, "127.0.0.1", &PORT.to_string(), &shell);
    let deadline = Instant::now() + Duration::from_secs(20);
    let event = loop {
        if let Some(e) = tool_call_events(&daemon).into_iter().next() {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "no decision on the tools/call:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let p = &event["process"];
    assert_eq!(p["tgid"], child.id(), "{event}");
    assert_eq!(
        p["exe"],
        python.display().to_string(),
        "the decision names the image that connected: {event}"
    );
    assert_eq!(
        p["cgroup"], cg.rel,
        "and the cgroup it connected from: {event}"
    );
    let _ = server.ran(); // the server's record is not the subject here
    let _ = child.kill();
    let _ = child.wait();
    daemon.kill9();
}

/// SIGCONT on drop, so a failing test never leaves the daemon stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

#[test]
fn status_counts_live_processes_per_selector_and_run_warns_about_empty_ones() {
    if !privileged("status_counts_live_processes_per_selector_and_run_warns_about_empty_ones") {
        return;
    }
    let _g = serial();
    let busy = TestCgroup::new("live-busy");
    let empty = TestCgroup::new("live-empty");
    let mut sleeper = busy
        .command("sleep", &["1000"])
        .stdin(Stdio::null())
        .spawn()
        .expect("sleeper");
    wait_in_cgroup(&busy.path, sleeper.id());
    let daemon = Daemon::start(DaemonOptions::new(976).args([
        "--cgroup",
        &busy.rel,
        "--cgroup",
        &empty.rel,
        "--uid",
        "45711",
        "--exe",
        "/nonexistent/kya-e2e-agent",
        "--port",
        GUARDED,
    ]));
    let warned = |selector: &str| {
        daemon
            .events()
            .iter()
            .any(|e| e["level"] == "WARN" && e["fields"]["selector"].as_str() == Some(selector))
    };
    assert!(warned(&empty.rel), "{}", daemon.log_text());
    assert!(warned("45711"), "{}", daemon.log_text());
    assert!(
        warned("/nonexistent/kya-e2e-agent"),
        "{}",
        daemon.log_text()
    );
    assert!(!warned(&busy.rel), "a cgroup with a process is fine");

    let live = |s: &Value, sel: &str| -> u64 {
        s["selection_live"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["selector"] == sel))
            .and_then(|c| c["processes"].as_u64())
            .unwrap_or_else(|| panic!("no count for {sel}: {s}"))
    };
    let s = kya_status(&daemon);
    assert_eq!(live(&s, &busy.rel), 1, "{s}");
    assert_eq!(live(&s, &empty.rel), 0, "{s}");
    assert_eq!(live(&s, "45711"), 0, "{s}");

    // Moved to the other selected cgroup: still held by the first one.
    std::fs::write(empty.path.join("cgroup.procs"), sleeper.id().to_string()).expect("move");
    let s = kya_status(&daemon);
    assert_eq!(live(&s, &busy.rel), 1, "{s}");
    assert_eq!(live(&s, &empty.rel), 0, "{s}");
    let human = kya_cli(&daemon, &["status"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains(&format!("live.cgroup {}", busy.rel)),
        "{}",
        String::from_utf8_lossy(&human.stdout)
    );

    // Ends with the process.
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let s = kya_status(&daemon);
    assert_eq!(live(&s, &busy.rel), 0, "{s}");
    let _ = std::io::stdout().flush();
}
