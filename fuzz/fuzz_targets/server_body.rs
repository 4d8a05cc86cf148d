//! The live response filter (what the proxy runs on every JSON body and SSE
//! event data a server sends): never panics, and what it passes on as JSON-RPC
//! filters again to itself (the filter is idempotent).
#![no_main]

use kya_agent::intercept::http::filter::{filter_server_data, Filtered};
use libfuzzer_sys::fuzz_target;

#[path = "common/judge.rs"]
mod judge;

fuzz_target!(|data: &[u8]| {
    let Some((&flag, body)) = data.split_first() else {
        return;
    };
    let peer = judge::peer();
    let mcp = flag & 1 == 1;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    if let Filtered::JsonRpc(Some(out)) = rt.block_on(filter_server_data(&peer, body, mcp)) {
        match rt.block_on(filter_server_data(&peer, &out, mcp)) {
            Filtered::JsonRpc(Some(again)) => assert_eq!(again, out),
            other => panic!("a filtered body must filter to itself: {other:?}"),
        }
    }
});
