//! The policy model: raw TOML shapes (serde, with spans for diagnostics) and
//! the compiled, immutable [`Policy`] the engine evaluates.

use super::cel::Condition;
use super::glob::Glob;
use super::index::RuleIndex;
pub(crate) use super::rule::{Origin, Rule};
use kya_common::Verdict;
use serde::Deserialize;
use std::time::Duration;
use toml::Spanned;

// ---- raw TOML shapes (deny_unknown_fields: a typo is an error, never ignored) ----

/// A rule file: `[defaults]`, `[[rule]]`, `[[budget]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRuleFile {
    pub defaults: Option<Spanned<RawDefaults>>,
    #[serde(default)]
    pub rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pub budget: Vec<Spanned<RawBudget>>,
}

/// `[defaults]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDefaults {
    pub verdict: Option<Spanned<String>>,
    pub methods: Option<Spanned<String>>,
    pub hold_timeout: Option<Spanned<String>>,
    pub timezone: Option<Spanned<String>>,
    /// Verdict for calls of orphaned agents (kya extension; default deny).
    pub orphaned: Option<Spanned<String>>,
    /// Verdict for calls of a tool whose definition changed since it was
    /// pinned (default hold).
    pub tool_drift: Option<Spanned<String>>,
}

/// `[[rule]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub id: Spanned<String>,
    pub agent: Option<Spanned<String>>,
    pub owner: Option<Spanned<String>>,
    pub server: Option<Spanned<String>>,
    pub method: Option<Spanned<String>>,
    pub tool: Option<Spanned<String>>,
    pub when: Option<Spanned<String>>,
    pub verdict: Spanned<String>,
    pub reason: Option<String>,
    pub hold_timeout: Option<Spanned<String>>,
    pub approvers: Option<Vec<String>>,
    /// Overrides `[defaults] tool_drift` for the calls this rule decides.
    pub tool_drift: Option<Spanned<String>>,
}

/// `[[budget]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBudget {
    pub id: Spanned<String>,
    pub agent: Option<Spanned<String>>,
    pub server: Option<Spanned<String>>,
    pub tool: Option<Spanned<String>>,
    pub max_calls: Option<Spanned<i64>>,
    pub sum: Option<Spanned<String>>,
    pub max: Option<Spanned<toml::Value>>,
    pub per: Spanned<String>,
    pub verdict: Option<Spanned<String>>,
    pub reason: Option<String>,
    /// `agent` (default) or `agent+tool`: whose calls share one window.
    pub group_by: Option<Spanned<String>>,
}

// ---- compiled model ----

/// What a budget limits.
#[derive(Debug)]
pub enum Limit {
    /// Number of forwarded calls per window.
    Calls(u64),
    /// Sum of a numeric CEL expression over forwarded calls per window.
    Sum {
        /// The expression (e.g. `args.amount`).
        expr: Condition,
        /// The maximum sum.
        max: f64,
    },
}

/// Whose calls share a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// One window per agent.
    Agent,
    /// One window per agent and tool.
    AgentTool,
}

/// A compiled `[[budget]]`.
#[derive(Debug)]
pub struct Budget {
    /// Unique id (shared namespace with rules).
    pub id: String,
    /// Where it was written.
    pub origin: Origin,
    /// Agent-name glob.
    pub agent: Option<Glob>,
    /// Server glob (case-insensitive).
    pub server: Option<Glob>,
    /// Tool glob.
    pub tool: Option<Glob>,
    /// The limit.
    pub limit: Limit,
    /// Sliding window length.
    pub per: Duration,
    /// Verdict once exceeded (hold or deny).
    pub verdict: Verdict,
    /// Reason.
    pub reason: Option<String>,
    /// Window grouping.
    pub group_by: GroupBy,
}

/// `[defaults]`, compiled.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// For a `tools/call` no rule matches.
    pub verdict: Verdict,
    /// For other methods no rule matches.
    pub methods: Verdict,
    /// Default hold timeout.
    pub hold_timeout: Duration,
    /// Timezone name as written.
    pub timezone: String,
    /// Its offset (named zones other than UTC are not supported).
    pub offset: time::UtcOffset,
    /// Verdict for calls of orphaned agents.
    pub orphaned: Verdict,
    /// Verdict for calls of a tool whose definition changed since it was
    /// pinned, or that was added after the server's tools were pinned.
    pub tool_drift: Verdict,
}

impl Default for Defaults {
    /// Fail closed: unknown tool calls are denied, protocol chatter allowed.
    fn default() -> Self {
        Defaults {
            verdict: Verdict::Deny,
            methods: Verdict::Allow,
            hold_timeout: Duration::from_secs(120),
            timezone: "UTC".to_string(),
            offset: time::UtcOffset::UTC,
            orphaned: Verdict::Deny,
            tool_drift: Verdict::Hold,
        }
    }
}

/// A compiled, immutable policy: the rule files of one load.
#[derive(Debug)]
pub struct Policy {
    /// Rules in load order.
    pub rules: Vec<Rule>,
    /// Budgets in load order.
    pub budgets: Vec<Budget>,
    /// Defaults.
    pub defaults: Defaults,
    /// Rule index.
    pub(crate) index: RuleIndex,
    /// Content hash.
    pub version: String,
    /// The files it was loaded from.
    pub files: Vec<String>,
}
