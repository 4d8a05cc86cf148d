//! The live response filter (what the proxy runs on every JSON body and SSE
//! event data a server sends): never panics, and what it passes on as JSON-RPC
//! filters again to itself (the filter is idempotent).
#![no_main]

use kya_agent::intercept::http::filter::{filter_server_data, Filtered};
use libfuzzer_sys::fuzz_target;

#[path = "common/judge.rs"]
mod judge;

fuzz_target!(|data: &[u8]| {
    let peer = judge::peer();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    if let Filtered::JsonRpc(Some(out)) = rt.block_on(filter_server_data(&peer, data)) {
        match rt.block_on(filter_server_data(&peer, &out)) {
            Filtered::JsonRpc(Some(again)) => assert_eq!(again, out),
            // Nothing left to change: delivered as it is.
            Filtered::Unchanged => {}
            other => panic!("a filtered body must filter to itself: {other:?}"),
        }
    }
});
