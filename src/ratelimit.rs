//! Route rate limits: a GCRA bucket per key (governor's), in a table of bounded size, and the
//! limiters kept across reloads that keep a route's `rate_limit`.
//!
//! Owns: bucket state and its bound. Must not touch: what a key is made of (the request path
//! hands over bytes), the answer to a refused request.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::Quota;

use crate::config::RateLimit;

/// The table is split so concurrent requests rarely wait on one lock.
const SHARDS: usize = 16;

/// One route's buckets.
pub struct Limiter {
    limiter: governor::RateLimiter<u64, BoundedStore, DefaultClock>,
    clock: DefaultClock,
    /// Keys are hashed with a per-limiter secret, so no one can aim many keys at one entry.
    hasher: RandomState,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Limiter({} keys)", self.keys())
    }
}

impl Limiter {
    pub fn new(spec: &RateLimit) -> Limiter {
        let burst = NonZeroU32::new(spec.burst).unwrap_or(NonZeroU32::MIN);
        // `interval` is at least 1 µs (at most 1,000,000 a second), so a quota always exists.
        let quota = Quota::with_period(spec.rate.interval().max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let clock = DefaultClock::default();
        let store = BoundedStore::new(spec.max_keys);
        Limiter {
            limiter: governor::RateLimiter::new(quota, store, clock.clone()),
            clock,
            hasher: RandomState::new(),
        }
    }

    /// Takes a token from `key`'s bucket; Err: none left, with the whole seconds until one is
    /// back (at least 1, as `Retry-After` says).
    pub fn check(&self, key: &[u8]) -> Result<(), u32> {
        let key = self.hasher.hash_one(key);
        self.limiter.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
        })
    }

    /// How many keys are tracked now.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// One part of the table: by hashed key, the bucket's state (its theoretical arrival time) and
/// when the key was last used.
type Shard = HashMap<u64, (Nanos, u64)>;

/// Bucket states by hashed key, at most `cap` of them: past it, the least recently used eighth
/// is forgotten (a forgotten key starts again with a full bucket, which for an idle key is what
/// it had anyway).
struct BoundedStore {
    shards: Box<[Mutex<Shard>]>,
    cap_per_shard: usize,
    /// A logical clock of uses, for "least recently used".
    uses: AtomicU64,
}

impl std::fmt::Debug for BoundedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoundedStore")
    }
}

impl BoundedStore {
    fn new(cap: usize) -> BoundedStore {
        BoundedStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            cap_per_shard: cap.div_ceil(SHARDS).max(1),
            uses: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, Shard> {
        // The key is already a keyed hash: its low bits are as good as any.
        let i = (key % SHARDS as u64) as usize;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Drops the least recently used eighth of `map` (at least one entry).
fn evict(map: &mut Shard) {
    let mut used: Vec<u64> = map.values().map(|(_, u)| *u).collect();
    let k = (used.len() / 8).max(1).min(used.len());
    if k == 0 {
        return;
    }
    let (_, threshold, _) = used.select_nth_unstable(k - 1);
    let threshold = *threshold;
    map.retain(|_, (_, u)| *u > threshold);
}

impl StateStore for BoundedStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut map = self.shard(*key);
        let before = map.get(key).map(|(tat, _)| *tat);
        let (answer, tat) = f(before)?;
        if before.is_none() && map.len() >= self.cap_per_shard {
            evict(&mut map);
        }
        let used = self.uses.fetch_add(1, Ordering::Relaxed);
        map.insert(*key, (tat, used));
        Ok(answer)
    }
}

impl governor::state::keyed::ShrinkableKeyedStateStore<u64> for BoundedStore {
    fn retain_recent(&self, _drop_below: Nanos) {}

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A route's label and settings.
type LimiterKey = (Arc<str>, RateLimit);

/// The limiters of the routes in force, by route label and settings: a reload that keeps both
/// keeps the buckets; one that changes either starts them afresh.
#[derive(Default)]
pub struct Limiters {
    known: Mutex<HashMap<LimiterKey, Weak<Limiter>>>,
}

impl std::fmt::Debug for Limiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Limiters")
    }
}

impl Limiters {
    pub fn get(&self, label: &Arc<str>, spec: &RateLimit) -> Arc<Limiter> {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        // Limiters of routes no table holds any more are gone: forget their entries.
        known.retain(|_, w| w.strong_count() > 0);
        let key = (label.clone(), spec.clone());
        if let Some(l) = known.get(&key).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(Limiter::new(spec));
        known.insert(key, Arc::downgrade(&l));
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Rate, RateKey};

    fn spec(rate: &str, burst: u32, max_keys: usize) -> RateLimit {
        RateLimit {
            rate: rate.parse::<Rate>().unwrap(),
            burst,
            key: RateKey::Client,
            max_keys,
        }
    }

    #[test]
    fn a_bucket_lets_its_burst_through_then_says_when_to_come_back() {
        let l = Limiter::new(&spec("1/m", 3, 100));
        for _ in 0..3 {
            assert_eq!(l.check(b"a"), Ok(()));
        }
        let wait = l.check(b"a").unwrap_err();
        assert!((1..=60).contains(&wait), "{wait}");
        assert_eq!(l.check(b"b"), Ok(()), "another key has its own bucket");
    }

    #[test]
    fn a_hundred_thousand_keys_stay_within_the_bound() {
        let l = Limiter::new(&spec("10/s", 10, 1_000));
        for i in 0..100_000u32 {
            let _ = l.check(&i.to_le_bytes());
        }
        assert!(l.keys() <= 1_000 + SHARDS, "{}", l.keys());
        assert!(l.keys() >= 500, "{}", l.keys());
        // The most recent key is still tracked: its bucket is not full.
        let last = 99_999u32.to_le_bytes();
        for _ in 0..9 {
            let _ = l.check(&last);
        }
        assert!(l.check(&last).is_err());
    }

    #[test]
    fn a_reload_that_keeps_the_settings_keeps_the_buckets() {
        let limiters = Limiters::default();
        let label: Arc<str> = "api".into();
        let a = limiters.get(&label, &spec("1/m", 1, 10));
        assert_eq!(a.check(b"k"), Ok(()));
        let again = limiters.get(&label, &spec("1/m", 1, 10));
        assert!(again.check(b"k").is_err(), "the same bucket");
        let changed = limiters.get(&label, &spec("2/m", 1, 10));
        assert_eq!(changed.check(b"k"), Ok(()), "new settings, new buckets");
    }
}
