//! What an OpenID Provider (or whoever sits between it and kya) sends for a
//! CIBA approval: a JWKS document and an ID token. Parsing and verification
//! never panic, and arbitrary bytes never verify.
#![no_main]

use kya_agent::approvals::ciba::id_token::{parse_jwks, verify_with, Expect};
use libfuzzer_sys::fuzz_target;

const EXPECT: Expect<'static> = Expect {
    issuer: "https://op.example",
    client_id: "kya",
    subject: "alice",
    auth_req_id: "req-1",
};

/// A real provider's key set shape (one RSA, one EC, one OKP key).
const JWKS: &str = r#"{"keys":[
 {"kty":"RSA","kid":"rsa-1","use":"sig","alg":"RS256","e":"AQAB","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"},
 {"kty":"EC","kid":"ec-1","use":"sig","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
 {"kty":"OKP","kid":"ed-1","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
]}"#;

fuzz_target!(|data: &[u8]| {
    // The key set itself, hostile.
    if let Ok(keys) = parse_jwks(data) {
        if let Ok(token) = std::str::from_utf8(data) {
            assert!(verify_with(&keys, token, &EXPECT).is_err());
        }
    }
    // A hostile token against real keys: never accepted without the private key.
    let keys = parse_jwks(JWKS.as_bytes()).expect("the fixed JWKS parses");
    if let Ok(token) = std::str::from_utf8(data) {
        assert!(verify_with(&keys, token, &EXPECT).is_err());
    }
});
