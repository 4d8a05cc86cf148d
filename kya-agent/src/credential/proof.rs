//! W3C Data Integrity `DataIntegrityProof` with the `eddsa-jcs-2022`
//! cryptosuite (W3C Data Integrity EdDSA Cryptosuites v1.0, "eddsa-jcs-2022").
//!
//! * transformation: JCS of the unsecured document;
//! * proof configuration: JCS of the proof options, which carry a copy of the
//!   document's `@context` so the context is signed too;
//! * hashing: `SHA-256(canonical proof config) || SHA-256(canonical document)`
//!   (64 bytes, proof config first, as the spec orders them);
//! * serialization: Ed25519 over those 64 bytes, `proofValue` = base58btc multibase.
//!
//! Verification resolves the key from the `verificationMethod` (a did:key);
//! deciding whether that key is *trusted* is the caller's job.

use super::jcs::{self, JcsError};
use super::multikey::{self, MultikeyError};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The proof `type` this module produces and accepts.
pub(crate) const PROOF_TYPE: &str = "DataIntegrityProof";
/// The cryptosuite this module implements.
pub(crate) const CRYPTOSUITE: &str = "eddsa-jcs-2022";
/// The proof purpose of credentials (an issuer asserting claims).
pub(crate) const ASSERTION_METHOD: &str = "assertionMethod";

/// Why a proof could not be created or did not verify.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("the document is not a JSON object")]
    NotAnObject,
    #[error("the document has no proof")]
    NoProof,
    #[error("the document already has a proof")]
    AlreadySecured,
    #[error(
        "the document's proof is not a single JSON object (proof sets and chains are not accepted)"
    )]
    ProofNotObject,
    #[error("the proof has no {0:?} string")]
    MissingField(&'static str),
    #[error("proof {field:?} is {found:?}, expected {expected:?}")]
    WrongField {
        field: &'static str,
        found: String,
        expected: String,
    },
    #[error("proof \"created\" is not an RFC 3339 date-time: {0}")]
    Created(String),
    #[error("the document's @context does not start with the proof's @context")]
    ContextMismatch,
    #[error("proofValue: {0}")]
    ProofValue(MultikeyError),
    #[error("proofValue decodes to {0} bytes, an Ed25519 signature has 64")]
    SignatureLength(usize),
    #[error("verificationMethod: {0}")]
    Key(MultikeyError),
    #[error("canonicalization: {0}")]
    Jcs(#[from] JcsError),
    #[error("the Ed25519 signature does not verify")]
    BadSignature,
}

/// The caller-chosen parts of a proof.
#[derive(Debug, Clone)]
pub(crate) struct ProofOptions {
    /// did:key verification method URL of the signing key.
    pub verification_method: String,
    /// E.g. [`ASSERTION_METHOD`].
    pub proof_purpose: String,
    /// RFC 3339 creation time, if any.
    pub created: Option<String>,
}

/// The two hashes that are signed, kept apart so tests can compare each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HashData {
    pub proof_config_hash: [u8; 32],
    pub document_hash: [u8; 32],
}

impl HashData {
    /// `proofConfigHash || transformedDocumentHash`: the bytes Ed25519 signs.
    pub(crate) fn bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.proof_config_hash);
        out[32..].copy_from_slice(&self.document_hash);
        out
    }
}

/// Hash a proof configuration and an unsecured document (the suite's Hashing algorithm).
pub(crate) fn hash_data(proof_config: &Value, document: &Value) -> Result<HashData, ProofError> {
    let canonical_config = jcs::canonicalize(proof_config)?;
    let canonical_doc = jcs::canonicalize(document)?;
    Ok(HashData {
        proof_config_hash: Sha256::digest(canonical_config.as_bytes()).into(),
        document_hash: Sha256::digest(canonical_doc.as_bytes()).into(),
    })
}

/// The proof configuration for `document` (Create Proof and Proof Configuration algorithms):
/// the options, with the document's `@context` copied in when it has one.
pub(crate) fn proof_config(document: &Value, options: &ProofOptions) -> Result<Value, ProofError> {
    let doc = document.as_object().ok_or(ProofError::NotAnObject)?;
    if let Some(created) = &options.created {
        check_created(created)?;
    }
    let mut config = Map::new();
    config.insert("type".into(), PROOF_TYPE.into());
    config.insert("cryptosuite".into(), CRYPTOSUITE.into());
    if let Some(created) = &options.created {
        config.insert("created".into(), created.clone().into());
    }
    config.insert(
        "verificationMethod".into(),
        options.verification_method.clone().into(),
    );
    config.insert("proofPurpose".into(), options.proof_purpose.clone().into());
    if let Some(ctx) = doc.get("@context") {
        config.insert("@context".into(), ctx.clone());
    }
    Ok(Value::Object(config))
}

/// Create a proof for `unsecured` and return the secured document
/// (the document with a `proof` member).
pub(crate) fn create_proof(
    unsecured: &Value,
    options: &ProofOptions,
    key: &SigningKey,
) -> Result<Value, ProofError> {
    let doc = unsecured.as_object().ok_or(ProofError::NotAnObject)?;
    if doc.contains_key("proof") {
        // Proof sets / chains are not produced: the new proof would cover the
        // old one, and verification (which removes "proof") could never match.
        return Err(ProofError::AlreadySecured);
    }
    let config = proof_config(unsecured, options)?;
    let hashes = hash_data(&config, unsecured)?;
    let signature = key.sign(&hashes.bytes());
    let mut proof = match config {
        Value::Object(m) => m,
        _ => return Err(ProofError::NotAnObject),
    };
    proof.insert(
        "proofValue".into(),
        multikey::encode_base58btc(&signature.to_bytes()).into(),
    );
    let mut secured = doc.clone();
    secured.insert("proof".into(), Value::Object(proof));
    Ok(Value::Object(secured))
}

/// A proof that verified, and what it was over.
#[derive(Debug, Clone)]
pub(crate) struct VerifiedProof {
    /// The key that signed (resolved from the verification method).
    pub key: VerifyingKey,
    /// The document without its proof: what the signature covers.
    pub document: Value,
}

/// Verify the proof on `secured` (the suite's Verify Proof algorithm), requiring `expected_purpose`.
pub(crate) fn verify_proof(
    secured: &Value,
    expected_purpose: &str,
) -> Result<VerifiedProof, ProofError> {
    let mut doc = secured.as_object().ok_or(ProofError::NotAnObject)?.clone();
    let proof = match doc.remove("proof") {
        None => return Err(ProofError::NoProof),
        Some(Value::Object(p)) => p,
        Some(_) => return Err(ProofError::ProofNotObject),
    };
    let mut options = proof.clone();
    let proof_value = match options.remove("proofValue") {
        Some(Value::String(s)) => s,
        _ => return Err(ProofError::MissingField("proofValue")),
    };
    expect_field(&options, "type", PROOF_TYPE)?;
    expect_field(&options, "cryptosuite", CRYPTOSUITE)?;
    expect_field(&options, "proofPurpose", expected_purpose)?;
    // A `created` must be a valid time (nothing else depends on it).
    match options.get("created") {
        None => {}
        Some(Value::String(s)) => {
            check_created(s)?;
        }
        Some(_) => return Err(ProofError::MissingField("created")),
    }
    let verification_method = string_field(&options, "verificationMethod")?.to_owned();
    let key =
        multikey::resolve_verification_method(&verification_method).map_err(ProofError::Key)?;

    // Verify Proof: the proof's @context must be a prefix of the
    // document's, and it replaces the document's for hashing.
    if let Some(proof_ctx) = options.get("@context") {
        if !context_starts_with(doc.get("@context"), proof_ctx) {
            return Err(ProofError::ContextMismatch);
        }
        doc.insert("@context".into(), proof_ctx.clone());
    }

    let bytes = multikey::decode_base58btc(&proof_value).map_err(ProofError::ProofValue)?;
    let sig: [u8; 64] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| ProofError::SignatureLength(bytes.len()))?;
    let document = Value::Object(doc);
    let hashes = hash_data(&Value::Object(options), &document)?;
    key.verify(&hashes.bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| ProofError::BadSignature)?;
    Ok(VerifiedProof { key, document })
}

fn context_starts_with(doc_ctx: Option<&Value>, proof_ctx: &Value) -> bool {
    let as_list = |v: &Value| -> Vec<Value> {
        match v {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        }
    };
    let Some(doc_ctx) = doc_ctx else {
        return false;
    };
    let doc_list = as_list(doc_ctx);
    let proof_list = as_list(proof_ctx);
    !proof_list.is_empty() && doc_list.starts_with(&proof_list)
}

fn string_field<'a>(m: &'a Map<String, Value>, field: &'static str) -> Result<&'a str, ProofError> {
    m.get(field)
        .and_then(Value::as_str)
        .ok_or(ProofError::MissingField(field))
}

fn expect_field(
    m: &Map<String, Value>,
    field: &'static str,
    expected: &str,
) -> Result<(), ProofError> {
    let found = string_field(m, field)?;
    if found != expected {
        return Err(ProofError::WrongField {
            field,
            found: found.chars().take(120).collect(),
            expected: expected.to_owned(),
        });
    }
    Ok(())
}

fn check_created(text: &str) -> Result<OffsetDateTime, ProofError> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|e| ProofError::Created(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::jcs::{parse_strict, MAX_INPUT_BYTES};

    const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/eddsa-jcs-2022");

    fn vector_json(name: &str) -> Value {
        let bytes = std::fs::read(format!("{VECTORS}/{name}")).unwrap();
        parse_strict(&bytes, MAX_INPUT_BYTES).unwrap()
    }

    fn vector_text(name: &str) -> String {
        std::fs::read_to_string(format!("{VECTORS}/{name}"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn vector_key() -> SigningKey {
        let pair = vector_json("keyPair.json");
        let secret =
            multikey::decode_private(pair["privateKeyMultibase"].as_str().unwrap()).unwrap();
        let public = multikey::decode_public(pair["publicKeyMultibase"].as_str().unwrap()).unwrap();
        assert_eq!(secret.verifying_key(), public);
        secret
    }

    fn vector_options() -> ProofOptions {
        let config = vector_json("proofConfigJCS.json");
        ProofOptions {
            verification_method: config["verificationMethod"].as_str().unwrap().to_owned(),
            proof_purpose: config["proofPurpose"].as_str().unwrap().to_owned(),
            created: Some(config["created"].as_str().unwrap().to_owned()),
        }
    }

    #[test]
    fn official_vector_hashes_and_signature_reproduce_byte_for_byte() {
        let unsigned = vector_json("unsigned.json");
        let options = vector_options();
        let config = proof_config(&unsigned, &options).unwrap();
        assert_eq!(config, vector_json("proofConfigJCS.json"));
        let hashes = hash_data(&config, &unsigned).unwrap();
        assert_eq!(
            hex::encode(hashes.proof_config_hash),
            vector_text("proofHashJCS.txt")
        );
        assert_eq!(
            hex::encode(hashes.document_hash),
            vector_text("docHashJCS.txt")
        );
        let secured = create_proof(&unsigned, &options, &vector_key()).unwrap();
        let expected = vector_json("signedJCS.json");
        assert_eq!(
            secured["proof"]["proofValue"], expected["proof"]["proofValue"],
            "proofValue differs"
        );
        assert_eq!(secured, expected);
    }

    #[test]
    fn official_signed_vector_verifies() {
        let signed = vector_json("signedJCS.json");
        let verified = verify_proof(&signed, ASSERTION_METHOD).unwrap();
        assert_eq!(verified.key, vector_key().verifying_key());
        assert_eq!(verified.document, vector_json("unsigned.json"));
    }

    #[test]
    fn every_single_byte_change_of_the_signed_vector_fails() {
        let text = std::fs::read(format!("{VECTORS}/signedJCS.json")).unwrap();
        let mut accepted = Vec::new();
        for pos in 0..text.len() {
            let mut bytes = text.clone();
            // Flip a low bit: keeps most bytes printable, so many variants still parse.
            bytes[pos] ^= 0x01;
            let Ok(doc) = parse_strict(&bytes, MAX_INPUT_BYTES) else {
                continue;
            };
            if verify_proof(&doc, ASSERTION_METHOD).is_ok() && doc != vector_json("signedJCS.json")
            {
                accepted.push(pos);
            }
        }
        assert!(
            accepted.is_empty(),
            "tampered bytes accepted at {accepted:?}"
        );
    }

    #[test]
    fn whitespace_and_member_order_do_not_matter() {
        let signed = vector_json("signedJCS.json");
        let compact = jcs::canonicalize(&signed).unwrap();
        let reparsed = parse_strict(compact.as_bytes(), MAX_INPUT_BYTES).unwrap();
        verify_proof(&reparsed, ASSERTION_METHOD).unwrap();
    }

    #[test]
    fn proof_shape_errors_are_typed() {
        let signed = vector_json("signedJCS.json");
        let with = |f: &dyn Fn(&mut Map<String, Value>)| {
            let mut doc = signed.as_object().unwrap().clone();
            f(&mut doc);
            verify_proof(&Value::Object(doc), ASSERTION_METHOD)
        };
        let proof_with = |f: &dyn Fn(&mut Map<String, Value>)| {
            with(&|doc| {
                let p = doc.get_mut("proof").unwrap().as_object_mut().unwrap();
                f(p);
            })
        };
        assert!(matches!(
            with(&|d| {
                d.remove("proof");
            }),
            Err(ProofError::NoProof)
        ));
        assert!(matches!(
            with(&|d| {
                let p = d["proof"].clone();
                d.insert("proof".into(), Value::Array(vec![p]));
            }),
            Err(ProofError::ProofNotObject)
        ));
        assert!(matches!(
            proof_with(&|p| {
                p.insert("cryptosuite".into(), "eddsa-rdfc-2022".into());
            }),
            Err(ProofError::WrongField {
                field: "cryptosuite",
                ..
            })
        ));
        assert!(matches!(
            proof_with(&|p| {
                p.insert("type".into(), "Ed25519Signature2020".into());
            }),
            Err(ProofError::WrongField { field: "type", .. })
        ));
        assert!(matches!(
            proof_with(&|p| {
                p.insert("proofPurpose".into(), "authentication".into());
            }),
            Err(ProofError::WrongField {
                field: "proofPurpose",
                ..
            })
        ));
        assert!(matches!(
            proof_with(&|p| {
                p.insert("proofValue".into(), 5.into());
            }),
            Err(ProofError::MissingField("proofValue"))
        ));
        assert!(matches!(
            proof_with(&|p| {
                p.insert("proofValue".into(), "z2HnF".into());
            }),
            Err(ProofError::SignatureLength(_))
        ));
        assert!(matches!(
            proof_with(&|p| {
                p.insert("proofValue".into(), "u2HnF".into());
            }),
            Err(ProofError::ProofValue(MultikeyError::NotBase58btc))
        ));
        assert!(matches!(
            proof_with(&|p| {
                p.insert("created".into(), "yesterday".into());
            }),
            Err(ProofError::Created(_))
        ));
        assert!(matches!(
            proof_with(&|p| {
                p.insert("verificationMethod".into(), "did:web:x#k".into());
            }),
            Err(ProofError::Key(_))
        ));
        // The document's @context no longer starts with the proof's.
        assert!(matches!(
            with(&|d| {
                d.insert(
                    "@context".into(),
                    serde_json::json!(["https://www.w3.org/ns/credentials/v2"]),
                );
            }),
            Err(ProofError::ContextMismatch)
        ));
        assert!(matches!(
            with(&|d| {
                d.remove("@context");
            }),
            Err(ProofError::ContextMismatch)
        ));
        // A changed claim.
        assert!(matches!(
            with(&|d| {
                d.insert("issuer".into(), "https://evil.example".into());
            }),
            Err(ProofError::BadSignature)
        ));
        assert!(matches!(
            verify_proof(&Value::Null, ASSERTION_METHOD),
            Err(ProofError::NotAnObject)
        ));
        assert!(matches!(
            create_proof(&signed, &vector_options(), &vector_key()),
            Err(ProofError::AlreadySecured)
        ));
        assert!(matches!(
            create_proof(&Value::Array(vec![]), &vector_options(), &vector_key()),
            Err(ProofError::NotAnObject)
        ));
    }

    #[test]
    fn a_valid_signature_by_another_key_names_that_key() {
        // Verification succeeds against the key named in the proof; trusting it is the caller's call.
        let other = SigningKey::from_bytes(&[9; 32]);
        let options = ProofOptions {
            verification_method: multikey::verification_method(&other.verifying_key()),
            ..vector_options()
        };
        let secured = create_proof(&vector_json("unsigned.json"), &options, &other).unwrap();
        let v = verify_proof(&secured, ASSERTION_METHOD).unwrap();
        assert_eq!(v.key, other.verifying_key());
        // Claiming the vector key's method while signing with another key fails.
        let lying = create_proof(&vector_json("unsigned.json"), &vector_options(), &other).unwrap();
        assert!(matches!(
            verify_proof(&lying, ASSERTION_METHOD),
            Err(ProofError::BadSignature)
        ));
    }
}
