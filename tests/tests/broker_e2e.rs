//! Credential brokering end to end: the agent holds no key. A real MCP
//! server (the official Python SDK, with the SDK's own bearer authentication)
//! requires one; kya holds it (a root-only file, or an OAuth token it obtains
//! from a real authorization server, npm `oidc-provider`) and attaches it only
//! to calls it decided and allowed. Judged on the server's own record of what
//! ran and which tokens it accepted; the secret is searched for in everything
//! kya writes or shows.

use kya_e2e::oidc::Provider;
use kya_e2e::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const STATIC_LISTEN: u16 = 966;
const OAUTH_LISTEN: u16 = 967;
const STATIC_MCP: u16 = 18530;
const OTHER_MCP: u16 = 18531;
const CC_MCP: u16 = 18532;
const TE_MCP: u16 = 18533;
const OP_PORT: u16 = 18534;
const OP_CONTROL: u16 = 18535;

const SECRET: &str = "kya-e2e-brokered-secret-9f2c71d4e8";
const PLACEHOLDER: &str = "kya-placeholder-e2e-docs";
const BROKER_SECRET: &str = "kya-e2e-broker-client-secret-51aa";
const RS_SECRET: &str = "kya-e2e-rs-secret";

const POLICY: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"
hold_timeout = "20s"

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
id = "echo-ok"
tool = "echo_auth"
verdict = "allow"

[[rule]]
id = "transfer-held"
tool = "transfer"
verdict = "hold"
"#;

fn root_only(path: &Path, content: &str) {
    std::fs::write(path, content).expect("write secret");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("kya.toml");
    std::fs::write(&p, text).expect("config");
    p
}

/// The real client run by a process kya does not select: it goes direct.
fn direct_client(url: &str, args: &[&str]) -> Value {
    let out = Command::new(peers_python())
        .arg(peers().join("client.py"))
        .arg(url)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("direct client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or(Value::Null)
}

/// Every place kya writes or shows something: its log, every file in its
/// state directory (audit log, approvals, credentials), `kya events`,
/// `kya status`, `kya approvals list`, the metrics, and what the agent saw.
fn assert_nowhere(secret: &str, daemon: &Daemon, metrics: &str, agent_saw: &[String]) {
    let mut places: Vec<(String, String)> = vec![("daemon log".into(), daemon.log_text())];
    for entry in walk(daemon.state_dir.path()) {
        if let Ok(bytes) = std::fs::read(&entry) {
            places.push((
                entry.display().to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    for args in [
        &["events", "--json"][..],
        &["status", "--json"][..],
        &["approvals", "list", "--json"][..],
    ] {
        let out = kya_cli(daemon, args);
        places.push((
            format!("kya {}", args.join(" ")),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    places.push(("metrics".into(), http_get_text(metrics)));
    for (i, s) in agent_saw.iter().enumerate() {
        places.push((format!("agent output {i}"), s.clone()));
    }
    for (where_, text) in &places {
        assert!(!text.contains(secret), "the secret appears in {where_}");
    }
}

fn http_get_text(addr: &str) -> String {
    http_get(addr.parse().expect("metrics address"), "/metrics")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr").to_string()
}

fn output_text(child: std::process::Child) -> (Value, String) {
    let out = child.wait_with_output().expect("client output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or(Value::Null);
    (
        v,
        format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn an_agent_without_a_key_reaches_a_server_that_requires_one_only_through_decided_calls() {
    if !privileged(
        "an_agent_without_a_key_reaches_a_server_that_requires_one_only_through_decided_calls",
    ) {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("brk", POLICY);
    let dir = scene.dir.path();
    let token = dir.join("docs.token");
    root_only(&token, &format!("{SECRET}\n"));
    let server = McpServer::start_with(
        dir,
        STATIC_MCP,
        &[
            "--require-token",
            token.to_str().expect("utf-8"),
            "--echo-auth-tool",
        ],
        "peer.log",
    );
    let other = McpServer::start(dir, OTHER_MCP, "other.log");
    let config = write_config(
        dir,
        &format!(
            "[[broker]]\nserver = \"127.0.0.1\"\nport = {STATIC_MCP}\npaths = [\"/mcp\"]\n\
             plaintext = true\nplaceholder = \"{PLACEHOLDER}\"\ntoken_file = \"{}\"\n",
            token.display()
        ),
    );
    let metrics = free_addr();
    let mut opts = scene.daemon_options(STATIC_LISTEN, STATIC_MCP).args([
        "--port",
        &OTHER_MCP.to_string(),
        "--metrics",
        &metrics,
    ]);
    opts.config = Some(config);
    let daemon = Daemon::start(opts);
    let url = server.url();
    let mut agent_saw = Vec::new();
    // `kya status` names the brokered server and where its credential comes
    // from (never the value).
    let status = kya_status(&daemon);
    assert_eq!(
        status["broker"][0]["server"],
        format!("127.0.0.1:{STATIC_MCP}"),
        "{status}"
    );
    assert!(
        status["broker"][0]["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("file ")),
        "{status}"
    );

    // 1. Direct, without a key: the server refuses (its own authentication).
    let r = direct_client(&url, &["search_docs", r#"{"query":"direct"}"#]);
    assert!(r.get("error").is_some(), "direct without a key: {r}");
    assert!(server.ran().is_empty(), "{:?}", server.ran());

    // 2. The agent, holding no key, through kya: an allowed call runs.
    let (r, seen) = output_text(mcp_client(
        &scene.cg,
        &url,
        &["search_docs", r#"{"query":"kya"}"#],
    ));
    agent_saw.push(seen);
    assert_eq!(r["isError"], false, "{r}\n{}", daemon.log_text());
    assert_eq!(server.ran(), ["search_docs"]);

    // 3. A denied call never reaches the server, key or not.
    let (r, seen) = output_text(mcp_client(
        &scene.cg,
        &url,
        &["delete_records", r#"{"table":"users"}"#],
    ));
    agent_saw.push(seen);
    assert_eq!(r["isError"], true, "{r}");
    assert_eq!(server.ran(), ["search_docs"]);

    // 4. A held call gets the credential once approved, not before.
    let held = mcp_client(&scene.cg, &url, &["transfer", r#"{"amount":5,"to":"bob"}"#]);
    let pending = wait_new_approval(&daemon, &[]);
    assert_eq!(server.ran(), ["search_docs"], "nothing runs while held");
    let id = pending["id"].as_str().expect("approval id").to_string();
    let ok = scene.as_user(&daemon, &scene.owner, &["approvals", "approve", &id]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let (r, seen) = output_text(held);
    agent_saw.push(seen);
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(server.ran(), ["search_docs", "transfer"]);

    // 5. The agent configured with the placeholder, or with a key of its
    // own: what it sent is replaced, never forwarded.
    for auth in [
        format!("Authorization: Bearer {PLACEHOLDER}"),
        "Authorization: Bearer agents-own-key".to_string(),
    ] {
        let (r, seen) = output_text(mcp_client(
            &scene.cg,
            &url,
            &["search_docs", r#"{"query":"again"}"#, "--header", &auth],
        ));
        agent_saw.push(seen);
        assert_eq!(r["isError"], false, "{auth}: {r}");
    }
    assert_eq!(
        server.ran(),
        ["search_docs", "transfer", "search_docs", "search_docs"]
    );
    // 5b. A held call whose answer comes on a stream (the client asked for
    // progress), sent with the agent's own key: approved, it runs with kya's
    // credential; the agent's key is not what the server sees.
    let held = mcp_client(
        &scene.cg,
        &url,
        &[
            "transfer",
            r#"{"amount":6,"to":"carol"}"#,
            "--progress",
            "--header",
            "Authorization: Bearer agents-own-key",
        ],
    );
    let pending = wait_new_approval(&daemon, &[id.as_str()]);
    let streamed_id = pending["id"].as_str().expect("approval id").to_string();
    assert_eq!(server.ran().len(), 4, "nothing runs while held");
    let ok = scene.as_user(
        &daemon,
        &scene.owner,
        &["approvals", "approve", &streamed_id],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let (r, seen) = output_text(held);
    agent_saw.push(seen);
    assert_eq!(r["isError"], false, "{r}\n{}", daemon.log_text());
    assert_eq!(
        server.ran(),
        [
            "search_docs",
            "transfer",
            "search_docs",
            "search_docs",
            "transfer"
        ]
    );
    // Every token the server accepted was the brokered one (static).
    assert!(server.accepted_tokens().iter().all(|t| t["static"] == true));

    // 5c. A server that hands the credential back (a tool echoing the
    // request's headers): it ran, but its answer does not reach the agent.
    let (r, seen) = output_text(mcp_client(&scene.cg, &url, &["echo_auth", "{}"]));
    agent_saw.push(seen);
    assert!(r.get("error").is_some() || r["isError"] == true, "{r}");
    assert_eq!(server.ran().last().map(String::as_str), Some("echo_auth"));
    assert!(
        daemon
            .log_text()
            .contains("carries the credential kya holds"),
        "{}",
        daemon.log_text()
    );

    // 6. The placeholder sent to another server is refused, not resolved.
    let (r, seen) = output_text(mcp_client(
        &scene.cg,
        &other.url(),
        &[
            "search_docs",
            r#"{"query":"exfiltrate"}"#,
            "--header",
            &format!("Authorization: Bearer {PLACEHOLDER}"),
        ],
    ));
    agent_saw.push(seen);
    assert!(r.get("error").is_some() || r["isError"] == true, "{r}");
    assert!(other.ran().is_empty(), "{:?}", other.ran());

    // 7. The secret is nowhere kya writes or shows, nor in what the agent saw.
    assert_nowhere(SECRET, &daemon, &metrics, &agent_saw);
}

#[test]
fn oauth_tokens_kya_obtains_carry_the_agent_as_actor() {
    if !privileged("oauth_tokens_kya_obtains_carry_the_agent_as_actor") {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("brko", POLICY);
    let dir = scene.dir.path();
    let client_secret = dir.join("broker-client.secret");
    root_only(&client_secret, BROKER_SECRET);
    let op_url = format!("http://127.0.0.1:{OP_PORT}");
    let introspect = [
        "--introspect",
        &format!("{op_url}/token/introspection"),
        "--introspect-client",
        &format!("mcp-rs:{RS_SECRET}"),
        "--issuer",
        &op_url,
    ]
    .map(String::from);
    let introspect: Vec<&str> = introspect.iter().map(String::as_str).collect();
    let cc = McpServer::start_with(dir, CC_MCP, &introspect, "cc.log");
    let te = McpServer::start_with(dir, TE_MCP, &introspect, "te.log");
    let entry = |port: u16, grant: &str| {
        format!(
            "[[broker]]\nserver = \"127.0.0.1\"\nport = {port}\npaths = [\"/mcp\"]\nplaintext = true\n\
             [broker.oauth]\ntoken_url = \"{op_url}/token\"\nclient_id = \"kya-broker\"\n\
             client_secret_file = \"{}\"\ngrant = \"{grant}\"\nscope = \"mcp\"\n",
            client_secret.display()
        )
    };
    let config = write_config(
        dir,
        &format!(
            "{}{}",
            entry(CC_MCP, "client_credentials"),
            entry(TE_MCP, "token_exchange")
        ),
    );
    let metrics = free_addr();
    let mut opts = scene.daemon_options(OAUTH_LISTEN, CC_MCP).args([
        "--port",
        &TE_MCP.to_string(),
        "--metrics",
        &metrics,
    ]);
    opts.config = Some(config);
    let daemon = Daemon::start(opts);
    // The authorization server trusts kya's public key for token exchange.
    let op = Provider::start(
        dir,
        OP_PORT,
        OP_CONTROL,
        &[
            ("CLIENT_SECRET", "unused-ciba-secret".into()),
            ("BROKER_CLIENT_ID", "kya-broker".into()),
            ("BROKER_CLIENT_SECRET", BROKER_SECRET.into()),
            ("RS_CLIENT_ID", "mcp-rs".into()),
            ("RS_CLIENT_SECRET", RS_SECRET.into()),
            (
                "KYA_PUBLIC_KEY",
                daemon
                    .state_dir
                    .path()
                    .join("signing-key.pub.pem")
                    .display()
                    .to_string(),
            ),
        ],
    );
    let mut agent_saw = Vec::new();

    // Client credentials: two calls, one token (cached), kya's client.
    for q in ["one", "two"] {
        let (r, seen) = output_text(mcp_client(
            &scene.cg,
            &cc.url(),
            &["search_docs", &format!(r#"{{"query":"{q}"}}"#)],
        ));
        agent_saw.push(seen);
        assert_eq!(r["isError"], false, "{r}\n{}", daemon.log_text());
    }
    assert_eq!(cc.ran(), ["search_docs", "search_docs"]);
    let (status, issued) = op.control("GET", "/tokens");
    assert_eq!(status, 200);
    let cc_issued: Vec<&Value> = issued
        .as_array()
        .expect("tokens")
        .iter()
        .filter(|t| t["grant"] == "client_credentials")
        .collect();
    assert_eq!(cc_issued.len(), 1, "one token for both calls: {issued}");
    let accepted = cc.accepted_tokens();
    assert!(!accepted.is_empty());
    assert!(
        accepted.iter().all(|t| t["client_id"] == "kya-broker"),
        "{accepted:?}"
    );

    // Token exchange: the token names the owner as subject and the agent as actor.
    let (r, seen) = output_text(mcp_client(
        &scene.cg,
        &te.url(),
        &["search_docs", r#"{"query":"te"}"#],
    ));
    agent_saw.push(seen);
    assert_eq!(r["isError"], false, "{r}\n{}", daemon.log_text());
    assert_eq!(te.ran(), ["search_docs"]);
    let accepted_te = te.accepted_tokens();
    assert!(!accepted_te.is_empty());
    for t in &accepted_te {
        assert_eq!(t["sub"], scene.owner.name.as_str(), "{t}");
        assert_eq!(t["act"]["sub"], "e2e-agent", "{t}");
    }

    // A denied call gets no token and never runs.
    let (r, seen) = output_text(mcp_client(
        &scene.cg,
        &te.url(),
        &["delete_records", r#"{"table":"t"}"#],
    ));
    agent_saw.push(seen);
    assert_eq!(r["isError"], true, "{r}");
    assert_eq!(te.ran(), ["search_docs"]);

    // Neither the client secret nor any token kya obtained shows anywhere.
    assert_nowhere(BROKER_SECRET, &daemon, &metrics, &agent_saw);
    for t in accepted.iter().chain(&accepted_te) {
        let token = t["token"].as_str().expect("token recorded");
        assert_nowhere(token, &daemon, &metrics, &agent_saw);
    }
}
