//! `kya credential issue|verify|revoke|list` end to end, through the real binary.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const KYA: &str = env!("CARGO_BIN_EXE_kya");

fn kya(args: &[&str]) -> Output {
    Command::new(KYA)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write_call(dir: &Path, name: &str, amount: i64, agent: &str, uid: u32) -> String {
    let call = serde_json::json!({
        "agent": agent,
        "process": {"pid": 42, "uid": uid, "exe": "/usr/bin/python3", "comm": "python3", "cgroup": "/agents/billing/w1"},
        "server": "mcp.example.com", "method": "tools/call", "tool": "transfer",
        "args": {"amount": amount, "to": "bob"},
        "host": "host-1",
        "time": "2030-01-01T00:00:00Z"
    });
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(&call).unwrap()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Issue a standing "transfer up to 500" credential; returns (file, id).
fn issue_bounded(state: &Path, extra: &[&str]) -> (String, String) {
    let out_file = state.join(format!("cred-{}.json", rand_suffix()));
    let mut args = vec![
        "credential",
        "issue",
        "--agent",
        "billing-bot",
        "--tool",
        "transfer",
        "--server",
        "mcp.example.com",
        "--max-arg",
        "amount=500",
        "--valid-for",
        "1h",
        "--uid",
        "1000",
        "--cgroup",
        "/agents/billing",
        "--host",
        "host-1",
        "--state-dir",
        s(state),
        "--out",
        s(&out_file),
    ];
    args.extend_from_slice(extra);
    let out = kya(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    (
        s(&out_file).to_owned(),
        doc["id"].as_str().unwrap().to_owned(),
    )
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `--now` inside the hour the credential is valid.
fn now_plus(minutes: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::minutes(minutes);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[test]
fn issue_then_verify_with_and_without_a_call() {
    let dir = tempfile::tempdir().unwrap();
    let (file, id) = issue_bounded(dir.path(), &[]);
    let doc: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(doc["proof"]["cryptosuite"], "eddsa-jcs-2022");
    assert_eq!(doc["evidence"][0]["channel"], "cli-issue");
    assert!(id.starts_with("urn:uuid:"));

    let out = kya(&["credential", "verify", &file, "--state-dir", s(dir.path())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = stdout_json(&out);
    assert_eq!(report["valid"], true);
    assert_eq!(report["id"], id.as_str());
    assert_eq!(report["scope"]["argBounds"][0]["max"], 500);

    let now = now_plus(1);
    let ok_call = write_call(dir.path(), "ok.json", 500, "billing-bot", 1000);
    let out = kya(&[
        "credential",
        "verify",
        &file,
        "--state-dir",
        s(dir.path()),
        "--call",
        &ok_call,
        "--now",
        &now,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    for (name, amount, agent, uid, reason) in [
        ("big.json", 501, "billing-bot", 1000, "out_of_scope"),
        ("agent.json", 5, "other-bot", 1000, "wrong_binding"),
        ("uid.json", 5, "billing-bot", 0, "wrong_binding"),
    ] {
        let call = write_call(dir.path(), name, amount, agent, uid);
        let out = kya(&[
            "credential",
            "verify",
            &file,
            "--state-dir",
            s(dir.path()),
            "--call",
            &call,
            "--now",
            &now,
        ]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let report = stdout_json(&out);
        assert_eq!(report["valid"], false);
        assert_eq!(report["reason"], reason, "{name}: {report}");
    }
}

#[test]
fn window_is_enforced_including_the_calls_own_time() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = issue_bounded(dir.path(), &[]);
    let out = kya(&[
        "credential",
        "verify",
        &file,
        "--state-dir",
        s(dir.path()),
        "--now",
        &now_plus(61),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["reason"], "expired");
    let out = kya(&[
        "credential",
        "verify",
        &file,
        "--state-dir",
        s(dir.path()),
        "--now",
        &now_plus(-5),
    ]);
    assert_eq!(stdout_json(&out)["reason"], "not_yet_valid");
    // Without --now, the call description's time (2030) is the clock.
    let call = write_call(dir.path(), "c.json", 5, "billing-bot", 1000);
    let out = kya(&[
        "credential",
        "verify",
        &file,
        "--state-dir",
        s(dir.path()),
        "--call",
        &call,
    ]);
    assert_eq!(stdout_json(&out)["reason"], "expired");
}

#[test]
fn revoke_takes_effect_and_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let (file, id) = issue_bounded(dir.path(), &[]);
    let out = kya(&["credential", "list", "--json", "--state-dir", s(dir.path())]);
    let list = stdout_json(&out);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());

    let out = kya(&["credential", "revoke", &id, "--state-dir", s(dir.path())]);
    assert!(out.status.success());
    let out = kya(&["credential", "verify", &file, "--state-dir", s(dir.path())]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["reason"], "revoked");
    let out = kya(&["credential", "list", "--json", "--state-dir", s(dir.path())]);
    assert_eq!(stdout_json(&out), serde_json::json!([]));
    // Revoking twice is fine; garbage ids are refused.
    assert!(
        kya(&["credential", "revoke", &id, "--state-dir", s(dir.path())])
            .status
            .success()
    );
    assert!(
        !kya(&["credential", "revoke", "a b", "--state-dir", s(dir.path())])
            .status
            .success()
    );
}

#[test]
fn another_key_or_a_tampered_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (file, _) = issue_bounded(dir.path(), &[]);
    // The other state dir's key is a different key.
    issue_bounded(other.path(), &[]);
    let out = kya(&[
        "credential",
        "verify",
        &file,
        "--state-dir",
        s(other.path()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["reason"], "untrusted_issuer");
    // --key forms: PEM file and did:key of the right key both work.
    let pem = dir.path().join("signing-key.pub.pem");
    let out = kya(&["credential", "verify", &file, "--key", s(&pem)]);
    assert!(out.status.success());
    let doc: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let out = kya(&[
        "credential",
        "verify",
        &file,
        "--key",
        doc["issuer"].as_str().unwrap(),
    ]);
    assert!(out.status.success());

    // A widened scope.
    let mut widened = doc.clone();
    widened["credentialSubject"]["scope"]["argBounds"][0]["max"] = 5_000_000.into();
    let wfile = dir.path().join("widened.json");
    std::fs::write(&wfile, serde_json::to_vec(&widened).unwrap()).unwrap();
    let out = kya(&[
        "credential",
        "verify",
        s(&wfile),
        "--state-dir",
        s(dir.path()),
    ]);
    assert_eq!(stdout_json(&out)["reason"], "bad_proof");
    // Garbage and duplicate keys.
    for (name, bytes) in [
        ("garbage.json", b"{not json".to_vec()),
        ("dup.json", br#"{"id":"a","id":"b"}"#.to_vec()),
        ("empty.json", Vec::new()),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let out = kya(&["credential", "verify", s(&p), "--state-dir", s(dir.path())]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert_eq!(stdout_json(&out)["reason"], "malformed", "{name}");
    }
}

#[test]
fn exact_digest_credentials_are_single_use_and_bound_to_the_arguments() {
    let dir = tempfile::tempdir().unwrap();
    // The digest of {"amount":5,"to":"bob"} in JCS form.
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(br#"{"amount":5,"to":"bob"}"#))
    };
    let out_file = dir.path().join("exact.json");
    let out = kya(&[
        "credential",
        "issue",
        "--agent",
        "billing-bot",
        "--tool",
        "transfer",
        "--args-digest",
        &digest,
        "--valid-for",
        "10m",
        "--host",
        "host-1",
        "--state-dir",
        s(dir.path()),
        "--out",
        s(&out_file),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(doc["credentialSubject"]["scope"]["singleUse"], true);
    let now = now_plus(1);
    let good = write_call(dir.path(), "good.json", 5, "billing-bot", 1000);
    let out = kya(&[
        "credential",
        "verify",
        s(&out_file),
        "--state-dir",
        s(dir.path()),
        "--call",
        &good,
        "--now",
        &now,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Used once (--consume spends it), a replay of the same call is refused,
    // also by a fresh process reading the persisted spent list.
    let out = kya(&[
        "credential",
        "verify",
        s(&out_file),
        "--state-dir",
        s(dir.path()),
        "--call",
        &good,
        "--now",
        &now,
        "--consume",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stdout_json(&out)["checked"]["consumed"], true);
    let out = kya(&[
        "credential",
        "verify",
        s(&out_file),
        "--state-dir",
        s(dir.path()),
        "--call",
        &good,
        "--now",
        &now,
        "--consume",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["reason"], "replayed");
    let out = kya(&[
        "credential",
        "verify",
        s(&out_file),
        "--state-dir",
        s(dir.path()),
        "--call",
        &good,
        "--now",
        &now,
    ]);
    assert_eq!(stdout_json(&out)["reason"], "replayed");
    let other = write_call(dir.path(), "other.json", 6, "billing-bot", 1000);
    let out = kya(&[
        "credential",
        "verify",
        s(&out_file),
        "--state-dir",
        s(dir.path()),
        "--call",
        &other,
        "--now",
        &now,
    ]);
    assert_eq!(stdout_json(&out)["reason"], "out_of_scope");
    // A standing (bounded, multi-use) credential is not spent by --consume.
    let (bounded, _) = issue_bounded(dir.path(), &[]);
    let call = write_call(dir.path(), "b.json", 5, "billing-bot", 1000);
    for _ in 0..2 {
        let out = kya(&[
            "credential",
            "verify",
            &bounded,
            "--state-dir",
            s(dir.path()),
            "--call",
            &call,
            "--now",
            &now,
            "--consume",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // --args-digest and --max-arg exclude each other.
    let out = kya(&[
        "credential",
        "issue",
        "--agent",
        "a",
        "--tool",
        "t",
        "--args-digest",
        &digest,
        "--max-arg",
        "amount=1",
        "--state-dir",
        s(dir.path()),
    ]);
    assert!(!out.status.success());
}

#[test]
fn bad_issue_arguments_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = [
        "credential",
        "issue",
        "--agent",
        "billing-bot",
        "--tool",
        "transfer",
        "--state-dir",
        s(dir.path()),
    ];
    for extra in [
        &["--valid-for", "0s"][..],
        &["--valid-for", "400days"],
        &["--valid-for", "soon"],
        &["--max-arg", "amount"],
        &["--max-arg", "amount=lots"],
        &["--args-digest", "xyz"],
        &["--exe", "/nonexistent/binary"],
        &["--cgroup", "relative/path"],
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = kya(&args);
        assert!(!out.status.success(), "{extra:?} accepted");
    }
    let out = kya(&["credential", "list", "--json", "--state-dir", s(dir.path())]);
    assert_eq!(stdout_json(&out), serde_json::json!([]));
}

#[test]
fn exe_binding_uses_the_executables_digest() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("agent-bin");
    std::fs::write(&exe, b"#!/bin/sh\necho agent\n").unwrap();
    let (file, _) = issue_bounded(dir.path(), &["--exe", s(&exe)]);
    let doc: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"#!/bin/sh\necho agent\n"))
    };
    assert_eq!(doc["credentialSubject"]["exeSha256"], digest.as_str());
    let now = now_plus(1);
    // A call description without the exe digest cannot satisfy the binding.
    let call = write_call(dir.path(), "c.json", 5, "billing-bot", 1000);
    let out = kya(&[
        "credential",
        "verify",
        &file,
        "--state-dir",
        s(dir.path()),
        "--call",
        &call,
        "--now",
        &now,
    ]);
    assert_eq!(stdout_json(&out)["reason"], "wrong_binding");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&call).unwrap()).unwrap();
    v["process"]["exe_sha256"] = digest.into();
    std::fs::write(&call, serde_json::to_vec(&v).unwrap()).unwrap();
    let out = kya(&[
        "credential",
        "verify",
        &file,
        "--state-dir",
        s(dir.path()),
        "--call",
        &call,
        "--now",
        &now,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn official_vector_is_refused_as_a_kya_credential_but_its_key_is_understood() {
    // The W3C vector is a valid eddsa-jcs-2022 document, but not a kya action
    // credential: verify must say so rather than accept it.
    let vectors = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/eddsa-jcs-2022/signedJCS.json"
    );
    let out = kya(&[
        "credential",
        "verify",
        vectors,
        "--key",
        "z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["reason"], "malformed");
}

#[test]
fn registry_supplies_the_binding_and_refuses_unregistered_agents() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("agent-bin");
    std::fs::write(&exe, b"agent binary").unwrap();
    let registry = dir.path().join("agents.toml");
    std::fs::write(
        &registry,
        format!(
            "[[agent]]\nname = \"billing-bot\"\nowner = \"someone-else\"\nmatch = {{ exe = {:?}, uid = 1001, cgroup = \"/agents/billing\" }}\n",
            s(&exe)
        ),
    )
    .unwrap();
    let out_file = dir.path().join("c.json");
    let base = [
        "credential",
        "issue",
        "--tool",
        "transfer",
        "--max-arg",
        "amount=10",
        "--agents",
        s(&registry),
        "--state-dir",
        s(dir.path()),
        "--out",
        s(&out_file),
    ];
    let mut args = base.to_vec();
    args.extend_from_slice(&["--agent", "ghost-bot"]);
    let out = kya(&args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not registered"));
    // A flag contradicting the registry is refused.
    let mut args = base.to_vec();
    args.extend_from_slice(&["--agent", "billing-bot", "--uid", "0"]);
    assert!(!kya(&args).status.success());

    let is_root = nix::unistd::Uid::current().is_root();
    let mut args = base.to_vec();
    args.extend_from_slice(&["--agent", "billing-bot"]);
    let out = kya(&args);
    if !is_root {
        // Not the owner and not root: refused.
        assert!(!out.status.success());
        return;
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    let subject = &doc["credentialSubject"];
    assert_eq!(subject["uid"], 1001);
    assert_eq!(subject["environment"]["cgroup"], "/agents/billing");
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"agent binary"))
    };
    assert_eq!(subject["exeSha256"], digest.as_str());
}

/// A `Kya-Decision` header value signed with the key in `state` for `body`.
fn receipt_header(state: &Path, body: &[u8]) -> String {
    use kya_agent::credential::receipt::{
        self, AgentBinding, ReceiptCall, ReceiptSubject, RequestBinding,
    };
    use sha2::{Digest, Sha256};
    let key = kya_agent::keys::load_or_create(state).unwrap();
    let subject = ReceiptSubject {
        host: "host-1".into(),
        server: "mcp.example.com".into(),
        request: RequestBinding {
            method: "POST".into(),
            path: "/mcp".into(),
            body_sha256: hex::encode(Sha256::digest(body)),
        },
        agent: AgentBinding {
            name: "billing-bot".into(),
            owner: Some("alice".into()),
            pid: 42,
            uid: 1000,
            exe: None,
            cgroup: None,
        },
        calls: vec![ReceiptCall {
            decision: "dec_00000000000000aa".into(),
            method: "tools/call".into(),
            tool: Some("transfer".into()),
            args_sha256: None,
            credential: None,
        }],
    };
    let secured = receipt::issue(
        &key,
        subject,
        time::OffsetDateTime::now_utc(),
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    kya_agent::credential::header::encode(&secured).unwrap()
}

#[test]
fn verify_reads_a_decision_receipt_and_checks_its_body() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let body = br#"{"id":1,"jsonrpc":"2.0","method":"tools/call","params":{"arguments":{"amount":5},"name":"transfer"}}"#;
    let value = receipt_header(state, body);
    let body_file = state.join("body.json");
    std::fs::write(&body_file, body).unwrap();

    // The value on the command line, with the body it was issued for.
    let out = kya(&[
        "credential",
        "verify",
        "--header",
        &value,
        "--body",
        s(&body_file),
        "--state-dir",
        s(state),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = stdout_json(&out);
    assert_eq!(r["valid"], true, "{r}");
    assert_eq!(r["kind"], "decision_receipt");
    assert_eq!(r["server"], "mcp.example.com");
    assert_eq!(r["calls"][0]["tool"], "transfer");
    assert_eq!(r["checked"]["body"], true);

    // A header line pasted into a file.
    let header_file = state.join("header.txt");
    std::fs::write(&header_file, format!("Kya-Decision: {value}\n")).unwrap();
    let out = kya(&[
        "credential",
        "verify",
        s(&header_file),
        "--state-dir",
        s(state),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_json(&out)["checked"]["body"], false);

    let invalid = |args: &[&str], reason: &str| {
        let mut all = vec!["credential", "verify"];
        all.extend_from_slice(args);
        let out = kya(&all);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = stdout_json(&out);
        assert_eq!(r["valid"], false, "{r}");
        assert_eq!(r["reason"], reason, "{r}");
    };
    // Another body.
    let other = state.join("other.json");
    std::fs::write(&other, &body[..body.len() - 1]).unwrap();
    invalid(
        &[
            "--header",
            &value,
            "--body",
            s(&other),
            "--state-dir",
            s(state),
        ],
        "body_mismatch",
    );
    // Expired.
    invalid(
        &[
            "--header",
            &value,
            "--now",
            "2999-01-01T00:00:00Z",
            "--state-dir",
            s(state),
        ],
        "expired",
    );
    // Another key.
    let vk = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
    let did = format!(
        "did:key:z{}",
        bs58::encode([&[0xed, 0x01][..], vk.as_bytes()].concat()).into_string()
    );
    invalid(&["--header", &value, "--key", &did], "untrusted_issuer");
    // Garbage.
    invalid(
        &["--header", "not a receipt", "--state-dir", s(state)],
        "malformed",
    );
    invalid(
        &["--header", &"A".repeat(70_000), "--state-dir", s(state)],
        "malformed",
    );
    // --body means nothing for a credential.
    let cred = state.join("cred.json");
    std::fs::write(&cred, "{}").unwrap();
    let out = kya(&[
        "credential",
        "verify",
        s(&cred),
        "--body",
        s(&other),
        "--state-dir",
        s(state),
    ]);
    assert!(!out.status.success());
}
