//! A route's `compress`: which codings limen may apply to the route's responses, above what size,
//! and to which media types.
//!
//! Owns: the syntax, the defaults (br and gzip; zstd only when asked for) and the media-type
//! list. Must not touch: negotiation with a client or the encoders (`proxy::compress`).

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCompress {
    algorithms: Option<Vec<String>>,
    min_bytes: Option<u64>,
    types: Option<Vec<String>>,
}

/// A content coding limen can apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Br,
    Gzip,
    Zstd,
}

impl Algorithm {
    /// Its name in `Accept-Encoding` and `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Algorithm::Br => "br",
            Algorithm::Gzip => "gzip",
            Algorithm::Zstd => "zstd",
        }
    }
}

/// A route's `compress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compress {
    /// In the route's order of preference, used when a client rates several codings alike.
    pub algorithms: Vec<Algorithm>,
    /// Bodies declared smaller than this go as they are (a body of unknown length is compressed).
    pub min_bytes: u64,
    /// Media types (`text/html`), or a type's every subtype (`text/*`); lower case.
    pub types: Vec<String>,
}

/// Below this, the coding's header and trailer outweigh what it saves (Traefik's default).
pub const DEFAULT_MIN_BYTES: u64 = 1024;

/// Text formats that compress well. Images, video, audio, fonts in compressed formats and
/// archives are already compressed; event streams and gRPC are never compressed whatever this
/// list says (see `proxy::compress`).
pub const DEFAULT_TYPES: &[&str] = &[
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/xml",
    "application/*+xml",
    "application/wasm",
    "application/x-ndjson",
    "application/graphql-response+json",
    "image/svg+xml",
    "image/x-icon",
    "image/bmp",
    "font/ttf",
    "font/otf",
];

impl Compress {
    /// Whether a response of this `Content-Type` (parameters ignored) may be compressed.
    pub fn compressible(&self, content_type: &str) -> bool {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let Some((kind, sub)) = essence.split_once('/') else {
            return false;
        };
        self.types.iter().any(|t| match t.split_once('/') {
            Some((k, "*")) => k == kind,
            Some((k, s)) => match s.strip_prefix("*+") {
                Some(suffix) => {
                    k == kind && sub.strip_suffix(suffix).is_some_and(|r| r.ends_with('+'))
                }
                None => k == kind && s == sub,
            },
            None => false,
        })
    }
}

fn media_range(t: &str) -> Result<String, String> {
    let t = t.trim().to_ascii_lowercase();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let ok = match t.split_once('/') {
        Some((k, "*")) => token(k),
        Some((k, s)) => token(k) && (token(s) || s.strip_prefix("*+").is_some_and(token)),
        None => false,
    };
    if ok {
        Ok(t)
    } else {
        Err(format!(
            "compress.types: {t:?} is not a media type like text/html, text/* or application/*+json"
        ))
    }
}

pub(super) fn compress_from(raw: Option<RawCompress>) -> Result<Option<Compress>, String> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let mut algorithms = Vec::new();
    for a in raw
        .algorithms
        .unwrap_or_else(|| vec!["br".into(), "gzip".into()])
    {
        let alg = match a.as_str() {
            "br" => Algorithm::Br,
            "gzip" => Algorithm::Gzip,
            "zstd" => Algorithm::Zstd,
            other => {
                return Err(format!(
                    "compress.algorithms: {other:?} is not one of br, gzip and zstd"
                ))
            }
        };
        if algorithms.contains(&alg) {
            return Err(format!("compress.algorithms: {a} is listed twice"));
        }
        algorithms.push(alg);
    }
    if algorithms.is_empty() {
        return Err(
            "compress.algorithms is empty: list at least one of br, gzip and zstd, or remove compress"
                .into(),
        );
    }
    let types = match raw.types {
        None => DEFAULT_TYPES.iter().map(|t| (*t).to_owned()).collect(),
        Some(t) if t.is_empty() => {
            return Err("compress.types is empty: remove the key for the default list".into())
        }
        Some(t) => t.iter().map(|t| media_range(t)).collect::<Result<_, _>>()?,
    };
    Ok(Some(Compress {
        algorithms,
        min_bytes: raw.min_bytes.unwrap_or(DEFAULT_MIN_BYTES),
        types,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Option<Compress>, String> {
        let raw: RawCompress = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        compress_from(Some(raw))
    }

    #[test]
    fn defaults_are_br_then_gzip_above_1_kib_on_text_formats() {
        let c = parse("{}").unwrap().unwrap();
        assert_eq!(c.algorithms, [Algorithm::Br, Algorithm::Gzip]);
        assert_eq!(c.min_bytes, 1024);
        for yes in [
            "text/html; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
            "application/atom+xml",
            "image/svg+xml",
            "application/wasm",
        ] {
            assert!(c.compressible(yes), "{yes}");
        }
        for no in [
            "image/png",
            "video/mp4",
            "application/zip",
            "application/octet-stream",
            "application/grpc",
            "",
            "text",
        ] {
            assert!(!c.compressible(no), "{no}");
        }
    }

    #[test]
    fn zstd_only_when_asked_and_nonsense_is_refused() {
        let c = parse(
            "{algorithms: [zstd, gzip], min_bytes: 0, types: [text/csv, application/*+yaml]}",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.algorithms, [Algorithm::Zstd, Algorithm::Gzip]);
        assert!(c.compressible("application/openapi+yaml"));
        assert!(!c.compressible("text/html"));
        for (yaml, says) in [
            ("{algorithms: [deflate]}", "not one of"),
            ("{algorithms: [gzip, gzip]}", "twice"),
            ("{algorithms: []}", "empty"),
            ("{types: []}", "empty"),
            ("{types: [html]}", "not a media type"),
            ("{types: [\"text/ html\"]}", "not a media type"),
        ] {
            let err = parse(yaml).unwrap_err();
            assert!(err.contains(says), "{yaml}: {err}");
        }
    }
}
