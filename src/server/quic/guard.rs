//! What a client's bytes may make h3 hold: h3 buffers a HEADERS frame, and skips an unknown
//! one, only once the whole frame has arrived, whatever length its header declares; a client
//! could so make it buffer without bound (reading frees QUIC flow-control credit). This layer
//! sits between quinn and h3, reads each frame header on the streams that carry frames (request
//! streams and the control stream) and closes the connection with H3_EXCESSIVE_LOAD when a
//! frame other than DATA declares more than a bound. It also drops zero-length DATA frames,
//! which h3 would take for the end of a body.
//!
//! Owns: frame headers on the receive side. Must not touch: payloads (passed on as received,
//! not copied), the send side (passed through), HTTP semantics (h3's).

use std::collections::VecDeque;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};

/// H3_EXCESSIVE_LOAD (RFC 9114, 8.1).
const EXCESSIVE_LOAD: u32 = 0x107;
const DATA: u64 = 0x00;
/// WebTransport's bidirectional stream signal: not served by limen.
const WEBTRANSPORT_STREAM: u64 = 0x41;
const CONTROL_STREAM: u64 = 0x00;

/// What every guard of one connection shares: the connection it closes and its bound.
#[derive(Clone)]
struct Guards {
    quic: quinn::Connection,
    /// The largest frame other than DATA a client may send.
    cap: u64,
}

impl Guards {
    fn wrap<S>(&self, inner: S, uni: bool) -> Guarded<S> {
        Guarded {
            inner,
            guard: Guard {
                frames: Frames::new(uni, self.cap),
                ended: false,
                failed: false,
                quic: self.quic.clone(),
            },
        }
    }
}

/// A QUIC connection for h3 whose receive streams are guarded.
pub(super) struct Conn {
    inner: h3_quinn::Connection,
    open: Open,
}

impl Conn {
    pub(super) fn new(quic: quinn::Connection, cap: u64) -> Conn {
        let inner = h3_quinn::Connection::new(quic.clone());
        let open = Open {
            inner: quic::Connection::<Bytes>::opener(&inner),
            guards: Guards { quic, cap },
        };
        Conn { inner, open }
    }
}

/// A request stream, both ways, its receive side guarded.
pub(super) type Bidi<B> = Guarded<h3_quinn::BidiStream<B>>;
/// A receive stream (unidirectional, or a request stream's half), guarded.
pub(super) type Recv = Guarded<h3_quinn::RecvStream>;

impl<B: Buf> quic::Connection<B> for Conn {
    type RecvStream = Recv;
    type OpenStreams = Open;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Recv, ConnectionErrorIncoming>> {
        let inner = ready!(quic::Connection::<B>::poll_accept_recv(&mut self.inner, cx))?;
        Poll::Ready(Ok(self.open.guards.wrap(inner, true)))
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Bidi<B>, ConnectionErrorIncoming>> {
        let inner = ready!(quic::Connection::<B>::poll_accept_bidi(&mut self.inner, cx))?;
        Poll::Ready(Ok(self.open.guards.wrap(inner, false)))
    }

    fn opener(&self) -> Open {
        self.open.clone()
    }
}

/// The connection opens its streams as its opener does.
impl<B: Buf> quic::OpenStreams<B> for Conn {
    type BidiStream = Bidi<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Bidi<B>, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_bidi(&mut self.open, cx)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<h3_quinn::SendStream<B>, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.open, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.open, code, reason);
    }
}

/// Opens streams for h3 (its control and QPACK streams).
#[derive(Clone)]
pub(super) struct Open {
    inner: h3_quinn::OpenStreams,
    guards: Guards,
}

impl<B: Buf> quic::OpenStreams<B> for Open {
    type BidiStream = Bidi<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Bidi<B>, StreamErrorIncoming>> {
        let inner = ready!(quic::OpenStreams::<B>::poll_open_bidi(&mut self.inner, cx))?;
        Poll::Ready(Ok(self.guards.wrap(inner, false)))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<h3_quinn::SendStream<B>, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.inner, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.inner, code, reason);
    }
}

/// A stream whose receive side goes through its guard; its send side, if any, passes through.
pub(super) struct Guarded<S> {
    inner: S,
    guard: Guard,
}

impl<S: quic::RecvStream<Buf = Bytes>> quic::RecvStream for Guarded<S> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let Guarded { inner, guard } = self;
        guard.poll(cx, |cx| inner.poll_data(cx))
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for Bidi<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        quic::SendStream::<B>::poll_ready(&mut self.inner, cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.inner.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        quic::SendStream::<B>::poll_finish(&mut self.inner, cx)
    }

    fn reset(&mut self, reset_code: u64) {
        quic::SendStream::<B>::reset(&mut self.inner, reset_code);
    }

    fn send_id(&self) -> StreamId {
        quic::SendStream::<B>::send_id(&self.inner)
    }
}

impl<B: Buf> quic::BidiStream<B> for Bidi<B> {
    type SendStream = h3_quinn::SendStream<B>;
    type RecvStream = Recv;

    fn split(self) -> (h3_quinn::SendStream<B>, Recv) {
        let (send, inner) = self.inner.split();
        (
            send,
            Guarded {
                inner,
                guard: self.guard,
            },
        )
    }
}

/// Where a stream's reader stands among frame headers and payloads.
#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// A unidirectional stream's type, first.
    StreamType,
    FrameType,
    FrameLength {
        ty: u64,
    },
    Payload {
        left: u64,
    },
    /// Not frames (QPACK's streams, unknown stream types): passed on untouched.
    Opaque,
}

/// A QUIC variable-length integer read a byte at a time (RFC 9000, 16).
#[derive(Default, Clone, Copy)]
struct VarInt {
    value: u64,
    need: u8,
    have: u8,
}

impl VarInt {
    fn push(&mut self, b: u8) -> Option<u64> {
        if self.have == 0 {
            self.need = 1 << (b >> 6);
            self.value = u64::from(b & 0x3f);
        } else {
            self.value = (self.value << 8) | u64::from(b);
        }
        self.have += 1;
        if self.have == self.need {
            let v = self.value;
            *self = VarInt::default();
            Some(v)
        } else {
            None
        }
    }
}

/// A frame too large to buffer, or a flood of frames that carry nothing: the connection is
/// closed.
#[derive(Debug)]
struct Excess;

/// Frames a request stream may send in a row without a byte of body: a head, trailers and some
/// grease are a handful; thousands of empty frames are a flood that costs limen work for no
/// request progress (as CVE-2019-9518 was for HTTP/2).
const MAX_EMPTY_FRAMES: u32 = 1000;

/// One receive stream's frame reader and the connection it closes.
struct Guard {
    frames: Frames,
    ended: bool,
    /// The connection was closed for this stream's frames: every later poll says so again.
    failed: bool,
    quic: quinn::Connection,
}

impl Guard {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        mut inner: impl FnMut(&mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let refused = || {
            Poll::Ready(Err(StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::ApplicationClose {
                    error_code: u64::from(EXCESSIVE_LOAD),
                },
            }))
        };
        loop {
            if self.failed {
                return refused();
            }
            if let Some(piece) = self.frames.out.pop_front() {
                return Poll::Ready(Ok(Some(piece)));
            }
            if self.ended {
                return Poll::Ready(Ok(None));
            }
            match ready!(inner(cx))? {
                Some(chunk) => {
                    if self.frames.feed(chunk).is_err() {
                        tracing::debug!(
                            peer = %self.quic.remote_address(),
                            "HTTP/3 frame larger than limen buffers, or a flood of empty frames: connection closed"
                        );
                        self.quic
                            .close(quinn::VarInt::from_u32(EXCESSIVE_LOAD), b"frame too large");
                        // Nothing of this stream goes on, not even what came before the
                        // offending header: it must not read as a clean end later.
                        self.frames.out.clear();
                        self.failed = true;
                        return refused();
                    }
                }
                None => {
                    // A header cut by the stream's end goes on as it is: h3 reports it.
                    self.frames.end();
                    self.ended = true;
                }
            }
        }
    }
}

/// Frame headers read from a stream's bytes, and the pieces to pass on.
struct Frames {
    state: State,
    var: VarInt,
    /// The bytes of the frame header being read: passed on once it is whole.
    header: BytesMut,
    /// Pieces ready for h3, in order.
    out: VecDeque<Bytes>,
    cap: u64,
    /// A request stream's frames since its last byte of body (`MAX_EMPTY_FRAMES`).
    empty_frames: Option<u32>,
}

impl Frames {
    fn new(uni: bool, cap: u64) -> Frames {
        Frames {
            state: if uni {
                State::StreamType
            } else {
                State::FrameType
            },
            var: VarInt::default(),
            header: BytesMut::new(),
            out: VecDeque::new(),
            cap,
            // The control stream's frames are few and spread over the connection's life.
            empty_frames: (!uni).then_some(0),
        }
    }

    /// The stream ended: a header it cut goes on as it is, for h3 to report.
    fn end(&mut self) {
        if !self.header.is_empty() {
            self.out.push_back(self.header.split().freeze());
        }
    }

    /// Reads `chunk` through the frame headers it holds; payload bytes go on as slices of it.
    fn feed(&mut self, mut chunk: Bytes) -> Result<(), Excess> {
        while !chunk.is_empty() {
            match self.state {
                State::Opaque => {
                    self.out.push_back(chunk);
                    return Ok(());
                }
                State::Payload { left } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                    self.out.push_back(chunk.split_to(n));
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::FrameType
                    } else {
                        State::Payload { left }
                    };
                }
                State::StreamType | State::FrameType | State::FrameLength { .. } => {
                    let b = chunk[0];
                    chunk.advance(1);
                    self.header.extend_from_slice(&[b]);
                    if let Some(v) = self.var.push(b) {
                        self.header_field(v)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// One whole field of a header read: the state that follows it.
    fn header_field(&mut self, v: u64) -> Result<(), Excess> {
        match self.state {
            State::StreamType => {
                self.out.push_back(self.header.split().freeze());
                self.state = if v == CONTROL_STREAM {
                    State::FrameType
                } else {
                    State::Opaque
                };
            }
            State::FrameType => {
                if v == WEBTRANSPORT_STREAM {
                    return Err(Excess);
                }
                self.state = State::FrameLength { ty: v };
            }
            State::FrameLength { ty } => {
                // A length h3 cannot hold (a 32-bit target) would let it lose count of frames.
                if usize::try_from(v).is_err() {
                    return Err(Excess);
                }
                if let Some(n) = self.empty_frames.as_mut() {
                    *n = if ty == DATA && v > 0 { 0 } else { *n + 1 };
                    if *n > MAX_EMPTY_FRAMES {
                        return Err(Excess);
                    }
                }
                if ty == DATA && v == 0 {
                    // Means nothing; h3 would end the body at it.
                    self.header.clear();
                    self.state = State::FrameType;
                    return Ok(());
                }
                if ty != DATA && v > self.cap {
                    return Err(Excess);
                }
                self.out.push_back(self.header.split().freeze());
                self.state = if v == 0 {
                    State::FrameType
                } else {
                    State::Payload { left: v }
                };
            }
            State::Payload { .. } | State::Opaque => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(f: &mut Frames) -> Vec<u8> {
        f.out.drain(..).flat_map(|b| b.to_vec()).collect()
    }

    #[test]
    fn frames_pass_whole_in_any_split_and_empty_data_frames_are_dropped() {
        // HEADERS(3 bytes), DATA(0), DATA(2), unknown 0x21 (1 byte), DATA with a 2-byte length.
        let mut wire = vec![
            0x01, 0x03, 0xaa, 0xbb, 0xcc, 0x00, 0x00, 0x00, 0x02, 0x01, 0x02,
        ];
        wire.extend([0x21, 0x01, 0xff, 0x00, 0x40, 0x03, 7, 8, 9]);
        let mut expect = wire.clone();
        expect.drain(5..7);
        for split in 1..wire.len() {
            let mut f = Frames::new(false, 16);
            for piece in wire.chunks(split) {
                f.feed(Bytes::copy_from_slice(piece)).unwrap();
            }
            f.end();
            assert_eq!(passed(&mut f), expect, "split every {split}");
            assert_eq!(f.state, State::FrameType);
        }
    }

    #[test]
    fn a_large_frame_other_than_data_is_refused_at_its_header() {
        // HEADERS declaring 2^30 - 1 bytes: refused before any payload.
        let mut f = Frames::new(false, 64 * 1024);
        assert!(f
            .feed(Bytes::from_static(&[0x01, 0xbf, 0xff, 0xff, 0xff]))
            .is_err());
        // An unknown (grease) type the same; on the control stream too.
        let mut f = Frames::new(true, 64 * 1024);
        assert!(f
            .feed(Bytes::from_static(&[
                0x00, 0x04, 0x00, 0x40, 0x21, 0x80, 0x01, 0x00, 0x01
            ]))
            .is_err());
        // DATA of any size passes; so does a frame at the bound.
        let mut f = Frames::new(false, 64);
        f.feed(Bytes::from_static(&[0x00, 0xc0, 0, 0, 0, 0x40, 0, 0, 0]))
            .unwrap();
        let mut f = Frames::new(false, 64);
        f.feed(Bytes::from_static(&[0x01, 0x40, 0x40])).unwrap();
        let mut f = Frames::new(false, 64);
        assert!(f.feed(Bytes::from_static(&[0x01, 0x40, 0x41])).is_err());
    }

    #[test]
    fn a_flood_of_empty_frames_on_a_request_stream_is_refused() {
        // Empty DATA and empty grease frames, a body byte now and then: never refused.
        let mut f = Frames::new(false, 64);
        for _ in 0..10 {
            for _ in 0..MAX_EMPTY_FRAMES - 1 {
                f.feed(Bytes::from_static(&[0x00, 0x00])).unwrap();
            }
            f.feed(Bytes::from_static(&[0x00, 0x01, 0x61])).unwrap();
        }
        // One more empty frame in a row than allowed: refused.
        let mut f = Frames::new(false, 64);
        let flood: Vec<u8> = [0x21u8, 0x00].repeat(MAX_EMPTY_FRAMES as usize + 1);
        assert!(f.feed(Bytes::from(flood)).is_err());
        // The control stream has no such count.
        let mut f = Frames::new(true, 64);
        let mut control = vec![0x00u8];
        control.extend([0x21u8, 0x00].repeat(MAX_EMPTY_FRAMES as usize * 2));
        f.feed(Bytes::from(control)).unwrap();
    }

    #[test]
    fn qpack_and_unknown_unidirectional_streams_pass_untouched() {
        for ty in [0x02u8, 0x03, 0x21] {
            let mut f2 = Frames::new(true, 4);
            let wire = [ty, 0x3f, 0xe1, 0xff, 0x01];
            f2.feed(Bytes::copy_from_slice(&wire)).unwrap();
            assert_eq!(passed(&mut f2), wire);
            assert_eq!(f2.state, State::Opaque);
        }
    }
}
