//! `kya policy check|test` as users and CI run them: the real binary, the
//! shipped files in `policies/`, and hostile input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn kya() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kya"));
    c.current_dir(repo());
    c
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(args: &[&str]) -> Output {
    kya().args(args).output().expect("run kya")
}

fn run_stdin(args: &[&str], input: &str) -> Output {
    let mut child = kya()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kya");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every `.toml` file under `policies/`.
fn shipped_files() -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "toml") {
                out.push(p);
            }
        }
    }
    let mut v = Vec::new();
    walk(&repo().join("policies"), &mut v);
    v.sort();
    v
}

#[test]
fn every_shipped_file_passes_check() {
    let files = shipped_files();
    assert!(files.len() >= 10, "{files:?}");
    for f in &files {
        let o = run(&["policy", "check", f.to_str().unwrap()]);
        assert!(o.status.success(), "{}: {}", f.display(), stderr(&o));
        assert!(
            !stderr(&o).contains("warning"),
            "{}: {}",
            f.display(),
            stderr(&o)
        );
    }
    let o = run(&["policy", "check", "policies"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn shipped_policy_tests_pass() {
    let o = run(&["policy", "test", "policies/tests"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(!out.contains("FAIL"), "{out}");
    let summary = out.lines().last().unwrap_or_default();
    let passed: usize = summary.split_whitespace().next().unwrap().parse().unwrap();
    assert!(passed >= 40, "{summary}");
    assert!(summary.ends_with(", 0 failed"), "{summary}");
}

const DESIGN_CALL: &str = r#"{"agent": "billing-bot",
 "process": {"pid": 42, "uid": 1000, "exe": "/usr/bin/python3", "comm": "python3", "cgroup": "/agents/billing"},
 "server": "mcp.example.com", "method": "tools/call", "tool": "transfer",
 "args": {"amount": 5000, "to": "bob"}, "time": "2026-11-26T12:00:00Z"}"#;

fn decision(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("decision JSON")
}

#[test]
fn design_example_call_gives_documented_decision() {
    let dir = tempfile::tempdir().unwrap();
    let call = dir.path().join("call.json");
    std::fs::write(&call, DESIGN_CALL).unwrap();
    let d = decision(&run(&[
        "policy",
        "test",
        "policies/examples",
        "--call",
        call.to_str().unwrap(),
    ]));
    assert_eq!(d["verdict"], "hold");
    assert_eq!(d["rule"], "large-transfer");
    assert_eq!(d["matched"], serde_json::json!(["large-transfer"]));
    assert!(d["policy_version"].as_str().is_some_and(|v| v.len() == 16));
    assert!(d["reason"].as_str().is_some_and(|r| r.contains("1000")));
    assert!(d.get("explain").is_none());
    // Same from stdin, with --explain listing every rule and budget.
    let d = decision(&run_stdin(
        &[
            "policy",
            "test",
            "policies/examples",
            "--call",
            "-",
            "--explain",
        ],
        DESIGN_CALL,
    ));
    assert_eq!(d["verdict"], "hold");
    let explain = d["explain"].as_array().unwrap();
    assert!(explain
        .iter()
        .any(|e| e["id"] == "large-transfer" && e["matched"] == true));
    assert!(explain
        .iter()
        .any(|e| e["id"] == "small-transfer" && e["matched"] == false));
    assert!(explain
        .iter()
        .any(|e| e["id"] == "daily-spend" && e["kind"] == "budget"));
    // The embedded-default file gives its documented verdict too.
    let d = decision(&run_stdin(
        &["policy", "test", "policies/default.toml", "--call", "-"],
        DESIGN_CALL,
    ));
    assert_eq!(
        (d["verdict"].as_str(), d["rule"].as_str()),
        (Some("hold"), Some("large-payment"))
    );
}

#[test]
fn agent_resolution_from_process() {
    let call = r#"{"process": {"uid": 1001, "exe": "/usr/bin/python3", "cgroup": "/agents/billing"},
        "server": "pay.example.com", "tool": "transfer", "args": {"amount": 10}, "time": "2026-11-26T12:00:00Z"}"#;
    let d = decision(&run_stdin(
        &[
            "policy",
            "test",
            "policies/examples",
            "--agents",
            "policies/agents.toml",
            "--call",
            "-",
        ],
        call,
    ));
    assert_eq!(d["agent"], "billing-bot");
    assert_eq!(d["verdict"], "allow");
    assert_eq!(d["approvers"], serde_json::json!(["alice"]));
    let d = decision(&run_stdin(
        &["policy", "test", "policies/examples", "--call", "-"],
        call,
    ));
    assert_eq!(d["agent"], "unregistered");
    assert_eq!(
        (d["verdict"].as_str(), d["rule"].as_str()),
        (Some("deny"), Some("unregistered-denied"))
    );
    // The default decides: rule is null.
    let call = r#"{"agent": "billing-bot", "server": "x", "tool": "nothing_matches", "time": "2026-11-26T12:00:00Z"}"#;
    let d = decision(&run_stdin(
        &["policy", "test", "policies/examples", "--call", "-"],
        call,
    ));
    assert!(d["rule"].is_null());
    assert_eq!(d["verdict"], "deny");
}

#[test]
fn string_and_missing_amounts_fail_closed_via_cli() {
    for args in [r#"{"amount": "5000"}"#, "{}"] {
        let call = format!(
            r#"{{"agent": "billing-bot", "server": "pay.example.com", "tool": "transfer", "args": {args}, "time": "2026-11-26T12:00:00Z"}}"#
        );
        let d = decision(&run_stdin(
            &["policy", "test", "policies/examples", "--call", "-"],
            &call,
        ));
        assert_eq!(d["verdict"], "hold", "{args}");
        assert_eq!(d["rule"], "large-transfer", "{args}");
        assert!(!d["errors"].as_array().unwrap().is_empty(), "{args}");
    }
}

/// Each bad file: exit 1, stderr lines `file:line: message`, no panic.
#[test]
fn check_reports_file_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, usize, &str)] = &[
        ("unknown-key.toml", "[[rule]]\nid = \"a\"\nverdict = \"deny\"\ncolour = \"red\"\n", 4, "unknown field"),
        ("wrong-type.toml", "[[rule]]\nid = \"a\"\nverdict = [\"deny\"]\n", 3, "invalid type"),
        ("bad-glob.toml", "[[rule]]\nid = \"a\"\ntool = \"{a,b}\"\nverdict = \"deny\"\n", 3, "bad glob"),
        ("bad-cel.toml", "[[rule]]\nid = \"a\"\nwhen = \"args.x >>> 1\"\nverdict = \"deny\"\n", 3, "does not parse"),
        ("unknown-var.toml", "[[rule]]\nid = \"a\"\nwhen = \"request.x > 1\"\nverdict = \"deny\"\n", 3, "unknown variable"),
        ("unknown-fn.toml", "[[rule]]\nid = \"a\"\nwhen = \"lower(tool) == 'x'\"\nverdict = \"deny\"\n", 3, "unknown function"),
        ("dup-id.toml", "[[rule]]\nid = \"a\"\nverdict = \"deny\"\n[[rule]]\nid = \"a\"\nverdict = \"deny\"\n", 5, "duplicate id"),
        ("two-defaults.toml", "[defaults]\nverdict = \"deny\"\n\n[defaults]\n", 4, ""),
        ("mixed.toml", "[[rule]]\nid = \"a\"\nverdict = \"deny\"\n\n[[test]]\nname = \"t\"\n", 5, "mixes kinds"),
        ("empty.toml", "", 1, "empty policy file"),
        ("not-toml.toml", "this is = = not toml", 1, ""),
        ("bad-agents.toml", "[[agent]]\nname = \"a\"\nmatch = { uid = \"root\" }\n", 3, "invalid type"),
        ("bad-test.toml", "policy = [\"p.toml\"]\n[[test]]\nname = \"t\"\ncall = { tool = \"x\" }\nexpect = \"maybe\"\n", 5, "unknown verdict"),
    ];
    for (name, text, line, want) in cases {
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        let o = run(&["policy", "check", f.to_str().unwrap()]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        let prefix = format!("{}:{line}: ", f.display());
        assert!(err.starts_with(&prefix), "{name}: want {prefix}, got {err}");
        assert!(err.contains(want), "{name}: want {want:?}, got {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        for l in err.lines() {
            assert!(
                l.starts_with(&f.display().to_string()),
                "{name}: every line names the file: {l}"
            );
        }
    }
    // Two files in one check: across-file duplicate ids.
    let a = dir.path().join("set/a.toml");
    std::fs::create_dir_all(a.parent().unwrap()).unwrap();
    std::fs::write(&a, "[[rule]]\nid = \"same\"\nverdict = \"deny\"\n").unwrap();
    std::fs::write(
        dir.path().join("set/b.toml"),
        "[[rule]]\nid = \"same\"\nverdict = \"deny\"\n",
    )
    .unwrap();
    let o = run(&["policy", "check", dir.path().join("set").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("b.toml:2: duplicate id \"same\""),
        "{}",
        stderr(&o)
    );
    // Missing file.
    let o = run(&["policy", "check", "/nonexistent/policy.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("/nonexistent/policy.toml:1: "),
        "{}",
        stderr(&o)
    );
}

#[test]
fn check_warns_about_exe_only_agents_but_passes() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("agents.toml");
    std::fs::write(
        &f,
        "[[agent]]\nname = \"a\"\nowner = \"o\"\nmatch = { exe = \"/usr/bin/agent\" }\n",
    )
    .unwrap();
    let o = run(&["policy", "check", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "{}:1: warning: agent \"a\" is matched by exe alone",
            f.display()
        )),
        "{}",
        stderr(&o)
    );
}

#[test]
fn failing_policy_test_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.toml"),
        "[[rule]]\nid = \"r\"\ntool = \"t\"\nverdict = \"allow\"\n",
    )
    .unwrap();
    let t = dir.path().join("t.toml");
    std::fs::write(
        &t,
        "policy = [\"p.toml\"]\n[[test]]\nname = \"right\"\ncall = { tool = \"t\" }\nexpect = \"allow\"\nexpect_rule = \"r\"\n\n[[test]]\nname = \"wrong\"\ncall = { tool = \"t\" }\nexpect = \"deny\"\n",
    )
    .unwrap();
    let o = run(&["policy", "test", t.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("ok   ")
            && out.contains("FAIL ")
            && out.contains("t.toml:8 wrong: expected deny, got allow"),
        "{out}"
    );
    assert!(out.ends_with("1 passed, 1 failed\n"), "{out}");
    // A test file without its own policy uses the rule files on the command line.
    let t2 = dir.path().join("t2.toml");
    std::fs::write(
        &t2,
        "[[test]]\nname = \"x\"\ncall = { tool = \"t\" }\nexpect = \"allow\"\n",
    )
    .unwrap();
    let o = run(&[
        "policy",
        "test",
        dir.path().join("p.toml").to_str().unwrap(),
        t2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let o = run(&["policy", "test", t2.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "no policy at all");
}

#[test]
fn hostile_call_descriptions_are_errors_not_panics() {
    for input in [
        "",
        "null",
        "[]",
        "{\"tool\": \"t\", \"args\": ",
        "{\"tool\": \"t\", \"unknown\": 1}",
        "{\"tool\": \"t\", \"time\": \"tomorrow\"}",
        "{\"server\": \"s\"}",
        "{\"tool\": 5}",
        &format!(
            "{{\"tool\": \"t\", \"args\": {}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        ),
    ] {
        let o = run_stdin(
            &["policy", "test", "policies/default.toml", "--call", "-"],
            input,
        );
        assert_eq!(o.status.code(), Some(1), "{:.60}: {}", input, stderr(&o));
        assert!(
            !stderr(&o).contains("panicked"),
            "{:.60}: {}",
            input,
            stderr(&o)
        );
    }
    let o = run(&[
        "policy",
        "test",
        "policies/default.toml",
        "--call",
        "/nonexistent.json",
    ]);
    assert_eq!(o.status.code(), Some(1));
}
