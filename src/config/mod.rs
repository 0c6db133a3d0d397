//! The YAML configuration: its schema (plain serde structs) and its validation into typed values.
//!
//! Owns: parsing the file text, every default, every rule a config must obey, and the error messages
//! that point at a line and column. Must not touch: sockets, certificates' contents, or the snapshot
//! currently served; loading a config has no side effect.
//!
//! Laid out by concern: `files` (reading a file, [`ConfigError`]), `values` (the typed values a
//! key is written with), `raw` (the schema as written), `build` (validation into the types below),
//! `balancing`, `client_auth`, `headers` (route and TLS options), `routes_dir`, and `diff` (what
//! differs between two configs). This file holds the validated config itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

// First: its `deserialize_from_str!` is used by the modules after it.
#[macro_use]
mod values;

mod balancing;
mod build;
mod client_auth;
mod compress;
pub mod diff;
mod files;
mod headers;
mod matching;
mod policy;
mod raw;
mod redirect;
mod request_id;
mod rewrite;
mod routes_dir;

pub use balancing::{
    Balance, CheckKind, HealthCheck, Passive, Retry, RetryOn, RetryReason, StatusSet,
    WeightedUpstream, MAX_EJECTION, MAX_WEIGHT,
};
pub use client_auth::{ClientAuthMode, ClientAuthSpec};
pub use compress::{Algorithm, Compress, DEFAULT_MIN_BYTES, DEFAULT_TYPES};
pub use files::{
    read_regular, read_text, ConfigError, FileError, MAX_CONFIG_BYTES, MAX_SECRET_BYTES,
};
pub use headers::{HeaderEdits, RouteHeaders};
pub use matching::{Query, RouteMatch, ValueMatch, MAX_QUERY_PAIRS};
pub use policy::{
    Access, Auth, BasicAuth, ForwardAuth, IpSet, Rate, RateKey, RateLimit, DEFAULT_MAX_KEYS,
};
pub use redirect::Redirect;
pub use request_id::{RequestId, Trust};
pub use rewrite::{PathRewrite, Rewrite};
pub use routes_dir::{
    link_out_of_folder, list_routes_dir, load_routes_file, parse_routes_file, Claims,
};
pub use values::{
    Addr, Dur, EscapedSlashes, HostPattern, IpBlock, PathPrefix, TlsVersion, UpstreamProtocol,
    UpstreamScheme, UpstreamUrl,
};

// ---- The validated config. ----

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from; relative paths in it were resolved against its folder.
    pub source: PathBuf,
    pub listen: Listen,
    pub tls: TlsSettings,
    pub reload: ReloadSettings,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub trusted_proxies: Vec<IpBlock>,
    /// Runtime worker threads; `None`: one per core.
    pub workers: Option<usize>,
    /// One log line per request (target `limen::access`).
    pub access_log: bool,
    /// Forward request headers whose names contain `_` (limen's own names' look-alikes never).
    pub allow_underscores_in_headers: bool,
    pub escaped_slashes: EscapedSlashes,
    /// The request id each request carries upstream, back and into the logs.
    pub request_id: RequestId,
    /// Every `*.yaml` / `*.yml` file in it holds routes of its own, validated alone.
    pub routes_dir: Option<PathBuf>,
    /// As loaded from one file, that file's routes; as served, every file's, merged.
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub redirect_port: Option<u16>,
    pub admin: Option<SocketAddr>,
    pub admin_public: bool,
    /// A bearer token every admin path but the probes requires.
    pub admin_token_file: Option<PathBuf>,
    /// Connections from these sources must start with a PROXY protocol header (others must not);
    /// empty: PROXY protocol is off.
    pub proxy_protocol_from: Vec<IpBlock>,
    /// The same rule on `listen.http`.
    pub http_proxy_protocol: bool,
    /// UDP: HTTP/3 on the same routes, certificates and policies.
    pub quic: Option<SocketAddr>,
    /// Advertise HTTP/3 (`Alt-Svc`) on HTTP/1.1 and HTTP/2 answers; only with `quic`.
    pub alt_svc: bool,
    /// The port `Alt-Svc` names, when clients reach QUIC on another port than the one bound
    /// (a Service mapping 443 to 8443); None: the bound port.
    pub alt_svc_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub cert_dirs: Vec<PathBuf>,
    pub certs: Vec<CertPair>,
    pub default_cert: Option<String>,
    pub self_signed: bool,
    pub min_version: TlsVersion,
    /// Session-ticket keys shared by every replica; None: a per-process ticketer.
    pub ticket_keys: Option<PathBuf>,
    /// Client-certificate policies, by host.
    pub client_auth: Vec<Arc<ClientAuthSpec>>,
    /// X25519MLKEM768 offered first (true) or not at all (false) on the listener.
    pub post_quantum: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReloadSettings {
    pub interval: Duration,
    pub verify_every: Duration,
    /// Roll back a config change whose new or changed routes fail; None: off.
    pub probation: Option<Probation>,
}

/// `reload.probation`: for `window` after a config reload, if at least `min_requests` answers on
/// the routes it added or changed were more than `max_error_ratio` 502/503/504, the files that
/// changed get their previous routes back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probation {
    pub window: Duration,
    pub min_requests: u64,
    pub max_error_ratio: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    pub handshake: Duration,
    pub header_read: Duration,
    pub idle: Duration,
    pub upstream_connect: Duration,
    pub upstream_response: Duration,
    pub body_idle: Duration,
    pub write_idle: Duration,
    pub shutdown_delay: Duration,
    pub shutdown_grace: Duration,
    /// HTTP/2 upstream connections are PINGed this often, and closed when a PING is not answered
    /// within `upstream_ping_timeout`: a black-holed connection is found and replaced.
    pub upstream_ping_interval: Duration,
    pub upstream_ping_timeout: Duration,
    /// An idle pooled HTTP/1.1 upstream connection is closed after this long unused, traffic
    /// or not.
    pub upstream_idle: Duration,
    /// An upstream that takes no byte of a request body for this long (it stopped reading) gets
    /// no more: 504 if it has not answered, and its connection is closed.
    pub upstream_write: Duration,
    /// A QUIC connection with no traffic for this long is closed.
    pub quic_idle: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_header_bytes: usize,
    /// 0: unlimited.
    pub max_body_bytes: u64,
    pub max_connections: usize,
    pub min_body_rate: u64,
    pub h2_max_concurrent_streams: u32,
    /// Concurrent HTTP/3 request streams per QUIC connection.
    pub quic_max_streams: u32,
    /// Streams on one upstream HTTP/2 connection, at most (fewer when the upstream says so).
    pub upstream_h2_streams: usize,
    /// HTTP/2 connections to one upstream, at most.
    pub upstream_h2_connections: usize,
}

/// The default of `limits.upstream_h2_streams`: streams limen sends on one upstream HTTP/2
/// connection, at most, before it opens another (fewer when the upstream's SETTINGS say so).
/// 100 is the value the HTTP/2 RFC recommends as a floor.
pub const UPSTREAM_H2_STREAMS: usize = 100;

/// The default of `limits.upstream_h2_connections`: HTTP/2 connections to one upstream, at most;
/// past it, a request takes the least busy one and waits there for a stream.
pub const UPSTREAM_H2_CONNECTIONS: usize = 16;

/// What a route does with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteAction {
    Proxy(Vec<WeightedUpstream>),
    /// A built-in answer, for examples and health checks; needs no upstream.
    Respond {
        status: http::StatusCode,
        body: String,
    },
    /// A redirect to another place (`redirect`); needs no upstream either.
    Redirect(Redirect),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    /// Index in the file; used as the metrics label when there is no name.
    pub index: usize,
    /// The `routes_dir` file the route came from (its file name); None: the main file.
    pub unit: Option<Arc<str>>,
    pub name: Option<String>,
    pub host: HostPattern,
    pub path: String,
    /// What a request must carry besides host and path; empty: nothing.
    pub matcher: RouteMatch,
    pub action: RouteAction,
    pub strip_prefix: bool,
    pub timeout: Option<Duration>,
    /// For the route's `https://` upstreams.
    pub upstream_tls: UpstreamTls,
    pub balance: Balance,
    /// Active checks of every upstream of the route.
    pub health: Option<HealthCheck>,
    pub passive: Passive,
    pub retry: Retry,
    /// Fields set on or removed from the route's requests and responses.
    pub headers: RouteHeaders,
    /// Who may reach the route, checked in this order before anything is forwarded.
    pub access: Option<Access>,
    pub rate_limit: Option<RateLimit>,
    pub auth: Option<Auth>,
    /// The path and Host the upstream sees, when not the routed ones.
    pub rewrite: Option<Rewrite>,
    /// The codings limen may apply to the route's responses.
    pub compress: Option<Compress>,
    /// Where the route starts in the file, for messages.
    pub line: u64,
    pub column: u64,
}

impl RouteSpec {
    /// The route's identity, as duplicates, routes_dir claims, the diff and probation compare
    /// it: its host, and its path with its `match` conditions.
    pub fn key(&self) -> (String, String) {
        (
            self.host.to_string(),
            route_path_key(&self.path, &self.matcher.to_string()),
        )
    }
}

/// A path prefix and a match's canonical form as one key: `/api` alone, or
/// `/api [header x-canary = "true"]`.
pub fn route_path_key(path: &str, matcher: &str) -> String {
    if matcher.is_empty() {
        path.to_owned()
    } else {
        format!("{path} [{matcher}]")
    }
}

/// How limen verifies and authenticates itself to a route's `https://` upstreams. Paths are
/// resolved against the config file's folder; the files are watched like the serving certs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// PEM bundle of the CAs that issue the upstreams' certificates; None: the system's roots.
    pub ca: Option<PathBuf>,
    /// The name sent as SNI and verified; None: the URL's host (an IP is verified against the
    /// certificate's IP SANs).
    pub server_name: Option<String>,
    /// A client certificate and key for upstreams that require one.
    pub client: Option<(PathBuf, PathBuf)>,
    pub insecure_skip_verify: bool,
    pub protocol: UpstreamProtocol,
    /// X25519MLKEM768 offered first (true) or not at all (false) to these upstreams.
    pub post_quantum: bool,
}

impl Default for UpstreamTls {
    fn default() -> UpstreamTls {
        UpstreamTls {
            ca: None,
            server_name: None,
            client: None,
            insecure_skip_verify: false,
            protocol: UpstreamProtocol::default(),
            post_quantum: true,
        }
    }
}
