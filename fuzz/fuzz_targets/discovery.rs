//! A provider's discovery document, hostile: never panics, and anything
//! accepted names the configured issuer and usable endpoints.
#![no_main]

use kya_agent::approvals::ciba::discovery::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for mode in ["poll", "ping"] {
        if let Ok(e) = parse(data, "https://op.example", mode) {
            assert_eq!(e.issuer, "https://op.example");
            for url in [&e.backchannel_authentication, &e.token, &e.jwks_uri] {
                assert!(kya_agent::approvals::http::parse_url(url).is_ok());
            }
        }
    }
});
