//! A `Kya-Decision` header value a server (or `kya credential verify`)
//! checks: decoding, strict parsing and proof verification never panic, and
//! a value not signed by the trusted key never verifies.
#![no_main]

use kya_agent::credential::header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trusted = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    let now = time::OffsetDateTime::now_utc();
    let value = String::from_utf8_lossy(data);
    assert!(header::verify(&value, &trusted, now, Some(data)).is_err());
});
