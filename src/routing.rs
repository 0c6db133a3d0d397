//! The route table: from a request's host and path to the route that serves it.
//!
//! Owns: host matching (exact, then `*.parent`, then `*`), longest path-prefix matching on segment
//! boundaries, then a route's `match` conditions (more conditions first, then file order). A
//! lookup costs one or two hash probes for the host, one probe per distinct prefix length of that
//! host's routes, and a test of each route at the matching prefix. Must not touch: upstream
//! connections, I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{HostPattern, Retry, RouteAction, RouteSpec, UpstreamScheme};
use crate::ratelimit::{Limiter, Limiters};
use crate::upstream::{Group, Member, RetryBudget, TlsConfigs, UpstreamRegistry, UpstreamTlsDial};

/// What a route table is built from besides its routes: state that outlives any one table, so
/// a rebuilt table keeps upstream pools and rate-limit buckets.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub registry: &'a UpstreamRegistry,
    pub tls: &'a TlsConfigs,
    pub limiters: &'a Limiters,
    /// The users files of routes with `auth.basic`, loaded.
    pub users: &'a std::collections::HashMap<std::path::PathBuf, Arc<crate::auth::Users>>,
}

/// What a matched route does.
#[derive(Debug)]
pub enum Action {
    Proxy(Group),
    Respond {
        status: http::StatusCode,
        body: bytes::Bytes,
    },
    Redirect(crate::config::Redirect),
}

#[derive(Debug)]
pub struct Route {
    /// Bounded-cardinality label for logs and metrics: the `name`, else the index.
    pub label: Arc<str>,
    pub host: HostPattern,
    pub path: String,
    pub matcher: crate::config::RouteMatch,
    pub strip_prefix: bool,
    pub timeout: Duration,
    pub action: Action,
    pub retry: Retry,
    pub headers: crate::config::RouteHeaders,
    /// Counts the route's requests and retries: retries stay within `retry.budget`.
    pub budget: RetryBudget,
    /// This route's request-duration histogram, looked up once (by the request path, which owns
    /// the metrics) instead of once per request.
    pub duration: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
    /// Counts answers while the reload that added or changed this route is on probation.
    pub watch: RouteWatch,
    /// Every upstream of the route may speak HTTP/2 (`h2c://`, or `https://` not limited to
    /// HTTP/1.1): the route-level reason a gRPC call over HTTP/2 may stream its request body
    /// under `timeouts.idle` instead of `body_idle` and `min_body_rate`. A client's
    /// `content-type` alone never relaxes a defence.
    pub grpc_streams: bool,
    /// Who may reach the route (`access`), checked first.
    pub access: Option<crate::config::Access>,
    /// What a bucket is keyed by, and the route's buckets (kept across reloads that keep the
    /// route's label and `rate_limit`).
    pub rate_limit: Option<(crate::config::RateKey, Arc<Limiter>)>,
    /// `WWW-Authenticate` for the route's `auth.basic`, made once.
    pub challenge: Option<http::HeaderValue>,
    pub auth: Option<RouteAuth>,
    /// The path and Host the upstream sees, when not the routed ones.
    pub rewrite: Option<crate::config::Rewrite>,
    pub compress: Option<crate::config::Compress>,
}

/// A route's `auth`, ready to check.
#[derive(Debug)]
pub enum RouteAuth {
    /// The users of its file; None (never served by the reloader, which refuses a config whose
    /// users file did not load) refuses every credential.
    Basic(Option<Arc<crate::auth::Users>>),
    /// An auth service asked before forwarding, through the upstream client like any upstream.
    Forward(Box<ForwardRoute>),
}

#[derive(Debug)]
pub struct ForwardRoute {
    pub upstream: Arc<crate::upstream::Upstream>,
    /// The settings: path, headers copied each way, timeout.
    pub spec: crate::config::ForwardAuth,
}

/// A route's answers and failures (502, 503, 504) while armed by `reload.probation`; one
/// relaxed load per request otherwise.
#[derive(Debug, Default)]
pub struct RouteWatch {
    armed: std::sync::atomic::AtomicBool,
    answered: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

impl RouteWatch {
    pub fn arm(&self, on: bool) {
        self.armed.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records one answer's status, if armed.
    pub fn answered(&self, status: u16) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.armed.load(Relaxed) {
            return;
        }
        self.answered.fetch_add(1, Relaxed);
        if matches!(status, 502..=504) {
            self.failed.fetch_add(1, Relaxed);
        }
    }

    /// (answered, failed) since armed.
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.answered.load(Relaxed), self.failed.load(Relaxed))
    }
}

impl Route {
    /// The path to send upstream: the prefix removed when `strip_prefix` is set.
    /// The request-target the upstream gets for a routed one (the normalized path and the
    /// query): `rewrite`'s, else `strip_prefix`'s, else the same. None: the rewritten path is not
    /// a valid path.
    pub fn upstream_target<'a>(&self, target: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        match self.rewrite.as_ref().filter(|r| r.path.is_some()) {
            Some(r) if target != "*" => {
                let (path, query) = match target.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (target, None),
                };
                r.target(&self.path, path, query).map(Into::into)
            }
            _ => Some(self.upstream_path(target)),
        }
    }

    /// The prefix the upstream does not see (`X-Forwarded-Prefix`): the route's path when it is
    /// stripped or replaced.
    pub fn forwarded_prefix(&self) -> Option<&str> {
        let replaced = self
            .rewrite
            .as_ref()
            .is_some_and(|r| matches!(r.path, Some(crate::config::PathRewrite::Prefix(_))));
        ((self.strip_prefix || replaced) && self.path != "/").then_some(self.path.as_str())
    }

    pub fn upstream_path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        if !self.strip_prefix || self.path == "/" {
            return path.into();
        }
        match path.get(self.path.len()..) {
            Some("") => "/".into(),
            Some(rest) if rest.starts_with('/') => rest.into(),
            Some(rest) if rest.starts_with('?') => format!("/{rest}").into(),
            _ => path.into(),
        }
    }
}

/// What a route's `match` looks at besides host and path.
pub struct Facts<'a> {
    pub method: &'a http::Method,
    pub headers: &'a http::HeaderMap,
    /// Decoded at most once per lookup, and only if a route asks.
    pub query: crate::config::Query<'a>,
}

impl<'a> Facts<'a> {
    pub fn of<B>(req: &'a http::Request<B>) -> Facts<'a> {
        Facts {
            method: req.method(),
            headers: req.headers(),
            query: crate::config::Query::new(req.uri().query()),
        }
    }
}

/// The routes of one host, by path prefix; each prefix's routes in the order they are tried.
#[derive(Debug, Default)]
struct HostRoutes {
    by_prefix: HashMap<String, Vec<Arc<Route>>>,
    /// The distinct prefix lengths, longest first: a lookup probes only these.
    lengths: Vec<usize>,
}

impl HostRoutes {
    fn add(&mut self, route: Arc<Route>) {
        self.by_prefix
            .entry(route.path.clone())
            .or_default()
            .push(route);
    }

    /// Orders what `add` gathered: more conditions first, then file order (a stable sort).
    fn seal(&mut self) {
        for routes in self.by_prefix.values_mut() {
            routes.sort_by_key(|r| std::cmp::Reverse(r.matcher.conditions()));
        }
        self.lengths = self.by_prefix.keys().map(String::len).collect();
        self.lengths.sort_unstable_by(|a, b| b.cmp(a));
        self.lengths.dedup();
    }

    /// The longest prefix of `path` (on a segment boundary) with a route whose conditions hold;
    /// a prefix whose routes all refuse the request gives way to shorter ones.
    fn lookup(&self, path: &str, facts: &Facts) -> Option<&Arc<Route>> {
        self.lengths.iter().find_map(|&len| {
            let prefix = path.get(..len)?;
            if !prefix_matches(prefix, path) {
                return None;
            }
            let routes = self.by_prefix.get(prefix)?;
            routes
                .iter()
                .find(|r| r.matcher.holds(facts.method, facts.headers, &facts.query))
        })
    }
}

/// `/api` matches `/api`, `/api/`, `/api/x` and `/api;p` (servlet containers strip `;parameters`
/// before resolving, so `/api;p/x` is `/api/x` to them), not `/apix`. `path` is a normalized path,
/// without its query.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with(';'),
        None => false,
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, HostRoutes>,
    wildcard: HashMap<String, HostRoutes>,
    any: HostRoutes,
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table; upstreams come from `registry`, so ones already known keep their pools.
    pub fn build(specs: &[RouteSpec], default_timeout: Duration, inputs: &Inputs) -> RouteTable {
        let (registry, tls) = (inputs.registry, inputs.tls);
        let mut t = RouteTable::default();
        for spec in specs {
            let http1_only = spec.upstream_tls.protocol == crate::config::UpstreamProtocol::Http1;
            let grpc_streams = match &spec.action {
                RouteAction::Proxy(urls) => urls.iter().all(|w| w.url.may_speak_h2(http1_only)),
                RouteAction::Respond { .. } | RouteAction::Redirect(_) => false,
            };
            let action = match &spec.action {
                RouteAction::Proxy(urls) => {
                    let members = urls
                        .iter()
                        .map(|w| {
                            let u = &w.url;
                            let dial = (u.scheme == UpstreamScheme::Https)
                                .then(|| UpstreamTlsDial::for_url(u, &spec.upstream_tls, tls))
                                .flatten();
                            Member {
                                upstream: registry.get(u, dial, spec.health.as_ref(), spec.passive),
                                weight: w.weight,
                            }
                        })
                        .collect();
                    Action::Proxy(Group::new(members, spec.balance))
                }
                RouteAction::Respond { status, body } => Action::Respond {
                    status: *status,
                    body: bytes::Bytes::from(body.clone()),
                },
                RouteAction::Redirect(r) => Action::Redirect(r.clone()),
            };
            let label: Arc<str> = spec
                .name
                .clone()
                .unwrap_or_else(|| match &spec.unit {
                    Some(file) => format!("{file}/{}", spec.index),
                    None => spec.index.to_string(),
                })
                .into();
            let route = Arc::new(Route {
                rate_limit: spec
                    .rate_limit
                    .as_ref()
                    .map(|r| (r.key.clone(), inputs.limiters.get(&label, r))),
                access: spec.access.clone(),
                rewrite: spec.rewrite.clone(),
                compress: spec.compress.clone(),
                auth: match &spec.auth {
                    Some(crate::config::Auth::Basic(b)) => {
                        Some(RouteAuth::Basic(inputs.users.get(&b.users_file).cloned()))
                    }
                    Some(crate::config::Auth::Forward(f)) => {
                        let dial = (f.upstream.scheme == UpstreamScheme::Https)
                            .then(|| UpstreamTlsDial::for_url(&f.upstream, &f.upstream_tls, tls))
                            .flatten();
                        Some(RouteAuth::Forward(Box::new(ForwardRoute {
                            upstream: registry.get(&f.upstream, dial, None, Default::default()),
                            spec: f.clone(),
                        })))
                    }
                    None => None,
                },
                challenge: match &spec.auth {
                    Some(crate::config::Auth::Basic(b)) => {
                        // The realm is printable ASCII without quote or backslash (config).
                        http::HeaderValue::from_str(&format!(
                            "Basic realm=\"{}\", charset=\"UTF-8\"",
                            b.realm
                        ))
                        .ok()
                    }
                    _ => None,
                },
                label,
                host: spec.host.clone(),
                matcher: spec.matcher.clone(),
                // Already in the form requests are routed on (`PathPrefix` stores it normalized).
                path: spec.path.clone(),
                strip_prefix: spec.strip_prefix,
                timeout: spec.timeout.unwrap_or(default_timeout),
                action,
                retry: spec.retry,
                headers: spec.headers.clone(),
                budget: RetryBudget::new(spec.retry.budget_permille),
                duration: std::sync::OnceLock::new(),
                watch: RouteWatch::default(),
                grpc_streams,
            });
            let bucket = match &spec.host {
                HostPattern::Exact(h) => t.exact.entry(h.clone()).or_default(),
                HostPattern::Wildcard(p) => t.wildcard.entry(p.clone()).or_default(),
                HostPattern::Any => &mut t.any,
            };
            bucket.add(route.clone());
            t.routes.push(route);
        }
        for b in t
            .exact
            .values_mut()
            .chain(t.wildcard.values_mut())
            .chain(std::iter::once(&mut t.any))
        {
            b.seal();
        }
        t
    }

    /// The route for a lower-case host (no port), a normalized path and the request's other
    /// facts. The most specific host wins, then the longest prefix within it whose conditions
    /// hold; a more specific host with no matching route is a miss, as in nginx's server blocks.
    pub fn lookup(&self, host: &str, path: &str, facts: &Facts) -> Option<&Arc<Route>> {
        if let Some(b) = self.exact.get(host) {
            return b.lookup(path, facts);
        }
        if let Some((_, parent)) = host.split_once('.') {
            if let Some(b) = self.wildcard.get(parent) {
                return b.lookup(path, facts);
            }
        }
        self.any.lookup(path, facts)
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn table(yaml_routes: &str) -> RouteTable {
        let text = format!("listen: {{https: \"127.0.0.1:1\"}}\ntls: {{self_signed: true}}\nroutes:\n{yaml_routes}");
        let cfg = Config::parse(&text, Path::new("/x.yaml")).unwrap();
        RouteTable::build(
            &cfg.routes,
            Duration::from_secs(1),
            &Inputs {
                registry: &UpstreamRegistry::default(),
                tls: &TlsConfigs::default(),
                limiters: &Limiters::default(),
                users: &Default::default(),
            },
        )
    }

    fn hit(t: &RouteTable, host: &str, path: &str) -> Option<String> {
        let req = http::Request::new(());
        t.lookup(host, path, &Facts::of(&req))
            .map(|r| r.label.to_string())
    }

    fn hit_with(t: &RouteTable, path: &str, req: &http::Request<()>) -> Option<String> {
        t.lookup("a.test", path, &Facts::of(req))
            .map(|r| r.label.to_string())
    }

    #[test]
    fn more_conditions_first_then_file_order_then_shorter_prefixes() {
        let t = table(concat!(
            "  - {name: plain, host: a.test, path: /api, respond: {}}
",
            "  - {name: canary, host: a.test, path: /api, match: {headers: {x-canary: \"true\"}}, respond: {}}
",
            "  - {name: canary-get, host: a.test, path: /api, match: {methods: [GET], headers: {x-canary: \"true\"}}, respond: {}}
",
            "  - {name: debug, host: a.test, path: /api, match: {query: {debug: \"1\"}}, respond: {}}
",
            "  - {name: deep-post, host: a.test, path: /api/v1, match: {methods: [POST]}, respond: {}}
",
        ));
        let req = |method: &str, canary: bool, uri: &str| {
            let mut b = http::Request::builder().method(method).uri(uri);
            if canary {
                b = b.header("x-canary", "true");
            }
            b.body(()).unwrap()
        };
        let at = |m, c, uri: &str| hit_with(&t, uri.split('?').next().unwrap(), &req(m, c, uri));
        assert_eq!(at("GET", true, "/api").as_deref(), Some("canary-get"));
        assert_eq!(at("POST", true, "/api").as_deref(), Some("canary"));
        assert_eq!(at("GET", false, "/api").as_deref(), Some("plain"));
        // Same count of conditions: file order.
        assert_eq!(at("PUT", true, "/api?debug=1").as_deref(), Some("canary"));
        assert_eq!(at("PUT", false, "/api?debug=1").as_deref(), Some("debug"));
        // The longer prefix's route refuses a GET: the shorter prefix takes it.
        assert_eq!(at("POST", false, "/api/v1/x").as_deref(), Some("deep-post"));
        assert_eq!(at("GET", false, "/api/v1/x").as_deref(), Some("plain"));
    }

    #[test]
    fn a_host_whose_routes_all_refuse_the_request_is_a_miss() {
        let t = table(concat!(
            "  - {name: get, host: a.test, match: {methods: [GET]}, respond: {}}
",
            "  - {name: any, host: \"*\", respond: {}}
",
        ));
        let post = http::Request::builder().method("POST").body(()).unwrap();
        assert_eq!(hit_with(&t, "/", &post), None);
    }

    #[test]
    fn host_specificity_then_longest_prefix() {
        let t = table(concat!(
            "  - {name: exact, host: a.example.test, respond: {}}\n",
            "  - {name: exact-api, host: a.example.test, path: /api, respond: {}}\n",
            "  - {name: wild, host: \"*.example.test\", respond: {}}\n",
            "  - {name: any, host: \"*\", respond: {}}\n",
            "  - {name: any-deep, host: \"*\", path: /a/b, respond: {}}\n",
        ));
        assert_eq!(hit(&t, "a.example.test", "/").as_deref(), Some("exact"));
        assert_eq!(
            hit(&t, "a.example.test", "/api").as_deref(),
            Some("exact-api")
        );
        assert_eq!(
            hit(&t, "a.example.test", "/api/x").as_deref(),
            Some("exact-api")
        );
        assert_eq!(hit(&t, "a.example.test", "/apix").as_deref(), Some("exact"));
        assert_eq!(hit(&t, "b.example.test", "/api").as_deref(), Some("wild"));
        assert_eq!(hit(&t, "x.b.example.test", "/").as_deref(), Some("any"));
        assert_eq!(
            hit(&t, "example.test", "/a/b/c").as_deref(),
            Some("any-deep")
        );
        assert_eq!(hit(&t, "example.test", "/a/bc").as_deref(), Some("any"));
    }

    #[test]
    fn specific_host_without_matching_path_is_a_miss() {
        let t = table(concat!(
            "  - {name: api, host: a.test, path: /api, respond: {}}\n",
            "  - {name: any, host: \"*\", respond: {}}\n",
        ));
        assert_eq!(hit(&t, "a.test", "/other"), None);
        assert_eq!(hit(&t, "b.test", "/other").as_deref(), Some("any"));
    }

    #[test]
    fn prefixes_compare_in_normalized_form_and_parameters_are_a_boundary() {
        let t = table(concat!(
            "  - {name: user, host: a.test, path: /%7euser, respond: {}}\n",
            "  - {name: admin, host: a.test, path: /admin, respond: {}}\n",
            "  - {name: root, host: a.test, respond: {}}\n",
        ));
        assert_eq!(hit(&t, "a.test", "/~user/x").as_deref(), Some("user"));
        assert_eq!(
            hit(&t, "a.test", "/admin;jsessionid=1/x").as_deref(),
            Some("admin")
        );
        assert_eq!(hit(&t, "a.test", "/administrator").as_deref(), Some("root"));
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash() {
        let t = table("  - {host: a.test, path: /api, strip_prefix: true, respond: {}}\n");
        let req = http::Request::new(());
        let r = t.lookup("a.test", "/api", &Facts::of(&req)).unwrap();
        assert_eq!(r.upstream_path("/api"), "/");
        assert_eq!(r.upstream_path("/api/v1?x=1"), "/v1?x=1");
        assert_eq!(r.upstream_path("/api?x=1"), "/?x=1");
    }
}
