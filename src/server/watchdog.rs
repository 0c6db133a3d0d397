//! The per-connection watchdog: `ConnIo` (the client socket, under TLS or not, whose reads and
//! writes feed the connection's `Activity`), `Watch` (what a connection's watchdog checks, against
//! which limits) and the `drive!` loop that runs one hyper connection to its end under the
//! watchdog and the shutdown signal: `write_idle`, `header_read`, `idle`, HTTP/2 streams stalled
//! on the client's window, the graceful close and `shutdown_grace`.
//!
//! Must not touch: TLS, building hyper connections, or what a connection serves; it only reads
//! the clocks and ends connections.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::io::Prefixed;
use crate::watch::Activity;

use super::h2::StreamExecutor;

/// The client socket, instrumented for the watchdog. Sits under TLS, so every byte is seen.
pub(super) struct ConnIo {
    /// With the bytes read past a PROXY header, if there was one.
    pub(super) inner: Prefixed<TcpStream>,
    pub(super) activity: Arc<Activity>,
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let a = &self.activity;
            a.touched();
            // Bytes between requests begin the next request head (slowloris defence).
            if a.tracks_headers() && a.inflight.load(Ordering::Relaxed) == 0 {
                a.start_header_clock();
            }
        }
        r
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl ConnIo {
    fn note_write(&self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(_) => self.activity.wrote(),
        }
    }
}

/// An HTTP/2 connection whose GOAWAY the client ignores (it never answers the PING that ends a
/// graceful shutdown) is closed this long after the GOAWAY once no stream is in flight.
pub const GOAWAY_GRACE: Duration = Duration::from_secs(2);

/// What a connection's watchdog checks, and against which limits.
pub(super) struct Watch<'a> {
    pub(super) activity: &'a Activity,
    pub(super) t: &'a crate::config::Timeouts,
    pub(super) peer: SocketAddr,
    /// HTTP/2: the connection's streams.
    pub(super) streams: Option<&'a StreamExecutor>,
}

impl Watch<'_> {
    pub(super) fn period(&self) -> Duration {
        [self.t.idle, self.t.write_idle]
            .into_iter()
            .min()
            .unwrap_or(Duration::from_secs(1))
            .div_f32(4.0)
            .clamp(Duration::from_millis(20), Duration::from_secs(1))
    }
}

/// Drives one hyper connection (HTTP/1.1 or HTTP/2: two types with the same methods; `$conn` is
/// it pinned) to its end, under the watchdog and the shutdown signal. With `park` true, an
/// HTTP/1.1 connection found idle and quiet at a tick is ended without closing the socket
/// (`H1Io`), and the macro's value is true: the caller then holds the bare TLS stream until the
/// client's next bytes.
macro_rules! drive {
    ($conn:expr, $watch:expr, $shutdown:expr) => {
        drive!($conn, $watch, $shutdown, false)
    };
    ($conn:expr, $watch:expr, $shutdown:expr, $park:expr) => {{
        // Whatever the caller imports: the macro's names are its own.
        use std::sync::atomic::Ordering;
        use std::time::Instant;
        use $crate::server::GOAWAY_GRACE;
        let w = $watch;
        let peer = w.peer;
        let park: bool = $park;
        let mut parking = false;
        let mut conn = $conn;
        let mut tick = tokio::time::interval(w.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the graceful close began, and when it must be over whatever the client does.
        let mut closing: Option<(Instant, Option<Instant>)> = None;
        if *$shutdown.borrow() {
            conn.as_mut().graceful_shutdown();
            closing = Some((Instant::now(), Some(Instant::now() + w.t.shutdown_grace)));
        }
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                        parking = false;
                    }
                    break;
                }
                _ = $shutdown.changed(), if closing.map_or(true, |(_, hard)| hard.is_none()) => {
                    if closing.is_none() {
                        conn.as_mut().graceful_shutdown();
                    }
                    let began = closing.map_or_else(Instant::now, |(b, _)| b);
                    closing = Some((began, Some(Instant::now() + w.t.shutdown_grace)));
                }
                _ = tick.tick() => {
                    if w.activity.write_stuck_for(w.t.write_idle) {
                        tracing::debug!(%peer, "client stopped reading for timeouts.write_idle: closing");
                        break;
                    }
                    if w.activity.headers_late(w.t.header_read) {
                        tracing::debug!(%peer, "request head not complete within timeouts.header_read: closing");
                        break;
                    }
                    if w.streams.is_some_and(|s| s.sweep(w.t.write_idle)) {
                        tracing::debug!(%peer, "every HTTP/2 stream waited on the client's flow-control window for timeouts.write_idle: closing");
                        break;
                    }
                    match closing {
                        None if park
                            && !parking
                            && w.activity.inflight.load(Ordering::Relaxed) == 0
                            && !w.activity.headers_pending()
                            && w.activity.quiet_for(w.period()) =>
                        {
                            // Idle between requests for a whole tick: hyper ends the connection
                            // at once (it is between messages), the socket stays open, and its
                            // buffers (16 KiB and the request slot) go back until the next bytes.
                            parking = true;
                            w.activity.set_parking(true);
                            conn.as_mut().graceful_shutdown();
                        }
                        None => {
                            if w.activity.idle_for(w.t.idle) {
                                closing = Some((Instant::now(), None));
                                conn.as_mut().graceful_shutdown();
                            }
                        }
                        Some((_, Some(hard))) if Instant::now() >= hard => {
                            tracing::debug!(%peer, "still open when timeouts.shutdown_grace ran out: closing");
                            break;
                        }
                        Some((began, _)) => {
                            if began.elapsed() >= GOAWAY_GRACE
                                && w.activity.inflight.load(Ordering::Relaxed) == 0
                            {
                                tracing::debug!(%peer, "the client did not finish the graceful close: closing");
                                break;
                            }
                        }
                    }
                }
            }
        }
        parking
    }};
}
