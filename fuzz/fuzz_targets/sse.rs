//! SSE: chunking never changes the result, and inspected events never panic.
#![no_main]

use kya_agent::mcp::sse::{parse_all, SseLimits, SseParser};
use kya_agent::mcp::{inspect_event, Limits};
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
    if let (Ok(a), Ok(b)) = (&whole, &split) {
        assert_eq!(a, b);
        let url: http::Uri = "http://127.0.0.1:8000/sse".parse().expect("static url");
        for item in a {
            let _ = inspect_event(item, Some(&url), &Limits::default());
        }
    }
});
