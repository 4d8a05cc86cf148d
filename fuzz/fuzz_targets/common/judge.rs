//! The governor and peer the response-side fuzz targets judge with.

use kya_agent::intercept::http::filter::Peer;
use kya_agent::intercept::http::listed;
use kya_agent::mcp::jsonrpc;
use kya_agent::intercept::http::{BoxFuture, CallFacts, ConnFacts, Governor, Limits, Ruling};
use std::sync::Arc;

/// Allows everything except server→client requests named `sampling/*`, and
/// hides tools whose name starts with `secret`.
pub struct Judge;

impl Governor for Judge {
    fn decide(&self, call: CallFacts) -> BoxFuture<'static, Ruling> {
        let ruling = if call.method.starts_with("sampling/") {
            Ruling::Deny {
                decision_id: "dec_fuzz".into(),
                rule: Some("fuzz".into()),
                reason: "fuzz".into(),
            }
        } else {
            Ruling::Allow {
                decision_id: "dec_fuzz".into(),
                grant: None,
            }
        };
        Box::pin(async move { ruling })
    }
    fn may_call(&self, _conn: &ConnFacts, _server: &str, tool: &str) -> bool {
        !tool.starts_with("secret")
    }
    fn refused(&self, _conn: &ConnFacts, _reason: &str) {}
}

/// The session of [`peer`], in which ids `1` and `"1"` are `tools/list`
/// requests (their answers are filtered).
const SCOPE: &str = "fuzz";

/// A peer on a plaintext connection to `mcp.test`, judged by [`Judge`].
pub fn peer() -> Peer {
    let asked = serde_json::json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": "1", "method": "tools/list"},
    ]);
    if let Ok(p) = jsonrpc::parse_payload(&asked, 2) {
        listed::sent(SCOPE, &p.messages);
    }
    Peer {
        gov: Arc::new(Judge),
        conn: Arc::new(ConnFacts {
            process: Default::default(),
            dst: "127.0.0.1:443".parse().expect("static address"),
            sni: None,
            tls: false,
            conn_id: 1,
            tunnel: None,
        }),
        server: "mcp.test".into(),
        session: None,
        protocol_version: None,
        limits: Limits::default(),
        scope: SCOPE.into(),
    }
}
