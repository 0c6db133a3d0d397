//! The client stream of an HTTP/1.1 connection as hyper sees it. Two things hyper cannot be
//! told: that a closing `shutdown` while the connection is being parked only flushes (the
//! socket and its TLS session stay for the next request), and that a head which overflowed its
//! buffer inside the request line is a 414, not hyper's 431.
//!
//! Must not touch: the bytes of any request or of any response but hyper's own 431.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::watch::Activity;

/// What the line being read (the bytes since the last LF) is, as far as its first bytes tell.
/// A request line is `method SP target SP version`; a header is `name ":" value`; a method and a
/// field name are both tokens, so the first byte that is not a token character decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// Nothing after the last LF yet (or no byte at all).
    Start,
    /// Token characters only so far.
    Token,
    /// A token then a space: a request line.
    Request,
    /// Anything else: a header field, a line of a body, a blank line's CR.
    Other,
}

impl Line {
    /// The line after reading `fresh`. Only the part after its last LF matters, and of that only
    /// up to the first byte that is not a token character.
    fn after(self, fresh: &[u8]) -> Line {
        let (mut line, tail) = match memchr::memrchr(b'\n', fresh) {
            Some(i) => (Line::Start, &fresh[i + 1..]),
            None => (self, fresh),
        };
        for &b in tail {
            if !matches!(line, Line::Start | Line::Token) {
                break;
            }
            line = if is_tchar(b) {
                Line::Token
            } else if b == b' ' {
                Line::Request
            } else {
                Line::Other
            };
        }
        line
    }
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// hyper's answer to a head that outgrew `max_buf_size`, and what it becomes when the line it
/// could not finish was the request line (RFC 9110 §15.5.15).
const HEAD_TOO_LARGE: &[u8] = b"HTTP/1.1 431 ";
const URI_TOO_LONG: &[u8] = b"HTTP/1.1 414 URI Too Long\r\n";

/// The client stream of an HTTP/1.1 connection under hyper: over TLS on the HTTPS listener,
/// the bare socket on the redirect listener.
pub(super) struct H1Io<S> {
    pub(super) inner: S,
    activity: Arc<Activity>,
    /// The line the last byte read belongs to: when hyper gives up on a head, it is the one
    /// hyper could not finish, as a head that overflowed reaches to the last byte read.
    line: Line,
    /// A 431 being sent as a 414: the bytes to write, how many went, and how many of hyper's
    /// bytes they stand for.
    rewrite: Option<(Vec<u8>, usize, usize)>,
}

impl<S> H1Io<S> {
    pub(super) fn new(inner: S, activity: Arc<Activity>) -> H1Io<S> {
        H1Io {
            inner,
            activity,
            line: Line::Start,
            rewrite: None,
        }
    }

    /// hyper's 431 with its status line replaced, if `buf` is that 431 and the request line is
    /// what did not fit.
    fn as_414(&self, buf: &[u8]) -> Option<Vec<u8>> {
        if self.line != Line::Request || !buf.starts_with(HEAD_TOO_LARGE) {
            return None;
        }
        let rest = buf.windows(2).position(|w| w == b"\r\n")? + 2;
        Some([URI_TOO_LONG, &buf[rest..]].concat())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H1Io<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            self.line = self.line.after(&buf.filled()[before..]);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H1Io<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.rewrite.is_none() {
            if let Some(bytes) = self.as_414(buf) {
                self.rewrite = Some((bytes, 0, buf.len()));
            }
        }
        let this = &mut *self;
        if let Some((bytes, sent, stands_for)) = this.rewrite.as_mut() {
            // hyper offers the same bytes again until told they went: the rewritten ones go
            // in their place, and all of hyper's count as written once the last of them has.
            while *sent < bytes.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &bytes[*sent..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                    Poll::Ready(Ok(n)) => *sent += n,
                    other => return other,
                }
            }
            let n = (*stands_for).min(buf.len());
            this.rewrite = None;
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let first = bufs.iter().find(|b| !b.is_empty());
        if self.rewrite.is_some() || first.is_some_and(|b| self.as_414(b).is_some()) {
            // Only ever hyper's 431 and its few headers: one copy to rewrite it whole.
            let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            return self.poll_write(cx, &whole);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.activity.parking() {
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::Line;

    fn line_of(chunks: &[&[u8]]) -> Line {
        chunks.iter().fold(Line::Start, |l, c| l.after(c))
    }

    #[test]
    fn the_line_being_read_is_told_by_its_first_separator() {
        assert_eq!(line_of(&[b"GET /aaaa"]), Line::Request);
        assert_eq!(line_of(&[b"GE", b"T /aa", b"aa"]), Line::Request);
        assert_eq!(
            line_of(&[b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: aaaa"]),
            Line::Other
        );
        assert_eq!(line_of(&[b"GET / HTTP/1.1\r\nX-Pa", b"d: aa"]), Line::Other);
        // A pipelined request after a complete one, split across reads.
        assert_eq!(
            line_of(&[b"GET / HTTP/1.1\r\n\r\nPO", b"ST /up"]),
            Line::Request
        );
        assert_eq!(line_of(&[b"GET / HTTP/1.1\r\n\r\n"]), Line::Start);
        assert_eq!(line_of(&[b"\r\n"]), Line::Start);
        assert_eq!(line_of(&[b"\r"]), Line::Other);
        assert_eq!(line_of(&[b"AAAAAAAA"]), Line::Token);
        // A space inside a header's value does not make it a request line.
        assert_eq!(line_of(&[b"X-A: b c"]), Line::Other);
    }
}
