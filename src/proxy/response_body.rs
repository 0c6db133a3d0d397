//! The response body relayed to the client: the upstream's body (with its connection put back when
//! it ended cleanly), a fixed answer, or an HTTP/2 piece at a time.
//!
//! Owns: relaying and the clean-end bookkeeping. Must not touch: routing or retries.

#[allow(unused_imports)]
use super::*;

pub(super) enum Inner {
    Full(Option<Bytes>),
    Upstream {
        body: Incoming,
        conn: Option<Lease>,
        /// The request counts in its upstream's `in_flight` until its response ends.
        _in_flight: InFlight,
        /// Armed only when the upstream makes the body wait, so a quick response costs no timer;
        /// an upstream that stalls mid-body past `body_idle` ends the response.
        stall: Option<Pin<Box<tokio::time::Sleep>>>,
        body_idle: Duration,
        /// A frame arrived since the stall timer was last armed.
        moved: bool,
    },
}

/// The body of every response limen sends.
pub struct ResponseBody {
    pub(super) inner: Inner,
    pub(super) log: Option<AccessLog>,
    /// HTTP/2: the stream's clock, told when hyper polls and when it was handed data.
    pub(super) stream: Option<Arc<StreamClock>>,
    /// HTTP/2: the rest of a data frame handed over in `H2_PIECE` pieces.
    pub(super) rest: Bytes,
    /// The route compresses this response.
    pub(super) coding: Option<Box<Coding>>,
    /// The answer varies on `Accept-Encoding` (a route with `compress` judged it).
    pub(super) varies: bool,
}

/// A response being compressed on its way through.
pub(super) struct Coding {
    /// None once the coded stream has ended.
    encoder: Option<super::compress::Encoder>,
    /// The upstream's trailers, handed on after the coded stream's end.
    trailers: Option<HeaderMap>,
    /// What the upstream sent that is not coded yet.
    input: Bytes,
    /// Input went in since the output was last handed on: when the upstream pauses, a flush
    /// sends what the client can decode so far (a streamed answer streams).
    unflushed: bool,
    /// The upstream's body has no declared length (a stream): flush whenever it pauses. A body
    /// of declared length is not a stream, so it is coded in full pieces, as nginx does: each
    /// sync flush adds bytes and resets part of the encoder's matching.
    flush_on_pause: bool,
    bytes_in: prometheus_client::metrics::counter::Counter,
    bytes_out: prometheus_client::metrics::counter::Counter,
    _slot: super::compress::CodedSlot,
}

impl Coding {
    /// The output gathered so far, as one data frame.
    fn hand_on(&mut self) -> Frame<Bytes> {
        let out = self.encoder.as_mut().map(|e| e.take()).unwrap_or_default();
        self.bytes_out.inc_by(out.len() as u64);
        Frame::data(out)
    }

    /// Err: no encoder now (`MAX_CODED_STREAMS` are running, or it could not start); the
    /// response goes as it is.
    pub(super) fn new(
        alg: crate::config::Algorithm,
        flush_on_pause: bool,
        metrics: &crate::metrics::Metrics,
    ) -> std::io::Result<Coding> {
        use crate::metrics::{CodingBytesLabels, CodingLabel};
        let Some(slot) = super::compress::CodedSlot::take() else {
            metrics.compression_busy.inc();
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let encoder = super::compress::Encoder::new(alg)?;
        let algorithm = alg.token();
        metrics
            .compressed_responses
            .get_or_create(&CodingLabel { algorithm })
            .inc();
        let bytes = |direction| {
            metrics
                .compression_bytes
                .get_or_create(&CodingBytesLabels {
                    algorithm,
                    direction,
                })
                .clone()
        };
        Ok(Coding {
            encoder: Some(encoder),
            trailers: None,
            input: Bytes::new(),
            unflushed: false,
            flush_on_pause,
            bytes_in: bytes("in"),
            bytes_out: bytes("out"),
            _slot: slot,
        })
    }
}

/// Coded output is handed on once this much has gathered (or the upstream pauses, or ends).
const CODED_PIECE: usize = 32 * 1024;
/// At most this much input is coded per poll before the task yields, so a highly compressible
/// body (output gathers slowly) cannot hold a worker thread.
const CODING_BUDGET: usize = 256 * 1024;

fn coding_error(e: std::io::Error) -> BoxError {
    Box::new(BodyFault(if e.kind() == std::io::ErrorKind::OutOfMemory {
        "response encoder out of memory"
    } else {
        "response encoder failed"
    }))
}

/// HTTP/2 bodies are handed to hyper at most this much at a time. hyper polls for more only once
/// the previous piece has left, so the stream clock measures progress in pieces: a client that
/// reads slowly but steadily never looks stalled, and a stalled stream holds at most one piece
/// (an upstream read can bring 400 KiB at once).
pub(super) const H2_PIECE: usize = 16 * 1024;

impl ResponseBody {
    pub(super) fn full(b: Bytes) -> ResponseBody {
        ResponseBody {
            inner: Inner::Full((!b.is_empty()).then_some(b)),
            log: None,
            stream: None,
            rest: Bytes::new(),
            coding: None,
            varies: false,
        }
    }
}

/// Ends the exchange's lease: the upstream client returns the connection to its pool when both
/// bodies ended cleanly. `ended`: the response body was read to its end (a chunked body never
/// reports `is_end_stream`, even then).
fn finish(conn: &mut Option<Lease>, ended: bool) {
    if let Some(lease) = conn.take() {
        lease.finish(ended);
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper stops polling a body once it reports its end, so the release may happen here.
        if let Inner::Upstream { body, conn, .. } = &mut self.inner {
            finish(conn, body.is_end_stream());
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(s) = &this.stream {
            s.polled();
        }
        let polled = if !this.rest.is_empty() {
            let n = this.rest.len().min(H2_PIECE);
            Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))))
        } else if let Some(mut coding) = this.coding.take() {
            let polled = this.poll_coded(&mut coding, cx);
            this.coding = Some(coding);
            polled
        } else {
            this.poll_inner(cx)
        };
        let polled = match polled {
            Poll::Ready(Some(Ok(frame))) if this.stream.is_some() => {
                Poll::Ready(Some(Ok(match frame.into_data() {
                    Ok(mut data) if data.len() > H2_PIECE => {
                        this.rest = data.split_off(H2_PIECE);
                        Frame::data(data)
                    }
                    Ok(data) => Frame::data(data),
                    Err(other) => other,
                })))
            }
            other => other,
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                if let Some(log) = this.log.as_mut() {
                    log.bytes += d.len() as u64;
                }
                if let Some(s) = &this.stream {
                    s.handed_data();
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        if let Some(c) = &self.coding {
            return self.rest.is_empty() && c.encoder.is_none() && c.trailers.is_none();
        }
        self.rest.is_empty()
            && match &self.inner {
                Inner::Full(b) => b.is_none(),
                Inner::Upstream { body, .. } => body.is_end_stream(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        if self.coding.is_some() {
            return SizeHint::default();
        }
        let inner = match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Upstream { body, .. } => body.size_hint(),
        };
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

impl ResponseBody {
    /// The upstream's body through the encoder: input is coded as it comes; output is handed on
    /// in pieces of `CODED_PIECE`, and whatever is pending when the upstream pauses is flushed.
    /// Memory per stream: the encoder's state (see `compress`) and at most one piece.
    fn poll_coded(
        &mut self,
        coding: &mut Coding,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut budget = CODING_BUDGET;
        loop {
            let Some(enc) = coding.encoder.as_mut() else {
                return Poll::Ready(coding.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            if enc.pending() >= CODED_PIECE {
                return Poll::Ready(Some(Ok(coding.hand_on())));
            }
            // An upstream read can bring 400 KiB at once: it goes in by pieces, so the output
            // gathered between two hand-ons stays near one piece, however well or badly it codes.
            if !coding.input.is_empty() {
                let piece = coding.input.split_to(coding.input.len().min(CODED_PIECE));
                coding.bytes_in.inc_by(piece.len() as u64);
                enc.write(&piece).map_err(coding_error)?;
                coding.unflushed = true;
                budget = budget.saturating_sub(piece.len());
                if budget == 0 {
                    if enc.pending() > 0 {
                        return Poll::Ready(Some(Ok(coding.hand_on())));
                    }
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                continue;
            }
            match self.poll_inner(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => coding.input = data,
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            coding.trailers = Some(t);
                        }
                    }
                },
                Poll::Ready(None) => {
                    let tail = coding
                        .encoder
                        .take()
                        .map(super::compress::Encoder::finish)
                        .transpose()
                        .map_err(coding_error)?
                        .unwrap_or_default();
                    if !tail.is_empty() {
                        coding.bytes_out.inc_by(tail.len() as u64);
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => {
                    if coding.unflushed && coding.flush_on_pause {
                        enc.flush().map_err(coding_error)?;
                        coding.unflushed = false;
                        if enc.pending() > 0 {
                            return Poll::Ready(Some(Ok(coding.hand_on())));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    pub(super) fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream {
                body,
                conn,
                stall,
                body_idle,
                moved,
                ..
            } => match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(None) => {
                    finish(conn, true);
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    conn.take();
                    Poll::Ready(Some(Err(Box::new(e) as BoxError)))
                }
                Poll::Ready(Some(Ok(mut frame))) => {
                    *moved = true;
                    if let Some(t) = frame.trailers_mut() {
                        // Malformed (RFC 9113 8.2.1), as in the response head: relayed, it
                        // would reach the client as it is; the exchange ends broken instead.
                        if crate::headers::padded_value(t) {
                            conn.take();
                            return Poll::Ready(Some(Err(Box::new(BodyFault(
                                "upstream trailer field with whitespace at either end of its value",
                            ))
                                as BoxError)));
                        }
                        clean_trailers(t);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Pending => {
                    let deadline = tokio::time::Instant::now() + *body_idle;
                    match stall {
                        None => *stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
                        Some(s) if *moved => s.as_mut().reset(deadline),
                        Some(_) => {}
                    }
                    *moved = false;
                    match stall.as_mut().map(|s| s.as_mut().poll(cx)) {
                        Some(Poll::Ready(())) => {
                            conn.take();
                            Poll::Ready(Some(Err(Box::new(BodyFault(
                                "upstream response body stalled past timeouts.body_idle",
                            )) as BoxError)))
                        }
                        _ => Poll::Pending,
                    }
                }
            },
        }
    }
}
