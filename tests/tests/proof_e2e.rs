//! Proof of decision, end to end: the real Python MCP SDK server behind the
//! proof middleware (`server.py --require-kya-proof`, `verify_proof.py`)
//! verifies kya's `Kya-Decision` header offline with the public key the
//! daemon exports. Calls that came through kya (an allowed one, and a held
//! one the owner approved) run; the same calls sent directly by an
//! unselected process, with or without a forged header, are refused. Judged
//! on the server's own records: the tools it ran (KYA_PEER_LOG) and each
//! proof check it made.

use kya_e2e::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};

const PORT: u16 = 18500;
const LISTEN: u16 = 922;

const POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"
hold_timeout = "120s"

[[rule]]
id = "docs-ok"
tool = "search_docs"
verdict = "allow"

[[rule]]
id = "big-transfer"
tool = "transfer"
when = "args.amount > 1000"
verdict = "hold"
"#;

/// Not kya's: the base64url of a made-up receipt.
const FORGED: &str = "Kya-Decision: eyJpc3N1ZXIiOiJkaWQ6a2V5OnpNYWxsb3J5In0";

fn url() -> String {
    format!("http://127.0.0.1:{PORT}/mcp")
}

/// The real MCP client run directly: not selected, so never redirected.
fn direct(args: &[&str]) -> Child {
    Command::new(peers_python())
        .arg(peers().join("client.py"))
        .arg(url())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the direct MCP client")
}

/// Each proof check the server made, in order.
fn checks(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn refused_reasons(log: &Path) -> Vec<String> {
    checks(log)
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The accepted check whose receipt named a call of `tool`.
fn accepted_call_of(log: &Path, tool: &str) -> Value {
    checks(log)
        .into_iter()
        .find(|c| {
            c["ok"] == true
                && c["tools"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|x| x == tool))
        })
        .unwrap_or_else(|| panic!("no accepted receipt for {tool}: {:?}", checks(log)))
}

#[test]
fn the_server_runs_what_kya_decided_and_refuses_the_rest() {
    if !privileged("the_server_runs_what_kya_decided_and_refuses_the_rest") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("proof", POLICY);
    let (dir, cg, owner) = (&scene.dir, &scene.cg, &scene.owner);
    let config = dir.path().join("kya.toml");
    std::fs::write(&config, "[proof]\nservers = [\"127.0.0.1\"]\nttl = \"60s\"\n").expect("config");
    let mut opts = scene.daemon_options(LISTEN, PORT);
    opts.config = Some(config);
    let mut daemon = Daemon::start(opts);

    // The public key the daemon exports, as a file and in `kya status`.
    let key_file = daemon.state_dir.path().join("signing-key.pub.pem");
    let status = kya_status(&daemon);
    assert_eq!(status["proof"]["servers"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(status["proof"]["header"], "Kya-Decision");
    assert_eq!(status["proof"]["ttl_seconds"], 60);
    assert_eq!(
        status["proof"]["public_key_file"].as_str(),
        key_file.to_str(),
        "{status}"
    );
    let did = status["proof"]["public_key"]
        .as_str()
        .expect("did:key")
        .to_string();
    assert!(did.starts_with("did:key:z6Mk"), "{did}");
    let secrets = std::fs::read_to_string(&key_file).expect("public key file");
    assert!(!secrets.contains("PRIVATE"), "only the public key is exported");

    let proof_log = dir.path().join("proof.log");
    let server = McpServer::start_with(
        dir.path(),
        PORT,
        &[
            "--require-kya-proof",
            key_file.to_str().expect("utf-8"),
            "--proof-log",
            proof_log.to_str().expect("utf-8"),
        ],
        "peer.log",
    );

    // 1. Through kya, allowed by policy: the server verifies and runs it,
    //    even though the agent sent a forged header of its own (kya removed
    //    it: with two headers the server would refuse).
    let r = mcp_result(mcp_client(
        cg,
        &url(),
        &["search_docs", r#"{"query": "kya"}"#, "--header", FORGED],
    ));
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "found 3 documents about kya");
    assert_eq!(server.ran(), ["search_docs"], "the server's own record");
    assert!(
        refused_reasons(&proof_log).is_empty(),
        "nothing through kya was refused: {:?}",
        checks(&proof_log)
    );
    let docs = accepted_call_of(&proof_log, "search_docs");

    // 2. The same call sent directly, by a process kya does not select:
    //    without a header, and with a forged one. Refused; nothing runs.
    let d = mcp_result(direct(&["search_docs", r#"{"query": "kya"}"#]));
    assert!(d.get("error").is_some(), "a direct call got through: {d}");
    let d = mcp_result(direct(&[
        "search_docs",
        r#"{"query": "kya"}"#,
        "--header",
        FORGED,
    ]));
    assert!(d.get("error").is_some(), "a forged proof got through: {d}");
    assert_eq!(server.ran(), ["search_docs"], "the server's own record");
    let reasons = refused_reasons(&proof_log);
    assert!(
        reasons.iter().any(|r| r == "missing Kya-Decision header"),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r == "receipt not in canonical form"
            || r == "not signed by kya's key"
            || r == "no proof"),
        "{reasons:?}"
    );

    // 3. A held call, approved by its owner outside the selection: the
    //    server runs it, and its receipt carries the credential that
    //    released it.
    let held = mcp_client(cg, &url(), &["transfer", r#"{"amount": 9000, "to": "bob"}"#]);
    let approval = wait_new_approval(&daemon, &[]);
    assert_eq!(approval["tool"], "transfer", "{approval}");
    assert_eq!(server.ran(), ["search_docs"], "a held call reached the server");
    let id = approval["id"].as_str().expect("approval id").to_string();
    let ok = scene.as_user(&daemon, owner, &["approvals", "approve", &id]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let r = mcp_result(held);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "transferred 9000 to bob");
    assert_eq!(server.ran(), ["search_docs", "transfer"]);
    let transfer = accepted_call_of(&proof_log, "transfer");
    let creds = transfer["credentials"].as_array().cloned().unwrap_or_default();
    assert_eq!(creds.len(), 1, "{transfer}");
    assert!(
        creds[0].as_str().is_some_and(|c| c.starts_with("urn:uuid:")),
        "{transfer}"
    );

    // 4. The same transfer sent directly: refused, not run again.
    let d = mcp_result(direct(&["transfer", r#"{"amount": 9000, "to": "bob"}"#]));
    assert!(d.get("error").is_some(), "{d}");
    assert_eq!(server.ran(), ["search_docs", "transfer"]);

    // The decisions the server saw are kya's, on the record; the audit log
    // still verifies and names the credential that released the transfer.
    assert!(daemon.terminate().success());
    let audit = std::fs::read_to_string(daemon.state_dir.path().join("audit.jsonl"))
        .expect("audit log");
    for c in [&docs, &transfer] {
        for d in c["decisions"].as_array().expect("decisions") {
            let d = d.as_str().expect("decision id");
            assert!(audit.contains(d), "decision {d} is not in the audit log");
        }
    }
    assert!(audit.contains(creds[0].as_str().unwrap_or("?")));
    let v = Command::new(kya_bin())
        .args(["audit", "verify"])
        .arg(daemon.state_dir.path().join("audit.jsonl"))
        .arg("--key")
        .arg(&key_file)
        .output()
        .expect("kya audit verify");
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    drop(server);
}
