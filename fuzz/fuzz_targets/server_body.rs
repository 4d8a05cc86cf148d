//! The live response filter (what the proxy runs on every JSON body and SSE
//! event data a server sends): never panics, and what it passes on as JSON-RPC
//! filters again to itself (the filter is idempotent).
#![no_main]

use kya_agent::intercept::http::filter::{filter_server_data, Filtered, Peer};
use kya_agent::intercept::http::{BoxFuture, CallFacts, ConnFacts, Governor, Limits, Ruling};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

/// Allows everything except server→client requests named `sampling/*`, and
/// hides tools whose name starts with `secret`.
struct Judge;

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
            }
        };
        Box::pin(async move { ruling })
    }
    fn may_call(&self, _conn: &ConnFacts, _server: &str, tool: &str) -> bool {
        !tool.starts_with("secret")
    }
    fn refused(&self, _conn: &ConnFacts, _reason: &str) {}
}

fuzz_target!(|data: &[u8]| {
    let body = data;
    let peer = Peer {
        gov: Arc::new(Judge),
        conn: Arc::new(ConnFacts {
            process: Default::default(),
            dst: "127.0.0.1:443".parse().expect("static address"),
            sni: None,
            tls: false,
            conn_id: 1,
        }),
        server: "mcp.test".into(),
        session: None,
        protocol_version: None,
        limits: Limits::default(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    if let Filtered::JsonRpc(Some(out)) = rt.block_on(filter_server_data(&peer, body)) {
        match rt.block_on(filter_server_data(&peer, &out)) {
            Filtered::JsonRpc(Some(again)) => assert_eq!(again, out),
            // Nothing left to change: delivered as it is.
            Filtered::Unchanged => {}
            other => panic!("a filtered body must filter to itself: {other:?}"),
        }
    }
});
