//! Prometheus metrics: the process-wide registry and the handles the request path, the listeners
//! and the reloader update.
//!
//! Owns: metric names, labels and buckets, and the text exposition. Labels have bounded
//! cardinality: routes by name or index, upstreams by configured address, certificates by name
//! and file; never a raw path or client address. Must not touch: I/O (the admin listener serves
//! what `encode` returns).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Arc<str>,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    pub route: Arc<str>,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: Arc<str>,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub route: Arc<str>,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodingLabel {
    pub algorithm: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodingBytesLabels {
    pub algorithm: &'static str,
    /// `in`: the upstream's bytes; `out`: the coded bytes sent on.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientAuthLabels {
    pub host: Arc<str>,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub name: String,
    pub file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabel {
    pub file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigInfoLabels {
    pub file: String,
    pub sha256: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertInfoLabels {
    pub name: String,
    pub sha256: String,
    pub not_after: String,
}

fn duration_histogram() -> Histogram {
    // 1 ms to ~65 s: proxied requests, from cache hits to long polls.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

/// Every metric limen exposes.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    pub connections_open: Family<ProtocolLabel, Gauge>,
    pub connections_parked: Gauge,
    pub tls_handshakes: Family<ResultLabel, Counter>,
    pub tls_key_exchanges: Family<GroupLabel, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub config_reload_successful: Gauge,
    pub config_last_success: Gauge<f64, AtomicU64>,
    pub certificate_expiry: Family<CertLabels, Gauge>,
    pub generation: Gauge,
    pub upstream_up: Family<UpstreamLabel, Gauge>,
    pub health_checks: Family<UpstreamLabels, Counter>,
    pub ejections: Family<UpstreamLabel, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub retry_budget_exhausted: Family<RouteLabel, Counter>,
    pub access_denied: Family<RouteLabel, Counter>,
    pub rate_limited: Family<RouteLabel, Counter>,
    pub compressed_responses: Family<CodingLabel, Counter>,
    pub compression_bytes: Family<CodingBytesLabels, Counter>,
    pub compression_busy: Counter,
    pub auth_requests: Family<AuthLabels, Counter>,
    pub route_all_down: Family<RouteLabel, Gauge>,
    pub proxy_protocol_failures: Family<ReasonLabel, Counter>,
    pub tls_client_auth_failures: Family<ClientAuthLabels, Counter>,
    pub config_file_successful: Family<FileLabel, Gauge>,
    pub config_file_failures: Family<FileLabel, Counter>,
    pub config_info: Family<ConfigInfoLabels, Gauge>,
    pub config_pending: Family<FileLabel, Gauge>,
    pub config_rollbacks: Family<FileLabel, Counter>,
    pub certificate_info: Family<CertInfoLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("limen");
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            upstream_requests: Family::default(),
            connections_open: Family::default(),
            connections_parked: Gauge::default(),
            tls_handshakes: Family::default(),
            tls_key_exchanges: Family::default(),
            config_file_successful: Family::default(),
            config_file_failures: Family::default(),
            config_info: Family::default(),
            config_pending: Family::default(),
            config_rollbacks: Family::default(),
            certificate_info: Family::default(),
            reloads: Family::default(),
            config_reload_successful: Gauge::default(),
            config_last_success: Gauge::default(),
            certificate_expiry: Family::default(),
            generation: Gauge::default(),
            upstream_up: Family::default(),
            health_checks: Family::default(),
            ejections: Family::default(),
            retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            access_denied: Family::default(),
            rate_limited: Family::default(),
            compressed_responses: Family::default(),
            compression_bytes: Family::default(),
            compression_busy: Counter::default(),
            auth_requests: Family::default(),
            route_all_down: Family::default(),
            proxy_protocol_failures: Family::default(),
            tls_client_auth_failures: Family::default(),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counters and the unit to unit-suffixed names.
        register_traffic(&mut registry, &m);
        register_reloads(&mut registry, &m);
        register_upstreams(&mut registry, &m);
        register_edge(&mut registry, &m);
        register_files(&mut registry, &m);
        // Series that alerts and dashboards expect exist from the start, at zero.
        for kind in ["config", "cert"] {
            for result in ["success", "failure"] {
                let _ = m.reloads.get_or_create(&ReloadLabels { kind, result });
            }
        }
        for result in ["success", "failure", "timeout"] {
            let _ = m.tls_handshakes.get_or_create(&ResultLabel { result });
        }
        for protocol in ["h1", "h2"] {
            let _ = m
                .connections_open
                .get_or_create(&ProtocolLabel { protocol });
        }
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Records one reload attempt.
    pub fn reload(&self, kind: &'static str, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads
            .get_or_create(&ReloadLabels { kind, result })
            .inc();
        if kind == "config" {
            self.config_reload_successful.set(i64::from(ok));
            if ok {
                self.config_last_success.set(unix_now());
            }
        }
    }

    /// The per-file series of one config file after a reload attempt: `sha256` is the content
    /// served (None: nothing from it yet), `ok` the attempt's result, `pending` whether the
    /// file on disk is not what is served.
    pub fn config_file(&self, file: &str, ok: bool, pending: bool) {
        let label = FileLabel { file: file.into() };
        self.config_file_successful
            .get_or_create(&label)
            .set(i64::from(ok));
        self.config_pending
            .get_or_create(&label)
            .set(i64::from(pending));
        if !ok {
            self.config_file_failures.get_or_create(&label).inc();
        } else {
            let _ = self.config_file_failures.get_or_create(&label);
        }
    }

    /// Replaces the `config_info` series with the files served now and their contents' hashes;
    /// the series of a file no longer watched go too.
    pub fn config_files<'a>(&self, files: impl Iterator<Item = (&'a str, &'a str)>) {
        self.config_info.clear();
        for (file, sha256) in files {
            self.config_info
                .get_or_create(&ConfigInfoLabels {
                    file: file.into(),
                    sha256: sha256.into(),
                })
                .set(1);
        }
    }

    /// Drops every per-file series of a file no longer watched.
    pub fn forget_file(&self, file: &str) {
        let label = FileLabel { file: file.into() };
        self.config_file_successful.remove(&label);
        self.config_file_failures.remove(&label);
        self.config_pending.remove(&label);
        self.config_rollbacks.remove(&label);
    }

    /// Drops every per-route and per-upstream series, so that those of removed routes and
    /// upstreams leave the exposition; the reloader calls it when a config reload removed some.
    pub fn forget_routes(&self) {
        self.requests.clear();
        self.request_duration.clear();
        self.upstream_requests.clear();
        self.health_checks.clear();
        self.ejections.clear();
        self.retries.clear();
        self.retry_budget_exhausted.clear();
        self.access_denied.clear();
        self.rate_limited.clear();
        self.auth_requests.clear();
    }

    /// The published snapshot's generation.
    pub fn set_generation(&self, generation: u64) {
        self.generation.set(generation as i64);
    }

    /// Drops the series of certificates no longer served, each `(names, file, notAfter, sha256)`.
    /// Called with only the certificates that went, so a change among 10,000 costs its own size.
    pub fn forget_certs<'a>(
        &self,
        certs: impl Iterator<Item = (&'a [String], &'a std::path::Path, i64, &'a str)>,
    ) {
        for (names, file, not_after, sha256) in certs {
            let file = file.display().to_string();
            let until = rfc3339(not_after);
            for name in names {
                self.certificate_info.remove(&CertInfoLabels {
                    name: name.clone(),
                    sha256: sha256.to_owned(),
                    not_after: until.clone(),
                });
                self.certificate_expiry.remove(&CertLabels {
                    name: name.clone(),
                    file: file.clone(),
                });
            }
        }
    }

    /// Adds the series of certificates now served, each `(names, file, notAfter, sha256)`.
    pub fn add_certs<'a>(
        &self,
        certs: impl Iterator<Item = (&'a [String], &'a std::path::Path, i64, &'a str)>,
    ) {
        for (names, file, not_after, sha256) in certs {
            let file = file.display().to_string();
            let until = rfc3339(not_after);
            for name in names {
                self.certificate_info
                    .get_or_create(&CertInfoLabels {
                        name: name.clone(),
                        sha256: sha256.to_owned(),
                        not_after: until.clone(),
                    })
                    .set(1);
                self.certificate_expiry
                    .get_or_create(&CertLabels {
                        name: name.clone(),
                        file: file.clone(),
                    })
                    .set(not_after);
            }
        }
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Requests, connections and handshakes.
fn register_traffic(registry: &mut Registry, m: &Metrics) {
    registry.register(
        "requests",
        "Requests answered, by route and status code",
        m.requests.clone(),
    );
    registry.register(
        "request_duration_seconds",
        "Time from request head to the end of the response, by route",
        m.request_duration.clone(),
    );
    registry.register(
        "upstream_requests",
        "Requests sent to upstreams, by upstream and result (ok, connect_error, timeout, error)",
        m.upstream_requests.clone(),
    );
    registry.register(
        "connections_open",
        "Client connections open now, by protocol (h1, h2)",
        m.connections_open.clone(),
    );
    registry.register(
        "connections_parked",
        "HTTP/1.1 keep-alive connections idle between requests, held as bare TLS sessions without HTTP buffers",
        m.connections_parked.clone(),
    );
    registry.register(
        "tls_handshakes",
        "TLS handshakes, by result (success, failure, timeout)",
        m.tls_handshakes.clone(),
    );
    registry.register(
        "tls_key_exchanges",
        "Successful TLS handshakes on the listener, by the key exchange group negotiated (X25519MLKEM768, X25519, secp256r1, secp384r1, other; none: a resumption without a new key exchange)",
        m.tls_key_exchanges.clone(),
    );
}

/// Reloads, the served snapshot and certificate expiry.
fn register_reloads(registry: &mut Registry, m: &Metrics) {
    registry.register(
        "reloads",
        "Reload attempts, by kind (config, cert, client_ca, admin_token, ticket_keys, users_file) and result (success, failure)",
        m.reloads.clone(),
    );
    registry.register(
        "config_reload_successful",
        "1 if the last config reload attempt succeeded, else 0",
        m.config_reload_successful.clone(),
    );
    registry.register(
        "config_last_reload_success_timestamp_seconds",
        "Unix time of the last successful config load",
        m.config_last_success.clone(),
    );
    registry.register(
        "certificate_expiry_timestamp_seconds",
        "notAfter of each loaded certificate, per name it serves",
        m.certificate_expiry.clone(),
    );
    registry.register(
        "snapshot_generation",
        "Generation of the configuration snapshot now served",
        m.generation.clone(),
    );
}

/// Upstream health, ejections and retries.
fn register_upstreams(registry: &mut Registry, m: &Metrics) {
    registry.register(
        "upstream_up",
        "1 if the upstream may take requests (not down by its health check, not ejected), else 0",
        m.upstream_up.clone(),
    );
    registry.register(
        "upstream_health_checks",
        "Active health checks, by upstream and result (success, failure)",
        m.health_checks.clone(),
    );
    registry.register(
        "upstream_ejections",
        "Times an upstream was ejected by passive outlier detection",
        m.ejections.clone(),
    );
    registry.register(
        "upstream_retries",
        "Requests tried again on another upstream, by route and reason (a retry.on value)",
        m.retries.clone(),
    );
    registry.register(
        "retry_budget_exhausted",
        "Retries not made because the route's retry budget was used up",
        m.retry_budget_exhausted.clone(),
    );
    registry.register(
        "access_denied",
        "Requests refused 403 by the route's access lists",
        m.access_denied.clone(),
    );
    registry.register(
        "rate_limited",
        "Requests refused 429 by the route's rate_limit",
        m.rate_limited.clone(),
    );
    registry.register(
        "compressed_responses",
        "Responses limen compressed (routes with compress), by coding",
        m.compressed_responses.clone(),
    );
    registry.register(
        "compression_bytes",
        "Bytes into (in) and out of (out) limen's response encoders, by coding",
        m.compression_bytes.clone(),
    );
    registry.register(
        "compression_busy",
        "Responses sent uncompressed because 1024 responses were being compressed already",
        m.compression_busy.clone(),
    );
    registry.register(
        "auth_requests",
        "Requests checked by the route's auth, by result (allowed, denied, unavailable, timeout, invalid_response; basic: allowed, denied, busy)",
        m.auth_requests.clone(),
    );
    registry.register(
        "route_all_upstreams_down",
        "1 while every upstream of the route is down or ejected (requests are spread over all of them: fail open)",
        m.route_all_down.clone(),
    );
}

/// The edge: PROXY headers and client certificates.
fn register_edge(registry: &mut Registry, m: &Metrics) {
    registry.register(
        "proxy_protocol_failures",
        "Connections from a listen.proxy_protocol.from source closed for want of a valid PROXY header, by reason (missing, malformed, timeout)",
        m.proxy_protocol_failures.clone(),
    );
    registry.register(
        "tls_client_auth_failures",
        "Client certificates refused at the handshake, by tls.client_auth host pattern and reason (missing, unknown_ca, expired, invalid)",
        m.tls_client_auth_failures.clone(),
    );
}

/// Each config file and certificate served.
fn register_files(registry: &mut Registry, m: &Metrics) {
    registry.register(
        "config_file_reload_successful",
        "1 if the last reload of this config file (the main file or a routes_dir file) succeeded, else 0",
        m.config_file_successful.clone(),
    );
    registry.register(
        "config_file_reload_failures",
        "Failed reloads of this config file, once per distinct failure",
        m.config_file_failures.clone(),
    );
    registry.register(
        "config_info",
        "1 for each config file served, labelled with the SHA-256 of its applied content: replicas that disagree serve different config",
        m.config_info.clone(),
    );
    registry.register(
        "config_pending",
        "1 while the file on disk differs from what is served (it failed to load, or was rolled back), else 0",
        m.config_pending.clone(),
    );
    registry.register(
        "config_rollbacks",
        "Config changes rolled back by reload.probation, by file",
        m.config_rollbacks.clone(),
    );
    registry.register(
        "certificate_info",
        "1 for each name of each served certificate, labelled with the leaf's SHA-256 and notAfter",
        m.certificate_info.clone(),
    );
}
