//! Before shipping a config, an operator asks what it would change: `limen --check --diff URL`
//! checks the file as `--check` does, asks the instance whose admin listener is at URL for its
//! `/status.json`, and prints one sorted line per route, certificate or restart-only change,
//! applying nothing. It exits 1 when the file itself is wrong (asking nobody), 2 when the instance
//! cannot be asked or refuses the token, and an instance that answers garbage can neither crash it
//! nor write escape sequences to the operator's terminal.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// A respond route and a proxy route; the upstream need not be up for a diff.
const ROUTES: &str = "  - {name: home, host: a.test, respond: {}}\n  - {name: api, host: a.test, path: /api, upstreams: [\"http://127.0.0.1:9\"]}\n";

/// What one run of the binary left behind.
struct Ran {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

impl Ran {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn lines(&self) -> Vec<String> {
        self.out().lines().map(str::to_owned).collect()
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code,
            self.out(),
            self.stderr
        )
    }
}

/// `limen --config CONFIG --check --diff URL`, without a token from the test's own environment.
fn diff(config: &Path, url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_limen"));
    cmd.arg("--config")
        .arg(config)
        .arg("--check")
        .arg("--diff")
        .arg(url)
        .env_remove("LIMEN_ADMIN_TOKEN");
    cmd
}

fn run(mut cmd: Command) -> Ran {
    let out = cmd.output().unwrap();
    Ran {
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the binary off the runtime's threads, so the in-process limen it asks keeps serving.
async fn run_beside(cmd: Command) -> Ran {
    tokio::task::spawn_blocking(move || run(cmd)).await.unwrap()
}

fn admin_url(proxy: &Proxy) -> String {
    format!("http://{}", proxy.admin())
}

/// A temp dir whose `certs/` holds one certificate for `names`.
fn site(pki: &Pki, names: &[&str]) -> tempfile::TempDir {
    let dir = Proxy::dir();
    pki.issue(names).write(&dir.path().join("certs"), "site");
    dir
}

/// Writes a candidate config beside the running one.
fn candidate(proxy: &Proxy, name: &str, yaml: &str) -> PathBuf {
    let path = proxy.path(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn the_running_config_diffed_against_its_own_instance_has_no_changes() {
    let pki = Pki::new();
    let proxy = Proxy::start_in(site(&pki, &["a.test"]), &config_yaml("", ROUTES)).await;

    let ran = run_beside(diff(&proxy.config_path, &admin_url(&proxy))).await;
    assert_eq!(ran.code, Some(0), "{ran}");
    assert_eq!(
        ran.out(),
        "no changes\n",
        "stdout carries the diff alone: {ran}"
    );
    assert!(
        ran.stderr.contains("proxy.yaml: OK ("),
        "the check's verdict goes to stderr: {ran}"
    );

    // The URL as an operator may paste it, with a trailing slash: the same instance.
    let ran = run_beside(diff(&proxy.config_path, &format!("{}/", admin_url(&proxy)))).await;
    assert_eq!(ran.code, Some(0), "{ran}");
    assert_eq!(ran.out(), "no changes\n", "{ran}");
}

#[tokio::test(flavor = "multi_thread")]
async fn added_removed_and_changed_routes_each_get_a_sorted_line_and_nothing_is_applied() {
    let pki = Pki::new();
    let reload = "reload:\n  interval: 50ms";
    let running = concat!(
        "  - {name: home, host: a.test, respond: {}}\n",
        "  - {name: api, host: a.test, path: /api, upstreams: [\"http://127.0.0.1:9\"], timeout: 10s}\n",
        "  - {name: slow, host: a.test, path: /slow, upstreams: [\"http://127.0.0.1:9\"], timeout: 10s}\n",
        "  - {name: old, host: a.test, path: /old, respond: {status: 410}}\n",
    );
    let next = concat!(
        "  - {name: home, host: a.test, respond: {}}\n",
        "  - {name: api, host: a.test, path: /api, upstreams: [\"http://127.0.0.1:10\"], timeout: 10s}\n",
        "  - {name: slow, host: a.test, path: /slow, upstreams: [\"http://127.0.0.1:9\"], timeout: 5s}\n",
        "  - {name: new, host: b.test, path: /new, upstreams: [\"http://127.0.0.1:9\", \"http://127.0.0.1:11\"]}\n",
        "  - {name: gone, host: b.test, path: /gone, respond: {status: 410}}\n",
    );
    let proxy = Proxy::start_in(
        site(&pki, &["a.test", "b.test"]),
        &config_yaml(reload, running),
    )
    .await;
    let next_yaml = config_yaml(reload, next);
    let next_path = candidate(&proxy, "next.yaml", &next_yaml);
    let generation = proxy.generation();
    let served_before = status_json(&proxy).await["routes"].clone();

    let expected = [
        "+ route b.test /gone -> respond 410",
        "+ route b.test /new -> http://127.0.0.1:9, http://127.0.0.1:11",
        "- route a.test /old",
        "~ route a.test /api: upstreams (http://127.0.0.1:9 -> http://127.0.0.1:10)",
        "~ route a.test /slow: timeout (10s -> 5s)",
    ];
    let ran = run_beside(diff(&next_path, &admin_url(&proxy))).await;
    assert_eq!(ran.code, Some(0), "{ran}");
    assert_eq!(ran.lines(), expected, "{ran}");
    assert!(
        ran.stderr
            .contains("next.yaml: OK (5 routes, 1 certificates)"),
        "{ran}"
    );

    // Asked again, the same answer: nothing was applied in between, even with polls running.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ran = run_beside(diff(&next_path, &admin_url(&proxy))).await;
    assert_eq!(ran.lines(), expected, "{ran}");
    assert_eq!(proxy.generation(), generation, "the diff published nothing");
    let served_after = status_json(&proxy).await["routes"].clone();
    let keys = |routes: &serde_json::Value| -> Vec<(String, String)> {
        routes
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["host"].to_string(), r["path"].to_string()))
            .collect()
    };
    assert_eq!(keys(&served_after), keys(&served_before));
    assert_eq!(
        std::fs::read_to_string(&proxy.config_path).unwrap(),
        config_yaml(reload, running),
        "the running config file is untouched"
    );

    // Shipped: the instance now serves what the diff announced, and nothing is left to change.
    proxy.reconfigure(&next_yaml, Duration::from_secs(5)).await;
    for config in [&next_path, &proxy.config_path] {
        let ran = run_beside(diff(config, &admin_url(&proxy))).await;
        assert_eq!(ran.code, Some(0), "{ran}");
        assert_eq!(ran.out(), "no changes\n", "{ran}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_added_renewed_and_dropped_each_get_a_line_with_their_expiry() {
    let pki = Pki::new();
    let dir = Proxy::dir();
    // The candidate sits in `next/` with its own `./certs`: paths compare as written, so only
    // the certificates differ, as if the candidate were shipped beside the running config.
    let (now, next) = (dir.path().join("certs"), dir.path().join("next/certs"));
    // The very same files in both folders: not a change.
    let same = pki.issue(&["same.test"]);
    same.write(&now, "same");
    same.write(&next, "same");
    // The same name re-issued with a later expiry.
    pki.issue_until(&["a.test"], 2090).write(&now, "a");
    pki.issue_until(&["a.test"], 2095).write(&next, "a");
    // Only the running instance has this one; only the candidate has that one.
    pki.issue(&["gone.test"]).write(&now, "gone");
    pki.issue_expiring(&["www.new.test", "new.test"], (2096, 6, 1))
        .write(&next, "new");
    let routes = "  - {name: home, host: a.test, respond: {}}\n";
    let proxy = Proxy::start_in(dir, &config_yaml("", routes)).await;
    let next_path = candidate(&proxy, "next/proxy.yaml", &config_yaml("", routes));

    // What the running instance itself reports as a.test's expiry.
    let st = status_json(&proxy).await;
    let running_a = st["certs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["names"] == serde_json::json!(["a.test"]))
        .and_then(|c| c["not_after"].as_str())
        .unwrap_or_else(|| panic!("a.test is served: {st}"))
        .to_owned();
    assert!(running_a.starts_with("2090-01-01T00:00:00"), "{running_a}");

    let ran = run_beside(diff(&next_path, &admin_url(&proxy))).await;
    assert_eq!(ran.code, Some(0), "{ran}");
    let lines = ran.lines();
    assert_eq!(lines.len(), 3, "{ran}");
    let (added, dropped, renewed) = (&lines[0], &lines[1], &lines[2]);
    assert!(
        added.starts_with("+ cert new.test,www.new.test (not after ")
            && added.contains("2096-06-01T00:00:00"),
        "{ran}"
    );
    assert_eq!(dropped, "- cert gone.test", "{ran}");
    assert!(
        renewed.starts_with(&format!(
            "~ cert a.test (not after {running_a} -> 2095-01-01T00:00:00"
        )),
        "{ran}"
    );
    assert!(renewed.ends_with(')'), "{ran}");
    assert!(!ran.out().contains("same.test"), "{ran}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_worker_count_is_flagged_as_needing_a_restart() {
    let pki = Pki::new();
    let proxy = Proxy::start_in(site(&pki, &["a.test"]), &config_yaml("", ROUTES)).await;

    let next = candidate(&proxy, "next.yaml", &config_yaml("workers: 2", ROUTES));
    let ran = run_beside(diff(&next, &admin_url(&proxy))).await;
    assert_eq!(ran.code, Some(0), "{ran}");
    assert_eq!(ran.out(), "! workers needs a restart\n", "{ran}");

    // With a route change as well: the restart line sorts first.
    let more = format!("{ROUTES}  - {{name: extra, host: a.test, path: /extra, respond: {{}}}}\n");
    let next = candidate(&proxy, "more.yaml", &config_yaml("workers: 2", &more));
    let ran = run_beside(diff(&next, &admin_url(&proxy))).await;
    assert_eq!(ran.code, Some(0), "{ran}");
    assert_eq!(
        ran.lines(),
        [
            "! workers needs a restart",
            "+ route a.test /extra -> respond 200"
        ],
        "{ran}"
    );
}

#[test]
fn a_broken_config_exits_1_asking_nobody_and_an_instance_out_of_reach_exits_2() {
    let pki = Pki::new();
    let dir = site(&pki, &["a.test"]);
    let good = dir.path().join("proxy.yaml");
    std::fs::write(&good, config_yaml("", ROUTES)).unwrap();
    let broken = dir.path().join("next.yaml");
    std::fs::write(
        &broken,
        config_yaml(
            "",
            "  - {name: home, host: a.test, respond: {}, timeuot: 5s}\n",
        ),
    )
    .unwrap();

    // A listener nobody serves: a connection to it would wait in its backlog.
    let witness = TcpListener::bind("127.0.0.1:0").unwrap();
    witness.set_nonblocking(true).unwrap();
    let ran = run(diff(
        &broken,
        &format!("http://{}", witness.local_addr().unwrap()),
    ));
    assert_eq!(ran.code, Some(1), "{ran}");
    assert!(ran.stdout.is_empty(), "{ran}");
    assert!(
        ran.stderr.contains("next.yaml") && ran.stderr.contains("timeuot"),
        "the error names the file and what is wrong: {ran}"
    );
    assert!(!ran.stderr.contains(": OK ("), "{ran}");
    assert_eq!(
        witness.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "nothing was fetched for a config that failed its check"
    );

    // Nobody listens there any more.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let ran = run(diff(&good, &format!("http://127.0.0.1:{port}")));
    assert_eq!(ran.code, Some(2), "{ran}");
    assert!(ran.stdout.is_empty(), "{ran}");
    assert!(
        ran.stderr.contains("error") && ran.stderr.contains(&format!("127.0.0.1:{port}")),
        "the error names the instance: {ran}"
    );
    assert!(
        ran.stderr.contains("proxy.yaml: OK ("),
        "the check itself passed: {ran}"
    );

    // The admin listener speaks plain HTTP only.
    let ran = run(diff(&good, &format!("https://127.0.0.1:{port}")));
    assert_eq!(ran.code, Some(2), "{ran}");
    assert!(ran.stdout.is_empty(), "{ran}");
    assert!(ran.stderr.contains("http://"), "says what to give: {ran}");
}

/// Writes a secret file readable by its owner only.
fn write_secret(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap();
    set_mode(path, 0o600);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_behind_a_token_is_diffed_only_with_its_token() {
    let pki = Pki::new();
    let dir = site(&pki, &["a.test"]);
    let token = dir.path().join("admin-token");
    write_secret(&token, "s3cret-one\n");
    let yaml = format!(
        "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  admin_token_file: ./admin-token\ntls:\n  cert_dirs: [\"./certs\"]\nroutes:\n{ROUTES}"
    );
    let proxy = Proxy::start_in(dir, &yaml).await;
    let url = admin_url(&proxy);

    let ran = run_beside(diff(&proxy.config_path, &url)).await;
    assert_eq!(ran.code, Some(2), "no token: {ran}");
    assert!(ran.stdout.is_empty(), "{ran}");
    assert!(
        ran.stderr.contains("401") && ran.stderr.contains("token"),
        "{ran}"
    );

    let mut wrong = diff(&proxy.config_path, &url);
    wrong.env("LIMEN_ADMIN_TOKEN", "s3cret-two");
    let ran = run_beside(wrong).await;
    assert_eq!(ran.code, Some(2), "a wrong token: {ran}");
    assert!(ran.stdout.is_empty(), "{ran}");
    assert!(ran.stderr.contains("401"), "{ran}");

    let mut right = diff(&proxy.config_path, &url);
    right.env("LIMEN_ADMIN_TOKEN", "s3cret-one");
    let ran = run_beside(right).await;
    assert_eq!(ran.code, Some(0), "the token from the environment: {ran}");
    assert_eq!(ran.out(), "no changes\n", "{ran}");

    // From the instance's own token file, trailing newline and all.
    let mut from_file = diff(&proxy.config_path, &url);
    from_file.arg("--admin-token-file").arg(&token);
    let ran = run_beside(from_file).await;
    assert_eq!(ran.code, Some(0), "the token from a file: {ran}");
    assert_eq!(ran.out(), "no changes\n", "{ran}");

    let missing = proxy.path("no-such-token");
    let mut unreadable = diff(&proxy.config_path, &url);
    unreadable.arg("--admin-token-file").arg(&missing);
    let ran = run_beside(unreadable).await;
    assert_eq!(ran.code, Some(2), "{ran}");
    assert!(ran.stdout.is_empty(), "{ran}");
    assert!(ran.stderr.contains("no-such-token"), "{ran}");
}

/// A server on 127.0.0.1 that answers every request head with `answer` and closes; returns its
/// URL and the heads it received.
fn hostile(answer: Vec<u8>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { continue };
            let (answer, seen) = (answer.clone(), seen.clone());
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = tcp.write_all(&answer);
            });
        }
    });
    (url, heads)
}

fn http_answer(status_line: &[u8], extra_headers: &[u8], body: &[u8]) -> Vec<u8> {
    let mut a = status_line.to_vec();
    a.extend_from_slice(b"\r\nContent-Type: application/json\r\n");
    a.extend_from_slice(extra_headers);
    a.extend_from_slice(
        format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    a.extend_from_slice(body);
    a
}

#[test]
fn a_hostile_instance_can_neither_crash_the_diff_nor_reach_the_terminal() {
    let pki = Pki::new();
    let dir = site(&pki, &["a.test"]);
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, config_yaml("", ROUTES)).unwrap();

    // Valid JSON: escape sequences spelled as JSON escapes, and garbage where entries belong.
    let shaped = br#"{"routes": [1, null, "x", [], {"host": 5, "path": "/"},
        {"host": "\u001b[31mevil.test", "path": "/\u001b[2J", "upstreams": ["\u001b[0m"]},
        {"host": "a.test", "path": "/", "name": "\u001b]0;pwned\u0007", "respond": "\u001b[5m",
         "upstreams": [null, 7, {"x": "\u001b"}], "timeout_ms": "\u001b[31m\r\n"}],
      "certs": [null, 3, {"names": ["\u001b[31mcert.test", 9]}, {"names": "a.test"}],
      "workers": "\u001b[31m"}"#;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage entries",
            http_answer(b"HTTP/1.1 200 OK", b"", shaped),
        ),
        (
            "raw escapes in the JSON",
            http_answer(
                b"HTTP/1.1 200 OK",
                b"",
                b"{\"routes\": [{\"host\": \"\x1b[31mraw.test\", \"path\": \"/\"}]}",
            ),
        ),
        (
            "escapes in the head",
            http_answer(
                b"HTTP/1.1 200 \x1b[31mOK",
                b"X-Evil: \x1b[2J\r\n",
                b"[1, null]",
            ),
        ),
        ("a JSON null", http_answer(b"HTTP/1.1 200 OK", b"", b"null")),
        (
            "not JSON",
            http_answer(b"HTTP/1.1 200 OK", b"", b"\x1b[31m<html>\x1b[0m"),
        ),
        (
            "an error page",
            http_answer(b"HTTP/1.1 500 Internal Server Error", b"", b"\x1b[31mboom"),
        ),
    ];
    for (what, answer) in cases {
        let (url, heads) = hostile(answer);
        let ran = run(diff(&config, &url));
        assert!(
            matches!(ran.code, Some(0) | Some(2)),
            "{what}: exits 0 or 2: {ran}"
        );
        assert!(!ran.stderr.contains("panicked"), "{what}: {ran}");
        assert!(
            !ran.stdout.contains(&0x1b),
            "{what}: no ESC reaches stdout: {:?}",
            ran.out()
        );
        for line in ran.lines() {
            assert!(
                !line.chars().any(char::is_control),
                "{what}: no control character in {line:?}"
            );
        }
        assert!(
            !ran.stderr.as_bytes().contains(&0x1b),
            "{what}: nor stderr: {:?}",
            ran.stderr
        );
        let heads = heads.lock().unwrap();
        assert!(
            heads
                .first()
                .is_some_and(|h| h.starts_with("GET ") && h.contains("/status.json HTTP/1.1")),
            "{what}: the binary asked for /status.json: {heads:?}"
        );
        if what == "garbage entries" && ran.code == Some(0) {
            assert!(
                ran.out().contains("evil.test"),
                "the hostile route is shown, neutralised: {ran}"
            );
        }
    }
}

/// The running config of `every_setting_changed_alone_names_itself`: one of each kind of key.
const RICH: &str = concat!(
    "listen:\n",
    "  https: \"127.0.0.1:0\"\n",
    "  admin: \"127.0.0.1:0\"\n",
    "tls:\n",
    "  cert_dirs: [\"./certs\"]\n",
    "  ticket_keys: ./ticket-keys\n",
    "  client_auth:\n",
    "    - {hosts: [a.test], ca: ./clients-ca.pem, mode: require}\n",
    "reload:\n",
    "  interval: 5s\n",
    "routes:\n",
    "  - {name: home, host: a.test, respond: {}}\n",
    "  - {name: api, host: a.test, path: /api, upstreams: [\"http://127.0.0.1:9\"], timeout: 10s}\n",
);

#[tokio::test(flavor = "multi_thread")]
async fn every_setting_changed_alone_names_itself_and_secrets_never_show() {
    use base64::Engine;
    let key = |seed: u8| base64::engine::general_purpose::STANDARD.encode([seed; 80]);
    let pki = Pki::new();
    let dir = site(&pki, &["a.test"]);
    write_secret(&dir.path().join("ticket-keys"), &key(1));
    write_secret(&dir.path().join("ticket-keys-next"), &key(2));
    std::fs::write(dir.path().join("clients-ca.pem"), &Pki::new().ca_pem).unwrap();
    let proxy = Proxy::start_in(dir, RICH).await;
    let url = admin_url(&proxy);

    // The instance reports its settings as the candidate renders them.
    let st = status_json(&proxy).await;
    assert_eq!(st["settings"]["tls.ticket_keys"], "./ticket-keys", "{st}");
    assert_eq!(st["settings"]["timeouts.idle"], "1m", "{st}");
    let ran = run_beside(diff(&proxy.config_path, &url)).await;
    assert_eq!(ran.out(), "no changes\n", "{ran}");

    let listen = "  admin: \"127.0.0.1:0\"\n";
    let tls = "  ticket_keys: ./ticket-keys\n";
    let top = "reload:\n";
    let cases: Vec<(&str, &str, String, Vec<&str>)> = vec![
        (
            "listen.https",
            "  https: \"127.0.0.1:0\"\n",
            "  https: \"127.0.0.1:1\"\n".into(),
            vec!["~ listen.https: 127.0.0.1:0 -> 127.0.0.1:1 [new connections only]"],
        ),
        (
            "listen.http",
            listen,
            format!("{listen}  http: \"127.0.0.1:0\"\n"),
            vec!["+ listen.http: 127.0.0.1:0 [new connections only]"],
        ),
        (
            "listen.admin",
            listen,
            "  admin: \"127.0.0.1:1\"\n".into(),
            vec!["~ listen.admin: 127.0.0.1:0 -> 127.0.0.1:1 [new connections only]"],
        ),
        (
            "listen.proxy_protocol",
            listen,
            format!("{listen}  proxy_protocol: {{from: [10.0.0.0/8]}}\n"),
            vec!["+ listen.proxy_protocol.from: [10.0.0.0/8] [new connections only]"],
        ),
        (
            "limits",
            top,
            format!("limits: {{max_connections: 500}}\n{top}"),
            vec!["~ limits.max_connections: 10000 -> 500 [new connections only]"],
        ),
        (
            "timeouts",
            top,
            format!("timeouts: {{idle: 30s, upstream_response: 90s}}\n{top}"),
            vec![
                "~ timeouts.idle: 1m -> 30s [new connections only]",
                "~ timeouts.upstream_response: 1m -> 90s",
            ],
        ),
        (
            "tls.min_version",
            tls,
            format!("  min_version: \"1.3\"\n{tls}"),
            vec!["~ tls.min_version: 1.2 -> 1.3 [new connections only]"],
        ),
        (
            "tls.client_auth",
            "mode: require",
            "mode: optional".into(),
            vec!["~ tls.client_auth[a.test].mode: require -> optional [new connections only]"],
        ),
        (
            "tls.ticket_keys",
            tls,
            "  ticket_keys: ./ticket-keys-next\n".into(),
            vec!["~ tls.ticket_keys: ./ticket-keys -> ./ticket-keys-next [new connections only]"],
        ),
        (
            "reload.interval",
            "interval: 5s",
            "interval: 250ms".into(),
            vec!["~ reload.interval: 5s -> 250ms"],
        ),
        (
            "trusted_proxies",
            top,
            format!("trusted_proxies: [10.0.0.1, \"fd00::/8\"]\n{top}"),
            vec!["~ trusted_proxies: [] -> [10.0.0.1, fd00::/8]"],
        ),
        (
            "access_log",
            top,
            format!("access_log: false\n{top}"),
            vec!["~ access_log: true -> false"],
        ),
        (
            "a route's options",
            "timeout: 10s}",
            "timeout: 5s, retry: {attempts: 2, on: [connect_failure, 503]}}".into(),
            vec![
                "~ route a.test /api: retry.attempts (1 -> 2)",
                "~ route a.test /api: retry.on ([connect_failure] -> [connect_failure, 503])",
                "~ route a.test /api: timeout (10s -> 5s)",
            ],
        ),
    ];
    for (i, (what, from, to, want)) in cases.iter().enumerate() {
        assert!(RICH.contains(from), "{what}: {from:?}");
        let yaml = RICH.replacen(from, to, 1);
        let path = candidate(&proxy, &format!("next-{i}.yaml"), &yaml);
        let ran = run_beside(diff(&path, &url)).await;
        assert_eq!(ran.code, Some(0), "{what}: {ran}");
        assert_eq!(&ran.lines(), want, "{what}: {ran}");
        for line in ran.lines() {
            assert!(
                !line.contains('{') && !line.contains("Some(") && !line.contains("Duration"),
                "{what}: no Debug syntax in {line:?}"
            );
        }
        for k in [key(1), key(2)] {
            assert!(!ran.out().contains(&k[..16]), "{what}: key material: {ran}");
        }
    }

    // The same file names, new content: the keys in a checked-out copy were rotated. The
    // instance reports only a fingerprint of its keys, and the line says `(changed)`.
    assert!(st["secrets"]["tls.ticket_keys"].is_string(), "{st}");
    let next = proxy.path("next");
    std::fs::create_dir(&next).unwrap();
    for f in ["certs/site.crt", "certs/site.key", "clients-ca.pem"] {
        std::fs::create_dir_all(next.join(f).parent().unwrap()).unwrap();
        std::fs::copy(proxy.path(f), next.join(f)).unwrap();
    }
    write_secret(&next.join("ticket-keys"), &key(3));
    let path = next.join("proxy.yaml");
    std::fs::write(&path, RICH).unwrap();
    let ran = run_beside(diff(&path, &url)).await;
    assert_eq!(
        ran.lines(),
        ["~ tls.ticket_keys: (changed) [new connections only]"],
        "{ran}"
    );
    for k in [key(1), key(3)] {
        assert!(!ran.out().contains(&k[..16]), "key material: {ran}");
    }
    let shown = st["secrets"].to_string();
    assert!(!shown.contains(&key(1)[..16]), "{shown}");
    assert_eq!(proxy.generation(), 1, "nothing was applied");
}
