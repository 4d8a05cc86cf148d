//! How long kya's MCP parsing adds to one typical `tools/call` request, on the
//! path the proxy runs: content decoding, then `read_body` (strict parse and
//! JSON-RPC model), then the canonical bytes that are forwarded.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use kya_agent::intercept::http::inspect::read_body;
use kya_agent::intercept::http::Limits;
use kya_agent::mcp::encoding::decode_body;
use kya_agent::mcp::json::{parse, to_canonical_bytes, JsonLimits};

/// A tools/call as the Python and TypeScript SDKs send it.
const TOOLS_CALL: &[u8] = br#"{"jsonrpc":"2.0","id":17,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5000,"to":"bob","currency":"EUR","memo":"invoice 2026-11 \u00e9t\u00e9","tags":["billing","monthly"],"options":{"dry_run":false,"priority":3,"ratio":0.25}},"_meta":{"progressToken":"tok-17"}}}"#;

fn bench(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert(
        "mcp-session-id",
        HeaderValue::from_static("1868a90c-0a8e-4f7b-9d6a-000000000001"),
    );
    headers.insert(
        "mcp-protocol-version",
        HeaderValue::from_static("2025-06-18"),
    );
    headers.insert("mcp-method", HeaderValue::from_static("tools/call"));
    headers.insert("mcp-name", HeaderValue::from_static("transfer"));
    let limits = Limits::default();

    let mut g = c.benchmark_group("mcp_parse");
    g.throughput(Throughput::Bytes(TOOLS_CALL.len() as u64));
    let json_limits = limits.json();
    g.bench_function("request_body/tools_call", |b| {
        b.iter(|| {
            let decoded = decode_body(black_box(&headers), black_box(TOOLS_CALL), 1 << 20)
                .expect("identity encoding");
            let body = read_body(
                Some("application/json"),
                &decoded,
                &json_limits,
                limits.max_batch,
            )
            .expect("bench input is a JSON-RPC request");
            black_box(body)
        })
    });
    g.bench_function("json_parse/tools_call", |b| {
        b.iter(|| parse(black_box(TOOLS_CALL), &JsonLimits::default()))
    });
    let value = parse(TOOLS_CALL, &JsonLimits::default()).expect("bench input is valid");
    g.bench_function("canonical_bytes/tools_call", |b| {
        b.iter(|| to_canonical_bytes(black_box(&value)))
    });
    g.bench_function("serde_json_from_slice/tools_call (baseline)", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(TOOLS_CALL)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
