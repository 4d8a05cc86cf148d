//! A credential presented to kya (`kya credential verify FILE`, the control
//! socket, the credential store): strict parsing and proof verification never
//! panic, and bytes not signed by the trusted key never verify.
#![no_main]

use kya_agent::credential::verify::verify_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trusted = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    assert!(verify_bytes(data, &trusted).is_err());
});
