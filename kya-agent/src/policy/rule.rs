//! A compiled `[[rule]]` and where it was written: what the model holds and
//! the index keys.

use super::cel::Condition;
use super::glob::Glob;
use kya_common::Verdict;
use std::time::Duration;

/// Where a rule or budget was written, for explanations and duplicate errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// File name as given.
    pub file: String,
    /// 1-based line.
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A compiled `[[rule]]`.
#[derive(Debug)]
pub struct Rule {
    /// Unique id across all loaded files.
    pub id: String,
    /// Where it was written.
    pub origin: Origin,
    /// Agent-name glob (case-sensitive).
    pub agent: Option<Glob>,
    /// Owner glob (case-sensitive).
    pub owner: Option<Glob>,
    /// Server glob (case-insensitive, matched against the port-less server).
    pub server: Option<Glob>,
    /// Method glob (default `tools/call`).
    pub method: Glob,
    /// Tool-name glob (case-sensitive).
    pub tool: Option<Glob>,
    /// CEL condition.
    pub when: Option<Condition>,
    /// Verdict when it matches.
    pub verdict: Verdict,
    /// Reason given to the agent and the audit log.
    pub reason: Option<String>,
    /// Overrides the default hold timeout.
    pub hold_timeout: Option<Duration>,
    /// Who may approve (overrides the agent's owner).
    pub approvers: Vec<String>,
    /// Overrides `[defaults] tool_drift` when this rule decides the call.
    pub tool_drift: Option<Verdict>,
}
