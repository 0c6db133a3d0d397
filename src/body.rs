//! The client's request body on its way upstream, with its guards (size, idle, minimum rate),
//! and the state it shares with the exchange that sends it.
//!
//! Owns: `RequestBody` and `BodyState`. Sits below `upstream` (whose connections carry it) and
//! `proxy` (which builds it). Must not touch: routing, connections.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::config::Config;
use crate::headers::clean_trailers;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client's request body as its server connection reads it: hyper's (HTTP/1.1 and HTTP/2),
/// or another server's (HTTP/3), behind one type so every request takes the same stages.
pub enum ClientBody {
    Hyper(Incoming),
    Other(Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
            ClientBody::Other(b) => b.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Other(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Other(b) => b.size_hint(),
        }
    }
}

pub const BODY_OK: u8 = 0;
pub const BODY_DONE: u8 = 1;
pub const BODY_IDLE: u8 = 2;
pub const BODY_SLOW: u8 = 3;
pub const BODY_TOO_LARGE: u8 = 4;
pub const BODY_CLIENT_ERROR: u8 = 5;
pub const BODY_MALFORMED: u8 = 6;

/// Where a request body stands, shared by the body (writer) and the exchange (reader).
#[derive(Debug, Default)]
pub struct BodyState {
    code: AtomicU8,
    /// When the body was fully read, for the response timeout that starts then.
    pub ended: OnceLock<tokio::time::Instant>,
    /// Milliseconds since `ORIGIN`, plus one, when the body last handed a frame to the upstream
    /// connection, which has not asked for the next one since; 0: it is asking (waiting on the
    /// client, or done). A frame handed long ago and no new ask is an upstream that stopped
    /// reading.
    handed: AtomicU64,
}

/// The clock `BodyState::handed` counts from.
fn origin() -> tokio::time::Instant {
    static ORIGIN: OnceLock<tokio::time::Instant> = OnceLock::new();
    *ORIGIN.get_or_init(tokio::time::Instant::now)
}

impl BodyState {
    /// Since when the upstream connection has not asked for more of a body it was handed data
    /// of: None while it is asking (or the body is whole or over).
    pub fn upstream_stalled_since(&self) -> Option<tokio::time::Instant> {
        match self.handed.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(origin() + std::time::Duration::from_millis(ms - 1)),
        }
    }

    pub fn note_asked(&self) {
        self.handed.store(0, Ordering::Relaxed);
    }

    pub fn note_handed(&self) {
        let ms = u64::try_from(origin().elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.handed.store(ms + 1, Ordering::Relaxed);
    }

    pub fn set(&self, code: u8) {
        if code == BODY_DONE {
            let _ = self.ended.set(tokio::time::Instant::now());
        }
        self.code.store(code, Ordering::Relaxed);
    }

    /// The client's failure that ended the body, if one did: the request error it is.
    pub fn fault(&self) -> Option<crate::error::ErrorKind> {
        use crate::error::ErrorKind;
        Some(match self.get() {
            BODY_IDLE => ErrorKind::BodyIdle,
            BODY_SLOW => ErrorKind::BodySlow,
            BODY_TOO_LARGE => ErrorKind::TooLarge,
            BODY_CLIENT_ERROR => ErrorKind::BodyAborted,
            BODY_MALFORMED => ErrorKind::BadRequest("malformed trailer field"),
            _ => return None,
        })
    }

    pub fn get(&self) -> u8 {
        self.code.load(Ordering::Relaxed)
    }
}

/// How long a body may take before `min_body_rate` applies.
const RATE_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyFault(pub &'static str);

/// The client's request body on its way upstream: streams frames through, and fails the body
/// (which aborts the upstream exchange, so that connection is never reused) when the client goes
/// idle, sends too slowly or sends too much.
pub struct RequestBody {
    inner: Option<ClientBody>,
    /// A body already read whole (kept for a retry, or a health check's): sent as it is.
    whole: Option<(Bytes, Option<http::HeaderMap>)>,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    body_idle: Duration,
    started: Instant,
    bytes: u64,
    max: u64,
    min_rate: u64,
    pub state: Arc<BodyState>,
}

impl RequestBody {
    /// `streaming`: a gRPC stream, whose messages may be far apart: it is held to `timeouts.idle`
    /// between frames instead of `body_idle`, and to no minimum rate.
    pub fn new(
        inner: ClientBody,
        cfg: &Config,
        state: Arc<BodyState>,
        streaming: bool,
    ) -> RequestBody {
        let body_idle = if streaming {
            cfg.timeouts.idle
        } else {
            cfg.timeouts.body_idle
        };
        let done = inner.is_end_stream();
        if done {
            state.set(BODY_DONE);
        }
        RequestBody {
            idle: (!done).then(|| Box::pin(tokio::time::sleep(body_idle))),
            inner: (!done).then_some(inner),
            whole: None,
            body_idle,
            started: Instant::now(),
            bytes: 0,
            max: cfg.limits.max_body_bytes,
            min_rate: if streaming {
                0
            } else {
                cfg.limits.min_body_rate
            },
            state,
        }
    }

    /// A body already read whole: `data`, then `trailers` if there are any.
    pub fn whole(data: Bytes, trailers: Option<http::HeaderMap>) -> RequestBody {
        let state = Arc::new(BodyState::default());
        state.set(BODY_DONE);
        RequestBody {
            inner: None,
            whole: Some((data, trailers)),
            idle: None,
            body_idle: Duration::ZERO,
            started: Instant::now(),
            bytes: 0,
            max: 0,
            min_rate: 0,
            state,
        }
    }

    /// Reads the whole body (at most `limit` bytes; the body's own guards apply meanwhile), so it
    /// can be sent more than once. None: the body failed (its state says why) or is over `limit`.
    pub async fn read_whole(mut self, limit: usize) -> Option<(Bytes, Option<http::HeaderMap>)> {
        use http_body_util::BodyExt;
        let mut data = bytes::BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = self.frame().await {
            let frame = frame.ok()?;
            match frame.into_data() {
                Ok(d) => {
                    if data.len() + d.len() > limit {
                        return None;
                    }
                    data.extend_from_slice(&d);
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        Some((data.freeze(), trailers))
    }

    fn fail(
        &mut self,
        code: u8,
        why: &'static str,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state.set(code);
        self.inner = None;
        self.idle = None;
        Poll::Ready(Some(Err(Box::new(BodyFault(why)))))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some((data, trailers)) = this.whole.as_mut() {
            if !data.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(std::mem::take(data)))));
            }
            let trailers = trailers.take();
            this.whole = None;
            return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        // The upstream connection asks for more: whatever it was handed, it took.
        this.state.note_asked();
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(t) = frame.trailers_mut() {
                    // Malformed in HTTP/2 (HTTP/1.1's parser trims it): the message is, whole.
                    if crate::headers::padded_value(t) {
                        return this.fail(
                            BODY_MALFORMED,
                            "a request trailer field with whitespace at either end of its value",
                        );
                    }
                    clean_trailers(t);
                }
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                    if this.max > 0 && this.bytes > this.max {
                        return this
                            .fail(BODY_TOO_LARGE, "request body over limits.max_body_bytes");
                    }
                    let elapsed = this.started.elapsed();
                    if this.min_rate > 0
                        && elapsed > RATE_GRACE
                        && (this.bytes as f64) < this.min_rate as f64 * elapsed.as_secs_f64()
                    {
                        return this
                            .fail(BODY_SLOW, "request body slower than limits.min_body_rate");
                    }
                    if let Some(idle) = this.idle.as_mut() {
                        idle.as_mut()
                            .reset(tokio::time::Instant::now() + this.body_idle);
                    }
                }
                // hyper stops polling once a body reports its end, so note the end here too.
                if this.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
                    this.state.set(BODY_DONE);
                    this.inner = None;
                    this.idle = None;
                } else {
                    this.state.note_handed();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.state.set(BODY_DONE);
                this.inner = None;
                this.idle = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.set(BODY_CLIENT_ERROR);
                this.inner = None;
                this.idle = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                if let Some(idle) = this.idle.as_mut() {
                    if idle.as_mut().poll(cx).is_ready() {
                        return this.fail(BODY_IDLE, "request body idle past timeouts.body_idle");
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let whole_done = self
            .whole
            .as_ref()
            .is_none_or(|(d, t)| d.is_empty() && t.is_none());
        whole_done && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.whole, &self.inner) {
            (Some((data, _)), _) => SizeHint::with_exact(data.len() as u64),
            (None, Some(b)) => b.size_hint(),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}
