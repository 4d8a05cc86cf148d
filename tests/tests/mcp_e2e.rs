//! Issues 3, 5, 6 end to end: an unmodified MCP client (PyPI `mcp`) in a
//! selected cgroup talks to a real MCP server over plaintext Streamable HTTP on
//! a guarded port; the eBPF redirect brings it through kya, which decides every
//! tool call. Checked against the server's own record of which tools really
//! ran, the client's own output, and the audit log verified offline.

use kya_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const PORT: u16 = 18080;
const LEGACY_PORT: u16 = 18081;

/// The Python MCP server on the guarded port (`--transport sse`: legacy).
fn server(dir: &Path) -> McpServer {
    McpServer::start(dir, PORT, "peer.log")
}

/// The real MCP client in the cgroup, calling the server on the guarded port.
fn client(cg: &TestCgroup, args: &[&str]) -> Child {
    mcp_client(cg, &format!("http://127.0.0.1:{PORT}/mcp"), args)
}

fn wait_pending(daemon: &Daemon) -> Value {
    wait_new_approval(daemon, &[])
}

const POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"
hold_timeout = "4s"

[[rule]]
id = "docs-ok"
tool = "search_docs"
verdict = "allow"

[[rule]]
id = "no-delete"
tool = "delete_*"
verdict = "deny"
reason = "deleting records is not allowed from agents"

[[rule]]
id = "big-transfer"
tool = "transfer"
when = "args.amount > 1000"
verdict = "hold"

[[rule]]
id = "small-transfer"
tool = "transfer"
when = "args.amount <= 1000"
verdict = "allow"
"#;

#[test]
fn real_mcp_client_is_governed_through_the_redirect() {
    if !privileged("real_mcp_client_is_governed_through_the_redirect") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("mcp", POLICY);
    let (dir, cg, alice, mallory) = (&scene.dir, &scene.cg, &scene.owner, &scene.other);
    let server = server(dir.path());
    let legacy = McpServer::start_with(
        dir.path(),
        LEGACY_PORT,
        &["--transport", "sse"],
        "legacy.log",
    );
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr")
    };
    let mut daemon = Daemon::start(DaemonOptions::new(930).args(scene.daemon_args()).args([
        "--port",
        &PORT.to_string(),
        "--port",
        &LEGACY_PORT.to_string(),
        "--metrics",
        &metrics_addr.to_string(),
    ]));
    let as_user = |u: &TestUser, args: &[&str]| scene.as_user(&daemon, u, args);

    // tools/list: a tool this agent may never call is hidden.
    let listed = mcp_result(client(cg, &["--list"]));
    let tools: Vec<&str> = listed["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        tools.contains(&"search_docs") && tools.contains(&"transfer"),
        "{listed}"
    );
    assert!(
        !tools.contains(&"delete_records"),
        "delete_records must be hidden: {listed}"
    );

    // allow: the server's real result.
    let allowed = client(cg, &["search_docs", r#"{"query": "kya"}"#]);
    let allowed_pid = allowed.id();
    let r = mcp_result(allowed);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about kya");

    // deny: the denial text, and the server never ran the tool.
    let r = mcp_result(client(cg, &["delete_records", r#"{"table": "users"}"#]));
    assert_eq!(r["isError"], true, "{r}");
    let text = r["text"].as_str().unwrap_or("");
    assert!(
        text.contains("kya denied this call") && text.contains("no-delete"),
        "{r}"
    );

    // hold, approved by the owner: completes with the real result.
    let held = client(cg, &["transfer", r#"{"amount": 5000, "to": "bob"}"#]);
    let a = wait_pending(&daemon);
    assert_eq!(a["agent"], "e2e-agent");
    assert_eq!(a["tool"], "transfer");
    assert_eq!(a["owner"], alice.name.as_str());
    assert!(
        a["binding_message"]
            .as_str()
            .unwrap_or("")
            .starts_with("KYA-"),
        "{a}"
    );
    assert_eq!(
        server.ran().iter().filter(|t| *t == "transfer").count(),
        0,
        "a held call reached the server"
    );
    let id = a["id"].as_str().expect("id");
    // Another local user may not answer: refused, and the call stays held.
    let no = as_user(mallory, &["approvals", "approve", id]);
    assert!(!no.status.success(), "mallory approved alice's call");
    assert!(
        String::from_utf8_lossy(&no.stderr).contains("may not answer"),
        "{}",
        String::from_utf8_lossy(&no.stderr)
    );
    assert_eq!(
        approvals_pending(&daemon).len(),
        1,
        "the call must still be held"
    );
    // The owner, a non-root user, sees it and approves it.
    let seen = as_user(alice, &["approvals", "list", "--json"]);
    assert!(
        String::from_utf8_lossy(&seen.stdout).contains(id),
        "{}",
        String::from_utf8_lossy(&seen.stderr)
    );
    let ok = as_user(alice, &["approvals", "approve", id]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let r = mcp_result(held);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "transferred 5000 to bob");

    // hold, denied by the owner.
    let held = client(cg, &["transfer", r#"{"amount": 7000, "to": "eve"}"#]);
    let a = wait_pending(&daemon);
    let no = as_user(
        alice,
        &[
            "approvals",
            "deny",
            a["id"].as_str().expect("id"),
            "--reason",
            "not today",
        ],
    );
    assert!(
        no.status.success(),
        "{}",
        String::from_utf8_lossy(&no.stderr)
    );
    let r = mcp_result(held);
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("not today"),
        "{r}"
    );

    // hold, nobody answers: denied after the hold timeout.
    let r = mcp_result(client(
        cg,
        &["transfer", r#"{"amount": 6000, "to": "mallory"}"#],
    ));
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"]
            .as_str()
            .unwrap_or("")
            .contains("no approval within"),
        "{r}"
    );

    // The legacy HTTP+SSE transport goes through the same decision point.
    let legacy_url = format!("http://127.0.0.1:{LEGACY_PORT}/sse");
    let r = mcp_result(mcp_client(
        cg,
        &legacy_url,
        &["search_docs", r#"{"query": "legacy"}"#, "--sse"],
    ));
    assert_eq!(r["text"], "found 3 documents about legacy", "{r}");
    let r = mcp_result(mcp_client(
        cg,
        &legacy_url,
        &["delete_records", r#"{"table": "t"}"#, "--sse"],
    ));
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("no-delete"),
        "{r}"
    );
    assert_eq!(
        legacy.ran(),
        vec!["search_docs"],
        "the legacy server's own record"
    );

    // Metrics agree with the decisions made.
    let metrics = http_get(metrics_addr, "/metrics");
    let value = |series: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    };
    assert_eq!(
        value(r#"kya_decisions_total{verdict="deny",agent="e2e-agent",rule="no-delete"} "#),
        2,
        "{metrics}"
    );
    assert_eq!(
        value(r#"kya_decisions_total{verdict="allow",agent="e2e-agent",rule="docs-ok"} "#),
        2,
        "{metrics}"
    );
    assert_eq!(
        value(r#"kya_decisions_total{verdict="hold",agent="e2e-agent",rule="big-transfer"} "#),
        3,
        "{metrics}"
    );
    assert_eq!(
        value(r#"kya_approvals_total{channel="local",outcome="approved"} "#),
        1,
        "{metrics}"
    );
    assert_eq!(
        value(r#"kya_approvals_total{channel="local",outcome="denied"} "#),
        1,
        "{metrics}"
    );
    assert_eq!(
        value(r#"kya_approvals_total{channel="none",outcome="expired"} "#),
        1,
        "{metrics}"
    );
    assert_eq!(value("kya_held_calls "), 0, "{metrics}");

    // The server's own record: exactly the allowed and approved calls ran.
    assert_eq!(
        server.ran(),
        vec!["search_docs", "transfer"],
        "tools that really ran"
    );

    // The live stream saw every decision with the client's process identity.
    let ev = kya_cli(&daemon, &["events", "--json"]);
    assert!(
        ev.status.success(),
        "{}",
        String::from_utf8_lossy(&ev.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&ev.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &Value| e["mcp"]["method"] == "tools/call")
        .collect();
    let kinds: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or("").to_string(),
                e["verdict"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let count = |k: &str, v: &str| kinds.iter().filter(|(a, b)| a == k && b == v).count();
    assert_eq!(count("decision", "allow"), 2, "{kinds:?}");
    assert_eq!(count("decision", "deny"), 2, "{kinds:?}");
    assert_eq!(count("hold", "hold"), 3, "{kinds:?}");
    assert_eq!(count("approved", "allow"), 1, "{kinds:?}");
    assert_eq!(count("rejected", "deny"), 1, "{kinds:?}");
    assert_eq!(count("expired", "deny"), 1, "{kinds:?}");
    let allow = events
        .iter()
        .find(|e| {
            e["kind"] == "decision" && e["verdict"] == "allow" && e["process"]["pid"] == allowed_pid
        })
        .expect("allow event of the first client");
    assert_eq!(allow["process"]["pid"], allowed_pid, "{allow}");
    assert_eq!(allow["agent"]["name"], "e2e-agent");
    assert_eq!(allow["rule"], "docs-ok");
    assert_eq!(allow["destination"]["port"], PORT);
    assert_eq!(allow["process"]["uid"], 0);
    assert_eq!(allow["process"]["cgroup"], cg.rel.as_str());
    let approved = events
        .iter()
        .find(|e| e["kind"] == "approved")
        .expect("approved event");
    assert_eq!(approved["approval"]["approver"], alice.name.as_str());
    assert!(
        approved["credential_id"]
            .as_str()
            .unwrap_or("")
            .starts_with("urn:uuid:"),
        "{approved}"
    );

    // Metrics-free check of the audit log: stop cleanly, then verify offline
    // with the daemon's public key.
    assert!(daemon.terminate().success());
    let audit = daemon.state_dir.path().join("audit.jsonl");
    let key = daemon.state_dir.path().join("signing-key.pub.pem");
    let v = Command::new(kya_bin())
        .args(["audit", "verify"])
        .arg(&audit)
        .arg("--key")
        .arg(&key)
        .output()
        .expect("kya audit verify");
    assert!(
        v.status.success(),
        "audit log must verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let log = std::fs::read_to_string(&audit).expect("audit log");
    let tool_calls = log
        .lines()
        .filter(|l| l.contains("\"method\":\"tools/call\""))
        .count();
    assert_eq!(
        tool_calls,
        events.len(),
        "every decision exactly once in the audit log"
    );
}

#[test]
fn suspending_an_agent_denies_its_next_call_and_ends_its_held_calls() {
    if !privileged("suspending_an_agent_denies_its_next_call_and_ends_its_held_calls") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("susp", POLICY);
    let (dir, cg, alice, mallory) = (&scene.dir, &scene.cg, &scene.owner, &scene.other);
    let server = server(dir.path());
    let daemon = Daemon::start(
        DaemonOptions::new(933)
            .args(scene.daemon_args())
            .args(["--port", &PORT.to_string()]),
    );
    let as_user = |u: &TestUser, args: &[&str]| scene.as_user(&daemon, u, args);

    // A held call, then the owner pulls the kill switch.
    let held = client(cg, &["transfer", r#"{"amount": 9000, "to": "bob"}"#]);
    wait_pending(&daemon);
    let no = as_user(mallory, &["agents", "suspend", "e2e-agent"]);
    assert!(!no.status.success(), "another user suspended alice's agent");
    let started = Instant::now();
    let out = as_user(alice, &["agents", "suspend", "e2e-agent"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = mcp_result(held);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the held call must end at once"
    );
    assert_eq!(r["isError"], true, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("suspended"),
        "{r}"
    );

    // The next call is denied, even one the policy allows. Every message of a
    // suspended agent is refused, so the client may already fail at
    // `initialize` (a JSON-RPC error) rather than get a tool result.
    let r = mcp_result(client(cg, &["search_docs", r#"{"query": "x"}"#]));
    assert!(r.to_string().contains("kya:agent-suspended"), "{r}");
    assert_ne!(r["isError"], false, "{r}");
    let list = kya_cli(&daemon, &["agents", "list", "--json"]);
    let agents: Value = serde_json::from_slice(&list.stdout).expect("agents JSON");
    assert_eq!(
        agents[0]["suspended"]["by"],
        alice.name.as_str(),
        "{agents}"
    );

    // Resumed: allowed again.
    let out = kya_cli(&daemon, &["agents", "resume", "e2e-agent"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = mcp_result(client(cg, &["search_docs", r#"{"query": "back"}"#]));
    assert_eq!(r["text"], "found 3 documents about back", "{r}");
    assert_eq!(
        server.ran(),
        vec!["search_docs"],
        "only the call after resume ran"
    );
}

/// A tmpfs of its own, unmounted at drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn new(dir: &Path, size: &str) -> Self {
        let mnt = dir.join("smallfs");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "kya-e2e",
                mnt.to_str().expect("utf-8"),
            ])
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(mnt)
    }

    /// Fill the filesystem completely.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).expect("filler");
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[test]
fn a_full_audit_disk_denies_consequential_calls_with_a_clear_reason() {
    if !privileged("a_full_audit_disk_denies_consequential_calls_with_a_clear_reason") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("full", POLICY);
    let small = SmallFs::new(scene.dir.path(), "256k");
    let audit = small.0.join("audit.jsonl");
    let _server = server(scene.dir.path());
    let daemon = Daemon::start(DaemonOptions::new(934).args(scene.daemon_args()).args([
        "--port",
        &PORT.to_string(),
        "--audit",
        audit.to_str().expect("utf-8"),
    ]));
    let cg = &scene.cg;
    // Room on disk: allowed as usual.
    let r = mcp_result(client(cg, &["search_docs", r#"{"query": "before"}"#]));
    assert_eq!(r["text"], "found 3 documents about before", "{r}");

    small.fill();
    // A hold must be on disk before anyone is asked: it cannot be, so it is denied.
    let r = mcp_result(client(
        cg,
        &["transfer", r#"{"amount": 5000, "to": "bob"}"#],
    ));
    assert_eq!(r["isError"], true, "{r}");
    let text = r["text"].as_str().unwrap_or("");
    assert!(
        text.contains("kya:audit-unavailable") && text.contains("audit log"),
        "{r}"
    );
    assert!(
        approvals_pending(&daemon).is_empty(),
        "nobody may be asked about an unrecorded hold"
    );
    // From then on every tool call is refused while the log cannot be written.
    let r = mcp_result(client(cg, &["search_docs", r#"{"query": "after"}"#]));
    assert!(r.to_string().contains("audit"), "{r}");
    assert_ne!(
        r["text"], "found 3 documents about after",
        "an unrecorded call went through: {r}"
    );
    // Loud in status, and the daemon is still alive (no panic).
    let status = kya_cli(&daemon, &["status", "--json"]);
    let s: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert!(s["audit"]["write_failures"].as_u64() >= Some(1), "{s}");
    assert_eq!(s["audit"]["state"]["state"], "failing", "{s}");
    assert!(
        s["audit"]["state"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("space"),
        "the reason must say the disk is full: {s}"
    );
}

/// Issue 5 (e): a standing credential issued by the owner (a non-root user,
/// over the control socket) releases a matching held call without asking; a
/// call outside its scope is still held; one issued while a call is held
/// releases it at once; a revoked credential releases nothing more.
#[test]
fn standing_credentials_from_the_owner_release_held_calls() {
    if !privileged("standing_credentials_from_the_owner_release_held_calls") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("cred", POLICY);
    let (dir, cg, alice, mallory) = (&scene.dir, &scene.cg, &scene.owner, &scene.other);
    // Long enough that issuing during a hold never races its timeout.
    std::fs::write(
        dir.path().join("policy.toml"),
        POLICY.replace("hold_timeout = \"4s\"", "hold_timeout = \"60s\""),
    )
    .expect("policy");
    let server = server(dir.path());
    let mut daemon = Daemon::start(
        DaemonOptions::new(935)
            .args(scene.daemon_args())
            .args(["--port", &PORT.to_string()]),
    );
    let as_user = |u: &TestUser, args: &[&str]| scene.as_user(&daemon, u, args);
    let issue = |u: &TestUser, extra: &[&str]| {
        let mut args = vec![
            "credential",
            "issue",
            "--agent",
            "e2e-agent",
            "--tool",
            "transfer",
        ];
        args.extend_from_slice(extra);
        as_user(u, &args)
    };

    // Another user may not issue for alice's agent.
    let no = issue(mallory, &["--max-arg", "amount=5000", "--valid-for", "10m"]);
    assert!(!no.status.success(), "mallory issued for alice's agent");
    assert!(
        String::from_utf8_lossy(&no.stderr).contains("not the owner"),
        "{}",
        String::from_utf8_lossy(&no.stderr)
    );

    // The owner issues "transfer up to 5000 for 10 minutes" ahead of time.
    let out = issue(alice, &["--max-arg", "amount=5000", "--valid-for", "10m"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("credential JSON");
    let standing_id = doc["id"].as_str().expect("credential id").to_string();
    assert_eq!(doc["evidence"][0]["approver"], alice.name.as_str(), "{doc}");
    assert_eq!(
        doc["credentialSubject"]["environment"]["cgroup"],
        cg.rel.as_str(),
        "{doc}"
    );

    // A matching call the policy would hold goes through without asking.
    let r = mcp_result(client(
        cg,
        &["transfer", r#"{"amount": 3000, "to": "bob"}"#],
    ));
    assert_eq!(r["text"], "transferred 3000 to bob", "{r}");
    assert!(approvals_pending(&daemon).is_empty());

    // Outside its scope (amount > 5000): still held.
    let held = client(cg, &["transfer", r#"{"amount": 9000, "to": "carol"}"#]);
    let a = wait_pending(&daemon);
    assert!(server.ran().iter().filter(|t| *t == "transfer").count() == 1);
    // A single-use credential wide enough, issued now, releases it at once.
    let out = issue(
        alice,
        &[
            "--max-arg",
            "amount=10000",
            "--valid-for",
            "5m",
            "--single-use",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("released 1 held call"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let single: Value = serde_json::from_slice(&out.stdout).expect("credential JSON");
    let r = mcp_result(held);
    assert_eq!(r["text"], "transferred 9000 to carol", "{r}");
    assert!(approvals_pending(&daemon).is_empty(), "{a}");

    // Spent: the same call again is held, and so is it after a revocation of
    // the standing one (the owner revokes it over the socket).
    let out = as_user(mallory, &["credential", "revoke", &standing_id]);
    assert!(!out.status.success(), "mallory revoked alice's credential");
    let out = as_user(alice, &["credential", "revoke", &standing_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for args in [
        r#"{"amount": 9000, "to": "carol"}"#,
        r#"{"amount": 3000, "to": "bob"}"#,
    ] {
        let held = client(cg, &["transfer", args]);
        let a = wait_pending(&daemon);
        let id = a["id"].as_str().expect("approval id");
        let out = as_user(alice, &["approvals", "deny", id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = mcp_result(held);
        assert_eq!(r["isError"], true, "{r}");
    }
    // The approver widens one approval: "this tool for 10 minutes". The held
    // call proceeds, and the next one to the same tool is not held at all.
    let held = client(cg, &["transfer", r#"{"amount": 7000, "to": "dave"}"#]);
    let a = wait_pending(&daemon);
    let id = a["id"].as_str().expect("approval id");
    let out = as_user(alice, &["approvals", "approve", id, "--for", "10m"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mcp_result(held)["text"], "transferred 7000 to dave");
    let r = mcp_result(client(
        cg,
        &["transfer", r#"{"amount": 8000, "to": "erin"}"#],
    ));
    assert_eq!(r["text"], "transferred 8000 to erin", "{r}");
    assert!(approvals_pending(&daemon).is_empty());
    assert_eq!(
        server.ran(),
        vec!["transfer", "transfer", "transfer", "transfer"],
        "tools that really ran"
    );

    // The record: each release names its credential; the log verifies.
    let ev = kya_cli(&daemon, &["events", "--json"]);
    let events: Vec<Value> = String::from_utf8_lossy(&ev.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &Value| e["mcp"]["method"] == "tools/call")
        .collect();
    let with_cred = |id: &str| {
        events
            .iter()
            .filter(|e| e["credential_id"] == id && e["verdict"] == "allow")
            .count()
    };
    assert_eq!(with_cred(&standing_id), 1, "{events:?}");
    assert_eq!(
        with_cred(single["id"].as_str().unwrap_or("?")),
        1,
        "{events:?}"
    );
    let released = events
        .iter()
        .find(|e| e["kind"] == "approved" && e["approval"]["channel"] == "credential")
        .expect("approved-by-credential event");
    assert_eq!(released["approval"]["approver"], alice.name.as_str());
    assert!(daemon.terminate().success());
    let v = Command::new(kya_bin())
        .args(["audit", "verify"])
        .arg(daemon.state_dir.path().join("audit.jsonl"))
        .arg("--key")
        .arg(daemon.state_dir.path().join("signing-key.pub.pem"))
        .output()
        .expect("kya audit verify");
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

/// One received webhook: headers (lowercased names) and body.
type Hook = (Vec<(String, String)>, Vec<u8>);

/// A webhook receiver on loopback: each request's headers (lowercased names)
/// and body, answered 200.
fn webhook_receiver() -> (u16, std::sync::mpsc::Receiver<Hook>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind receiver");
    let port = l.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut s) = stream else { return };
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut headers = Vec::new();
            let mut line = String::new();
            let _ = r.read_line(&mut line); // request line
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len.min(1 << 20)];
            let _ = r.read_exact(&mut body);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if tx.send((headers, body)).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

/// kya's public key from its PEM (SPKI: the Ed25519 key is the last 32 bytes).
fn kya_public_key(state_dir: &Path) -> ed25519_dalek::VerifyingKey {
    use base64::Engine;
    let pem = std::fs::read_to_string(state_dir.join("signing-key.pub.pem")).expect("public key");
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("PEM base64");
    let raw: [u8; 32] = der[der.len() - 32..].try_into().expect("32 bytes");
    ed25519_dalek::VerifyingKey::from_bytes(&raw).expect("Ed25519 key")
}

/// Issue 5: with `[approvals.webhook]`, a held call is announced to the URL in
/// a POST the receiver verifies with kya's public key (Standard Webhooks,
/// Ed25519); the owner then answers with `kya approvals`, and the call runs.
#[test]
fn a_held_call_is_announced_to_the_webhook_signed_by_kya() {
    if !privileged("a_held_call_is_announced_to_the_webhook_signed_by_kya") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("hook", POLICY);
    let (dir, cg, alice) = (&scene.dir, &scene.cg, &scene.owner);
    std::fs::write(
        dir.path().join("policy.toml"),
        POLICY.replace("hold_timeout = \"4s\"", "hold_timeout = \"60s\""),
    )
    .expect("policy");
    let (port, hooks) = webhook_receiver();
    let config = dir.path().join("kya.toml");
    std::fs::write(
        &config,
        format!("[approvals.webhook]\nurl = \"http://127.0.0.1:{port}/hooks/kya\"\n"),
    )
    .expect("config");
    let server = server(dir.path());
    let mut options = DaemonOptions::new(941)
        .args(scene.daemon_args())
        .args(["--port", &PORT.to_string()]);
    options.config = Some(config);
    let daemon = Daemon::start(options);

    let held = client(cg, &["transfer", r#"{"amount": 6000, "to": "carol"}"#]);
    let pending = wait_pending(&daemon);
    let (headers, body) = hooks
        .recv_timeout(Duration::from_secs(15))
        .expect("the webhook was called");
    let h = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    // The receiver's own check: "{id}.{timestamp}.{body}" signed by kya's key.
    let id = h("webhook-id");
    let ts = h("webhook-timestamp");
    let sig = h("webhook-signature");
    assert_eq!(id, pending["id"].as_str().unwrap_or("?"));
    let sig = {
        use base64::Engine;
        let b64 = sig.strip_prefix("v1a,").expect("asymmetric signature");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        ed25519_dalek::Signature::from_slice(&bytes).expect("signature")
    };
    let mut signed = format!("{id}.{ts}.").into_bytes();
    signed.extend_from_slice(&body);
    kya_public_key(daemon.state_dir.path())
        .verify_strict(&signed, &sig)
        .expect("the webhook verifies with kya's public key");
    let mut tampered = signed.clone();
    let last = tampered.len() - 2;
    tampered[last] ^= 1;
    assert!(kya_public_key(daemon.state_dir.path())
        .verify_strict(&tampered, &sig)
        .is_err());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!((now - ts.parse::<i64>().expect("timestamp")).abs() < 60);
    let v: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(v["type"], "approval.requested");
    assert_eq!(v["data"]["binding_message"], pending["binding_message"]);
    assert_eq!(v["data"]["owner"], alice.name.as_str());
    assert_eq!(v["data"]["tool"], "transfer");
    assert!(
        !String::from_utf8_lossy(&body).contains("carol"),
        "arguments are not sent, only their digest"
    );
    assert!(
        server.ran().is_empty(),
        "the webhook does not release the call"
    );

    // The answer comes from the owner, on the CLI.
    let out = scene.as_user(&daemon, alice, &["approvals", "approve", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mcp_result(held)["text"], "transferred 6000 to carol");
    assert_eq!(server.ran(), vec!["transfer"]);
    let status = kya_cli(&daemon, &["status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(status["webhook"]["sent"], 1, "{}", status["webhook"]);
}
