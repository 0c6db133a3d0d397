//! `--check --diff`: turns two status views into the lines an operator reads before a reload.
//!
//! Owns: matching routes by (host, path) and certificates by their names, deciding what counts as
//! a change, and making every line safe to print. The running view comes from the network, so it
//! is treated as untrusted: odd entries are skipped, text is stripped of control characters and
//! long values are cut. Pure: must not touch sockets, files or the published snapshot; the caller
//! fetches `/status.json`, renders the candidate and prints.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

type Entry = Map<String, Value>;

/// Longest text a line shows from one value; a hostile instance could send megabytes.
const MAX_CHARS: usize = 200;

/// Not configuration: `host`/`path` are the key, `upstream_health` is live state, and `file`
/// differs whenever the config moves even if nothing it says changed.
const ROUTE_SKIP: [&str; 4] = ["host", "path", "upstream_health", "file"];

/// The changes from `running` to `candidate`, one line each, sorted and without duplicates.
/// Empty means nothing would change.
pub fn lines(running: &Value, candidate: &Value) -> Vec<String> {
    let mut out = BTreeSet::new();
    diff_routes(running, candidate, &mut out);
    diff_certs(running, candidate, &mut out);
    if let (Some(old), Some(new)) = (workers(running), workers(candidate)) {
        if old != new {
            out.insert("! workers needs a restart".to_owned());
        }
    }
    // A hostile instance could list a million routes; an operator reads the first screenfuls.
    let total = out.len();
    let mut lines: Vec<String> = out.into_iter().take(MAX_LINES).collect();
    if total > MAX_LINES {
        lines.push(format!("… {} more lines not shown", total - MAX_LINES));
    }
    lines
}

/// Absent (an older instance) or odd means "unknown", not "unset": say nothing rather than guess.
fn workers(view: &Value) -> Option<&Value> {
    view.get("workers")
        .filter(|w| w.is_null() || w.is_i64() || w.is_u64())
}

/// The objects in `view[key]`; anything else there is ignored rather than trusted.
fn entries<'a>(view: &'a Value, key: &str) -> impl Iterator<Item = &'a Entry> {
    view.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
}

fn str_field<'a>(e: &'a Entry, key: &str) -> Option<&'a str> {
    e.get(key).and_then(Value::as_str)
}

/// Routes by (host, path). The first of duplicates wins, so a hostile list cannot multiply lines.
fn routes(view: &Value) -> BTreeMap<(&str, &str), &Entry> {
    let mut map = BTreeMap::new();
    for r in entries(view, "routes") {
        if let (Some(host), Some(path)) = (str_field(r, "host"), str_field(r, "path")) {
            map.entry((host, path)).or_insert(r);
        }
    }
    map
}

fn diff_routes(running: &Value, candidate: &Value, out: &mut BTreeSet<String>) {
    let (old, new) = (routes(running), routes(candidate));
    for &(host, path) in old.keys().filter(|k| !new.contains_key(*k)) {
        out.insert(format!("- route {} {}", text(host), text(path)));
    }
    for (&(host, path), n) in &new {
        let at = format!("{} {}", text(host), text(path));
        let Some(o) = old.get(&(host, path)) else {
            out.insert(format!("+ route {at} -> {}", target(n)));
            continue;
        };
        // Fields come from the candidate: a running instance cannot invent lines by adding keys,
        // and a field it is too old to report is simply not compared.
        for (field, nv) in n.iter() {
            if ROUTE_SKIP.contains(&field.as_str()) {
                continue;
            }
            if let Some(ov) = o.get(field).filter(|ov| *ov != nv) {
                out.insert(format!(
                    "~ route {at}: {} ({} -> {})",
                    text(field),
                    shown(ov),
                    shown(nv)
                ));
            }
        }
    }
}

/// Where a new route sends traffic. Not cut as a whole: it is local config, and a long list of
/// upstreams is exactly what the operator wants to see in full.
fn target(r: &Entry) -> String {
    match r.get("upstreams").and_then(Value::as_array) {
        Some(ups) if !ups.is_empty() => ups.iter().map(shown).collect::<Vec<_>>().join(", "),
        _ => format!("respond {}", r.get("respond").map_or("none".into(), shown)),
    }
}

/// Certificates by their sorted names, so a reordered SAN list is the same certificate. The value
/// is the names as printed, each one made safe separately so one long name cannot hide the rest.
fn certs(view: &Value) -> BTreeMap<String, (String, &Entry)> {
    let mut map = BTreeMap::new();
    for c in entries(view, "certs") {
        let mut names: Vec<&str> = c
            .get("names")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if names.is_empty() {
            continue;
        }
        names.sort_unstable();
        let shown_names = names.iter().map(|n| text(n)).collect::<Vec<_>>().join(",");
        map.entry(names.join(",")).or_insert((shown_names, c));
    }
    map
}

fn diff_certs(running: &Value, candidate: &Value, out: &mut BTreeSet<String>) {
    let (old, new) = (certs(running), certs(candidate));
    for (key, (names, _)) in &old {
        if !new.contains_key(key) {
            out.insert(format!("- cert {names}"));
        }
    }
    for (key, (names, n)) in &new {
        let not_after = |c: &Entry| text(str_field(c, "not_after").unwrap_or("none"));
        match old.get(key) {
            None => {
                out.insert(format!("+ cert {names} (not after {})", not_after(n)));
            }
            Some((_, o)) if replaced(o, n) => {
                out.insert(format!(
                    "~ cert {names} (not after {} -> {})",
                    not_after(o),
                    not_after(n)
                ));
            }
            Some(_) => {}
        }
    }
}

/// The fingerprint decides when both sides have one: a renewal can keep the same expiry, and
/// the same file re-read is not a change. Without it, a new expiry is the best evidence left.
fn replaced(old: &Entry, new: &Entry) -> bool {
    match (str_field(old, "sha256"), str_field(new, "sha256")) {
        (Some(a), Some(b)) => !a.eq_ignore_ascii_case(b),
        _ => matches!(
            (str_field(old, "not_after"), str_field(new, "not_after")),
            (Some(a), Some(b)) if a != b
        ),
    }
}

/// A value as a line shows it: safe to print and at most `MAX_CHARS` (plus the ellipsis) long.
fn shown(v: &Value) -> String {
    text(&plain(v))
}

/// Human form: no quotes, lists joined, and "none" for both null and an empty list, since that is
/// how an operator reads "no upstreams" or "no health check".
fn plain(v: &Value) -> String {
    match v {
        Value::Null => "none".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "none".to_owned(),
        Value::Array(a) => a.iter().map(plain).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// Bidirectional overrides and isolates: not control characters, yet they can make a line read
/// as something it is not.
fn reorders(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Most lines printed.
const MAX_LINES: usize = 10_000;

/// Control characters become `?` so a hostile instance cannot drive the operator's terminal, and
/// the length is capped without scanning past the cut.
fn text(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_CHARS)
        .map(|c| {
            if c.is_control() || reorders(c) {
                '?'
            } else {
                c
            }
        })
        .collect();
    if s.chars().nth(MAX_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(host: &str, path: &str, upstream: &str) -> Value {
        json!({
            "name": "api", "host": host, "path": path, "upstreams": [upstream], "weights": [1],
            "respond": null, "strip_prefix": false, "timeout_ms": 30000, "balance": "round_robin",
            "health": null, "passive": null, "retry": "idempotent", "headers": "default",
            "upstream_tls": null, "upstream_protocol": "http1", "file": "/etc/limen/limen.yaml",
            "upstream_health": [{"url": upstream, "state": "up"}],
        })
    }

    fn cert(names: &[&str], not_after: &str, sha: &str) -> Value {
        json!({
            "names": names, "file": "/etc/limen/certs/a.pem", "not_after": not_after,
            "days_left": 60, "sha256": sha, "serial": "01",
        })
    }

    fn view(routes: Vec<Value>, certs: Vec<Value>, workers: Value) -> Value {
        json!({ "routes": routes, "certs": certs, "workers": workers })
    }

    fn one_cert(c: Value) -> Value {
        view(vec![], vec![c], Value::Null)
    }

    fn one_route(r: Value) -> Value {
        view(vec![r], vec![], Value::Null)
    }

    const UP: &str = "http://10.0.0.5:3000";

    #[test]
    fn identical_views_have_no_changes() {
        let v = view(
            vec![route("a.test", "/api", UP), route("b.test", "/", UP)],
            vec![cert(&["a.test", "b.test"], "2030-01-01T00:00:00Z", "ab")],
            json!(4),
        );
        assert!(lines(&v, &v).is_empty());
        assert!(lines(&json!({}), &json!({})).is_empty());
    }

    #[test]
    fn added_route_lists_upstreams() {
        let mut r = route("a.test", "/api", UP);
        r["upstreams"] = json!([UP, "http://10.0.0.6:3000"]);
        assert_eq!(
            lines(&json!({}), &one_route(r)),
            ["+ route a.test /api -> http://10.0.0.5:3000, http://10.0.0.6:3000"]
        );
    }

    #[test]
    fn added_respond_route_shows_status() {
        let mut r = route("a.test", "/old", UP);
        r["upstreams"] = json!([]);
        r["respond"] = json!(410);
        assert_eq!(
            lines(&json!({"routes": []}), &one_route(r)),
            ["+ route a.test /old -> respond 410"]
        );
    }

    #[test]
    fn removed_route() {
        let running = one_route(route("a.test", "/api", UP));
        assert_eq!(
            lines(&running, &view(vec![], vec![], Value::Null)),
            ["- route a.test /api"]
        );
    }

    #[test]
    fn changed_upstreams() {
        let running = one_route(route("a.test", "/api", UP));
        let candidate = one_route(route("a.test", "/api", "http://10.0.0.6:3000"));
        assert_eq!(
            lines(&running, &candidate),
            ["~ route a.test /api: upstreams (http://10.0.0.5:3000 -> http://10.0.0.6:3000)"]
        );
    }

    #[test]
    fn each_changed_field_is_its_own_line() {
        let running = one_route(route("a.test", "/", UP));
        let mut r = route("a.test", "/", UP);
        r["name"] = json!("web");
        r["weights"] = json!([2, 3]);
        r["strip_prefix"] = json!(true);
        r["timeout_ms"] = json!(5000);
        r["health"] = json!("GET /healthz every 5s");
        r["upstream_tls"] = json!("verify");
        assert_eq!(
            lines(&running, &one_route(r)),
            [
                "~ route a.test /: health (none -> GET /healthz every 5s)",
                "~ route a.test /: name (api -> web)",
                "~ route a.test /: strip_prefix (false -> true)",
                "~ route a.test /: timeout_ms (30000 -> 5000)",
                "~ route a.test /: upstream_tls (none -> verify)",
                "~ route a.test /: weights (1 -> 2, 3)",
            ]
        );
    }

    #[test]
    fn proxy_to_respond_reads_as_none() {
        let running = one_route(route("a.test", "/", UP));
        let mut r = route("a.test", "/", UP);
        r["upstreams"] = json!([]);
        r["weights"] = json!([]);
        r["respond"] = json!(503);
        assert_eq!(
            lines(&running, &one_route(r)),
            [
                "~ route a.test /: respond (none -> 503)",
                "~ route a.test /: upstreams (http://10.0.0.5:3000 -> none)",
                "~ route a.test /: weights (1 -> none)",
            ]
        );
    }

    #[test]
    fn live_state_and_file_are_not_compared() {
        let running = one_route(route("a.test", "/", UP));
        let mut r = route("a.test", "/", UP);
        r["upstream_health"] = json!([{"url": UP, "state": "down"}]);
        r["file"] = json!("/srv/other.yaml");
        assert!(lines(&running, &one_route(r)).is_empty());
    }

    #[test]
    fn routes_are_keyed_by_host_and_path_not_name() {
        let running = one_route(route("a.test", "/api", UP));
        let candidate = one_route(route("a.test", "/v2", UP));
        assert_eq!(
            lines(&running, &candidate),
            [
                "+ route a.test /v2 -> http://10.0.0.5:3000",
                "- route a.test /api"
            ]
        );
        let other_host = one_route(route("b.test", "/api", UP));
        assert_eq!(lines(&running, &other_host).len(), 2);
    }

    #[test]
    fn field_missing_on_either_side_is_not_compared() {
        // What the current /status.json reports: an older instance knows nothing else.
        let old = json!({"routes": [{
            "name": "api", "host": "a.test", "path": "/", "upstreams": [UP],
            "upstream_health": [], "respond": null, "strip_prefix": false, "timeout_ms": 30000,
        }]});
        let mut r = route("a.test", "/", UP);
        r["balance"] = json!("least_conn");
        assert!(lines(&old, &one_route(r.clone())).is_empty());
        let mut fewer = r.clone();
        if let Some(m) = fewer.as_object_mut() {
            m.remove("strip_prefix");
        }
        let mut running = route("a.test", "/", UP);
        running["strip_prefix"] = json!(true);
        assert_eq!(
            lines(&one_route(running), &one_route(fewer)),
            ["~ route a.test /: balance (round_robin -> least_conn)"]
        );
    }

    #[test]
    fn cert_added_removed_and_names_order_insensitive() {
        let running = view(
            vec![],
            vec![
                cert(&["b.test", "a.test"], "2030-01-01T00:00:00Z", "aa"),
                cert(&["old.test"], "2029-01-01T00:00:00Z", "bb"),
            ],
            Value::Null,
        );
        let candidate = view(
            vec![],
            vec![
                cert(&["a.test", "b.test"], "2030-01-01T00:00:00Z", "AA"),
                cert(&["new.test", "www.new.test"], "2031-06-01T00:00:00Z", "cc"),
            ],
            Value::Null,
        );
        assert_eq!(
            lines(&running, &candidate),
            [
                "+ cert new.test,www.new.test (not after 2031-06-01T00:00:00Z)",
                "- cert old.test",
            ]
        );
    }

    #[test]
    fn cert_replaced_by_fingerprint_even_with_same_expiry() {
        let running = one_cert(cert(&["a.test"], "2030-01-01T00:00:00Z", "aa"));
        let candidate = one_cert(cert(&["a.test"], "2030-01-01T00:00:00Z", "bb"));
        assert_eq!(
            lines(&running, &candidate),
            ["~ cert a.test (not after 2030-01-01T00:00:00Z -> 2030-01-01T00:00:00Z)"]
        );
    }

    #[test]
    fn same_fingerprint_is_not_a_replacement() {
        let running = one_cert(cert(&["a.test"], "2030-01-01T00:00:00Z", "aa"));
        let mut c = cert(&["a.test"], "2030-01-01T00:00:01Z", "aa");
        c["days_left"] = json!(1);
        c["file"] = json!("/elsewhere.pem");
        assert!(lines(&running, &one_cert(c)).is_empty());
    }

    #[test]
    fn without_fingerprint_expiry_decides() {
        let running =
            json!({"certs": [{"names": ["a.test"], "not_after": "2030-01-01T00:00:00Z"}]});
        let renewed = one_cert(cert(&["a.test"], "2030-04-01T00:00:00Z", "aa"));
        assert_eq!(
            lines(&running, &renewed),
            ["~ cert a.test (not after 2030-01-01T00:00:00Z -> 2030-04-01T00:00:00Z)"]
        );
        let same = one_cert(cert(&["a.test"], "2030-01-01T00:00:00Z", "aa"));
        assert!(lines(&running, &same).is_empty());
    }

    #[test]
    fn workers_change_needs_restart() {
        let v = |w| view(vec![], vec![], w);
        assert_eq!(
            lines(&v(json!(2)), &v(json!(4))),
            ["! workers needs a restart"]
        );
        assert_eq!(
            lines(&v(Value::Null), &v(json!(4))),
            ["! workers needs a restart"]
        );
        assert!(lines(&v(json!(4)), &v(json!(4))).is_empty());
        // Not reported, or not a number: unknown, so no claim either way.
        assert!(lines(&json!({}), &v(json!(4))).is_empty());
        assert!(lines(&v(json!("4")), &v(json!(4))).is_empty());
    }

    #[test]
    fn output_is_sorted_and_deduplicated() {
        let running = view(
            vec![
                route("z.test", "/", UP),
                route("z.test", "/", "http://other"),
            ],
            vec![],
            json!(1),
        );
        let candidate = view(
            vec![route("a.test", "/", UP)],
            vec![cert(&["a.test"], "2030-01-01T00:00:00Z", "aa")],
            json!(2),
        );
        let out = lines(&running, &candidate);
        assert_eq!(
            out,
            [
                "! workers needs a restart",
                "+ cert a.test (not after 2030-01-01T00:00:00Z)",
                "+ route a.test / -> http://10.0.0.5:3000",
                "- route z.test /",
            ]
        );
    }

    #[test]
    fn hostile_shapes_never_panic() {
        let candidate = one_route(route("a.test", "/", UP));
        let added = ["+ route a.test / -> http://10.0.0.5:3000"];
        for running in [
            Value::Null,
            json!("status"),
            json!([1, 2, 3]),
            json!({"routes": "all of them", "certs": 7, "workers": [1]}),
            json!({"routes": [1, "a", null, [], {"host": 1, "path": "/"}, {"path": "/"}, {"host": "a.test"}]}),
            json!({"certs": [5, {"names": "a.test"}, {"names": []}, {"names": [1, null]}, {}]}),
        ] {
            assert_eq!(lines(&running, &candidate), added, "{running}");
            assert!(lines(&candidate, &running).len() <= 1);
        }
        // Odd field types on a matched route are shown, not trusted.
        let odd = json!({"routes": [{"host": "a.test", "path": "/", "upstreams": [1, {"x": true}, null],
            "weights": "heavy", "timeout_ms": -1, "strip_prefix": "yes"}]});
        let out = lines(&odd, &candidate);
        assert!(out.contains(
            &"~ route a.test /: upstreams (1, {\"x\":true}, none -> http://10.0.0.5:3000)"
                .to_owned()
        ));
        assert!(out.contains(&"~ route a.test /: weights (heavy -> 1)".to_owned()));
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn control_characters_are_neutralised() {
        let running = json!({
            "routes": [{"host": "\u{1b}[2Jevil.test", "path": "/\r\n", "upstreams": []}],
            "certs": [{"names": ["\u{1b}]0;pwned\u{7}"], "not_after": "x"}],
        });
        let r = route("a.test", "/", UP);
        let mut running2 = route("a.test", "/", UP);
        running2["name"] = json!("ok\u{9b}31m\u{7f}");
        let out = lines(&running, &json!({}));
        assert_eq!(out, ["- cert ?]0;pwned?", "- route ?[2Jevil.test /??"]);
        assert_eq!(
            lines(&one_route(running2), &one_route(r)),
            ["~ route a.test /: name (ok?31m? -> api)"]
        );
        for line in out {
            assert!(!line.chars().any(char::is_control), "{line:?}");
        }
    }

    #[test]
    fn long_values_are_cut() {
        let huge = "x".repeat(10 * 1024);
        let mut running = route("a.test", "/", UP);
        running["upstreams"] = json!([huge, huge]);
        let out = lines(&one_route(running), &one_route(route("a.test", "/", UP)));
        let expected = format!(
            "~ route a.test /: upstreams ({}… -> http://10.0.0.5:3000)",
            "x".repeat(MAX_CHARS)
        );
        assert_eq!(out, [expected]);

        let exact = "y".repeat(MAX_CHARS);
        assert_eq!(text(&exact), exact);
        assert_eq!(text(&format!("{exact}é")), format!("{exact}…"));
        let gone = json!({"routes": [{"host": huge, "path": "/"}]});
        let out = lines(&gone, &json!({}));
        assert_eq!(out.len(), 1);
        assert!(out[0].chars().count() < 2 * MAX_CHARS);
    }
}
