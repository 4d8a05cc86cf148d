//! Types shared across kya.
//!
//! * [`maps`]: `#[repr(C)]` mirrors of the BPF map keys and values declared in
//!   `kya-ebpf/src/kya.h`, pinned to the C header by layout tests.
//! * [`identity`]: who made a connection or a call (process identity).
//! * [`container`]: the container a process runs in, from its cgroup path.
//! * [`verdict`]: the outcome of a policy decision.

pub mod container;
pub mod identity;
pub mod maps;
pub mod verdict;

pub use container::{container_of_cgroup, ContainerIdentity};
pub use identity::ProcessIdentity;
pub use verdict::Verdict;
