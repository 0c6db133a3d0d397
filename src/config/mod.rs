//! The YAML configuration: its schema (plain serde structs) and its validation into typed values.
//!
//! Owns: parsing the file text, every default, every rule a config must obey, and the error messages
//! that point at a line and column. Must not touch: sockets, certificates' contents, or the snapshot
//! currently served; loading a config has no side effect.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_saphyr::Spanned;

/// A problem with the config file. Its `Display` names the file, the line and column where there
/// is one, what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}. Check the path given to --config.")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{path}: {message}")]
    Rule { path: PathBuf, message: String },
    /// A file refused for its permissions; the message names it.
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {reason}")]
    NotReadable { path: PathBuf, reason: FileError },
}

/// Why a watched file was not read. The poller reads only regular files, and only up to a limit,
/// so a FIFO, a device or a runaway file can neither block it nor exhaust its memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error(
        "is a {0}, not a regular file; limen reads only regular files (symlinks are followed)"
    )]
    NotRegular(&'static str),
    #[error(
        "is {size} bytes, over the {limit}-byte limit for this kind of file; is it the right file?"
    )]
    TooLarge { size: u64, limit: u64 },
    #[error("cannot read: {0}")]
    Io(String),
}

/// Largest config file read (a ConfigMap holds at most 1 MiB, so this leaves room).
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// Largest certificate, key, CA bundle or ticket-key file read: the Kubernetes Secret limit.
pub const MAX_SECRET_BYTES: u64 = 1024 * 1024;

/// Reads a whole regular file of at most `limit` bytes. Opened non-blocking, so a FIFO swapped in
/// under the name cannot hang the open, then checked on the open handle (no race with a rename).
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let io = |e: std::io::Error| FileError::Io(e.to_string());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(FileError::NotRegular(if ft.is_dir() {
            "directory"
        } else if ft.is_fifo() {
            "FIFO"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "device"
        } else {
            "special file"
        }));
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    // The file may grow between the stat and the read: never read more than the limit.
    let mut out = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut out).map_err(io)?;
    if out.len() as u64 > limit {
        return Err(FileError::TooLarge {
            size: out.len() as u64,
            limit,
        });
    }
    Ok(out)
}

/// A duration written like `500ms`, `5s`, `10m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
            format!("duration {s:?} has no unit: write it like 500ms, 5s, 10m or 1h")
        })?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration {s:?} must start with a whole number, like 5s"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => {
                return Err(format!(
                    "duration {s:?} has an unknown unit {unit:?}: use ms, s, m or h"
                ))
            }
        };
        // Far beyond any sensible timeout, and small enough that `Instant + d` never overflows.
        if d > MAX_DURATION {
            return Err(format!("duration {s:?} is too long: at most 365 days"));
        }
        Ok(Dur(d))
    }
}

const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Deserialise any `FromStr` type from a YAML string, so its error carries the YAML location.
macro_rules! deserialize_from_str {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    };
}
deserialize_from_str!(Dur);

mod balancing;
mod client_auth;
pub mod diff;
mod headers;
mod routes_dir;
pub use balancing::{
    Balance, CheckKind, HealthCheck, Passive, Retry, RetryOn, RetryReason, StatusSet,
    WeightedUpstream, MAX_EJECTION, MAX_WEIGHT,
};
pub use client_auth::{ClientAuthMode, ClientAuthSpec};
pub use headers::{HeaderEdits, RouteHeaders};
pub use routes_dir::{list_routes_dir, load_routes_file, Claims};

/// A listening address: `host:port` with a literal IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr(pub SocketAddr);

impl FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("localhost:") {
            let port: u16 = rest
                .parse()
                .map_err(|_| format!("address {s:?}: the port must be a number from 0 to 65535"))?;
            return Ok(Addr(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        s.parse().map(Addr).map_err(|_| {
            format!(
                "address {s:?} is not IP:PORT; write it like \"127.0.0.1:8443\" or \"[::]:8443\""
            )
        })
    }
}
deserialize_from_str!(Addr);

/// A host pattern of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// One name, lower case.
    Exact(String),
    /// `*.parent`: any name exactly one label above `parent` (stored without the `*.`).
    Wildcard(String),
    /// `*`: any host.
    Any,
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(p) => write!(f, "*.{p}"),
            HostPattern::Any => f.write_str("*"),
        }
    }
}

fn valid_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        if lower == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(parent) = lower.strip_prefix("*.") {
            if valid_dns_name(parent) && parent.contains('.') {
                return Ok(HostPattern::Wildcard(parent.to_string()));
            }
            return Err(format!(
                "host {s:?}: a wildcard covers exactly one label above a name of two labels or more, like \"*.example.test\""
            ));
        }
        if lower.parse::<IpAddr>().is_ok() {
            return Ok(HostPattern::Exact(lower));
        }
        if lower.contains(':') {
            return Err(format!(
                "host {s:?}: write the host name without a port; routes match any port"
            ));
        }
        if valid_dns_name(&lower) {
            return Ok(HostPattern::Exact(lower));
        }
        Err(format!(
            "host {s:?} is not a host name: use a name like \"app.example.test\", \"*.example.test\" or \"*\""
        ))
    }
}
deserialize_from_str!(HostPattern);

/// A path prefix: starts with `/`, no query, no trailing slash unless it is `/` itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathPrefix(pub String);

impl FromStr for PathPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') || s.contains(['?', '#', ' ']) {
            return Err(format!(
                "path {s:?} must start with '/' and hold no '?', '#' or space, like \"/api\""
            ));
        }
        // Requests are routed on their normalized path: a prefix that normalization would change
        // beyond escapes (which routing normalizes too) could never match.
        let segs: Vec<&str> = s[1..].split('/').collect();
        let last = segs.len() - 1;
        let bad_seg = segs.iter().enumerate().any(|(i, g)| {
            let name = g.split(';').next().unwrap_or("");
            name == "." || name == ".." || (g.is_empty() && i != last)
        });
        let bad_escape = s.match_indices('%').any(|(i, _)| {
            !s.get(i + 1..i + 3)
                .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
        });
        if bad_seg || bad_escape || s.contains('\\') {
            return Err(format!(
                "path {s:?} is not in normalized form (no `//`, `.` or `..` segments, backslashes or malformed %-escapes): requests are routed on their normalized path, so this prefix could never match"
            ));
        }
        let trimmed = s.trim_end_matches('/');
        Ok(PathPrefix(if trimmed.is_empty() {
            "/".to_string()
        } else {
            trimmed.to_string()
        }))
    }
}
deserialize_from_str!(PathPrefix);

/// How limen speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamScheme {
    /// `http://`: HTTP/1.1 over TCP.
    Http,
    /// `h2c://`: HTTP/2 over TCP with prior knowledge (gRPC servers and the like).
    H2c,
    /// `https://`: TLS, then HTTP/2 or HTTP/1.1 as ALPN and `upstream_protocol` say.
    Https,
}

/// An upstream written `http://host:port` or `h2c://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamUrl {
    pub scheme: UpstreamScheme,
    /// `host:port`, as it is dialled.
    pub authority: String,
}

impl UpstreamUrl {
    /// The pool key and the `upstream` label of logs and metrics: `host:port` for `http://` (as it
    /// always was), `h2c://host:port` otherwise.
    pub fn label(&self) -> String {
        match self.scheme {
            UpstreamScheme::Http => self.authority.clone(),
            UpstreamScheme::H2c => format!("h2c://{}", self.authority),
            UpstreamScheme::Https => format!("https://{}", self.authority),
        }
    }

    /// The host part, without port or brackets.
    pub fn host(&self) -> &str {
        let host = match self.authority.rsplit_once(':') {
            Some((h, _)) => h,
            None => &self.authority,
        };
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            UpstreamScheme::Http => write!(f, "http://{}", self.authority),
            UpstreamScheme::H2c => write!(f, "h2c://{}", self.authority),
            UpstreamScheme::Https => write!(f, "https://{}", self.authority),
        }
    }
}

impl FromStr for UpstreamUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("upstream {s:?} {why}; write it like \"http://127.0.0.1:3000\" or \"h2c://127.0.0.1:50051\"")
        };
        let uri: http::Uri = s.parse().map_err(|_| bad("is not a URL"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => UpstreamScheme::Http,
            Some("h2c") => UpstreamScheme::H2c,
            Some("https") => UpstreamScheme::Https,
            _ => return Err(bad("must start with http://, h2c:// or https://")),
        };
        let auth = uri.authority().ok_or_else(|| bad("has no host"))?;
        if auth.as_str().contains('@') {
            return Err(bad("must not carry user information"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("must not have a path or query"));
        }
        if auth.host().is_empty() {
            return Err(bad("has no host"));
        }
        let port = auth
            .port_u16()
            .unwrap_or(if scheme == UpstreamScheme::Https {
                443
            } else {
                80
            });
        Ok(UpstreamUrl {
            scheme,
            authority: format!("{}:{port}", auth.host()),
        })
    }
}
deserialize_from_str!(UpstreamUrl);

/// What to speak over TLS to an `https://` upstream (`upstream_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UpstreamProtocol {
    /// ALPN offers h2, then http/1.1; the upstream chooses.
    #[default]
    Auto,
    Http1,
    H2,
}

impl FromStr for UpstreamProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(UpstreamProtocol::Auto),
            "http1" => Ok(UpstreamProtocol::Http1),
            "h2" => Ok(UpstreamProtocol::H2),
            _ => Err(format!(
                "upstream_protocol {s:?} must be \"auto\", \"http1\" or \"h2\""
            )),
        }
    }
}
deserialize_from_str!(UpstreamProtocol);

/// How limen verifies and authenticates itself to a route's `https://` upstreams. Paths are
/// resolved against the config file's folder; the files are watched like the serving certs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
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
}

/// A trusted proxy: one address or a CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    pub net: IpAddr,
    pub prefix: u8,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, len: u32, prefix: u8) -> u128 {
            if prefix == 0 {
                0
            } else {
                bits >> (len - u32::from(prefix))
            }
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n).into(), 32, self.prefix)
                    == masked(u32::from(a).into(), 32, self.prefix)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), 128, self.prefix) == masked(u128::from(a), 128, self.prefix)
            }
            _ => false,
        }
    }
}

impl FromStr for IpBlock {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("trusted proxy {s:?} is not an IP address or CIDR block like \"10.0.0.0/8\"")
        };
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let net: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(IpBlock { net, prefix })
    }
}
deserialize_from_str!(IpBlock);

/// What to do with `%2F` and `%5C` in a path (`path_normalization.escaped_slashes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// Forward them as they are (upper-cased); they are not segment separators. APIs use them.
    #[default]
    Keep,
    /// Answer 400: for upstreams that decode them into separators.
    Reject,
}

impl FromStr for EscapedSlashes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep" => Ok(EscapedSlashes::Keep),
            "reject" => Ok(EscapedSlashes::Reject),
            _ => Err(format!(
                "escaped_slashes {s:?} must be \"keep\" or \"reject\""
            )),
        }
    }
}
deserialize_from_str!(EscapedSlashes);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    #[default]
    V12,
    V13,
}

impl FromStr for TlsVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "1.2" => Ok(TlsVersion::V12),
            "1.3" => Ok(TlsVersion::V13),
            _ => Err(format!("min_version {s:?} must be \"1.2\" or \"1.3\"")),
        }
    }
}
deserialize_from_str!(TlsVersion);

// ---- The file's schema. Unknown keys are errors everywhere. ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: RawListen,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    reload: RawReload,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    trusted_proxies: Vec<IpBlock>,
    #[serde(default)]
    workers: Option<usize>,
    #[serde(default = "yes")]
    access_log: bool,
    #[serde(default)]
    allow_underscores_in_headers: bool,
    #[serde(default)]
    path_normalization: RawPathNormalization,
    routes_dir: Option<PathBuf>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPathNormalization {
    #[serde(default)]
    escaped_slashes: EscapedSlashes,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    https: Addr,
    http: Option<Addr>,
    redirect_port: Option<u16>,
    admin: Option<Addr>,
    #[serde(default)]
    admin_public: bool,
    admin_token_file: Option<PathBuf>,
    proxy_protocol: Option<RawProxyProtocol>,
    #[serde(default)]
    http_proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxyProtocol {
    from: Vec<IpBlock>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default)]
    cert_dirs: Vec<PathBuf>,
    #[serde(default)]
    certs: Vec<RawCertPair>,
    default_cert: Option<String>,
    #[serde(default)]
    self_signed: bool,
    #[serde(default)]
    min_version: TlsVersion,
    ticket_keys: Option<PathBuf>,
    #[serde(default)]
    client_auth: Vec<Spanned<client_auth::RawClientAuth>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertPair {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReload {
    interval: Option<Dur>,
    verify_every: Option<Dur>,
    probation: Option<RawProbation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbation {
    window: Dur,
    #[serde(default = "default_min_requests")]
    min_requests: u64,
    #[serde(default = "default_error_ratio")]
    max_error_ratio: f64,
}

fn default_min_requests() -> u64 {
    20
}

fn default_error_ratio() -> f64 {
    0.5
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    handshake: Option<Dur>,
    header_read: Option<Dur>,
    idle: Option<Dur>,
    upstream_connect: Option<Dur>,
    upstream_response: Option<Dur>,
    body_idle: Option<Dur>,
    write_idle: Option<Dur>,
    shutdown_delay: Option<Dur>,
    shutdown_grace: Option<Dur>,
    upstream_ping_interval: Option<Dur>,
    upstream_idle: Option<Dur>,
    upstream_ping_timeout: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_header_bytes: Option<usize>,
    max_body_bytes: Option<u64>,
    max_connections: Option<usize>,
    min_body_rate: Option<u64>,
    h2_max_concurrent_streams: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    host: HostPattern,
    #[serde(default = "root_path")]
    path: PathPrefix,
    #[serde(default)]
    upstreams: Vec<WeightedUpstream>,
    respond: Option<RawRespond>,
    balance: Option<Balance>,
    health: Option<balancing::RawHealth>,
    passive: Option<balancing::RawPassive>,
    retry: Option<balancing::RawRetry>,
    headers: Option<headers::RawHeaders>,
    #[serde(default)]
    strip_prefix: bool,
    timeout: Option<Dur>,
    upstream_tls: Option<RawUpstreamTls>,
    upstream_protocol: Option<UpstreamProtocol>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca: Option<PathBuf>,
    server_name: Option<String>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

fn yes() -> bool {
    true
}

fn root_path() -> PathPrefix {
    PathPrefix("/".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRespond {
    #[serde(default = "ok_status")]
    status: u16,
    #[serde(default)]
    body: String,
}

fn ok_status() -> u16 {
    200
}

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
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_header_bytes: usize,
    /// 0: unlimited.
    pub max_body_bytes: u64,
    pub max_connections: usize,
    pub min_body_rate: u64,
    pub h2_max_concurrent_streams: u32,
}

/// What a route does with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteAction {
    Proxy(Vec<WeightedUpstream>),
    /// A built-in answer, for examples and health checks; needs no upstream.
    Respond {
        status: http::StatusCode,
        body: String,
    },
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
    /// Where the route starts in the file, for messages.
    pub line: u64,
    pub column: u64,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&read_text(path)?, path)
    }

    /// Validates config text as if it were read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| syntax_error(path, &e))?;
        let resolve = resolver(path);
        let rule = |message: String| ConfigError::Rule {
            path: path.to_path_buf(),
            message,
        };
        let routes = routes_from(raw.routes, path, None, &resolve)?;
        let timeouts = timeouts_from(raw.timeouts);
        let limits = limits_from(raw.limits).map_err(rule)?;
        if raw.workers == Some(0) {
            return Err(rule(
                "workers must be at least 1 (or left out: one per core)".into(),
            ));
        }
        let interval = raw
            .reload
            .interval
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(5));
        if interval < Duration::from_millis(10) {
            return Err(rule("reload.interval must be at least 10ms".into()));
        }
        let probation = raw.reload.probation.map(|p| Probation {
            window: p.window.0,
            min_requests: p.min_requests,
            max_error_ratio: p.max_error_ratio,
        });
        if let Some(p) = &probation {
            if p.window.is_zero() || p.min_requests == 0 {
                return Err(rule(
                    "reload.probation: window must be more than 0 and min_requests at least 1"
                        .into(),
                ));
            }
            if !(0.0..1.0).contains(&p.max_error_ratio) {
                return Err(rule(format!(
                    "reload.probation.max_error_ratio {} must be at least 0 and below 1 (0.5: roll back when more than half fail)",
                    p.max_error_ratio
                )));
            }
        }
        for (name, d) in [
            ("timeouts.handshake", timeouts.handshake),
            ("timeouts.header_read", timeouts.header_read),
            ("timeouts.idle", timeouts.idle),
            ("timeouts.upstream_connect", timeouts.upstream_connect),
            ("timeouts.upstream_response", timeouts.upstream_response),
            ("timeouts.body_idle", timeouts.body_idle),
            ("timeouts.write_idle", timeouts.write_idle),
            (
                "timeouts.upstream_ping_interval",
                timeouts.upstream_ping_interval,
            ),
            (
                "timeouts.upstream_ping_timeout",
                timeouts.upstream_ping_timeout,
            ),
            ("timeouts.upstream_idle", timeouts.upstream_idle),
        ] {
            if d.is_zero() {
                return Err(rule(format!("{name} must be more than 0")));
            }
        }

        let listen = Listen {
            https: raw.listen.https.0,
            http: raw.listen.http.map(|a| a.0),
            redirect_port: raw.listen.redirect_port,
            admin: raw.listen.admin.map(|a| a.0),
            admin_public: raw.listen.admin_public,
            admin_token_file: raw.listen.admin_token_file.map(&resolve),
            proxy_protocol_from: raw
                .listen
                .proxy_protocol
                .map(|p| p.from)
                .unwrap_or_default(),
            http_proxy_protocol: raw.listen.http_proxy_protocol,
        };
        if listen.http_proxy_protocol && listen.proxy_protocol_from.is_empty() {
            return Err(rule(
                "listen.http_proxy_protocol applies listen.proxy_protocol.from to listen.http; set that list first".into(),
            ));
        }
        if let Some(admin) = listen.admin {
            if !admin.ip().is_loopback() && !listen.admin_public {
                return Err(rule(format!(
                    "listen.admin {admin} is not a loopback address; the admin listener exposes internals, so bind it to 127.0.0.1 or set listen.admin_public: true"
                )));
            }
        }

        let tls = TlsSettings {
            cert_dirs: raw.tls.cert_dirs.into_iter().map(&resolve).collect(),
            certs: raw
                .tls
                .certs
                .into_iter()
                .map(|p| CertPair {
                    cert: resolve(p.cert),
                    key: resolve(p.key),
                })
                .collect(),
            default_cert: raw.tls.default_cert.map(|s| s.to_ascii_lowercase()),
            self_signed: raw.tls.self_signed,
            ticket_keys: raw.tls.ticket_keys.map(&resolve),
            client_auth: client_auth::client_auth_from(raw.tls.client_auth, path, &resolve)?,
            min_version: raw.tls.min_version,
        };
        if tls.cert_dirs.is_empty() && tls.certs.is_empty() && !tls.self_signed {
            return Err(rule(
                "tls has no certificates: give tls.cert_dirs or tls.certs, or set tls.self_signed: true for development".into(),
            ));
        }

        Ok(Config {
            source: path.to_path_buf(),
            listen,
            tls,
            reload: ReloadSettings {
                interval,
                verify_every: raw
                    .reload
                    .verify_every
                    .map(|d| d.0)
                    .unwrap_or(Duration::from_secs(60)),
                probation,
            },
            timeouts,
            limits,
            trusted_proxies: raw.trusted_proxies,
            workers: raw.workers,
            access_log: raw.access_log,
            allow_underscores_in_headers: raw.allow_underscores_in_headers,
            escaped_slashes: raw.path_normalization.escaped_slashes,
            routes_dir: raw.routes_dir.map(&resolve),
            routes,
        })
    }
}

/// Resolves a path written in the file at `path`: `./certs` beside `/etc/limen/proxy.yaml` is
/// `/etc/limen/certs`, without the `.`.
fn resolver(path: &Path) -> impl Fn(PathBuf) -> PathBuf + '_ {
    let base = path.parent().unwrap_or(Path::new("."));
    move |p: PathBuf| {
        let joined = if p.is_absolute() { p } else { base.join(p) };
        joined
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect::<PathBuf>()
    }
}

/// A config or routes file's text: a regular file within the size limit, in UTF-8.
fn read_text(path: &Path) -> Result<String, ConfigError> {
    let bytes = match read_regular(path, MAX_CONFIG_BYTES) {
        Ok(b) => b,
        Err(FileError::Io(msg)) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::other(msg),
            })
        }
        Err(reason) => {
            return Err(ConfigError::NotReadable {
                path: path.to_path_buf(),
                reason,
            })
        }
    };
    String::from_utf8(bytes).map_err(|_| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: "the file is not UTF-8 text".into(),
    })
}

/// The route list, each validated with its place in the file.
fn routes_from(
    raw: Vec<Spanned<RawRoute>>,
    path: &Path,
    unit: Option<Arc<str>>,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<Vec<RouteSpec>, ConfigError> {
    let invalid = |line: u64, column: u64, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        line,
        column,
        message,
    };
    let mut routes = Vec::with_capacity(raw.len());
    let mut seen = std::collections::HashMap::new();
    let mut names = std::collections::HashMap::new();
    for (index, spanned) in raw.into_iter().enumerate() {
        let (line, column) = (spanned.referenced.line(), spanned.referenced.column());
        let r = spanned.value;
        let https: Vec<&UpstreamUrl> = r
            .upstreams
            .iter()
            .map(|u| &u.url)
            .filter(|u| u.scheme == UpstreamScheme::Https)
            .collect();
        let upstream_tls = upstream_tls_from(r.upstream_tls, r.upstream_protocol, &https, resolve)
            .map_err(|m| invalid(line, column, format!("route {index}: {m}")))?;
        let raw_balancing = balancing::RawBalancing {
            balance: r.balance,
            health: r.health,
            passive: r.passive,
            retry: r.retry,
        };
        if r.upstreams.is_empty() && !raw_balancing.is_empty() {
            return Err(invalid(line, column, format!(
                "route {index}: balance, health, passive and retry apply to routes with upstreams, and this route has none"
            )));
        }
        let exact_host = match &r.host {
            HostPattern::Exact(h) => Some(h.as_str()),
            _ => None,
        };
        let b = balancing::balancing_from(
            raw_balancing,
            exact_host,
            &r.upstreams,
            upstream_tls.protocol == UpstreamProtocol::Http1,
        )
        .map_err(|m| invalid(line, column, format!("route {index}: {m}")))?;
        let route_headers = headers::headers_from(r.headers)
            .map_err(|m| invalid(line, column, format!("route {index}: {m}")))?;
        let action = match (r.upstreams.is_empty(), r.respond) {
            (false, None) => RouteAction::Proxy(r.upstreams),
            (true, Some(resp)) => {
                let status = http::StatusCode::from_u16(resp.status)
                    .ok()
                    .filter(|s| (200..=599).contains(&s.as_u16()))
                    .ok_or_else(|| {
                        invalid(line, column, format!(
                            "route {index}: respond.status {} is not a final HTTP status (200-599)",
                            resp.status
                        ))
                    })?;
                RouteAction::Respond {
                    status,
                    body: resp.body,
                }
            }
            (true, None) => {
                return Err(invalid(line, column, format!(
                    "route {index} ({} {}) has neither `upstreams` nor `respond`: give it at least one upstream like \"http://127.0.0.1:3000\"",
                    r.host, r.path.0
                )))
            }
            (false, Some(_)) => {
                return Err(invalid(line, column, format!(
                    "route {index} has both `upstreams` and `respond`: keep one of them"
                )))
            }
        };
        if r.timeout.is_some_and(|t| t.0.is_zero()) {
            return Err(invalid(
                line,
                column,
                format!("route {index}: timeout must be more than 0"),
            ));
        }
        if let Some(name) = &r.name {
            // Unnamed routes are labelled by their index, so a name may not look like one.
            if name.is_empty() || name.len() > 64 || name.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(
                    line,
                    column,
                    format!("route {index}: name must be 1 to 64 characters, not only digits"),
                ));
            }
            if let Some((l, c)) = names.insert(name.clone(), (line, column)) {
                return Err(invalid(line, column, format!(
                    "route {index}: name {name:?} is already used by the route at line {l}:{c}; names label metrics, so each must be unique"
                )));
            }
        }
        if let Some((l, c)) = seen.insert((r.host.clone(), r.path.0.clone()), (line, column)) {
            return Err(invalid(line, column, format!(
                "route {index} repeats host {} and path {} already routed at line {l}:{c}: merge the two routes or change one",
                r.host, r.path.0
            )));
        }
        routes.push(RouteSpec {
            index,
            unit: unit.clone(),
            name: r.name,
            host: r.host,
            path: r.path.0,
            action,
            strip_prefix: r.strip_prefix,
            timeout: r.timeout.map(|d| d.0),
            upstream_tls,
            balance: b.balance,
            health: b.health,
            passive: b.passive,
            retry: b.retry,
            headers: route_headers,
            line,
            column,
        });
    }

    Ok(routes)
}

/// A route's `upstream_tls` and `upstream_protocol`, which only `https://` upstreams use.
fn upstream_tls_from(
    raw: Option<RawUpstreamTls>,
    protocol: Option<UpstreamProtocol>,
    https: &[&UpstreamUrl],
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<UpstreamTls, String> {
    let has_https = !https.is_empty();
    if !has_https && (raw.is_some() || protocol.is_some()) {
        return Err(
            "upstream_tls and upstream_protocol apply to https:// upstreams, and this route has none".into(),
        );
    }
    let raw = raw.unwrap_or_default();
    let client = match (raw.client_cert, raw.client_key) {
        (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
        (None, None) => None,
        _ => return Err("upstream_tls needs both client_cert and client_key, or neither".into()),
    };
    if let Some(name) = &raw.server_name {
        if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
            return Err(format!(
                "upstream_tls.server_name {name:?} is not a DNS name or an IP address"
            ));
        }
    } else if let Some(u) = https
        .iter()
        .find(|u| rustls_pki_types::ServerName::try_from(u.host()).is_err())
    {
        return Err(format!(
            "upstream {u}: its host cannot be verified as a TLS name; set upstream_tls.server_name"
        ));
    }
    Ok(UpstreamTls {
        ca: raw.ca.map(resolve),
        server_name: raw.server_name,
        client,
        insecure_skip_verify: raw.insecure_skip_verify,
        protocol: protocol.unwrap_or_default(),
    })
}

fn timeouts_from(t: RawTimeouts) -> Timeouts {
    let secs = |o: Option<Dur>, s: u64| o.map(|d| d.0).unwrap_or(Duration::from_secs(s));
    Timeouts {
        handshake: secs(t.handshake, 10),
        header_read: secs(t.header_read, 10),
        idle: secs(t.idle, 60),
        upstream_connect: secs(t.upstream_connect, 5),
        upstream_response: secs(t.upstream_response, 60),
        body_idle: secs(t.body_idle, 30),
        write_idle: secs(t.write_idle, 30),
        shutdown_delay: secs(t.shutdown_delay, 0),
        shutdown_grace: secs(t.shutdown_grace, 30),
        upstream_ping_interval: secs(t.upstream_ping_interval, 10),
        upstream_ping_timeout: secs(t.upstream_ping_timeout, 20),
        upstream_idle: secs(t.upstream_idle, 30),
    }
}

fn limits_from(l: RawLimits) -> Result<Limits, String> {
    let limits = Limits {
        max_header_bytes: l.max_header_bytes.unwrap_or(65536),
        max_body_bytes: l.max_body_bytes.unwrap_or(0),
        max_connections: l.max_connections.unwrap_or(10000),
        min_body_rate: l.min_body_rate.unwrap_or(512),
        h2_max_concurrent_streams: l.h2_max_concurrent_streams.unwrap_or(128),
    };
    if limits.max_header_bytes < 1024 {
        return Err("limits.max_header_bytes must be at least 1024".into());
    }
    if limits.max_connections == 0 || limits.max_connections > 1_000_000 {
        return Err("limits.max_connections must be from 1 to 1000000".into());
    }
    if limits.max_header_bytes > 16 * 1024 * 1024 {
        return Err("limits.max_header_bytes must be at most 16777216".into());
    }
    if limits.h2_max_concurrent_streams == 0 {
        return Err("limits.h2_max_concurrent_streams must be at least 1".into());
    }
    Ok(limits)
}

fn syntax_error(path: &Path, e: &serde_saphyr::Error) -> ConfigError {
    let text = e.to_string();
    let text = text.trim_end();
    let Some(loc) = e.location() else {
        return ConfigError::Syntax {
            path: path.to_path_buf(),
            message: text.to_string(),
        };
    };
    // The crate prefixes "error: line L column C: "; the location goes in front as file:line:col,
    // and the snippet that follows names the file instead of "<input>".
    let body = text
        .split_once(": ")
        .and_then(|(_, rest)| rest.split_once(": "))
        .filter(|_| text.starts_with("error: line "))
        .map_or(text, |(_, rest)| rest);
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line: loc.line(),
        column: loc.column(),
        message: body.replace("<input>", &path.display().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/limen/proxy.yaml"))
    }

    const MINIMAL: &str = "listen:\n  https: \"127.0.0.1:8443\"\ntls:\n  self_signed: true\n";

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(
            "500ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!("5s".parse::<Dur>().unwrap().0, Duration::from_secs(5));
        assert_eq!("10m".parse::<Dur>().unwrap().0, Duration::from_secs(600));
        assert!("5".parse::<Dur>().is_err());
        assert!("5d".parse::<Dur>().is_err());
        assert!("s".parse::<Dur>().is_err());
    }

    #[test]
    fn defaults_fill_in() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.timeouts.handshake, Duration::from_secs(10));
        assert_eq!(c.limits.max_header_bytes, 65536);
        assert_eq!(c.reload.interval, Duration::from_secs(5));
        assert!(c.routes.is_empty());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c = parse("listen: {https: \"127.0.0.1:1\"}\ntls:\n  cert_dirs: [./certs, /abs]\n")
            .unwrap();
        assert_eq!(c.tls.cert_dirs[0], Path::new("/etc/limen/certs"));
        assert_eq!(c.tls.cert_dirs[1], Path::new("/abs"));
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let err = parse(&format!(
            "{MINIMAL}routes:\n  - host: a.test\n    upstream: [\"http://127.0.0.1:1\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("upstream"), "{err}");
        assert!(err.contains("7:") || err.contains("line 7"), "{err}");
    }

    #[test]
    fn malformed_upstream_names_its_location() {
        let err = parse(&format!(
            "{MINIMAL}routes:\n  - host: a.test\n    upstreams: [\"ftp://x\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("http://"), "{err}");
        assert!(err.contains("7:") || err.contains("line 7"), "{err}");
    }

    #[test]
    fn balancing_keys_parse_with_their_defaults() {
        let c = parse(&format!(
            "{MINIMAL}routes:\n  - host: a.test\n    upstreams: [\"http://127.0.0.1:1\", {{url: \"h2c://127.0.0.1:2\", weight: 3}}]\n    balance: least_request\n    health: {{expect_status: \"200,204\"}}\n    retry: {{on: [reset, 503, \"504\"], budget: 2.5%}}\n  - host: b.test\n    upstreams: [\"http://127.0.0.1:3\"]\n"
        ))
        .unwrap();
        let r = &c.routes[0];
        let RouteAction::Proxy(ups) = &r.action else {
            panic!("a proxy route")
        };
        assert_eq!(ups.iter().map(|u| u.weight).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(r.balance, Balance::LeastRequest);
        let h = r.health.as_ref().unwrap();
        assert_eq!(h.kind, CheckKind::Http);
        assert_eq!(h.path, "/");
        assert_eq!(
            h.host.as_deref(),
            Some("a.test"),
            "an exact host is the check's Host"
        );
        assert!(h.expect.contains(204) && !h.expect.contains(201));
        assert_eq!(
            (h.interval, h.timeout, h.healthy_after, h.unhealthy_after),
            (Duration::from_secs(5), Duration::from_secs(2), 2, 3)
        );
        assert!(r.retry.on.has(RetryReason::Status503) && r.retry.on.has(RetryReason::Status504));
        assert!(!r.retry.on.has(RetryReason::ConnectFailure));
        assert_eq!((r.retry.attempts, r.retry.budget_permille), (1, 25));
        assert_eq!(r.passive, Passive::default());
        let d = &c.routes[1];
        assert_eq!((d.balance, d.health.clone()), (Balance::RoundRobin, None));
        assert_eq!(d.retry, Retry::default());
    }

    #[test]
    fn balancing_mistakes_name_their_line_and_what_to_do() {
        let route = |keys: &str| {
            parse(&format!(
                "{MINIMAL}routes:\n  - host: a.test\n    upstreams: [\"http://127.0.0.1:1\"]\n{keys}"
            ))
            .unwrap_err()
            .to_string()
        };
        for (keys, want, line) in [
            ("    balance: fastest\n", "must be \"round_robin\"", ":8:"),
            (
                "    health: {expect_status: \"2xx\"}\n",
                "expect_status \"2xx\"",
                ":8:",
            ),
            (
                "    health: {kind: grpc}\n",
                "needs an h2c:// or https://",
                ":6:",
            ),
            (
                "    health: {kind: tcp, path: /x}\n",
                "applies to kind http only",
                ":6:",
            ),
            (
                "    health: {interval: 1s, timeout: 2s}\n",
                "at most health.interval",
                ":6:",
            ),
            ("    health: {unhealthy_after: 0}\n", "1 to 100", ":6:"),
            ("    retry: {on: [500]}\n", "retry.on \"500\"", ":8:"),
            (
                "    retry: {budget: 20}\n",
                "percentage like \"20%\"",
                ":8:",
            ),
            ("    retry: {attempts: 11}\n", "0 to 10", ":6:"),
            ("    passive: {ejection: 10m}\n", "at most 5m", ":6:"),
            ("    retries: 3\n", "retries", ":8:"),
        ] {
            let err = route(keys);
            assert!(err.contains(want), "{keys}: {err}");
            assert!(err.contains(line), "{keys}: want {line} in {err}");
        }
        let err = parse(&format!(
            "{MINIMAL}routes:\n  - host: a.test\n    upstreams: [{{url: \"http://127.0.0.1:1\", weight: 0}}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("from 1 to 1000") && err.contains(":7:"),
            "{err}"
        );
        let err = parse(&format!(
            "{MINIMAL}routes:\n  - {{host: a.test, respond: {{}}, retry: {{attempts: 2}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("routes with upstreams"), "{err}");
    }

    #[test]
    fn duplicate_host_and_path_is_an_error() {
        let err = parse(&format!(
            "{MINIMAL}routes:\n  - {{host: a.test, path: /x, upstreams: [\"http://127.0.0.1:1\"]}}\n  - {{host: A.test, path: /x/, upstreams: [\"http://127.0.0.1:2\"]}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains(":7:"), "{err}");
        assert!(err.contains("repeats"), "{err}");
    }

    #[test]
    fn path_prefixes_must_be_in_normalized_form() {
        for bad in [
            "/a//b", "/a/./b", "/a/../b", "/a/..", "/..;x", "/a%zz", "/a%2", "/a\\b",
        ] {
            assert!(bad.parse::<PathPrefix>().is_err(), "{bad}");
        }
        for good in ["/", "/api/", "/a%20b", "/a;v=1", "/.well-known"] {
            assert!(good.parse::<PathPrefix>().is_ok(), "{good}");
        }
    }

    #[test]
    fn host_patterns() {
        assert_eq!("*".parse::<HostPattern>().unwrap(), HostPattern::Any);
        assert_eq!(
            "*.Example.test".parse::<HostPattern>().unwrap(),
            HostPattern::Wildcard("example.test".into())
        );
        assert!("*.test".parse::<HostPattern>().is_err());
        assert!("a.*.test".parse::<HostPattern>().is_err());
        assert!("a.test:443".parse::<HostPattern>().is_err());
    }

    #[test]
    fn ip_blocks() {
        let b: IpBlock = "10.0.0.0/8".parse().unwrap();
        assert!(b.contains("10.1.2.3".parse().unwrap()));
        assert!(!b.contains("11.1.2.3".parse().unwrap()));
        let one: IpBlock = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        let all: IpBlock = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("::ffff:1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn admin_must_be_loopback_unless_public() {
        let err = parse(
            "listen: {https: \"127.0.0.1:1\", admin: \"0.0.0.0:9901\"}\ntls: {self_signed: true}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("admin_public"), "{err}");
        assert!(parse("listen: {https: \"127.0.0.1:1\", admin: \"0.0.0.0:9901\", admin_public: true}\ntls: {self_signed: true}\n").is_ok());
    }

    #[test]
    fn route_names_are_unique_and_not_numbers_and_durations_are_bounded() {
        let dup = parse(&format!(
            "{MINIMAL}routes:\n  - {{name: a, host: a.test, respond: {{}}}}\n  - {{name: a, host: b.test, respond: {{}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(dup.contains("already used"), "{dup}");
        let digits = parse(&format!(
            "{MINIMAL}routes:\n  - {{name: \"3\", host: a.test, respond: {{}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(digits.contains("digits"), "{digits}");
        let long = parse(&format!("{MINIMAL}timeouts:\n  idle: 100000000h\n"))
            .unwrap_err()
            .to_string();
        assert!(long.contains("too long"), "{long}");
        let conns = parse(&format!(
            "{MINIMAL}limits:\n  max_connections: 99999999999\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(conns.contains("max_connections"), "{conns}");
    }

    #[test]
    fn probation_and_routes_dir_parse_with_their_defaults_and_bounds() {
        let c = parse(&format!(
            "{MINIMAL}routes_dir: ./routes.d\nreload:\n  probation: {{window: 30s}}\n"
        ))
        .unwrap();
        assert_eq!(
            c.routes_dir.as_deref(),
            Some(Path::new("/etc/limen/routes.d"))
        );
        let p = c.reload.probation.unwrap();
        assert_eq!(
            (p.window, p.min_requests, p.max_error_ratio),
            (Duration::from_secs(30), 20, 0.5)
        );
        assert!(parse(MINIMAL).unwrap().reload.probation.is_none());
        for (bad, says) in [
            ("{window: 0s}", "window"),
            ("{window: 1s, min_requests: 0}", "min_requests"),
            ("{window: 1s, max_error_ratio: 1.0}", "max_error_ratio"),
            ("{window: 1s, max_error_ratio: -0.1}", "max_error_ratio"),
            ("{min_requests: 3}", "window"),
        ] {
            let e = parse(&format!("{MINIMAL}reload:\n  probation: {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(says) && e.starts_with("/etc/limen/proxy.yaml"),
                "{bad}: {e}"
            );
        }
    }
}
