//! `--check --diff`: reads a running instance's `/status.json` back into a typed
//! [`View`](crate::config::diff::View), and turns its diff with the candidate's into the lines an
//! operator reads before a reload.
//!
//! Owns: reading the running view, and making every line safe to print. The running view comes
//! from the network, so it is treated as untrusted: odd entries are skipped, keys this version
//! does not know are dropped, text is stripped of control characters and long values are cut; what
//! an older instance does not report is not compared. What counts as a change, and how it reads,
//! is `config::diff`'s. Pure: must not touch sockets, files or the published snapshot; the caller
//! fetches `/status.json`, builds the candidate's view and prints.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::config::diff::{self, View};

type Entry = Map<String, Value>;

/// Longest text a line shows from one value; a hostile instance could send megabytes.
const MAX_CHARS: usize = 200;

/// Longest host or path kept whole as a route's key (a host is at most 253 characters); longer
/// ones are cut like any value and match nothing.
const MAX_KEY_CHARS: usize = 2048;

/// Most settings, secrets or fields read from one object; this version knows far fewer.
const MAX_ENTRIES: usize = 10_000;

/// The changes from `running` (its `/status.json`) to `candidate`, one line each, sorted and
/// without duplicates. Empty means nothing would change.
pub fn lines(running: &Value, candidate: &View) -> Vec<String> {
    let old = running_view(running, candidate);
    let out: BTreeSet<String> = diff::diff(&old, candidate)
        .iter()
        .map(|c| safe(&c.to_string()))
        .collect();
    // A hostile instance could list a million routes; an operator reads the first screenfuls.
    let total = out.len();
    let mut lines: Vec<String> = out.into_iter().take(MAX_LINES).collect();
    if total > MAX_LINES {
        lines.push(format!("… {} more lines not shown", total - MAX_LINES));
    }
    lines
}

/// The running instance's view, read defensively from its `/status.json`: odd entries are
/// skipped, text is made safe to print, and what an older instance does not report is taken
/// from `candidate`, so it is not compared rather than reported as removed.
pub fn running_view(running: &Value, candidate: &View) -> View {
    let mut v = View::default();
    match running.get("settings").and_then(Value::as_object) {
        Some(settings) => v.settings = strings(settings, diff::is_setting_key),
        None => {
            // An older instance: its settings are unknown, except `workers`.
            v.settings = candidate.settings.clone();
            v.settings.remove("workers");
            match running.get("workers") {
                Some(Value::Null) => {}
                Some(w) if w.is_u64() || w.is_i64() => {
                    v.settings.insert("workers".into(), w.to_string());
                }
                // Absent or odd means "unknown", not "unset": say nothing rather than guess.
                _ => {
                    if let Some(w) = candidate.settings.get("workers") {
                        v.settings.insert("workers".into(), w.clone());
                    }
                }
            }
        }
    }
    if let Some(secrets) = running.get("secrets").and_then(Value::as_object) {
        v.secrets = strings(secrets, |_| true);
    }
    for r in entries(running, "routes") {
        let (Some(host), Some(path)) = (str_field(r, "host"), str_field(r, "path")) else {
            continue;
        };
        let matcher = str_field(r, "match").unwrap_or("");
        let path = crate::config::route_path_key(path, matcher);
        let key = (route_key(host), route_path(&path));
        if v.routes.contains_key(&key) {
            // The first of duplicates wins, so a hostile list cannot multiply lines.
            continue;
        }
        let fields = match r.get("fields").and_then(Value::as_object) {
            Some(f) => strings(f, diff::is_route_field),
            // An older instance reports its upstreams, answer and strip_prefix in forms this
            // version can read; its other fields are unknown, so they are not compared.
            None => {
                let mut f = candidate.routes.get(&key).cloned().unwrap_or_default();
                f.remove("upstreams");
                f.remove("respond");
                f.extend(legacy_fields(r));
                f
            }
        };
        v.routes.insert(key, fields);
    }
    for c in entries(running, "certs") {
        let names: Vec<String> = c
            .get("names")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(text)
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        v.add_cert(
            &names,
            str_field(c, "not_after").map(text),
            str_field(c, "sha256").map(text),
        );
    }
    v
}

/// The string, number and boolean values of `obj` whose keys `keep` accepts, made safe.
fn strings(obj: &Entry, keep: fn(&str) -> bool) -> BTreeMap<String, String> {
    obj.iter()
        .filter(|(k, _)| keep(k))
        .take(MAX_ENTRIES)
        .filter_map(|(k, v)| {
            let v = match v {
                Value::String(s) => text(s),
                Value::Number(_) | Value::Bool(_) => v.to_string(),
                _ => return None,
            };
            Some((text(k), v))
        })
        .collect()
}

/// What an older instance's route entry says in forms the typed view shares.
fn legacy_fields(r: &Entry) -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    let weights: Vec<Option<u64>> = r
        .get("weights")
        .and_then(Value::as_array)
        .map(|w| w.iter().map(Value::as_u64).collect())
        .unwrap_or_default();
    match r.get("upstreams").and_then(Value::as_array) {
        Some(ups) if !ups.is_empty() => {
            let shown: Vec<String> = ups
                .iter()
                .take(MAX_ENTRIES)
                .enumerate()
                .map(|(i, u)| match weights.get(i) {
                    Some(Some(w)) if *w != 1 => format!("{} (weight {w})", shown(u)),
                    _ => shown(u),
                })
                .collect();
            f.insert("upstreams".into(), shown.join(", "));
        }
        _ => {
            if let Some(status) = r.get("respond").filter(|s| !s.is_null()) {
                f.insert("respond".into(), shown(status));
            }
        }
    }
    if let Some(b) = r.get("strip_prefix").and_then(Value::as_bool) {
        f.insert("strip_prefix".into(), b.to_string());
    }
    f
}

/// A path with its match as a route's key: a path is at most 2048 bytes and a match at most 32
/// conditions of 256-byte values, so a real one is never cut.
fn route_path(s: &str) -> String {
    if s.chars().nth(16 * MAX_KEY_CHARS).is_some() {
        text(s)
    } else {
        safe(s)
    }
}

/// A host or path as a route's key: made safe, and cut only past what a real one can be.
fn route_key(s: &str) -> String {
    if s.chars().nth(MAX_KEY_CHARS).is_some() {
        text(s)
    } else {
        safe(s)
    }
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
    let mut out: String = s.chars().take(MAX_CHARS).map(neutral).collect();
    if s.chars().nth(MAX_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// `s` with control and reordering characters as `?`, not cut: for a whole line, whose parts
/// were cut already where they came from the instance.
fn safe(s: &str) -> String {
    s.chars().map(neutral).collect()
}

fn neutral(c: char) -> char {
    if c.is_control() || reorders(c) {
        '?'
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;

    /// The candidate's view of a config whose routes are `routes`.
    fn candidate(extra: &str, routes: &str) -> View {
        let yaml = format!(
            "listen: {{https: \"127.0.0.1:8443\"}}\ntls: {{cert_dirs: [./certs]}}\n{extra}\nroutes:\n{routes}"
        );
        match Config::parse(&yaml, std::path::Path::new("/etc/limen/proxy.yaml")) {
            Ok(c) => View::from_config(&c),
            Err(e) => panic!("{e}"),
        }
    }

    /// What a current instance serving the same config reports.
    fn status_of(v: &View) -> Value {
        let routes: Vec<Value> = v
            .routes
            .iter()
            .map(|((host, path), fields)| {
                json!({"host": host, "path": path, "name": "0", "fields": fields,
                       "upstream_health": [], "file": "/etc/limen/proxy.yaml"})
            })
            .collect();
        let certs: Vec<Value> = v
            .certs
            .values()
            .map(|c| {
                json!({"names": c.names.split(',').collect::<Vec<_>>(),
                            "not_after": c.not_after, "sha256": c.sha256})
            })
            .collect();
        json!({"routes": routes, "certs": certs, "settings": v.settings,
               "secrets": v.secrets, "workers": null})
    }

    const API: &str =
        "  - {name: api, host: a.test, path: /api, upstreams: [\"http://10.0.0.5:3000\"]}\n";

    #[test]
    fn identical_views_have_no_changes() {
        let v = candidate("workers: 4", API);
        assert!(lines(&status_of(&v), &v).is_empty());
        assert!(lines(&json!({}), &View::default()).is_empty());
    }

    #[test]
    fn settings_and_route_fields_come_back_typed() {
        let running = status_of(&candidate("", API));
        let next = candidate(
            "timeouts: {idle: 30s}\ntrusted_proxies: [10.0.0.0/8]",
            &API.replace("]}", "], retry: {attempts: 2}, timeout: 5s}"),
        );
        assert_eq!(
            lines(&running, &next),
            [
                "~ route a.test /api: retry.attempts (1 -> 2)",
                "~ route a.test /api: timeout (none -> 5s)",
                "~ timeouts.idle: 1m -> 30s [new connections only]",
                "~ trusted_proxies: [] -> [10.0.0.0/8]",
            ]
        );
    }

    #[test]
    fn added_and_removed_routes() {
        let running = status_of(&candidate("", API));
        let next = candidate(
            "",
            "  - {host: b.test, path: /old, respond: {status: 410}}\n  - {host: b.test, upstreams: [\"http://10.0.0.5:3000\", {url: \"http://10.0.0.6:3000\", weight: 2}]}\n",
        );
        assert_eq!(
            lines(&running, &next),
            [
                "+ route b.test / -> http://10.0.0.5:3000, http://10.0.0.6:3000 (weight 2)",
                "+ route b.test /old -> respond 410",
                "- route a.test /api",
            ]
        );
    }

    #[test]
    fn an_older_instance_compares_what_it_reported_and_nothing_else() {
        // What /status.json said before it carried `settings` and route `fields`.
        let old = json!({"workers": null, "routes": [{
            "name": "api", "host": "a.test", "path": "/api", "upstreams": ["http://10.0.0.5:3000"],
            "weights": [1], "upstream_health": [], "respond": null, "strip_prefix": false,
            "timeout_ms": 30000, "retry": "Retry { attempts: 1 }",
        }, {"host": "a.test", "path": "/gone", "upstreams": [], "respond": 410}]});
        let same = candidate(
            "timeouts: {idle: 5s}",
            &API.replace("]}", "], timeout: 1s}"),
        );
        assert_eq!(lines(&old, &same), ["- route a.test /gone"]);
        let moved = candidate(
            "workers: 2",
            &API.replace(
                "3000\"]",
                "3000\", {url: \"http://10.0.0.6:3000\", weight: 3}], strip_prefix: true",
            ),
        );
        assert_eq!(
            lines(&old, &moved),
            [
                "! workers needs a restart",
                "- route a.test /gone",
                "~ route a.test /api: strip_prefix (false -> true)",
                "~ route a.test /api: upstreams (http://10.0.0.5:3000 -> http://10.0.0.5:3000, http://10.0.0.6:3000 (weight 3))",
            ]
        );
        // `workers` absent or odd: unknown, so no claim either way.
        let w = candidate("workers: 4", API);
        assert!(!lines(&json!({"routes": old["routes"]}), &w)
            .iter()
            .any(|l| l.contains("workers")));
        assert!(!lines(&json!({"workers": "4"}), &w)
            .iter()
            .any(|l| l.contains("workers")));
        assert!(lines(&json!({"workers": 2}), &w).contains(&"! workers needs a restart".to_owned()));
    }

    #[test]
    fn keys_this_version_does_not_know_are_dropped() {
        let v = candidate("", API);
        let mut running = status_of(&v);
        running["settings"]["tls.future_knob"] = json!("on");
        running["routes"][0]["fields"]["future_field"] = json!("x");
        running["secrets"] = json!({"tls.ticket_keys": "aa"});
        assert!(lines(&running, &v).is_empty());
    }

    #[test]
    fn secrets_are_compared_where_both_sides_know_them() {
        let mut v = candidate("", API);
        v.settings
            .insert("tls.ticket_keys".into(), "./tickets".into());
        v.secrets
            .insert("tls.ticket_keys".into(), diff::fingerprint(b"one"));
        let mut running = status_of(&v);
        assert!(lines(&running, &v).is_empty());
        running["secrets"]["tls.ticket_keys"] = json!(diff::fingerprint(b"two"));
        assert_eq!(
            lines(&running, &v),
            ["~ tls.ticket_keys: (changed) [new connections only]"]
        );
        running["secrets"] = Value::Null;
        assert!(lines(&running, &v).is_empty());
    }

    #[test]
    fn certs_added_removed_and_replaced_by_fingerprint() {
        let mut running = View::default();
        running.add_cert(
            &["b.test", "a.test"],
            Some("2030-01-01T00:00:00Z".into()),
            Some("aa".into()),
        );
        running.add_cert(
            &["old.test"],
            Some("2029-01-01T00:00:00Z".into()),
            Some("bb".into()),
        );
        let mut next = View::default();
        next.add_cert(
            &["a.test", "b.test"],
            Some("2030-01-01T00:00:00Z".into()),
            Some("AA".into()),
        );
        next.add_cert(
            &["www.new.test", "new.test"],
            Some("2031-06-01T00:00:00Z".into()),
            Some("cc".into()),
        );
        assert_eq!(
            lines(&status_of(&running), &next),
            [
                "+ cert new.test,www.new.test (not after 2031-06-01T00:00:00Z)",
                "- cert old.test",
            ]
        );
        // Without a fingerprint, the expiry decides.
        let bare = json!({"certs": [{"names": ["a.test", "b.test"], "not_after": "2029-01-01T00:00:00Z"}]});
        let mut one = View::default();
        one.add_cert(
            &["a.test", "b.test"],
            Some("2030-01-01T00:00:00Z".into()),
            Some("aa".into()),
        );
        assert_eq!(
            lines(&bare, &one),
            ["~ cert a.test,b.test (not after 2029-01-01T00:00:00Z -> 2030-01-01T00:00:00Z)"]
        );
    }

    #[test]
    fn hostile_shapes_never_panic() {
        let next = candidate("", API);
        let added = "+ route a.test /api -> http://10.0.0.5:3000";
        for running in [
            Value::Null,
            json!("status"),
            json!([1, 2, 3]),
            json!({"routes": "all of them", "certs": 7, "workers": [1], "settings": 5, "secrets": []}),
            json!({"routes": [1, "a", null, [], {"host": 1, "path": "/"}, {"path": "/"}, {"host": "a.test"}]}),
            json!({"certs": [5, {"names": "a.test"}, {"names": []}, {"names": [1, null]}, {}]}),
        ] {
            assert_eq!(lines(&running, &next), [added], "{running}");
        }
        // Odd value types in typed objects are skipped, numbers and booleans shown.
        let odd = json!({"settings": {"timeouts.idle": [1], "access_log": false, "workers": 3},
            "routes": [{"host": "a.test", "path": "/api",
                        "fields": {"upstreams": {"x": 1}, "retry.attempts": 7}}]});
        let out = lines(&odd, &next);
        assert!(
            out.contains(&"~ access_log: false -> true".to_owned()),
            "{out:?}"
        );
        assert!(
            out.contains(&"+ timeouts.idle: 1m [new connections only]".to_owned()),
            "{out:?}"
        );
        assert!(
            out.contains(&"~ route a.test /api: retry.attempts (7 -> 1)".to_owned()),
            "{out:?}"
        );
        assert!(
            out.contains(
                &"~ route a.test /api: upstreams (none -> http://10.0.0.5:3000)".to_owned()
            ),
            "{out:?}"
        );
        assert!(
            out.contains(&"! workers needs a restart".to_owned()),
            "{out:?}"
        );
    }

    #[test]
    fn control_characters_are_neutralised() {
        let running = json!({
            "routes": [{"host": "\u{1b}[2Jevil.test", "path": "/\r\n", "fields": {}}],
            "certs": [{"names": ["\u{1b}]0;pwned\u{7}"], "not_after": "x"}],
            "settings": {"tls.client_auth[\u{1b}[31m].mode": "require\u{202e}", "access_log": "true"},
        });
        let out = lines(&running, &View::default());
        assert_eq!(
            out,
            [
                "- access_log: true",
                "- cert ?]0;pwned?",
                "- route ?[2Jevil.test /??",
                "- tls.client_auth[?[31m].mode: require? [new connections only]",
            ]
        );
        for line in out {
            assert!(!line.chars().any(char::is_control), "{line:?}");
        }
    }

    #[test]
    fn long_values_are_cut_and_lines_capped() {
        let huge = "x".repeat(10 * 1024);
        let next = candidate("", API);
        let mut running = status_of(&next);
        running["routes"][0]["fields"]["upstreams"] = json!(huge);
        let out = lines(&running, &next);
        let expected = format!(
            "~ route a.test /api: upstreams ({}… -> http://10.0.0.5:3000)",
            "x".repeat(MAX_CHARS)
        );
        assert_eq!(out, [expected]);

        let exact = "y".repeat(MAX_CHARS);
        assert_eq!(text(&exact), exact);
        assert_eq!(text(&format!("{exact}é")), format!("{exact}…"));
        let gone = json!({"routes": [{"host": huge, "path": "/"}]});
        let out = lines(&gone, &View::default());
        assert_eq!(out.len(), 1);
        assert!(out[0].chars().count() < 2 * MAX_CHARS);

        let many: Vec<Value> = (0..MAX_LINES + 5)
            .map(|i| json!({"host": format!("h{i}.test"), "path": "/"}))
            .collect();
        let out = lines(&json!({ "routes": many }), &View::default());
        assert_eq!(out.len(), MAX_LINES + 1);
        assert_eq!(out[MAX_LINES], "… 5 more lines not shown");
    }
}
