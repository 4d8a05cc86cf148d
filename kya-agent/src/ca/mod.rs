//! kya's local certificate authority: the trust anchor that lets the interceptor
//! terminate a selected agent's TLS and read its MCP traffic.
//!
//! One CA per daemon instance, stored in the state directory:
//! `ca.pem` (the certificate, 0644: agents' runtimes may need to read it) and
//! `ca-key.pem` (PKCS#8, 0600: whoever holds it can impersonate any server to
//! every process that trusts the CA).
//!
//! Choices, and why:
//! - **ECDSA P-256**: every TLS client stack (OpenSSL, BoringSSL, Node, Go,
//!   Java, rustls) accepts it; Ed25519 certificates are still refused by some.
//! - **No name constraints.** Interception must cover *every* host a selected
//!   agent reaches (shadow MCP servers included), so a permitted-subtree list
//!   cannot be written down in advance, and an excluded list would only be a
//!   deny-list of the names an attacker with the key would not need. The key's
//!   protection is the file mode, root ownership of the state dir, and one CA
//!   per instance (a leaked key does not cover other hosts' installs).
//! - **pathLenConstraint 0**: the CA is meant to sign leaves only. OpenSSL-based
//!   clients (curl, Python, Node) refuse a sub-CA under it; webpki (rustls)
//!   ignores a trust anchor's constraints, so for rustls clients this is no
//!   protection against a stolen key (tested both ways).
//! - **Validity two years**, back-dated one hour for clock skew; re-create with
//!   `kya ca init --force` (then `kya ca install` again).
//! - **The subject names the key**: `CN = kya local CA <fingerprint>` where the
//!   fingerprint is the first 16 hex digits of SHA-256 over the public key.
//!   That distinguishes instances in a trust store and lets [`LocalCa::load`]
//!   rebuild the issuer name from the key alone (rcgen cannot parse a
//!   certificate without extra dependencies); the rebuilt subject and public
//!   key are checked byte for byte against `ca.pem`, so a mismatched or foreign
//!   certificate is refused, never silently used.

pub mod command;
mod files;
mod mint;
pub mod trust_store;
pub(crate) mod validity;

pub use mint::{LeafName, LeafNameError, MintedLeaf, LEAF_BACKDATE, LEAF_VALIDITY};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate inside the state directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the state directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// How long a new CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(730);
/// How far a new CA's `notBefore` is set in the past (clients with a slow clock).
pub const CA_BACKDATE: Duration = Duration::hours(1);
/// Warn at load when the CA has less validity than this left.
pub const CA_EXPIRY_WARNING: Duration = Duration::days(30);
const CA_ORGANIZATION: &str = "kya";
const CA_CN_PREFIX: &str = "kya local CA ";

/// Errors creating, loading or using the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a CA already exists in {dir} (ca.pem / ca-key.pem); use --force to replace it")]
    AlreadyExists { dir: PathBuf },
    #[error("no CA in {dir}: run `kya ca init` first")]
    Missing { dir: PathBuf },
    #[error("{dir}: incomplete CA ({present} exists but {absent} does not); re-create it with `kya ca init --force`")]
    Incomplete {
        dir: PathBuf,
        present: &'static str,
        absent: &'static str,
    },
    #[error(
        "{path}: CA private key is readable by group or others (mode {mode:o}); refusing to use it"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: not a PEM ECDSA P-256 private key: {message}")]
    KeyFormat { path: PathBuf, message: String },
    #[error("{path}: not a PEM certificate: {message}")]
    CertFormat { path: PathBuf, message: String },
    #[error("{cert}: certificate does not belong to the key in {key} (or was not made by kya)")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: the CA expired at {not_after}; replace it with `kya ca init --force` and `kya ca install`")]
    Expired {
        path: PathBuf,
        not_after: OffsetDateTime,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot load the minted key into rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The loaded CA: signs leaf certificates for the names agents connect to.
pub struct LocalCa {
    key: KeyPair,
    /// An issuer object rebuilt from the key (same subject, same key id);
    /// rcgen needs it to sign. Not the bytes served or installed.
    issuer: rcgen::Certificate,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    fingerprint: String,
    not_after: OffsetDateTime,
    dir: PathBuf,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("fingerprint", &self.fingerprint)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Load the CA in `state_dir`, creating it first when there is none.
    /// An incomplete or unreadable CA is an error, never replaced silently.
    pub fn load_or_init(state_dir: &Path) -> Result<Self, CaError> {
        let _lock = files::lock(state_dir)?;
        match files::presence(state_dir)? {
            files::Presence::Both => Self::load_unlocked(state_dir),
            files::Presence::Neither => Self::create_unlocked(state_dir, false),
            files::Presence::Only { present, absent } => Err(CaError::Incomplete {
                dir: state_dir.to_path_buf(),
                present,
                absent,
            }),
        }
    }

    /// Create a new CA; refuses to replace an existing one (even half of one)
    /// unless `force`.
    pub fn init(state_dir: &Path, force: bool) -> Result<Self, CaError> {
        let _lock = files::lock(state_dir)?;
        if !force && files::presence(state_dir)? != files::Presence::Neither {
            return Err(CaError::AlreadyExists {
                dir: state_dir.to_path_buf(),
            });
        }
        Self::create_unlocked(state_dir, force)
    }

    /// Load an existing CA (never creates anything, not even the state dir).
    pub fn load(state_dir: &Path) -> Result<Self, CaError> {
        if !state_dir.is_dir() {
            return Err(CaError::Missing {
                dir: state_dir.to_path_buf(),
            });
        }
        let _lock = files::lock(state_dir)?;
        match files::presence(state_dir)? {
            files::Presence::Both => Self::load_unlocked(state_dir),
            files::Presence::Neither => Err(CaError::Missing {
                dir: state_dir.to_path_buf(),
            }),
            files::Presence::Only { present, absent } => Err(CaError::Incomplete {
                dir: state_dir.to_path_buf(),
                present,
                absent,
            }),
        }
    }

    /// The CA certificate, PEM (what `kya ca cert` prints and `kya ca install` installs).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER (for a test client's root store).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// First 16 hex digits of SHA-256 over the CA public key; also in the subject CN.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// When the CA certificate expires (leaves never outlive it).
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Path of `ca.pem`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// Mint a fresh leaf for `name` (see [`mint`](self::mint) for its profile).
    pub fn mint_leaf(&self, name: &LeafName) -> Result<MintedLeaf, CaError> {
        mint::mint(
            &self.issuer,
            &self.key,
            name,
            OffsetDateTime::now_utc(),
            Some(self.not_after),
        )
    }

    fn create_unlocked(state_dir: &Path, overwrite: bool) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = issuer_params(&key);
        params.not_before = now - CA_BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(mint::random_serial());
        let cert = params.self_signed(&key)?;
        files::write_pair(
            state_dir,
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            overwrite,
        )?;
        tracing::info!(dir = %state_dir.display(), fingerprint = %fingerprint(&key), "created kya local CA");
        Self::load_unlocked(state_dir)
    }

    fn load_unlocked(state_dir: &Path) -> Result<Self, CaError> {
        let key_path = state_dir.join(CA_KEY_FILE);
        let cert_path = state_dir.join(CA_CERT_FILE);
        let key_pem = files::read_private(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::KeyFormat {
            path: key_path.clone(),
            message: e.to_string(),
        })?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::KeyFormat {
                path: key_path,
                message: "the key is not ECDSA P-256".into(),
            });
        }
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(|source| CaError::Io {
            path: cert_path.clone(),
            source,
        })?;
        let cert_der = single_pem_cert(&cert_pem).map_err(|message| CaError::CertFormat {
            path: cert_path.clone(),
            message,
        })?;
        let issuer = issuer_params(&key).self_signed(&key)?;
        if !same_anchor(&cert_der, issuer.der()) {
            return Err(CaError::Mismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        let (_, not_after) =
            validity::validity(cert_der.as_ref()).ok_or_else(|| CaError::CertFormat {
                path: cert_path.clone(),
                message: "unreadable validity".into(),
            })?;
        let left = not_after - OffsetDateTime::now_utc();
        if left <= Duration::ZERO {
            return Err(CaError::Expired {
                path: cert_path,
                not_after,
            });
        }
        if left < CA_EXPIRY_WARNING {
            tracing::warn!(path = %cert_path.display(), %not_after, "kya's CA expires soon; replace it with `kya ca init --force` and `kya ca install`");
        }
        Ok(LocalCa {
            not_after,
            fingerprint: fingerprint(&key),
            key,
            issuer,
            cert_der,
            cert_pem,
            dir: state_dir.to_path_buf(),
        })
    }
}

/// The parameters every kya CA has, derived from its key alone (see module docs).
fn issuer_params(key: &KeyPair) -> CertificateParams {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    dn.push(
        DnType::CommonName,
        format!("{CA_CN_PREFIX}{}", fingerprint(key)),
    );
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn fingerprint(key: &KeyPair) -> String {
    let digest = Sha256::digest(key.public_key_der());
    hex::encode(&digest[..8])
}

/// Exactly one CERTIFICATE block, nothing else that is PEM.
fn single_pem_cert(pem: &str) -> Result<CertificateDer<'static>, String> {
    let mut reader = std::io::Cursor::new(pem.as_bytes());
    let mut found = None;
    for item in rustls_pemfile::read_all(&mut reader) {
        match item.map_err(|e| e.to_string())? {
            rustls_pemfile::Item::X509Certificate(der) if found.is_none() => found = Some(der),
            rustls_pemfile::Item::X509Certificate(_) => {
                return Err("more than one certificate".into())
            }
            _ => return Err("unexpected PEM block (expected only a CERTIFICATE)".into()),
        }
    }
    found.ok_or_else(|| "no CERTIFICATE block".into())
}

/// Whether two certificates have the same subject and public key, as webpki parses them.
fn same_anchor(a: &CertificateDer<'_>, b: &CertificateDer<'_>) -> bool {
    let parse = |der: &CertificateDer<'_>| {
        let mut store = rustls::RootCertStore::empty();
        store.add(der.clone().into_owned()).ok()?;
        store.roots.pop()
    };
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => {
            x.subject == y.subject && x.subject_public_key_info == y.subject_public_key_info
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
