//! The tamper-evident audit log.
//!
//! * [`event`]: the decision event kya records ([`DecisionEvent`]).
//! * [`ocsf`]: its OCSF API Activity (6003) rendering for SIEMs.
//! * [`record`]: one JSON line per record, hash-chained to the previous one.
//! * [`merkle`]: RFC 6962 tree hashing and proofs over the record lines.
//! * [`checkpoint`]: C2SP tlog-checkpoint / signed-note tree heads (Ed25519).
//! * [`files`]: the live file, its rotated predecessors, the checkpoint file.
//! * [`writer`]: the append path ([`AuditLog`]): batching, fdatasync, rotation.
//! * [`verify`]: offline verification of a log set against its checkpoints.
//! * [`ends`]: whether every decision in a log ended (exactly one final record).
//! * [`command`]: `kya audit verify`.

pub mod checkpoint;
pub mod command;
pub(crate) mod ends;
pub mod event;
pub(crate) mod export;
pub mod files;
pub(crate) mod merkle;
pub(crate) mod ocsf;
pub(crate) mod record;
pub mod verify;
pub mod writer;

pub use event::{DecisionEvent, EventKind};
pub use writer::{
    AuditConfig, AuditError, AuditLog, Committed, Durability, Health, HealthState, Receipt,
};
