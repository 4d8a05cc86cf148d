//! The control socket: how the `kya` client subcommands talk to a running daemon.
//!
//! A Unix stream socket at `STATE_DIR/kya.sock`. Each request is one JSON line;
//! the answer is one JSON line, or a stream of lines for subscriptions
//! (`kya events --follow`). The caller's identity is the kernel's word
//! (`SO_PEERCRED`), never anything the client says: approving a call as its
//! owner is decided on that uid.
//!
//! * [`protocol`]: the request and response shapes.
//! * [`server`]: the listener, bounded reads, dispatch to a [`server::Handler`].
//! * [`guard`]: the gate of every state-changing operation (the caller must
//!   not be, nor descend from, a process kya selects).
//! * [`peer`]: the peer process pinned by a pidfd (a reused pid is not the peer).
//! * [`client`]: the blocking client the CLI uses.

pub(crate) mod client;
pub(crate) mod guard;
pub(crate) mod peer;
pub(crate) mod protocol;
pub(crate) mod server;

/// File name of the socket inside the state directory.
pub(crate) const SOCKET_NAME: &str = "kya.sock";

/// Longest request line accepted (bytes); longer is an error, not a buffer.
pub(crate) const MAX_REQUEST: usize = 64 * 1024;
