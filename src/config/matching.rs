//! A route's `match`: what a request must carry besides its host and path (methods, header
//! fields, query parameters), checked at load and tested per request.
//!
//! Owns: the syntax, the one canonical form two spellings of the same conditions share (it is
//! part of a route's identity: duplicates, routes_dir claims, the diff and probation compare it),
//! and testing a request against it. Must not touch: precedence between routes (`routing`).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::HashMap;
use std::fmt;

use http::{HeaderMap, HeaderName, Method};
use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    #[serde(default)]
    methods: Vec<Spanned<String>>,
    #[serde(default)]
    headers: HashMap<Spanned<String>, RawValue>,
    #[serde(default)]
    query: HashMap<Spanned<String>, RawValue>,
}

/// `"value"`, `{prefix: "…"}` or `{present: true|false}`. An unquoted number or boolean is
/// refused: YAML would read `010` as 10 and `0x10` as 16, never the text a header carries.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawValue {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Rule(RawRule),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    prefix: Option<String>,
    present: Option<bool>,
}

/// What one header field or query parameter must be.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ValueMatch {
    Exact(String),
    Prefix(String),
    /// true: present with any value; false: absent.
    Present(bool),
}

impl ValueMatch {
    fn holds<'v>(&self, mut values: impl Iterator<Item = &'v [u8]>) -> bool {
        match self {
            ValueMatch::Exact(want) => values.any(|v| v == want.as_bytes()),
            ValueMatch::Prefix(want) => values.any(|v| v.starts_with(want.as_bytes())),
            ValueMatch::Present(present) => values.next().is_some() == *present,
        }
    }
}

impl fmt::Display for ValueMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueMatch::Exact(v) => write!(f, "= {v:?}"),
            ValueMatch::Prefix(v) => write!(f, "prefix {v:?}"),
            ValueMatch::Present(true) => f.write_str("present"),
            ValueMatch::Present(false) => f.write_str("absent"),
        }
    }
}

/// A route's `match`, in canonical order: methods sorted, headers and query parameters sorted
/// by name, so two spellings of the same conditions are equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RouteMatch {
    methods: Vec<Method>,
    headers: Vec<(HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
}

/// The longest value or query name a condition may hold: it is shown on the status page and in
/// the diff, and no real header needs more to be told apart.
const MAX_VALUE: usize = 256;
/// Conditions per route: each is tried for every request that reaches the route's prefix.
const MAX_CONDITIONS: usize = 32;

impl RouteMatch {
    pub fn is_empty(&self) -> bool {
        self.conditions() == 0
    }

    /// How many conditions must hold; among routes of one host and prefix, more go first.
    pub fn conditions(&self) -> usize {
        usize::from(!self.methods.is_empty()) + self.headers.len() + self.query.len()
    }

    /// Whether a request with this method, these header fields and this query (without its
    /// `?`) meets every condition. Query names and values compare decoded (`%xx`, `+`).
    pub fn holds(&self, method: &Method, headers: &HeaderMap, query: &Query<'_>) -> bool {
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return false;
        }
        let header_ok = self
            .headers
            .iter()
            .all(|(name, want)| want.holds(headers.get_all(name).iter().map(|v| v.as_bytes())));
        if !header_ok {
            return false;
        }
        self.query.iter().all(|(name, want)| {
            let values = query.pairs().iter().filter(|(k, _)| k == name);
            want.holds(values.map(|(_, v)| v.as_bytes()))
        })
    }
}

/// At most this many parameters of a request's query are read for `match.query`: a hostile
/// query of thousands of parameters costs one bounded parse per request, whatever the routes.
pub const MAX_QUERY_PAIRS: usize = 64;

/// A request's query, decoded (`%xx`, `+`) once, when the first route with a query condition
/// asks, and shared by every route a lookup tries.
pub struct Query<'a> {
    raw: Option<&'a str>,
    parsed: OnceCell<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
}

impl<'a> Query<'a> {
    /// `raw`: the query without its `?`.
    pub fn new(raw: Option<&'a str>) -> Query<'a> {
        Query {
            raw,
            parsed: OnceCell::new(),
        }
    }

    fn pairs(&self) -> &[(Cow<'a, str>, Cow<'a, str>)] {
        self.parsed.get_or_init(|| {
            let raw = self.raw.unwrap_or("");
            form_urlencoded::parse(raw.as_bytes())
                .take(MAX_QUERY_PAIRS)
                .collect()
        })
    }
}

/// The canonical form: `methods GET,HEAD; header x-canary = "true"; query debug present`.
impl fmt::Display for RouteMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if !self.methods.is_empty() {
            let names: Vec<&str> = self.methods.iter().map(Method::as_str).collect();
            write!(f, "methods {}", names.join(","))?;
            sep = "; ";
        }
        for (name, want) in &self.headers {
            write!(f, "{sep}header {name} {want}")?;
            sep = "; ";
        }
        for (name, want) in &self.query {
            write!(f, "{sep}query {name:?} {want}")?;
            sep = "; ";
        }
        Ok(())
    }
}

/// A refused condition: why, and the line and column of its key, when it has one.
#[derive(Debug)]
pub(super) struct MatchError {
    pub(super) message: String,
    pub(super) at: Option<(u64, u64)>,
}

fn at<T>(key: &Spanned<T>) -> Option<(u64, u64)> {
    Some((key.referenced.line(), key.referenced.column()))
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

fn unquoted(what: &str, read_as: &str) -> String {
    format!("{what}: quote the value (\"1\", \"true\"): YAML reads it unquoted as {read_as}, not as the text a request carries")
}

fn value_from(what: &str, raw: RawValue) -> Result<ValueMatch, String> {
    let text = |v: String| {
        if v.len() > MAX_VALUE || !printable(&v) {
            Err(format!(
                "{what}: the value must be printable ASCII of at most {MAX_VALUE} bytes"
            ))
        } else {
            Ok(v)
        }
    };
    match raw {
        RawValue::Text(v) => Ok(ValueMatch::Exact(text(v)?)),
        RawValue::Int(n) => Err(unquoted(what, &format!("the number {n}"))),
        RawValue::Float(x) => Err(unquoted(what, &format!("the number {x}"))),
        RawValue::Bool(b) => Err(unquoted(what, &format!("the boolean {b}"))),
        RawValue::Rule(RawRule {
            prefix: Some(p),
            present: None,
        }) if !p.is_empty() => Ok(ValueMatch::Prefix(text(p)?)),
        RawValue::Rule(RawRule {
            prefix: None,
            present: Some(p),
        }) => Ok(ValueMatch::Present(p)),
        RawValue::Rule(_) => Err(format!(
            "{what}: give a value, {{prefix: \"…\"}} (not empty) or {{present: true|false}}, one of them"
        )),
    }
}

fn methods_from(raw: Vec<Spanned<String>>) -> Result<Vec<Method>, MatchError> {
    let mut methods = Vec::new();
    for m in raw {
        let fail = |message: String| MatchError {
            message,
            at: at(&m),
        };
        let ok = !m.value.is_empty()
            && m.value.len() <= 32
            && m.value.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
        let method = Method::from_bytes(m.value.as_bytes())
            .ok()
            .filter(|_| ok)
            .ok_or_else(|| {
                fail(format!(
                    "match.methods: {:?} is not a method; methods are upper case, like GET or POST",
                    m.value
                ))
            })?;
        if methods.contains(&method) {
            return Err(fail(format!("match.methods: {} is listed twice", m.value)));
        }
        methods.push(method);
    }
    methods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(methods)
}

fn header_name(raw: &str) -> Result<HeaderName, String> {
    if raw.starts_with(':') {
        return Err(format!(
            "match.headers: {raw:?} is an HTTP/2 pseudo-header; match on the route's host, path and match.methods instead"
        ));
    }
    let name = HeaderName::from_bytes(raw.as_bytes()).map_err(|_| {
        format!("match.headers: {raw:?} is not a valid header name (letters, digits and -)")
    })?;
    if name == http::header::HOST {
        return Err(
            "match.headers: host is what the route's `host` matches; give the host there".into(),
        );
    }
    if name == http::header::COOKIE {
        // HTTP/2 clients send each cookie as a field of its own (RFC 9113 8.2.3), HTTP/1.1 ones
        // all in one: an exact match would hold on one protocol and not the other.
        return Err(
            "match.headers: cookie is split differently by HTTP/1.1 and HTTP/2 clients, so a match on it would depend on the protocol; route on a header the client sets instead".into(),
        );
    }
    Ok(name)
}

/// Sorted by where each key was written, so the first error reported is the first in the file.
fn in_file_order<V>(map: HashMap<Spanned<String>, V>) -> Vec<(Spanned<String>, V)> {
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by_key(|(k, _)| at(k));
    v
}

pub(super) fn match_from(raw: Option<RawMatch>) -> Result<RouteMatch, MatchError> {
    let Some(raw) = raw else {
        return Ok(RouteMatch::default());
    };
    let mut m = RouteMatch {
        methods: methods_from(raw.methods)?,
        ..RouteMatch::default()
    };
    for (k, v) in in_file_order(raw.headers) {
        let fail = |message: String| MatchError {
            message,
            at: at(&k),
        };
        let name = header_name(&k.value).map_err(fail)?;
        if m.headers.iter().any(|(seen, _)| *seen == name) {
            return Err(fail(format!(
                "match.headers: {:?} is given twice (header names ignore case): keep one",
                k.value
            )));
        }
        let want = value_from(&format!("match.headers.{name}"), v).map_err(fail)?;
        m.headers.push((name, want));
    }
    for (k, v) in in_file_order(raw.query) {
        let fail = |message: String| MatchError {
            message,
            at: at(&k),
        };
        if k.value.is_empty() || k.value.len() > MAX_VALUE || !printable(&k.value) {
            return Err(fail(format!(
                "match.query: a parameter name must be 1 to {MAX_VALUE} printable ASCII characters"
            )));
        }
        let want = value_from(&format!("match.query.{}", k.value), v).map_err(fail)?;
        m.query.push((k.value, want));
    }
    m.headers.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    m.query.sort();
    if m.conditions() > MAX_CONDITIONS {
        return Err(MatchError {
            message: format!("match: at most {MAX_CONDITIONS} conditions per route"),
            at: None,
        });
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<RouteMatch, String> {
        let raw: RawMatch = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        match_from(Some(raw)).map_err(|e| e.message)
    }

    fn req(method: &str, headers: &[(&str, &str)]) -> (Method, HeaderMap) {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        (Method::from_bytes(method.as_bytes()).unwrap(), h)
    }

    #[test]
    fn two_spellings_of_the_same_conditions_are_one_match() {
        let a = parse("{methods: [HEAD, GET], headers: {X-Canary: \"true\", x-env: {prefix: stag}}, query: {debug: \"1\"}}").unwrap();
        let b = parse("{query: {debug: \"1\"}, headers: {x-env: {prefix: stag}, x-canary: \"true\"}, methods: [GET, HEAD]}").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.conditions(), 4);
        assert_eq!(
            a.to_string(),
            "methods GET,HEAD; header x-canary = \"true\"; header x-env prefix \"stag\"; query \"debug\" = \"1\""
        );
    }

    #[test]
    fn every_condition_must_hold() {
        let m = parse("{methods: [GET], headers: {x-canary: \"true\", x-old: {present: false}}, query: {debug: \"1 2\"}}").unwrap();
        let q = |s: &'static str| Query::new(Some(s));
        let (get, canary) = req("GET", &[("x-canary", "true")]);
        assert!(m.holds(&get, &canary, &q("a=b&debug=1+2")));
        assert!(m.holds(&get, &canary, &q("debug=1%202")));
        assert!(!m.holds(&get, &canary, &q("debug=1")));
        assert!(!m.holds(&get, &canary, &Query::new(None)));
        let (post, _) = req("POST", &[]);
        assert!(!m.holds(&post, &canary, &q("debug=1+2")));
        let (_, old) = req("GET", &[("x-canary", "true"), ("x-old", "")]);
        assert!(!m.holds(&get, &old, &q("debug=1+2")));
        // Any line of a repeated field may match; a value compares whole and by case.
        let (_, two) = req("GET", &[("x-canary", "no"), ("x-canary", "true")]);
        assert!(m.holds(&get, &two, &q("debug=1+2")));
        let (_, upper) = req("GET", &[("x-canary", "TRUE")]);
        assert!(!m.holds(&get, &upper, &q("debug=1+2")));
        let p = parse("{headers: {x-env: {prefix: stag}}, query: {v: {present: true}}}").unwrap();
        let (_, staging) = req("GET", &[("x-env", "staging")]);
        assert!(p.holds(&get, &staging, &q("v")));
        assert!(!p.holds(&get, &staging, &q("w=1")));
        assert!(RouteMatch::default().holds(&post, &HeaderMap::new(), &Query::new(None)));
        // Only the first MAX_QUERY_PAIRS parameters are read.
        let long = format!("{}debug=1+2", "a=1&".repeat(MAX_QUERY_PAIRS));
        assert!(!m.holds(&get, &canary, &Query::new(Some(&long))));
    }

    #[test]
    fn conditions_that_cannot_mean_anything_are_refused() {
        for (yaml, says) in [
            ("{methods: [get]}", "upper case"),
            ("{methods: [GET, GET]}", "twice"),
            ("{headers: {\"x a\": \"1\"}}", "not a valid header name"),
            ("{headers: {\":path\": \"/\"}}", "pseudo-header"),
            ("{headers: {Host: a.test}}", "route's `host`"),
            ("{headers: {x-a: \"1\", X-A: \"2\"}}", "twice"),
            ("{headers: {x-a: {prefix: \"\"}}}", "not empty"),
            (
                "{headers: {x-a: {prefix: a, present: true}}}",
                "one of them",
            ),
            ("{headers: {x-a: \"line\\nbreak\"}}", "printable"),
            ("{query: {\"\": \"1\"}}", "parameter name"),
            ("{headers: {x-a: 010}}", "quote the value"),
            ("{headers: {x-a: true}}", "quote the value"),
            ("{query: {v: 1.5}}", "quote the value"),
            ("{headers: {Cookie: \"a=1\"}}", "cookie"),
        ] {
            let err = parse(yaml).unwrap_err();
            assert!(err.contains(says), "{yaml}: {err}");
        }
    }
}
