//! A bounded LRU cache of minted leaf certificates, keyed by SNI (or IP),
//! shared by every connection of the interceptor.
//!
//! Why cache: minting is a key generation plus a signature (see the `tls`
//! bench), paid on the agent's first-connection latency; agents reconnect to
//! the same few servers. Why bounded: a selected process could otherwise make
//! kya mint and keep a certificate for every name it can invent.
//!
//! Expiry-aware: an entry within [`LeafCache::refresh_margin`] of its
//! `notAfter` is re-minted on the next lookup, so a served leaf always has at
//! least that much validity left.
//!
//! Minting happens outside the lock (other connections are not stalled
//! behind a signature); two simultaneous misses for one name may both mint,
//! and the later one stays cached. Both leaves are valid.

use crate::ca::{CaError, LeafName, LocalCa, MintedLeaf};
use rustls::sign::CertifiedKey;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use time::{Duration, OffsetDateTime};

/// Default number of cached leaves.
pub const DEFAULT_CAPACITY: NonZeroUsize = match NonZeroUsize::new(1024) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};
/// Default: re-mint a leaf with less than this validity left.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::hours(1);

/// Something that mints leaves (the CA; a counting fake in tests).
pub trait MintLeaf: Send + Sync {
    fn mint(&self, name: &LeafName) -> Result<MintedLeaf, CaError>;
}

impl MintLeaf for LocalCa {
    fn mint(&self, name: &LeafName) -> Result<MintedLeaf, CaError> {
        self.mint_leaf(name)
    }
}

/// Counters, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Misses caused by an entry close to expiry (also counted in `misses`).
    pub refreshes: u64,
    pub evictions: u64,
}

struct Entry {
    leaf: MintedLeaf,
    tick: u64,
}

struct Lru {
    map: HashMap<LeafName, Entry>,
    /// tick → name; the smallest tick is the least recently used.
    order: BTreeMap<u64, LeafName>,
    next_tick: u64,
    stats: CacheStats,
}

/// The shared cache. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct LeafCache {
    minter: Arc<dyn MintLeaf>,
    lru: Arc<Mutex<Lru>>,
    capacity: NonZeroUsize,
    refresh_margin: Duration,
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    pub fn new(minter: Arc<dyn MintLeaf>, capacity: NonZeroUsize) -> Self {
        Self::with_refresh_margin(minter, capacity, DEFAULT_REFRESH_MARGIN)
    }

    pub fn with_refresh_margin(
        minter: Arc<dyn MintLeaf>,
        capacity: NonZeroUsize,
        refresh_margin: Duration,
    ) -> Self {
        LeafCache {
            minter,
            lru: Arc::new(Mutex::new(Lru {
                map: HashMap::new(),
                order: BTreeMap::new(),
                next_tick: 0,
                stats: CacheStats::default(),
            })),
            capacity,
            refresh_margin,
        }
    }

    pub fn capacity(&self) -> NonZeroUsize {
        self.capacity
    }

    pub fn refresh_margin(&self) -> Duration {
        self.refresh_margin
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> CacheStats {
        self.lock().stats
    }

    /// The cached leaf for `name`, minting (and caching) one on a miss or
    /// when the cached one is close to expiry.
    pub fn get_or_mint(&self, name: &LeafName) -> Result<Arc<CertifiedKey>, CaError> {
        self.get_or_mint_at(name, OffsetDateTime::now_utc())
    }

    /// [`get_or_mint`](Self::get_or_mint) with an explicit clock (tests, benches).
    pub fn get_or_mint_at(
        &self,
        name: &LeafName,
        now: OffsetDateTime,
    ) -> Result<Arc<CertifiedKey>, CaError> {
        {
            let mut lru = self.lock();
            let lru = &mut *lru;
            let fresh = lru
                .map
                .get(name)
                .map(|e| now + self.refresh_margin < e.leaf.not_after);
            match fresh {
                Some(true) => {
                    lru.stats.hits += 1;
                    let tick = lru.next_tick;
                    lru.next_tick += 1;
                    if let Some(entry) = lru.map.get_mut(name) {
                        lru.order.remove(&entry.tick);
                        entry.tick = tick;
                        lru.order.insert(tick, name.clone());
                        return Ok(entry.leaf.certified.clone());
                    }
                }
                Some(false) => {
                    lru.stats.misses += 1;
                    lru.stats.refreshes += 1;
                }
                None => lru.stats.misses += 1,
            }
        }
        let leaf = self.minter.mint(name)?;
        let certified = leaf.certified.clone();
        self.insert(name.clone(), leaf);
        Ok(certified)
    }

    fn insert(&self, name: LeafName, leaf: MintedLeaf) {
        let mut lru = self.lock();
        let lru = &mut *lru;
        let tick = lru.next_tick;
        lru.next_tick += 1;
        if let Some(old) = lru.map.insert(name.clone(), Entry { leaf, tick }) {
            lru.order.remove(&old.tick);
        }
        lru.order.insert(tick, name);
        while lru.map.len() > self.capacity.get() {
            match lru.order.pop_first() {
                Some((_, victim)) => {
                    lru.map.remove(&victim);
                    lru.stats.evictions += 1;
                }
                None => break,
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lru> {
        // Nothing panics while holding the lock with the maps half-updated,
        // so a poisoned lock still guards a consistent cache.
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        ca: LocalCa,
        mints: AtomicUsize,
        fail_for: Option<LeafName>,
    }

    impl MintLeaf for Counting {
        fn mint(&self, name: &LeafName) -> Result<MintedLeaf, CaError> {
            if self.fail_for.as_ref() == Some(name) {
                return Err(CaError::Missing { dir: "test".into() });
            }
            self.mints.fetch_add(1, Ordering::SeqCst);
            self.ca.mint_leaf(name)
        }
    }

    fn counting(dir: &std::path::Path, fail_for: Option<LeafName>) -> Arc<Counting> {
        Arc::new(Counting {
            ca: LocalCa::init(dir, false).unwrap(),
            mints: AtomicUsize::new(0),
            fail_for,
        })
    }

    fn name(s: &str) -> LeafName {
        LeafName::parse(s).unwrap()
    }

    #[test]
    fn hits_reuse_the_same_leaf_and_the_bound_holds() {
        let dir = tempfile::tempdir().unwrap();
        let minter = counting(dir.path(), None);
        let cache = LeafCache::new(minter.clone(), NonZeroUsize::new(3).unwrap());
        let a1 = cache.get_or_mint(&name("a.test")).unwrap();
        let a2 = cache.get_or_mint(&name("A.TEST.")).unwrap();
        assert!(Arc::ptr_eq(&a1, &a2));
        assert_eq!(minter.mints.load(Ordering::SeqCst), 1);
        for i in 0..50 {
            cache.get_or_mint(&name(&format!("n{i}.test"))).unwrap();
            assert!(cache.len() <= 3);
        }
        assert_eq!(cache.len(), 3);
        let s = cache.stats();
        assert_eq!(s.hits, 1);
        assert_eq!(s.misses, 51);
        assert_eq!(s.evictions, 48);
    }

    #[test]
    fn least_recently_used_is_evicted_first() {
        let dir = tempfile::tempdir().unwrap();
        let minter = counting(dir.path(), None);
        let cache = LeafCache::new(minter.clone(), NonZeroUsize::new(2).unwrap());
        let a = cache.get_or_mint(&name("a.test")).unwrap();
        cache.get_or_mint(&name("b.test")).unwrap();
        // Touch a, so b is the LRU entry when c arrives.
        assert!(Arc::ptr_eq(
            &a,
            &cache.get_or_mint(&name("a.test")).unwrap()
        ));
        cache.get_or_mint(&name("c.test")).unwrap();
        assert_eq!(minter.mints.load(Ordering::SeqCst), 3);
        assert!(Arc::ptr_eq(
            &a,
            &cache.get_or_mint(&name("a.test")).unwrap()
        ));
        assert_eq!(minter.mints.load(Ordering::SeqCst), 3);
        cache.get_or_mint(&name("b.test")).unwrap();
        assert_eq!(minter.mints.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn ip_and_dns_keys_are_distinct_and_capacity_one_works() {
        let dir = tempfile::tempdir().unwrap();
        let minter = counting(dir.path(), None);
        let cache = LeafCache::new(minter.clone(), NonZeroUsize::MIN);
        cache.get_or_mint(&name("127.0.0.1")).unwrap();
        cache.get_or_mint(&name("::1")).unwrap();
        cache.get_or_mint(&name("::1")).unwrap();
        assert_eq!(cache.len(), 1);
        assert_eq!(minter.mints.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn leaves_near_expiry_are_reminted() {
        let dir = tempfile::tempdir().unwrap();
        let minter = counting(dir.path(), None);
        let cache = LeafCache::new(minter.clone(), NonZeroUsize::new(8).unwrap());
        let now = OffsetDateTime::now_utc();
        let first = cache.get_or_mint_at(&name("a.test"), now).unwrap();
        // 22h later: still more than the 1h margin left.
        let later = cache
            .get_or_mint_at(&name("a.test"), now + Duration::hours(22))
            .unwrap();
        assert!(Arc::ptr_eq(&first, &later));
        // 23.5h later: within the margin, so a fresh leaf.
        let refreshed = cache
            .get_or_mint_at(&name("a.test"), now + Duration::minutes(23 * 60 + 30))
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &refreshed));
        assert_eq!(cache.stats().refreshes, 1);
        assert_eq!(cache.len(), 1);
        // And the fresh one is served from then on.
        let again = cache.get_or_mint(&name("a.test")).unwrap();
        assert!(Arc::ptr_eq(&refreshed, &again));
    }

    #[test]
    fn a_mint_failure_is_returned_and_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let minter = counting(dir.path(), Some(name("bad.test")));
        let cache = LeafCache::new(minter.clone(), NonZeroUsize::new(2).unwrap());
        assert!(cache.get_or_mint(&name("bad.test")).is_err());
        assert!(cache.get_or_mint(&name("bad.test")).is_err());
        assert!(cache.is_empty());
    }

    #[test]
    fn shared_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let minter = counting(dir.path(), None);
        let cache = LeafCache::new(minter.clone(), NonZeroUsize::new(4).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    for i in 0..20 {
                        cache
                            .get_or_mint(&name(&format!("h{}.test", (i + t) % 6)))
                            .unwrap();
                        assert!(cache.len() <= 4);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let s = cache.stats();
        assert_eq!(s.hits + s.misses, 160);
        assert_eq!(cache.len(), 4);
    }
}
