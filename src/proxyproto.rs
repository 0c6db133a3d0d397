//! The PROXY protocol header (v1 text, v2 binary) that an L4 load balancer sends before the
//! client's bytes: read, bounded in size and time, and turned into the client's address.
//!
//! Owns: reading the header off a fresh connection and what its failures are called. The wire
//! format is `ppp`'s. Must not touch: who is allowed to send one (the listener decides, from
//! `listen.proxy_protocol.from`), TLS, HTTP.

use std::net::SocketAddr;

use bytes::Bytes;
use ppp::PartialResult;
use tokio::io::AsyncReadExt;

/// A v1 header is at most 107 bytes; v2 is 16 plus its stated length. Load balancers' TLVs
/// (AWS's VPC endpoint id, GCP's PSC data) are small: more than this is refused.
pub const MAX_HEADER: usize = 4096;

/// Why a connection that had to start with a PROXY header did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The first bytes are not a PROXY header (a client connecting directly, say).
    Missing,
    /// A PROXY header, but a broken one (or too long).
    Malformed,
    /// Not complete within the deadline.
    Timeout,
}

impl Failure {
    /// The `reason` label of `limen_proxy_protocol_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::Timeout => "timeout",
        }
    }
}

/// What a header said: the client's address (None: the LOCAL command, or UNKNOWN / UNSPEC, so the
/// socket's own address stands), and the bytes read past the header (the start of TLS).
#[derive(Debug)]
pub struct Header {
    pub source: Option<SocketAddr>,
    pub rest: Bytes,
}

/// Reads the header that must open `io`, within `deadline`. TLVs are parsed by `ppp` and ignored.
pub async fn read_header<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    deadline: tokio::time::Instant,
) -> Result<Header, Failure> {
    tokio::time::timeout_at(deadline, read(io))
        .await
        .unwrap_or(Err(Failure::Timeout))
}

async fn read<R: tokio::io::AsyncRead + Unpin>(io: &mut R) -> Result<Header, Failure> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = io.read(&mut chunk).await.map_err(|_| Failure::Missing)?;
        if n == 0 {
            // Closed before a whole header: nothing a load balancer would do.
            return Err(if looks_like_header(&buf) {
                Failure::Malformed
            } else {
                Failure::Missing
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse(&buf) {
            Some(result) => return result,
            None if buf.len() >= MAX_HEADER => {
                return Err(if looks_like_header(&buf) {
                    Failure::Malformed
                } else {
                    Failure::Missing
                })
            }
            None => {}
        }
    }
}

/// None: more bytes are needed.
fn parse(buf: &[u8]) -> Option<Result<Header, Failure>> {
    if !looks_like_header(buf) {
        // A prefix of neither signature: a TLS ClientHello, an HTTP request, garbage.
        let could_be = b"PROXY ".starts_with(&buf[..buf.len().min(6)])
            || V2_SIGNATURE.starts_with(&buf[..buf.len().min(12)]);
        return (!could_be).then_some(Err(Failure::Missing));
    }
    let result = ppp::HeaderResult::parse(buf);
    if result.is_incomplete() {
        return None;
    }
    let (len, source) = match result {
        ppp::HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Unknown => None,
            };
            (h.header.len(), source)
        }
        ppp::HeaderResult::V2(Ok(h)) => {
            if h.command == ppp::v2::Command::Proxy && h.protocol == ppp::v2::Protocol::Datagram {
                // A UDP flow's address has nothing to do with this TCP connection.
                return Some(Err(Failure::Malformed));
            }
            let source = match (h.command, h.addresses) {
                (ppp::v2::Command::Local, _) => None,
                (_, ppp::v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, ppp::v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                // UNSPEC or a UNIX socket: no client address to speak of.
                _ => None,
            };
            (h.len(), source)
        }
        _ => return Some(Err(Failure::Malformed)),
    };
    let rest = Bytes::copy_from_slice(buf.get(len..).unwrap_or_default());
    Some(Ok(Header { source, rest }))
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn looks_like_header(buf: &[u8]) -> bool {
    buf.starts_with(b"PROXY ") || buf.starts_with(V2_SIGNATURE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn header(bytes: &[u8]) -> Result<Header, Failure> {
        let mut r = bytes;
        read_header(&mut r, tokio::time::Instant::now() + Duration::from_secs(1)).await
    }

    #[tokio::test]
    async fn v1_and_v2_give_the_source_and_keep_what_follows() {
        let h = header(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n\x16\x03\x01")
            .await
            .unwrap();
        assert_eq!(h.source, Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(&h.rest[..], b"\x16\x03\x01");
        let h = header(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n")
            .await
            .unwrap();
        assert_eq!(h.source, Some("[2001:db8::1]:4000".parse().unwrap()));
        assert_eq!(header(b"PROXY UNKNOWN\r\nrest").await.unwrap().source, None);

        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12 + 4]);
        v2.extend_from_slice(&[198, 51, 100, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x01, 0xbb]);
        v2.extend_from_slice(&[0x04, 0, 1, 42]); // a NOOP TLV, ignored
        v2.extend_from_slice(b"TLS");
        let h = header(&v2).await.unwrap();
        assert_eq!(h.source, Some("198.51.100.9:8080".parse().unwrap()));
        assert_eq!(&h.rest[..], b"TLS");
        // LOCAL (a health check of the balancer itself): the socket's address stands.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(header(&local).await.unwrap().source, None);
    }

    #[tokio::test]
    async fn no_header_a_broken_one_and_a_slow_one_fail_as_such() {
        assert_eq!(
            header(b"\x16\x03\x01\x02\x00").await.unwrap_err(),
            Failure::Missing
        );
        assert_eq!(
            header(b"GET / HTTP/1.1\r\n").await.unwrap_err(),
            Failure::Missing
        );
        assert_eq!(
            header(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n")
                .await
                .unwrap_err(),
            Failure::Malformed
        );
        assert_eq!(
            header(b"PROXY TCP4 1.2.3.4").await.unwrap_err(),
            Failure::Malformed
        );
        let long = [b"PROXY ".as_slice(), &[b'1'; 5000]].concat();
        assert_eq!(header(&long).await.unwrap_err(), Failure::Malformed);
        let (mut a, _b) = tokio::io::duplex(64);
        let slow = read_header(
            &mut a,
            tokio::time::Instant::now() + Duration::from_millis(50),
        )
        .await;
        assert_eq!(slow.unwrap_err(), Failure::Timeout);
    }
}
