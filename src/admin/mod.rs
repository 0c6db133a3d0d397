//! The admin listener: plain HTTP, loopback unless `listen.admin_public`, never the TLS port.
//!
//! Owns: `/healthz` (alive), `/readyz` (serving and not draining), `/metrics` (Prometheus text),
//! `/status.json` (the snapshot and reload facts as data) and `/` (the same as a small HTML page, no
//! scripts, no external assets). Reads the published snapshot and the reload status; must not
//! change either, and must not touch the TLS listener or the request path.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

mod diff;
pub use diff::{lines as diff_lines, running_view};

use crate::config::RouteAction;
use crate::routing::Action;
use crate::state::{KindStatus, Shared, Snapshot};

/// Certificates closer than this to expiry are highlighted.
const EXPIRY_WARNING_DAYS: i64 = 14;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339_secs(secs)
}

fn rfc3339_secs(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn kind_json(k: &KindStatus, started: SystemTime) -> Value {
    json!({
        "ok": k.errors.is_empty() && (k.last_attempt.is_none() || k.last_ok),
        "at": rfc3339(k.last_attempt.unwrap_or(started)),
        "error": if k.errors.is_empty() { Value::Null } else { Value::String(k.errors.join("\n")) },
        "last_success": k.last_success.map(rfc3339),
        "successes": k.successes,
        "failures": k.failures,
    })
}

/// What a snapshot serves, as `/status.json` shows it: `routes` (each with its typed `fields`),
/// `certs`, `workers` and `settings` (the typed diff's settings, `config::diff::View`), which
/// `--check --diff` reads back into a view to compare with a candidate.
pub fn view(snap: &Snapshot) -> Value {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let table = snap.routes.routes();
    let base = snap
        .config
        .source
        .parent()
        .unwrap_or(std::path::Path::new(""));
    let routes: Vec<Value> = snap
        .config
        .routes
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            // The table is built from the specs in order; its entry holds the live parts.
            let built = table.get(i).filter(|r| r.host == spec.host);
            let (upstreams, weights, respond) = match &spec.action {
                RouteAction::Proxy(urls) => (
                    urls.iter().map(|u| u.url.to_string()).collect::<Vec<_>>(),
                    urls.iter().map(|u| u.weight).collect::<Vec<_>>(),
                    Value::Null,
                ),
                RouteAction::Respond { status, .. } => {
                    (Vec::new(), Vec::new(), json!(status.as_u16()))
                }
                RouteAction::Redirect(r) => (
                    Vec::new(),
                    Vec::new(),
                    json!(format!("{} {}", r.status.as_u16(), r.to)),
                ),
            };
            let health: Vec<Value> = match built.map(|r| &r.action) {
                Some(Action::Proxy(g)) => g.members().iter().map(upstream_health).collect(),
                _ => Vec::new(),
            };
            let https = spec.upstream_tls != crate::config::UpstreamTls::default();
            let fields = crate::config::diff::route_fields(spec, base);
            // Which guards are on, in the order a request meets them.
            let protections: Vec<&str> = [
                spec.access.as_ref().map(|_| "access"),
                spec.rate_limit.as_ref().map(|_| "rate_limit"),
                match &spec.auth {
                    Some(crate::config::Auth::Basic(_)) => Some("auth.basic"),
                    Some(crate::config::Auth::Forward(_)) => Some("auth.forward"),
                    None => None,
                },
            ]
            .into_iter()
            .flatten()
            .collect();
            // What the route does to a request besides forwarding it.
            let mut actions: Vec<String> = Vec::new();
            if let RouteAction::Redirect(r) = &spec.action {
                actions.push(format!("redirect {}", r.status.as_u16()));
            }
            if let Some(rw) = &spec.rewrite {
                match &rw.path {
                    Some(crate::config::PathRewrite::Prefix(_)) => {
                        actions.push("rewrite.path_prefix".into())
                    }
                    Some(crate::config::PathRewrite::Regex { .. }) => {
                        actions.push("rewrite.path_regex".into())
                    }
                    None => {}
                }
                if rw.host.is_some() {
                    actions.push("rewrite.host".into());
                }
            }
            if spec.strip_prefix {
                actions.push("strip_prefix".into());
            }
            if let Some(c) = &spec.compress {
                let algorithms: Vec<&str> = c.algorithms.iter().map(|a| a.token()).collect();
                actions.push(format!("compress {}", algorithms.join(",")));
            }
            let rate_limit_keys = built
                .and_then(|r| r.rate_limit.as_ref())
                .map(|(_, l)| l.keys());
            json!({
                "protections": protections,
                "actions": actions,
                "rate_limit_keys": rate_limit_keys,
                "name": built.map_or_else(|| spec.index.to_string(), |r| r.label.to_string()),
                "host": spec.host.to_string(), "path": spec.path,
                "match": (!spec.matcher.is_empty()).then(|| spec.matcher.to_string()),
                "upstreams": upstreams, "weights": weights, "upstream_health": health,
                "respond": respond, "strip_prefix": spec.strip_prefix,
                "timeout_ms": built.map_or(0, |r| r.timeout.as_millis() as u64),
                "balance": format!("{:?}", spec.balance).to_lowercase(),
                "health": spec.health.as_ref().map(|h| format!("{h:?}")),
                "passive": format!("{:?}", spec.passive),
                "retry": format!("{:?}", spec.retry),
                "headers": format!("{:?}", spec.headers),
                "upstream_tls": https.then(|| format!("{:?}", spec.upstream_tls)),
                "fields": fields,
                "file": spec.unit.as_deref().map_or_else(
                    || snap.config.source.display().to_string(),
                    |u| snap.config.routes_dir.as_deref().unwrap_or(std::path::Path::new(""))
                        .join(u).display().to_string()),
            })
        })
        .collect();
    let certs: Vec<Value> = snap
        .certs
        .certs()
        .iter()
        .map(|c| {
            json!({
                "names": c.names,
                "file": c.cert_file.display().to_string(),
                "not_after": rfc3339_secs(c.not_after),
                "days_left": (c.not_after - now).div_euclid(86_400),
                "sha256": c.sha256,
                "serial": c.serial,
            })
        })
        .collect();
    let settings = crate::config::diff::View::from_config(&snap.config).settings;
    json!({
        "routes": routes, "certs": certs, "workers": snap.config.workers, "settings": settings,
    })
}

/// The current snapshot and reload facts, as `/status.json` serves them.
pub fn status(shared: &Shared) -> Value {
    let snap = shared.snapshot.load();
    let reload = crate::state::lock(&shared.reload_status).clone();
    let mut v = view(&snap);
    // Fingerprints only: the diff says a secret changed, never what it is.
    v["secrets"] = json!(reload.secrets);
    let files: Vec<Value> = reload
        .files
        .iter()
        .map(|f| {
            json!({
                "file": f.file.display().to_string(), "sha256": f.sha256, "ok": f.error.is_none(),
                "error": f.error, "pending": f.pending, "routes": f.routes,
            })
        })
        .collect();
    let history: Vec<Value> = reload
        .history
        .iter()
        .map(|e| {
            json!({
                "generation": e.generation, "at": rfc3339(e.at), "kind": e.kind,
                "file": e.file, "result": e.result, "summary": e.summary,
            })
        })
        .collect();
    let mut config = kind_json(&reload.config, shared.started);
    config["rolled_back"] = reload.rolled_back.as_ref().map_or(
        Value::Null,
        |r| json!({ "generation": r.generation, "at": rfc3339(r.at), "reason": r.reason }),
    );
    let listeners = *crate::state::lock(&shared.listeners);
    let shown = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string());
    let extra = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": snap.generation,
        "ready": shared.ready.load(Ordering::Relaxed),
        "uptime_seconds": shared.started.elapsed().unwrap_or(Duration::ZERO).as_secs(),
        "config_file": snap.config.source.display().to_string(),
        "config_files": files,
        "listeners": {
            "https": shown(listeners.https), "http": shown(listeners.http),
            "admin": shown(listeners.admin), "quic": shown(listeners.quic),
        },
        "reload": {
            "config": config,
            "certs": kind_json(&reload.certs, shared.started),
            "polls": reload.polls,
            "history": history,
        },
    });
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

/// One upstream of a route as `upstream_health` lists it.
fn upstream_health(m: &crate::upstream::Member) -> Value {
    let up = &m.upstream;
    let state = up.health.state();
    let last = up
        .health
        .last_check()
        .map(|c| json!({ "at": rfc3339(c.at), "ok": c.ok, "reason": c.reason }));
    json!({
        "url": up.url.to_string(),
        "healthy": state == crate::upstream::State::Up,
        "state": state.as_str(),
        "weight": m.weight,
        "in_flight": up.in_flight(),
        "dials": up.dials(),
        "last_check": last,
        "ejected_until": up.health.ejected_until().map(rfc3339),
    })
}

/// The gauges that are a function of the snapshot's upstreams, set just before a scrape:
/// `limen_upstream_up` (0 when any pool of that label is down or ejected) and
/// `limen_route_all_upstreams_down`.
fn refresh_health_gauges(shared: &Shared) {
    let snap = shared.snapshot.load();
    let m = &shared.metrics;
    let mut up: std::collections::HashMap<std::sync::Arc<str>, bool> = Default::default();
    m.route_all_down.clear();
    for r in snap.routes.routes() {
        let Action::Proxy(g) = &r.action else {
            continue;
        };
        for member in g.members() {
            let u = &member.upstream;
            *up.entry(u.authority.clone()).or_insert(true) &= u.health.available();
        }
        m.route_all_down
            .get_or_create(&crate::metrics::RouteLabel {
                route: r.label.clone(),
            })
            .set(i64::from(g.all_down()));
    }
    m.upstream_up.clear();
    for (upstream, ok) in up {
        m.upstream_up
            .get_or_create(&crate::metrics::UpstreamLabel { upstream })
            .set(i64::from(ok));
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The status page: the same facts as `/status.json`, rendered on the server.
pub fn status_page(shared: &Shared) -> String {
    let st = status(shared);
    let s = |v: &Value| esc(v.as_str().unwrap_or(""));
    let mut h = String::with_capacity(8192);
    h.push_str(concat!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width\"><title>limen status</title><style>",
        "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}",
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}",
        "th{background:#f3f3f3}.bad{color:#a00;font-weight:bold}.ok{color:#070}",
        ".health.up{color:#070}.health.down{color:#a00;font-weight:bold}.health.ejected{color:#a60;font-weight:bold}",
        "tr.expiring td{background:#fde2e2}pre{background:#fff4f4;border:1px solid #e99;padding:.6em;white-space:pre-wrap}",
        "</style></head><body>"
    ));
    let _ = write!(
        h,
        "<h1>limen {}</h1><p>generation <b id=\"generation\">{}</b> &middot; up {} s &middot; {} &middot; config <code>{}</code></p>",
        s(&st["version"]),
        st["generation"],
        st["uptime_seconds"],
        if st["ready"].as_bool() == Some(true) { "<span class=\"ok\">ready</span>" } else { "<span class=\"bad\">not ready</span>" },
        s(&st["config_file"]),
    );

    reload_section(&mut h, &st);
    history_and_files(&mut h, &st);
    certs_section(&mut h, &st);
    routes_section(&mut h, &st);
    h
}

/// The last reload of each kind, its error, and a rollback if there was one.
fn reload_section(h: &mut String, st: &Value) {
    let s = |v: &Value| esc(v.as_str().unwrap_or(""));
    h.push_str("<h2>Last reload</h2><table id=\"reload\"><tr><th>kind</th><th>result</th><th>at</th><th>successes</th><th>failures</th></tr>");
    let mut errors = String::new();
    for kind in ["config", "certs"] {
        let k = &st["reload"][kind];
        let ok = k["ok"].as_bool() == Some(true);
        let _ = write!(
            h,
            "<tr><td>{kind}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if ok { "ok" } else { "bad" },
            if ok { "ok" } else { "failed" },
            s(&k["at"]),
            k["successes"],
            k["failures"],
        );
        if let Some(e) = k["error"].as_str() {
            let _ = write!(
                errors,
                "<h3>{kind} error</h3><pre class=\"reload-error\">{}</pre>",
                esc(e)
            );
        }
    }
    h.push_str("</table>");
    h.push_str(&errors);
    if let Some(reason) = st["reload"]["config"]["rolled_back"]["reason"].as_str() {
        let _ = write!(
            h,
            "<p id=\"rolled-back\" class=\"bad\">{} ({})</p>",
            esc(reason),
            s(&st["reload"]["config"]["rolled_back"]["at"])
        );
    }
}

/// The certificates served, those expiring soon marked.
fn certs_section(h: &mut String, st: &Value) {
    let s = |v: &Value| esc(v.as_str().unwrap_or(""));
    h.push_str("<h2>Certificates</h2><table id=\"certs\"><tr><th>names</th><th>expires</th><th>days left</th><th>file</th></tr>");
    for c in st["certs"].as_array().into_iter().flatten() {
        let days = c["days_left"].as_i64().unwrap_or(0);
        let names: Vec<String> = c["names"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| esc(n.as_str().unwrap_or("")))
            .collect();
        let _ = write!(
            h,
            "<tr class=\"cert{}\"><td class=\"names\">{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            if days < EXPIRY_WARNING_DAYS { " expiring" } else { "" },
            names.join("<br>"),
            s(&c["not_after"]),
            days,
            s(&c["file"]),
        );
    }
    h.push_str("</table>");
}

/// The routes, each upstream with its health.
fn routes_section(h: &mut String, st: &Value) {
    let s = |v: &Value| esc(v.as_str().unwrap_or(""));
    h.push_str("<h2>Routes</h2><table id=\"routes\"><tr><th>name</th><th>host</th><th>path</th><th>upstreams</th><th>health</th><th>protections</th><th>actions</th></tr>");
    for r in st["routes"].as_array().into_iter().flatten() {
        let ups: Vec<String> = r["upstreams"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|u| esc(u.as_str().unwrap_or("")))
            .collect();
        let target = if ups.is_empty() {
            format!("respond {}", r["respond"])
        } else {
            ups.join("<br>")
        };
        // One line per upstream, in the same order: a mark and a word, so colour is not needed.
        let health: Vec<String> = r["upstream_health"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|u| {
                let state = u["state"].as_str().unwrap_or("up");
                let mark = match state {
                    "down" => "&#10006;",
                    "ejected" => "&#9208;",
                    _ => "&#10004;",
                };
                let reason = u["last_check"]["reason"]
                    .as_str()
                    .map(|r| format!(" ({})", esc(r)))
                    .unwrap_or_default();
                format!(
                    "<span class=\"health {state}\">{mark} {state}</span>{reason} &middot; weight {}",
                    u["weight"]
                )
            })
            .collect();
        let protections: Vec<String> = r["protections"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| esc(p.as_str().unwrap_or("")))
            .collect();
        let actions: Vec<String> = r["actions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| esc(a.as_str().unwrap_or("")))
            .collect();
        let or_none = |v: Vec<String>| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{target}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            s(&r["name"]),
            s(&r["host"]),
            match r["match"].as_str() {
                Some(m) => format!("{}<br><small>{}</small>", s(&r["path"]), esc(m)),
                None => s(&r["path"]),
            },
            health.join("<br>"),
            or_none(protections),
            or_none(actions),
        );
    }
    h.push_str("</table><p><a href=\"/metrics\">metrics</a> &middot; <a href=\"/status.json\">status.json</a></p></body></html>\n");
}

/// The config files with their state, and the reload history as a timeline, newest first.
fn history_and_files(h: &mut String, st: &Value) {
    let s = |v: &Value| esc(v.as_str().unwrap_or(""));
    h.push_str("<h2>Config files</h2><table id=\"files\"><tr><th>file</th><th>state</th><th>routes</th><th>sha256</th></tr>");
    for f in st["config_files"].as_array().into_iter().flatten() {
        let (class, state) = match (f["ok"].as_bool(), f["pending"].as_bool()) {
            (Some(true), Some(false)) => ("ok", "applied"),
            (Some(true), _) => ("bad", "pending (rolled back)"),
            _ => ("bad", "pending (failed)"),
        };
        let sha = f["sha256"]
            .as_str()
            .map_or("-", |x| x.get(..12).unwrap_or(x));
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td class=\"{class}\">{state}</td><td>{}</td><td><code>{}</code></td></tr>",
            s(&f["file"]),
            f["routes"],
            esc(sha),
        );
    }
    h.push_str("</table><h2>Reload history</h2><ol id=\"history\" reversed>");
    for e in st["reload"]["history"].as_array().into_iter().flatten() {
        let result = e["result"].as_str().unwrap_or("");
        let class = if result == "applied" { "ok" } else { "bad" };
        let _ = write!(
            h,
            "<li class=\"event {}\"><code>{}</code> generation {} &middot; {} <code>{}</code> &middot; <span class=\"{class}\">{}</span>: {}</li>",
            esc(result),
            s(&e["at"]),
            e["generation"],
            s(&e["kind"]),
            s(&e["file"]),
            esc(&result.replace('_', " ")),
            s(&e["summary"]),
        );
    }
    h.push_str("</ol>");
}

/// `Authorization: Bearer TOKEN` with this token, compared in time that does not depend on where
/// the bytes differ.
fn bearer_matches(headers: &http::HeaderMap, token: &[u8]) -> bool {
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| {
        let (scheme, rest) = v.as_bytes().split_at_checked(7)?;
        scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
    }) else {
        return false;
    };
    let given = given.trim_ascii();
    // The length is not the secret; the contents are, and every byte is compared.
    given.len() == token.len()
        && given
            .iter()
            .zip(token)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn answer(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET only\n",
        );
    }
    let text = "text/plain; charset=utf-8";
    let path = req.uri().path();
    // The probes stay open (kubelet sends no token); everything else shows internals.
    if !matches!(path, "/healthz" | "/readyz") {
        if let Some(token) = shared.admin_token.load_full() {
            if !bearer_matches(req.headers(), &token) {
                let mut r = respond(StatusCode::UNAUTHORIZED, text, Bytes::new());
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
        }
    }
    match path {
        "/healthz" => respond(StatusCode::OK, text, "ok\n"),
        "/readyz" if shared.ready.load(Ordering::Relaxed) => {
            respond(StatusCode::OK, text, "ready\n")
        }
        "/readyz" => respond(StatusCode::SERVICE_UNAVAILABLE, text, "not ready\n"),
        "/metrics" => {
            refresh_health_gauges(shared);
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                shared.metrics.encode(),
            )
        }
        "/status.json" => respond(
            StatusCode::OK,
            "application/json",
            status(shared).to_string(),
        ),
        "/" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status_page(shared),
        ),
        _ => respond(StatusCode::NOT_FOUND, text, "not found\n"),
    }
}

/// Serves admin requests until `stop` (the listener moved or was removed). It keeps answering
/// while the proxy drains, so readiness is seen as 503 until the process exits.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => r,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = answer(&req, &shared);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

/// Why `--check --diff` could not read a running instance's state.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url} refused the admin token (401): give the instance's token in LIMEN_ADMIN_TOKEN or --admin-token-file")]
    Refused { url: String },
    #[error("{url} did not answer with limen's status: {reason}")]
    NotStatus { url: String, reason: String },
}

/// Largest `/status.json` read from an instance (10,000 certificates and routes fit).
const MAX_STATUS_BYTES: usize = 64 * 1024 * 1024;

/// Fetches `/status.json` from the admin listener at `base` (`http://HOST:PORT`), with the bearer
/// token when given, within `patience`.
pub async fn fetch_status(
    base: &str,
    token: Option<&[u8]>,
    patience: Duration,
) -> Result<Value, FetchError> {
    let url = format!("{}/status.json", base.trim_end_matches('/'));
    let unreachable = |reason: String| FetchError::Unreachable {
        url: url.clone(),
        reason,
    };
    let not_status = |reason: String| FetchError::NotStatus {
        url: url.clone(),
        reason,
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e| unreachable(format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(unreachable(
            "the admin listener speaks plain http://; give http://HOST:PORT".into(),
        ));
    }
    let Some(authority) = uri.authority().cloned() else {
        return Err(unreachable("the URL names no host".into()));
    };
    let port = authority.port_u16().unwrap_or(80);
    let fetch = async {
        // `[::1]` names an IPv6 address; the resolver wants it bare.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = Request::get(uri.clone()).header(header::HOST, authority.as_str());
        if let Some(t) = token {
            let mut value = b"Bearer ".to_vec();
            value.extend_from_slice(t.trim_ascii());
            let value = HeaderValue::from_bytes(&value)
                .map_err(|_| unreachable("the admin token is not a valid header value".into()))?;
            req = req.header(header::AUTHORIZATION, value);
        }
        let req = req
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Err(FetchError::Refused { url: url.clone() }),
            s => return Err(not_status(format!("HTTP {s}"))),
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_STATUS_BYTES);
        let bytes = http_body_util::BodyExt::collect(body)
            .await
            .map_err(|e| not_status(e.to_string()))?
            .to_bytes();
        serde_json::from_slice::<Value>(&bytes).map_err(|e| not_status(e.to_string()))
    };
    tokio::time::timeout(patience, fetch)
        .await
        .map_err(|_| unreachable(format!("no answer within {patience:?}")))?
}
