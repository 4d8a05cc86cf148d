//! What an approval is about.

use kya_common::ProcessIdentity;
use serde::{Deserialize, Serialize};

/// The exact action a held call would perform, and who asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRequest {
    /// Registered agent name (or `unregistered`).
    pub agent: String,
    /// The human who may approve (local user / CIBA login_hint).
    pub owner: String,
    /// Others allowed to answer (user names, or `group:NAME`).
    #[serde(default)]
    pub approvers: Vec<String>,
    pub process: ProcessIdentity,
    pub server: String,
    pub tool: String,
    /// The canonical arguments, exactly as they would be forwarded.
    pub args: serde_json::Value,
    /// SHA-256 (hex) of the canonical argument bytes.
    pub args_digest: String,
    pub policy_version: String,
    pub rule: Option<String>,
    pub reason: String,
    /// The decision id of the hold.
    pub decision_id: String,
    /// How the tool's definition differs from its pin, when it does
    /// (`kya tools diff`, each side cut short).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_change: Option<serde_json::Value>,
}

/// An approval as listed to users (`kya approvals list --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalView {
    pub id: String,
    pub agent: String,
    pub tool: String,
    pub server: String,
    pub owner: String,
    pub binding_message: String,
    /// RFC 3339.
    pub created: String,
    /// RFC 3339.
    pub expires: String,
    pub args_digest: String,
    pub rule: Option<String>,
    pub reason: String,
    pub pid: u32,
    pub decision_id: String,
    /// How the tool's definition differs from its pin, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_change: Option<serde_json::Value>,
}
