//! What an approver answers, and why an answer or an approval is refused:
//! shared by the pending set and the channels that carry answers to it.

use super::persist::PersistError;
use serde::{Deserialize, Serialize};

/// An approver's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub approve: bool,
    /// Who answered (local user name, CIBA subject).
    pub approver: String,
    /// Which channel carried it (`local`, `ciba`, ...).
    pub channel: String,
    pub reason: Option<String>,
    /// Channel evidence (e.g. the CIBA ID token digest).
    pub evidence: Option<serde_json::Value>,
}

/// Errors of the approval set.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("too many calls are waiting for approval ({0}); denied to keep the daemon bounded")]
    TooMany(usize),
    #[error("no pending approval {0}")]
    NotFound(String),
    #[error("approval {0} was already answered")]
    AlreadyAnswered(String),
    #[error("cannot persist approvals: {0}")]
    Persist(#[from] PersistError),
}
