//! The daemon's own surface: who may connect to its control socket, the
//! modes of its keys and state directory, where its metrics listen, and that
//! secrets an agent sends (an `Authorization` header, a cookie, configured
//! argument paths) appear in none of its logs, events, audit records, sinks or
//! status output.

use kya_e2e::*;
use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

const LISTEN: u16 = 948;
const REFUSE_LISTEN: u16 = 949;
const GUARDED: u16 = 18472;
const METRICS: u16 = 18473;

const SECRET_AUTH: &str = "kya-surface-secret-authorization-7f3a";
const SECRET_COOKIE: &str = "kya-surface-secret-cookie-91bd";
const SECRET_TOKEN: &str = "kya-surface-secret-token-c2e8";
const SECRET_PASSWORD: &str = "kya-surface-secret-password-5d10";
const VISIBLE: &str = "kya-surface-visible-query";

/// A raw Streamable HTTP MCP client (standard library only) that sends an
/// `Authorization` header and a cookie with every request, and one
/// `tools/call` of `search_docs` with secret arguments beside the query. The
/// secrets come in its environment: kya records a process's command line.
const RAW_CLIENT: &str = r#"
import json, sys, urllib.request
import os
url = sys.argv[1]
auth, cookie = os.environ["SURFACE_AUTH"], os.environ["SURFACE_COOKIE"]
args = json.loads(os.environ["SURFACE_ARGS"])
session = None
def post(body):
    global session
    h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
         "Authorization": "Bearer " + auth, "Cookie": "sid=" + cookie}
    if session:
        h["Mcp-Session-Id"] = session
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=h, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        session = r.headers.get("Mcp-Session-Id") or session
        return r.read().decode()
post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "kya-surface", "version": "1"}}})
post({"jsonrpc": "2.0", "method": "notifications/initialized"})
print(post({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "search_docs", "arguments": args}}))
"#;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_control_socket_keys_and_metrics_are_closed_and_secrets_are_never_recorded() {
    if !privileged("the_control_socket_keys_and_metrics_are_closed_and_secrets_are_never_recorded")
    {
        return;
    }
    let _g = serial();
    let scene = AgentScene::new("srf", DOCS_POLICY);
    let outsider = TestUser::new("kya-e2e-srf-out");
    let server = McpServer::start_with(scene.dir.path(), GUARDED, &["--json"], "peer.log");
    let sink = scene.dir.path().join("events.jsonl");
    let config = scene.dir.path().join("kya.toml");
    std::fs::write(
        &config,
        format!(
            "[audit]\nargs = true\nredact = [\"/token\", \"password\"]\nsinks = [\"file:{}\"]\n",
            sink.display()
        ),
    )
    .expect("config");
    let mut opts = scene
        .daemon_options(LISTEN, GUARDED)
        .args(["--metrics", &format!("127.0.0.1:{METRICS}")]);
    opts.config = Some(config);
    let daemon = Daemon::start(opts);
    let state = daemon.state_dir.path();

    // Modes of the real files.
    let sock = state.join("kya.sock");
    assert_eq!(mode(state), 0o711, "state dir");
    assert_eq!(mode(&sock), 0o660, "control socket");
    let approvers_gid = nix::unistd::Group::from_name(&scene.approvers.name)
        .expect("group lookup")
        .expect("the approvers group")
        .gid
        .as_raw();
    assert_eq!(
        std::fs::metadata(&sock).expect("socket").gid(),
        approvers_gid
    );
    for key in ["ca-key.pem", "signing-key.pem"] {
        assert_eq!(mode(&state.join(key)), 0o600, "{key}");
    }
    let status = kya_status(&daemon);
    assert_eq!(status["control"]["mode"], "0660", "{}", status["control"]);
    assert_eq!(status["control"]["group"], scene.approvers.name.as_str());

    // A member of the approvers group connects; another local user cannot.
    let member = scene.as_user(&daemon, &scene.owner, &["approvals", "list", "--json"]);
    assert!(member.status.success(), "{}", text(&member));
    let mut c = outsider.command(&scene.kya_copy.path);
    c.args(["status", "--json", "--state-dir"]).arg(state);
    let out = c.output().expect("kya as an outsider");
    assert!(
        !out.status.success(),
        "an outsider connected: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("permission denied: only root and members"),
        "{}",
        text(&out)
    );

    // Metrics listen on loopback only, as configured.
    let metrics_listeners = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port_hex = format!(":{METRICS:04X} ");
    let local: Vec<&str> = metrics_listeners
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(port_hex.trim_end()))
        })
        .collect();
    assert!(!local.is_empty(), "metrics not listening");
    assert!(
        local.iter().all(|l| l
            .split_whitespace()
            .nth(1)
            .is_some_and(|a| a.starts_with("0100007F"))),
        "{local:?}"
    );

    // One allowed call carrying every kind of secret.
    let args = serde_json::json!({
        "query": VISIBLE,
        "token": SECRET_TOKEN,
        "auth": {"password": SECRET_PASSWORD},
    });
    let out = scene
        .cg
        .command("python3", &["-c", RAW_CLIENT, &server.url()])
        .env("SURFACE_AUTH", SECRET_AUTH)
        .env("SURFACE_COOKIE", SECRET_COOKIE)
        .env("SURFACE_ARGS", args.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("raw MCP client");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("found 3 documents about {VISIBLE}")),
        "{}",
        text(&out)
    );
    assert_eq!(server.ran(), vec!["search_docs".to_string()]);
    assert!(!daemon.wait_connections(1).is_empty(), "not intercepted");

    // Started by hand as root, and after serving a call: every thread of the
    // daemon has no capability but the six it keeps, in any set, bounding set
    // included, and no_new_privs, by the kernel's own account.
    let kept: u64 = (1 << 10) | (1 << 12) | (1 << 19) | (1 << 21) | (1 << 38) | (1 << 39);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", daemon.pid)).expect("daemon tasks");
    let mut threads = 0;
    for task in tasks.flatten() {
        let Ok(st) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        threads += 1;
        let field = |name: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim_start_matches(':').trim().to_string())
                .unwrap_or_else(|| panic!("{name} missing:\n{st}"))
        };
        for set in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
            let mask = u64::from_str_radix(&field(set), 16).expect("mask");
            assert_eq!(
                mask & !kept,
                0,
                "thread {:?} keeps {set} {mask:#x}",
                task.file_name()
            );
        }
        assert_eq!(field("NoNewPrivs"), "1", "thread {:?}", task.file_name());
    }
    assert!(threads > 2, "only {threads} threads seen");
    let privileges = &kya_status(&daemon)["privileges"];
    let bounding: Vec<&str> = privileges["bounding"]
        .as_array()
        .expect("bounding set")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        bounding,
        [
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_ADMIN",
            "CAP_SYS_PTRACE",
            "CAP_SYS_ADMIN",
            "CAP_PERFMON",
            "CAP_BPF"
        ],
        "{privileges}"
    );
    assert_eq!(privileges["uids"], serde_json::json!([0, 0, 0, 0]));
    assert_eq!(privileges["no_new_privs"], true);

    // Everything kya wrote or shows about it.
    let events = kya_cli(&daemon, &["events", "--json"]);
    assert!(events.status.success(), "{}", text(&events));
    let status_out = kya_cli(&daemon, &["status", "--json"]);
    let approvals = kya_cli(&daemon, &["approvals", "list", "--json"]);
    let audit = std::fs::read_to_string(state.join("audit.jsonl")).expect("audit log");
    let places: Vec<(&str, String)> = vec![
        ("daemon log", daemon.log_text()),
        ("event stream", text(&events)),
        ("audit log", audit.clone()),
        (
            "OCSF sink",
            std::fs::read_to_string(&sink).unwrap_or_default(),
        ),
        ("kya status", text(&status_out)),
        ("kya approvals list", text(&approvals)),
    ];
    for (place, content) in &places {
        for secret in [SECRET_AUTH, SECRET_COOKIE, SECRET_TOKEN, SECRET_PASSWORD] {
            assert!(
                !content.contains(secret),
                "{secret} appears in the {place}:\n{content}"
            );
        }
    }
    // The arguments were recorded (so the search above could fail), redacted.
    let call = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e.to_string().contains(VISIBLE))
        .unwrap_or_else(|| panic!("no audit record with the call's arguments:\n{audit}"));
    let text_of_call = call.to_string();
    assert!(text_of_call.contains("[redacted]"), "{text_of_call}");
    assert!(
        text_of_call.contains("\"/token\"") && text_of_call.contains("\"password\""),
        "the record names what was redacted: {text_of_call}"
    );
    let sink_text = std::fs::read_to_string(&sink).unwrap_or_default();
    assert!(
        sink_text.contains(VISIBLE),
        "the sink got the call: {sink_text}"
    );
    assert!(
        text(&events).contains(VISIBLE),
        "the event stream got the call: {}",
        text(&events)
    );
}

/// `kya run` with `args`, expected to refuse to start; returns its output.
fn refused_start(state_dir: &Path, extra: &[&str]) -> String {
    let pin_dir = format!("/sys/fs/bpf/kya-e2e-{}-{REFUSE_LISTEN}", std::process::id());
    let out = Command::new(kya_bin())
        .args(["run", "--config", "/dev/null", "--listen-port"])
        .arg(REFUSE_LISTEN.to_string())
        .args(["--pin-dir", &pin_dir, "--state-dir"])
        .arg(state_dir)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("kya run");
    let pinned = Path::new(&pin_dir).exists();
    let _ = std::fs::remove_dir_all(&pin_dir);
    assert!(!out.status.success(), "kya started:\n{}", text(&out));
    assert!(!pinned, "a refused start pinned something");
    text(&out)
}

#[test]
fn a_writable_or_foreign_state_dir_and_an_unknown_approvers_group_stop_the_start() {
    if !privileged("a_writable_or_foreign_state_dir_and_an_unknown_approvers_group_stop_the_start")
    {
        return;
    }
    let _g = serial();
    let root = tempfile::tempdir().expect("tempdir");
    for m in [0o777, 0o770, 0o1777] {
        let dir = root.path().join(format!("w{m:o}"));
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).expect("chmod");
        let err = refused_start(&dir, &[]);
        assert!(err.contains("group- or world-writable"), "{m:o}: {err}");
        assert_eq!(mode(&dir), m, "the mode was changed behind the user's back");
        assert!(!dir.join("kya.sock").exists());
    }
    let foreign = root.path().join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).expect("chown");
    let err = refused_start(&foreign, &[]);
    assert!(err.contains("not by the daemon's user"), "{err}");

    let fine = root.path().join("fine");
    let err = refused_start(&fine, &["--control-group", "kya-e2e-no-such-group"]);
    assert!(
        err.contains("kya-e2e-no-such-group") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!fine.join("kya.sock").exists(), "a socket was left behind");
}
