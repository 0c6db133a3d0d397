//! The pool of one upstream: idle HTTP/1.1 connections (the warmest reused first), the shared
//! HTTP/2 connections with their stream counts against the peer's SETTINGS and limen's caps, and
//! checkout, which finds room or joins the one dial in flight (single flight).
//!
//! Must not touch: dialling itself (`dial`), the exchange (`client`).

use super::*;

/// The request side of one upstream connection.
pub(super) enum Sender {
    H1(http1::SendRequest<RequestBody>),
    /// A clone of the upstream's shared HTTP/2 connection.
    H2(http2::SendRequest<RequestBody>),
}

impl Sender {
    /// Sends the request; a request the connection did not take (it was closed before) comes
    /// back with the error, so it can be sent again elsewhere.
    pub async fn try_send_request(
        &mut self,
        req: http::Request<RequestBody>,
    ) -> Result<
        http::Response<hyper::body::Incoming>,
        hyper::client::conn::TrySendError<http::Request<RequestBody>>,
    > {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }
}

pub(super) struct Idle {
    pub(super) sender: http1::SendRequest<RequestBody>,
    pub(super) since: Instant,
    pub(super) _place: Place,
}

/// A connection checked out of a pool, ready for one request.
pub(super) struct PooledConn {
    pub(super) sender: Sender,
    pub(super) upstream: Arc<Upstream>,
    pub(super) reused: bool,
    pub(super) place: Place,
    /// HTTP/2: this request's stream, counted on its connection until the exchange ends.
    pub(super) _stream: Option<StreamSlot>,
}

/// One shared HTTP/2 connection and the streams it carries now.
pub(super) struct H2Conn {
    pub(super) sender: http2::SendRequest<RequestBody>,
    pub(super) streams: Arc<AtomicUsize>,
    /// The peer's SETTINGS, as its frames passed.
    pub(super) peer: Arc<crate::io::PeerSettings>,
}

impl H2Conn {
    /// Whether it takes one more stream now: ready, and below both the peer's limit and limen's
    /// own cap (`limits.upstream_h2_streams`), so no request queues inside a connection.
    pub(super) fn has_room(&self, cap: usize) -> bool {
        let limit = cap.min(self.peer.max_streams.load(Ordering::Relaxed).max(1));
        self.sender.is_ready() && self.streams.load(Ordering::Relaxed) < limit
    }
}

/// How long a new upstream HTTP/2 connection waits for the server's first SETTINGS frame.
pub(super) const H2_SETTINGS_WAIT: Duration = Duration::from_secs(1);

/// Streams on one upstream HTTP/2 connection, by default (`limits.upstream_h2_streams`).
pub const H2_STREAMS_PER_CONNECTION: usize = crate::config::UPSTREAM_H2_STREAMS;

/// HTTP/2 connections to one upstream, by default (`limits.upstream_h2_connections`).
pub const H2_CONNECTIONS_PER_UPSTREAM: usize = crate::config::UPSTREAM_H2_CONNECTIONS;

/// A request counted among those waiting for a dial; uncounted when dropped.
pub(super) struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream counted on its connection; uncounted when dropped.
pub(super) struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    pub(super) fn take(streams: &Arc<AtomicUsize>) -> StreamSlot {
        streams.fetch_add(1, Ordering::Relaxed);
        StreamSlot(streams.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PooledConn {
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// HTTP/2: no new stream goes to this connection any more (the upstream said GOAWAY; hyper
    /// reports it closed only once its last stream ends).
    pub(super) fn retire(&self) {
        let Some(slot) = &self._stream else {
            return;
        };
        if let Ok(mut conns) = self.upstream.h2.lock() {
            conns.retain(|c| !Arc::ptr_eq(&c.streams, &slot.0));
        }
    }

    /// Puts the connection back for reuse; call only when the exchange ended cleanly. An HTTP/2
    /// connection is shared and stays with its upstream whatever happens to one stream.
    pub(super) fn release(self) {
        let Sender::H1(sender) = self.sender else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.upstream.idle.lock() {
            if idle.len() < POOL_MAX_IDLE {
                idle.push_back(Idle {
                    sender,
                    since: Instant::now(),
                    _place: self.place,
                });
            }
        }
    }
}

/// Idle connections older than this are closed rather than reused; upstream servers commonly
/// time out idle keep-alive connections after 60s or more, so 30s stays safely inside.
/// Idle connections kept per upstream.
pub(super) const POOL_MAX_IDLE: usize = 512;

impl Upstream {
    /// Drops the idle connections past `timeouts.upstream_idle` or closed by the upstream, with
    /// their buffers: without traffic, nothing else would.
    pub(super) fn expire_idle(&self) {
        let max = self.registry.pool_idle();
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|c| c.since.elapsed() < max && !c.sender.is_closed());
        }
    }

    /// The most recently used idle connection (the warmest, the least likely to have been closed
    /// by the upstream); expired ones are dropped from the cold end.
    pub(super) fn take_idle(&self) -> Option<(http1::SendRequest<RequestBody>, Place)> {
        let max = self.registry.pool_idle();
        let mut idle = self.idle.lock().ok()?;
        while idle
            .front()
            .is_some_and(|c| c.since.elapsed() >= max || c.sender.is_closed())
        {
            idle.pop_front();
        }
        while let Some(c) = idle.pop_back() {
            if !c.sender.is_closed() {
                return Some((c.sender, c._place));
            }
        }
        None
    }

    /// A pooled connection ready now, without waiting or dialling: a stream on a shared HTTP/2
    /// connection with room, or the warmest idle HTTP/1.1 connection if it is ready. The common
    /// case, taken before any timer is armed for the request's deadline.
    pub(super) fn checkout_now(self: &Arc<Self>) -> Option<PooledConn> {
        let maybe_h2 = match self.scheme {
            UpstreamScheme::Http => false,
            UpstreamScheme::H2c => true,
            UpstreamScheme::Https => self.alpn.load(Ordering::Relaxed) != 1,
        };
        if maybe_h2 {
            return self.shared_h2();
        }
        let mut idle = self.idle.lock().ok()?;
        let warm = idle.back()?;
        if warm.since.elapsed() >= self.registry.pool_idle() || !warm.sender.is_ready() {
            return None;
        }
        let c = idle.pop_back()?;
        Some(PooledConn {
            sender: Sender::H1(c.sender),
            upstream: self.clone(),
            reused: true,
            place: c._place,
            _stream: None,
        })
    }

    /// A ready connection: an idle one if there is one, else a new one.
    pub(super) async fn checkout(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<PooledConn, DialFailure> {
        let maybe_h2 = match self.scheme {
            UpstreamScheme::Http => false,
            UpstreamScheme::H2c => true,
            UpstreamScheme::Https => self.alpn.load(Ordering::Relaxed) != 1,
        };
        if maybe_h2 {
            if let Some(c) = self.shared_h2() {
                return Ok(c);
            }
            // h2c, or https whose ALPN said h2 (or has not said yet): one dial for everyone.
            // None: ALPN chose HTTP/1.1, and the connection is one's own, below.
            if let Some(c) = Box::pin(self.checkout_shared(connect_timeout)).await? {
                return Ok(c);
            }
        }
        // A released connection becomes ready once its task has seen the exchange end, which
        // is a moment; most are ready already and need no timer. One bound for all the waiting.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(250);
        while let Some((mut sender, place)) = self.take_idle() {
            if sender.is_ready()
                || matches!(
                    tokio::time::timeout_at(deadline, sender.ready()).await,
                    Ok(Ok(()))
                )
            {
                return Ok(PooledConn {
                    sender: Sender::H1(sender),
                    upstream: self.clone(),
                    reused: true,
                    place,
                    _stream: None,
                });
            }
        }
        // Boxed: a dial's future (TCP connect, TLS handshake, HTTP/2 handshake) is kilobytes,
        // and inline it would be part of every request's future, moved at each spawn and poll
        // wrapper, though most requests find a pooled connection.
        Box::pin(self.checkout_fresh(connect_timeout)).await
    }

    /// A stream on a shared HTTP/2 connection, after waiting for (or starting) the one dial in
    /// flight. None: the upstream chose HTTP/1.1, so connections are not shared.
    pub(super) async fn checkout_shared(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<Option<PooledConn>, DialFailure> {
        let waiting = self.dial_waiters.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.dial_waiters);
        if waiting >= DIAL_WAITERS_MAX {
            return Err(DialFailure::TooManyWaiting(
                waiting,
                self.authority.to_string(),
            ));
        }
        // A few rounds: the connection a dial opened may fill up before this request gets to
        // it, and then another dial is due. The caller's deadline bounds it all.
        for _ in 0..4 {
            let mut flight = self.join_dial(connect_timeout);
            let outcome = flight
                .wait_for(Option::is_some)
                .await
                .map(|o| o.clone())
                .ok()
                .flatten();
            // None: the dialling task ended without a word (it panicked), so the next round
            // dials again.
            if let Some(Err(e)) = outcome {
                return Err(DialFailure::Shared(e));
            }
            if let Some(c) = self.shared_h2() {
                return Ok(Some(c));
            }
            if self.scheme == UpstreamScheme::Https && self.alpn.load(Ordering::Relaxed) == 1 {
                return Ok(None);
            }
        }
        // Each new connection filled up before this request got a stream on it: one of its own.
        self.checkout_fresh(connect_timeout).await.map(Some)
    }

    /// The dial in flight, or a new one started on a task of its own.
    pub(super) fn join_dial(self: &Arc<Self>, connect_timeout: Duration) -> DialFlight {
        let mut dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flight) = dialing.as_ref().filter(|f| f.borrow().is_none()) {
            return flight.clone();
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        *dialing = Some(rx.clone());
        drop(dialing);
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = match me.checkout_fresh(connect_timeout).await {
                // The new connection goes where the waiters look: an HTTP/2 one is in `h2`
                // already (this stream slot is given back), an HTTP/1.1 one joins the idle pool.
                Ok(conn) => {
                    conn.release();
                    Ok(())
                }
                Err(e) => Err(Arc::new(e)),
            };
            let _ = tx.send(Some(outcome));
        });
        rx
    }

    /// Dials started to this upstream.
    pub fn dials(&self) -> usize {
        self.dials.load(Ordering::Relaxed)
    }

    /// A live HTTP/2 connection with room for one more stream, if there is one.
    pub(super) fn shared_h2(self: &Arc<Self>) -> Option<PooledConn> {
        // Closed ones are skipped here (not ready) and swept when a connection is added, not at
        // every request.
        let conns = self.h2.lock().ok()?;
        let (cap, most) = self.registry.h2_limits();
        let c = match conns.iter().find(|c| c.has_room(cap)) {
            Some(c) => c,
            // As many connections as allowed, all full: the least busy one queues the stream.
            None if conns.iter().filter(|c| c.sender.is_ready()).count() >= most => conns
                .iter()
                .filter(|c| c.sender.is_ready())
                .min_by_key(|c| c.streams.load(Ordering::Relaxed))?,
            None => return None,
        };
        Some(PooledConn {
            sender: Sender::H2(c.sender.clone()),
            upstream: self.clone(),
            reused: true,
            place: None,
            _stream: Some(StreamSlot::take(&c.streams)),
        })
    }
}
