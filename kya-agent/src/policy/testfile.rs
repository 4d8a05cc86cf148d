//! Policy tests (`[[test]]` files), run by `kya policy test` the way `opa test`
//! runs Rego tests: each test describes a call and the verdict (and rule) a
//! person expects from the documentation.
//!
//! ```toml
//! policy = ["../examples/spend.toml"]   # relative to this file; else the CLI's rule files
//! agents = "../agents.toml"             # optional registry
//!
//! [[test]]
//! name = "a large transfer is held"
//! call = { agent = "billing-bot", server = "pay.example.com", tool = "transfer", args = { amount = 5000 } }
//! expect = "hold"
//! expect_rule = "large-transfer"       # "" means: the defaults decided
//! forwarded_before = 0                 # record this call N times as forwarded first (budgets)
//! ```

use super::budget::BudgetState;
use super::call::{toml_to_json, CallDescription};
use super::diag::{Diagnostic, Diagnostics, Source};
use super::load::{detect_kind, FileKind};
use super::model::Policy;
use super::registry::Registry;
use kya_common::Verdict;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTestFile {
    policy: Option<Vec<String>>,
    agents: Option<String>,
    #[serde(default)]
    test: Vec<Spanned<RawTest>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    name: String,
    call: Spanned<toml::Value>,
    expect: Spanned<String>,
    expect_rule: Option<String>,
    expect_matched: Option<Vec<String>>,
    forwarded_before: Option<u32>,
}

/// Most `forwarded_before` repetitions accepted.
pub(crate) const MAX_FORWARDED_BEFORE: u32 = 10_000;

/// One test case.
#[derive(Debug)]
pub(crate) struct TestCase {
    /// Name.
    pub name: String,
    /// 1-based line.
    pub line: usize,
    /// The call.
    pub call: CallDescription,
    /// Expected verdict.
    pub expect: Verdict,
    /// Expected rule: `Some(None)` = the defaults decided.
    pub expect_rule: Option<Option<String>>,
    /// Expected `matched` list.
    pub expect_matched: Option<Vec<String>>,
    /// Record the call this many times as forwarded before deciding.
    pub forwarded_before: u32,
}

/// A parsed test file.
#[derive(Debug)]
pub(crate) struct TestFile {
    /// File name.
    pub name: String,
    /// Policy paths named by the file (resolved against its directory).
    pub policy: Option<Vec<PathBuf>>,
    /// Registry named by the file.
    pub agents: Option<PathBuf>,
    /// The tests.
    pub cases: Vec<TestCase>,
}

/// The result of one test.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// `file:line name`.
    pub label: String,
    /// None = passed; Some(why) = failed.
    pub failure: Option<String>,
}

/// Parse a test file; `dir` resolves its relative paths.
pub(crate) fn parse(src: &Source, dir: &Path) -> Result<TestFile, Diagnostics> {
    match detect_kind(src) {
        Ok(FileKind::Tests) => {}
        Ok(_) => {
            return Err(Diagnostics(vec![src.error_at(
                0,
                "this is not a policy test file (expected [[test]] tables)",
            )]))
        }
        Err(d) => return Err(Diagnostics(vec![d])),
    }
    let raw: RawTestFile =
        toml::from_str(&src.text).map_err(|e| Diagnostics(vec![src.toml_error(&e)]))?;
    let mut errors: Vec<Diagnostic> = Vec::new();
    if raw.test.is_empty() {
        errors.push(src.error_at(0, "test file has no [[test]] tables"));
    }
    let mut cases = Vec::new();
    for t in raw.test {
        let start = t.span().start;
        let t = t.into_inner();
        let call = match toml_to_json(t.call.get_ref()).and_then(|v| {
            if v.is_object() {
                CallDescription::from_value(v)
            } else {
                Err("call must be a table".to_string())
            }
        }) {
            Ok(c) => c,
            Err(e) => {
                errors.push(src.error_at(t.call.span().start, format!("test {:?}: {e}", t.name)));
                continue;
            }
        };
        if let Err(e) = call.time() {
            errors.push(src.error_at(t.call.span().start, format!("test {:?}: {e}", t.name)));
        }
        let expect = match t.expect.get_ref().parse::<Verdict>() {
            Ok(v) => v,
            Err(e) => {
                errors.push(src.error_at(t.expect.span().start, e.to_string()));
                continue;
            }
        };
        let forwarded_before = t.forwarded_before.unwrap_or(0);
        if forwarded_before > MAX_FORWARDED_BEFORE {
            errors.push(src.error_at(
                start,
                format!("forwarded_before is at most {MAX_FORWARDED_BEFORE}"),
            ));
        }
        cases.push(TestCase {
            name: t.name,
            line: src.line_of(start),
            call,
            expect,
            expect_rule: t
                .expect_rule
                .map(|r| if r.is_empty() { None } else { Some(r) }),
            expect_matched: t.expect_matched,
            forwarded_before,
        });
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }
    Ok(TestFile {
        name: src.name.clone(),
        policy: raw
            .policy
            .map(|ps| ps.iter().map(|p| dir.join(p)).collect()),
        agents: raw.agents.map(|a| dir.join(a)),
        cases,
    })
}

/// Run a test file. Its own `policy`/`agents` take precedence over the ones
/// given (`fallback_policy` from the command line).
pub(crate) fn run(
    file: &TestFile,
    fallback_policy: Option<&Policy>,
    fallback_registry: &Registry,
) -> Result<Vec<Outcome>, Diagnostics> {
    let own_policy = match &file.policy {
        Some(paths) => Some(Policy::load(paths)?),
        None => None,
    };
    let policy = match (&own_policy, fallback_policy) {
        (Some(p), _) => p,
        (None, Some(p)) => p,
        (None, None) => {
            return Err(Diagnostics(vec![Diagnostic {
                file: file.name.clone(),
                line: 1,
                severity: super::Severity::Error,
                message: "no policy: name one with policy = [...] in the file or give rule files on the command line".into(),
            }]))
        }
    };
    let own_registry = match &file.agents {
        Some(p) => Some(Registry::load(p)?),
        None => None,
    };
    let registry = own_registry.as_ref().unwrap_or(fallback_registry);
    let mut out = Vec::new();
    for case in &file.cases {
        let label = format!("{}:{} {}", file.name, case.line, case.name);
        let call = match case.call.clone().into_call(registry) {
            Ok(c) => c,
            Err(e) => {
                out.push(Outcome {
                    label,
                    failure: Some(e),
                });
                continue;
            }
        };
        let budgets = BudgetState::in_memory();
        for _ in 0..case.forwarded_before {
            policy.record_forwarded(&call, &budgets);
        }
        let d = policy.decide_with(&call, Some(&budgets), false);
        let mut problems = Vec::new();
        if d.verdict != case.expect {
            problems.push(format!("expected {}, got {}", case.expect, d.verdict));
        }
        if let Some(want) = &case.expect_rule {
            if &d.rule != want {
                problems.push(format!(
                    "expected rule {}, got {}",
                    show(want),
                    show(&d.rule)
                ));
            }
        }
        if let Some(want) = &case.expect_matched {
            if &d.matched != want {
                problems.push(format!("expected matched {:?}, got {:?}", want, d.matched));
            }
        }
        let failure = (!problems.is_empty())
            .then(|| format!("{} (reason: {})", problems.join("; "), d.reason));
        out.push(Outcome { label, failure });
    }
    Ok(out)
}

fn show(r: &Option<String>) -> String {
    r.as_deref()
        .map(|s| format!("{s:?}"))
        .unwrap_or_else(|| "null (defaults)".to_string())
}
