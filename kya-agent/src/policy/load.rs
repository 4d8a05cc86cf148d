//! Loading rule files: TOML text to a compiled [`Policy`], with every problem
//! reported as `file:line: message`.
//!
//! Files are recognised by their top-level keys (one kind per
//! file). A directory loads its `*.toml` rule files in lexical order (agent
//! registries and policy tests in it are skipped, so a policy directory can
//! hold all three). Cross-file rules: ids are unique across rules and budgets
//! of all files, and at most one `[defaults]` exists in the whole set.

use super::cel::Condition;
use super::diag::{Diagnostic, Diagnostics, Source};
use super::glob::Glob;
use super::index::RuleIndex;
use super::model::{
    Budget, Defaults, GroupBy, Limit, Origin, Policy, RawBudget, RawDefaults, RawRule, RawRuleFile,
    Rule,
};
use kya_common::Verdict;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// The shipped default policy, used when no policy path is configured.
pub(crate) const EMBEDDED_DEFAULT: &str = include_str!("../../../policies/default.toml");
/// Name of the embedded default in diagnostics.
pub(crate) const EMBEDDED_NAME: &str = "<embedded policies/default.toml>";

/// Largest policy file read (a policy is text written by people).
pub(crate) const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Longest accepted `hold_timeout`.
pub(crate) const MAX_HOLD_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest accepted budget window.
pub(crate) const MAX_BUDGET_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);

/// The three kinds of policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// `[defaults]`, `[[rule]]`, `[[budget]]`.
    Rules,
    /// `[[agent]]` (plus `departed_owners`).
    Agents,
    /// `[[test]]` (plus `policy`, `agents`).
    Tests,
}

impl FileKind {
    fn name(self) -> &'static str {
        match self {
            FileKind::Rules => "rule file",
            FileKind::Agents => "agent registry",
            FileKind::Tests => "policy test file",
        }
    }
}

const KEYS: &[(&str, FileKind)] = &[
    ("defaults", FileKind::Rules),
    ("rule", FileKind::Rules),
    ("budget", FileKind::Rules),
    ("agent", FileKind::Agents),
    ("departed_owners", FileKind::Agents),
    ("test", FileKind::Tests),
    ("policy", FileKind::Tests),
    ("agents", FileKind::Tests),
];

/// Recognise a file's kind from its top-level keys.
pub(crate) fn detect_kind(src: &Source) -> Result<FileKind, Diagnostic> {
    let table = toml::de::DeTable::parse(&src.text).map_err(|e| src.toml_error(&e))?;
    let mut keys: Vec<(usize, String)> = table
        .get_ref()
        .iter()
        .map(|(k, _)| (k.span().start, k.get_ref().to_string()))
        .collect();
    keys.sort();
    let mut kind: Option<(FileKind, String)> = None;
    for (offset, key) in keys {
        let Some((_, k)) = KEYS.iter().find(|(name, _)| *name == key) else {
            return Err(src.error_at(
                offset,
                format!(
                    "unknown top-level key {key:?} (expected [defaults], [[rule]], [[budget]], [[agent]] or [[test]])"
                ),
            ));
        };
        match &kind {
            None => kind = Some((*k, key)),
            Some((first, first_key)) if first != k => {
                return Err(src.error_at(
                    offset,
                    format!(
                        "file mixes kinds: {key:?} belongs in a {}, but {first_key:?} made this a {} (one kind per file)",
                        k.name(),
                        first.name()
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    kind.map(|(k, _)| k).ok_or_else(|| {
        src.error_at(
            0,
            "empty policy file: expected [[rule]], [[budget]], [defaults], [[agent]] or [[test]]",
        )
    })
}

/// Read a file (bounded), as a [`Source`] named by its path.
pub(crate) fn read_source(path: &Path) -> Result<Source, Diagnostic> {
    let name = path.display().to_string();
    let fail = |m: String| Diagnostic {
        file: name.clone(),
        line: 1,
        severity: super::Severity::Error,
        message: m,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(fail(format!("file is larger than {MAX_FILE_BYTES} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| fail(format!("not UTF-8: {e}")))?;
    Ok(Source::new(name, text))
}

/// Expand paths: files stay, directories give their `*.toml` files in lexical
/// order (descending into subdirectories when `recursive`).
pub(crate) fn expand(paths: &[PathBuf], recursive: bool) -> Result<Vec<PathBuf>, Diagnostics> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, recursive, &mut out, &mut errors);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            errors.push(Diagnostic {
                file: p.display().to_string(),
                line: 1,
                severity: super::Severity::Error,
                message: "no such file or directory".to_string(),
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(Diagnostics(errors))
    }
}

fn walk(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>, errors: &mut Vec<Diagnostic>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(Diagnostic {
                file: dir.display().to_string(),
                line: 1,
                severity: super::Severity::Error,
                message: format!("cannot read directory: {e}"),
            });
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            if recursive {
                walk(&p, recursive, out, errors);
            }
        } else if p.extension().is_some_and(|e| e == "toml") {
            out.push(p);
        }
    }
}

impl Policy {
    /// Load and compile the rule files at `paths` (files or directories).
    /// An agent registry or test file named explicitly is an error; in a
    /// directory they are skipped.
    pub fn load(paths: &[PathBuf]) -> Result<Policy, Diagnostics> {
        let mut sources = Vec::new();
        let mut errors = Vec::new();
        for p in paths {
            let explicit = !p.is_dir();
            let files = expand(std::slice::from_ref(p), false)?;
            for f in files {
                let src = match read_source(&f) {
                    Ok(s) => s,
                    Err(d) => {
                        errors.push(d);
                        continue;
                    }
                };
                match detect_kind(&src) {
                    Ok(FileKind::Rules) => sources.push(src),
                    Ok(kind) if explicit => errors.push(
                        src.error_at(0, format!("this is a {}, not a rule file", kind.name())),
                    ),
                    Ok(kind) => {
                        tracing::debug!(file = %src.name, kind = kind.name(), "skipping non-rule file in policy directory")
                    }
                    Err(d) => errors.push(d),
                }
            }
        }
        if !errors.is_empty() {
            return Err(Diagnostics(errors));
        }
        if sources.is_empty() {
            return Err(Diagnostics(
                paths
                    .iter()
                    .map(|p| Diagnostic {
                        file: p.display().to_string(),
                        line: 1,
                        severity: super::Severity::Error,
                        message: "no rule files found".to_string(),
                    })
                    .collect(),
            ));
        }
        Policy::from_sources(&sources)
    }

    /// Compile rule files given as text (in load order).
    pub fn from_sources(sources: &[Source]) -> Result<Policy, Diagnostics> {
        let mut c = Compiler::default();
        for src in sources {
            c.file(src);
        }
        c.finish(sources)
    }

    /// The shipped default policy (`policies/default.toml`, embedded at build time).
    pub fn embedded_default() -> Policy {
        match Policy::from_sources(&[Source::new(EMBEDDED_NAME, EMBEDDED_DEFAULT)]) {
            Ok(p) => p,
            Err(d) => {
                // Unreachable in a tested build (a unit test loads it); fail closed anyway.
                tracing::error!(errors = %d, "embedded default policy does not compile; denying every call");
                Policy::deny_all()
            }
        }
    }

    /// A policy with no rules whose defaults deny everything.
    pub fn deny_all() -> Policy {
        let defaults = Defaults {
            methods: Verdict::Deny,
            ..Defaults::default()
        };
        Policy {
            rules: Vec::new(),
            budgets: Vec::new(),
            defaults,
            index: RuleIndex::default(),
            version: "deny-all".to_string(),
            files: Vec::new(),
        }
    }
}

#[derive(Default)]
struct Compiler {
    rules: Vec<Rule>,
    budgets: Vec<Budget>,
    defaults: Option<(Defaults, Origin)>,
    ids: HashMap<String, Origin>,
    diags: Vec<Diagnostic>,
}

impl Compiler {
    fn file(&mut self, src: &Source) {
        match detect_kind(src) {
            Ok(FileKind::Rules) => {}
            Ok(kind) => {
                self.diags
                    .push(src.error_at(0, format!("this is a {}, not a rule file", kind.name())));
                return;
            }
            Err(d) => {
                self.diags.push(d);
                return;
            }
        }
        let raw: RawRuleFile = match toml::from_str(&src.text) {
            Ok(r) => r,
            Err(e) => {
                self.diags.push(src.toml_error(&e));
                return;
            }
        };
        if let Some(d) = raw.defaults {
            let origin = origin(src, d.span().start);
            if let Some((_, first)) = &self.defaults {
                self.diags.push(src.error_at(
                    d.span().start,
                    format!("a second [defaults] (the first is at {first}); at most one is allowed across all policy files"),
                ));
            } else if let Some(compiled) = self.defaults(src, d.into_inner()) {
                self.defaults = Some((compiled, origin));
            }
        }
        for r in raw.rule {
            let start = r.span().start;
            if let Some(rule) = self.rule(src, start, r.into_inner()) {
                self.rules.push(rule);
            }
        }
        for b in raw.budget {
            let start = b.span().start;
            if let Some(budget) = self.budget(src, start, b.into_inner()) {
                self.budgets.push(budget);
            }
        }
    }

    fn finish(self, sources: &[Source]) -> Result<Policy, Diagnostics> {
        if !self.diags.is_empty() {
            return Err(Diagnostics(self.diags));
        }
        let mut h = Sha256::new();
        for s in sources {
            h.update((s.text.len() as u64).to_le_bytes());
            h.update(s.text.as_bytes());
        }
        let version = hex::encode(&h.finalize()[..8]);
        let index = RuleIndex::build(&self.rules);
        Ok(Policy {
            index,
            rules: self.rules,
            budgets: self.budgets,
            defaults: self.defaults.map(|(d, _)| d).unwrap_or_default(),
            version,
            files: sources.iter().map(|s| s.name.clone()).collect(),
        })
    }

    fn err(&mut self, src: &Source, offset: usize, msg: impl Into<String>) {
        self.diags.push(src.error_at(offset, msg));
    }

    fn claim_id(&mut self, src: &Source, id: &Spanned<String>) -> bool {
        let at = id.span().start;
        let name = id.get_ref();
        if name.is_empty()
            || name.len() > 128
            || name.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            self.err(
                src,
                at,
                format!("invalid id {name:?}: 1-128 characters, no spaces or control characters"),
            );
            return false;
        }
        if name.starts_with("kya:") {
            self.err(src, at, format!("id {name:?}: the kya: prefix is reserved"));
            return false;
        }
        if let Some(first) = self.ids.get(name) {
            let msg = format!("duplicate id {name:?} (first defined at {first})");
            self.err(src, at, msg);
            return false;
        }
        self.ids.insert(name.clone(), origin(src, at));
        true
    }

    fn defaults(&mut self, src: &Source, raw: RawDefaults) -> Option<Defaults> {
        let mut d = Defaults::default();
        let mut ok = true;
        if let Some(v) = raw.verdict {
            ok &= self.verdict(src, &v).map(|v| d.verdict = v).is_some();
        }
        if let Some(v) = raw.methods {
            ok &= self.verdict(src, &v).map(|v| d.methods = v).is_some();
        }
        if let Some(v) = raw.orphaned {
            ok &= self.verdict(src, &v).map(|v| d.orphaned = v).is_some();
        }
        if let Some(v) = raw.tool_drift {
            ok &= self.verdict(src, &v).map(|v| d.tool_drift = v).is_some();
        }
        if let Some(t) = raw.hold_timeout {
            ok &= self
                .duration(src, &t, MAX_HOLD_TIMEOUT)
                .map(|t| d.hold_timeout = t)
                .is_some();
        }
        if let Some(tz) = raw.timezone {
            match parse_timezone(tz.get_ref()) {
                Some(off) => {
                    d.offset = off;
                    d.timezone = tz.get_ref().clone();
                }
                None => {
                    self.err(src, tz.span().start, format!("unsupported timezone {:?}: use \"UTC\" or a fixed offset like \"+02:00\"", tz.get_ref()));
                    ok = false;
                }
            }
        }
        ok.then_some(d)
    }

    fn rule(&mut self, src: &Source, start: usize, raw: RawRule) -> Option<Rule> {
        let before = self.diags.len();
        let id_ok = self.claim_id(src, &raw.id);
        let agent = self.glob(src, raw.agent.as_ref(), false);
        let owner = self.glob(src, raw.owner.as_ref(), false);
        let server = self.glob(src, raw.server.as_ref(), true);
        let tool = self.glob(src, raw.tool.as_ref(), false);
        let method = match &raw.method {
            Some(m) => self.glob(src, Some(m), false),
            None => Glob::new("tools/call").ok(),
        };
        let when = raw.when.as_ref().and_then(|w| self.condition(src, w));
        let verdict = self.verdict(src, &raw.verdict);
        let tool_drift = raw.tool_drift.as_ref().map(|v| self.verdict(src, v));
        let hold_timeout = raw
            .hold_timeout
            .as_ref()
            .and_then(|t| self.duration(src, t, MAX_HOLD_TIMEOUT));
        if raw
            .approvers
            .as_ref()
            .is_some_and(|a| a.iter().any(|s| s.trim().is_empty()))
        {
            self.err(src, start, "approvers: empty name");
        }
        if self.diags.len() != before || !id_ok {
            return None;
        }
        Some(Rule {
            id: raw.id.into_inner(),
            origin: origin(src, start),
            agent,
            owner,
            server,
            method: method?,
            tool,
            when,
            verdict: verdict?,
            reason: raw.reason,
            hold_timeout,
            approvers: raw.approvers.unwrap_or_default(),
            tool_drift: tool_drift.flatten(),
        })
    }

    fn budget(&mut self, src: &Source, start: usize, raw: RawBudget) -> Option<Budget> {
        let before = self.diags.len();
        let id_ok = self.claim_id(src, &raw.id);
        let agent = self.glob(src, raw.agent.as_ref(), false);
        let server = self.glob(src, raw.server.as_ref(), true);
        let tool = self.glob(src, raw.tool.as_ref(), false);
        let per = self.duration(src, &raw.per, MAX_BUDGET_WINDOW);
        let verdict = match &raw.verdict {
            Some(v) => {
                match self.verdict(src, v) {
                    Some(Verdict::Allow) => {
                        self.err(src, v.span().start, "a budget's verdict must be hold or deny (an exceeded budget never allows)");
                        None
                    }
                    other => other,
                }
            }
            None => Some(Verdict::Deny),
        };
        let group_by = match raw
            .group_by
            .as_ref()
            .map(|g| (g.get_ref().as_str(), g.span().start))
        {
            None | Some(("agent", _)) => GroupBy::Agent,
            Some(("agent+tool", _)) => GroupBy::AgentTool,
            Some((other, at)) => {
                self.err(
                    src,
                    at,
                    format!("group_by {other:?}: expected \"agent\" or \"agent+tool\""),
                );
                GroupBy::Agent
            }
        };
        let limit = match (&raw.max_calls, &raw.sum, &raw.max) {
            (Some(n), None, None) => match u64::try_from(*n.get_ref()) {
                Ok(n) => Some(Limit::Calls(n)),
                Err(_) => {
                    self.err(src, n.span().start, "max_calls must not be negative");
                    None
                }
            },
            (None, Some(expr), Some(max)) => {
                let m = match max.get_ref() {
                    toml::Value::Integer(i) => Some(*i as f64),
                    toml::Value::Float(f) if f.is_finite() => Some(*f),
                    _ => None,
                };
                let cond = self.condition(src, expr);
                match m {
                    Some(m) if m >= 0.0 => cond.map(|expr| Limit::Sum { expr, max: m }),
                    _ => {
                        self.err(
                            src,
                            max.span().start,
                            "max must be a finite, non-negative number",
                        );
                        None
                    }
                }
            }
            (None, Some(_), None) => {
                self.err(src, start, "budget with sum needs max");
                None
            }
            (Some(_), _, _) => {
                self.err(
                    src,
                    start,
                    "budget: give either max_calls, or sum with max, not both",
                );
                None
            }
            (None, None, _) => {
                self.err(src, start, "budget needs max_calls, or sum with max");
                None
            }
        };
        if self.diags.len() != before || !id_ok {
            return None;
        }
        Some(Budget {
            id: raw.id.into_inner(),
            origin: origin(src, start),
            agent,
            server,
            tool,
            limit: limit?,
            per: per?,
            verdict: verdict?,
            reason: raw.reason,
            group_by,
        })
    }

    fn glob(&mut self, src: &Source, s: Option<&Spanned<String>>, ci: bool) -> Option<Glob> {
        let s = s?;
        let r = if ci {
            Glob::new_case_insensitive(s.get_ref())
        } else {
            Glob::new(s.get_ref())
        };
        match r {
            Ok(g) => Some(g),
            Err(e) => {
                self.err(src, s.span().start, format!("bad glob: {e}"));
                None
            }
        }
    }

    fn condition(&mut self, src: &Source, s: &Spanned<String>) -> Option<Condition> {
        match Condition::compile(s.get_ref()) {
            Ok(c) => Some(c),
            Err(e) => {
                self.err(
                    src,
                    s.span().start,
                    format!("bad CEL {:?}: {e}", truncate(s.get_ref(), 80)),
                );
                None
            }
        }
    }

    fn verdict(&mut self, src: &Source, s: &Spanned<String>) -> Option<Verdict> {
        match s.get_ref().parse::<Verdict>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.err(src, s.span().start, e.to_string());
                None
            }
        }
    }

    fn duration(&mut self, src: &Source, s: &Spanned<String>, max: Duration) -> Option<Duration> {
        match parse_duration(s.get_ref(), max) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(src, s.span().start, e);
                None
            }
        }
    }
}

/// At most `max` characters of `s`, with an ellipsis when cut (long input in messages).
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

fn origin(src: &Source, offset: usize) -> Origin {
    Origin {
        file: src.name.clone(),
        line: src.line_of(offset),
    }
}

/// Parse a positive duration like `120s`, `24h`, `1h 30m`, at most `max`.
pub(crate) fn parse_duration(s: &str, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("bad duration {s:?}: {e} (e.g. \"120s\", \"24h\")"))?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be positive"));
    }
    if d > max {
        return Err(format!(
            "duration {s:?} is longer than {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// `UTC`/`Z` or a fixed offset `+HH:MM` / `-HH:MM`.
pub(crate) fn parse_timezone(s: &str) -> Option<time::UtcOffset> {
    if s.eq_ignore_ascii_case("utc") || s == "Z" {
        return Some(time::UtcOffset::UTC);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1i8, &s[1..]),
        b'-' => (-1i8, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: i8 = h.parse().ok()?;
    let m: i8 = m.parse().ok()?;
    if !(0..=23).contains(&h) || !(0..=59).contains(&m) {
        return None;
    }
    time::UtcOffset::from_hms(sign * h, sign * m, 0).ok()
}
