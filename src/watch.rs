//! What a connection's watchdog reads, written by the connection's I/O and its request bodies:
//! `Activity` (bytes moved, stuck writes, request heads, requests in flight) and, for HTTP/2,
//! one `StreamClock` per stream; and the `Watchdog` itself, which reads them at each tick and
//! says what to do (wait, close gracefully, park, close now). One watchdog value serves client
//! connections, the redirect listener and upgraded tunnels.
//!
//! Owns: the clocks and the watchdog's verdicts (pure: clocks and the time in, a verdict out).
//! Must not touch: sockets, timers, hyper (the driver that acts on a verdict is `server`'s, the
//! tunnel's is `proxy`'s). Imports only the timeouts of the config.

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
    /// Wakes the stream's future for `cancel` (it then ends itself).
    waker: futures_util::task::AtomicWaker,
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
            waker: futures_util::task::AtomicWaker::new(),
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

    /// Runs `fut` until it ends or `cancel` is called: then it is dropped at once (h2 resets
    /// the stream). Polled with the clock in reach of the stream's body (`current`).
    pub fn cancellable<F: std::future::Future<Output = ()>>(
        self: Arc<StreamClock>,
        fut: F,
    ) -> Cancellable<F> {
        Cancellable {
            fut: STREAM.scope(self.clone(), fut),
            clock: self,
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
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
        self.cancelled.store(true, Ordering::Release);
        self.waker.wake();
    }
}

pin_project_lite::pin_project! {
    /// A stream's future under its clock, which `StreamClock::cancel` ends. A struct, not an
    /// `async` block: a block would hold the future twice (as captured and as pinned), and a
    /// stream's future is kilobytes, copied whole at the move (docs/performance.md).
    pub struct Cancellable<F> {
        #[pin]
        fut: tokio::task::futures::TaskLocalFuture<Arc<StreamClock>, F>,
        clock: Arc<StreamClock>,
    }
}

impl<F: std::future::Future<Output = ()>> std::future::Future for Cancellable<F> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        // Registered before the flag is read: a cancel in between still wakes this.
        this.clock.waker.register(cx.waker());
        if this.clock.is_cancelled() {
            return std::task::Poll::Ready(());
        }
        this.fut.poll(cx)
    }
}

/// An HTTP/2 connection whose GOAWAY the client ignores (it never answers the PING that ends a
/// graceful shutdown) is closed this long after the GOAWAY once no stream is in flight.
pub const GOAWAY_GRACE: Duration = Duration::from_secs(2);

/// What a watchdog tells its driver at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Wait,
    /// Begin a graceful close: HTTP/1.1 after the response in flight, HTTP/2 with a GOAWAY.
    Graceful,
    /// Idle between HTTP/1.1 requests: end hyper's connection and keep the socket (parking).
    Park,
    /// Close now; the reason is for the debug log.
    Close(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A client connection (or the redirect listener's); `park`: HTTP/1.1 that may park.
    Connection { park: bool },
    /// An upgraded connection copying bytes both ways.
    Tunnel,
}

/// One connection's watchdog: `write_idle`, `header_read`, `idle`, HTTP/2 streams stalled on
/// the client's window, the graceful close and `shutdown_grace`.
#[derive(Debug)]
pub struct Watchdog<'a> {
    activity: &'a Activity,
    t: &'a crate::config::Timeouts,
    role: Role,
    parking: bool,
    /// When the graceful close began, and when it must be over whatever the client does.
    closing: Option<(Instant, Option<Instant>)>,
}

impl<'a> Watchdog<'a> {
    pub fn connection(
        activity: &'a Activity,
        t: &'a crate::config::Timeouts,
        park: bool,
    ) -> Watchdog<'a> {
        Watchdog {
            activity,
            t,
            role: Role::Connection { park },
            parking: false,
            closing: None,
        }
    }

    /// A tunnel's watchdog: closed when silent for `idle` either way (every byte crosses the
    /// client socket, whose activity the connection tracks, as nginx's proxy_read_timeout), and
    /// `shutdown_grace` after shutdown begins.
    pub fn tunnel(activity: &'a Activity, t: &'a crate::config::Timeouts) -> Watchdog<'a> {
        Watchdog {
            activity,
            t,
            role: Role::Tunnel,
            parking: false,
            closing: None,
        }
    }

    /// How often the driver ticks: a quarter of the shortest limit, within 20 ms..1 s.
    pub fn period(&self) -> Duration {
        let shortest = match self.role {
            Role::Connection { .. } => self.t.idle.min(self.t.write_idle),
            Role::Tunnel => self.t.idle,
        };
        (shortest / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
    }

    /// Shutdown began (again): from now the connection has `shutdown_grace`. True when the driver
    /// must start a graceful close now (not already closing).
    pub fn shutdown(&mut self, now: Instant) -> bool {
        let began = self.closing.map_or(now, |(began, _)| began);
        let first = self.closing.is_none();
        self.closing = Some((began, Some(now + self.t.shutdown_grace)));
        first && self.role != Role::Tunnel
    }

    /// Whether a shutdown signal still changes anything: not once `shutdown_grace` runs.
    pub fn heeds_shutdown(&self) -> bool {
        self.closing.is_none_or(|(_, hard)| hard.is_none())
    }

    /// The connection ended with an error: whatever it was doing, it did not park.
    pub fn failed(&mut self) {
        self.parking = false;
    }

    /// It ended by parking: the caller holds the bare socket until the client's next bytes.
    pub fn parked(&self) -> bool {
        self.parking
    }

    /// The verdict at a tick. `stalled` sweeps the HTTP/2 streams waiting on the client's
    /// window for `write_idle` and says whether every open one is (HTTP/2 only).
    pub fn tick(&mut self, now: Instant, stalled: impl FnOnce(Duration) -> bool) -> Verdict {
        let (a, t) = (self.activity, self.t);
        let Role::Connection { park } = self.role else {
            return match self.closing {
                Some((_, Some(hard))) if now >= hard => Verdict::Close(
                    "upgraded tunnel still open when timeouts.shutdown_grace ran out",
                ),
                _ if a.quiet_for(t.idle) => {
                    Verdict::Close("upgraded tunnel idle past timeouts.idle")
                }
                _ => Verdict::Wait,
            };
        };
        if a.write_stuck_for(t.write_idle) {
            return Verdict::Close("client stopped reading for timeouts.write_idle");
        }
        if a.headers_late(t.header_read) {
            return Verdict::Close("request head not complete within timeouts.header_read");
        }
        if stalled(t.write_idle) {
            return Verdict::Close(
                "every HTTP/2 stream waited on the client's flow-control window for timeouts.write_idle",
            );
        }
        let idle = a.inflight.load(Ordering::Relaxed) == 0;
        match self.closing {
            None if park
                && !self.parking
                && idle
                && !a.headers_pending()
                && a.quiet_for(self.period()) =>
            {
                // Idle between requests for a whole tick: hyper ends the connection at once (it
                // is between messages), the socket stays open, and its buffers (16 KiB and the
                // request slot) go back until the next bytes.
                self.parking = true;
                a.set_parking(true);
                Verdict::Park
            }
            None if a.idle_for(t.idle) => {
                self.closing = Some((now, None));
                Verdict::Graceful
            }
            None => Verdict::Wait,
            Some((_, Some(hard))) if now >= hard => {
                Verdict::Close("still open when timeouts.shutdown_grace ran out")
            }
            Some((began, _)) if now.saturating_duration_since(began) >= GOAWAY_GRACE && idle => {
                Verdict::Close("the client did not finish the graceful close")
            }
            Some(_) => Verdict::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every limit `long`, but those named zero (already run out).
    fn timeouts(zero: &[&str]) -> crate::config::Timeouts {
        let long = Duration::from_secs(3600);
        let pick = |name: &str| {
            if zero.contains(&name) {
                Duration::ZERO
            } else {
                long
            }
        };
        crate::config::Timeouts {
            handshake: long,
            header_read: pick("header_read"),
            idle: pick("idle"),
            upstream_connect: long,
            upstream_response: long,
            body_idle: long,
            write_idle: pick("write_idle"),
            shutdown_delay: long,
            shutdown_grace: pick("shutdown_grace"),
            upstream_ping_interval: long,
            upstream_ping_timeout: long,
            upstream_idle: long,
            upstream_write: long,
            quic_idle: long,
        }
    }

    const NO_STALL: fn(Duration) -> bool = |_| false;

    #[test]
    fn a_busy_connection_within_its_limits_is_left_alone() {
        let a = Activity::new();
        a.touched();
        a.request_started();
        let t = timeouts(&[]);
        let mut dog = Watchdog::connection(&a, &t, true);
        assert_eq!(dog.tick(Instant::now(), NO_STALL), Verdict::Wait);
        assert!(!dog.parked());
    }

    #[test]
    fn each_limit_closes_with_its_own_reason() {
        let a = Activity::new();
        a.write_blocked();
        let t = timeouts(&["write_idle"]);
        let mut dog = Watchdog::connection(&a, &t, false);
        let Verdict::Close(why) = dog.tick(Instant::now(), NO_STALL) else {
            panic!("a stuck write past write_idle must close");
        };
        assert!(why.contains("write_idle"), "{why}");

        let a = Activity::new();
        a.track_headers();
        a.start_header_clock();
        let t = timeouts(&["header_read"]);
        let mut dog = Watchdog::connection(&a, &t, false);
        assert!(
            matches!(dog.tick(Instant::now(), NO_STALL), Verdict::Close(w) if w.contains("header_read"))
        );

        let a = Activity::new();
        a.request_started();
        let t = timeouts(&[]);
        let mut dog = Watchdog::connection(&a, &t, false);
        assert!(
            matches!(dog.tick(Instant::now(), |_| true), Verdict::Close(w) if w.contains("flow-control"))
        );
    }

    #[test]
    fn an_idle_connection_closes_gracefully_or_parks() {
        let a = Activity::new();
        let t = timeouts(&["idle"]);
        let mut dog = Watchdog::connection(&a, &t, false);
        assert_eq!(dog.tick(Instant::now(), NO_STALL), Verdict::Graceful);
        // Once closing, it waits for the client (GOAWAY_GRACE), not closing again.
        assert_eq!(dog.tick(Instant::now(), NO_STALL), Verdict::Wait);
        let later = Instant::now() + GOAWAY_GRACE;
        assert!(matches!(dog.tick(later, NO_STALL), Verdict::Close(_)));

        let a = Activity::new();
        a.track_headers();
        let t = timeouts(&["idle", "write_idle"]);
        let mut dog = Watchdog::connection(&a, &t, true);
        // Parking needs a whole tick (at least 20 ms) without a byte: a fixed wait on the
        // monotonic clock, not a hope.
        std::thread::sleep(dog.period() + Duration::from_millis(5));
        assert_eq!(dog.tick(Instant::now(), NO_STALL), Verdict::Park);
        assert!(dog.parked() && a.parking());
        dog.failed();
        assert!(!dog.parked(), "a connection that failed did not park");
    }

    #[test]
    fn shutdown_starts_one_graceful_close_and_grace_ends_it() {
        let a = Activity::new();
        a.request_started();
        let t = timeouts(&["shutdown_grace"]);
        let mut dog = Watchdog::connection(&a, &t, false);
        assert!(dog.heeds_shutdown());
        assert!(
            dog.shutdown(Instant::now()),
            "the first signal starts the close"
        );
        assert!(!dog.heeds_shutdown());
        assert!(!dog.shutdown(Instant::now()), "only once");
        assert!(
            matches!(dog.tick(Instant::now(), NO_STALL), Verdict::Close(w) if w.contains("shutdown_grace"))
        );
    }

    #[test]
    fn a_tunnel_closes_when_quiet_or_when_grace_runs_out() {
        let a = Activity::new();
        a.touched();
        let t = timeouts(&[]);
        let mut dog = Watchdog::tunnel(&a, &t);
        assert_eq!(dog.tick(Instant::now(), NO_STALL), Verdict::Wait);
        assert!(
            !dog.shutdown(Instant::now()),
            "a tunnel has nothing graceful to start"
        );
        let t = timeouts(&["shutdown_grace"]);
        let mut dog = Watchdog::tunnel(&a, &t);
        dog.shutdown(Instant::now());
        assert!(
            matches!(dog.tick(Instant::now(), NO_STALL), Verdict::Close(w) if w.contains("shutdown_grace"))
        );
        let t = timeouts(&["idle"]);
        let mut dog = Watchdog::tunnel(&a, &t);
        assert!(
            matches!(dog.tick(Instant::now(), NO_STALL), Verdict::Close(w) if w.contains("idle"))
        );
    }
}
