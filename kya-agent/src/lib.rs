//! kya: an execution-plane guard for AI agents on Linux.
//!
//! The library holds every component; the `kya` binary (`main.rs`) only parses
//! the command line and wires them together. `ARCHITECTURE.md` at the root of
//! the repository follows one tool call through these modules.

pub mod agents;
pub mod allocator;
pub mod approvals;
pub mod audit;
pub mod bpf;
pub mod broker;
pub mod ca;
pub(crate) mod capdrop;
pub mod cgroup_glob;
pub mod cli;
pub mod config;
pub mod container;
pub(crate) mod container_image;
pub mod container_select;
pub(crate) mod control;
pub mod credential;
pub mod daemon;
pub mod decision;
pub(crate) mod exe_digest;
pub(crate) mod fsutil;
pub(crate) mod host;
pub(crate) mod image_ref;
pub(crate) mod image_select;
pub mod intercept;
pub mod keys;
pub mod kube;
pub mod mcp;
pub mod metrics;
pub mod netns;
pub mod pins;
pub mod policy;
pub(crate) mod privileges;
pub(crate) mod procinfo;
pub mod status;
#[cfg(test)]
mod test_child;
pub mod tls;
