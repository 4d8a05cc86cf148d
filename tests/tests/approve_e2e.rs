//! An agent never answers for its human, end to end: the real MCP client
//! (PyPI `mcp`) runs as its owner's uid in a selected cgroup, as agents
//! usually do, and its `transfer` is held. A process inside the selection
//! (and one that left the cgroup but descends from a selected process) runs
//! `kya approvals approve` for that call: refused, recorded in the audit log,
//! and the call stays held (the MCP server's own record shows the tool did
//! not run). The owner, from outside the selection, approves and it runs.
//! Separation of duties: the owner's own uid may not approve a call its
//! agent process made; another approver may.

use kya_e2e::*;
use serde_json::Value;
use std::process::{Child, Command, Output, Stdio};

const PORT: u16 = 18467;

const POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"
hold_timeout = "120s"

[[rule]]
id = "big-transfer"
tool = "transfer"
when = "args.amount > 1000"
verdict = "hold"
"#;

/// The real MCP client in the cgroup, running as `user` (the agent runs as
/// its owner, so the owner's uid proves nothing about who answers).
fn agent_as(cg: &TestCgroup, user: &TestUser, args: &[&str]) -> Child {
    let script = peers().join("client.py");
    let python = peers_python();
    let url = format!("http://127.0.0.1:{PORT}/mcp");
    let (uid, gid) = (user.uid.to_string(), user.gid.to_string());
    let mut all: Vec<&str> = vec![
        "--reuid",
        &uid,
        "--regid",
        &gid,
        "--clear-groups",
        "--",
        python.to_str().expect("utf-8"),
        script.to_str().expect("utf-8"),
        &url,
    ];
    all.extend_from_slice(args);
    cg.command("setpriv", &all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the MCP client")
}

/// `setpriv` arguments that run the world-executable kya copy as `user`
/// with `kya_args` against the daemon's state directory.
fn kya_as(scene: &AgentScene, daemon: &Daemon, user: &TestUser, kya_args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--reuid".into(),
        user.uid.to_string(),
        "--regid".into(),
        user.gid.to_string(),
        // The user's groups: the scene's approvers group lets it reach the control socket.
        "--init-groups".into(),
        "--".into(),
        scene.kya_copy.path.display().to_string(),
    ];
    v.extend(kya_args.iter().map(|s| s.to_string()));
    v.push("--state-dir".into());
    v.push(daemon.state_dir.path().display().to_string());
    v
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn audit_verify(daemon: &Daemon) -> (Output, String) {
    let audit = daemon.state_dir.path().join("audit.jsonl");
    let key = daemon.state_dir.path().join("signing-key.pub.pem");
    let v = Command::new(kya_bin())
        .args(["audit", "verify"])
        .arg(&audit)
        .arg("--key")
        .arg(&key)
        .output()
        .expect("kya audit verify");
    (v, std::fs::read_to_string(&audit).expect("audit log"))
}

fn held_transfer(daemon: &Daemon, server: &McpServer) -> String {
    let a = wait_new_approval(daemon, &[]);
    assert_eq!(a["tool"], "transfer", "{a}");
    assert!(
        !server.ran().contains(&"transfer".to_string()),
        "a held call reached the server"
    );
    a["id"].as_str().expect("approval id").to_string()
}

#[test]
fn an_agent_cannot_approve_its_own_held_call() {
    if !privileged("an_agent_cannot_approve_its_own_held_call") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("selfap", POLICY);
    let (dir, cg, owner) = (&scene.dir, &scene.cg, &scene.owner);
    let server = McpServer::start(dir.path(), PORT, "peer.log");
    let mut daemon = Daemon::start(scene.daemon_options(967, PORT));

    let held = agent_as(
        cg,
        owner,
        &["transfer", r#"{"amount": 9000, "to": "mallory"}"#],
    );
    let id = held_transfer(&daemon, &server);

    // 1. A process in the selected cgroup, running as the owner (whom the
    //    uid check alone would accept), answers its own call: refused.
    let inside = cg
        .command(
            "setpriv",
            &kya_as(&scene, &daemon, owner, &["approvals", "approve", &id])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .output()
        .expect("kya inside the cgroup");
    assert!(
        !inside.status.success(),
        "a selected process approved its own call"
    );
    assert!(
        stderr(&inside).contains("is selected by kya as an agent"),
        "{}",
        stderr(&inside)
    );

    // 2. A child that moved itself out of the cgroup (to the root cgroup,
    //    selected by nothing) still descends from the selected shell: refused.
    let root_cg = cgroup2_mount();
    let mut escape: Vec<String> = vec![
        "-c".into(),
        "sh -c 'echo $$ > \"$0/cgroup.procs\" && exec \"$@\"' \"$0\" \"$@\"; exit $?".into(),
        root_cg.display().to_string(),
        "setpriv".into(),
    ];
    escape.extend(kya_as(&scene, &daemon, owner, &["approvals", "deny", &id]));
    let escaped = cg
        .command("sh", &escape.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .expect("kya in an escaped child");
    assert!(
        !escaped.status.success(),
        "a descendant of a selected process answered"
    );
    // Selection sticks to the process: the child is itself selected (and
    // would also be refused as a descendant of the selected shell).
    assert!(
        stderr(&escaped).contains("is selected by kya as an agent")
            || stderr(&escaped).contains("descends from pid"),
        "{}",
        stderr(&escaped)
    );

    // The call is still held, and the tool did not run.
    let pending = approvals_pending(&daemon);
    assert_eq!(pending.len(), 1, "the call must still be held: {pending:?}");
    assert_eq!(pending[0]["id"], id.as_str());
    assert!(!server.ran().contains(&"transfer".to_string()));

    // The attempts are in the live stream, with the caller's identity.
    let ev = kya_cli(&daemon, &["events", "--json"]);
    let refused: Vec<Value> = String::from_utf8_lossy(&ev.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &Value| e["kind"] == "control_refused")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    for (e, op) in refused.iter().zip(["approvals.approve", "approvals.deny"]) {
        assert_eq!(e["mcp"]["method"], op, "{e}");
        assert_eq!(e["verdict"], "deny", "{e}");
        assert_eq!(e["approval"]["id"], id.as_str(), "{e}");
        assert_eq!(e["process"]["uid"], owner.uid, "{e}");
        assert_eq!(e["rule"], "kya:selected-caller", "{e}");
    }
    assert_eq!(refused[0]["process"]["cgroup"], cg.rel.as_str());
    assert_eq!(refused[1]["process"]["cgroup"], "/", "the escaped child");

    // 3. The owner, from outside the selection, approves: the tool runs.
    let ok = scene.as_user(&daemon, owner, &["approvals", "approve", &id]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let r = mcp_result(held);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "transferred 9000 to mallory");
    assert_eq!(server.ran(), vec!["transfer"], "the server's own record");

    // The audit log holds both refused attempts and still verifies.
    assert!(daemon.terminate().success());
    let (v, log) = audit_verify(&daemon);
    assert!(
        v.status.success(),
        "audit log must verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        stderr(&v)
    );
    let attempts = log
        .lines()
        .filter(|l| l.contains("\"kind\":\"control_refused\"") && l.contains(&id))
        .count();
    assert_eq!(attempts, 2, "{log}");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"kind\":\"approved\"") && l.contains(&owner.name))
            .count(),
        1
    );
}

#[test]
fn separation_of_duties_refuses_the_agents_own_uid() {
    if !privileged("separation_of_duties_refuses_the_agents_own_uid") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("sepdut", POLICY);
    let (dir, cg, owner, other) = (&scene.dir, &scene.cg, &scene.owner, &scene.other);
    // The owner and another user may approve this rule's holds.
    std::fs::write(
        dir.path().join("policy.toml"),
        format!(
            "{POLICY}approvers = [\"{}\", \"{}\"]\n",
            owner.name, other.name
        ),
    )
    .expect("policy");
    let config = dir.path().join("kya.toml");
    std::fs::write(&config, "[approvals]\nseparate_duties = true\n").expect("config");
    let mut opts = scene.daemon_options(968, PORT);
    opts.config = Some(config);
    let server = McpServer::start(dir.path(), PORT, "peer.log");
    let mut daemon = Daemon::start(opts);

    let held = agent_as(cg, owner, &["transfer", r#"{"amount": 5000, "to": "bob"}"#]);
    let id = held_transfer(&daemon, &server);

    // The owner, outside the selection but the uid its agent runs as: refused.
    let same = scene.as_user(&daemon, owner, &["approvals", "approve", &id]);
    assert!(!same.status.success(), "the agent's own uid approved");
    assert!(
        stderr(&same).contains("separation of duties"),
        "{}",
        stderr(&same)
    );
    assert_eq!(approvals_pending(&daemon).len(), 1, "still held");
    assert!(!server.ran().contains(&"transfer".to_string()));

    // Another approver (a different uid) approves: the tool runs.
    let ok = scene.as_user(&daemon, other, &["approvals", "approve", &id]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let r = mcp_result(held);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "transferred 5000 to bob");
    assert_eq!(server.ran(), vec!["transfer"], "the server's own record");

    assert!(daemon.terminate().success());
    let (v, _) = audit_verify(&daemon);
    assert!(v.status.success(), "{}", stderr(&v));
}
