//! Response compression for routes with `compress`: what a client accepts, whether a response
//! may be compressed, the header edits that go with it, and the streaming encoders.
//!
//! Owns: negotiation (`Accept-Encoding` with q-values) and the per-stream encoder, whose memory is
//! bounded by the levels and windows chosen here. Must not touch: the route's own response edits,
//! which run after it (`handle`, which keeps `Vary` beside them), or the relay's timers
//! (`response_body`).

use std::io::Write;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};

use crate::config::{Algorithm, Compress};

// Levels and windows, measured on streamed JSON coded in 32 KiB pieces (docs/performance.md):
// state per stream, CPU per MiB and ratio.
/// gzip 5: ~0.36 MiB, ~13 ms/MiB, 0.20 (6, zlib's default: 18 ms for 0.201).
const GZIP_LEVEL: u32 = 5;
/// brotli 3 with a 256 KiB window: ~0.6 MiB, ~9 ms/MiB, 0.21. Quality 4 needs 1.5 MiB and 5 needs
/// 2 MiB per stream for a percent of size.
const BR_QUALITY: u32 = 3;
const BR_WINDOW_LOG: u32 = 18;
/// zstd 3 (its default) with a 1 MiB window: ~1 MiB, ~4 ms/MiB, 0.20; decoders must accept up to
/// 8 MiB (RFC 9659).
const ZSTD_LEVEL: i32 = 3;
const ZSTD_WINDOW_LOG: u32 = 20;

/// Responses coded at once, process-wide: past this, responses go uncompressed (with `Vary`)
/// until some end, so encoder state stays bounded whatever the traffic: about 0.4 GiB of gzip,
/// 0.6 of br, 1 of zstd at most.
pub(super) const MAX_CODED_STREAMS: usize = 1024;
static CODED_STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A place among the `MAX_CODED_STREAMS`, given back on drop.
pub(super) struct CodedSlot(());

impl CodedSlot {
    pub(super) fn take() -> Option<CodedSlot> {
        use std::sync::atomic::Ordering;
        CODED_STREAMS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CODED_STREAMS).then_some(n + 1)
            })
            .ok()
            .map(|_| CodedSlot(()))
    }
}

impl Drop for CodedSlot {
    fn drop(&mut self) {
        CODED_STREAMS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What a client's `Accept-Encoding` allows, for one route's algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Negotiated {
    /// The route's algorithm the client rates highest (ties: the route's order); None: none.
    pub(super) coding: Option<Algorithm>,
    /// `identity;q=0` (or `*;q=0` with no word on identity): the body must be coded, so
    /// `min_bytes` is waived.
    pub(super) identity_refused: bool,
    /// A `Range` request: its answer is left alone (a 206's ranges are of the identity body).
    pub(super) range: bool,
    /// A HEAD request: its answer gets the head a GET would, and no encoder (it has no body,
    /// and an HTTP/2 client refuses DATA on a HEAD answer).
    pub(super) head: bool,
}

/// At most this many codings of a request's `Accept-Encoding` are read: real clients send four.
const MAX_CODINGS: usize = 32;

/// A coding's q-value in thousandths; None when malformed (the entry is then ignored).
fn qvalue(params: &str) -> Option<u16> {
    let mut q = 1000;
    for p in params.split(';') {
        let Some((k, v)) = p.split_once('=') else {
            continue;
        };
        if !k.trim().eq_ignore_ascii_case("q") {
            continue;
        }
        let v = v.trim();
        let (int, frac) = v.split_once('.').unwrap_or((v, ""));
        if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let thousandths = match int {
            "0" => frac
                .bytes()
                .chain(std::iter::repeat(b'0'))
                .take(3)
                .fold(0u16, |n, b| n * 10 + u16::from(b - b'0')),
            "1" if frac.bytes().all(|b| b == b'0') => 1000,
            _ => return None,
        };
        q = thousandths;
    }
    Some(q)
}

pub(super) fn negotiate(c: &Compress, method: &http::Method, headers: &HeaderMap) -> Negotiated {
    let mut rated: Vec<(&str, u16)> = Vec::new();
    for line in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(line) = line.to_str() else { continue };
        for entry in line
            .split(',')
            .take(MAX_CODINGS.saturating_sub(rated.len()))
        {
            let (name, params) = entry.split_once(';').unwrap_or((entry, ""));
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            if let Some(q) = qvalue(params) {
                rated.push((name, q));
            }
        }
    }
    let q_of = |token: &str| {
        rated
            .iter()
            .find(|(n, _)| {
                n.eq_ignore_ascii_case(token)
                    || (token == "gzip" && n.eq_ignore_ascii_case("x-gzip"))
            })
            .map(|(_, q)| *q)
    };
    let any = q_of("*");
    let mut best: Option<(Algorithm, u16)> = None;
    for &alg in &c.algorithms {
        let q = q_of(alg.token()).or(any).unwrap_or(0);
        if q > 0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((alg, q));
        }
    }
    Negotiated {
        coding: best.map(|(a, _)| a),
        identity_refused: q_of("identity").or(any) == Some(0),
        range: headers.contains_key(header::RANGE),
        head: method == http::Method::HEAD,
    }
}

/// What the relay does with one response.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Not a candidate: relayed as it is.
    Untouched,
    /// A candidate the client takes as it is: relayed with `Vary: Accept-Encoding`, so a cache
    /// does not hand it to a client that would have had it compressed (or the reverse).
    VaryOnly,
    Compress(Algorithm),
}

fn no_transform(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
}

/// Whether this response may be compressed for this client.
pub(super) fn decide(
    c: &Compress,
    client: Negotiated,
    status: StatusCode,
    headers: &HeaderMap,
) -> Decision {
    let bodyless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::PARTIAL_CONTENT;
    // Every line: `identity` then `gzip` on two lines is a gzip body.
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    // Event streams and gRPC carry messages meant to arrive one by one, and gRPC compresses
    // per message itself; neither is ever compressed here, whatever `types` says.
    let streamed = essence.eq_ignore_ascii_case("text/event-stream")
        || essence
            .get(..16)
            .is_some_and(|p| p.eq_ignore_ascii_case("application/grpc"));
    if bodyless
        || client.range
        || encoded
        || streamed
        || no_transform(headers)
        || !c.compressible(content_type)
    {
        return Decision::Untouched;
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n < c.min_bytes) && !client.identity_refused {
        return Decision::Untouched;
    }
    match client.coding {
        Some(alg) => Decision::Compress(alg),
        None => Decision::VaryOnly,
    }
}

/// A 304 to a client that would get a coded 200: it must carry the validator and `Vary` that
/// 200 carried (RFC 9110 15.4.5), so a cache matches it to the stored, coded response.
/// Whether it changed anything (the response varies on `Accept-Encoding`).
pub(super) fn not_modified(client: Negotiated, headers: &mut HeaderMap) -> bool {
    if client.coding.is_none() || client.range {
        return false;
    }
    add_vary(headers);
    weaken_etag(headers);
    true
}

/// `Vary: Accept-Encoding`, unless the response already varies on it (or on everything).
pub(super) fn add_vary(headers: &mut HeaderMap) {
    let varies = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|v| v == "*" || v.eq_ignore_ascii_case("accept-encoding"));
    if !varies {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// The head of a response whose body is coded with `alg`: its length is unknown now, ranges of
/// it cannot be served, a strong validator of the identity body is only a weak one of this, and
/// a digest of the identity content no longer holds.
pub(super) fn code_head(headers: &mut HeaderMap, alg: Algorithm) {
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_RANGES);
    headers.remove("content-digest");
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(alg.token()),
    );
    add_vary(headers);
    weaken_etag(headers);
}

/// A strong `ETag` made weak (`W/"…"`): the coded body is not the identity body byte for byte.
fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(etag) = headers.get(header::ETAG) {
        if !etag.as_bytes().starts_with(b"W/") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            match HeaderValue::from_bytes(&weak) {
                Ok(v) => {
                    headers.insert(header::ETAG, v);
                }
                Err(_) => {
                    headers.remove(header::ETAG);
                }
            }
        }
    }
}

/// One response's encoder. Output accumulates in a `Vec` the relay drains after every write.
pub(super) enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    pub(super) fn new(alg: Algorithm) -> std::io::Result<Encoder> {
        Ok(match alg {
            Algorithm::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(GZIP_LEVEL),
            )),
            Algorithm::Br => Encoder::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                16 * 1024,
                BR_QUALITY,
                BR_WINDOW_LOG,
            ))),
            Algorithm::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
                e.window_log(ZSTD_WINDOW_LOG)?;
                Encoder::Zstd(e)
            }
        })
    }

    pub(super) fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.write_all(data),
            Encoder::Br(e) => e.write_all(data),
            Encoder::Zstd(e) => e.write_all(data),
        }
    }

    /// Makes everything written so far decodable by the client (a sync flush).
    pub(super) fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Br(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Br(e) => e.get_mut(),
            Encoder::Zstd(e) => e.get_mut(),
        }
    }

    pub(super) fn pending(&mut self) -> usize {
        self.output().len()
    }

    /// The output so far.
    pub(super) fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(self.output()))
    }

    /// Ends the coded stream: the rest of the output.
    pub(super) fn finish(self) -> std::io::Result<Bytes> {
        Ok(Bytes::from(match self {
            Encoder::Gzip(e) => e.finish()?,
            Encoder::Br(e) => e.into_inner(),
            Encoder::Zstd(e) => e.finish()?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(algs: &[Algorithm]) -> Compress {
        Compress {
            algorithms: algs.to_vec(),
            min_bytes: 1024,
            types: crate::config::DEFAULT_TYPES
                .iter()
                .map(|t| t.to_string())
                .collect(),
        }
    }

    fn ae(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
        h
    }

    #[test]
    fn q_values_pick_the_coding_and_ties_go_to_the_routes_order() {
        use Algorithm::*;
        let c = route(&[Br, Gzip]);
        let pick = |v: &str| negotiate(&c, &http::Method::GET, &ae(v)).coding;
        assert_eq!(pick("gzip, deflate, br, zstd"), Some(Br));
        assert_eq!(pick("gzip;q=1.0, br;q=0.5"), Some(Gzip));
        assert_eq!(pick("br;q=0, gzip"), Some(Gzip));
        assert_eq!(pick("x-gzip"), Some(Gzip));
        assert_eq!(pick("*"), Some(Br));
        assert_eq!(pick("*;q=0.1, br;q=0"), Some(Gzip));
        assert_eq!(pick("zstd, deflate"), None);
        assert_eq!(pick("identity"), None);
        assert_eq!(pick(""), None);
        // Malformed q-values drop their entry, never the whole field.
        assert_eq!(pick("br;q=2, gzip;q=0.0001, gzip;q=0.5"), Some(Gzip));
        assert_eq!(pick("br;q=abc"), None);
        assert_eq!(
            negotiate(&c, &http::Method::GET, &HeaderMap::new()).coding,
            None
        );
        // zstd only when the route lists it.
        assert_eq!(
            negotiate(&route(&[Zstd, Gzip]), &http::Method::GET, &ae("zstd, gzip")).coding,
            Some(Zstd)
        );
        assert!(negotiate(&c, &http::Method::GET, &ae("gzip, identity;q=0")).identity_refused);
        assert!(negotiate(&c, &http::Method::GET, &ae("gzip, *;q=0")).identity_refused);
        assert!(
            !negotiate(&c, &http::Method::GET, &ae("gzip, identity;q=0.5, *;q=0")).identity_refused
        );
    }

    #[test]
    fn only_sizable_uncoded_text_with_a_body_is_compressed() {
        let c = route(&[Algorithm::Gzip]);
        let gzip = negotiate(&c, &http::Method::GET, &ae("gzip"));
        let head = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let json = head(&[("content-type", "application/json")]);
        let ok = StatusCode::OK;
        assert_eq!(
            decide(&c, gzip, ok, &json),
            Decision::Compress(Algorithm::Gzip)
        );
        for (status, headers) in [
            (StatusCode::NO_CONTENT, json.clone()),
            (StatusCode::NOT_MODIFIED, json.clone()),
            (StatusCode::PARTIAL_CONTENT, json.clone()),
            (ok, head(&[("content-type", "image/png")])),
            (ok, head(&[("content-type", "text/event-stream")])),
            (ok, head(&[("content-type", "application/grpc+proto")])),
            (
                ok,
                head(&[("content-type", "text/html"), ("content-encoding", "br")]),
            ),
            (
                ok,
                head(&[
                    ("content-type", "text/html"),
                    ("cache-control", "public, no-transform"),
                ]),
            ),
            (
                ok,
                head(&[("content-type", "text/html"), ("content-length", "1023")]),
            ),
            (ok, head(&[])),
        ] {
            assert_eq!(
                decide(&c, gzip, status, &headers),
                Decision::Untouched,
                "{status} {headers:?}"
            );
        }
        let ranged = Negotiated {
            range: true,
            ..gzip
        };
        assert_eq!(decide(&c, ranged, ok, &json), Decision::Untouched);
        let must = negotiate(&c, &http::Method::GET, &ae("gzip, identity;q=0"));
        let small = head(&[("content-type", "text/html"), ("content-length", "10")]);
        assert_eq!(
            decide(&c, must, ok, &small),
            Decision::Compress(Algorithm::Gzip)
        );
        let none = negotiate(&c, &http::Method::GET, &ae("br"));
        assert_eq!(decide(&c, none, ok, &json), Decision::VaryOnly);
    }

    #[test]
    fn a_coded_head_loses_its_length_and_ranges_and_its_etag_turns_weak() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, "5000".parse().unwrap());
        h.insert(header::ACCEPT_RANGES, "bytes".parse().unwrap());
        h.insert(header::ETAG, "\"abc\"".parse().unwrap());
        h.insert(header::VARY, "Origin".parse().unwrap());
        code_head(&mut h, Algorithm::Br);
        assert_eq!(h.get(header::CONTENT_LENGTH), None);
        assert_eq!(h.get(header::ACCEPT_RANGES), None);
        assert_eq!(h[header::CONTENT_ENCODING], "br");
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        let vary: Vec<_> = h.get_all(header::VARY).iter().collect();
        assert_eq!(vary, ["Origin", "accept-encoding"]);
        // Already weak, already varying: unchanged.
        code_head(&mut h, Algorithm::Br);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        assert_eq!(h.get_all(header::VARY).iter().count(), 2);
    }

    #[test]
    fn each_encoder_round_trips_with_a_flush_in_the_middle() {
        let text = "limen compresses streamed JSON {\"k\": [1, 2, 3]} ".repeat(2000);
        for alg in [Algorithm::Gzip, Algorithm::Br, Algorithm::Zstd] {
            let mut e = Encoder::new(alg).unwrap();
            let (a, b) = text.as_bytes().split_at(text.len() / 2);
            e.write(a).unwrap();
            e.flush().unwrap();
            let mut out = e.take().to_vec();
            assert!(
                !out.is_empty(),
                "{alg:?}: a flush hands out what was written"
            );
            e.write(b).unwrap();
            out.extend_from_slice(&e.finish().unwrap());
            assert!(out.len() < text.len() / 10, "{alg:?}: {}", out.len());
            let mut back = Vec::new();
            match alg {
                Algorithm::Gzip => {
                    std::io::Read::read_to_end(
                        &mut flate2::read::GzDecoder::new(&out[..]),
                        &mut back,
                    )
                    .unwrap();
                }
                Algorithm::Br => {
                    brotli::BrotliDecompress(&mut &out[..], &mut back).unwrap();
                }
                Algorithm::Zstd => back = zstd::decode_all(&out[..]).unwrap(),
            }
            assert_eq!(back, text.as_bytes(), "{alg:?}");
        }
    }
}
