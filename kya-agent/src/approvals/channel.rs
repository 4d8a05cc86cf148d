//! The seam between pending approvals and the backchannels that ask a human.
//!
//! When a held call becomes a pending approval, every configured
//! [`ApprovalChannel`] is told about it ([`Ask`]) and may start asking (a CIBA
//! authentication request, a signed webhook POST...). Answers come back
//! through [`Answers::answer`] (the pending approvals); the first answer wins and later ones are
//! refused, whichever channel carries them. A channel must not block: it
//! spawns its own task and stops when [`Ask::ended`] fires (the call was
//! answered, timed out, was cancelled, or its agent went away).

use super::answer::{Answer, ApprovalError};
use super::request::ActionRequest;
use std::sync::Arc;
use time::OffsetDateTime;
use tokio::sync::watch;

/// One pending approval, as a channel sees it.
#[derive(Clone)]
pub struct Ask {
    /// The approval id (`apr_...`).
    pub id: String,
    /// The code-bearing message shown to the approver and written to the audit log.
    pub binding_message: String,
    /// When the hold times out.
    pub expires: OffsetDateTime,
    /// What would be done, by whom, and who may approve it.
    pub request: ActionRequest,
    ended: watch::Receiver<()>,
}

impl Ask {
    pub(crate) fn new(
        id: String,
        binding_message: String,
        expires: OffsetDateTime,
        request: ActionRequest,
        ended: watch::Receiver<()>,
    ) -> Self {
        Self {
            id,
            binding_message,
            expires,
            request,
            ended,
        }
    }

    /// Resolves once the approval is no longer pending (answered by anyone,
    /// expired, cancelled, or the agent disconnected).
    pub async fn ended(&self) {
        let mut rx = self.ended.clone();
        // The sender lives in the pending entry: it is dropped when the entry
        // is removed, which is the only thing this waits for.
        while rx.changed().await.is_ok() {}
    }

    /// Seconds left before the hold times out (at least 1).
    pub fn seconds_left(&self) -> u64 {
        let left = (self.expires - OffsetDateTime::now_utc()).whole_seconds();
        left.max(1) as u64
    }
}

/// Where a channel's answers go: the pending approvals.
pub trait Answers: Send + Sync + 'static {
    /// Answer approval `id`. The first answer wins; a later one is refused.
    fn answer(&self, id: &str, answer: Answer) -> Result<(), ApprovalError>;
}

/// A backchannel that asks an owner to approve a held call.
pub trait ApprovalChannel: Send + Sync + 'static {
    /// The channel's name, as recorded in answers, metrics and the audit log.
    fn name(&self) -> &'static str;
    /// Start asking about `ask`. Must return at once (spawn the work); answers
    /// go to `approvals.answer(&ask.id, ...)`.
    fn ask(&self, ask: Ask, approvals: Arc<dyn Answers>);
}
