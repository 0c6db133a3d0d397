//! Giving freed memory back to the OS: `Running::release_memory_with` runs a task that calls the
//! allocator's release function once TLS connections that ended or parked (`Shared.released`)
//! settle, or every `RELEASE_EVERY` under steady churn.
//!
//! Owns the releaser's timing only. Must not touch connections or the allocator itself: the
//! binary passes the function (glibc's `malloc_trim`, the one `unsafe` call, lives in main.rs).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Running;

/// How often the memory releaser looks at connection churn.
pub const RELEASE_TICK: Duration = Duration::from_secs(1);
/// Under steady churn (connections ending every second), memory is released this often.
pub const RELEASE_EVERY: Duration = Duration::from_secs(10);

impl Running {
    /// Calls `release` (the allocator's "give free pages back to the OS": glibc's `malloc_trim`)
    /// after TLS connections ended or parked, so that a burst's buffers do not stay in RSS once
    /// it is over. glibc returns memory on its own only from the top of a heap, and a burst's
    /// per-connection buffers are spread through it. Checked every [`RELEASE_TICK`]: called
    /// when connections ended or parked since the last call and either none did in the last
    /// tick (the churn settled) or [`RELEASE_EVERY`] passed (steady churn). A busy keep-alive
    /// load, with no connection ending, never calls it, and neither does an idle process.
    pub fn release_memory_with(&mut self, release: fn()) {
        let shared = self.shared.clone();
        let mut shutdown = self.shutdown.subscribe();
        self.tasks.push(tokio::spawn(async move {
            let count = || shared.released.load(Ordering::Relaxed);
            let (mut at_release, mut at_tick) = (count(), count());
            let mut last = Instant::now();
            let mut tick = tokio::time::interval(RELEASE_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let now = count();
                let settled = now == at_tick;
                at_tick = now;
                if now == at_release || !(settled || last.elapsed() >= RELEASE_EVERY) {
                    continue;
                }
                at_release = now;
                last = Instant::now();
                release();
                tracing::debug!(took = ?last.elapsed(), "freed memory given back to the OS");
            }
        }));
    }
}
