//! Socket wrappers that change one thing about a stream and pass the rest through.
//!
//! Owns: `Prefixed` (serves bytes already read before reading on), `Guarded` (holds a value for as
//! long as the socket lives), `H2Settings` (notes an HTTP/2 peer's `SETTINGS_MAX_CONCURRENT_STREAMS`
//! as its frames pass), and the one write-side delegation they use. Must not touch: what the
//! bytes mean; instrumented sockets with hooks of their own (server's `ConnIo`) stay with their
//! owner.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The write half of a wrapper whose `inner` does all the writing.
macro_rules! delegate_write {
    () => {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    };
}

/// A stream whose first bytes were already read: serves them before reading on.
pub struct Prefixed<T> {
    prefix: bytes::Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: bytes::Bytes, inner: T) -> Prefixed<T> {
        Prefixed { prefix, inner }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The bytes not served yet, and the stream.
    pub fn into_parts(self) -> (bytes::Bytes, T) {
        (self.prefix, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            if self.prefix.is_empty() {
                // An empty `Bytes` split from a buffer still holds the buffer (the first read's
                // 1 KiB, for the life of a keep-alive connection).
                self.prefix = bytes::Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    delegate_write!();
}

/// A stream that holds `G` (a place in a budget, say) until whoever owns the stream last drops it.
pub struct Guarded<T, G> {
    inner: T,
    _guard: G,
}

impl<T, G> Guarded<T, G> {
    pub fn new(inner: T, guard: G) -> Guarded<T, G> {
        Guarded {
            inner,
            _guard: guard,
        }
    }
}

impl<T: AsyncRead + Unpin, G: Unpin> AsyncRead for Guarded<T, G> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin, G: Unpin> AsyncWrite for Guarded<T, G> {
    delegate_write!();
}

/// An HTTP/2 client connection's read side, watched for the server's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` (RFC 9113 6.5.2), which hyper keeps to itself: the pool
/// needs it to open a second connection before requests queue inside the first. Only frame
/// headers are read (9 bytes each; payloads are skipped by their length), and a SETTINGS frame's
/// 6-byte entries; nothing is buffered or changed.
pub struct H2Settings<T> {
    inner: T,
    walker: FrameWalker,
    peer: std::sync::Arc<PeerSettings>,
}

/// What the peer's SETTINGS said so far.
pub struct PeerSettings {
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`; `usize::MAX` until the peer says (RFC 9113: no limit).
    pub max_streams: std::sync::atomic::AtomicUsize,
    /// Notified once, at the first SETTINGS frame (its permit waits for a late waiter).
    pub seen: tokio::sync::Notify,
    first: std::sync::atomic::AtomicBool,
}

impl Default for PeerSettings {
    fn default() -> Self {
        PeerSettings {
            max_streams: std::sync::atomic::AtomicUsize::new(usize::MAX),
            seen: tokio::sync::Notify::new(),
            first: std::sync::atomic::AtomicBool::new(true),
        }
    }
}

impl<T> H2Settings<T> {
    pub fn new(inner: T, peer: std::sync::Arc<PeerSettings>) -> Self {
        H2Settings {
            inner,
            walker: FrameWalker::default(),
            peer,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for H2Settings<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            let (max, settings) = this.walker.feed(&buf.filled()[before..]);
            if let Some(v) = max {
                this.peer
                    .max_streams
                    .store(v as usize, std::sync::atomic::Ordering::Relaxed);
            }
            if settings
                && this
                    .peer
                    .first
                    .swap(false, std::sync::atomic::Ordering::Relaxed)
            {
                this.peer.seen.notify_one();
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H2Settings<T> {
    delegate_write!();
}

/// Where the frames of an HTTP/2 byte stream begin and end, across reads.
#[derive(Default)]
struct FrameWalker {
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
    /// Payload bytes of the current SETTINGS frame still to read, and its entry so far.
    settings: usize,
    entry: [u8; 6],
    entry_len: usize,
}

/// SETTINGS frame type, its ACK flag, and the MAX_CONCURRENT_STREAMS identifier (RFC 9113 6.5).
const FRAME_SETTINGS: u8 = 0x4;
const FLAG_ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

impl FrameWalker {
    /// Walks `data`; returns the last MAX_CONCURRENT_STREAMS value it carried, if any, and
    /// whether a whole SETTINGS frame (not an ACK) ended in it.
    fn feed(&mut self, mut data: &[u8]) -> (Option<u32>, bool) {
        let (mut found, mut settings_ended) = (None, false);
        while !data.is_empty() {
            if self.settings > 0 {
                let n = self.settings.min(data.len());
                for &b in &data[..n] {
                    self.entry[self.entry_len] = b;
                    self.entry_len += 1;
                    if self.entry_len == 6 {
                        self.entry_len = 0;
                        let id = u16::from_be_bytes([self.entry[0], self.entry[1]]);
                        if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                            let e = &self.entry;
                            found = Some(u32::from_be_bytes([e[2], e[3], e[4], e[5]]));
                        }
                    }
                }
                self.settings -= n;
                settings_ended |= self.settings == 0;
                data = &data[n..];
                continue;
            }
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 9 {
                self.header_len = 0;
                let h = &self.header;
                let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                if h[3] == FRAME_SETTINGS && h[4] & FLAG_ACK == 0 && stream == 0 {
                    self.settings = len;
                    self.entry_len = 0;
                    settings_ended |= len == 0;
                } else {
                    self.skip = len;
                }
            }
        }
        (found, settings_ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn the_peers_max_concurrent_streams_is_found_across_reads_of_any_size() {
        let mut bytes = Vec::new();
        // SETTINGS: header table size 4096, max concurrent streams 2.
        bytes.extend(frame(4, 0, 0, &[0, 1, 0, 0, 16, 0, 0, 3, 0, 0, 0, 2]));
        // DATA on stream 1, whose payload looks like a SETTINGS header: skipped.
        bytes.extend(frame(
            0,
            0,
            1,
            &[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 9],
        ));
        // SETTINGS ACK (empty), then new settings: 7.
        bytes.extend(frame(4, 1, 0, &[]));
        bytes.extend(frame(4, 0, 0, &[0, 3, 0, 0, 0, 7]));
        for chunk in [1, 2, 5, 9, 10, bytes.len()] {
            let mut w = FrameWalker::default();
            let mut seen = Vec::new();
            for part in bytes.chunks(chunk) {
                seen.extend(w.feed(part).0);
            }
            // The value in force after each read: the last one a read carried.
            assert_eq!(seen.last(), Some(&7), "reads of {chunk} bytes");
            if chunk <= 21 {
                assert_eq!(seen, [2, 7], "reads of {chunk} bytes");
            }
        }
    }
}
