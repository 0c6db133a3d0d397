//! Dialling an upstream: the descriptor budget's place, TCP connect, TLS with ALPN, and the
//! HTTP/1.1 or HTTP/2 handshake, each bounded by `upstream_connect`; why a dial failed
//! (`DialFailure`) and what that makes of the request (`classify`).
//!
//! Must not touch: pooling decisions (`pool`), requests.

use super::*;

/// Why a dial failed: the cause inside a request error (`classify` makes it one).
#[derive(Debug, thiserror::Error)]
pub enum DialFailure {
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error("connect to {0} failed: {1}")]
    Io(String, std::io::Error),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(String, hyper::Error),
    #[error("TLS with {0} failed: {1}")]
    Tls(String, String),
    #[error("no descriptor left for a new connection to {0} within the connect timeout (the upstream connection budget is in use)")]
    Exhausted(String),
    /// The dial this request waited for, shared with the others that waited.
    #[error("{0}")]
    Shared(Arc<DialFailure>),
    #[error("{0} more requests already wait for a connection to {1}")]
    TooManyWaiting(usize, String),
}

impl DialFailure {
    /// The failure itself, whether this request dialled or waited for another's dial.
    pub fn root(&self) -> &DialFailure {
        match self {
            DialFailure::Shared(e) => e.root(),
            other => other,
        }
    }

    /// The request error it is, with the `result` label of `limen_upstream_requests_total`.
    /// Nothing reached the upstream, so the request fails over; except when limen's own
    /// descriptor budget is what failed, which is neither the upstream's fault nor cured by
    /// another upstream.
    pub(super) fn classify(self) -> (&'static str, crate::error::RequestError) {
        use crate::error::{ErrorKind, RequestError};
        match self.root() {
            DialFailure::Exhausted(_) => (
                "connect_error",
                RequestError::new(ErrorKind::Overloaded).because(self),
            ),
            DialFailure::Tls(..) => ("tls_error", RequestError::unsent(self)),
            _ => ("connect_error", RequestError::unsent(self)),
        }
    }
}

/// The outcome of a shared dial, as every waiter sees it.
pub(super) type DialOutcome = Option<Result<(), Arc<DialFailure>>>;

/// A dial for a shared HTTP/2 connection, run by a task of its own (it finishes, bounded by
/// `upstream_connect`, even when the requests that wanted it are gone) and watched by its waiters.
pub(super) type DialFlight = tokio::sync::watch::Receiver<DialOutcome>;

/// Requests that may wait for one upstream's dial in flight; more fail at once (the upstream is
/// not answering, and a queue would only hold their memory and their clients).
pub const DIAL_WAITERS_MAX: usize = 1024;

/// Why a TLS handshake with an upstream failed, in the words an operator looks for.
pub(super) fn tls_reason(e: &std::io::Error) -> String {
    use rustls::CertificateError as C;
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match err {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                "certificate verification failed: unknown issuer (check upstream_tls.ca)".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "certificate verification failed: name mismatch (check upstream_tls.server_name)"
                    .into()
            }
            C::Expired | C::ExpiredContext { .. } => {
                "certificate verification failed: expired".into()
            }
            other => format!("certificate verification failed: {other:?}"),
        },
        other => other.to_string(),
    }
}

impl Upstream {
    /// A new connection, never a pooled one.
    pub(super) async fn checkout_fresh(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<PooledConn, DialFailure> {
        self.dials.fetch_add(1, Ordering::Relaxed);
        let place = self
            .registry
            .place(connect_timeout)
            .await
            .ok_or_else(|| DialFailure::Exhausted(self.authority.to_string()))?;
        let stream = match tokio::time::timeout(
            connect_timeout,
            tokio::net::TcpStream::connect(&*self.addr),
        )
        .await
        {
            Err(_) => return Err(DialFailure::Timeout(self.authority.to_string())),
            Ok(Err(e)) => return Err(DialFailure::Io(self.authority.to_string(), e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None if self.scheme == UpstreamScheme::Https => Err(DialFailure::Tls(
                self.authority.to_string(),
                "its upstream_tls settings did not load".into(),
            )),
            None if self.scheme == UpstreamScheme::H2c => self.start_h2(stream, place).await,
            None => self.start_h1(stream, place).await,
            Some(dial) => {
                let connector = tokio_rustls::TlsConnector::from(dial.config.clone());
                let tls = match tokio::time::timeout(
                    connect_timeout,
                    connector.connect(dial.server_name.clone(), stream),
                )
                .await
                {
                    Err(_) => return Err(DialFailure::Timeout(self.authority.to_string())),
                    Ok(Err(e)) => {
                        return Err(DialFailure::Tls(self.authority.to_string(), tls_reason(&e)))
                    }
                    Ok(Ok(t)) => t,
                };
                let h2 = dial.force_h2 || tls.get_ref().1.alpn_protocol() == Some(b"h2");
                self.alpn.store(if h2 { 2 } else { 1 }, Ordering::Relaxed);
                if h2 {
                    self.start_h2(tls, place).await
                } else {
                    self.start_h1(tls, place).await
                }
            }
        }
    }

    /// An HTTP/2 connection over `io`, shared by every request to this upstream until it closes.
    pub(super) async fn start_h2<T>(
        self: &Arc<Self>,
        io: T,
        place: Place,
    ) -> Result<PooledConn, DialFailure>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let label = self.authority.clone();
        // The socket holds the descriptor's place: hyper runs it in a task of its own, which
        // outlives the connection future on GOAWAY while streams finish.
        let peer = Arc::new(crate::io::PeerSettings::default());
        let io = crate::io::H2Settings::new(crate::io::Guarded::new(io, place), peer.clone());
        let (interval, timeout) = self.registry.h2_keepalive();
        let header_limit = u32::try_from(self.registry.header_limit()).unwrap_or(u32::MAX);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            // The response head's limit is the same for every upstream protocol (hyper's own
            // default for HTTP/2 is 16 KiB, for HTTP/1.1 about 400 KB).
            .max_header_list_size(header_limit)
            .timer(TokioTimer::new())
            .keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| DialFailure::Handshake(self.authority.to_string(), e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %label, error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        // The server's SETTINGS come first on the connection, within its first round trip:
        // waited for, so the streams this connection is offered for respect its limit. Bounded:
        // a server that never says is taken to allow `limits.upstream_h2_streams`.
        let _ = tokio::time::timeout(H2_SETTINGS_WAIT, peer.seen.notified()).await;
        let streams = Arc::new(AtomicUsize::new(0));
        let slot = StreamSlot::take(&streams);
        if let Ok(mut conns) = self.h2.lock() {
            conns.retain(|c| !c.sender.is_closed());
            conns.push(H2Conn {
                sender: sender.clone(),
                streams,
                peer,
            });
        }
        Ok(PooledConn {
            sender: Sender::H2(sender),
            upstream: self.clone(),
            reused: false,
            place: None,
            _stream: Some(slot),
        })
    }

    /// An HTTP/1.1 connection over `io`, pooled when its exchanges end cleanly.
    pub(super) async fn start_h1<T>(
        self: &Arc<Self>,
        io: T,
        place: Place,
    ) -> Result<PooledConn, DialFailure>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let label = self.authority.clone();
        let (sender, conn) = http1::Builder::new()
            .max_header_size(self.registry.header_limit())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| DialFailure::Handshake(self.authority.to_string(), e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %label, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(PooledConn {
            sender: Sender::H1(sender),
            upstream: self.clone(),
            reused: false,
            place,
            _stream: None,
        })
    }
}
