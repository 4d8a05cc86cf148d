//! Pinned tool definitions, end to end: the real MCP client (PyPI `mcp`) in
//! a selected cgroup lists the real MCP server's tools through kya's
//! redirect, and kya pins them. The server is restarted with one tool's
//! description rewritten; in the next session the client lists and calls
//! that tool: the call is held (`tool_drift = "hold"`), `kya approvals list`
//! shows the changed description, and the server's own record shows the
//! tool did not run. Denied, it never runs; after `kya tools accept` the next
//! call goes through without a hold. The pins survive a restart of kya. A
//! server announcing two tools with one name gets its `tools/list` answer
//! refused, on the record.

use kya_e2e::*;
use serde_json::Value;
use std::path::Path;
use std::process::Child;

const PORT: u16 = 18510;
const DUP_PORT: u16 = 18511;

const POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"
hold_timeout = "120s"
tool_drift = "hold"

[[rule]]
id = "docs"
tool = "search_docs"
verdict = "allow"
"#;

fn client(cg: &TestCgroup, port: u16, args: &[&str]) -> Child {
    mcp_client(cg, &format!("http://127.0.0.1:{port}/mcp"), args)
}

fn search(cg: &TestCgroup) -> Child {
    client(cg, PORT, &["search_docs", r#"{"query": "kya"}"#])
}

fn listed(cg: &TestCgroup, port: u16) -> Value {
    mcp_result(client(cg, port, &["--list"]))
}

fn variant(dir: &Path, n: u32) -> McpServer {
    McpServer::start_with(
        dir,
        PORT,
        &["--description-variant", &n.to_string()],
        "peer.log",
    )
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ran_searches(server: &McpServer) -> usize {
    server
        .ran()
        .iter()
        .filter(|t| t.as_str() == "search_docs")
        .count()
}

fn events(daemon: &Daemon) -> Vec<Value> {
    let ev = kya_cli(daemon, &["events", "--json"]);
    assert!(ev.status.success());
    stdout(&ev)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The held `search_docs` call: its approval shows the rewritten
/// description, and the server has not run it.
fn held_search(daemon: &Daemon, server: &McpServer, runs_before: usize, n: u32) -> String {
    let a = wait_new_approval(daemon, &[]);
    assert_eq!(a["tool"], "search_docs", "{a}");
    assert_eq!(a["rule"], "kya:tool-drift", "{a}");
    let change = &a["tool_change"];
    assert_eq!(change["state"], "changed", "{a}");
    assert_eq!(change["server"], format!("127.0.0.1:{PORT}"), "{a}");
    let fields = change["fields"].as_array().expect("fields");
    assert_eq!(fields.len(), 1, "only the description changed: {a}");
    assert_eq!(fields[0]["field"], "description");
    assert!(
        fields[0]["new"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("(variant {n})")),
        "{a}"
    );
    // The human-readable list shows the diff too.
    let text = stdout(&kya_cli(daemon, &["approvals", "list"]));
    assert!(text.contains("+ description: "), "{text}");
    assert!(text.contains(&format!("(variant {n})")), "{text}");
    assert_eq!(ran_searches(server), runs_before, "a held call ran");
    a["id"].as_str().expect("approval id").to_string()
}

#[test]
fn a_rewritten_tool_is_held_until_its_new_definition_is_accepted() {
    if !privileged("a_rewritten_tool_is_held_until_its_new_definition_is_accepted") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("pin", POLICY);
    let (dir, cg) = (&scene.dir, &scene.cg);
    let server = variant(dir.path(), 0);
    let mut daemon = Daemon::start(scene.daemon_options(925, PORT));

    // Session 1: listed (and pinned), called, ran.
    let l = listed(cg, PORT);
    assert!(
        l["tools"]
            .as_array()
            .is_some_and(|t| t.contains(&"search_docs".into())),
        "{l}"
    );
    let r = mcp_result(search(cg));
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(ran_searches(&server), 1);
    let tools = kya_cli(&daemon, &["tools", "list", "--json"]);
    let rows: Value = serde_json::from_slice(&tools.stdout).expect("tools list JSON");
    let row = rows
        .as_array()
        .and_then(|r| r.iter().find(|t| t["tool"] == "search_docs"))
        .cloned()
        .unwrap_or_else(|| panic!("search_docs not pinned: {rows}"));
    assert_eq!(row["state"], "unchanged", "{row}");
    assert_eq!(row["server"], format!("127.0.0.1:{PORT}"), "{row}");

    // The server comes back with the description rewritten.
    drop(server);
    let server = variant(dir.path(), 1);

    // Session 2: the client lists (kya notices) and calls: held.
    listed(cg, PORT);
    let held = search(cg);
    let id = held_search(&daemon, &server, 0, 1);
    // Denied: the tool never ran.
    let denied = scene.as_user(&daemon, &scene.owner, &["approvals", "deny", &id]);
    assert!(
        denied.status.success(),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let r = mcp_result(held);
    assert_eq!(r["isError"], true, "{r}");
    assert_eq!(ran_searches(&server), 0, "the server's own record");

    // The record of the hold carries the change.
    let ev = events(&daemon);
    let hold = ev
        .iter()
        .find(|e| e["kind"] == "hold" && e["mcp"]["tool"] == "search_docs")
        .unwrap_or_else(|| panic!("no hold on the record: {ev:?}"));
    assert_eq!(hold["rule"], "kya:tool-drift", "{hold}");
    assert_eq!(
        hold["mcp"]["tool_change"]["fields"][0]["field"], "description",
        "{hold}"
    );

    // `kya tools diff` shows it and exits 1; accept it.
    let diff = kya_cli(&daemon, &["tools", "diff", "--server", "127.0.0.1"]);
    assert_eq!(diff.status.code(), Some(1), "{}", stdout(&diff));
    assert!(stdout(&diff).contains("(variant 1)"), "{}", stdout(&diff));
    let accepted = kya_cli(
        &daemon,
        &[
            "tools",
            "accept",
            "--server",
            &format!("127.0.0.1:{PORT}"),
            "search_docs",
        ],
    );
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let diff = kya_cli(&daemon, &["tools", "diff"]);
    assert_eq!(diff.status.code(), Some(0), "{}", stdout(&diff));

    // The next call goes through without a hold.
    let r = mcp_result(search(cg));
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about kya");
    assert_eq!(ran_searches(&server), 1);
    assert!(approvals_pending(&daemon).is_empty());

    // The pins survive a restart of kya: a daemon started on the state the
    // first one left holds a call after another rewrite.
    let pins = std::fs::read(daemon.state_dir.path().join("tool-pins.json")).expect("pin file");
    daemon.terminate();
    // The records that carry the change verify like any other.
    let verify = std::process::Command::new(kya_bin())
        .args(["audit", "verify", "--closed"])
        .arg(daemon.state_dir.path().join("audit.jsonl"))
        .arg("--key")
        .arg(daemon.state_dir.path().join("signing-key.pub.pem"))
        .output()
        .expect("kya audit verify");
    assert!(
        verify.status.success(),
        "{}{}",
        stdout(&verify),
        String::from_utf8_lossy(&verify.stderr)
    );
    drop(server);
    let server = variant(dir.path(), 2);
    let mut opts = scene.daemon_options(927, PORT);
    opts.state_files.push(("tool-pins.json".into(), pins));
    let daemon = Daemon::start(opts);
    listed(cg, PORT);
    let held = search(cg);
    let id = held_search(&daemon, &server, 0, 2);
    // Approved this once: it runs, and the pin stays as it was.
    let ok = scene.as_user(&daemon, &scene.owner, &["approvals", "approve", &id]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let r = mcp_result(held);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(ran_searches(&server), 1);
    let diff = kya_cli(&daemon, &["tools", "diff", "--json"]);
    let changes: Value = serde_json::from_slice(&diff.stdout).expect("diff JSON");
    assert_eq!(changes[0]["tool"], "search_docs", "{changes}");
}

#[test]
fn a_tool_announced_twice_is_refused() {
    if !privileged("a_tool_announced_twice_is_refused") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("pindup", POLICY);
    let (dir, cg) = (&scene.dir, &scene.cg);
    let _server = McpServer::start_with(dir.path(), DUP_PORT, &["--duplicate-tool"], "dup.log");
    let daemon = Daemon::start(scene.daemon_options(926, DUP_PORT));

    let l = listed(cg, DUP_PORT);
    let err = l["error"].as_str().unwrap_or("");
    assert!(l.get("tools").is_none(), "the listing was delivered: {l}");
    assert!(
        err.contains("names the tool \"search_docs\" twice"),
        "the client must be told why: {l}"
    );
    // On the record.
    let ev = events(&daemon);
    assert!(
        ev.iter().any(|e| e["mcp"]["method"] == "kya/refused"
            && e["verdict"] == "deny"
            && e["reason"].as_str().unwrap_or("").contains("twice")),
        "{ev:?}"
    );
    // Nothing of it was pinned.
    let tools = kya_cli(&daemon, &["tools", "list", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&tools.stdout).expect("JSON"),
        serde_json::json!([])
    );
}
