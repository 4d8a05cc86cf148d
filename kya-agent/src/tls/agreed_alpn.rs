//! What each upstream agreed last time, so a new connection's two handshakes
//! can run at once.
//!
//! The agent's leg must speak the protocol the upstream agreed (ALPN), which
//! is known only once the upstream handshake is done. For a destination kya
//! has connected to before, the upstream almost always agrees the same thing
//! again for the same offer, so the agent's handshake starts with that answer
//! while the upstream's runs beside it. The connection is used only when both
//! are done and the upstream really agreed what was assumed (and its
//! certificate was verified); otherwise it is closed before any byte is read
//! from the agent, and the entry is forgotten so the next connection learns
//! again in order.

use crate::ca::LeafName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

/// Entries kept at most; when full, the memory starts over (every entry is
/// only a guess that saves time).
const CAPACITY: usize = 4096;

/// One upstream as the agent asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct AlpnKey {
    /// The network namespace the connection is made from (0: the host's).
    pub(crate) netns: u64,
    pub(crate) dst: SocketAddr,
    pub(crate) name: LeafName,
    /// The ALPN list offered upstream.
    pub(crate) offer: Vec<Vec<u8>>,
}

/// The protocol each upstream agreed (`None`: no ALPN) on its last handshake.
#[derive(Debug, Default)]
pub(crate) struct AgreedAlpn {
    agreed: Mutex<HashMap<AlpnKey, Option<Vec<u8>>>>,
}

impl AgreedAlpn {
    /// What `key` agreed last time, if kya has connected to it before.
    pub(crate) fn recall(&self, key: &AlpnKey) -> Option<Option<Vec<u8>>> {
        self.agreed.lock().ok()?.get(key).cloned()
    }

    /// Remember what `key` agreed on a completed, verified handshake.
    pub(crate) fn learn(&self, key: AlpnKey, agreed: Option<Vec<u8>>) {
        let Ok(mut map) = self.agreed.lock() else {
            return;
        };
        if map.len() >= CAPACITY && !map.contains_key(&key) {
            map.clear();
        }
        map.insert(key, agreed);
    }

    /// Forget `key`: its upstream failed or agreed something else.
    pub(crate) fn forget(&self, key: &AlpnKey) {
        if let Ok(mut map) = self.agreed.lock() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16, offer: &[&[u8]]) -> AlpnKey {
        AlpnKey {
            netns: 0,
            dst: SocketAddr::from(([127, 0, 0, 1], port)),
            name: LeafName::parse("mcp.example.com").unwrap(),
            offer: offer.iter().map(|p| p.to_vec()).collect(),
        }
    }

    #[test]
    fn recalls_what_was_learned_for_the_same_offer_only() {
        let m = AgreedAlpn::default();
        let k = key(443, &[b"h2", b"http/1.1"]);
        assert_eq!(m.recall(&k), None);
        m.learn(k.clone(), Some(b"h2".to_vec()));
        assert_eq!(m.recall(&k), Some(Some(b"h2".to_vec())));
        // Another offer, port or namespace is another upstream question.
        assert_eq!(m.recall(&key(443, &[b"http/1.1"])), None);
        assert_eq!(m.recall(&key(8443, &[b"h2", b"http/1.1"])), None);
        let other_ns = AlpnKey {
            netns: 7,
            ..k.clone()
        };
        assert_eq!(m.recall(&other_ns), None);
        // No ALPN agreed is an answer too.
        m.learn(other_ns.clone(), None);
        assert_eq!(m.recall(&other_ns), Some(None));
        m.forget(&k);
        assert_eq!(m.recall(&k), None);
    }

    #[test]
    fn stays_bounded() {
        let m = AgreedAlpn::default();
        for port in 0..(CAPACITY as u16 + 10) {
            m.learn(key(port, &[b"h2"]), Some(b"h2".to_vec()));
        }
        let len = m.agreed.lock().unwrap().len();
        assert!(len <= CAPACITY, "{len}");
        assert!(m.recall(&key(CAPACITY as u16 + 9, &[b"h2"])).is_some());
    }
}
