//! The live request path (what the proxy runs on every agent request body):
//! content decoding as the exchange does it, then `read_body` under a content
//! type picked by the first byte. Never panics; a JSON-RPC body's canonical
//! bytes (what is forwarded) read back to the same messages.
#![no_main]

use http::{HeaderMap, HeaderValue};
use kya_agent::intercept::http::inspect::{read_body, Body};
use kya_agent::intercept::http::Limits;
use kya_agent::mcp::{encoding, json};
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: &[Option<&str>] = &[
    None,
    Some("application/json"),
    Some("text/plain"),
    Some("application/json; charset=utf-8"),
    Some("application/json; charset=iso-8859-1"),
    Some("text/plain, application/json"),
    Some("application/octet-stream"),
];

const ENCODINGS: &[Option<&str>] = &[None, Some("gzip"), Some("deflate"), Some("br"), Some("identity")];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let ct = CONTENT_TYPES[usize::from(pick & 0x0f) % CONTENT_TYPES.len()];
    let ce = ENCODINGS[usize::from(pick >> 4) % ENCODINGS.len()];
    let limits = Limits::default();
    let mut headers = HeaderMap::new();
    if let Some(ce) = ce {
        headers.insert("content-encoding", HeaderValue::from_static(ce));
    }
    let max = 1 << 20;
    let Ok(decoded) = encoding::decode_body(&headers, body, max) else {
        return;
    };
    if let Ok(Body::JsonRpc { payload, value }) =
        read_body(ct, &decoded, &limits.json(), limits.max_batch)
    {
        let forwarded = json::to_canonical_bytes(&value);
        match read_body(Some("application/json"), &forwarded, &limits.json(), limits.max_batch) {
            Ok(Body::JsonRpc { payload: again, value: v2 }) => {
                assert_eq!(again.messages, payload.messages);
                assert_eq!(json::to_canonical_bytes(&v2), forwarded);
            }
            other => panic!("forwarded bytes must read back as JSON-RPC: {other:?}"),
        }
    }
});
