//! The policy engine and agent registry: who may call which tool, with which
//! arguments, right now.
//!
//! A pure library (no sockets, no eBPF): the interceptor builds a
//! [`CallContext`] for every MCP request and asks a [`Decide`] implementation
//! (normally the [`PolicyEngine`]) for a [`Decision`]. The format of the TOML
//! files is a contract, documented in `policies/README.md`.
//!
//! * [`load`]: TOML files to a compiled, immutable [`Policy`] (file:line diagnostics).
//! * [`model`]: the compiled rules, budgets and defaults.
//! * [`glob`], [`cel`]: name patterns and `when` conditions, compiled once.
//! * [`index`]: which rules can match a given method/tool/server.
//! * [`engine`]: the decision (precedence, fail-closed errors, credentials) and the live engine.
//! * [`budget`]: sliding-window budgets, persisted in the state directory.
//! * [`registry`]: registered agents, their owners, lifecycle and selectors.
//! * [`reload`]: SIGHUP and file-change reloads.
//! * [`call`]: the JSON call description of `kya policy test`.
//! * [`testfile`], [`check`], [`command`]: policy tests and the `kya policy` CLI.

pub mod budget;
pub(crate) mod call;
pub(crate) mod cel;
pub(crate) mod check;
pub mod command;
pub mod diag;
pub(crate) mod engine;
pub(crate) mod fast;
pub(crate) mod glob;
pub(crate) mod index;
pub(crate) mod load;
pub(crate) mod model;
pub(crate) mod registry;
pub(crate) mod reload;
pub(crate) mod rule;
pub(crate) mod testfile;

pub use diag::{Diagnostic, Diagnostics, Severity};
pub use engine::{EngineError, PolicyEngine};
pub use model::Policy;
pub use registry::{Registry, Selectors};

use kya_common::{ProcessIdentity, Verdict};
use serde::Serialize;
use std::time::Duration;

/// The agent a call is attributed to (resolved from the registry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentInfo {
    /// Registered name, or `"unregistered"`.
    pub name: String,
    /// The human who approves its held calls (local user / CIBA login_hint).
    pub owner: Option<String>,
    /// Registered, but its owner is gone or it has expired.
    pub orphaned: bool,
}

impl AgentInfo {
    /// The agent of a selected process that matches no registered agent.
    pub fn unregistered() -> AgentInfo {
        AgentInfo {
            name: registry::UNREGISTERED.to_string(),
            owner: None,
            orphaned: false,
        }
    }
}

/// Everything a decision may depend on.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// Who the agent is.
    pub agent: AgentInfo,
    /// The process that made the call.
    pub process: ProcessIdentity,
    /// SNI / Host of the MCP server (any case, port allowed: normalised here).
    pub server: String,
    /// The address the connection really goes to (`destination.ip`,
    /// `destination.port` in conditions); None outside the proxy (policy tests
    /// that do not name one).
    pub destination: Option<std::net::SocketAddr>,
    /// JSON-RPC method (`tools/call`, `tools/list`, ...).
    pub method: String,
    /// `params.name` of a `tools/call`.
    pub tool: Option<String>,
    /// `params.arguments` (JSON).
    pub args: serde_json::Value,
    /// When the call was made (budgets and `time.*`).
    pub time: time::OffsetDateTime,
    /// The scope of a credential that covers this exact call (already verified
    /// by the credential module), or None.
    pub credential: Option<serde_json::Value>,
    /// How the called tool's definition stands against its pin (`tool_pin`
    /// in conditions).
    pub tool_pin: ToolPin,
}

/// How a tool's definition stands against the one kya pinned for its server
/// (the `tool_pin` fact of conditions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolPin {
    /// The server's tools were never listed through kya, or this tool was
    /// never announced by it (or the call is not a `tools/call`).
    #[default]
    Unknown,
    /// Announced as pinned.
    Unchanged,
    /// Announced with another definition than the pinned one.
    Changed,
    /// Announced after the server's tools were pinned, and not pinned itself.
    New,
    /// Pinned, but the server's complete list no longer names it.
    Removed,
}

impl ToolPin {
    /// The name conditions compare with.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolPin::Unknown => "unknown",
            ToolPin::Unchanged => "unchanged",
            ToolPin::Changed => "changed",
            ToolPin::New => "new",
            ToolPin::Removed => "removed",
        }
    }

    /// Whether the definition differs from its pin (`tool_drift` applies).
    pub fn drifted(self) -> bool {
        matches!(self, ToolPin::Changed | ToolPin::New | ToolPin::Removed)
    }
}

impl CallContext {
    /// The arguments as conditions see them: absent (`null`) arguments are an
    /// empty object, as MCP defines `params.arguments` as optional, so
    /// `has(args.x)` is false rather than an error for a call without arguments.
    pub fn args_for_conditions(&self) -> &serde_json::Value {
        static EMPTY: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
        if self.args.is_null() {
            EMPTY.get_or_init(|| serde_json::Value::Object(Default::default()))
        } else {
            &self.args
        }
    }
}

/// The outcome of a policy decision. Its JSON is what `kya policy test` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// allow | hold | deny.
    pub verdict: Verdict,
    /// The deciding rule (or budget) id; None when the defaults decided.
    pub rule: Option<String>,
    /// Why, in words the agent's model and the audit reader can use.
    pub reason: String,
    /// Every matching rule and exceeded budget, in precedence-then-load order.
    pub matched: Vec<String>,
    /// Content hash of the policy that decided.
    pub policy_version: String,
    /// Evaluation errors (each one failed closed).
    pub errors: Vec<String>,
    /// How long a hold waits for an answer before it is denied.
    #[serde(serialize_with = "ser_duration")]
    pub hold_timeout: Duration,
    /// Who may approve a hold (the rule's approvers, else the agent's owner).
    pub approvers: Vec<String>,
    /// The agent the call was attributed to.
    pub agent: String,
    /// A hold released without asking, because a credential covers the call.
    pub released_by_credential: bool,
    /// With `--explain`: every rule and budget, and why it matched or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<Vec<Explanation>>,
}

/// One line of `--explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// Rule or budget id.
    pub id: String,
    /// `rule` or `budget`.
    pub kind: &'static str,
    /// Where it was written (`file:line`).
    pub at: String,
    /// Did it match (for budgets: is it exceeded)?
    pub matched: bool,
    /// Why (or why not).
    pub why: String,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// The seam between the interceptor and the policy: one call in, one decision out.
pub trait Decide: Send + Sync {
    /// Decide one call. Never fails: errors fail closed inside the decision.
    fn decide(&self, call: &CallContext) -> Decision;
}

#[cfg(test)]
mod tests;
