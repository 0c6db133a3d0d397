//! A route's `rewrite`: the path the upstream sees (its prefix replaced, or a regular
//! expression's replacement) and the Host it sees, checked at load.
//!
//! Owns: the syntax, and turning a routed target into the upstream's. Must not touch: routing
//! (a rewrite happens after it), other headers.

use serde::Deserialize;

use super::values::PathPrefix;
use crate::normalize::{normalize_path, EscapedSlashes};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRewrite {
    path_prefix: Option<PathPrefix>,
    path_regex: Option<String>,
    replace: Option<String>,
    host: Option<String>,
}

/// How the path changes.
#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// The route's prefix replaced by this one (`/` is `strip_prefix: true`).
    Prefix(String),
    /// The first match of a regular expression (a linear-time engine) replaced; `$1` and
    /// `${name}` refer to its groups, and the replacement may carry a query.
    Regex {
        regex: regex::Regex,
        replace: String,
    },
}

impl PartialEq for PathRewrite {
    fn eq(&self, other: &PathRewrite) -> bool {
        match (self, other) {
            (PathRewrite::Prefix(a), PathRewrite::Prefix(b)) => a == b,
            (
                PathRewrite::Regex {
                    regex: a,
                    replace: r,
                },
                PathRewrite::Regex {
                    regex: b,
                    replace: s,
                },
            ) => a.as_str() == b.as_str() && r == s,
            _ => false,
        }
    }
}

/// A route's `rewrite`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    pub path: Option<PathRewrite>,
    /// The Host (HTTP/2 `:authority`) the upstream sees.
    pub host: Option<String>,
}

/// Regular expressions are compiled within this much memory: a hostile or careless pattern
/// cannot make a reload (or a request) pay for a huge automaton.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

pub(super) fn rewrite_from(
    raw: Option<RawRewrite>,
    strip_prefix: bool,
) -> Result<Option<Rewrite>, String> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let path = match (raw.path_prefix, raw.path_regex, raw.replace) {
        (Some(_), _, _) if strip_prefix => {
            return Err("rewrite.path_prefix and strip_prefix: true both replace the prefix: strip_prefix is path_prefix: \"/\", keep one".into())
        }
        (Some(_), Some(_), _) => {
            return Err("rewrite takes path_prefix or path_regex, not both".into())
        }
        (Some(p), None, None) => Some(PathRewrite::Prefix(p.0)),
        (Some(_), None, Some(_)) => {
            return Err("rewrite.replace goes with path_regex, not path_prefix".into())
        }
        (None, Some(re), Some(replace)) => Some(regex_rewrite(&re, replace)?),
        (None, Some(_), None) => return Err("rewrite.path_regex needs rewrite.replace".into()),
        (None, None, Some(_)) => return Err("rewrite.replace needs rewrite.path_regex".into()),
        (None, None, None) => None,
    };
    let host = match raw.host {
        Some(h) => {
            let ok = h
                .parse::<http::uri::Authority>()
                .is_ok_and(|a| a.as_str() == h && !h.contains('@') && !a.host().is_empty());
            if !ok {
                return Err(format!("rewrite.host {h:?} must be a host, with a port if needed, like \"internal.app.svc\""));
            }
            Some(h.to_ascii_lowercase())
        }
        None => None,
    };
    if path.is_none() && host.is_none() {
        return Err("rewrite needs path_prefix, path_regex or host".into());
    }
    Ok(Some(Rewrite { path, host }))
}

fn regex_rewrite(pattern: &str, replace: String) -> Result<PathRewrite, String> {
    if pattern.len() > 1024 {
        return Err("rewrite.path_regex is longer than 1024 characters".into());
    }
    let regex = regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(_) => {
                "rewrite.path_regex compiles to more than 1 MiB: simplify it".to_owned()
            }
            // The parser's reason names the place in the pattern, which is the user's own text.
            other => format!("rewrite.path_regex is not a valid regular expression: {other}"),
        })?;
    if !replace.starts_with('/')
        || replace.starts_with("//")
        || replace.len() > 2048
        || !replace.bytes().all(|b| b.is_ascii_graphic())
        || replace.contains('#')
    {
        return Err("rewrite.replace must start with one /, be at most 2048 printable ASCII characters and hold no #".into());
    }
    // Every group the replacement names must exist: `$3` of a two-group pattern would silently
    // be empty.
    let groups = regex.captures_len();
    let names: Vec<&str> = regex.capture_names().flatten().collect();
    let mut rest = replace.as_str();
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            rest = r;
            continue;
        }
        let name: String = if let Some(r) = rest.strip_prefix('{') {
            r.split('}').next().unwrap_or("").to_owned()
        } else {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        let known = match name.parse::<usize>() {
            Ok(n) => n < groups,
            Err(_) => names.contains(&name.as_str()),
        };
        if !known {
            return Err(format!(
                "rewrite.replace names ${name}, which rewrite.path_regex does not capture"
            ));
        }
    }
    Ok(PathRewrite::Regex { regex, replace })
}

impl Rewrite {
    /// The upstream's request-target for a routed one (`path` normalized, `query` as sent),
    /// under a route whose prefix is `prefix`. None: the rewritten path is not a valid path (it
    /// would climb above the root, say), which the request path answers 400.
    pub fn target(&self, prefix: &str, path: &str, query: Option<&str>) -> Option<String> {
        let (new_path, extra_query) = match &self.path {
            None => (path.to_owned(), None),
            Some(PathRewrite::Prefix(p)) => {
                let rest = if prefix == "/" {
                    path
                } else {
                    path.get(prefix.len()..).unwrap_or("")
                };
                let joined = match (p.as_str(), rest) {
                    ("/", "") => "/".to_owned(),
                    ("/", r) => r.to_owned(),
                    (p, r) => format!("{p}{r}"),
                };
                (joined, None)
            }
            Some(PathRewrite::Regex { regex, replace }) => {
                let out = regex.replace(path, replace.as_str()).into_owned();
                match out.split_once('?') {
                    Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                    None => (out, None),
                }
            }
        };
        // Normalized again: whatever the rewrite made of the path, the upstream gets one with
        // no dot segment and nothing it could parse otherwise.
        let normal = normalize_path(&new_path, EscapedSlashes::Keep).ok()?;
        let query = match (
            extra_query.filter(|q| !q.is_empty()),
            query.filter(|q| !q.is_empty()),
        ) {
            (Some(a), Some(b)) => Some(format!("{a}&{b}")),
            (Some(a), None) => Some(a),
            (None, Some(b)) => Some(b.to_owned()),
            (None, None) => None,
        };
        Some(match query {
            Some(q) => format!("{normal}?{q}"),
            None => normal.into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(
        yaml_like: (Option<&str>, Option<&str>, Option<&str>, Option<&str>),
    ) -> Result<Option<Rewrite>, String> {
        let (prefix, re, replace, host) = yaml_like;
        rewrite_from(
            Some(RawRewrite {
                path_prefix: prefix.map(|p| p.parse().unwrap()),
                path_regex: re.map(str::to_owned),
                replace: replace.map(str::to_owned),
                host: host.map(str::to_owned),
            }),
            false,
        )
    }

    #[test]
    fn a_prefix_is_replaced_and_the_result_normalized() {
        let r = rewrite((Some("/api/v1"), None, None, None))
            .unwrap()
            .unwrap();
        assert_eq!(
            r.target("/v1", "/v1/users", Some("a=1")).as_deref(),
            Some("/api/v1/users?a=1")
        );
        assert_eq!(r.target("/v1", "/v1", None).as_deref(), Some("/api/v1"));
        let root = rewrite((Some("/"), None, None, None)).unwrap().unwrap();
        assert_eq!(root.target("/v1", "/v1/x", None).as_deref(), Some("/x"));
        assert_eq!(root.target("/v1", "/v1", None).as_deref(), Some("/"));
    }

    #[test]
    fn a_regex_replacement_may_carry_a_query_and_never_climbs_out() {
        let r = rewrite((
            None,
            Some("^/v1/users/([0-9]+)$"),
            Some("/users?id=$1"),
            None,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            r.target("/v1", "/v1/users/42", Some("x=1")).as_deref(),
            Some("/users?id=42&x=1")
        );
        assert_eq!(
            r.target("/v1", "/v1/users/abc", None).as_deref(),
            Some("/v1/users/abc"),
            "no match: unchanged"
        );
        // A replacement built from the request's own bytes cannot climb above the root or keep
        // a dot segment: normalized again, or refused.
        let r = rewrite((None, Some("^/p/(.*)$"), Some("/base/$1"), None))
            .unwrap()
            .unwrap();
        assert_eq!(r.target("/p", "/p/%2E%2E/x", None).as_deref(), Some("/x"));
        assert_eq!(r.target("/p", "/p/a/%2e%2e/%2e%2e/%2e%2e/x", None), None);
    }

    #[test]
    fn bad_rewrites_are_refused_with_what_to_do() {
        for (case, why) in [
            ((Some("/a"), Some("x"), Some("/y"), None), "not both"),
            (
                (None, Some("("), Some("/y"), None),
                "not a valid regular expression",
            ),
            (
                (None, Some("^/(a)$"), Some("/$2"), None),
                "does not capture",
            ),
            ((None, Some("^/(a)$"), Some("y"), None), "start with one /"),
            (
                (None, Some("^/(a)$"), Some("//evil"), None),
                "start with one /",
            ),
            ((None, Some("^/(a)$"), None, None), "needs rewrite.replace"),
            ((None, None, None, Some("bad host/")), "must be a host"),
            ((None, None, None, Some("user@h")), "must be a host"),
            ((None, None, None, None), "needs path_prefix"),
        ] {
            let err = rewrite(case).map(|_| ()).unwrap_err();
            assert!(err.contains(why), "{case:?}: {err}");
        }
        let huge = format!("^/({})$", "a{1,1000}".repeat(30));
        let err = rewrite((None, Some(huge.as_str()), Some("/x"), None))
            .map(|_| ())
            .unwrap_err();
        assert!(err.contains("1 MiB") || err.contains("longer"), "{err}");
        let strip = rewrite_from(
            Some(RawRewrite {
                path_prefix: Some("/x".parse().unwrap()),
                ..RawRewrite::default()
            }),
            true,
        );
        assert!(strip.map(|_| ()).unwrap_err().contains("strip_prefix"));
        assert!(rewrite((
            None,
            Some("^/(?P<id>[0-9]+)$"),
            Some("/u/${id}"),
            Some("internal.app.svc:8080")
        ))
        .is_ok());
    }
}
