//! A route's `redirect`: a target with placeholders and a status, checked at load.
//!
//! Owns: the template's syntax, what a target may be (an absolute http(s) URL, or an absolute
//! path that cannot be read as another host), and filling it in. Must not touch: the request
//! (the request path hands over its parts).

use http::StatusCode;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedirect {
    to: String,
    status: Option<u16>,
}

/// A piece of a target.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// `https`, or `http` on the plain-HTTP listener.
    Scheme,
    /// The host the request was routed on, without its port.
    Host,
    /// The normalized path; what follows the route's prefix when it has `strip_prefix: true`.
    Path,
    /// The query with its `?`, or nothing.
    Query,
}

/// A route's `redirect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// As written, for the diff and the status page.
    pub to: String,
    pub status: StatusCode,
    parts: Vec<Part>,
}

impl Redirect {
    /// The `Location` for one request.
    pub fn location(&self, scheme: &str, host: &str, path: &str, query: Option<&str>) -> String {
        let mut out = String::with_capacity(self.to.len() + path.len() + 16);
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Scheme => out.push_str(scheme),
                Part::Host => out.push_str(host),
                Part::Path => out.push_str(path),
                Part::Query => {
                    if let Some(q) = query.filter(|q| !q.is_empty()) {
                        out.push('?');
                        out.push_str(q);
                    }
                }
            }
        }
        out
    }
}

fn parse_parts(to: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = to;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("redirect.to {to:?}: a {{ without its }}"))?;
        let name = &rest[open + 1..open + close];
        parts.push(match name {
            "scheme" => Part::Scheme,
            "host" => Part::Host,
            "path" => Part::Path,
            "query" => Part::Query,
            _ => {
                return Err(format!(
                    "redirect.to {to:?}: {{{name}}} is not one of {{scheme}}, {{host}}, {{path}}, {{query}}"
                ))
            }
        });
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(parts)
}

pub(super) fn redirect_from(raw: RawRedirect) -> Result<Redirect, String> {
    let to = raw.to;
    let status = raw.status.unwrap_or(308);
    if !matches!(status, 301 | 302 | 303 | 307 | 308) {
        return Err(format!(
            "redirect.status {status} must be 301, 302, 303, 307 or 308"
        ));
    }
    if to.is_empty() || to.len() > 2048 || !to.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("redirect.to must be 1 to 2048 printable ASCII characters without spaces (percent-encode the rest)".into());
    }
    let parts = parse_parts(&to)?;
    let r = Redirect {
        to: to.clone(),
        status: StatusCode::from_u16(status).map_err(|e| e.to_string())?,
        parts,
    };
    // What the target becomes for a request: an absolute http(s) URL, or a path on this host
    // that no client can read as a URL of another host (`//evil.test`, `/\evil.test`).
    let sample = r.location("https", "example.test", "/p/a", Some("q=1"));
    let absolute = sample.starts_with("https://") || sample.starts_with("http://");
    if absolute {
        let uri: http::Uri = sample
            .parse()
            .map_err(|_| format!("redirect.to {to:?} is not a URL"))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("redirect.to {to:?} has no host"));
        }
    } else {
        let after_slash = match r.parts.first() {
            Some(Part::Text(t)) if t.starts_with('/') => {
                t[1..].chars().next().or(match r.parts.get(1) {
                    None => Some('x'),
                    Some(_) => None,
                })
            }
            _ => None,
        };
        if !after_slash.is_some_and(|c| c != '/' && c != '\\') {
            return Err(format!(
                "redirect.to {to:?} must be an absolute URL (https://host/...) or a path that starts with / and a name (/new{{path}}), so no client reads it as another host"
            ));
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(to: &str, status: Option<u16>) -> Result<Redirect, String> {
        redirect_from(RawRedirect {
            to: to.to_owned(),
            status,
        })
    }

    #[test]
    fn placeholders_are_filled_and_a_query_brings_its_question_mark() {
        let r = redirect("https://new.example.test{path}{query}", None).unwrap();
        assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            r.location("https", "old.test", "/a/b", Some("x=1")),
            "https://new.example.test/a/b?x=1"
        );
        assert_eq!(
            r.location("https", "old.test", "/", None),
            "https://new.example.test/"
        );
        let r = redirect("{scheme}://{host}/v2{path}", Some(301)).unwrap();
        assert_eq!(
            r.location("http", "a.test", "/x", Some("")),
            "http://a.test/v2/x"
        );
        let r = redirect("/moved", Some(302)).unwrap();
        assert_eq!(r.location("https", "a.test", "/x", Some("y")), "/moved");
    }

    #[test]
    fn targets_another_host_could_hide_in_or_that_are_not_urls_are_refused() {
        for (to, why) in [
            ("{path}", "absolute URL"),
            ("/{path}", "absolute URL"),
            ("//evil.test/{path}", "absolute URL"),
            ("/\\evil.test", "absolute URL"),
            ("evil.test/x", "absolute URL"),
            ("https://{path}", "not a URL"),
            ("https://a.test/{nope}", "is not one of"),
            ("https://a.test/{path", "without its"),
            ("https://a.test/ x", "printable"),
        ] {
            let err = redirect(to, None).unwrap_err();
            assert!(err.contains(why), "{to}: {err}");
        }
        assert!(redirect("https://a.test/", Some(200)).is_err());
        assert!(redirect("https://a.test/", Some(304)).is_err());
        for ok in ["/new", "/new{path}", "https://{host}{path}{query}", "/"] {
            assert!(redirect(ok, None).is_ok(), "{ok}");
        }
    }
}
