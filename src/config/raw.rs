//! The config file's schema, exactly as written in YAML: plain serde structs, one per mapping, with
//! the defaults serde fills in. Unknown keys are errors everywhere.
//!
//! Owns: the key names and which keys are optional. Must not touch: validation and defaults that
//! depend on other keys (`build`), or the types a value parses into (`values`).

use std::path::PathBuf;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::balancing::{RawHealth, RawPassive, RawRetry};
use super::client_auth::RawClientAuth;
use super::headers::RawHeaders;
use super::{
    Addr, Balance, Dur, EscapedSlashes, HostPattern, IpBlock, PathPrefix, TlsVersion,
    UpstreamProtocol, WeightedUpstream,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: RawListen,
    #[serde(default)]
    pub(super) tls: RawTls,
    #[serde(default)]
    pub(super) reload: RawReload,
    #[serde(default)]
    pub(super) timeouts: RawTimeouts,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<IpBlock>,
    #[serde(default)]
    pub(super) workers: Option<usize>,
    #[serde(default = "yes")]
    pub(super) access_log: bool,
    #[serde(default)]
    pub(super) allow_underscores_in_headers: bool,
    #[serde(default)]
    pub(super) path_normalization: RawPathNormalization,
    pub(super) request_id: Option<super::request_id::RawRequestId>,
    pub(super) routes_dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) routes: Vec<Spanned<RawRoute>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPathNormalization {
    #[serde(default)]
    pub(super) escaped_slashes: EscapedSlashes,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub(super) https: Addr,
    pub(super) http: Option<Addr>,
    pub(super) redirect_port: Option<u16>,
    pub(super) admin: Option<Addr>,
    #[serde(default)]
    pub(super) admin_public: bool,
    pub(super) admin_token_file: Option<PathBuf>,
    pub(super) proxy_protocol: Option<RawProxyProtocol>,
    #[serde(default)]
    pub(super) http_proxy_protocol: bool,
    pub(super) quic: Option<Addr>,
    pub(super) alt_svc: Option<bool>,
    pub(super) alt_svc_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxyProtocol {
    pub(super) from: Vec<IpBlock>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    #[serde(default)]
    pub(super) cert_dirs: Vec<PathBuf>,
    #[serde(default)]
    pub(super) certs: Vec<RawCertPair>,
    pub(super) default_cert: Option<String>,
    #[serde(default)]
    pub(super) self_signed: bool,
    #[serde(default)]
    pub(super) min_version: TlsVersion,
    pub(super) ticket_keys: Option<PathBuf>,
    #[serde(default)]
    pub(super) client_auth: Vec<Spanned<RawClientAuth>>,
    #[serde(default = "yes")]
    pub(super) post_quantum: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertPair {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReload {
    pub(super) interval: Option<Dur>,
    pub(super) verify_every: Option<Dur>,
    pub(super) probation: Option<RawProbation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProbation {
    pub(super) window: Dur,
    #[serde(default = "default_min_requests")]
    pub(super) min_requests: u64,
    #[serde(default = "default_error_ratio")]
    pub(super) max_error_ratio: f64,
}

fn default_min_requests() -> u64 {
    20
}

fn default_error_ratio() -> f64 {
    0.5
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub(super) handshake: Option<Dur>,
    pub(super) header_read: Option<Dur>,
    pub(super) idle: Option<Dur>,
    pub(super) upstream_connect: Option<Dur>,
    pub(super) upstream_response: Option<Dur>,
    pub(super) body_idle: Option<Dur>,
    pub(super) write_idle: Option<Dur>,
    pub(super) shutdown_delay: Option<Dur>,
    pub(super) shutdown_grace: Option<Dur>,
    pub(super) upstream_ping_interval: Option<Dur>,
    pub(super) upstream_idle: Option<Dur>,
    pub(super) upstream_write: Option<Dur>,
    pub(super) quic_idle: Option<Dur>,
    pub(super) upstream_ping_timeout: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_header_bytes: Option<usize>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) max_connections: Option<usize>,
    pub(super) min_body_rate: Option<u64>,
    pub(super) h2_max_concurrent_streams: Option<u32>,
    pub(super) quic_max_streams: Option<super::values::Bounded<1, 10_000>>,
    pub(super) upstream_h2_streams: Option<super::values::Bounded<1, 10_000>>,
    pub(super) upstream_h2_connections: Option<super::values::Bounded<1, 1_000>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: Option<String>,
    pub(super) host: HostPattern,
    #[serde(default = "root_path")]
    pub(super) path: PathPrefix,
    #[serde(default)]
    pub(super) upstreams: Vec<WeightedUpstream>,
    pub(super) respond: Option<RawRespond>,
    pub(super) redirect: Option<super::redirect::RawRedirect>,
    pub(super) balance: Option<Balance>,
    pub(super) health: Option<RawHealth>,
    pub(super) passive: Option<RawPassive>,
    pub(super) retry: Option<RawRetry>,
    pub(super) headers: Option<RawHeaders>,
    #[serde(default)]
    pub(super) strip_prefix: bool,
    pub(super) timeout: Option<Dur>,
    pub(super) upstream_tls: Option<RawUpstreamTls>,
    pub(super) upstream_protocol: Option<UpstreamProtocol>,
    pub(super) access: Option<super::policy::RawAccess>,
    pub(super) rate_limit: Option<super::policy::RawRateLimit>,
    pub(super) auth: Option<super::policy::RawAuth>,
    pub(super) rewrite: Option<super::rewrite::RawRewrite>,
    pub(super) compress: Option<super::compress::RawCompress>,
    #[serde(rename = "match")]
    pub(super) matcher: Option<super::matching::RawMatch>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    pub(super) ca: Option<PathBuf>,
    pub(super) server_name: Option<String>,
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
    #[serde(default)]
    pub(super) insecure_skip_verify: bool,
    pub(super) post_quantum: Option<bool>,
}

fn yes() -> bool {
    true
}

fn root_path() -> PathPrefix {
    PathPrefix("/".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRespond {
    #[serde(default = "ok_status")]
    pub(super) status: u16,
    #[serde(default)]
    pub(super) body: String,
}

fn ok_status() -> u16 {
    200
}
