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

/// What a proof of decision says of one allowed message (see
/// [`Governor::prove`]): filled in by the governor only when the message's
/// server asked for proofs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grant {
    /// The registered agent the decision resolved the process to, and its owner.
    pub agent: String,
    pub owner: Option<String>,
    /// JSON-RPC method and, for `tools/call`, the tool.
    pub method: String,
    pub tool: Option<String>,
    /// SHA-256 (hex) of the JCS form of the arguments, when JCS represents them.
    pub args_sha256: Option<String>,
    /// The secured credential that released the call, when one did.
    pub credential: Option<Arc<serde_json::Value>>,
}

/// A request about to go upstream to a server that asked for proofs.
#[derive(Debug)]
pub struct ProofRequest<'a> {
    pub conn: &'a ConnFacts,
    pub server: &'a str,
    /// HTTP method and path (with query) as sent upstream.
    pub method: &'a str,
    pub path: &'a str,
    /// The body bytes as sent upstream.
    pub body: &'a [u8],
    /// Every decided message of the body, in order, with its decision id.
    pub calls: Vec<(&'a str, &'a Grant)>,
}

/// The outcome of [`Governor::decide`].
pub enum Ruling {
    /// `grant` is `Some` when the call's server asked for proofs.
    Allow {
        decision_id: String,
        grant: Option<Arc<Grant>>,
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
            Ruling::Allow { decision_id, grant } => f
                .debug_struct("Allow")
                .field("decision_id", decision_id)
                .field("grant", grant)
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
    /// The credentials kya holds for servers on the agents' behalf
    /// ([`crate::broker`]); `None` when none are configured.
    fn broker(&self) -> Option<Arc<crate::broker::Broker>> {
        None
    }

    /// Who a connection's process acts as, for per-agent credentials: its
    /// registered agent and owner.
    fn actor(&self, conn: &ConnFacts) -> crate::broker::oauth::Actor {
        crate::broker::oauth::Actor {
            agent: crate::policy::AgentInfo::unregistered().name,
            owner: None,
            uid: conn.process.uid,
            exe_sha256: None,
        }
    }

    /// An allowed message was actually sent upstream (a batch with a denied
    /// member sends none). Budgets count only these.
    fn forwarded(&self, decision_id: &str) {
        let _ = decision_id;
    }
    /// Whether `server` asked for a proof of decision with each request
    /// (`[proof] servers`).
    fn proof_wanted(&self, server: &str) -> bool {
        let _ = server;
        false
    }
    /// The `Kya-Decision` header value for a request to a server that asked
    /// for proofs. An error means the request must not be sent.
    fn prove(&self, request: &ProofRequest<'_>) -> Result<http::HeaderValue, String> {
        let _ = request;
        Err("this governor issues no proofs of decision".into())
    }
    /// An allowed message will not be sent (another member of its batch was
    /// refused): what was reserved for it is given back.
    fn not_forwarded(&self, decision_id: &str) {
        let _ = decision_id;
    }
}
