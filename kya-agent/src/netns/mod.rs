//! Serving selected processes in other network namespaces (containers).
//!
//! A selected process in a namespace other than the host's is redirected by
//! the kernel side to a kya listener in *its* namespace, at the same loopback
//! address and port as the host's listener, and kya's connection to the
//! original destination is made from that namespace too (its routes and
//! addresses). One daemon serves the host and every namespace.
//!
//! * [`Namespace`]: a thread that joined a namespace and makes kya's sockets
//!   there.
//! * [`NetnsServer`]: finds the namespaces of the selected processes (at
//!   start, periodically, and at once when the kernel reports a refused
//!   connect from a namespace not served yet), opens their listeners, tells
//!   the kernel they are ready (`kya_netns`), and closes them when the last
//!   selected process of the namespace is gone. Until a namespace is ready its
//!   selected processes' guarded connects are refused by the kernel.

mod enter;
mod served;

pub use enter::{EnterError, Namespace};
pub use served::{NetnsServer, ServedNamespace};
