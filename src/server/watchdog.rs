//! The per-connection watchdog's driver: `ConnIo` (the client socket, under TLS or not, whose
//! reads and writes feed the connection's `Activity`) and `drive`, which runs one hyper
//! connection to its end and acts on the verdicts of its `crate::watch::Watchdog` (`write_idle`,
//! `header_read`, `idle`, HTTP/2 streams stalled on the client's window, the graceful close and
//! `shutdown_grace`) and on the shutdown signal.
//!
//! Must not touch: TLS, building hyper connections, or what a connection serves; it only reads
//! the clocks and ends connections.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::io::Prefixed;
use crate::watch::{Activity, Verdict, Watchdog};

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

/// Drives one hyper connection (HTTP/1.1 or HTTP/2; `graceful` is its `graceful_shutdown`) to
/// its end under its watchdog and the shutdown signal. True: the watchdog parked it (an idle
/// HTTP/1.1 connection ended without closing the socket); the caller then holds the bare TLS
/// stream until the client's next bytes.
pub(super) async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    graceful: fn(Pin<&mut C>),
    mut dog: Watchdog<'_>,
    streams: Option<&StreamExecutor>,
    peer: SocketAddr,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut tick = tokio::time::interval(dog.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if *shutdown.borrow() && dog.shutdown(Instant::now()) {
        graceful(conn.as_mut());
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                    dog.failed();
                }
                break;
            }
            _ = shutdown.changed(), if dog.heeds_shutdown() => {
                if dog.shutdown(Instant::now()) {
                    graceful(conn.as_mut());
                }
            }
            _ = tick.tick() => {
                let stalled = |write_idle| streams.is_some_and(|s| s.sweep(write_idle));
                match dog.tick(Instant::now(), stalled) {
                    Verdict::Wait => {}
                    Verdict::Graceful | Verdict::Park => graceful(conn.as_mut()),
                    Verdict::Close(why) => {
                        tracing::debug!(%peer, "{why}: closing");
                        break;
                    }
                }
            }
        }
    }
    dog.parked()
}
