//! The typed diff, from config text to the lines a user reads.

use std::time::Duration;

use super::*;

fn config(yaml: &str) -> Config {
    match Config::parse(yaml, Path::new("/etc/limen/proxy.yaml")) {
        Ok(c) => c,
        Err(e) => panic!("{e}\n{yaml}"),
    }
}

const BASE: &str = "listen:\n  https: \"127.0.0.1:8443\"\ntls:\n  cert_dirs: [./certs]\nroutes:\n  - {name: api, host: a.test, path: /api, upstreams: [\"http://127.0.0.1:9\"]}\n  - {host: a.test, respond: {status: 410}}\n";

fn lines(old: &str, new: &str) -> Vec<String> {
    diff(
        &View::from_config(&config(old)),
        &View::from_config(&config(new)),
    )
    .iter()
    .map(ToString::to_string)
    .collect()
}

#[test]
fn identical_configs_have_no_changes() {
    assert!(lines(BASE, BASE).is_empty());
    let v = View::from_config(&config(BASE));
    assert!(diff(&v, &v).is_empty());
    assert!(diff(&View::default(), &View::default()).is_empty());
}

#[test]
fn values_read_as_yaml_not_debug() {
    let v = View::from_config(&config(BASE));
    let s = &v.settings;
    assert_eq!(s["listen.https"], "127.0.0.1:8443");
    assert_eq!(s["timeouts.idle"], "1m");
    assert_eq!(s["timeouts.shutdown_delay"], "0s");
    assert_eq!(s["reload.interval"], "5s");
    assert_eq!(s["tls.cert_dirs"], "[./certs]");
    assert_eq!(s["trusted_proxies"], "[]");
    assert_eq!(s["access_log"], "true");
    assert_eq!(s["tls.min_version"], "1.2");
    assert!(!s.contains_key("listen.http") && !s.contains_key("workers"));
    let api = &v.routes[&("a.test".to_owned(), "/api".to_owned())];
    assert_eq!(api["retry.on"], "[connect_failure]");
    assert_eq!(api["retry.budget"], "20%");
    assert_eq!(api["passive.ejection"], "30s");
    assert_eq!(api["upstreams"], "http://127.0.0.1:9");
    for (k, val) in s.iter().chain(api.iter()) {
        assert!(
            !val.contains("Some(") && !val.contains("Duration") && !val.contains("{ "),
            "{k}: {val}"
        );
        assert!(is_setting_key(k) || is_route_field(k), "{k} is listed");
    }
    assert_eq!(duration(Duration::from_millis(250)), "250ms");
    assert_eq!(duration(Duration::from_millis(1500)), "1500ms");
    assert_eq!(duration(Duration::from_secs(7200)), "2h");
}

/// The main file the per-key cases edit; each adds its key under `listen`, under `tls` or at the
/// top level.
fn with(listen_extra: &str, tls_extra: &str, top: &str) -> String {
    format!(
        "listen:\n  https: \"127.0.0.1:8443\"\n{listen_extra}tls:\n  cert_dirs: [./certs]\n{tls_extra}{top}routes:\n  - {{name: api, host: a.test, path: /api, upstreams: [\"http://127.0.0.1:9\"]}}\n"
    )
}

/// Where a case's YAML goes in [`with`].
enum In {
    Listen(&'static str),
    Tls(&'static str),
    Top(&'static str),
}

impl In {
    fn yaml(&self) -> String {
        match self {
            In::Listen(y) => with(y, "", ""),
            In::Tls(y) => with("", y, ""),
            In::Top(y) => with("", "", y),
        }
    }
}

/// A key set alone on the base: the key, its YAML, and the one line it gives.
const ALONE: &[(&str, In, &str)] = &[
    (
        "listen.http",
        In::Listen("  http: \"127.0.0.1:8080\"\n"),
        "+ listen.http: 127.0.0.1:8080 [new connections only]",
    ),
    (
        "listen.redirect_port",
        In::Listen("  redirect_port: 443\n"),
        "+ listen.redirect_port: 443",
    ),
    (
        "listen.admin",
        In::Listen("  admin: \"127.0.0.1:9901\"\n"),
        "+ listen.admin: 127.0.0.1:9901 [new connections only]",
    ),
    (
        "listen.admin_public",
        In::Listen("  admin_public: true\n"),
        "~ listen.admin_public: false -> true",
    ),
    (
        "listen.admin_token_file",
        In::Listen("  admin_token_file: ./token\n"),
        "+ listen.admin_token_file: ./token",
    ),
    (
        "listen.proxy_protocol.from",
        In::Listen("  proxy_protocol: {from: [10.0.0.0/8, 192.0.2.1]}\n"),
        "+ listen.proxy_protocol.from: [10.0.0.0/8, 192.0.2.1] [new connections only]",
    ),
    (
        "tls.certs",
        In::Tls("  certs: [{cert: ./a.pem, key: /k/a.key}]\n"),
        "~ tls.certs: [] -> [{cert: ./a.pem, key: /k/a.key}] [new connections only]",
    ),
    (
        "tls.default_cert",
        In::Tls("  default_cert: a.test\n"),
        "+ tls.default_cert: a.test [new connections only]",
    ),
    (
        "tls.self_signed",
        In::Tls("  self_signed: true\n"),
        "~ tls.self_signed: false -> true [new connections only]",
    ),
    (
        "tls.min_version",
        In::Tls("  min_version: \"1.3\"\n"),
        "~ tls.min_version: 1.2 -> 1.3 [new connections only]",
    ),
    (
        "tls.ticket_keys",
        In::Tls("  ticket_keys: ./tickets\n"),
        "+ tls.ticket_keys: ./tickets [new connections only]",
    ),
    (
        "tls.post_quantum",
        In::Tls("  post_quantum: false\n"),
        "~ tls.post_quantum: true -> false [new connections only]",
    ),
    (
        "reload.interval",
        In::Top("reload:\n  interval: 250ms\n"),
        "~ reload.interval: 5s -> 250ms",
    ),
    (
        "reload.verify_every",
        In::Top("reload:\n  verify_every: 2m\n"),
        "~ reload.verify_every: 1m -> 2m",
    ),
    (
        "timeouts.idle",
        In::Top("timeouts:\n  idle: 30s\n"),
        "~ timeouts.idle: 1m -> 30s [new connections only]",
    ),
    (
        "timeouts.upstream_response",
        In::Top("timeouts:\n  upstream_response: 90s\n"),
        "~ timeouts.upstream_response: 1m -> 90s",
    ),
    (
        "timeouts.shutdown_grace",
        In::Top("timeouts:\n  shutdown_grace: 1h\n"),
        "~ timeouts.shutdown_grace: 30s -> 1h",
    ),
    (
        "limits.max_connections",
        In::Top("limits:\n  max_connections: 20\n"),
        "~ limits.max_connections: 10000 -> 20 [new connections only]",
    ),
    (
        "limits.max_body_bytes",
        In::Top("limits:\n  max_body_bytes: 1024\n"),
        "~ limits.max_body_bytes: 0 -> 1024",
    ),
    (
        "trusted_proxies",
        In::Top("trusted_proxies: [10.0.0.1, \"fd00::/8\"]\n"),
        "~ trusted_proxies: [] -> [10.0.0.1, fd00::/8]",
    ),
    (
        "workers",
        In::Top("workers: 2\n"),
        "! workers needs a restart",
    ),
    (
        "access_log",
        In::Top("access_log: false\n"),
        "~ access_log: true -> false",
    ),
    (
        "request_id.header",
        In::Top("request_id: {header: x-correlation-id}\n"),
        "~ request_id.header: x-request-id -> x-correlation-id",
    ),
    (
        "request_id.trust",
        In::Top("request_id: {trust: none}\n"),
        "~ request_id.trust: trusted_proxies -> none",
    ),
    (
        "allow_underscores_in_headers",
        In::Top("allow_underscores_in_headers: true\n"),
        "~ allow_underscores_in_headers: false -> true",
    ),
    (
        "path_normalization.escaped_slashes",
        In::Top("path_normalization: {escaped_slashes: reject}\n"),
        "~ path_normalization.escaped_slashes: keep -> reject",
    ),
    (
        "routes_dir",
        In::Top("routes_dir: ./routes.d\n"),
        "+ routes_dir: ./routes.d",
    ),
];

/// The other timeouts, each set to 7s: the same kind of line as `timeouts.idle`.
const TIMEOUTS: &[&str] = &[
    "handshake",
    "header_read",
    "upstream_connect",
    "body_idle",
    "write_idle",
    "shutdown_delay",
    "upstream_ping_interval",
    "upstream_ping_timeout",
    "upstream_idle",
    "upstream_write",
    "quic_idle",
];

/// The other limits, with a value each: the same kind of line as `limits.max_connections`.
const LIMITS: &[(&str, &str)] = &[
    ("max_header_bytes", "2048"),
    ("min_body_rate", "1"),
    ("h2_max_concurrent_streams", "7"),
    ("quic_max_streams", "7"),
    ("upstream_h2_streams", "1000"),
    ("upstream_h2_connections", "2"),
];

/// `reload.probation`'s keys, each changed from `{window: 30s}`.
const PROBATION: &[(&str, &str)] = &[
    ("window", "{window: 1m}"),
    ("min_requests", "{window: 30s, min_requests: 5}"),
    ("max_error_ratio", "{window: 30s, max_error_ratio: 0.25}"),
];

/// Keys changed in place, or that need another key beside them: see
/// `keys_edited_in_place_or_beside_another_give_one_line`.
const IN_PLACE: &[&str] = &[
    "listen.quic",
    "listen.alt_svc",
    "listen.alt_svc_port",
    "listen.https",
    "tls.cert_dirs",
    "listen.http_proxy_protocol",
];

/// Every key, changed one at a time, gives exactly one line, and that line names it.
#[test]
fn each_key_set_alone_gives_its_one_line() {
    let base = with("", "", "");
    for (key, at, want) in ALONE {
        assert_eq!(lines(&base, &at.yaml()), [*want], "{key}");
    }
}

#[test]
fn each_other_timeout_limit_and_probation_key_gives_one_line_naming_it() {
    let base = with("", "", "");
    for t in TIMEOUTS {
        let out = lines(&base, &with("", "", &format!("timeouts:\n  {t}: 7s\n")));
        assert_eq!(out.len(), 1, "{t}: {out:?}");
        assert!(out[0].starts_with(&format!("~ timeouts.{t}: ")), "{out:?}");
    }
    for (l, v) in LIMITS {
        let out = lines(&base, &with("", "", &format!("limits:\n  {l}: {v}\n")));
        assert_eq!(out.len(), 1, "{l}: {out:?}");
        assert!(out[0].starts_with(&format!("~ limits.{l}: ")), "{out:?}");
    }
    let prob = with("", "", "reload:\n  probation: {window: 30s}\n");
    for (k, v) in PROBATION {
        let out = lines(
            &prob,
            &with("", "", &format!("reload:\n  probation: {v}\n")),
        );
        assert_eq!(out.len(), 1, "{k}: {out:?}");
        assert!(
            out[0].starts_with(&format!("~ reload.probation.{k}: ")),
            "{out:?}"
        );
    }
}

#[test]
fn keys_edited_in_place_or_beside_another_give_one_line() {
    let base = with("", "", "");
    assert_eq!(
        lines(&base, &base.replace("8443", "9443")),
        ["~ listen.https: 127.0.0.1:8443 -> 127.0.0.1:9443 [new connections only]"]
    );
    assert_eq!(
        lines(&base, &base.replace("[./certs]", "[./certs, /srv/certs]")),
        ["~ tls.cert_dirs: [./certs] -> [./certs, /srv/certs] [new connections only]"]
    );
    let pp = with("  proxy_protocol: {from: [10.0.0.0/8]}\n", "", "");
    let both = with(
        "  proxy_protocol: {from: [10.0.0.0/8]}\n  http: \"127.0.0.1:80\"\n",
        "",
        "",
    );
    let hpp = with(
        "  proxy_protocol: {from: [10.0.0.0/8]}\n  http: \"127.0.0.1:80\"\n  http_proxy_protocol: true\n",
        "",
        "",
    );
    assert_eq!(
        lines(&both, &hpp),
        ["~ listen.http_proxy_protocol: false -> true [new connections only]"]
    );
    assert_eq!(lines(&pp, &both).len(), 1);
    // Adding `quic` starts advertising it (alt_svc defaults to true with it); turning that off
    // is one line.
    let quic = with("  quic: \"127.0.0.1:8443\"\n", "", "");
    assert_eq!(
        lines(&base, &quic),
        [
            "+ listen.quic: 127.0.0.1:8443 [new connections only]",
            "~ listen.alt_svc: false -> true"
        ]
    );
    let quiet = with("  quic: \"127.0.0.1:8443\"\n  alt_svc: false\n", "", "");
    assert_eq!(lines(&quic, &quiet), ["~ listen.alt_svc: true -> false"]);
    let mapped = with("  quic: \"127.0.0.1:8443\"\n  alt_svc_port: 443\n", "", "");
    assert_eq!(lines(&quic, &mapped), ["+ listen.alt_svc_port: 443"]);
}

/// The cases above cover every key a view can hold.
#[test]
fn every_setting_key_has_a_case() {
    let mut seen: BTreeSet<String> = ALONE.iter().map(|(k, _, _)| k.to_string()).collect();
    seen.extend(TIMEOUTS.iter().map(|t| format!("timeouts.{t}")));
    seen.extend(LIMITS.iter().map(|(l, _)| format!("limits.{l}")));
    seen.extend(
        PROBATION
            .iter()
            .map(|(k, _)| format!("reload.probation.{k}")),
    );
    seen.extend(IN_PLACE.iter().map(|k| k.to_string()));
    for k in SETTING_KEYS {
        assert!(seen.contains(*k), "{k} is not covered");
    }
}

/// `tls.client_auth`: each field of a policy, keyed by its hosts.
#[test]
fn each_client_auth_field_changed_alone_gives_one_line_keyed_by_hosts() {
    let ca = |extra: &str| {
        with(
            "",
            &format!("  client_auth:\n    - {{hosts: [b.test, a.test], ca: ./ca.pem{extra}}}\n"),
            "",
        )
    };
    assert_eq!(
        lines(&ca(""), &ca(", mode: optional")),
        ["~ tls.client_auth[a.test, b.test].mode: require -> optional [new connections only]"]
    );
    assert_eq!(
        lines(&ca(""), &ca(", forward: true")),
        ["~ tls.client_auth[a.test, b.test].forward: false -> true [new connections only]"]
    );
    assert_eq!(
        lines(&ca(""), &ca("").replace("./ca.pem", "/srv/ca.pem")),
        ["~ tls.client_auth[a.test, b.test].ca: ./ca.pem -> /srv/ca.pem [new connections only]"]
    );
    assert_eq!(
        lines(&with("", "", ""), &ca("")).len(),
        3,
        "a new policy: its three keys"
    );
    for k in View::from_config(&config(&ca(""))).settings.keys() {
        assert!(is_setting_key(k), "{k}");
    }
}

#[test]
fn each_route_field_changed_alone_gives_one_line_without_debug_syntax() {
    let route = |opts: &str| {
        format!("listen:\n  https: \"127.0.0.1:8443\"\ntls:\n  self_signed: true\nroutes:\n  - {{host: a.test, path: /api, upstreams: [\"http://127.0.0.1:9\"]{opts}}}\n")
    };
    let base = route("");
    let cases = [
        (", name: api", "~ route a.test /api: name (none -> api)"),
        (", strip_prefix: true", "~ route a.test /api: strip_prefix (false -> true)"),
        (", timeout: 5s", "~ route a.test /api: timeout (none -> 5s)"),
        (", balance: least_request", "~ route a.test /api: balance (round_robin -> least_request)"),
        (", retry: {attempts: 2}", "~ route a.test /api: retry.attempts (1 -> 2)"),
        (", retry: {on: [connect_failure, 503]}", "~ route a.test /api: retry.on ([connect_failure] -> [connect_failure, 503])"),
        (", retry: {budget: 2.5%}", "~ route a.test /api: retry.budget (20% -> 2.5%)"),
        (", passive: {consecutive_failures: 0}", "~ route a.test /api: passive.consecutive_failures (5 -> 0)"),
        (", passive: {ejection: 1m}", "~ route a.test /api: passive.ejection (30s -> 1m)"),
        (", health: {path: /healthz}", "~ route a.test /api: health (none -> kind: http, path: /healthz, host: a.test, expect_status: 200-399, interval: 5s, timeout: 2s, healthy_after: 2, unhealthy_after: 3)"),
        (", headers: {request: {set: {x-env: prod}}}", "~ route a.test /api: headers.request.set (none -> [x-env: prod])"),
        (", headers: {request: {remove: [x-debug]}}", "~ route a.test /api: headers.request.remove (none -> [x-debug])"),
        (", headers: {response: {set: {x-frame-options: DENY}}}", "~ route a.test /api: headers.response.set (none -> [x-frame-options: DENY])"),
        (", headers: {response: {remove: [server]}}", "~ route a.test /api: headers.response.remove (none -> [server])"),
        (", access: {allow: [10.0.0.0/8], deny: [\"10.9.0.0/16\"]}", "~ route a.test /api: access (none -> allow: [10.0.0.0/8], deny: [10.9.0.0/16])"),
        (", rate_limit: {rate: 100/s}", "~ route a.test /api: rate_limit (none -> rate: 100/s, burst: 100, key: client, max_keys: 100000)"),
        (", rewrite: {path_prefix: /api/v1, host: internal.app.svc}", "~ route a.test /api: rewrite (none -> path_prefix: /api/v1, host: internal.app.svc)"),
        (", compress: {}", "~ route a.test /api: compress (none -> algorithms: [br, gzip], min_bytes: 1024)"),
        (", compress: {algorithms: [zstd], types: [text/csv]}", "~ route a.test /api: compress (none -> algorithms: [zstd], min_bytes: 1024, types: [text/csv])"),
        (", auth: {basic: {users_file: ./users, realm: admin}}", "~ route a.test /api: auth (none -> basic: users_file: ./users, realm: admin)"),
        (", auth: {forward: {url: \"http://authz:9000/check\", response_headers: [x-user]}}", "~ route a.test /api: auth (none -> forward: url: http://authz:9000/check, request_headers: [authorization, cookie], response_headers: [x-user], timeout: 2s)"),
    ];
    let mut seen = BTreeSet::new();
    for (opts, want) in cases {
        let out = lines(&base, &route(opts));
        assert_eq!(out, [want], "{opts}");
        assert!(!want.contains('{') && !want.contains("Some("), "{want}");
        seen.insert(
            want.split(": ")
                .nth(1)
                .and_then(|f| f.split(' ').next())
                .map(str::to_owned),
        );
    }
    let weighted = base.replace(
        "[\"http://127.0.0.1:9\"]",
        "[\"http://127.0.0.1:9\", {url: \"http://127.0.0.1:10\", weight: 3}]",
    );
    assert_eq!(
        lines(&base, &weighted),
        ["~ route a.test /api: upstreams (http://127.0.0.1:9 -> http://127.0.0.1:9, http://127.0.0.1:10 (weight 3))"]
    );
    let https = |opts: &str| route(opts).replace("http://127.0.0.1:9", "https://127.0.0.1:9");
    assert_eq!(
        lines(&https(""), &https(", upstream_tls: {server_name: up.test}")),
        ["~ route a.test /api: upstream_tls (none -> server_name: up.test)"]
    );
    assert_eq!(
        lines(&https(""), &https(", upstream_protocol: h2")),
        ["~ route a.test /api: upstream_protocol (none -> h2)"]
    );
    let respond = |r: &str| {
        format!("listen:\n  https: \"127.0.0.1:8443\"\ntls:\n  self_signed: true\nroutes:\n  - {{host: a.test, respond: {r}}}\n")
    };
    assert_eq!(
        lines(
            &respond("{status: 410}"),
            &respond("{status: 410, body: \"gone\\n\"}")
        ),
        ["~ route a.test /: respond (410 -> 410 \"gone\\n\")"]
    );
    let redirect = |r: &str| {
        format!("listen:\n  https: \"127.0.0.1:8443\"\ntls:\n  self_signed: true\nroutes:\n  - {{host: a.test, redirect: {r}}}\n")
    };
    assert_eq!(
        lines(
            &redirect("{to: \"https://b.test{path}\"}"),
            &redirect("{to: \"https://b.test{path}\", status: 301}")
        ),
        ["~ route a.test /: redirect (308 \"https://b.test{path}\" -> 301 \"https://b.test{path}\")"]
    );
}

#[test]
fn routes_added_and_removed_read_as_before() {
    let more = format!("{BASE}  - {{host: b.test, path: /new, upstreams: [\"http://127.0.0.1:9\", \"http://127.0.0.1:11\"]}}\n  - {{host: b.test, path: /gone, respond: {{status: 410}}}}\n");
    assert_eq!(
        lines(BASE, &more),
        [
            "+ route b.test /gone -> respond 410",
            "+ route b.test /new -> http://127.0.0.1:9, http://127.0.0.1:11",
        ]
    );
    assert_eq!(
        lines(&more, BASE),
        ["- route b.test /gone", "- route b.test /new"]
    );
    let changes = diff(
        &View::from_config(&config(BASE)),
        &View::from_config(&config(
            &more.replace("/api, upstreams", "/api, timeout: 9s, upstreams"),
        )),
    );
    assert_eq!(summary(&changes), "routes +2 -0 ~1");
    assert_eq!(
        routes_touched(&changes),
        [
            ("a.test".to_owned(), "/api".to_owned()),
            ("b.test".to_owned(), "/gone".to_owned()),
            ("b.test".to_owned(), "/new".to_owned()),
        ]
    );
}

#[test]
fn summary_starts_with_route_counts_then_names_other_keys_bounded() {
    let old = View::from_config(&config(BASE));
    let mut new = old.clone();
    new.settings.insert("timeouts.idle".into(), "30s".into());
    new.settings.insert("workers".into(), "4".into());
    new.add_cert(&["a.test"], Some("2030-01-01T00:00:00Z".into()), None);
    new.routes.remove(&("a.test".to_owned(), "/".to_owned()));
    let changes = diff(&old, &new);
    assert_eq!(
        summary(&changes),
        "routes +0 -1 ~0; workers, certs, timeouts.idle"
    );
    assert_eq!(summary(&[]), "routes +0 -0 ~0");
    let many: Vec<Change> = (0..100)
        .map(|i| Change::SettingChanged {
            key: format!("some.rather.long.key.number.{i}"),
            old: "a".into(),
            new: "b".into(),
        })
        .collect();
    let s = summary(&many);
    assert!(s.starts_with("routes +0 -0 ~0; some.rather"), "{s}");
    assert!(s.len() < 260 && s.ends_with("more)"), "{s}");
}

#[test]
fn secret_changes_never_show_content_and_yield_to_a_path_change() {
    let secret = "do-not-print-this-token";
    let mut old = View::from_config(&config(BASE));
    old.settings
        .insert("tls.ticket_keys".into(), "./tickets".into());
    let mut new = old.clone();
    old.secrets
        .insert("tls.ticket_keys".into(), fingerprint(b"key one"));
    new.secrets
        .insert("tls.ticket_keys".into(), fingerprint(secret.as_bytes()));
    let out: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
    assert_eq!(out, ["~ tls.ticket_keys: (changed) [new connections only]"]);
    assert!(!out.concat().contains(secret));
    assert!(!out.concat().contains(&fingerprint(secret.as_bytes())));
    assert_eq!(fingerprint(b"x").len(), 16);
    // Another file: the path line says so; no second line for the content.
    new.settings
        .insert("tls.ticket_keys".into(), "./tickets-2".into());
    let out: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
    assert_eq!(
        out,
        ["~ tls.ticket_keys: ./tickets -> ./tickets-2 [new connections only]"]
    );
    // Known on one side only: not compared.
    new.secrets.clear();
    new.settings
        .insert("tls.ticket_keys".into(), "./tickets".into());
    assert!(diff(&old, &new).is_empty());
    // The admin token applies to the next admin request, not only to new connections.
    let c = Change::SecretChanged {
        key: "listen.admin_token_file".into(),
    };
    assert_eq!(c.to_string(), "~ listen.admin_token_file: (changed)");
}

#[test]
fn certs_by_names_replaced_by_fingerprint() {
    let mut old = View::default();
    old.add_cert(
        &["b.test", "a.test"],
        Some("2030".into()),
        Some("aa".into()),
    );
    old.add_cert(&["old.test"], Some("2029".into()), Some("bb".into()));
    let mut new = View::default();
    new.add_cert(
        &["a.test", "b.test"],
        Some("2030".into()),
        Some("AA".into()),
    );
    new.add_cert(&["new.test"], Some("2031".into()), Some("cc".into()));
    let out: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
    assert_eq!(out, ["+ cert new.test (not after 2031)", "- cert old.test"]);
    let mut renewed = View::default();
    renewed.add_cert(
        &["a.test", "b.test"],
        Some("2030".into()),
        Some("dd".into()),
    );
    renewed.add_cert(&["old.test"], Some("2029".into()), Some("bb".into()));
    let changes = diff(&old, &renewed);
    assert_eq!(
        changes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["~ cert a.test,b.test (not after 2030 -> 2030)"]
    );
    assert!(changes[0].new_connections_only());
}

#[test]
fn paths_outside_the_config_folder_stay_absolute_and_odd_text_is_quoted() {
    let c = config(&BASE.replace("[./certs]", "[/srv/certs, ./a b, \"./x\\ty\"]"));
    let v = View::from_config(&c);
    assert_eq!(
        v.settings["tls.cert_dirs"],
        "[/srv/certs, \"./a b\", \"./x\\ty\"]"
    );
    assert!(!v.settings.values().any(|s| s.chars().any(char::is_control)));
}
