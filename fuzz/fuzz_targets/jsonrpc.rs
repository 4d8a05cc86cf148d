//! JSON-RPC model over strict JSON, and the whole request pipeline: never panics;
//! what it forwards re-inspects to the same messages.
#![no_main]

use http::HeaderMap;
use kya_agent::mcp::jsonrpc::{parse_payload, Message};
use kya_agent::mcp::{inspect_request, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(v) = kya_agent::mcp::json::parse(data, &Default::default()) {
        if let Ok(p) = parse_payload(&v, limits.max_batch) {
            for m in &p.messages {
                if let Message::ToolCall(t) = m {
                    assert!(!t.name.is_empty());
                }
            }
        }
    }
    if let Ok(r) = inspect_request(data, &HeaderMap::new(), &limits) {
        let again = inspect_request(&r.forward, &HeaderMap::new(), &limits)
            .expect("forwarded bytes must inspect");
        assert_eq!(again.messages, r.messages);
        assert_eq!(again.forward, r.forward);
    }
});
