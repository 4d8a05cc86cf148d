//! Strict JSON: never panics; whatever it accepts, its canonical form parses back to
//! the same value, is a fixed point, and serde_json reads the same data from it.
#![no_main]

use kya_agent::mcp::json::{parse, to_canonical_bytes, JsonLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = JsonLimits::default();
    if let Ok(v) = parse(data, &limits) {
        let canon = to_canonical_bytes(&v);
        let back = parse(&canon, &limits).expect("canonical output must parse");
        assert_eq!(back, v);
        assert_eq!(to_canonical_bytes(&back), canon);
        let theirs: serde_json::Value =
            serde_json::from_slice(&canon).expect("serde_json must read canonical output");
        assert_eq!(theirs, v);
    }
});
