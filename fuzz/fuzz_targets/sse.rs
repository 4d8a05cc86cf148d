//! The live SSE path (what the proxy's stream relay runs on a server's
//! `text/event-stream`): the bounded parser gives the same items however the
//! bytes are cut, and each event is judged as the relay judges it (`endpoint`
//! events resolved against the stream's URL, every other event's data through
//! the response filter) without panicking.
#![no_main]

#[path = "common/judge.rs"]
mod judge;

use kya_agent::intercept::http::filter::filter_server_data;
use kya_agent::mcp::sse::{parse_all, resolve_endpoint, SseItem, SseLimits, SseParser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let limits = SseLimits {
        max_event_bytes: 1024,
    };
    let whole = parse_all(body, limits);
    let cut = usize::from(cut).min(body.len());
    let mut p = SseParser::new(limits);
    let split = p
        .push(&body[..cut])
        .and_then(|mut a| {
            a.extend(p.push(&body[cut..])?);
            Ok(a)
        })
        .and_then(|items| p.finish().map(|()| items));
    assert_eq!(whole.is_ok(), split.is_ok());
    let (Ok(a), Ok(b)) = (&whole, &split) else {
        return;
    };
    assert_eq!(a, b);
    let base: http::Uri = "http://127.0.0.1:8000/sse".parse().expect("static url");
    let peer = judge::peer();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for item in a {
        let SseItem::Event(event) = item else {
            continue;
        };
        let data = event.data.as_deref().unwrap_or_default();
        if event.event_type() == "endpoint" {
            let _ = resolve_endpoint(&base, data.trim());
        } else {
            let _ = rt.block_on(filter_server_data(&peer, data.as_bytes()));
        }
    }
});
