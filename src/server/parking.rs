//! Parking idle HTTP/1.1 connections: one quiet for a watchdog tick with nothing in flight is
//! ended in hyper without closing its socket (`H1Io` turns hyper's closing shutdown into a flush),
//! and the bare TLS stream waits on the socket (`park`) until the client's next bytes set up a new
//! hyper connection. `unpark` takes hyper's parts and drops the rest of them on return.
//!
//! Must not touch: when a connection parks (the watchdog decides) or how its next
//! hyper connection is built (`conn`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::io::Prefixed;
use crate::state::Shared;

use super::conn::{first_bytes, ClientTls};
use super::h1io::H1Io;

/// Holds a connection hyper ended idle (`unpark` gave back its TLS stream) until the client's
/// next bytes, counted in `limen_connections_parked`, for what is left of `idle` after the tick
/// that parked it. The stream to serve next, with those bytes first; None: nothing came in time,
/// the client closed, or shutdown began, and the connection is closed as hyper would.
pub(super) async fn park(
    mut tls: ClientTls,
    t: &crate::config::Timeouts,
    period: Duration,
    shared: &Shared,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Prefixed<ClientTls>> {
    let wait = t.idle.saturating_sub(period);
    shared.metrics.connections_parked.inc();
    shared.released.fetch_add(1, Ordering::Relaxed);
    let next = next_request(&mut tls, wait, t.header_read, shutdown).await;
    shared.metrics.connections_parked.dec();
    let Some(first) = next else {
        // Idle for `idle`, shutdown, or the client closed: close as hyper would.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::io::AsyncWriteExt::shutdown(&mut tls),
        )
        .await;
        return None;
    };
    Some(Prefixed::new(first, tls))
}

/// What a parked HTTP/1.1 connection keeps of hyper's: the TLS stream, and the bytes hyper had
/// read but not parsed yet, then any it had not read. Everything else of hyper's is dropped
/// here, on return: an empty `read_buf` still owns hyper's 8 KiB read buffer, and kept in the
/// caller's scope it would stay for the whole park.
pub(super) fn unpark<S>(
    parts: hyper::server::conn::http1::Parts<TokioIo<H1Io<Prefixed<ClientTls>>>, S>,
) -> (bytes::Bytes, ClientTls) {
    let (rest, tls) = parts.io.into_inner().inner.into_parts();
    let early = if parts.read_buf.is_empty() {
        rest
    } else if rest.is_empty() {
        // Copied out of hyper's buffer: a few bytes must not hold 8 KiB.
        bytes::Bytes::copy_from_slice(&parts.read_buf)
    } else {
        [parts.read_buf, rest].concat().into()
    };
    (early, tls)
}

/// A parked connection's next request: waits on the socket itself (no buffer is held while the
/// client is silent; rustls has none buffered, as hyper found nothing more to read), up to
/// `wait`; then its first bytes within `header_read`. None: nothing in time, closed, or shutdown.
async fn next_request(
    tls: &mut ClientTls,
    wait: Duration,
    header_read: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<bytes::Bytes> {
    tokio::select! {
        r = tls.get_ref().0.inner.get_ref().readable() => r.ok()?,
        () = tokio::time::sleep(wait) => return None,
        _ = shutdown.changed() => return None,
    }
    first_bytes(tls, header_read, shutdown).await
}
