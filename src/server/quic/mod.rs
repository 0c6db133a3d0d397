//! HTTP/3 over QUIC (`listen.quic`): the endpoint, its TLS (the snapshot's certificates, chosen
//! by SNI as over TCP, renewed at every publish), connections under `max_connections`, and each
//! request stream handed to the same request path as HTTP/1.1 and HTTP/2 (`proxy::handle`).
//!
//! Owns: QUIC transport settings (stream limits, idle timeout, address validation by Retry, no
//! 0-RTT) and moving bytes between h3 streams and limen's bodies. Must not touch: routing or
//! upstreams (the request path's), binding (start and the reload thread bind, as for TCP).

mod body;
mod guard;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use crate::body::ClientBody;
use crate::state::{ConnLimit, Shared, Snapshot};
use crate::watch::Activity;

type H3Conn = h3::server::Connection<guard::Conn, Bytes>;
type RecvStream = h3::server::RequestStream<guard::Recv, Bytes>;
type SendStream = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;

/// Extra unidirectional streams a client may open: HTTP/3's control stream and QPACK's two, with
/// room for a grease stream; more are refused by flow control.
const MAX_UNI_STREAMS: u32 = 8;
/// Bytes a client may send on one request stream, and on a connection, ahead of limen's reads.
const STREAM_WINDOW: u32 = 256 * 1024;
/// Response data is handed to a stream this much at a time.
const WRITE_PIECE: usize = 16 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// The endpoint's Retry-token key: random, made once per listener.
fn token_key() -> Result<Arc<dyn quinn::crypto::HandshakeTokenKey>, String> {
    let mut master = [0u8; 64];
    aws_lc_rs::rand::fill(&mut master)
        .map_err(|_| "no randomness for the Retry key".to_string())?;
    let prk = aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, &[]).extract(&master);
    Ok(Arc::new(prk))
}

/// The QUIC server config of a snapshot: its default rustls config (the same certificates,
/// resolver, ticket keys and session cache as TLS over TCP) with ALPN `h3`, TLS 1.3 only and no
/// early data.
pub(super) fn server_config(
    snap: &Snapshot,
    token_key: &Arc<dyn quinn::crypto::HandshakeTokenKey>,
) -> Result<quinn::ServerConfig, String> {
    let cfg = &snap.config;
    let mut tls = (*snap.tls.default).clone();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    // 0-RTT data can be replayed: off, whatever rustls' default becomes.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| format!("QUIC needs TLS 1.3: {e}"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // One Retry-token key for the endpoint's life: a key per publish would void the tokens of
    // clients between their Retry and their retried Initial.
    server.token_key(token_key.clone());
    // The client's address is read once per connection (`ConnInfo.peer`: access lists, rate
    // limits, X-Forwarded-For), so a connection may not move to another one.
    server.migration(false);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(cfg.limits.quic_max_streams.into())
        .max_concurrent_uni_streams(MAX_UNI_STREAMS.into())
        // Buffers near HTTP/2's (quinn's defaults allow 1.25 MB per stream and no connection
        // limit): a client cannot make limen hold much it has not forwarded yet.
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONNECTION_WINDOW.into())
        .send_window(u64::from(CONNECTION_WINDOW))
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(cfg.timeouts.quic_idle)
                .map_err(|e| format!("timeouts.quic_idle: {e}"))?,
        ));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Serves HTTP/3 on `socket` until `stop`: the endpoint's TLS follows every publish, each new
/// connection proves its address (Retry) and takes a place under `max_connections`.
pub(super) async fn serve(
    socket: std::net::UdpSocket,
    shared: Arc<Shared>,
    conns: Arc<ConnLimit>,
    mut stop: watch::Receiver<bool>,
) {
    let snap = shared.snapshot.load_full();
    let token_key = match token_key() {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve HTTP/3");
            return;
        }
    };
    let config = match server_config(&snap, &token_key) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve HTTP/3");
            return;
        }
    };
    let runtime = Arc::new(quinn::TokioRuntime);
    let endpoint = match quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        runtime,
    ) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve HTTP/3");
            return;
        }
    };
    // Advertised (Alt-Svc) only while an endpoint serves.
    if let Ok(a) = endpoint.local_addr() {
        shared
            .quic_port
            .store(a.port(), std::sync::atomic::Ordering::Relaxed);
    }
    let mut published = shared.published.subscribe();
    let mut generation = snap.generation;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // Address validation: a client proves it receives at its source address before
                // limen spends a handshake on it (spoofed floods get one Retry packet each).
                if !incoming.remote_address_validated() {
                    let _ = incoming.retry();
                    continue;
                }
                let Some(permit) = conns.try_acquire() else {
                    incoming.refuse();
                    continue;
                };
                let (shared, stop) = (shared.clone(), stop.clone());
                tokio::spawn(async move {
                    serve_connection(incoming, shared, stop, permit).await;
                });
            }
            r = published.changed() => {
                if r.is_err() {
                    break;
                }
                let snap = shared.snapshot.load_full();
                if snap.generation != generation {
                    generation = snap.generation;
                    match server_config(&snap, &token_key) {
                        Ok(c) => endpoint.set_server_config(Some(c)),
                        Err(e) => tracing::error!(error = %e, "HTTP/3 keeps its previous TLS settings"),
                    }
                }
            }
            _ = stop.changed() => break,
        }
    }
    // No new connections; the open ones get GOAWAY from their tasks and `shutdown_grace`.
    shared
        .quic_port
        .store(0, std::sync::atomic::Ordering::Relaxed);
    endpoint.set_server_config(None);
    let grace = shared.snapshot.load().config.timeouts.shutdown_grace;
    let _ = tokio::time::timeout(grace, endpoint.wait_idle()).await;
    endpoint.close(quinn::VarInt::from_u32(0), b"");
}

async fn serve_connection(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    permit: crate::state::ConnPermit,
) {
    let peer = incoming.remote_address();
    let handshake = shared.snapshot.load().config.timeouts.handshake;
    let conn = match tokio::time::timeout(handshake, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "QUIC handshake timed out");
            return;
        }
    };
    let sni = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.server_name)
        .map(|s| s.to_ascii_lowercase());
    let snap = shared.snapshot.load_full();
    let presented = snap.certs.select(sni.as_deref()).cloned();
    let info = Arc::new(crate::proxy::ConnInfo {
        peer,
        sni,
        presented,
        forwarding: crate::proxy::PeerForwarding::new(peer.ip()),
        // No client-certificate policy over QUIC: a host under one answers 421 here.
        client_auth: None,
        client_cert: None,
        activity: Arc::new(Activity::new()),
        shutdown: stop.clone(),
        _permit: permit,
    });
    let open = shared
        .metrics
        .connections_open
        .get_or_create_owned(&crate::metrics::ProtocolLabel { protocol: "h3" });
    open.inc();
    let max_field_section = snap.config.limits.max_header_bytes as u64;
    // A request head's QPACK form is hardly larger than the field section it decodes to; this
    // leaves room for any encoder while holding what a hostile one can make limen buffer.
    let frame_cap = max_field_section + 16 * 1024;
    let timeouts = snap.config.timeouts.clone();
    drop(snap);
    // No grease frames on request streams: aioquic (and so the tools built on it) misses the end
    // of a response whose last frame is an unknown one (found by the interop test).
    // A client that never opens its control stream (or gives no credit for ours) cannot hold
    // the connection's place: the HTTP/3 setup is bounded like a handshake.
    let built = tokio::time::timeout(
        timeouts.handshake,
        h3::server::builder()
            .send_grease(false)
            .max_field_section_size(max_field_section)
            .build::<_, Bytes>(guard::Conn::new(conn.clone(), frame_cap)),
    )
    .await;
    let mut h3: H3Conn = match built {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTP/3 connection failed");
            open.dec();
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "HTTP/3 setup timed out");
            open.dec();
            return;
        }
    };
    // PINGs keep QUIC's own idle timer running: a connection with no request in flight for
    // `timeouts.idle` is closed by limen, as over TCP, so it cannot hold a max_connections place.
    let mut idle_check =
        tokio::time::interval(timeouts.idle.min(std::time::Duration::from_secs(1)));
    let mut idle_since = Some(tokio::time::Instant::now());
    // The connection's request streams: at shutdown they finish before it closes.
    let mut requests = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = requests.join_next(), if !requests.is_empty() => {
                if requests.is_empty() {
                    idle_since = Some(tokio::time::Instant::now());
                }
            }
            _ = idle_check.tick() => {
                if idle_since.is_some_and(|t| t.elapsed() >= timeouts.idle) {
                    let _ = tokio::time::timeout(timeouts.write_idle, h3.shutdown(0)).await;
                    let linger = (conn.rtt() * 6 + std::time::Duration::from_millis(100)).min(timeouts.idle);
                    let _ = tokio::time::timeout(linger, conn.closed()).await;
                    break;
                }
            }
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    idle_since = None;
                    let (info, shared) = (info.clone(), shared.clone());
                    let header_read = shared.snapshot.load().config.timeouts.header_read;
                    requests.spawn(async move {
                        // A stream opened with no request head holds a stream slot: bounded
                        // like an HTTP/1.1 head, by `timeouts.header_read`.
                        match tokio::time::timeout(header_read, resolver.resolve_request()).await {
                            Ok(Ok((req, stream))) => serve_request(req, stream, info, shared).await,
                            Ok(Err(e)) => tracing::debug!(error = %e, "HTTP/3 request refused"),
                            Err(_) => tracing::debug!("HTTP/3 request head not received within timeouts.header_read"),
                        }
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "HTTP/3 connection ended");
                    break;
                }
            },
            _ = stop.changed() => {
                // GOAWAY: the requests already accepted finish (within `shutdown_grace`), no
                // new one starts; then the connection closes.
                // GOAWAY names the first request stream not processed: the one after the last
                // accepted (h3 counts from the last accepted).
                let _ = tokio::time::timeout(timeouts.write_idle, h3.shutdown(1)).await;
                let grace = shared.snapshot.load().config.timeouts.shutdown_grace;
                let _ = tokio::time::timeout(grace, async {
                    while requests.join_next().await.is_some() {}
                })
                .await;
                // Closing at once would drop answers still unacknowledged in flight: the client
                // gets a few round trips (a loss or two retransmitted) to take them, or closes
                // first itself.
                let linger = (conn.rtt() * 6 + std::time::Duration::from_millis(100)).min(grace);
                let _ = tokio::time::timeout(linger, conn.closed()).await;
                break;
            }
        }
    }
    open.dec();
}

/// One request stream: its body read as limen's `ClientBody`, the answer from the request path
/// written back with its trailers.
async fn serve_request(
    req: http::Request<()>,
    stream: h3::server::RequestStream<guard::Bidi<Bytes>, Bytes>,
    info: Arc<crate::proxy::ConnInfo>,
    shared: Arc<Shared>,
) {
    let (mut send, recv): (SendStream, RecvStream) = stream.split();
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = body::H3Body::new(recv, declared);
    // A bodiless request (a GET) is known whole at once, so it may be sent again on a retry.
    body.settle();
    let body = ClientBody::Other(Box::pin(body));
    let (mut parts, ()) = req.into_parts();
    parts.version = http::Version::HTTP_3;
    let req = http::Request::from_parts(parts, body);
    // A client that stops reading (its stream window stays shut) is cut off after
    // `timeouts.write_idle` with no progress, as over HTTP/1.1 and HTTP/2.
    let write_idle = shared.snapshot.load().config.timeouts.write_idle;
    let Ok(resp) = crate::proxy::handle(req, info, shared).await;
    let (parts, mut body) = resp.into_parts();
    let head = send.send_response(http::Response::from_parts(parts, ()));
    if !matches!(tokio::time::timeout(write_idle, head).await, Ok(Ok(()))) {
        send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
        return;
    }
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // The upstream's body failed: the client sees the stream reset, not a clean end.
            send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
            return;
        };
        let sent = match frame.into_data() {
            // In pieces, so `write_idle` bounds a stall, not a slow but steady reader.
            Ok(mut data) => loop {
                let piece = data.split_to(data.len().min(WRITE_PIECE));
                let r = tokio::time::timeout(write_idle, send.send_data(piece)).await;
                if data.is_empty() || !matches!(r, Ok(Ok(()))) {
                    break r;
                }
            },
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => {
                    tokio::time::timeout(write_idle, send.send_trailers(trailers)).await
                }
                Err(_) => Ok(Ok(())),
            },
        };
        if !matches!(sent, Ok(Ok(()))) {
            send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
            return;
        }
    }
    let _ = tokio::time::timeout(write_idle, send.finish()).await;
}
