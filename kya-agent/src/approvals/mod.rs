//! Human-in-the-loop approvals: a held call becomes a pending approval that its
//! owner answers over a backchannel.
//!
//! * [`request`]: what is being approved (the exact action, its digest, the binding message).
//! * [`answer`]: an approver's answer, and the errors of answering.
//! * [`pending`]: the bounded set of pending approvals, waiting, answering, expiry.
//! * [`persist`]: the on-disk record, so a restart never silently loses a pending call.
//! * [`channel`]: the seam to backchannels (CIBA, webhook) that ask the owner.
//! * [`local`]: the local channel: `kya approvals` over the control socket, authorised by `SO_PEERCRED`.
//! * [`ciba`]: the OpenID CIBA channel: the owner's OpenID Provider asks them and signs the answer.
//! * [`webhook`]: signed notifications (Standard Webhooks, Ed25519) to a configured URL.
//! * [`http`]: the outbound HTTP client of the backchannels.
//! * [`command`]: the `kya approvals` CLI.

pub(crate) mod answer;
pub(crate) mod binding;
pub(crate) mod channel;
pub mod ciba;
pub mod command;
pub mod http;
pub(crate) mod local;
pub(crate) mod pending;
pub mod persist;
pub(crate) mod request;
pub(crate) mod webhook;

pub use answer::{Answer, ApprovalError};
pub use channel::{Answers, ApprovalChannel, Ask};
pub use pending::{ApprovalHandle, Approvals, Outcome};
pub use request::{ActionRequest, ApprovalView};
