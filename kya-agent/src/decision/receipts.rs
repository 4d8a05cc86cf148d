//! Proofs of decision for servers that asked for them (`[proof] servers`):
//! what each allowed message's receipt says ([`Grant`]), and the signed
//! receipt a request to such a server carries ([`crate::credential::receipt`],
//! sent as the `Kya-Decision` header). One Ed25519 signature per request to
//! such a server; nothing for any other.

use crate::credential::action;
use crate::credential::header;
use crate::credential::receipt::{self, AgentBinding, ReceiptCall, ReceiptSubject, RequestBinding};
use crate::intercept::http::{CallFacts, Direction, Grant, ProofRequest};
use crate::policy::AgentInfo;
use ed25519_dalek::SigningKey;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// How long a receipt is valid by default (`[proof] ttl`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// Which servers get proofs, and for how long each is valid.
#[derive(Debug, Clone, Default)]
pub struct ProofSettings {
    /// Server names as policy sees them (lower case, no port, no trailing dot).
    pub servers: HashSet<String>,
    pub ttl: Duration,
}

impl ProofSettings {
    pub fn wants(&self, server: &str) -> bool {
        !self.servers.is_empty() && self.servers.contains(server)
    }

    /// What the receipt says of `call`, when its server asked for proofs;
    /// `credential` is the secured credential that released it.
    pub fn grant(
        &self,
        call: &CallFacts,
        agent: &AgentInfo,
        credential: Option<&Value>,
    ) -> Option<Arc<Grant>> {
        if call.direction != Direction::ClientToServer || !self.wants(&call.server) {
            return None;
        }
        Some(Arc::new(Grant {
            agent: agent.name.clone(),
            owner: agent.owner.clone(),
            method: call.method.clone(),
            tool: call.tool.clone(),
            args_sha256: action::args_digest(&call.args).ok(),
            credential: credential.map(|c| Arc::new(c.clone())),
        }))
    }

    /// Sign the receipt for `req`; `agent` is whom the process resolves to
    /// when no decided message names it (a body kya did not read as JSON-RPC).
    pub fn sign(
        &self,
        key: &SigningKey,
        host: &str,
        req: &ProofRequest<'_>,
        agent: impl FnOnce() -> AgentInfo,
        now: OffsetDateTime,
    ) -> Result<http::HeaderValue, String> {
        let (name, owner) = match req.calls.first() {
            Some((_, g)) => (g.agent.clone(), g.owner.clone()),
            None => {
                let a = agent();
                (a.name, a.owner)
            }
        };
        let p = &req.conn.process;
        let subject = ReceiptSubject {
            host: host.to_string(),
            server: req.server.to_string(),
            request: RequestBinding {
                method: req.method.to_string(),
                path: req.path.to_string(),
                body_sha256: hex::encode(Sha256::digest(req.body)),
            },
            agent: AgentBinding {
                name,
                owner,
                pid: p.pid,
                uid: p.uid,
                exe: (!p.exe.is_empty()).then(|| p.exe.clone()),
                cgroup: (!p.cgroup.is_empty()).then(|| p.cgroup.clone()),
            },
            calls: req
                .calls
                .iter()
                .map(|(decision, g)| ReceiptCall {
                    decision: decision.to_string(),
                    method: g.method.clone(),
                    tool: g.tool.clone(),
                    args_sha256: g.args_sha256.clone(),
                    credential: g.credential.as_deref().cloned(),
                })
                .collect(),
        };
        let secured = receipt::issue(key, subject, now, self.ttl).map_err(|e| e.to_string())?;
        let value = header::encode(&secured).map_err(|e| e.to_string())?;
        if value.len() > header::MAX_HEADER_LEN {
            return Err(format!(
                "the receipt is {} characters, more than a verifier accepts ({})",
                value.len(),
                header::MAX_HEADER_LEN
            ));
        }
        http::HeaderValue::from_str(&value).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::http::ConnFacts;
    use serde_json::json;

    fn settings() -> ProofSettings {
        ProofSettings {
            servers: ["mcp.test".to_string()].into_iter().collect(),
            ttl: DEFAULT_TTL,
        }
    }

    fn conn() -> Arc<ConnFacts> {
        Arc::new(ConnFacts {
            process: kya_common::ProcessIdentity {
                pid: 42,
                uid: 1001,
                exe: "/usr/bin/python3".into(),
                cgroup: "/agents/bot".into(),
                ..Default::default()
            },
            dst: "127.0.0.1:443".parse().expect("address"),
            sni: Some("mcp.test".into()),
            tls: true,
            conn_id: 1,
            tunnel: None,
        })
    }

    fn call(server: &str, direction: Direction) -> CallFacts {
        CallFacts {
            conn: conn(),
            server: server.into(),
            direction,
            method: "tools/call".into(),
            tool: Some("transfer".into()),
            args: json!({"amount": 5}),
            jsonrpc_id: Some(json!(1)),
            session: None,
            protocol_version: None,
            progress_token: None,
            batch: None,
        }
    }

    fn agent() -> AgentInfo {
        AgentInfo {
            name: "bot".into(),
            owner: Some("alice".into()),
            orphaned: false,
        }
    }

    #[test]
    fn only_servers_that_asked_get_grants() {
        let s = settings();
        assert!(s
            .grant(
                &call("other.test", Direction::ClientToServer),
                &agent(),
                None
            )
            .is_none());
        assert!(s
            .grant(&call("mcp.test", Direction::ServerToClient), &agent(), None)
            .is_none());
        assert!(ProofSettings::default()
            .grant(&call("mcp.test", Direction::ClientToServer), &agent(), None)
            .is_none());
        let g = s
            .grant(&call("mcp.test", Direction::ClientToServer), &agent(), None)
            .expect("grant");
        assert_eq!(
            g.args_sha256.as_deref(),
            Some(action::args_digest(&json!({"amount": 5})).unwrap().as_str())
        );
    }

    #[test]
    fn a_signed_receipt_verifies_against_the_body_sent() {
        let key = SigningKey::from_bytes(&[8; 32]);
        let s = settings();
        let g = s
            .grant(&call("mcp.test", Direction::ClientToServer), &agent(), None)
            .expect("grant");
        let conn = conn();
        let body = br#"{"id":1,"jsonrpc":"2.0"}"#;
        let req = ProofRequest {
            conn: &conn,
            server: "mcp.test",
            method: "POST",
            path: "/mcp",
            body,
            calls: vec![("dec_1", &g)],
        };
        let now = OffsetDateTime::now_utc();
        let value = s
            .sign(
                &key,
                "host-a",
                &req,
                || unreachable!("named by the call"),
                now,
            )
            .expect("signed");
        let v = header::verify(
            value.to_str().expect("ascii"),
            &key.verifying_key(),
            now,
            Some(body),
        )
        .expect("verifies");
        let subject = &v.receipt.subject;
        assert_eq!(subject.agent.name, "bot");
        assert_eq!(subject.agent.pid, 42);
        assert_eq!(subject.calls[0].decision, "dec_1");
        assert_eq!(subject.request.path, "/mcp");
        assert_eq!(
            (v.receipt.valid_until - v.receipt.valid_from).whole_seconds(),
            60
        );
        // A request with no decided message names the agent the process resolves to.
        let bare = ProofRequest {
            calls: Vec::new(),
            body: b"",
            ..req
        };
        let value = s.sign(&key, "host-a", &bare, agent, now).expect("signed");
        let v = header::verify(
            value.to_str().expect("ascii"),
            &key.verifying_key(),
            now,
            Some(b""),
        )
        .expect("verifies");
        assert!(v.receipt.subject.calls.is_empty());
        assert_eq!(v.receipt.subject.agent.owner.as_deref(), Some("alice"));
    }
}
