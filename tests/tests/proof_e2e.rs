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
/// The same server on the legacy SSE transport (`GET /sse`, `POST /messages/?session_id=…`).
const LEGACY_PORT: u16 = 18501;
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
    std::fs::write(
        &config,
        "[proof]\nservers = [\"127.0.0.1\"]\nttl = \"60s\"\n",
    )
    .expect("config");
    let mut opts = scene
        .daemon_options(LISTEN, PORT)
        .args(["--port", &LEGACY_PORT.to_string()]);
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
    assert!(
        !secrets.contains("PRIVATE"),
        "only the public key is exported"
    );

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
    let held = mcp_client(
        cg,
        &url(),
        &["transfer", r#"{"amount": 9000, "to": "bob"}"#],
    );
    let approval = wait_new_approval(&daemon, &[]);
    assert_eq!(approval["tool"], "transfer", "{approval}");
    assert_eq!(
        server.ran(),
        ["search_docs"],
        "a held call reached the server"
    );
    let id = approval["id"].as_str().expect("approval id").to_string();
    let ok = scene.as_user(&daemon, owner, &["approvals", "approve", &id]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let r = mcp_result(held);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["text"], "transferred 9000 to bob");
    assert_eq!(server.ran(), ["search_docs", "transfer"]);
    let transfer = accepted_call_of(&proof_log, "transfer");
    let creds = transfer["credentials"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(creds.len(), 1, "{transfer}");
    assert!(
        creds[0]
            .as_str()
            .is_some_and(|c| c.starts_with("urn:uuid:")),
        "{transfer}"
    );

    // 4. The same transfer sent directly: refused, not run again.
    let d = mcp_result(direct(&["transfer", r#"{"amount": 9000, "to": "bob"}"#]));
    assert!(d.get("error").is_some(), "{d}");
    assert_eq!(server.ran(), ["search_docs", "transfer"]);

    // 5. The legacy SSE transport: the stream and each POST (whose path
    //    carries the session in its query) are proven too.
    let legacy_log = dir.path().join("legacy-proof.log");
    let legacy = McpServer::start_with(
        dir.path(),
        LEGACY_PORT,
        &[
            "--transport",
            "sse",
            "--require-kya-proof",
            &did,
            "--proof-log",
            legacy_log.to_str().expect("utf-8"),
        ],
        "legacy.log",
    );
    let legacy_url = format!("http://127.0.0.1:{LEGACY_PORT}/sse");
    let r = mcp_result(mcp_client(
        cg,
        &legacy_url,
        &["search_docs", r#"{"query": "legacy"}"#, "--sse"],
    ));
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(legacy.ran(), ["search_docs"]);
    assert!(
        refused_reasons(&legacy_log).is_empty(),
        "{:?}",
        checks(&legacy_log)
    );
    assert!(checks(&legacy_log).iter().any(|c| c["method"] == "GET"));
    accepted_call_of(&legacy_log, "search_docs");
    let d = mcp_result(
        Command::new(peers_python())
            .arg(peers().join("client.py"))
            .arg(&legacy_url)
            .args(["search_docs", r#"{"query": "legacy"}"#, "--sse"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("direct legacy client"),
    );
    assert!(d.get("error").is_some(), "{d}");
    assert_eq!(legacy.ran(), ["search_docs"]);

    // The decisions the server saw are kya's, on the record; the audit log
    // still verifies and names the credential that released the transfer.
    assert!(daemon.terminate().success());
    let audit =
        std::fs::read_to_string(daemon.state_dir.path().join("audit.jsonl")).expect("audit log");
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
    drop(legacy);
    drop(server);
}

/// The Python verifier (`verify_proof.py`) and kya's own (`kya credential
/// verify`'s library) agree on receipts kya signs: valid ones (with strings
/// JCS escapes, and an embedded credential) pass both; tampered, expired,
/// misdirected, foreign-key and hostile values fail both.
#[test]
fn the_python_verifier_agrees_with_kyas() {
    use base64::Engine as _;
    use ed25519_dalek::SigningKey;
    use kya_agent::credential::action::{
        self, AgentSubject, Channel, Environment, Evidence, Scope,
    };
    use kya_agent::credential::header;
    use kya_agent::credential::receipt::{
        self, AgentBinding, ReceiptCall, ReceiptSubject, RequestBinding,
    };
    use serde_json::json;
    use std::io::Write;
    use std::time::Duration;
    use time::OffsetDateTime;

    ensure_peers();
    let key = SigningKey::from_bytes(&[21; 32]);
    let other = SigningKey::from_bytes(&[22; 32]);
    let now = OffsetDateTime::now_utc();
    let body = br#"{"id":1,"jsonrpc":"2.0","method":"tools/call","params":{"arguments":{"amount":9000,"to":"b\u00f6b"},"name":"transfer"}}"#;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let args = json!({"amount": 9000, "to": "b\u{f6}b"});
    let credential = {
        let subject = AgentSubject {
            agent: "bot \u{2603}".into(),
            exe_sha256: None,
            uid: Some(1000),
            environment: Environment {
                host: "host-a".into(),
                cgroup: Some("/agents/\u{1F600}".into()),
            },
            scope: Scope::exact("mcp.test", "transfer", &args).expect("scope"),
        };
        let evidence = Evidence::approval("alice", Channel::Local, now).expect("evidence");
        action::issue(
            &key,
            subject,
            now,
            now + Duration::from_secs(120),
            vec![evidence],
        )
        .expect("credential")
        .0
    };
    let subject = |with_credential: bool| ReceiptSubject {
        host: "host-a".into(),
        server: "mcp.test".into(),
        request: RequestBinding {
            method: "POST".into(),
            path: "/mcp?a=1&b=\"x\"".into(),
            body_sha256: {
                use sha2::Digest;
                format!("{:x}", sha2::Sha256::digest(body))
            },
        },
        agent: AgentBinding {
            name: "bot \u{2603}".into(),
            owner: Some("alice".into()),
            pid: 42,
            uid: 1000,
            exe: Some("/opt/agents/b\u{f6}t \\ \"quoted\" \u{7f}\n\t\u{1}\u{1f}/\u{1F600}".into()),
            cgroup: Some("/agents/\u{1F600}".into()),
        },
        calls: vec![ReceiptCall {
            decision: "dec_00000000000000aa".into(),
            method: "tools/call".into(),
            tool: Some("transfer".into()),
            args_sha256: Some(action::args_digest(&args).expect("digest")),
            credential: with_credential.then(|| credential.clone()),
        }],
    };
    let signed = |k: &SigningKey, at: OffsetDateTime, with_credential: bool| {
        header::encode(
            &receipt::issue(k, subject(with_credential), at, Duration::from_secs(60))
                .expect("receipt"),
        )
        .expect("encode")
    };
    let good = signed(&key, now, true);
    let not_canonical = {
        let bytes = b64.decode(&good).expect("b64");
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        b64.encode(serde_json::to_string_pretty(&v).expect("json"))
    };
    // (name, value, body, path, valid)
    let tampered: &[u8] = br#"{"id":1,"jsonrpc":"2.0","method":"tools/call","params":{"arguments":{"amount":90000,"to":"b\u00f6b"},"name":"transfer"}}"#;
    let cases: Vec<(&str, String, &[u8], &str, bool)> = vec![
        (
            "valid, with a credential",
            good.clone(),
            body,
            "/mcp?a=1&b=\"x\"",
            true,
        ),
        (
            "valid, without",
            signed(&key, now, false),
            body,
            "/mcp?a=1&b=\"x\"",
            true,
        ),
        (
            "tampered body",
            good.clone(),
            tampered,
            "/mcp?a=1&b=\"x\"",
            false,
        ),
        ("another path", good.clone(), body, "/admin", false),
        (
            "another key",
            signed(&other, now, false),
            body,
            "/mcp?a=1&b=\"x\"",
            false,
        ),
        (
            "expired",
            signed(&key, now - Duration::from_secs(120), false),
            body,
            "/mcp?a=1&b=\"x\"",
            false,
        ),
        (
            "not canonical",
            not_canonical,
            body,
            "/mcp?a=1&b=\"x\"",
            false,
        ),
        ("empty", String::new(), body, "/mcp", false),
        ("huge", "A".repeat(70_000), body, "/mcp", false),
        (
            "padded",
            format!("{good}=="),
            body,
            "/mcp?a=1&b=\"x\"",
            false,
        ),
        ("not base64url", "abc def/+".into(), body, "/mcp", false),
        (
            "deep",
            b64.encode("[".repeat(5000) + &"]".repeat(5000)),
            body,
            "/mcp",
            false,
        ),
        (
            "deep, under the parser's limit",
            b64.encode("[".repeat(900) + &"]".repeat(900)),
            body,
            "/mcp",
            false,
        ),
        (
            "proof not an object",
            b64.encode(r#"{"proof":[1]}"#),
            body,
            "/mcp",
            false,
        ),
        (
            "proof members of other types",
            b64.encode(r#"{"issuer":1,"proof":{"proofValue":5,"type":[]}}"#),
            body,
            "/mcp",
            false,
        ),
        (
            "duplicate members",
            b64.encode(r#"{"a":1,"a":2}"#),
            body,
            "/mcp",
            false,
        ),
        ("null", b64.encode("null"), body, "/mcp", false),
        (
            "a float",
            b64.encode(r#"{"proof":{},"x":1.5}"#),
            body,
            "/mcp",
            false,
        ),
        (
            "lone surrogate",
            b64.encode(r#"{"x":"\ud800"}"#),
            body,
            "/mcp",
            false,
        ),
    ];
    let input: Vec<serde_json::Value> = cases
        .iter()
        .map(|(_, value, body, path, _)| {
            json!({
                "value": value,
                "body": base64::engine::general_purpose::STANDARD.encode(body),
                "method": "POST",
                "path": path,
            })
        })
        .collect();
    let did = {
        // did:key of the trusted key, as the daemon's status shows it.
        let mut bytes = vec![0xed, 0x01];
        bytes.extend_from_slice(key.verifying_key().as_bytes());
        let mut n: Vec<u8> = bytes.clone();
        // base58btc
        let alphabet = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
        let mut out = Vec::new();
        while n.iter().any(|b| *b != 0) {
            let mut rem = 0u32;
            for b in n.iter_mut() {
                let acc = (rem << 8) | u32::from(*b);
                *b = (acc / 58) as u8;
                rem = acc % 58;
            }
            out.push(alphabet[rem as usize]);
        }
        out.extend(std::iter::repeat_n(
            b'1',
            bytes.iter().take_while(|b| **b == 0).count(),
        ));
        out.reverse();
        format!("did:key:z{}", String::from_utf8(out).expect("ascii"))
    };
    let mut child = Command::new(peers_python())
        .arg(peers().join("verify_proof.py"))
        .args(["check", &did])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python verifier");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(&input).expect("json").as_bytes())
        .expect("write cases");
    let out = child.wait_with_output().expect("python verifier output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).expect("results JSON");
    assert_eq!(results.len(), cases.len());
    for ((name, value, body, path, valid), py) in cases.iter().zip(&results) {
        let rust = header::verify(
            value,
            &key.verifying_key(),
            OffsetDateTime::now_utc(),
            Some(body),
        )
        .map(|v| v.receipt.subject.request.path == *path);
        let rust_ok = matches!(rust, Ok(true));
        assert_eq!(py["ok"], *valid, "python, {name}: {py}");
        assert_eq!(rust_ok, *valid, "kya, {name}: {rust:?}");
    }
}
