//! What a connection's watchdog reads, written by the connection's I/O and its request bodies:
//! `Activity` (bytes moved, stuck writes, request heads, requests in flight) and, for HTTP/2,
//! one `StreamClock` per stream.
//!
//! Owns: the clocks and their arithmetic. Must not touch: sockets, timers, policy (what a watchdog
//! does with a clock is `server`'s business). Imports nothing of the crate.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a connection's watchdog needs: when bytes last moved, whether a write is stuck, and how
/// many requests are in flight.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    /// Milliseconds since `origin` of the last read or write that made progress.
    last_io: AtomicU64,
    /// Milliseconds since `origin` (plus one) when a write first found the socket full; 0: not stuck.
    write_blocked: AtomicU64,
    /// HTTP/1.1 only: milliseconds since `origin` (plus one) when the client began (or was due to
    /// begin) its next request head; 0 while a request is being served or the connection is idle.
    header_start: AtomicU64,
    track_headers: AtomicBool,
    /// Milliseconds since `origin` when the last request finished (0: none yet). HTTP/2 idleness
    /// counts from here, since PINGs and window updates move bytes without any request.
    last_request_end: AtomicU64,
    pub inflight: AtomicUsize,
    /// HTTP/1.1: the idle connection is being handed back by hyper (its closing shutdown must
    /// leave the socket open).
    parking: AtomicBool,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            last_io: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            header_start: AtomicU64::new(0),
            track_headers: AtomicBool::new(false),
            last_request_end: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
            parking: AtomicBool::new(false),
        }
    }

    /// A request head has been parsed: the header clock stops until the next one begins.
    pub fn request_started(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.header_start.store(0, Ordering::Relaxed);
    }

    pub fn request_finished(&self) {
        self.last_request_end
            .store(self.now_ms(), Ordering::Relaxed);
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn start_header_clock(&self) {
        let _ = self.header_start.compare_exchange(
            0,
            self.now_ms() + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// A request head has begun (or is due) and is not complete.
    pub fn headers_pending(&self) -> bool {
        self.header_start.load(Ordering::Relaxed) != 0
    }

    pub fn set_parking(&self, on: bool) {
        self.parking.store(on, Ordering::Relaxed);
    }

    pub fn parking(&self) -> bool {
        self.parking.load(Ordering::Relaxed)
    }

    pub fn headers_late(&self, limit: Duration) -> bool {
        let since = self.header_start.load(Ordering::Relaxed);
        since != 0 && self.now_ms().saturating_sub(since - 1) >= limit.as_millis() as u64
    }

    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// HTTP/1.1: request heads are timed (HTTP/2 has no heads between requests to time).
    pub fn track_headers(&self) {
        self.track_headers.store(true, Ordering::Relaxed);
    }

    pub fn tracks_headers(&self) -> bool {
        self.track_headers.load(Ordering::Relaxed)
    }

    /// A write found the socket full: the stuck-write clock starts, if it is not running.
    pub fn write_blocked(&self) {
        let now = self.now_ms() + 1;
        let _ = self
            .write_blocked
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A write made progress.
    pub fn wrote(&self) {
        self.write_blocked.store(0, Ordering::Relaxed);
        self.touched();
    }

    pub fn touched(&self) {
        self.last_io.store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn idle_for(&self, limit: Duration) -> bool {
        let since = if self.track_headers.load(Ordering::Relaxed) {
            self.last_io.load(Ordering::Relaxed)
        } else {
            self.last_request_end.load(Ordering::Relaxed)
        };
        self.inflight.load(Ordering::Relaxed) == 0
            && self.header_start.load(Ordering::Relaxed) == 0
            && self.now_ms().saturating_sub(since) >= limit.as_millis() as u64
    }

    /// No byte moved either way for `limit`, whatever else is going on.
    pub fn quiet_for(&self, limit: Duration) -> bool {
        self.now_ms()
            .saturating_sub(self.last_io.load(Ordering::Relaxed))
            >= limit.as_millis() as u64
    }

    pub fn write_stuck_for(&self, limit: Duration) -> bool {
        let since = self.write_blocked.load(Ordering::Relaxed);
        since != 0 && self.now_ms().saturating_sub(since - 1) >= limit.as_millis() as u64
    }
}

tokio::task_local! {
    /// The clock of the HTTP/2 stream whose task is running, for its response body.
    static STREAM: Arc<StreamClock>;
}

/// One HTTP/2 stream, as its response body and the connection's watchdog see it. hyper stops
/// polling a response body while the stream's flow-control window is 0, and offers no way to
/// reset such a stream; this clock tells the watchdog how long the body has waited, and lets
/// it cancel the stream's task (h2 then sends RST_STREAM and the body, with its upstream
/// connection, is dropped).
#[derive(Debug)]
pub struct StreamClock {
    origin: Instant,
    /// Milliseconds since `origin`, plus one, when the body last handed hyper data and has not
    /// been polled since; 0 while hyper keeps polling (or the upstream is the one being waited on).
    handed: AtomicU64,
    cancelled: AtomicBool,
    /// Ends the stream's future, for `cancel`.
    task: std::sync::OnceLock<futures_util::future::AbortHandle>,
}

impl Default for StreamClock {
    fn default() -> StreamClock {
        StreamClock::new()
    }
}

impl StreamClock {
    pub fn new() -> StreamClock {
        StreamClock {
            origin: Instant::now(),
            handed: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            task: std::sync::OnceLock::new(),
        }
    }

    /// The clock of the current HTTP/2 stream's task, if this is one.
    pub fn current() -> Option<Arc<StreamClock>> {
        STREAM.try_with(Arc::clone).ok()
    }

    /// The body is being polled: hyper has room for more.
    pub fn polled(&self) {
        if self.handed.load(Ordering::Relaxed) != 0 {
            self.handed.store(0, Ordering::Relaxed);
        }
    }

    /// The body handed hyper a data frame.
    pub fn handed_data(&self) {
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        self.handed.store(now, Ordering::Relaxed);
    }

    /// One stream's task: `fut` with this clock in reach of its body. Not an `async fn`: that
    /// would hold `fut` both as its argument and inside the scope, and a stream's future is
    /// kilobytes, copied whole at every move (docs/performance.md).
    pub fn scope<F: std::future::Future<Output = ()>>(
        clock: Arc<StreamClock>,
        fut: F,
    ) -> impl std::future::Future<Output = ()> {
        STREAM.scope(clock, fut)
    }

    /// What ends the stream's future, which `cancel` pulls.
    pub fn set_task(&self, task: futures_util::future::AbortHandle) {
        if self.is_cancelled() {
            task.abort();
        }
        let _ = self.task.set(task);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    pub fn stalled_for(&self, limit: Duration) -> bool {
        let since = self.handed.load(Ordering::Relaxed);
        since != 0
            && (self.origin.elapsed().as_millis() as u64).saturating_sub(since - 1)
                >= limit.as_millis() as u64
    }

    /// Ends the stream: its future is dropped (h2 resets the stream) at its next poll, which
    /// this wakes.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.get() {
            t.abort();
        }
    }
}
