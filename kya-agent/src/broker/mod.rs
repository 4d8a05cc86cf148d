//! Credential brokering: kya holds the credential an agent would otherwise
//! hold, and attaches it only to requests it forwards after a decision.
//!
//! Each `[[broker]]` entry names one server (as policy names it: the TLS SNI
//! the upstream certificate vouched for, or a `Host` that resolves to the
//! address connected to), optionally a port, request paths and agents, and
//! where the credential comes from: a root-only file ([`secret_file`]), or an
//! OAuth 2.0 token kya obtains itself ([`oauth`]).
//!
//! For every request to a brokered server:
//!
//! * whatever the agent sent in the entry's header (`Authorization` unless
//!   configured otherwise) is removed, on every request, decided or not;
//! * the credential is attached only to requests whose JSON-RPC messages were
//!   all decided and allowed (after a hold, once approved), and, when the
//!   entry lists `paths`, to a body-less `GET`/`DELETE` on one of them (the
//!   MCP session's event stream and its end, whose content kya judges);
//! * never over plaintext unless the entry says `plaintext = true`.
//!
//! A placeholder (a string the agent is configured with instead of the
//! secret) is replaced in the entry's header of the requests above; a request
//! to any other server that carries a placeholder anywhere in its target or
//! headers is refused, so an agent cannot have a placeholder resolved, or a
//! secret sent, anywhere but where it belongs.
//!
//! No secret appears in any log line, error, audit record, event, metric or
//! status output: errors name the server and the source, never the value.

pub mod oauth;
pub(crate) mod secret_file;

use std::path::PathBuf;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use serde::Deserialize;

use crate::approvals::http::HttpClient;
use oauth::{Actor, Grant, OAuthSettings, OAuthSource};
use secret_file::{SecretFile, SecretFileError};

/// Shortest placeholder accepted: a short one would turn up by chance.
pub(crate) const MIN_PLACEHOLDER: usize = 12;
/// How long kya waits for a token endpoint.
const TOKEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One `[[broker]]` entry of `kya.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// The server, as policy names it.
    pub server: String,
    /// Only connections to this destination port.
    pub port: Option<u16>,
    /// Only requests to these paths (exact, query ignored); also enables the
    /// credential on `GET`/`DELETE` of these paths.
    #[serde(default)]
    pub paths: Vec<String>,
    /// The header that carries the credential (default `Authorization`).
    pub header: Option<String>,
    /// Only these registered agents get the credential (default: every agent).
    #[serde(default)]
    pub agents: Vec<String>,
    /// What the agent is configured with instead of the secret.
    pub placeholder: Option<String>,
    /// Allow attaching the credential over plaintext HTTP.
    #[serde(default)]
    pub plaintext: bool,
    /// A static token (`Authorization: Bearer <token>`; the raw value in another header).
    pub token_file: Option<PathBuf>,
    /// An OAuth 2.0 token kya obtains.
    pub oauth: Option<OAuthSection>,
}

/// `[broker.oauth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthSection {
    pub token_url: String,
    pub client_id: String,
    pub client_secret_file: PathBuf,
    /// `client_credentials` (default) or `token_exchange`.
    pub grant: Option<Grant>,
    pub scope: Option<String>,
    /// RFC 8707 `resource`.
    pub resource: Option<String>,
    /// RFC 8693 `audience`.
    pub audience: Option<String>,
    /// Extra trust for the token endpoint's certificate.
    pub ca_file: Option<PathBuf>,
}

/// A configuration kya refuses to start with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BrokerConfigError {
    #[error("[[broker]] {server}: {why}")]
    Invalid { server: String, why: String },
    #[error("[[broker]] {server}: {source}")]
    Secret {
        server: String,
        #[source]
        source: SecretFileError,
    },
}

/// Why a request to a brokered server is not forwarded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BrokerError {
    #[error("a credential placeholder of kya's for {owner} was sent to {server}: refused")]
    Placeholder { owner: String, server: String },
    #[error(
        "kya holds a credential for {server} but the connection is not TLS: not sent in clear"
    )]
    Plaintext { server: String },
    #[error("the credential kya holds for {server} is unavailable ({why})")]
    Unavailable { server: String, why: String },
}

enum Source {
    Static(SecretFile),
    OAuth(Box<OAuthSource>),
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Static(f) => format!("file {}", f.path().display()),
            Source::OAuth(o) => format!(
                "oauth {}",
                match o.grant() {
                    Grant::ClientCredentials => "client_credentials",
                    Grant::TokenExchange => "token_exchange",
                }
            ),
        }
    }
}

struct Entry {
    server: String,
    port: Option<u16>,
    paths: Vec<String>,
    header: HeaderName,
    agents: Vec<String>,
    placeholder: Option<String>,
    plaintext: bool,
    source: Source,
}

impl Entry {
    /// The request goes to this entry's server (and port).
    fn covers(&self, server: &str, port: u16) -> bool {
        self.server == server && self.port.is_none_or(|p| p == port)
    }

    fn describe(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.server),
            None => self.server.clone(),
        }
    }
}

/// Where a request goes and who sends it.
#[derive(Debug)]
pub(crate) struct Target<'a> {
    pub server: &'a str,
    pub port: u16,
    pub method: &'a Method,
    pub path: &'a str,
    pub tls: bool,
    /// The request carries JSON-RPC messages that were all decided and allowed.
    pub decided: bool,
    /// The request has no body.
    pub bodyless: bool,
}

/// What [`Broker::apply`] did, for the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The server is not brokered.
    NotBrokered,
    /// Brokered, but this request gets no credential (its header was removed).
    Withheld,
    /// The credential was attached.
    Attached { source: String, secret: Secret },
}

/// The token kya attached to a request, kept to refuse an answer that hands
/// it back (a server echoing the request's headers would give the agent the
/// key it must not hold). Never printed: `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(Arc<str>);

impl Secret {
    /// Shorter tokens are not looked for in answers: they would match
    /// ordinary text.
    pub(crate) const MIN_SCANNED: usize = 8;

    /// Whether `data` carries the token: as its bytes, or in a JSON string
    /// once JSON's escapes are undone (`\/`, `\u0041`).
    pub(crate) fn found_in(&self, data: &[u8]) -> bool {
        let needle = self.0.as_bytes();
        if needle.len() < Self::MIN_SCANNED {
            return false;
        }
        if contains(data, needle) {
            return true;
        }
        // Only JSON has escapes to undo, and only if one is there.
        if !data.contains(&b'\\') {
            return false;
        }
        match serde_json::from_slice::<serde_json::Value>(data) {
            Ok(v) => any_string(&v, &|s| contains(s.as_bytes(), needle)),
            Err(_) => false,
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}

/// Whether any string of `v` (member names included) satisfies `f`.
fn any_string(v: &serde_json::Value, f: &dyn Fn(&str) -> bool) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter().any(|i| any_string(i, f)),
        Value::Object(m) => m.iter().any(|(k, i)| f(k) || any_string(i, f)),
        _ => false,
    }
}

/// Every configured entry.
pub struct Broker {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("servers", &self.servers())
            .finish()
    }
}

impl Broker {
    /// Build the entries; files are read now, so a bad one stops the start.
    /// `signer` is kya's key and the `iss` of its assertions (token exchange).
    pub(crate) fn new(
        sections: &[BrokerSection],
        signer: Option<(Arc<ed25519_dalek::SigningKey>, String)>,
    ) -> Result<Option<Broker>, BrokerConfigError> {
        if sections.is_empty() {
            return Ok(None);
        }
        let mut entries = Vec::with_capacity(sections.len());
        for s in sections {
            let invalid = |why: String| BrokerConfigError::Invalid {
                server: s.server.clone(),
                why,
            };
            let server = s.server.trim().trim_end_matches('.').to_ascii_lowercase();
            if server.is_empty() || server.contains(['/', ' ', '*']) {
                return Err(invalid("server must be a host name or address".into()));
            }
            let header = match &s.header {
                None => http::header::AUTHORIZATION,
                Some(h) => HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| invalid(format!("header {h:?} is not a header name")))?,
            };
            if crate::intercept::http::exchange::is_hop_by_hop(header.as_str())
                || header == http::header::HOST
                || header.as_str().starts_with("mcp-")
            {
                return Err(invalid(format!(
                    "header {header} cannot carry a credential"
                )));
            }
            for p in &s.paths {
                if !p.starts_with('/') || p.contains('?') {
                    return Err(invalid(format!(
                        "path {p:?} must start with / and carry no query"
                    )));
                }
            }
            if let Some(ph) = &s.placeholder {
                if ph.len() < MIN_PLACEHOLDER || !ph.bytes().all(|b| (0x21..0x7f).contains(&b)) {
                    return Err(invalid(format!(
                        "placeholder must be at least {MIN_PLACEHOLDER} printable ASCII characters without spaces"
                    )));
                }
                if entries.iter().any(|e: &Entry| {
                    e.placeholder
                        .as_deref()
                        .is_some_and(|o| o.contains(ph.as_str()) || ph.contains(o))
                }) {
                    return Err(invalid("placeholder overlaps another entry's".into()));
                }
            }
            let secret = |p: &PathBuf| {
                SecretFile::open(p).map_err(|source| BrokerConfigError::Secret {
                    server: s.server.clone(),
                    source,
                })
            };
            let source = match (&s.token_file, &s.oauth) {
                (Some(f), None) => Source::Static(secret(f)?),
                (None, Some(o)) => {
                    let grant = o.grant.unwrap_or(Grant::ClientCredentials);
                    let http = HttpClient::new(o.ca_file.as_deref(), TOKEN_TIMEOUT)
                        .map_err(|e| invalid(format!("oauth: {e}")))?;
                    crate::approvals::http::parse_url(&o.token_url)
                        .map_err(|e| invalid(format!("oauth.token_url: {e}")))?;
                    if grant == Grant::TokenExchange && signer.is_none() {
                        return Err(invalid("token_exchange needs kya's signing key".into()));
                    }
                    Source::OAuth(Box::new(OAuthSource::new(OAuthSettings {
                        token_url: o.token_url.clone(),
                        client_id: o.client_id.clone(),
                        secret: secret(&o.client_secret_file)?,
                        grant,
                        scope: o.scope.clone(),
                        resource: o.resource.clone(),
                        audience: o.audience.clone(),
                        http,
                        signer: signer.clone(),
                    })))
                }
                _ => {
                    return Err(invalid(
                        "exactly one of token_file and [broker.oauth] is required".into(),
                    ))
                }
            };
            entries.push(Entry {
                server,
                port: s.port,
                paths: s.paths.clone(),
                header,
                agents: s.agents.clone(),
                placeholder: s.placeholder.clone(),
                plaintext: s.plaintext,
                source,
            });
        }
        Ok(Some(Broker { entries }))
    }

    /// The brokered servers and their sources (for `kya status`; no secret).
    pub(crate) fn servers(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|e| (e.describe(), e.source.describe()))
            .collect()
    }

    /// Refuse a request to `server`:`port` that carries another server's
    /// placeholder in its target or any header.
    pub(crate) fn check_placeholders(
        &self,
        server: &str,
        port: u16,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Result<(), BrokerError> {
        for e in &self.entries {
            let Some(ph) = e.placeholder.as_deref() else {
                continue;
            };
            if self
                .entries
                .iter()
                .any(|o| o.placeholder.as_deref() == Some(ph) && o.covers(server, port))
            {
                continue;
            }
            let needle = ph.as_bytes();
            let found = contains(uri.to_string().as_bytes(), needle)
                || headers.iter().any(|(k, v)| {
                    contains(k.as_str().as_bytes(), needle) || contains(v.as_bytes(), needle)
                });
            if found {
                return Err(BrokerError::Placeholder {
                    owner: e.describe(),
                    server: format!("{server}:{port}"),
                });
            }
        }
        Ok(())
    }

    /// Remove what the agent sent in a brokered server's credential header,
    /// and attach kya's credential when `target` may carry it.
    pub(crate) async fn apply(
        &self,
        target: &Target<'_>,
        agent: &Actor,
        headers: &mut HeaderMap,
    ) -> Result<Applied, BrokerError> {
        let mut brokered = false;
        for e in self
            .entries
            .iter()
            .filter(|e| e.covers(target.server, target.port))
        {
            brokered = true;
            headers.remove(&e.header);
        }
        if !brokered {
            return Ok(Applied::NotBrokered);
        }
        let entry = self.entries.iter().find(|e| {
            e.covers(target.server, target.port)
                && (e.agents.is_empty() || e.agents.iter().any(|a| a == &agent.agent))
                && (e.paths.is_empty() || e.paths.iter().any(|p| p == target.path))
        });
        let Some(entry) = entry else {
            return Ok(Applied::Withheld);
        };
        let stream_or_end = target.bodyless
            && !entry.paths.is_empty()
            && (target.method == Method::GET || target.method == Method::DELETE);
        if !(target.decided || stream_or_end) {
            return Ok(Applied::Withheld);
        }
        if !target.tls && !entry.plaintext {
            return Err(BrokerError::Plaintext {
                server: entry.describe(),
            });
        }
        let unavailable = |why: String| BrokerError::Unavailable {
            server: entry.describe(),
            why,
        };
        let (token, value) = match &entry.source {
            Source::Static(f) => {
                let token = f.value().map_err(|e| unavailable(e.to_string()))?;
                let value = if entry.header == http::header::AUTHORIZATION {
                    format!("Bearer {token}")
                } else {
                    token.clone()
                };
                (token, value)
            }
            Source::OAuth(o) => {
                let token = o
                    .token(agent)
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                let value = format!("Bearer {token}");
                (token, value)
            }
        };
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| unavailable("not a valid header value".into()))?;
        value.set_sensitive(true);
        headers.insert(entry.header.clone(), value);
        Ok(Applied::Attached {
            source: entry.source.describe(),
            secret: Secret(token.into()),
        })
    }

    /// The server answered 401 to a request that carried an OAuth token kya
    /// obtained: the token is forgotten, so the next request gets a new one.
    pub(crate) async fn rejected(&self, target: &Target<'_>, agent: &Actor) {
        for e in self
            .entries
            .iter()
            .filter(|e| e.covers(target.server, target.port))
        {
            if let Source::OAuth(o) = &e.source {
                o.forget(agent).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
