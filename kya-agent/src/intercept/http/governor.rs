//! The seam between the proxy and everything that decides: the policy engine,
//! approvals, credentials and the audit log live behind [`Governor`].
//!
//! The proxy only knows *what* a message is ([`CallFacts`]) and how to carry out a
//! [`Ruling`]; it never decides itself. Keeping the trait this small lets the proxy be
//! tested with a table and lets the daemon wire the real engine without the proxy
//! changing.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed, sendable future (what [`Governor::decide`] returns).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the proxy knows about one intercepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnFacts {
    /// The process that opened the connection.
    pub process: kya_common::ProcessIdentity,
    /// The original destination the agent connected to.
    pub dst: SocketAddr,
    /// The TLS SNI the agent sent, when the connection was TLS. Inside a
    /// followed tunnel: the target's name (which the SNI was checked to be),
    /// or its address when the target is one and the agent sent no SNI; the
    /// upstream certificate was verified for it either way.
    pub sni: Option<String>,
    /// Whether the agent leg is TLS (terminated by kya).
    pub tls: bool,
    /// A per-daemon connection number, for correlating log lines and audit records.
    pub conn_id: u64,
    /// For a followed `CONNECT` tunnel: its target (the CONNECT authority).
    /// `dst` is then the proxy the agent connected to, and the server's name
    /// is bound to this target.
    pub tunnel: Option<TunnelTarget>,
}

/// Where a followed `CONNECT` tunnel goes: the request's authority, its host
/// normalized (lower case, no brackets, no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelTarget {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for TunnelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The agent (MCP client) to the server: tool calls and other requests.
    ClientToServer,
    /// The server to the agent: `sampling/createMessage`, `elicitation/create`,
    /// notifications. They are decided too (one decision point).
    ServerToClient,
}

/// One JSON-RPC request or notification to decide.
#[derive(Debug, Clone)]
pub struct CallFacts {
    pub conn: Arc<ConnFacts>,
    /// The server: SNI, else `Host`, else the destination IP; port stripped, lowercased.
    pub server: String,
    pub direction: Direction,
    pub method: String,
    /// `params.name` of a `tools/call`.
    pub tool: Option<String>,
    /// `params.arguments` of a `tools/call`; `params` (or `{}`) otherwise.
    pub args: serde_json::Value,
    /// `None` for notifications.
    pub jsonrpc_id: Option<serde_json::Value>,
    /// `Mcp-Session-Id` of the HTTP request (or of the legacy SSE session).
    pub session: Option<String>,
    /// `MCP-Protocol-Version` of the HTTP request.
    pub protocol_version: Option<String>,
    /// `params._meta.progressToken`, where kya may send progress while holding.
    pub progress_token: Option<serde_json::Value>,
    /// `(index, size)` when the message is a member of a batch.
    pub batch: Option<(usize, usize)>,
}

/// The outcome of [`Governor::decide`].
pub enum Ruling {
    Allow {
        decision_id: String,
    },
    Deny {
        decision_id: String,
        rule: Option<String>,
        reason: String,
    },
    /// Wait for a human: `wait` resolves to the final ruling (`Allow` or `Deny`; a
    /// nested `Hold` is treated as a denial). The hold timeout lives inside the
    /// governor. Dropping `wait` tells the governor the agent gave up (disconnect or
    /// `notifications/cancelled`).
    Hold {
        decision_id: String,
        owner: String,
        binding: String,
        wait: BoxFuture<'static, Ruling>,
    },
}

impl std::fmt::Debug for Ruling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ruling::Allow { decision_id } => f
                .debug_struct("Allow")
                .field("decision_id", decision_id)
                .finish(),
            Ruling::Deny {
                decision_id,
                rule,
                reason,
            } => f
                .debug_struct("Deny")
                .field("decision_id", decision_id)
                .field("rule", rule)
                .field("reason", reason)
                .finish(),
            Ruling::Hold {
                decision_id,
                owner,
                binding,
                ..
            } => f
                .debug_struct("Hold")
                .field("decision_id", decision_id)
                .field("owner", owner)
                .field("binding", binding)
                .finish_non_exhaustive(),
        }
    }
}

/// Decides every message and records every decision.
pub trait Governor: Send + Sync + 'static {
    /// Decide one message. Every decision (allow, deny, the outcome of a hold) is
    /// recorded by the implementation; the proxy only enforces it.
    fn decide(&self, call: CallFacts) -> BoxFuture<'static, Ruling>;
    /// Whether this agent could ever call `tool` on `server`: `tools/list` results are
    /// filtered with it so the model never sees tools it may never call.
    fn may_call(&self, conn: &ConnFacts, server: &str, tool: &str) -> bool;
    /// The server answered a `tools/list` request of the agent with `result`
    /// (before any filtering). `complete`: the request asked for the first
    /// page, so an answer without `nextCursor` is the whole list. The
    /// governor records the definitions (pins them the first time); an
    /// error is a listing it cannot judge, which the proxy refuses whole
    /// (the agent gets a JSON-RPC error with the reason, and
    /// [`refused`](Self::refused) records it).
    fn tools_listed(
        &self,
        conn: &ConnFacts,
        server: &str,
        result: &serde_json::Value,
        complete: bool,
    ) -> Result<(), String> {
        let _ = (conn, server, result, complete);
        Ok(())
    }
    /// A protocol-level refusal the proxy made without a policy decision (unparseable,
    /// ambiguous, oversize, undecodable, slow body, Host/SNI mismatch...), so it is
    /// audited too.
    fn refused(&self, conn: &ConnFacts, reason: &str);
    /// [`refused`](Self::refused) for a refusal that ends the agent's
    /// connection: resolves once the record is written, so the caller resets
    /// the connection only then (a kill right after the reset cannot lose the
    /// record of what the agent saw).
    fn refused_on_record(&self, conn: &ConnFacts, reason: &str) -> BoxFuture<'static, ()> {
        self.refused(conn, reason);
        Box::pin(std::future::ready(()))
    }
    /// An allowed message was actually sent upstream (a batch with a denied
    /// member sends none). Budgets count only these.
    fn forwarded(&self, decision_id: &str) {
        let _ = decision_id;
    }
    /// An allowed message will not be sent (another member of its batch was
    /// refused): what was reserved for it is given back.
    fn not_forwarded(&self, decision_id: &str) {
        let _ = decision_id;
    }
}
