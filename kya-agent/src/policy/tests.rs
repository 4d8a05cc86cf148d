//! Unit and property tests across the policy modules: loading (bad input),
//! precedence, fail-closed evaluation, budgets, orphaned agents, registry,
//! reload. Expected values are written from `policies/README.md`, by hand.

use super::budget::BudgetState;
use super::diag::Source;
use super::engine::{normalize_server, ORPHANED_RULE};
use super::*;
use kya_common::{ProcessIdentity, Verdict};
use proptest::prelude::*;
use serde_json::json;
use std::path::PathBuf;

fn policy(text: &str) -> Policy {
    match Policy::from_sources(&[Source::new("p.toml", text)]) {
        Ok(p) => p,
        Err(d) => panic!("policy does not load:\n{d}"),
    }
}

fn load_err(files: &[(&str, &str)]) -> String {
    let sources: Vec<Source> = files.iter().map(|(n, t)| Source::new(*n, *t)).collect();
    match Policy::from_sources(&sources) {
        Ok(_) => panic!("expected an error for {files:?}"),
        Err(d) => d.to_string(),
    }
}

fn call(tool: &str, args: serde_json::Value) -> CallContext {
    CallContext {
        agent: AgentInfo {
            name: "billing-bot".into(),
            owner: Some("alice".into()),
            orphaned: false,
        },
        process: ProcessIdentity {
            pid: 42,
            uid: 1001,
            ..Default::default()
        },
        server: "mcp.example.com".into(),
        destination: None,
        method: "tools/call".into(),
        tool: Some(tool.into()),
        args,
        time: time::macros::datetime!(2026-11-26 12:00 UTC),
        credential: None,
        tool_pin: Default::default(),
    }
}

const DESIGN: &str = r#"
[defaults]
verdict = "deny"
methods = "allow"
hold_timeout = "120s"
timezone = "UTC"

[[rule]]
id = "read-only-ok"
server = "mcp.example.com"
tool = "search_*"
verdict = "allow"

[[rule]]
id = "no-destructive-db"
tool = "delete_*"
verdict = "deny"
reason = "destructive database operations are not allowed from agents"

[[rule]]
id = "large-transfer"
tool = "transfer"
when = "args.amount > 1000"
verdict = "hold"

[[budget]]
id = "daily-spend"
agent = "billing-bot"
tool = "transfer"
sum = "args.amount"
max = 5000
per = "24h"
verdict = "hold"
"#;

#[test]
fn design_example_policy_gives_documented_verdicts() {
    let p = policy(DESIGN);
    let d = p.decide(&call("transfer", json!({"amount": 5000, "to": "bob"})));
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Hold, Some("large-transfer"))
    );
    assert_eq!(d.matched, vec!["large-transfer"]);
    assert_eq!(d.hold_timeout, std::time::Duration::from_secs(120));
    assert_eq!(d.approvers, vec!["alice"]);
    let d = p.decide(&call("transfer", json!({"amount": 10})));
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Deny, None),
        "no rule: default deny"
    );
    let d = p.decide(&call("search_docs", json!({})));
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Allow, Some("read-only-ok"))
    );
    let d = p.decide(&call("delete_table", json!({})));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(
        d.reason,
        "destructive database operations are not allowed from agents"
    );
    let mut c = call("x", json!({}));
    c.method = "tools/list".into();
    c.tool = None;
    assert_eq!(p.decide(&c).verdict, Verdict::Allow);
    // The JSON shape `kya policy test --json` documents.
    let v = serde_json::to_value(p.decide(&call("transfer", json!({"amount": 5000})))).unwrap();
    for k in ["verdict", "rule", "reason", "matched", "policy_version"] {
        assert!(v.get(k).is_some(), "{k}");
    }
    assert_eq!(v["verdict"], "hold");
    let v = serde_json::to_value(p.decide(&call("nothing", json!({})))).unwrap();
    assert!(v["rule"].is_null());
}

#[test]
fn string_amount_and_missing_key_fail_closed() {
    let p = policy(
        r#"
[[rule]]
id = "small"
tool = "transfer"
when = "args.amount <= 1000"
verdict = "allow"
[[rule]]
id = "large"
tool = "transfer"
when = "args.amount > 1000"
verdict = "hold"
[[rule]]
id = "huge"
tool = "transfer"
when = "args.amount > 100000"
verdict = "deny"
"#,
    );
    for args in [
        json!({"amount": "5000"}),
        json!({}),
        json!({"amount": null}),
        json!({"amount": [1]}),
    ] {
        let d = p.decide(&call("transfer", args.clone()));
        // Errors: the allow rule does not match, hold and deny do: deny wins.
        assert_eq!(d.verdict, Verdict::Deny, "{args}");
        assert_eq!(d.matched, vec!["huge", "large"], "{args}");
        assert_eq!(d.errors.len(), 3, "{args}: {:?}", d.errors);
    }
    let d = p.decide(&call("transfer", json!({"amount": 500})));
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Allow, Some("small"))
    );
    assert!(d.errors.is_empty());
}

#[test]
fn reported_rule_is_first_in_load_order_across_files() {
    let a = Source::new(
        "a.toml",
        "[[rule]]\nid = \"a1\"\ntool = \"*\"\nverdict = \"hold\"\n",
    );
    let b = Source::new("b.toml", "[[rule]]\nid = \"b1\"\ntool = \"t\"\nverdict = \"hold\"\n[[rule]]\nid = \"b2\"\ntool = \"t*\"\nverdict = \"allow\"\n");
    let p = Policy::from_sources(&[a, b]).unwrap();
    let d = p.decide(&call("t", json!({})));
    assert_eq!(d.rule.as_deref(), Some("a1"));
    assert_eq!(d.matched, vec!["a1", "b1", "b2"]);
}

#[test]
fn credential_releases_hold_but_never_deny() {
    let p = policy(DESIGN);
    let mut c = call("transfer", json!({"amount": 5000}));
    c.credential = Some(json!({"tool": "transfer"}));
    let d = p.decide(&c);
    assert_eq!(d.verdict, Verdict::Allow);
    assert!(d.released_by_credential);
    let mut c = call("delete_x", json!({}));
    c.credential = Some(json!({"tool": "delete_x"}));
    assert_eq!(p.decide(&c).verdict, Verdict::Deny);
}

#[test]
fn orphaned_agents_get_the_orphan_verdict() {
    let p = policy(DESIGN);
    let mut c = call("search_docs", json!({}));
    c.agent.orphaned = true;
    let d = p.decide(&c);
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Deny, Some(ORPHANED_RULE))
    );
    assert_eq!(d.matched, vec![ORPHANED_RULE, "read-only-ok"]);
    assert!(
        d.approvers.is_empty(),
        "an orphaned agent's owner does not approve"
    );
    let p = policy("[defaults]\norphaned = \"hold\"\n[[rule]]\nid = \"r\"\ntool = \"*\"\nwhen = \"agent.orphaned\"\nverdict = \"deny\"\n");
    let d = p.decide(&c);
    assert_eq!((d.verdict, d.rule.as_deref()), (Verdict::Deny, Some("r")));
    let p = policy("[defaults]\norphaned = \"allow\"\nverdict = \"allow\"\n");
    assert_eq!(p.decide(&c).verdict, Verdict::Allow);
}

#[test]
fn rule_fields_match_identity_method_server() {
    let p = policy(
        r#"
[[rule]]
id = "owner-rule"
owner = "ali*"
tool = "a"
verdict = "allow"
[[rule]]
id = "agent-rule"
agent = "unregistered"
tool = "b"
verdict = "allow"
[[rule]]
id = "server-only"
server = "*.internal"
verdict = "allow"
[[rule]]
id = "resources"
method = "resources/*"
verdict = "deny"
[[rule]]
id = "cel-identity"
tool = "c"
when = "process.uid == 1001 && server == 'mcp.example.com'"
verdict = "allow"
"#,
    );
    assert_eq!(
        p.decide(&call("a", json!({}))).rule.as_deref(),
        Some("owner-rule")
    );
    assert_eq!(p.decide(&call("b", json!({}))).verdict, Verdict::Deny);
    let mut c = call("b", json!({}));
    c.agent = AgentInfo::unregistered();
    assert_eq!(p.decide(&c).rule.as_deref(), Some("agent-rule"));
    let mut c = call("anything", json!({}));
    c.server = "DB.Internal:5432".into();
    assert_eq!(p.decide(&c).rule.as_deref(), Some("server-only"));
    let mut c = call("x", json!({}));
    c.method = "resources/read".into();
    c.tool = None;
    assert_eq!(p.decide(&c).rule.as_deref(), Some("resources"));
    assert_eq!(
        p.decide(&call("c", json!({}))).rule.as_deref(),
        Some("cel-identity")
    );
}

#[test]
fn server_normalisation() {
    assert_eq!(normalize_server("MCP.Example.com:8443"), "mcp.example.com");
    assert_eq!(normalize_server("mcp.example.com."), "mcp.example.com");
    assert_eq!(normalize_server("[::1]:443"), "::1");
    assert_eq!(normalize_server("::1"), "::1");
    assert_eq!(normalize_server(""), "");
}

#[test]
fn budgets_count_forwarded_calls_across_windows() {
    let p = policy(
        r#"
[defaults]
verdict = "allow"
[[budget]]
id = "calls"
agent = "billing-bot"
max_calls = 3
per = "1h"
verdict = "deny"
[[budget]]
id = "spend"
tool = "transfer"
sum = "args.amount"
max = 1000
per = "24h"
verdict = "hold"
group_by = "agent+tool"
"#,
    );
    let state = BudgetState::in_memory();
    let mut c = call("transfer", json!({"amount": 300}));
    for i in 0..3 {
        let d = p.decide_with(&c, Some(&state), false);
        assert_eq!(d.verdict, Verdict::Allow, "call {i}");
        p.record_forwarded(&c, &state);
    }
    // 4th call in the hour: both budgets exceeded (3 calls; 900 + 300 > 1000). Deny wins.
    let d = p.decide_with(&c, Some(&state), false);
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Deny, Some("calls"))
    );
    assert_eq!(d.matched, vec!["calls", "spend"]);
    // Denied calls are not recorded; an hour later the call budget has room, the 24h one not.
    c.time += time::Duration::minutes(61);
    let d = p.decide_with(&c, Some(&state), false);
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Hold, Some("spend"))
    );
    // A small amount still fits the daily window.
    c.args = json!({"amount": 100});
    assert_eq!(
        p.decide_with(&c, Some(&state), false).verdict,
        Verdict::Allow
    );
    // A day later everything has slid out.
    c.time += time::Duration::hours(24);
    c.args = json!({"amount": 1000});
    assert_eq!(
        p.decide_with(&c, Some(&state), false).verdict,
        Verdict::Allow
    );
    // Another agent has its own windows.
    let mut other = call("transfer", json!({"amount": 300}));
    other.agent.name = "other".into();
    assert_eq!(
        p.decide_with(&other, Some(&state), false).verdict,
        Verdict::Allow
    );
    // Unknown amount fails closed.
    let fresh = BudgetState::in_memory();
    let d = p.decide_with(
        &call("transfer", json!({"amount": "300"})),
        Some(&fresh),
        false,
    );
    assert_eq!(d.verdict, Verdict::Hold);
    assert!(d.errors.iter().any(|e| e.contains("spend")));
}

/// Allow everything, but at most 1000 transferred per day.
const SPEND_1000: &str = r#"
[defaults]
verdict = "allow"
[[budget]]
id = "spend"
tool = "transfer"
sum = "args.amount"
max = 1000
per = "24h"
verdict = "deny"
"#;

/// Concurrent calls cannot together overshoot a budget: the check and the
/// reservation are one step, a call not forwarded gives its amount back, and
/// plain `decide_with` (may_call, `kya policy test`) reserves nothing.
#[test]
fn concurrent_calls_cannot_overshoot_a_budget() {
    let p = policy(SPEND_1000);
    let state = BudgetState::in_memory();
    let c = call("transfer", json!({"amount": 300}));
    for _ in 0..5 {
        assert_eq!(
            p.decide_with(&c, Some(&state), false).verdict,
            Verdict::Allow
        );
    }
    assert_eq!(state.reservations(), 0);
    let barrier = std::sync::Barrier::new(16);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    p.decide_reserving(&c, &state)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let allowed: Vec<_> = results
        .iter()
        .filter(|(d, _)| d.verdict == Verdict::Allow)
        .collect();
    assert_eq!(allowed.len(), 3, "300 × 3 ≤ 1000 < 300 × 4");
    assert!(allowed.iter().all(|(_, r)| r.is_some()));
    assert!(results
        .iter()
        .filter(|(d, _)| d.verdict == Verdict::Deny)
        .all(|(d, r)| r.is_none() && d.rule.as_deref() == Some("spend")));
    // Two are forwarded, one is not (its batch was refused): 400 left.
    let ids: Vec<_> = allowed.iter().filter_map(|(_, r)| *r).collect();
    assert!(state.commit(ids[0]) && state.commit(ids[1]));
    state.release(ids[2]);
    // 600 recorded + 300 reserved: 100 more fits exactly, 1 more does not.
    let (d, r) = p.decide_reserving(&c, &state);
    assert!(d.verdict == Verdict::Allow && r.is_some());
    let (d, r) = p.decide_reserving(&call("transfer", json!({"amount": 100})), &state);
    assert!(d.verdict == Verdict::Allow && r.is_some());
    let (d, r) = p.decide_reserving(&call("transfer", json!({"amount": 1})), &state);
    assert_eq!((d.verdict, r), (Verdict::Deny, None));
    assert_eq!(state.reservations(), 2);
}

/// Decision times are taken before the budget lock, so a call can be checked
/// with a clock reading a moment earlier than a call already forwarded (its
/// events are stamped with its own decision time): it must still count it.
#[test]
fn a_call_checked_with_an_earlier_clock_sees_later_forwarded_calls() {
    let p = policy(SPEND_1000);
    let state = BudgetState::in_memory();
    let early = call("transfer", json!({"amount": 300}));
    let mut late = early.clone();
    late.time += time::Duration::milliseconds(5);
    for _ in 0..3 {
        let (d, r) = p.decide_reserving(&late, &state);
        assert_eq!(d.verdict, Verdict::Allow);
        assert!(state.commit(r.unwrap()));
    }
    let (d, r) = p.decide_reserving(&early, &state);
    assert_eq!((d.verdict, r), (Verdict::Deny, None), "{}", d.reason);
}

/// A negative amount cannot give budget back: it counts as 0, in the check
/// and in what is recorded.
#[test]
fn negative_amounts_do_not_refill_a_budget() {
    let p = policy(SPEND_1000);
    let state = BudgetState::in_memory();
    let big = call("transfer", json!({"amount": 900}));
    assert_eq!(
        p.decide_with(&big, Some(&state), false).verdict,
        Verdict::Allow
    );
    p.record_forwarded(&big, &state);
    let refund = call("transfer", json!({"amount": -1_000_000}));
    assert_eq!(
        p.decide_with(&refund, Some(&state), false).verdict,
        Verdict::Allow
    );
    p.record_forwarded(&refund, &state);
    let (d, r) = p.decide_reserving(&refund, &state);
    assert!(d.verdict == Verdict::Allow && r.is_some());
    assert!(state.commit(r.unwrap()));
    // Still 900 used: 200 more is over.
    let more = call("transfer", json!({"amount": 200}));
    let d = p.decide_with(&more, Some(&state), false);
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Deny, Some("spend"))
    );
}

#[test]
fn budget_state_survives_reload_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("p.toml");
    let text = "[defaults]\nverdict = \"allow\"\n[[budget]]\nid = \"calls\"\nmax_calls = 2\nper = \"1h\"\n";
    std::fs::write(&pol, text).unwrap();
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let c = call("t", json!({}));
    {
        let e = PolicyEngine::new(vec![pol.clone()], None, Some(&state_dir)).unwrap();
        e.record_forwarded(&c);
        // Reload with a different file that keeps the budget id.
        std::fs::write(&pol, format!("{text}# edited\n")).unwrap();
        e.reload().unwrap();
        e.record_forwarded(&c);
        assert_eq!(e.decide(&c).verdict, Verdict::Deny);
    }
    let e = PolicyEngine::new(vec![pol], None, Some(&state_dir)).unwrap();
    assert_eq!(
        e.decide(&c).verdict,
        Verdict::Deny,
        "state restored after restart"
    );
}

#[test]
fn reload_with_a_broken_file_keeps_the_old_policy() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("p.toml");
    std::fs::write(
        &pol,
        "[[rule]]\nid = \"r\"\ntool = \"t\"\nverdict = \"allow\"\n",
    )
    .unwrap();
    let e = PolicyEngine::new(vec![dir.path().to_path_buf()], None, None).unwrap();
    let v1 = e.policy().version.clone();
    assert_eq!(e.decide(&call("t", json!({}))).verdict, Verdict::Allow);
    std::fs::write(
        &pol,
        "[[rule]]\nid = \"r\"\ntool = \"t\"\nverdict = \"allwo\"\n",
    )
    .unwrap();
    let err = e.reload().unwrap_err().to_string();
    assert!(err.contains("p.toml:4:"), "{err}");
    assert_eq!(e.policy().version, v1);
    assert_eq!(e.decide(&call("t", json!({}))).verdict, Verdict::Allow);
    assert_eq!(e.reload_counts(), (0, 1));
    std::fs::write(
        &pol,
        "[[rule]]\nid = \"r\"\ntool = \"t\"\nverdict = \"deny\"\n",
    )
    .unwrap();
    let v2 = e.reload().unwrap();
    assert_ne!(v1, v2);
    assert_eq!(e.decide(&call("t", json!({}))).policy_version, v2);
    assert_eq!(e.decide(&call("t", json!({}))).verdict, Verdict::Deny);
    assert_eq!(e.reload_counts(), (1, 1));
}

#[tokio::test]
async fn watcher_reloads_on_file_change() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("p.toml");
    std::fs::write(
        &pol,
        "[[rule]]\nid = \"r\"\ntool = \"t\"\nverdict = \"allow\"\n",
    )
    .unwrap();
    let e = std::sync::Arc::new(PolicyEngine::new(vec![pol.clone()], None, None).unwrap());
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    let h = reload::spawn_watcher(
        e.clone(),
        std::time::Duration::from_millis(20),
        Box::new(move |_, r| {
            assert!(r.is_ok(), "{r:?}");
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }),
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    // A different size guarantees a different fingerprint even with coarse mtimes.
    std::fs::write(
        &pol,
        "[[rule]]\nid = \"r\"\ntool = \"t\"\nverdict = \"deny\"\n# changed\n",
    )
    .unwrap();
    let mut ok = false;
    for _ in 0..200 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if e.decide(&call("t", json!({}))).verdict == Verdict::Deny {
            ok = true;
            break;
        }
    }
    h.abort();
    assert!(ok, "watcher did not reload");
    assert!(
        seen.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the reload hook was not called"
    );
}

#[test]
fn embedded_default_compiles_and_is_not_deny_all() {
    let p = Policy::embedded_default();
    assert_ne!(p.version, "deny-all");
    assert!(!p.rules.is_empty());
    assert_eq!(
        p.decide(&call("get_weather", json!({}))).verdict,
        Verdict::Allow
    );
}

#[test]
fn bad_input_gives_file_line_errors() {
    let cases: &[(&str, &str, &str)] = &[
        ("[[rule]]\nid = \"a\"\ntool = \"t\"\nverdict = \"allow\"\nbogus = 1\n", "p.toml:5:", "unknown field"),
        ("[[rule]]\nid = \"a\"\ntool = 7\nverdict = \"allow\"\n", "p.toml:3:", "invalid type"),
        ("[[rule]]\nid = \"a\"\nverdict = \"permit\"\n", "p.toml:3:", "unknown verdict"),
        ("[[rule]]\nid = \"a\"\nverdict = \"allow\"\ntool = \"a[b]\"\n", "p.toml:4:", "bad glob"),
        ("[[rule]]\nid = \"a\"\nverdict = \"allow\"\ntool = \"\"\n", "p.toml:4:", "empty pattern"),
        ("[[rule]]\nid = \"a\"\nverdict = \"hold\"\nwhen = \"args.amount >\"\n", "p.toml:4:", "does not parse"),
        ("[[rule]]\nid = \"a\"\nverdict = \"hold\"\nwhen = \"amount > 1\"\n", "p.toml:4:", "unknown variable"),
        ("[[rule]]\nid = \"a\"\nverdict = \"hold\"\nwhen = \"now() > 1\"\n", "p.toml:4:", "unknown function now"),
        ("[[rule]]\nid = \"a\"\nverdict = \"deny\"\n\n[[rule]]\nid = \"a\"\nverdict = \"deny\"\n", "p.toml:6:", "duplicate id \"a\" (first defined at p.toml:2)"),
        ("[defaults]\nverdict = \"deny\"\n[defaults]\nverdict = \"allow\"\n", "p.toml:3:", "duplicate"),
        ("[[rule]]\nid = \"a\"\nverdict = \"deny\"\n[[agent]]\nname = \"x\"\n", "p.toml:4:", "mixes kinds"),
        ("", "p.toml:1:", "empty policy file"),
        ("# only a comment\n\n", "p.toml:1:", "empty policy file"),
        ("[[rule]]\nid = \"a\"\n", "p.toml:1:", "missing field `verdict`"),
        ("[[rule]\nid = \"a\"\n", "p.toml:1:", ""),
        ("rules = []\n", "p.toml:1:", "unknown top-level key \"rules\""),
        ("[defaults]\ntimezone = \"Europe/Paris\"\n", "p.toml:2:", "unsupported timezone"),
        ("[defaults]\nhold_timeout = \"soon\"\n", "p.toml:2:", "bad duration"),
        ("[defaults]\nhold_timeout = \"0s\"\n", "p.toml:2:", "positive"),
        ("[[budget]]\nid = \"b\"\nper = \"1h\"\n", "p.toml:1:", "needs max_calls"),
        ("[[budget]]\nid = \"b\"\nper = \"1h\"\nmax_calls = -1\n", "p.toml:4:", "negative"),
        ("[[budget]]\nid = \"b\"\nper = \"1h\"\nsum = \"args.x\"\n", "p.toml:1:", "needs max"),
        ("[[budget]]\nid = \"b\"\nper = \"1h\"\nmax_calls = 1\nverdict = \"allow\"\n", "p.toml:5:", "hold or deny"),
        ("[[budget]]\nid = \"b\"\nper = \"1h\"\nsum = \"args.x\"\nmax = \"lots\"\n", "p.toml:5:", "finite"),
        ("[[budget]]\nid = \"b\"\nper = \"1h\"\nmax_calls = 1\ngroup_by = \"tool\"\n", "p.toml:5:", "group_by"),
        ("[[rule]]\nid = \"kya:x\"\nverdict = \"deny\"\n", "p.toml:2:", "reserved"),
        ("[[rule]]\nid = \"a b\"\nverdict = \"deny\"\n", "p.toml:2:", "invalid id"),
        ("rule = \"x\"\n", "p.toml:1:", "invalid type"),
    ];
    for (text, at, want) in cases {
        let err = load_err(&[("p.toml", text)]);
        assert!(err.starts_with(at), "{text:?}: want {at}, got {err}");
        assert!(err.contains(want), "{text:?}: want {want:?}, got {err}");
    }
    // Across files: duplicate ids and two [defaults].
    let err = load_err(&[
        ("a.toml", "[defaults]\nverdict = \"deny\"\n"),
        ("b.toml", "\n[defaults]\nverdict = \"allow\"\n"),
    ]);
    assert!(
        err.starts_with("b.toml:2:") && err.contains("a.toml:1"),
        "{err}"
    );
    let err = load_err(&[
        ("a.toml", "[[rule]]\nid = \"x\"\nverdict = \"deny\"\n"),
        (
            "b.toml",
            "[[budget]]\nid = \"x\"\nmax_calls = 1\nper = \"1h\"\n",
        ),
    ]);
    assert!(
        err.starts_with("b.toml:2:") && err.contains("duplicate id"),
        "{err}"
    );
    // Several independent errors are all reported.
    let err = load_err(&[("p.toml", "[[rule]]\nid = \"a\"\nverdict = \"nope\"\n[[rule]]\nid = \"b\"\ntool = \"[\"\nverdict = \"deny\"\n")]);
    assert_eq!(err.lines().count(), 2, "{err}");
}

#[test]
fn load_from_paths_and_kinds() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        "[[rule]]\nid = \"b\"\ntool = \"t\"\nverdict = \"hold\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("a.toml"),
        "[[rule]]\nid = \"a\"\ntool = \"t\"\nverdict = \"hold\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("agents.toml"),
        "[[agent]]\nname = \"x\"\nowner = \"o\"\nmatch = { uid = 1 }\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not toml").unwrap();
    let p = Policy::load(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(
        p.decide(&call("t", json!({}))).rule.as_deref(),
        Some("a"),
        "lexical order"
    );
    let err = Policy::load(&[dir.path().join("agents.toml")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("agent registry, not a rule file"), "{err}");
    let err = Policy::load(&[PathBuf::from("/nonexistent/kya.toml")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no such file"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    assert!(Policy::load(&[empty.path().to_path_buf()]).is_err());
    std::fs::write(dir.path().join("c.toml"), [0xffu8, 0xfe, 0x00]).unwrap();
    let err = Policy::load(&[dir.path().to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("not UTF-8"), "{err}");
}

#[test]
fn version_is_a_content_hash() {
    let a = policy(DESIGN);
    let b = policy(DESIGN);
    assert_eq!(a.version, b.version);
    let c = policy(&format!("{DESIGN}\n# comment\n"));
    assert_ne!(a.version, c.version);
}

// ---- registry ----

fn registry(text: &str) -> (Registry, Diagnostics) {
    match Registry::from_source(&Source::new("agents.toml", text)) {
        Ok(r) => r,
        Err(d) => panic!("registry does not load:\n{d}"),
    }
}

#[test]
fn registry_resolves_and_orphans() {
    let (r, warnings) = registry(
        r#"
departed_owners = ["mallory"]
[[agent]]
name = "billing-bot"
owner = "alice"
created = "2026-11-01"
expires = 2027-05-01
match = { exe = "/usr/bin/python3*", uid = 1001, cgroup = "/agents/billing" }
[[agent]]
name = "unit-bot"
owner = "mallory"
match = { unit = "bot.service" }
[[agent]]
name = "ownerless"
match = { uid = 7 }
"#,
    );
    assert!(warnings.0.is_empty());
    let now = time::macros::datetime!(2026-11-26 12:00 UTC);
    let mut p = ProcessIdentity {
        pid: 0,
        uid: 1001,
        gid: 0,
        exe: "/usr/bin/python3.11".into(),
        comm: "python3".into(),
        cgroup: "/agents/billing/w1".into(),
        ..Default::default()
    };
    let a = r.resolve(&p, now);
    assert_eq!(
        (a.name.as_str(), a.owner.as_deref(), a.orphaned),
        ("billing-bot", Some("alice"), false)
    );
    assert!(
        r.resolve(&p, time::macros::datetime!(2027-05-01 00:00 UTC))
            .orphaned,
        "expired"
    );
    assert!(
        r.resolve(&p, time::macros::datetime!(2026-10-01 00:00 UTC))
            .orphaned,
        "not yet created"
    );
    p.cgroup = "/agents/billing2".into();
    assert_eq!(
        r.resolve(&p, now).name,
        "unregistered",
        "cgroup prefix is by path segment"
    );
    p.cgroup = "/agents/billing".into();
    p.uid = 1000;
    assert_eq!(
        r.resolve(&p, now).name,
        "unregistered",
        "all selectors must hold"
    );
    let u = ProcessIdentity {
        cgroup: "/system.slice/bot.service".into(),
        ..Default::default()
    };
    let a = r.resolve(&u, now);
    assert_eq!(a.name, "unit-bot");
    assert!(a.orphaned, "owner departed");
    let o = r.resolve(
        &ProcessIdentity {
            uid: 7,
            ..Default::default()
        },
        now,
    );
    assert!(o.orphaned && o.owner.is_none());
    assert_eq!(
        r.by_name("billing-bot", now).map(|a| a.orphaned),
        Some(false)
    );
    let s = r.selectors();
    assert_eq!(s.uids, vec![1001, 7]);
    assert_eq!(s.cgroups, vec!["/agents/billing"]);
    assert_eq!(s.exes, vec!["/usr/bin/python3*"]);
    assert_eq!(s.units, vec!["bot.service"]);
}

#[test]
fn registry_exe_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("agent");
    std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
    let h = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"#!/bin/sh\n"))
    };
    let (r, _) = registry(&format!(
        "[[agent]]\nname = \"a\"\nowner = \"o\"\nmatch = {{ exe_sha256 = \"{}\", uid = 5 }}\n",
        h.to_uppercase()
    ));
    let p = ProcessIdentity {
        uid: 5,
        exe: exe.display().to_string(),
        ..Default::default()
    };
    let now = time::OffsetDateTime::now_utc();
    assert_eq!(r.resolve(&p, now).name, "a");
    std::fs::write(&exe, b"#!/bin/sh\nevil\n").unwrap();
    assert_eq!(
        r.resolve(&p, now).name,
        "unregistered",
        "changed binary is not the agent"
    );
}

#[test]
fn registry_warnings_and_errors() {
    let (_, w) =
        registry("[[agent]]\nname = \"a\"\nowner = \"o\"\nmatch = { exe = \"/usr/bin/agent\" }\n");
    assert_eq!(w.0.len(), 1);
    assert!(
        w.to_string().starts_with("agents.toml:1: warning:") && w.to_string().contains("exe alone"),
        "{w}"
    );
    let cases: &[(&str, &str, &str)] = &[
        ("[[agent]]\nname = \"a\"\nowner = \"o\"\n", "agents.toml:1:", "no match"),
        ("[[agent]]\nname = \"a\"\nmatch = {}\n", "agents.toml:1:", "empty match"),
        ("[[agent]]\nname = \"a\"\nmatch = { uid = -1 }\n", "agents.toml:3:", "uid"),
        ("[[agent]]\nname = \"a\"\nmatch = { exe = \"agent\" }\n", "agents.toml:3:", "absolute"),
        ("[[agent]]\nname = \"a\"\nmatch = { cgroup = \"agents\" }\n", "agents.toml:3:", "start with /"),
        ("[[agent]]\nname = \"a\"\nmatch = { exe_sha256 = \"abc\", uid = 1 }\n", "agents.toml:3:", "64 hex"),
        ("[[agent]]\nname = \"a\"\nmatch = { uid = 1, shell = \"x\" }\n", "agents.toml:3:", "unknown field"),
        ("[[agent]]\nname = \"a\"\ncreated = \"someday\"\nmatch = { uid = 1 }\n", "agents.toml:3:", "bad date"),
        ("[[agent]]\nname = \"a\"\ncreated = \"2026-01-02\"\nexpires = \"2026-01-01\"\nmatch = { uid = 1 }\n", "agents.toml:1:", "expires before"),
        ("[[agent]]\nname = \"unregistered\"\nmatch = { uid = 1 }\n", "agents.toml:2:", "reserved"),
        ("[[agent]]\nname = \"a\"\nmatch = { uid = 1 }\n[[agent]]\nname = \"a\"\nmatch = { uid = 2 }\n", "agents.toml:4:", "duplicate agent"),
        ("[[rule]]\nid = \"x\"\nverdict = \"deny\"\n", "agents.toml:1:", "not an agent registry"),
    ];
    for (text, at, want) in cases {
        let err = match Registry::from_source(&Source::new("agents.toml", *text)) {
            Ok(_) => panic!("{text:?} loaded"),
            Err(d) => d.to_string(),
        };
        assert!(
            err.starts_with(at) && err.contains(want),
            "{text:?}: want {at} {want:?}, got {err}"
        );
    }
}

// ---- properties ----

fn verdict_strategy() -> impl Strategy<Value = Verdict> {
    prop_oneof![
        Just(Verdict::Allow),
        Just(Verdict::Hold),
        Just(Verdict::Deny)
    ]
}

proptest! {
    /// Whatever rules match, the verdict is the maximum of their verdicts
    /// (deny > hold > allow), the reported rule is the first of that verdict,
    /// and `matched` lists exactly the matching rules.
    #[test]
    fn precedence_is_max_and_first_reported(rules in prop::collection::vec((verdict_strategy(), any::<bool>(), 0u8..3), 1..12)) {
        let mut text = String::from("[defaults]\nverdict = \"allow\"\n");
        for (i, (v, matches, kind)) in rules.iter().enumerate() {
            // kind: 0 exact tool, 1 glob tool, 2 CEL condition.
            let sel = match (kind, matches) {
                (0, true) => "tool = \"t\"".to_string(),
                (0, false) => "tool = \"u\"".to_string(),
                (1, true) => "tool = \"t*\"".to_string(),
                (1, false) => "tool = \"x*\"".to_string(),
                (_, m) => format!("when = \"args.n == {}\"", if *m { 1 } else { 2 }),
            };
            text.push_str(&format!("[[rule]]\nid = \"r{i}\"\n{sel}\nverdict = \"{v}\"\n"));
        }
        let p = policy(&text);
        let d = p.decide(&call("t", json!({"n": 1})));
        let matching: Vec<(usize, Verdict)> = rules.iter().enumerate().filter(|(_, r)| r.1).map(|(i, r)| (i, r.0)).collect();
        match matching.iter().map(|m| m.1).max() {
            None => {
                prop_assert_eq!(d.verdict, Verdict::Allow);
                prop_assert_eq!(d.rule, None);
                prop_assert!(d.matched.is_empty());
            }
            Some(best) => {
                prop_assert_eq!(d.verdict, best);
                let first = matching.iter().find(|m| m.1 == best).map(|m| format!("r{}", m.0));
                prop_assert_eq!(d.rule, first);
                let mut want: Vec<String> = matching.iter().map(|m| format!("r{}", m.0)).collect();
                let mut got = d.matched.clone();
                want.sort();
                got.sort();
                prop_assert_eq!(got, want);
            }
        }
    }

    /// The index never hides a rule: a decision through the index equals the
    /// decision with every rule examined (--explain path).
    #[test]
    fn index_agrees_with_full_scan(
        patterns in prop::collection::vec(("[ab*]{1,4}", prop::option::of("[xy*]{1,3}"), verdict_strategy()), 1..20),
        tool in "[ab]{0,5}",
        server in "[xy]{1,4}",
    ) {
        let mut text = String::new();
        for (i, (t, s, v)) in patterns.iter().enumerate() {
            text.push_str(&format!("[[rule]]\nid = \"r{i}\"\ntool = \"{t}\"\nverdict = \"{v}\"\n"));
            if let Some(s) = s {
                text.push_str(&format!("server = \"{s}\"\n"));
            }
            // Some server-only rules too.
            if i % 3 == 0 {
                text.push_str(&format!("[[rule]]\nid = \"s{i}\"\nserver = \"{}\"\nverdict = \"{v}\"\n", s.as_deref().unwrap_or("*")));
            }
        }
        let p = policy(&text);
        let mut c = call(&tool, json!({}));
        if tool.is_empty() { c.tool = None; c.method = "tools/call".into(); }
        c.server = server;
        let fast = p.decide_with(&c, None, false);
        let mut full = p.decide_with(&c, None, true);
        full.explain = None;
        prop_assert_eq!(fast, full);
    }

    /// Hostile argument values never panic and never yield allow from an erroring allow rule.
    #[test]
    fn hostile_args_never_panic(s in "\\PC{0,40}", n in any::<i64>(), f in any::<f64>()) {
        let p = policy("[defaults]\nverdict = \"deny\"\n[[rule]]\nid = \"ok\"\ntool = \"t\"\nwhen = \"args.a.b > 10 && args.s.startsWith('x')\"\nverdict = \"allow\"\n");
        for args in [json!({"a": {"b": s.clone()}, "s": s.clone()}), json!({"a": {"b": n}, "s": n}), json!({"a": f.to_string(), "s": [s.clone()]}), json!(s.clone())] {
            let d = p.decide(&call("t", args));
            if d.verdict == Verdict::Allow {
                prop_assert!(d.errors.is_empty());
            }
        }
    }

    /// Arbitrary text as a policy file: never a panic, errors carry file:line.
    #[test]
    fn arbitrary_policy_text_never_panics(text in "(\\[\\[rule\\]\\]\n|id = \"a\"\n|verdict = \"deny\"\n|tool = \"[a*\\[]{0,3}\"\n|when = \"[a-z.> 0-9()]{0,12}\"\n|\\[defaults\\]\n|[\\PC]{0,8}\n){0,12}") {
        match Policy::from_sources(&[Source::new("f.toml", text.clone())]) {
            Ok(_) => {}
            Err(d) => {
                prop_assert!(!d.0.is_empty());
                for e in d.0 {
                    prop_assert_eq!(e.file.as_str(), "f.toml");
                    prop_assert!(e.line >= 1 && e.line <= text.lines().count().max(1) + 1);
                }
            }
        }
    }
}

// ---- fast path agrees with CEL ----

fn atom() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("args.a".to_string()),
        Just("args.b".to_string()),
        Just("args.c.d".to_string()),
        Just("args.missing".to_string()),
        Just("time.hour".to_string()),
        Just("time.weekday".to_string()),
        Just("agent.name".to_string()),
        Just("agent.owner".to_string()),
        Just("agent.orphaned".to_string()),
        Just("tool".to_string()),
        Just("process.uid".to_string()),
        Just("credential".to_string()),
        (-3i64..1500).prop_map(|i| i.to_string()),
        Just("1.5".to_string()),
        Just("1000.0".to_string()),
        Just("'x'".to_string()),
        Just("'billing-bot'".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        Just("null".to_string()),
    ]
}

fn cond() -> impl Strategy<Value = String> {
    let op = prop_oneof![
        Just("=="),
        Just("!="),
        Just("<"),
        Just("<="),
        Just(">"),
        Just(">=")
    ];
    let leaf = prop_oneof![
        (atom(), op, atom()).prop_map(|(a, o, b)| format!("{a} {o} {b}")),
        Just("has(args.a)".to_string()),
        Just("has(args.c.d)".to_string()),
        Just("agent.orphaned".to_string()),
        Just("args.a".to_string()),
        Just("size(args.a) > 0".to_string()),
        Just("args.a.startsWith('x')".to_string()),
        Just("args.a.contains('')".to_string()),
        Just("args.b.endsWith('0')".to_string()),
        Just("agent.name.contains('bill')".to_string()),
        Just("tool.startsWith(args.a)".to_string()),
    ];
    leaf.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
            inner.prop_map(|a| format!("!({a})")),
        ]
    })
}

fn json_scalar() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        (-3i64..1500).prop_map(|i| json!(i)),
        Just(json!("x1500")),
        Just(json!("trans")),
        Just(json!(1.5)),
        Just(json!(1000.0)),
        Just(json!("x")),
        Just(json!("5000")),
        Just(json!(true)),
        Just(json!(null)),
        Just(json!({"d": 1})),
        Just(json!([1, 2])),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Whenever the fast path answers, the CEL interpreter gives the same boolean.
    #[test]
    fn fast_path_agrees_with_cel(
        src in cond(),
        a in prop::option::of(json_scalar()),
        b in prop::option::of(json_scalar()),
        d in prop::option::of(json_scalar()),
        orphaned in any::<bool>(),
        hour in 0u8..24,
    ) {
        let Ok(c) = super::cel::Condition::compile(&src) else { return Ok(()) };
        let mut args = serde_json::Map::new();
        if let Some(a) = a { args.insert("a".into(), a); }
        if let Some(b) = b { args.insert("b".into(), b); }
        if let Some(d) = d { args.insert("c".into(), json!({"d": d})); }
        let mut call = call("transfer", serde_json::Value::Object(args));
        call.agent.orphaned = orphaned;
        call.time = call.time.replace_hour(hour).unwrap();
        let slow = c.eval_bool(&super::cel::Activation::new(&call, time::UtcOffset::UTC));
        if let Some(fast) = c.fast_bool(&call, time::UtcOffset::UTC) {
            prop_assert_eq!(slow, Ok(fast), "{}", src);
        }
        // Budget sums: the fast number equals CEL's.
        for num in ["args.a", "args.c.d", "time.hour", "process.uid"] {
            let n = super::cel::Condition::compile(num).unwrap();
            if let Some(fast) = n.fast_number(&call, time::UtcOffset::UTC) {
                let slow = n.eval_number(&super::cel::Activation::new(&call, time::UtcOffset::UTC));
                prop_assert_eq!(slow, Ok(fast), "{}", num);
            }
        }
    }
}

#[test]
fn fast_path_covers_the_common_shapes() {
    for src in [
        "args.amount > 1000",
        "args.amount <= 1000 && args.meta.currency == 'EUR'",
        "time.hour < 8 || time.hour >= 18 || time.weekday >= 6",
        "agent.name == 'bot' && process.uid == 1000",
        "has(args.sql) && !agent.orphaned",
        "has(args.sql) && string(args.sql).matches('drop')",
        "has(args.sql) && args.sql.contains('drop')",
        "args.path.startsWith('/srv') || args.path.endsWith('.csv')",
    ] {
        assert!(
            super::cel::Condition::compile(src).unwrap().has_fast_path(),
            "{src}"
        );
    }
    // Errors fall back to CEL (and fail closed there).
    let c = super::cel::Condition::compile("args.amount > 1000").unwrap();
    assert_eq!(
        c.fast_bool(&call("t", json!({"amount": "5000"})), time::UtcOffset::UTC),
        None
    );
    assert_eq!(
        c.fast_bool(&call("t", json!({})), time::UtcOffset::UTC),
        None
    );
    assert_eq!(
        c.fast_bool(&call("t", json!({"amount": 1000.5})), time::UtcOffset::UTC),
        None,
        "cross-type goes to CEL"
    );
    assert_eq!(
        c.fast_bool(&call("t", json!({"amount": 1001})), time::UtcOffset::UTC),
        Some(true)
    );
}

#[test]
fn tool_drift_holds_by_default_and_rules_override() {
    let p = policy(
        r#"
[defaults]
verdict = "deny"

[[rule]]
id = "calc"
tool = "add"
verdict = "allow"

[[rule]]
id = "dev"
server = "dev.example.com"
verdict = "allow"
tool_drift = "allow"

[[rule]]
id = "strict"
tool = "pay"
verdict = "allow"
tool_drift = "deny"
"#,
    );
    let mut c = call("add", json!({}));
    for (pin, want) in [
        (ToolPin::Unknown, Verdict::Allow),
        (ToolPin::Unchanged, Verdict::Allow),
        (ToolPin::Changed, Verdict::Hold),
        (ToolPin::New, Verdict::Hold),
        (ToolPin::Removed, Verdict::Deny),
    ] {
        c.tool_pin = pin;
        let d = p.decide_with(&c, None, false);
        assert_eq!(d.verdict, want, "{pin:?}");
        if pin.drifted() {
            assert_eq!(d.rule.as_deref(), Some("kya:tool-drift"));
            assert!(d.reason.contains("kya tools diff"), "{}", d.reason);
        }
    }
    // A default deny is not weakened by drift.
    let mut other = call("unlisted", json!({}));
    other.tool_pin = ToolPin::Changed;
    assert_eq!(p.decide_with(&other, None, false).rule, None);
    // Per rule.
    let mut dev = call("anything", json!({}));
    dev.server = "dev.example.com".into();
    dev.tool_pin = ToolPin::Changed;
    assert_eq!(p.decide_with(&dev, None, false).verdict, Verdict::Allow);
    dev.tool_pin = ToolPin::Removed;
    assert_eq!(p.decide_with(&dev, None, false).verdict, Verdict::Allow);
    let mut pay = call("pay", json!({}));
    pay.tool_pin = ToolPin::Changed;
    assert_eq!(p.decide_with(&pay, None, false).verdict, Verdict::Deny);
    // A credential never releases a hold of a changed tool.
    c.tool_pin = ToolPin::Changed;
    c.credential = Some(json!({"tool": "add"}));
    let d = p.decide_with(&c, None, false);
    assert_eq!(d.verdict, Verdict::Hold);
    assert!(!d.released_by_credential);
    // Not a tools/call: drift does not apply.
    c.method = "resources/read".into();
    c.credential = None;
    assert_ne!(
        p.decide_with(&c, None, false).rule.as_deref(),
        Some("kya:tool-drift")
    );
}

#[test]
fn tool_drift_defaults_and_bad_values() {
    let p = policy("[defaults]\nverdict = \"allow\"\ntool_drift = \"deny\"\n");
    let mut c = call("x", json!({}));
    c.tool_pin = ToolPin::New;
    assert_eq!(p.decide_with(&c, None, false).verdict, Verdict::Deny);
    let p = policy("[defaults]\nverdict = \"allow\"\ntool_drift = \"allow\"\n");
    c.tool_pin = ToolPin::Changed;
    assert_eq!(p.decide_with(&c, None, false).verdict, Verdict::Allow);
    let e = load_err(&[("p.toml", "[defaults]\ntool_drift = \"maybe\"\n")]);
    assert!(e.contains("p.toml:2"), "{e}");
    let e = load_err(&[(
        "p.toml",
        "[[rule]]\nid = \"r\"\nverdict = \"allow\"\ntool_drift = \"sometimes\"\n",
    )]);
    assert!(e.contains("p.toml:4"), "{e}");
}

#[test]
fn tool_pin_is_a_condition_fact() {
    let p = policy(
        r#"
[defaults]
verdict = "deny"

[[rule]]
id = "only-pinned"
tool = "add"
when = 'tool_pin == "unchanged"'
verdict = "allow"

[[rule]]
id = "never-announced"
when = 'tool_pin in ["unknown", "removed"]'
verdict = "deny"
reason = "the server never announced this tool"
"#,
    );
    let mut c = call("add", json!({}));
    c.tool_pin = ToolPin::Unchanged;
    assert_eq!(
        p.decide_with(&c, None, false).rule.as_deref(),
        Some("only-pinned")
    );
    c.tool_pin = ToolPin::Unknown;
    assert_eq!(
        p.decide_with(&c, None, false).rule.as_deref(),
        Some("never-announced")
    );
    c.tool_pin = ToolPin::Changed;
    // No rule allows it, the default denies it.
    let d = p.decide_with(&c, None, false);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.rule, None);
}
