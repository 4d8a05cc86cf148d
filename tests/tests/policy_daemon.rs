//! Issue 4 in the daemon: registered agents are selected in the kernel, and
//! the policy reloads on file change and SIGHUP, keeping the old policy when
//! the new one is broken.

use kya_e2e::*;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

fn status(daemon: &Daemon) -> Value {
    let out = Command::new(kya_bin())
        .args(["status", "--json", "--state-dir"])
        .arg(daemon.state_dir.path())
        .output()
        .expect("kya status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn wait_status(daemon: &Daemon, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(daemon);
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:#}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn registered_agents_are_selected_without_selection_flags() {
    if !privileged("registered_agents_are_selected_without_selection_flags") {
        return;
    }
    let _g = serial();
    let cg = TestCgroup::new("registry");
    let _echo = TcpEcho::start("127.0.0.2:8443");
    let dir = tempfile::tempdir().expect("tempdir");
    let agents = dir.path().join("agents.toml");
    std::fs::write(
        &agents,
        format!(
            "[[agent]]\nname = \"e2e-bot\"\nowner = \"root\"\ncreated = \"2026-01-01\"\nmatch = {{ cgroup = \"{}\" }}\n",
            cg.rel
        ),
    )
    .expect("write agents");
    let daemon = Daemon::start(DaemonOptions::new(920).splice(8443).args([
        "--agents",
        agents.to_str().expect("utf-8"),
        "--port",
        "8443",
    ]));
    assert_eq!(status(&daemon)["policy"]["agents"], 1);
    let out = run_json(cg.command(
        probe_bin(),
        &["tcp", "127.0.0.2", "8443", "--payload", "agent"],
    ));
    assert_eq!(out["reply"], "agent", "{out}");
    let conns = daemon.wait_connections(1);
    assert!(
        conns.iter().any(|c| c["pid"] == out["pid"]),
        "the registered agent's cgroup was not selected: {conns:?}"
    );
    // Outside the agent's cgroup: direct.
    let mut direct = Command::new(probe_bin());
    direct.args(["tcp", "127.0.0.2", "8443"]);
    let other = run_json(direct);
    assert!(daemon
        .connections()
        .iter()
        .all(|c| c["pid"] != other["pid"]));
}

#[test]
fn policy_reloads_on_change_and_sighup_and_keeps_running_on_errors() {
    if !privileged("policy_reloads_on_change_and_sighup_and_keeps_running_on_errors") {
        return;
    }
    let _g = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).expect("mkdir");
    std::fs::write(
        rules.join("a.toml"),
        "[[rule]]\nid = \"a\"\ntool = \"search_*\"\nverdict = \"allow\"\n",
    )
    .expect("write");
    let cg = TestCgroup::new("reload");
    let daemon = Daemon::start(DaemonOptions::new(921).args([
        "--policy",
        rules.to_str().expect("utf-8"),
        "--cgroup",
        &cg.rel,
    ]));
    let v1 = status(&daemon)["policy"]["version"]
        .as_str()
        .expect("version")
        .to_string();
    assert_eq!(status(&daemon)["policy"]["rules"], 1);

    // A valid change is picked up by the file watcher.
    std::fs::write(
        rules.join("b.toml"),
        "[[rule]]\nid = \"b\"\ntool = \"delete_*\"\nverdict = \"deny\"\n",
    )
    .expect("write");
    let s = wait_status(&daemon, "reload after a new file", |s| {
        s["policy"]["rules"] == 2
    });
    let v2 = s["policy"]["version"]
        .as_str()
        .expect("version")
        .to_string();
    assert_ne!(v1, v2);
    assert_eq!(s["policy"]["reloads_ok"], 1);

    // A broken file is rejected with file:line errors; the running policy stays.
    std::fs::write(
        rules.join("c.toml"),
        "[[rule]]\nid = \"c\"\ntool = \"x\"\nverdict = \"maybe\"\n",
    )
    .expect("write");
    let s = wait_status(&daemon, "a rejected reload", |s| {
        s["policy"]["reloads_rejected"].as_u64() >= Some(1)
    });
    assert_eq!(s["policy"]["version"], v2.as_str());
    assert!(
        daemon.log_text().contains("c.toml:4"),
        "errors must name file:line:\n{}",
        daemon.log_text()
    );

    // SIGHUP reloads too (after the broken file is fixed).
    std::fs::remove_file(rules.join("c.toml")).expect("rm");
    wait_status(&daemon, "reload after removing the broken file", |s| {
        s["policy"]["reloads_ok"] == 2
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let s = wait_status(&daemon, "reload on SIGHUP", |s| {
        s["policy"]["reloads_ok"] == 3
    });
    assert_eq!(
        s["policy"]["version"],
        v2.as_str(),
        "same files, same version"
    );
}

#[test]
fn an_invalid_policy_at_start_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[rule]]\nid = \"x\"\nverdict = \"allow\"\nbogus = 1\n",
    )
    .expect("write");
    let out = Command::new(kya_bin())
        .args([
            "run",
            "--config",
            "/dev/null",
            "--listen-port",
            "922",
            "--state-dir",
        ])
        .arg(dir.path())
        .arg("--policy")
        .arg(&bad)
        .output()
        .expect("kya run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:4"), "{err}");
}
