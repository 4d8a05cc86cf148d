//! Control-socket messages: one JSON object per line.

use super::guard::Unselected;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who is calling, as the kernel reports it (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Set by the server's gate for a state-changing operation: the caller
    /// is neither a selected process nor a descendant of one.
    pub clearance: Option<Unselected>,
}

impl Caller {
    /// The gate's proof, or the refusal a state-changing handler sends when
    /// it was reached without one (never, through the server).
    pub(crate) fn cleared(&self) -> Result<Unselected, Response> {
        self.clearance.ok_or_else(|| {
            Response::error(
                ErrorCode::Forbidden,
                "refused: this operation changes state and the caller was not checked",
            )
        })
    }
}

/// A request: an operation name and its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Request {
    /// e.g. `status`, `approvals.list`, `approvals.approve`, `events.follow`.
    pub op: String,
    /// Operation arguments (an object; absent means `{}`).
    #[serde(default)]
    pub args: Value,
}

impl Request {
    pub(crate) fn new(op: impl Into<String>, args: Value) -> Self {
        Self {
            op: op.into(),
            args,
        }
    }
}

/// One answer line. Streams send any number of `Item`s and end with `End`
/// (or the connection closes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Response {
    /// The operation succeeded.
    Ok { result: Value },
    /// The operation failed; `error` is for humans, `code` for programs.
    Error { code: ErrorCode, error: String },
    /// One element of a stream.
    Item { item: Value },
    /// The stream ended (e.g. the daemon is shutting down).
    End,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ErrorCode {
    /// The request was not valid JSON / not a request object / too long.
    BadRequest,
    /// No such operation.
    UnknownOp,
    /// The caller may not do this (e.g. not the call's owner).
    Forbidden,
    /// The thing named does not exist (approval id, agent).
    NotFound,
    /// The thing exists but is no longer in a state that allows this (answered, expired).
    Conflict,
    /// The daemon failed.
    Internal,
}

impl Response {
    pub(crate) fn ok(result: Value) -> Self {
        Response::Ok { result }
    }

    pub(crate) fn error(code: ErrorCode, error: impl Into<String>) -> Self {
        Response::Error {
            code,
            error: error.into(),
        }
    }
}
