//! OpenID Provider discovery: `{issuer}/.well-known/openid-configuration`.
//!
//! The document must name exactly the configured issuer (OpenID Connect
//! Discovery 1.0, section 4.3: otherwise a provider could speak for another)
//! and the three endpoints CIBA needs. Each endpoint must itself be an
//! acceptable URL (https, or http on loopback).

use crate::approvals::http::{parse_url, HttpClient, HttpError};
use serde::Deserialize;

/// Errors discovering the provider.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("fetching the discovery document: {0}")]
    Http(#[from] HttpError),
    #[error("discovery document: HTTP status {0}")]
    Status(u16),
    #[error("discovery document is not valid JSON: {0}")]
    Json(String),
    #[error("discovery document names issuer {found:?}, expected {expected:?}")]
    IssuerMismatch { expected: String, found: String },
    #[error("the provider does not offer CIBA: discovery has no {0}")]
    Missing(&'static str),
    #[error(
        "the provider does not offer CIBA {0} mode (backchannel_token_delivery_modes_supported)"
    )]
    Mode(&'static str),
    #[error("discovery: {field}: {source}")]
    Endpoint {
        field: &'static str,
        source: HttpError,
    },
}

#[derive(Deserialize)]
struct Document {
    issuer: String,
    backchannel_authentication_endpoint: Option<String>,
    token_endpoint: Option<String>,
    jwks_uri: Option<String>,
    #[serde(default)]
    backchannel_token_delivery_modes_supported: Option<Vec<String>>,
    /// Advisory only (a warning): read leniently, never a reason to refuse.
    #[serde(default)]
    token_endpoint_auth_methods_supported: Option<serde_json::Value>,
}

/// The endpoints kya uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub issuer: String,
    pub backchannel_authentication: String,
    pub token: String,
    pub jwks_uri: String,
    /// `token_endpoint_auth_methods_supported`, when the provider says.
    pub auth_methods: Option<Vec<String>>,
}

impl Endpoints {
    /// False when the provider lists its client authentication methods and
    /// `method` is not among them (RFC 8414: absent means
    /// `client_secret_basic` only).
    pub fn supports_auth_method(&self, method: &str) -> bool {
        match &self.auth_methods {
            Some(list) => list.iter().any(|m| m == method),
            None => method == "client_secret_basic",
        }
    }
}

/// The discovery URL for `issuer` (a trailing `/` is not doubled).
pub fn well_known(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// Fetch and check the discovery document; `mode` is `poll` or `ping`.
pub async fn discover(
    http: &HttpClient,
    issuer: &str,
    mode: &'static str,
) -> Result<Endpoints, DiscoveryError> {
    let resp = http.get(&well_known(issuer)).await?;
    if !resp.status.is_success() {
        return Err(DiscoveryError::Status(resp.status.as_u16()));
    }
    parse(&resp.body, issuer, mode)
}

/// Check a discovery document (split out for tests).
pub fn parse(body: &[u8], issuer: &str, mode: &'static str) -> Result<Endpoints, DiscoveryError> {
    let doc: Document =
        serde_json::from_slice(body).map_err(|e| DiscoveryError::Json(e.to_string()))?;
    if doc.issuer != issuer {
        return Err(DiscoveryError::IssuerMismatch {
            expected: issuer.to_string(),
            found: doc.issuer.chars().take(300).collect(),
        });
    }
    if let Some(modes) = &doc.backchannel_token_delivery_modes_supported {
        if !modes.iter().any(|m| m == mode) {
            return Err(DiscoveryError::Mode(mode));
        }
    }
    let check = |field: &'static str, v: Option<String>| -> Result<String, DiscoveryError> {
        let v = v.ok_or(DiscoveryError::Missing(field))?;
        parse_url(&v).map_err(|source| DiscoveryError::Endpoint { field, source })?;
        Ok(v)
    };
    Ok(Endpoints {
        issuer: doc.issuer.clone(),
        backchannel_authentication: check(
            "backchannel_authentication_endpoint",
            doc.backchannel_authentication_endpoint,
        )?,
        token: check("token_endpoint", doc.token_endpoint)?,
        jwks_uri: check("jwks_uri", doc.jwks_uri)?,
        auth_methods: match doc.token_endpoint_auth_methods_supported {
            Some(serde_json::Value::Array(list)) => Some(
                list.iter()
                    .filter_map(|m| m.as_str().map(str::to_string))
                    .take(64)
                    .collect(),
            ),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "https://op.example.com";

    fn doc(extra: serde_json::Value) -> Vec<u8> {
        let mut d = serde_json::json!({
            "issuer": ISS,
            "backchannel_authentication_endpoint": "https://op.example.com/backchannel",
            "token_endpoint": "https://op.example.com/token",
            "jwks_uri": "https://op.example.com/jwks",
            "backchannel_token_delivery_modes_supported": ["poll", "ping"],
        });
        if let (Some(d), Some(e)) = (d.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                d.insert(k.clone(), v.clone());
            }
        }
        serde_json::to_vec(&d).unwrap()
    }

    #[test]
    fn a_good_document_gives_the_endpoints() {
        let e = parse(&doc(serde_json::json!({})), ISS, "poll").unwrap();
        assert_eq!(e.token, "https://op.example.com/token");
        assert_eq!(
            well_known("https://op.example.com/"),
            "https://op.example.com/.well-known/openid-configuration"
        );
    }

    #[test]
    fn client_authentication_methods_are_read() {
        let listed = parse(
            &doc(serde_json::json!({"token_endpoint_auth_methods_supported": ["private_key_jwt"]})),
            ISS,
            "poll",
        )
        .unwrap();
        assert!(listed.supports_auth_method("private_key_jwt"));
        assert!(!listed.supports_auth_method("client_secret_basic"));
        // Absent: RFC 8414's default, client_secret_basic only.
        let silent = parse(&doc(serde_json::json!({})), ISS, "poll").unwrap();
        assert!(silent.supports_auth_method("client_secret_basic"));
        assert!(!silent.supports_auth_method("private_key_jwt"));
        // Not a list: advisory only, so the document still serves (as if absent).
        let odd = parse(
            &doc(serde_json::json!({"token_endpoint_auth_methods_supported": "private_key_jwt"})),
            ISS,
            "poll",
        )
        .unwrap();
        assert_eq!(odd.auth_methods, None);
    }

    #[test]
    fn wrong_issuer_missing_endpoints_and_plain_http_are_refused() {
        assert!(matches!(
            parse(
                &doc(serde_json::json!({"issuer": "https://evil.example.com"})),
                ISS,
                "poll"
            ),
            Err(DiscoveryError::IssuerMismatch { .. })
        ));
        assert!(matches!(
            parse(
                &doc(serde_json::json!({"backchannel_authentication_endpoint": null})),
                ISS,
                "poll"
            ),
            Err(DiscoveryError::Missing(_))
        ));
        assert!(matches!(
            parse(
                &doc(serde_json::json!({"token_endpoint": "http://op.example.com/token"})),
                ISS,
                "poll"
            ),
            Err(DiscoveryError::Endpoint { .. })
        ));
        assert!(matches!(
            parse(
                &doc(serde_json::json!({"backchannel_token_delivery_modes_supported": ["poll"]})),
                ISS,
                "ping"
            ),
            Err(DiscoveryError::Mode("ping"))
        ));
        assert!(parse(b"<html>", ISS, "poll").is_err());
    }
}
