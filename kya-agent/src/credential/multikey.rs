//! Multibase (base58btc, the `z` prefix) and Ed25519 Multikey encodings, and
//! `did:key` identifiers built from them.
//!
//! Data Integrity proofs name their key as a `verificationMethod` URL; for a
//! self-contained key that is `did:key:z6Mk…#z6Mk…`, where `z6Mk…` is the
//! base58btc multibase of the multicodec prefix `0xed 0x01` followed by the 32
//! public-key bytes. Resolving it needs no network, which suits an offline guard.

#[cfg(test)]
use ed25519_dalek::SigningKey;
use ed25519_dalek::VerifyingKey;

/// Multicodec varint prefix of an Ed25519 public key (`ed25519-pub`, 0xed).
const ED25519_PUB_PREFIX: [u8; 2] = [0xed, 0x01];
/// Multicodec varint prefix of an Ed25519 private key (`ed25519-priv`, 0x1300).
#[cfg(test)]
const ED25519_PRIV_PREFIX: [u8; 2] = [0x80, 0x26];
/// Longest multibase string decoded: far above any key or signature, so
/// hostile input cannot make base58 decoding (quadratic) expensive.
const MAX_MULTIBASE_LEN: usize = 256;

/// Why a multibase value, Multikey or `did:key` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MultikeyError {
    #[error("multibase value must start with 'z' (base58btc)")]
    NotBase58btc,
    #[error("multibase value longer than {MAX_MULTIBASE_LEN} characters")]
    TooLong,
    #[error("invalid base58btc: {0}")]
    Base58(String),
    #[error("not an Ed25519 {0} Multikey (wrong multicodec prefix or length)")]
    NotEd25519(&'static str),
    #[error("invalid Ed25519 public key")]
    InvalidKey,
    #[error("verification method {0:?} is not a did:key URL whose fragment names its own key")]
    NotDidKey(String),
}

/// `z` + base58btc(bytes).
pub(crate) fn encode_base58btc(bytes: &[u8]) -> String {
    format!("z{}", bs58::encode(bytes).into_string())
}

/// Decode a `z`-prefixed base58btc multibase string.
pub(crate) fn decode_base58btc(text: &str) -> Result<Vec<u8>, MultikeyError> {
    if text.len() > MAX_MULTIBASE_LEN {
        return Err(MultikeyError::TooLong);
    }
    let body = text.strip_prefix('z').ok_or(MultikeyError::NotBase58btc)?;
    bs58::decode(body)
        .into_vec()
        .map_err(|e| MultikeyError::Base58(e.to_string()))
}

/// The `publicKeyMultibase` form of an Ed25519 public key (`z6Mk…`).
pub(crate) fn encode_public(key: &VerifyingKey) -> String {
    let mut bytes = ED25519_PUB_PREFIX.to_vec();
    bytes.extend_from_slice(key.as_bytes());
    encode_base58btc(&bytes)
}

/// Parse a `publicKeyMultibase` Ed25519 key.
pub(crate) fn decode_public(text: &str) -> Result<VerifyingKey, MultikeyError> {
    let bytes = decode_base58btc(text)?;
    let raw: [u8; 32] = bytes
        .strip_prefix(&ED25519_PUB_PREFIX[..])
        .and_then(|k| k.try_into().ok())
        .ok_or(MultikeyError::NotEd25519("public"))?;
    VerifyingKey::from_bytes(&raw).map_err(|_| MultikeyError::InvalidKey)
}

/// Parse a `secretKeyMultibase` / `privateKeyMultibase` Ed25519 seed (used by
/// the official test vectors).
#[cfg(test)]
pub(crate) fn decode_private(text: &str) -> Result<SigningKey, MultikeyError> {
    let bytes = decode_base58btc(text)?;
    let raw: [u8; 32] = bytes
        .strip_prefix(&ED25519_PRIV_PREFIX[..])
        .and_then(|k| k.try_into().ok())
        .ok_or(MultikeyError::NotEd25519("private"))?;
    Ok(SigningKey::from_bytes(&raw))
}

/// `did:key:z6Mk…` for a public key.
pub(crate) fn did_key(key: &VerifyingKey) -> String {
    format!("did:key:{}", encode_public(key))
}

/// `did:key:z6Mk…#z6Mk…`: the verification method URL of a did:key.
pub(crate) fn verification_method(key: &VerifyingKey) -> String {
    let mb = encode_public(key);
    format!("did:key:{mb}#{mb}")
}

/// Resolve a did:key verification method URL to its key. The fragment must
/// repeat the DID's own key (the only method a did:key document has).
pub(crate) fn resolve_verification_method(url: &str) -> Result<VerifyingKey, MultikeyError> {
    let not = || MultikeyError::NotDidKey(url.chars().take(120).collect());
    let rest = url.strip_prefix("did:key:").ok_or_else(not)?;
    let (did_part, fragment) = rest.split_once('#').ok_or_else(not)?;
    if did_part != fragment {
        return Err(not());
    }
    decode_public(did_part)
}

/// Parse a did:key DID (no fragment), e.g. a credential's `issuer`.
pub(crate) fn resolve_did(did: &str) -> Result<VerifyingKey, MultikeyError> {
    let mb = did
        .strip_prefix("did:key:")
        .ok_or_else(|| MultikeyError::NotDidKey(did.chars().take(120).collect()))?;
    decode_public(mb)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_PUBLIC: &str = "z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ2";
    const VECTOR_PRIVATE: &str = "z3u2en7t5LR2WtQH5PfFqMqwVHBeXouLzo6haApm8XHqvjxq";

    #[test]
    fn vector_key_pair_round_trips() {
        let secret = decode_private(VECTOR_PRIVATE).unwrap();
        let public = decode_public(VECTOR_PUBLIC).unwrap();
        assert_eq!(secret.verifying_key(), public);
        assert_eq!(encode_public(&public), VECTOR_PUBLIC);
        assert_eq!(
            verification_method(&public),
            format!("did:key:{VECTOR_PUBLIC}#{VECTOR_PUBLIC}")
        );
        assert_eq!(
            resolve_verification_method(&verification_method(&public)).unwrap(),
            public
        );
        assert_eq!(resolve_did(&did_key(&public)).unwrap(), public);
    }

    #[test]
    fn malformed_keys_and_urls_are_refused() {
        assert_eq!(
            decode_public(&VECTOR_PUBLIC[1..]).unwrap_err(),
            MultikeyError::NotBase58btc
        );
        assert!(matches!(
            decode_public("z0OIl"),
            Err(MultikeyError::Base58(_))
        ));
        // A private key where a public one is expected, and vice versa.
        assert_eq!(
            decode_public(VECTOR_PRIVATE).unwrap_err(),
            MultikeyError::NotEd25519("public")
        );
        assert_eq!(
            decode_private(VECTOR_PUBLIC).unwrap_err(),
            MultikeyError::NotEd25519("private")
        );
        assert_eq!(
            decode_public(&"z".repeat(1000)).unwrap_err(),
            MultikeyError::TooLong
        );
        assert!(decode_public("z").is_err());
        let other = SigningKey::from_bytes(&[7; 32]).verifying_key();
        let mixed = format!("did:key:{VECTOR_PUBLIC}#{}", encode_public(&other));
        assert!(matches!(
            resolve_verification_method(&mixed),
            Err(MultikeyError::NotDidKey(_))
        ));
        for bad in [
            "",
            "did:key:",
            "did:web:example.com#key-1",
            &format!("did:key:{VECTOR_PUBLIC}"),
            &format!("https://{VECTOR_PUBLIC}#{VECTOR_PUBLIC}"),
        ] {
            assert!(resolve_verification_method(bad).is_err(), "{bad}");
        }
    }
}
