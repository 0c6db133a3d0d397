//! An HTTP/3 request stream's receive side as limen's request body.

use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame};

use super::RecvStream;
use crate::body::{BodyFault, BoxError};

type Polled = Option<Result<Frame<Bytes>, BoxError>>;

/// An HTTP/3 request body as an `http_body::Body`: data, then trailers. HTTP/3 does not hold a
/// body to its Content-Length (HTTP/2's h2 does): this does, so an HTTP/1.1 upstream never
/// reads a body cut or padded against its declared length.
pub(super) struct H3Body {
    recv: RecvStream,
    /// The request's Content-Length, if it gave one.
    declared: Option<u64>,
    seen: u64,
    data_done: bool,
    done: bool,
    /// What `settle` read, given out first.
    stash: Option<Polled>,
}

impl H3Body {
    pub(super) fn new(recv: RecvStream, declared: Option<u64>) -> H3Body {
        H3Body {
            recv,
            declared,
            seen: 0,
            data_done: false,
            done: false,
            stash: None,
        }
    }

    /// Reads what has already arrived, without waiting: a request whose stream ended with its
    /// head is then known to have no body (`is_end_stream`).
    pub(super) fn settle(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(polled) = self.poll_next(&mut cx) {
            self.stash = Some(polled);
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Polled> {
        let this = self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match this.recv.poll_recv_data(cx) {
                Poll::Ready(Ok(Some(mut buf))) => {
                    let n = buf.remaining();
                    this.seen += n as u64;
                    if this.declared.is_some_and(|d| this.seen > d) {
                        this.done = true;
                        return Poll::Ready(Some(Err(Box::new(BodyFault(
                            "request body longer than its Content-Length",
                        )))));
                    }
                    return Poll::Ready(Some(Ok(Frame::data(buf.copy_to_bytes(n)))));
                }
                Poll::Ready(Ok(None)) => {
                    this.data_done = true;
                    if this.declared.is_some_and(|d| this.seen != d) {
                        this.done = true;
                        return Poll::Ready(Some(Err(Box::new(BodyFault(
                            "request body shorter than its Content-Length",
                        )))));
                    }
                }
                Poll::Ready(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.recv.poll_recv_trailers(cx) {
            Poll::Ready(Ok(t)) => {
                this.done = true;
                Poll::Ready(t.map(|t| Ok(Frame::trailers(t))))
            }
            Poll::Ready(Err(e)) => {
                this.done = true;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Body for H3Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.stash.take() {
            Some(polled) => Poll::Ready(polled),
            None => this.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && matches!(self.stash, None | Some(None))
    }
}
