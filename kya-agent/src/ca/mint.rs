//! Leaf certificates for the names agents connect to.
//!
//! Profile: ECDSA P-256 key (fresh per leaf), one SAN (the DNS name, or the IP
//! address when the client sent no SNI), CN = the same name, serverAuth EKU,
//! random 128-bit serial, valid [`LEAF_VALIDITY`] from [`LEAF_BACKDATE`] ago.
//! Short validity bounds what a leaked leaf key is worth; the back-dating
//! covers agents whose clock runs a little behind ours.

use super::CaError;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::CertifiedKey;
use std::net::IpAddr;
use std::sync::Arc;
use time::{Duration, OffsetDateTime};

/// How long a minted leaf is valid (counted from now, not from `notBefore`).
pub const LEAF_VALIDITY: Duration = Duration::hours(24);
/// How far a leaf's `notBefore` lies in the past.
pub const LEAF_BACKDATE: Duration = Duration::hours(1);

/// The name a leaf is minted for: a normalised DNS name or an IP address.
/// Also the leaf cache's key, so `Example.COM.` and `example.com` share a leaf.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LeafName {
    /// Lower-case, without a trailing dot.
    Dns(String),
    Ip(IpAddr),
}

/// A name no certificate can be minted for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a DNS name or IP address a certificate can name: {0:?}")]
pub struct LeafNameError(pub String);

impl LeafName {
    /// Parse an SNI value or a host string: an IP literal becomes [`LeafName::Ip`],
    /// anything else must be a valid DNS name (no wildcards: a client never asks for one).
    pub fn parse(text: &str) -> Result<Self, LeafNameError> {
        let err = || LeafNameError(text.chars().take(300).collect());
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(LeafName::Ip(ip));
        }
        let trimmed = text.strip_suffix('.').unwrap_or(text);
        let lower = trimmed.to_ascii_lowercase();
        match ServerName::try_from(lower.as_str()) {
            Ok(ServerName::DnsName(_)) if !lower.contains('*') => Ok(LeafName::Dns(lower)),
            _ => Err(err()),
        }
    }

    /// The name as rustls wants it for connecting upstream / verifying.
    /// Fails only for a hand-built `Dns` value that is not a DNS name.
    pub fn to_server_name(&self) -> Result<ServerName<'static>, LeafNameError> {
        match self {
            LeafName::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
            LeafName::Dns(name) => ServerName::try_from(name.clone())
                .map_err(|_| LeafNameError(name.chars().take(300).collect())),
        }
    }
}

impl From<&ServerName<'_>> for LeafName {
    fn from(name: &ServerName<'_>) -> Self {
        match name {
            ServerName::DnsName(d) => {
                let s = d.as_ref();
                LeafName::Dns(s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase())
            }
            ServerName::IpAddress(ip) => LeafName::Ip(IpAddr::from(*ip)),
            // ServerName is non_exhaustive; any future kind is named by its text form.
            other => LeafName::Dns(format!("{other:?}").to_ascii_lowercase()),
        }
    }
}

impl std::fmt::Display for LeafName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeafName::Dns(d) => f.write_str(d),
            LeafName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A minted leaf, ready for rustls, with its expiry (for cache refresh).
#[derive(Clone)]
pub struct MintedLeaf {
    pub certified: Arc<CertifiedKey>,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for MintedLeaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedLeaf")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A positive 128-bit serial (top bit clear so DER needs no sign byte games).
pub(super) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero byte, so the length is always 16
    SerialNumber::from_slice(&bytes)
}

pub(super) fn mint(
    issuer: &rcgen::Certificate,
    issuer_key: &KeyPair,
    name: &LeafName,
    now: OffsetDateTime,
    issuer_not_after: Option<OffsetDateTime>,
) -> Result<MintedLeaf, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let (san, cn) = match name {
        LeafName::Dns(d) => (
            SanType::DnsName(d.clone().try_into().map_err(CaError::Generate)?),
            d.clone(),
        ),
        LeafName::Ip(ip) => (SanType::IpAddress(*ip), ip.to_string()),
    };
    params.subject_alt_names = vec![san];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = now - LEAF_BACKDATE;
    // Never outlive the CA: a leaf past its issuer's expiry fails anyway,
    // and the cache's refresh logic should see the real end.
    params.not_after = match issuer_not_after {
        Some(end) => (now + LEAF_VALIDITY).min(end),
        None => now + LEAF_VALIDITY,
    };
    let not_after = params.not_after;
    let cert = params.signed_by(&key, issuer, issuer_key)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(&key_der)?;
    let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
    Ok(MintedLeaf {
        certified: Arc::new(CertifiedKey::new(chain, signing)),
        not_after,
    })
}
