//! kya: an execution-plane guard for AI agents on Linux.
//!
//! The library holds every component; the `kya` binary (`main.rs`) only parses
//! the command line and wires them together. See `../shared/DESIGN.md` in the
//! workspace for the architecture.

pub mod ca;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod intercept;
pub mod keys;
pub mod mcp;
pub mod procinfo;
pub mod tls;
