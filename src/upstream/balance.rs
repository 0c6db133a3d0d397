//! Choosing an upstream for each try of a request, and the retry budget of a route.
//!
//! Owns: `Group` (a route's upstreams with their weights and the balancing algorithm: smooth
//! weighted round robin, least request by power of two choices, weighted random), the fail-open
//! rule when every upstream is down, and `RetryBudget`. Must not touch: health state (it only
//! reads `Health::available`), connections.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::health::random_u64;
use super::Upstream;
use crate::config::Balance;

#[derive(Debug)]
pub struct Member {
    pub upstream: Arc<Upstream>,
    pub weight: u32,
}

/// The upstreams of one route and how requests are spread over them.
#[derive(Debug)]
pub struct Group {
    members: Vec<Member>,
    balance: Balance,
    equal_weights: bool,
    next: AtomicUsize,
    /// Smooth weighted round robin: each member's current weight.
    current: Mutex<Vec<i64>>,
    /// Every member was down at the last pick (fail open).
    all_down: AtomicBool,
}

/// One choice: the member's index, and whether the route's all-down state changed with it
/// (Some(true): every upstream is down now; Some(false): one is back).
pub struct Pick<'a> {
    pub index: usize,
    pub upstream: &'a Arc<Upstream>,
    pub all_down_changed: Option<bool>,
}

impl Group {
    pub fn new(members: Vec<Member>, balance: Balance) -> Group {
        let equal_weights = members.windows(2).all(|w| w[0].weight == w[1].weight);
        let n = members.len();
        Group {
            members,
            balance,
            equal_weights,
            next: AtomicUsize::new(0),
            current: Mutex::new(vec![0; n]),
            all_down: AtomicBool::new(false),
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Every member is down or ejected (requests still go to them: fail open).
    pub fn all_down(&self) -> bool {
        !self.members.iter().any(|m| m.upstream.health.available())
    }

    /// The member for the next try. `tried` holds the indexes of earlier tries of this request:
    /// a member not tried yet is preferred, an available one (not down, not ejected) first. When
    /// none is available, every member is a candidate (fail open). None: no member at all.
    pub fn pick(&self, tried: &[usize]) -> Option<Pick<'_>> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let mut all_down_changed = None;
        let available = |i: usize| self.members[i].upstream.health.available();
        if tried.is_empty() {
            // The common case: round robin over equal weights, the next one is available.
            if self.balance == Balance::RoundRobin && self.equal_weights {
                let start = if n > 1 {
                    self.next.fetch_add(1, Ordering::Relaxed) % n
                } else {
                    0
                };
                // Only when the one in turn is available: skipping to its neighbour would give
                // that neighbour the share of every down upstream before it.
                if available(start) {
                    if self.all_down.load(Ordering::Relaxed)
                        && self.all_down.swap(false, Ordering::Relaxed)
                    {
                        all_down_changed = Some(false);
                    }
                    return Some(self.picked(start, all_down_changed));
                }
            }
            let none = !(0..n).any(available);
            if self.all_down.swap(none, Ordering::Relaxed) != none {
                all_down_changed = Some(none);
            }
        }
        // Available and not tried yet; else available (a retry goes where it can succeed, not
        // to a known-down upstream); else not tried yet (fail open); else any.
        let untried = |i: &usize| !tried.contains(i);
        let tiers: [&dyn Fn(usize) -> bool; 4] = [
            &|i| untried(&i) && available(i),
            &available,
            &|i| untried(&i),
            &|_| true,
        ];
        let candidates = tiers
            .iter()
            .map(|keep| (0..n).filter(|&i| keep(i)).collect::<Vec<usize>>())
            .find(|c| !c.is_empty())
            .unwrap_or_default();
        if candidates.is_empty() {
            return None;
        }
        let i = match self.balance {
            Balance::RoundRobin => self.smooth_round_robin(&candidates),
            Balance::LeastRequest => self.least_request(&candidates),
            Balance::Random => self.weighted_random(&candidates),
        };
        Some(self.picked(i, all_down_changed))
    }

    fn picked(&self, index: usize, all_down_changed: Option<bool>) -> Pick<'_> {
        Pick {
            index,
            upstream: &self.members[index].upstream,
            all_down_changed,
        }
    }

    /// nginx's smooth weighted round robin over `candidates`: each gains its weight, the one with
    /// the most wins and pays back the total. Weights 1 and 3 give A B B B, never A A.
    fn smooth_round_robin(&self, candidates: &[usize]) -> usize {
        if candidates.len() == 1 {
            return candidates[0];
        }
        let Ok(mut current) = self.current.lock() else {
            return candidates[0];
        };
        let mut total = 0i64;
        let mut best = candidates[0];
        for &i in candidates {
            let w = i64::from(self.members[i].weight);
            current[i] += w;
            total += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        best
    }

    /// Two candidates drawn at random (weighted); the one with fewer requests in flight per
    /// unit of weight wins.
    fn least_request(&self, candidates: &[usize]) -> usize {
        if candidates.len() == 1 {
            return candidates[0];
        }
        let a = self.weighted_random(candidates);
        let others: Vec<usize> = candidates.iter().copied().filter(|&i| i != a).collect();
        let b = self.weighted_random(&others);
        let load = |i: usize| {
            let m = &self.members[i];
            (m.upstream.in_flight() as u64 + 1) * 1000 / u64::from(m.weight)
        };
        if load(b) < load(a) {
            b
        } else {
            a
        }
    }

    fn weighted_random(&self, candidates: &[usize]) -> usize {
        let total: u64 = candidates
            .iter()
            .map(|&i| u64::from(self.members[i].weight))
            .sum();
        if total == 0 {
            return candidates[0];
        }
        let mut r = random_u64() % total;
        for &i in candidates {
            let w = u64::from(self.members[i].weight);
            if r < w {
                return i;
            }
            r -= w;
        }
        candidates[candidates.len() - 1]
    }
}

/// Retries a route may make: at most a share of its requests over the last 10 s, and always a few
/// (so a quiet route can retry at all) unless the share is 0.
#[derive(Debug)]
pub struct RetryBudget {
    permille: u32,
    origin: Instant,
    /// One slot per second of the window: its second, requests and retries.
    slots: [(AtomicU64, AtomicU32, AtomicU32); 10],
}

/// Retries allowed in any window whatever the traffic, when the budget is not 0%: enough that a
/// quiet route's retries outlast the failures (5 in a row by default) that eject a bad upstream,
/// small enough that when every upstream fails, retries stay within the budget plus this.
pub const RETRY_BUDGET_FLOOR: u32 = 10;

impl RetryBudget {
    pub fn new(permille: u32) -> RetryBudget {
        RetryBudget {
            permille,
            origin: Instant::now(),
            slots: Default::default(),
        }
    }

    fn slot(&self) -> &(AtomicU64, AtomicU32, AtomicU32) {
        let sec = self.origin.elapsed().as_secs() + 1;
        let slot = &self.slots[(sec % 10) as usize];
        let seen = slot.0.load(Ordering::Relaxed);
        if seen != sec
            && slot
                .0
                .compare_exchange(seen, sec, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            slot.1.store(0, Ordering::Relaxed);
            slot.2.store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Counts one request of the route.
    pub fn note_request(&self) {
        self.slot().1.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn try_retry(&self) -> bool {
        if self.permille == 0 {
            return false;
        }
        let slot = self.slot();
        let now = self.origin.elapsed().as_secs() + 1;
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in &self.slots {
            let sec = s.0.load(Ordering::Relaxed);
            if sec + 10 > now {
                requests += u64::from(s.1.load(Ordering::Relaxed));
                retries += u64::from(s.2.load(Ordering::Relaxed));
            }
        }
        let allowed =
            (requests * u64::from(self.permille) / 1000).max(u64::from(RETRY_BUDGET_FLOOR));
        // Taken first, given back when over: concurrent retries cannot all pass the check.
        slot.2.fetch_add(1, Ordering::Relaxed);
        if retries >= allowed {
            slot.2.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_its_share_and_the_floor() {
        let b = RetryBudget::new(200);
        for _ in 0..100 {
            b.note_request();
        }
        let granted = (0..100).filter(|_| b.try_retry()).count();
        assert_eq!(granted, 20);
        let quiet = RetryBudget::new(200);
        quiet.note_request();
        assert_eq!(
            (0..20).filter(|_| quiet.try_retry()).count(),
            RETRY_BUDGET_FLOOR as usize
        );
        let none = RetryBudget::new(0);
        none.note_request();
        assert!(!none.try_retry());
    }
}
