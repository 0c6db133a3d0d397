//! Raw HTTP/2 for tests that must break the rules a real client keeps: frames written by hand
//! over a TLS connection that negotiated h2, and the server's frames read back.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Client, Proto};

/// The host the raw requests name (and the SNI they send).
pub const HOST: &str = "app.example.test";

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;
pub const CANCEL: u32 = 0x8;

/// One frame: 24-bit length, type, flags, 31-bit stream id, payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    assert!(len < 1 << 24);
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for `GET https://HOST/`: static-table :method GET, :scheme https, :path /, then
/// :authority as a literal without indexing whose name is static entry 1.
pub fn hpack_get() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x84, 0x01, u8::try_from(HOST.len()).unwrap()];
    b.extend_from_slice(HOST.as_bytes());
    b
}

/// About 1 KB of header block: one literal field without indexing, new name `x-pad`, a 1000-byte
/// value (length 1000 = 127 + 873 in HPACK's 7-bit prefix integer: 0x7f, 0xe9, 0x06).
pub fn hpack_padding_field() -> Vec<u8> {
    let mut b = vec![0x00, 0x05];
    b.extend_from_slice(b"x-pad");
    b.extend_from_slice(&[0x7f, 0xe9, 0x06]);
    b.extend_from_slice(&[b'a'; 1000]);
    b
}

pub type TlsRead = tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>;
pub type TlsWrite = tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>;

/// A TLS connection that negotiated h2, with the client preface and an empty SETTINGS written.
pub async fn raw_h2(client: &Client, addr: SocketAddr) -> (Frames, TlsWrite) {
    let mut tls = client.connect(addr, HOST, Proto::H2).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    tls.flush().await.unwrap();
    let (rd, wr) = tokio::io::split(tls);
    (
        Frames {
            rd,
            buf: Vec::new(),
        },
        wr,
    )
}

/// Writes `burst` in the background, so the test can read at the same time (a server that stops
/// reading must not stall the test). Write errors are expected once the server hangs up.
pub fn write_in_background(mut wr: TlsWrite, burst: Vec<u8>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = wr.write_all(&burst).await;
        let _ = wr.flush().await;
        // Keep our side open: only the server may end the connection.
        std::future::pending::<()>().await;
    })
}

pub struct H2Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Server frames, parsed from the TLS plaintext.
pub struct Frames {
    rd: TlsRead,
    buf: Vec<u8>,
}

impl Frames {
    /// The next whole frame; None once the connection ends. Cancel-safe.
    pub async fn next(&mut self) -> Option<H2Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = H2Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Ended {
    /// The server sent GOAWAY with this error code.
    GoAway(u32),
    /// The connection ended without a GOAWAY.
    Closed,
    /// The caller's condition was met.
    Done,
    TimedOut,
}

/// Reads server frames until GOAWAY, the end of the connection, `done` returning true, or
/// `patience`.
pub async fn watch(
    frames: &mut Frames,
    patience: Duration,
    mut done: impl FnMut(&H2Frame) -> bool,
) -> Ended {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, frames.next()).await {
            Err(_) => return Ended::TimedOut,
            Ok(None) => return Ended::Closed,
            Ok(Some(f)) if f.kind == GOAWAY => {
                let code = f
                    .payload
                    .get(4..8)
                    .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                return Ended::GoAway(code);
            }
            Ok(Some(f)) => {
                if done(&f) {
                    return Ended::Done;
                }
            }
        }
    }
}
