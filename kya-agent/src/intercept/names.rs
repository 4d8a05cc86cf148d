//! Binding a server name to the address a connection really goes to.
//!
//! The agent chooses both the name it presents (TLS SNI, HTTP `Host`) and the
//! address it connects to. Where kya cannot authenticate the name itself (a
//! passthrough SNI is never checked against a certificate; a plaintext `Host`
//! or a `Host` under TLS without SNI is just a header), the name counts only if
//! the system resolver says it points at the original destination. Otherwise an
//! agent could present a trusted name and connect anywhere.
//!
//! Answers come from the system resolver (`getaddrinfo`: `/etc/hosts`, DNS,
//! whatever NSS is configured with). It reports no TTL, so an answer is kept for
//! a fixed time ([`NameResolver::ANSWER_LIFETIME`]); a destination missing from a
//! cached answer is looked up again once before the name is refused, so a
//! rotated DNS answer does not refuse a legitimate connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a name could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("resolving {name}: {source}")]
    Lookup {
        name: String,
        source: std::io::Error,
    },
    #[error("resolving {name}: no answer within {timeout:?}")]
    Timeout { name: String, timeout: Duration },
}

type Answer = (Instant, Arc<[IpAddr]>);

/// Cached forward lookups, shared by every connection of a daemon.
pub struct NameResolver {
    cache: Mutex<HashMap<String, Answer>>,
    /// Fixed answers instead of the system resolver (tests that must not send
    /// a DNS query anywhere); a name missing from it does not resolve.
    table: Option<HashMap<String, Vec<IpAddr>>>,
}

impl Default for NameResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl NameResolver {
    /// How long an answer is reused.
    pub const ANSWER_LIFETIME: Duration = Duration::from_secs(30);
    /// Longest wait for one lookup.
    pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
    /// Most names kept; the cache is emptied when it would grow past this.
    pub const MAX_NAMES: usize = 4096;

    pub fn new() -> Self {
        Self {
            cache: Mutex::new(HashMap::new()),
            table: None,
        }
    }

    /// A resolver that answers only from `table` (names in lower case).
    pub fn with_table(table: HashMap<String, Vec<IpAddr>>) -> Self {
        Self {
            cache: Mutex::new(HashMap::new()),
            table: Some(table),
        }
    }

    /// Does `name` resolve to `ip`? An IP literal is compared directly.
    pub async fn resolves_to(&self, name: &str, ip: IpAddr) -> Result<bool, ResolveError> {
        let ip = canonical(ip);
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(literal) = parse_ip_literal(&name) {
            return Ok(canonical(literal) == ip);
        }
        if let Some(addrs) = self.cached(&name) {
            if addrs.contains(&ip) {
                return Ok(true);
            }
        }
        let addrs = match &self.table {
            Some(table) => table
                .get(&name)
                .map(|a| a.iter().copied().map(canonical).collect::<Vec<_>>().into())
                .ok_or_else(|| ResolveError::Lookup {
                    name: name.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "not in the table"),
                })?,
            None => lookup(&name).await?,
        };
        let hit = addrs.contains(&ip);
        self.store(name, addrs);
        Ok(hit)
    }

    fn cached(&self, name: &str) -> Option<Arc<[IpAddr]>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(name)
            .filter(|(at, _)| at.elapsed() < Self::ANSWER_LIFETIME)
            .map(|(_, addrs)| addrs.clone())
    }

    fn store(&self, name: String, addrs: Arc<[IpAddr]>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= Self::MAX_NAMES && !cache.contains_key(&name) {
            cache.retain(|_, (at, _)| at.elapsed() < Self::ANSWER_LIFETIME);
            if cache.len() >= Self::MAX_NAMES {
                cache.clear();
            }
        }
        cache.insert(name, (Instant::now(), addrs));
    }
}

/// `[::1]`, `::1`, `127.0.0.1` as an address; anything else is a name.
fn parse_ip_literal(name: &str) -> Option<IpAddr> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    bare.parse().ok()
}

/// IPv4-mapped IPv6 addresses compare as IPv4 (the kernel hands kya either form).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

async fn lookup(name: &str) -> Result<Arc<[IpAddr]>, ResolveError> {
    let query = (name.to_string(), 0u16);
    let found = tokio::time::timeout(NameResolver::LOOKUP_TIMEOUT, tokio::net::lookup_host(query))
        .await
        .map_err(|_| ResolveError::Timeout {
            name: name.to_string(),
            timeout: NameResolver::LOOKUP_TIMEOUT,
        })?
        .map_err(|source| ResolveError::Lookup {
            name: name.to_string(),
            source,
        })?;
    let mut addrs: Vec<IpAddr> = found.map(|a| canonical(a.ip())).collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_compare_directly_and_mapped_addresses_match() {
        let r = NameResolver::new();
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(r.resolves_to("127.0.0.1", v4).await.unwrap());
        assert!(r.resolves_to("127.0.0.1", mapped).await.unwrap());
        assert!(r
            .resolves_to("[::1]", "::1".parse().unwrap())
            .await
            .unwrap());
        assert!(!r.resolves_to("127.0.0.2", v4).await.unwrap());
        assert!(!r.resolves_to("::1", v4).await.unwrap());
    }

    #[tokio::test]
    async fn localhost_resolves_to_loopback_and_not_elsewhere() {
        let r = NameResolver::new();
        assert!(r
            .resolves_to("localhost", "127.0.0.1".parse().unwrap())
            .await
            .unwrap());
        assert!(r
            .resolves_to("LocalHost.", "127.0.0.1".parse().unwrap())
            .await
            .unwrap());
        assert!(!r
            .resolves_to("localhost", "127.0.0.9".parse().unwrap())
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn table_answers_and_unknown_names_do_not_match() {
        let mut t = HashMap::new();
        t.insert("mcp.test".to_string(), vec!["127.0.0.2".parse().unwrap()]);
        let r = NameResolver::with_table(t);
        assert!(r
            .resolves_to("MCP.test", "::ffff:127.0.0.2".parse().unwrap())
            .await
            .unwrap());
        assert!(!r
            .resolves_to("mcp.test", "127.0.0.1".parse().unwrap())
            .await
            .unwrap());
        assert!(r
            .resolves_to("other.test", "127.0.0.2".parse().unwrap())
            .await
            .is_err());
    }
}
