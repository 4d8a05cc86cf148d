//! Pinned tool definitions: what each server announced the first time kya
//! saw its `tools/list`, and whether what it announces now differs.
//!
//! * [`listing`]: a `tools/list` result read into canonical definitions
//!   (refused whole when kya cannot pin it: duplicate or non-string names,
//!   too many tools, too large a definition).
//! * [`store`]: the pins and the current definitions per server, persisted
//!   in the state directory.
//! * [`diff`]: what changed, field by field.
//! * [`handler`], [`command`]: `kya tools list|diff|accept` over the control
//!   socket.
//!
//! The decision path asks the store how the called tool stands (the
//! `tool_pin` fact policy conditions read) and applies `tool_drift` to a
//! call of a changed, new or removed tool.

pub mod command;
pub(crate) mod diff;
pub(crate) mod handler;
pub(crate) mod listing;
pub mod store;

pub use diff::{Change, FieldChange};
pub use store::{PinError, PinStore, ToolRow};
