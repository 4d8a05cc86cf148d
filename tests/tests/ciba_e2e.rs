//! Issue 5 end to end over OpenID CIBA: an unmodified MCP client (PyPI `mcp`)
//! in a selected cgroup makes a tool call the policy holds; the eBPF redirect
//! brings it through kya, which asks the agent's owner over CIBA at a real
//! OpenID Provider (npm `oidc-provider`, `tests/peers/oidc_provider.mjs`) on
//! loopback. The test plays the human through the provider's control API
//! (`provider.backchannelResult(...)`): approve, deny, say nothing, or let a
//! man-in-the-middle rewrite the ID token. Checked against the client's own
//! output, the MCP server's own record of what ran, the provider's own record
//! of the ID token it issued, and the audit log verified offline.
//!
//! Needs node and the test peers (`tests/peers/setup.sh`, run here); a
//! missing peer fails the test (never a silent skip).

use kya_e2e::oidc::Provider;
use kya_e2e::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Daemon listen ports of this file.
const POLL_LISTEN: u16 = 936;
const PING_LISTEN: u16 = 937;
/// MCP server ports.
const POLL_MCP: u16 = 18090;
const PING_MCP: u16 = 18091;
/// Provider (OP), its control API, and kya's ping endpoint.
const POLL_OP: u16 = 18320;
const POLL_CONTROL: u16 = 18321;
const PING_OP: u16 = 18322;
const PING_CONTROL: u16 = 18323;
const PING_NOTIFY: u16 = 18324;

const SECRET: &str = "kya-e2e-ciba-secret";

fn policy(hold_timeout: &str) -> String {
    format!(
        r#"
[defaults]
verdict = "deny"
methods = "allow"
hold_timeout = "{hold_timeout}"

[[rule]]
id = "big-transfer"
tool = "transfer"
when = "args.amount > 1000"
verdict = "hold"
"#
    )
}

/// Write the client secret (0600) and a kya config with `[approvals.ciba]`
/// (`extra`: more keys of that section); returns the config's path.
fn ciba_config(scene: &AgentScene, issuer: &str, mode: &str, extra: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let secret = scene.dir.path().join("ciba-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let config = scene.dir.path().join("kya.toml");
    std::fs::write(
        &config,
        format!(
            "[approvals.ciba]\nissuer = \"{issuer}\"\nclient_id = \"kya\"\n\
             client_secret_file = \"{}\"\nmode = \"{mode}\"\n{extra}",
            secret.display()
        ),
    )
    .expect("config");
    config
}

fn start_daemon(scene: &AgentScene, listen: u16, mcp_port: u16, config: PathBuf) -> Daemon {
    let mut opts = scene.daemon_options(listen, mcp_port);
    opts.config = Some(config);
    Daemon::start(opts)
}

/// An `approved` record of a CIBA answer: the owner, the digest of the ID
/// token the provider issued, and the minted credential.
fn assert_ciba_approval(ev: &Value, owner: &str, token_digest: &str) {
    assert_eq!(ev["approval"]["channel"], "ciba", "{ev}");
    assert_eq!(ev["approval"]["approver"], owner, "{ev}");
    assert_eq!(ev["approval"]["id_token_sha256"], token_digest, "{ev}");
    assert!(
        ev["credential_id"]
            .as_str()
            .unwrap_or("")
            .starts_with("urn:uuid:"),
        "{ev}"
    );
}

/// Wait until kya has read the provider's discovery document.
fn wait_discovered(daemon: &Daemon) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = kya_status(daemon);
        if s["ciba"]["discovered"] == true {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "kya never discovered the provider: {s}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn transfer(cg: &TestCgroup, server: &McpServer, amount: u32, to: &str) -> Child {
    let args = format!(r#"{{"amount": {amount}, "to": "{to}"}}"#);
    mcp_client(cg, &server.url(), &["transfer", &args])
}

fn transfers(server: &McpServer) -> usize {
    server.ran().iter().filter(|t| *t == "transfer").count()
}

fn text(r: &Value) -> &str {
    r["text"].as_str().unwrap_or("")
}

/// Stop the daemon cleanly, verify the audit log offline with its public key,
/// and return its records' events.
fn verified_audit(daemon: &mut Daemon) -> Vec<Value> {
    assert!(daemon.terminate().success());
    let audit = daemon.state_dir.path().join("audit.jsonl");
    let v = Command::new(kya_bin())
        .args(["audit", "verify"])
        .arg(&audit)
        .arg("--key")
        .arg(daemon.state_dir.path().join("signing-key.pub.pem"))
        .output()
        .expect("kya audit verify");
    assert!(
        v.status.success(),
        "audit log must verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    std::fs::read_to_string(&audit)
        .expect("audit log")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|r| r["event"].clone())
        .filter(|e| e["mcp"]["method"] == "tools/call")
        .collect()
}

fn approval_event<'a>(events: &'a [Value], kind: &str, approval_id: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["kind"] == kind && e["approval"]["id"] == approval_id)
        .unwrap_or_else(|| panic!("no {kind} event for {approval_id}: {events:#?}"))
}

/// Poll mode: approve, AccessDenied, a wrong-audience ID token, silence, and
/// the local channel answering first while CIBA also asks.
#[test]
fn ciba_poll_mode_governs_held_calls_of_a_real_mcp_client() {
    if !privileged("ciba_poll_mode_governs_held_calls_of_a_real_mcp_client") {
        return;
    }
    let _g = serial();
    let started = Instant::now();
    let scene = AgentScene::new("cibapoll", &policy("6s"));
    let (cg, owner) = (&scene.cg, &scene.owner.name);
    let server = McpServer::start(scene.dir.path(), POLL_MCP, "peer.log");
    let op = Provider::start(
        scene.dir.path(),
        POLL_OP,
        POLL_CONTROL,
        &[
            ("CLIENT_SECRET", SECRET.into()),
            ("ID_TOKEN_ALG", "ES256".into()),
        ],
    );
    let config = ciba_config(&scene, &op.issuer, "poll", "");
    let mut daemon = start_daemon(&scene, POLL_LISTEN, POLL_MCP, config);
    let s = wait_discovered(&daemon);
    assert_eq!(s["ciba"]["mode"], "poll", "{s}");
    assert_eq!(s["ciba"]["issuer"], op.issuer.as_str(), "{s}");

    // 1. Approved on the owner's device: the call proceeds with the server's
    // real result, and kya's record names the ID token the provider issued.
    let held = transfer(cg, &server, 5000, "bob");
    let a = wait_new_approval(&daemon, &[]);
    let approved_id = a["id"].as_str().expect("id").to_string();
    assert_eq!(a["owner"], owner.as_str(), "{a}");
    let binding = a["binding_message"].as_str().expect("binding message");
    assert!(binding.starts_with("KYA-"), "{a}");
    let req = op.wait_request(binding, &daemon);
    assert_eq!(req["login_hint"], owner.as_str(), "{req}");
    assert_eq!(req["done"], false, "{req}");
    assert_eq!(transfers(&server), 0, "a held call reached the server");
    op.answer(req["id"].as_str().expect("request id"), "approve");
    let r = mcp_result(held);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(text(&r), "transferred 5000 to bob", "{r}");
    assert_eq!(transfers(&server), 1);
    let issued = op.request(req["id"].as_str().expect("id"));
    let token_digest = issued["id_token_sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("the provider issued no ID token: {issued}"))
        .to_string();
    let events = tool_call_events(&daemon);
    let ev = approval_event(&events, "approved", &approved_id);
    assert_eq!(ev["verdict"], "allow", "{ev}");
    assert_ciba_approval(ev, owner, &token_digest);

    // 2. AccessDenied on the device: the client gets a denial, nothing ran.
    let held = transfer(cg, &server, 7000, "eve");
    let a = wait_new_approval(&daemon, &[]);
    let denied_id = a["id"].as_str().expect("id").to_string();
    let req = op.wait_request(a["binding_message"].as_str().expect("bm"), &daemon);
    op.answer(req["id"].as_str().expect("request id"), "deny");
    let r = mcp_result(held);
    assert_eq!(r["isError"], true, "{r}");
    // (oidc-provider 9 drops the AccessDenied description at its token
    // endpoint, so kya says where the refusal came from.)
    assert!(
        text(&r).contains(&format!("denied by {owner}")) && text(&r).contains("OpenID Provider"),
        "{r}"
    );
    assert_eq!(transfers(&server), 1, "a denied call ran");

    // 3. A man-in-the-middle re-addresses the ID token (wrong `aud`) of an
    // approval, while 4. another held call is never answered: neither is
    // approved, both end denied at the hold timeout.
    op.tamper("wrong_aud");
    let forged = transfer(cg, &server, 8000, "mallory");
    let a = wait_new_approval(&daemon, &[]);
    let forged_id = a["id"].as_str().expect("id").to_string();
    let req = op.wait_request(a["binding_message"].as_str().expect("bm"), &daemon);
    op.answer(req["id"].as_str().expect("request id"), "approve");
    let silent = transfer(cg, &server, 6000, "carol");
    let a = wait_new_approval(&daemon, &[&forged_id]);
    let silent_id = a["id"].as_str().expect("id").to_string();
    let silent_req = op.wait_request(a["binding_message"].as_str().expect("bm"), &daemon);
    for (what, child) in [("wrong aud", forged), ("silence", silent)] {
        let r = mcp_result(child);
        assert_eq!(r["isError"], true, "{what}: {r}");
        assert!(text(&r).contains("no approval within"), "{what}: {r}");
    }
    assert_eq!(transfers(&server), 1, "a call ran without a valid approval");
    op.tamper("none");
    assert_eq!(
        op.request(silent_req["id"].as_str().expect("id"))["done"],
        false,
        "nobody answered the silent one"
    );
    let s = kya_status(&daemon);
    assert_eq!(s["ciba"]["refused_id_tokens"], 1, "{s}");
    assert_eq!(s["ciba"]["approved"], 1, "{s}");
    assert_eq!(s["ciba"]["denied"], 1, "{s}");
    assert!(
        s["ciba"]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("ID token refused"),
        "{s}"
    );

    // 5. Both channels: the owner answers locally first; the later approval
    // at the provider changes nothing (kya stopped asking; the call ran once).
    let held = transfer(cg, &server, 9000, "dave");
    let a = wait_new_approval(&daemon, &[]);
    let local_id = a["id"].as_str().expect("id").to_string();
    let req = op.wait_request(a["binding_message"].as_str().expect("bm"), &daemon);
    let out = scene.as_user(&daemon, &scene.owner, &["approvals", "approve", &local_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = mcp_result(held);
    assert_eq!(text(&r), "transferred 9000 to dave", "{r}");
    let req_id = req["id"].as_str().expect("request id");
    op.answer(req_id, "approve");
    // Longer than the poll interval (1 s): a poll still running would fetch the token now.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(transfers(&server), 2, "tools that really ran");
    assert!(
        op.request(req_id)["id_token_sha256"].is_null(),
        "kya kept asking after the local answer: {}",
        op.request(req_id)
    );
    let s = kya_status(&daemon);
    assert_eq!(s["ciba"]["approved"], 1, "{s}");
    assert!(approvals_pending(&daemon).is_empty());
    let events = tool_call_events(&daemon);
    let ev = approval_event(&events, "approved", &local_id);
    assert_eq!(ev["approval"]["channel"], "local", "{ev}");
    assert_eq!(ev["approval"]["approver"], owner.as_str(), "{ev}");
    assert!(ev["approval"].get("id_token_sha256").is_none(), "{ev}");
    assert_eq!(
        events
            .iter()
            .filter(|e| e["kind"] == "approved" && e["approval"]["id"] == local_id.as_str())
            .count(),
        1,
        "one answer per hold: {events:#?}"
    );

    // The audit log verifies, and records each outcome with its channel; the
    // CIBA approval names the provider's ID token.
    let audit = verified_audit(&mut daemon);
    let ev = approval_event(&audit, "approved", &approved_id);
    assert_ciba_approval(ev, owner, &token_digest);
    let ev = approval_event(&audit, "rejected", &denied_id);
    assert_eq!(ev["approval"]["channel"], "ciba", "{ev}");
    assert_eq!(ev["approval"]["approver"], owner.as_str(), "{ev}");
    for id in [&forged_id, &silent_id] {
        let ev = approval_event(&audit, "expired", id);
        assert_eq!(ev["verdict"], "deny", "{ev}");
    }
    approval_event(&audit, "approved", &local_id);
    assert_eq!(
        audit.iter().filter(|e| e["kind"] == "approved").count(),
        2,
        "{audit:#?}"
    );
    eprintln!("poll scenario took {:?}", started.elapsed());
}

/// Ping mode: the provider notifies kya's HTTPS endpoint (its certificate
/// from kya's CA, which the provider trusts); approve and deny.
#[test]
fn ciba_ping_mode_governs_held_calls_of_a_real_mcp_client() {
    if !privileged("ciba_ping_mode_governs_held_calls_of_a_real_mcp_client") {
        return;
    }
    let _g = serial();
    let started = Instant::now();
    let scene = AgentScene::new("cibaping", &policy("30s"));
    let (cg, owner) = (&scene.cg, &scene.owner.name);
    let server = McpServer::start(scene.dir.path(), PING_MCP, "peer.log");
    let issuer = format!("http://127.0.0.1:{PING_OP}");
    let notify = format!("https://127.0.0.1:{PING_NOTIFY}/ciba/notify");
    let config = ciba_config(
        &scene,
        &issuer,
        "ping",
        &format!("ping_listen = \"127.0.0.1:{PING_NOTIFY}\"\nping_url = \"{notify}\"\n"),
    );
    // kya first: the provider must trust kya's CA, which the daemon creates.
    let mut daemon = start_daemon(&scene, PING_LISTEN, PING_MCP, config);
    let ca = daemon.state_dir.path().join("ca.pem");
    assert!(ca.exists(), "kya's CA certificate");
    let op = Provider::start(
        scene.dir.path(),
        PING_OP,
        PING_CONTROL,
        &[
            ("CLIENT_SECRET", SECRET.into()),
            ("DELIVERY_MODE", "ping".into()),
            ("PING_URL", notify.clone()),
            ("NODE_EXTRA_CA_CERTS", ca.display().to_string()),
            ("ID_TOKEN_ALG", "EdDSA".into()),
            // No poll hint: kya must not need one in ping mode.
            ("INTERVAL", "0".into()),
        ],
    );
    // Discovery failed at start (no provider yet) and is retried in the background.
    let s = wait_discovered(&daemon);
    assert_eq!(s["ciba"]["mode"], "ping", "{s}");
    assert_eq!(s["ciba"]["ping_url"], notify.as_str(), "{s}");

    // Approved: the provider pings kya, kya fetches and verifies the token.
    let held = transfer(cg, &server, 5000, "bob");
    let a = wait_new_approval(&daemon, &[]);
    let approved_id = a["id"].as_str().expect("id").to_string();
    let req = op.wait_request(a["binding_message"].as_str().expect("bm"), &daemon);
    assert_eq!(req["login_hint"], owner.as_str(), "{req}");
    assert_eq!(transfers(&server), 0, "a held call reached the server");
    op.answer(req["id"].as_str().expect("request id"), "approve");
    let r = mcp_result(held);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(text(&r), "transferred 5000 to bob", "{r}");
    let token_digest = op.request(req["id"].as_str().expect("id"))["id_token_sha256"]
        .as_str()
        .expect("the provider issued an ID token")
        .to_string();

    // Denied on the device: the ping carries the refusal too.
    let held = transfer(cg, &server, 7000, "eve");
    let a = wait_new_approval(&daemon, &[]);
    let denied_id = a["id"].as_str().expect("id").to_string();
    let req = op.wait_request(a["binding_message"].as_str().expect("bm"), &daemon);
    op.answer(req["id"].as_str().expect("request id"), "deny");
    let r = mcp_result(held);
    assert_eq!(r["isError"], true, "{r}");
    assert!(text(&r).contains(&format!("denied by {owner}")), "{r}");
    assert_eq!(transfers(&server), 1, "tools that really ran");

    let s = kya_status(&daemon);
    assert_eq!(s["ciba"]["approved"], 1, "{s}");
    assert_eq!(s["ciba"]["denied"], 1, "{s}");
    assert_eq!(s["ciba"]["refused_id_tokens"], 0, "{s}");
    let audit = verified_audit(&mut daemon);
    let ev = approval_event(&audit, "approved", &approved_id);
    assert_ciba_approval(ev, owner, &token_digest);
    let ev = approval_event(&audit, "rejected", &denied_id);
    assert_eq!(ev["approval"]["channel"], "ciba", "{ev}");
    eprintln!("ping scenario took {:?}", started.elapsed());
}
