//! Property fuzzing of everything that parses input from a file or the network, on the stable
//! toolchain: the YAML config loader, certificate and key PEM/DER, the path normalizer, and the
//! request/response header stages. Each target replays its saved corpus (`tests/fuzz-corpus/`)
//! and then runs generated cases; `LIMEN_FUZZ_CASES` sets how many (the defaults keep the whole file
//! near 20 seconds on two cores, with some 1.2 million generated inputs). A failure proptest finds is shrunk and saved under
//! `tests/fuzz.proptest-regressions`, which later runs replay first; a crash found this way also
//! becomes a named case in the corpus.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};
use limen::config::{Config, EscapedSlashes};
use limen::normalize::{normalize_path, PathError};
use limen::proxy::{forwarded_request_headers, relayed_response_headers, HeaderPolicy};
use proptest::prelude::*;

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("LIMEN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        max_shrink_iters: 2000,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    }
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

// ---------------------------------------------------------------- the config loader

/// Any text: a config or an error, never a panic, and quickly.
fn config_target(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let started = Instant::now();
    let result = Config::parse(&text, Path::new("/fuzz/proxy.yaml"));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    if let Err(e) = result {
        let msg = e.to_string();
        assert!(msg.starts_with("/fuzz/proxy.yaml"), "names the file: {msg}");
    }
}

/// Fragments of limen's schema and of YAML's syntax, so generated text gets past the parser into
/// validation often.
const YAML_TOKENS: &[&str] = &[
    "listen:",
    "https:",
    "\"127.0.0.1:0\"",
    "\"[::1]:0\"",
    "admin:",
    "tls:",
    "self_signed: true",
    "cert_dirs:",
    "routes:",
    "- host:",
    "\"*\"",
    "\"*.a.test\"",
    "a.test",
    "path:",
    "/api",
    "upstreams:",
    "[\"http://127.0.0.1:1\"]",
    "respond:",
    "{}",
    "status:",
    "204",
    "timeouts:",
    "idle:",
    "5s",
    "0ms",
    "limits:",
    "max_connections:",
    "0",
    "99999999999999999999",
    "path_normalization:",
    "escaped_slashes:",
    "reject",
    "allow_underscores_in_headers:",
    "trusted_proxies:",
    "[\"10.0.0.0/8\"]",
    "&a",
    "*a",
    "<<:",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "-",
    "?",
    "|",
    ">",
    "!!str",
    "!!binary",
    "#",
    "'",
    "\"",
    "\\",
    "\t",
    " ",
    "  ",
    "\n",
    "\n  ",
    "\n    ",
    "---",
    "...",
    "~",
    "null",
    "\u{feff}",
    "\u{0}",
];

fn yaml_soup() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(YAML_TOKENS), 0..80)
        .prop_map(|t| t.join(" ").into_bytes())
}

#[test]
fn config_corpus() {
    for (path, bytes) in corpus("config") {
        let started = Instant::now();
        config_target(&bytes);
        eprintln!("{}: {:?}", path.display(), started.elapsed());
    }
}

#[test]
fn config_alias_bomb_and_deep_nesting_are_refused_quickly() {
    // Made here rather than stored: a million-fold expansion and 100,000 levels.
    let mut bomb = String::from("a: &a [x,x,x,x,x,x,x,x,x,x]\n");
    for (p, c) in "abcdefgh".chars().zip("bcdefghi".chars()) {
        bomb.push_str(&format!(
            "{c}: &{c} [{}]\n",
            vec![format!("*{p}"); 10].join(",")
        ));
    }
    bomb.push_str("listen: *i\n");
    for text in [
        bomb,
        format!("routes: {}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!("listen: {}1{}", "{a: ".repeat(100_000), "}".repeat(100_000)),
    ] {
        let started = Instant::now();
        let result = Config::parse(&text, Path::new("/fuzz/proxy.yaml"));
        assert!(result.is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}

proptest! {
    #![proptest_config(cases(200_000))]
    #[test]
    fn config_never_panics(bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..512), yaml_soup()]) {
        config_target(&bytes);
    }
}

// ---------------------------------------------------------------- certificates and keys

struct Material {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    der: Vec<u8>,
}

fn material() -> &'static Material {
    static M: OnceLock<Material> = OnceLock::new();
    M.get_or_init(|| {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["fuzz.test".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        Material {
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
            der: cert.der().to_vec(),
        }
    })
}

fn tls() -> &'static limen::tls::TlsShared {
    static T: OnceLock<limen::tls::TlsShared> = OnceLock::new();
    T.get_or_init(|| limen::tls::TlsShared::new().unwrap())
}

/// Any cert and key bytes: a loaded pair or an error naming a file, never a panic.
fn pem_target(cert: &[u8], key: &[u8]) {
    let src = limen::tls::CertSource {
        cert: PathBuf::from("/fuzz/tls.crt"),
        key: PathBuf::from("/fuzz/tls.key"),
    };
    match limen::tls::parse_pair(cert, key, &src, tls().provider()) {
        Ok(loaded) => assert!(!loaded.names.is_empty()),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("/fuzz/tls."), "names a file: {msg}");
        }
    }
}

/// A valid input with some bytes changed and perhaps cut short.
fn mutated(base: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(move |(flips, cut, truncate)| {
            let mut b = base.to_vec();
            for (i, v) in flips {
                let at = i.index(b.len());
                b[at] = v;
            }
            if truncate {
                b.truncate(cut.index(b.len() + 1));
            }
            b
        })
}

#[test]
fn pem_corpus() {
    let m = material();
    for (_, bytes) in corpus("pem") {
        pem_target(&bytes, &m.key_pem);
        pem_target(&m.cert_pem, &bytes);
        pem_target(&bytes, &bytes);
    }
    let src = limen::tls::CertSource {
        cert: PathBuf::from("/fuzz/tls.crt"),
        key: PathBuf::from("/fuzz/tls.key"),
    };
    let encrypted = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus/pem/encrypted.key"),
    )
    .unwrap();
    let err = limen::tls::parse_pair(&m.cert_pem, &encrypted, &src, tls().provider())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("encrypted"), "{err}");
    // The untouched material loads: the target can succeed.
    assert!(limen::tls::parse_pair(&m.cert_pem, &m.key_pem, &src, tls().provider()).is_ok());
}

proptest! {
    #![proptest_config(cases(100_000))]
    #[test]
    fn pem_pairs_never_panic(
        cert in prop_oneof![prop::collection::vec(any::<u8>(), 0..256), mutated(&material().cert_pem)],
        key in prop_oneof![Just(material().key_pem.clone()), mutated(&material().key_pem)],
    ) {
        pem_target(&cert, &key);
    }

    #[test]
    fn der_certificates_never_panic(der in mutated(&material().der)) {
        let _ = limen::tls::leaf_facts(&der);
    }
}

// ---------------------------------------------------------------- the path normalizer

/// The checks every normalized path passes.
fn path_target(path: &str) {
    for mode in [EscapedSlashes::Keep, EscapedSlashes::Reject] {
        let Ok(n) = normalize_path(path, mode) else {
            continue;
        };
        let n = n.into_owned();
        assert!(n.starts_with('/'), "{path:?} -> {n:?}");
        // Idempotent: the upstream resolves nothing further.
        assert_eq!(
            normalize_path(&n, mode).map(|c| c.into_owned()),
            Ok(n.clone()),
            "{path:?}"
        );
        // No dot segment and no empty segment (but a trailing slash) survive: nothing climbs.
        let segs: Vec<&str> = n[1..].split('/').collect();
        for (i, s) in segs.iter().enumerate() {
            assert!(*s != "." && *s != "..", "{path:?} -> {n:?}");
            assert!(!s.is_empty() || i == segs.len() - 1, "{path:?} -> {n:?}");
        }
        // Escapes that remain are upper-case and of reserved characters only.
        let b = n.as_bytes();
        for (i, _) in n.match_indices('%') {
            let hex = &n[i + 1..i + 3];
            assert_eq!(hex, hex.to_ascii_uppercase(), "{path:?} -> {n:?}");
            let v = u8::from_str_radix(hex, 16).unwrap();
            assert!(
                !(v.is_ascii_alphanumeric() || b"-._~".contains(&v)),
                "{path:?} -> {n:?}"
            );
            if mode == EscapedSlashes::Reject {
                assert!(v != b'/' && v != b'\\', "{path:?} -> {n:?}");
            }
        }
        assert!(!b.contains(&b'\\'));
        // Route choice agrees with the normalized path: the longest prefix on a segment boundary.
        let prefixes = ["/", "/a", "/a/b", "/admin", "/%2F"];
        let chosen = prefixes
            .iter()
            .filter(|p| limen::routing::prefix_matches(p, &n))
            .max_by_key(|p| p.len())
            .copied();
        let expected = prefixes
            .iter()
            .filter(|p| {
                **p == "/"
                    || n == **p
                    || n.starts_with(&format!("{p}/"))
                    || n.starts_with(&format!("{p};"))
            })
            .max_by_key(|p| p.len())
            .copied();
        assert_eq!(chosen, expected, "{path:?} -> {n:?}");
    }
}

/// Paths built from the characters that matter to normalization.
fn hostile_path() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "/", "/", "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%25", "%", "%4",
        "%41", "%7e", "%zz", "a", "b", "admin", "~", "\\", ";", "%3f", "%00", "%c3%a9", "é",
    ]);
    prop::collection::vec(atoms, 0..24).prop_map(|v| format!("/{}", v.concat()))
}

#[test]
fn path_corpus() {
    for (_, bytes) in corpus("path") {
        for line in String::from_utf8_lossy(&bytes).lines() {
            path_target(line);
        }
    }
    assert_eq!(
        normalize_path("/a/../..", EscapedSlashes::Keep).unwrap_err(),
        PathError::AboveRoot
    );
}

proptest! {
    #![proptest_config(cases(300_000))]
    #[test]
    fn paths_normalize_idempotently_and_never_climb(path in prop_oneof![hostile_path(), "/[^?#]{0,40}"]) {
        path_target(&path);
    }
}

// ---------------------------------------------------------------- headers

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];
/// Names limen sets itself, whatever the client sent.
const SET_BY_LIMEN: [&str; 5] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v.as_bytes()),
        ) {
            h.append(n, v);
        }
    }
    h
}

fn parse_block(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn request_headers_target(pairs: &[(String, String)]) {
    let sent = header_map(pairs);
    let named: Vec<String> = sent
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let fwd = limen::proxy::PeerForwarding::new("203.0.113.7".parse().unwrap());
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let out = forwarded_request_headers(
            sent.clone(),
            &Uri::from_static("/"),
            version,
            &HeaderPolicy {
                forwarding: &fwd,
                host: "a.test",
                trusted: false,
                allow_underscores: false,
                client_cert: None,
            },
        );
        assert!(
            !out.contains_key("client-cert") && !out.contains_key("client-cert-chain"),
            "a client's own Client-Cert passed: {pairs:?}"
        );
        for name in HOP_BY_HOP {
            assert!(!out.contains_key(name), "{name} passed: {pairs:?}");
        }
        for name in &named {
            if !SET_BY_LIMEN.contains(&name.as_str()) && name != "te" {
                assert!(
                    !out.contains_key(name.as_str()),
                    "{name} named by Connection passed: {pairs:?}"
                );
            }
        }
        if let Some(te) = out.get(http::header::TE) {
            assert_eq!(te, "trailers");
        }
        assert!(out.keys().all(|k| !k.as_str().contains('_')), "{pairs:?}");
        assert_eq!(out.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(out["x-forwarded-for"], "203.0.113.7");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert!(!out.contains_key("x-real-ip"));
        assert_eq!(out.get_all(http::header::FORWARDED).iter().count(), 1);
        if version == Version::HTTP_2 {
            assert!(out.get_all(http::header::COOKIE).iter().count() <= 1);
        }
    }
}

fn response_headers_target(pairs: &[(String, String)]) {
    let mut h = header_map(pairs);
    let had_te = h.contains_key(http::header::TRANSFER_ENCODING);
    let had_cl = h.contains_key(http::header::CONTENT_LENGTH);
    match relayed_response_headers(&mut h) {
        Ok(reusable) => {
            for name in HOP_BY_HOP {
                assert!(!h.contains_key(name), "{name} passed: {pairs:?}");
            }
            if had_te {
                assert!(!h.contains_key(http::header::CONTENT_LENGTH), "{pairs:?}");
                assert_eq!(reusable, !had_cl, "{pairs:?}");
            }
        }
        Err(_) => assert!(had_te, "only a transfer coding is refused: {pairs:?}"),
    }
}

fn header_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    let names = prop_oneof![
        prop::sample::select(vec![
            "connection",
            "keep-alive",
            "te",
            "transfer-encoding",
            "upgrade",
            "http2-settings",
            "proxy-connection",
            "proxy-authorization",
            "host",
            "cookie",
            "content-length",
            "x-forwarded-for",
            "x_forwarded_for",
            "X_Forwarded_For",
            "x-real-ip",
            "x_real_ip",
            "forwarded",
            "x-forwarded-host",
            "x-custom",
            "x-a_b",
            "_",
            "x-forwarded-port",
        ])
        .prop_map(str::to_string),
        "[a-z_-]{1,12}",
    ];
    let values = prop_oneof![
        prop::sample::select(vec![
            "close",
            "upgrade",
            "keep-alive, x-custom",
            "x-forwarded-for, host",
            "trailers",
            "gzip, trailers",
            "chunked",
            "gzip",
            "chunked, gzip",
            "gzip, chunked",
            "1.2.3.4",
            "for=6.6.6.6",
            "a=1",
            "",
            ",,,",
            " , x_real_ip ,",
            "h2c",
            "10",
            "10, 10",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,24}",
    ];
    prop::collection::vec((names, values), 0..12)
}

#[test]
fn headers_corpus() {
    for (path, bytes) in corpus("headers") {
        let pairs = parse_block(&String::from_utf8_lossy(&bytes));
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("response"))
        {
            response_headers_target(&pairs);
        } else {
            request_headers_target(&pairs);
        }
    }
}

proptest! {
    #![proptest_config(cases(150_000))]
    #[test]
    fn request_headers_keep_every_rule(pairs in header_pairs()) {
        request_headers_target(&pairs);
    }

    #[test]
    fn response_headers_keep_every_rule(pairs in header_pairs()) {
        response_headers_target(&pairs);
    }
}
