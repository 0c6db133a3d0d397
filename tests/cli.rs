//! A user runs the `limen` binary: `--check` tells what is wrong and where, a bad config never
//! starts, and SIGTERM drains in-flight requests before exiting 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::check_config as check;
use common::*;
use http::StatusCode;

fn limen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_limen"))
}

#[test]
fn check_accepts_the_example_config() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.example.yaml");
    let (code, text) = check(&example);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("OK"), "{text}");
}

#[test]
fn check_reports_each_problem_with_file_line_and_column() {
    let dir = Proxy::dir();
    let path = dir.path().join("proxy.yaml");
    let cases = [
        // (config, what the message must contain)
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    upstreams: [\"http://127.0.0.1:1\"]\n    timeuot: 5s\n", "timeuot"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    upstreams: [\"ftp://127.0.0.1:1\"]\n", "http://"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\ntimeouts:\n  idle: 5 seconds\n", "unit"),
        ("listen: {https: \"127.0.0.1:0\"\ntls: {self_signed: true}\n", "proxy.yaml"),
        // Balancing, health and retries (issue 10).
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    upstreams: [{url: \"http://127.0.0.1:1\", weight: 5000}]\n", "from 1 to 1000"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    upstreams: [\"http://127.0.0.1:1\"]\n    health: {expect_status: \"20x\"}\n", "expect_status"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    upstreams: [\"http://127.0.0.1:1\"]\n    health: {kind: grpc}\n", "h2c://"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    upstreams: [\"http://127.0.0.1:1\"]\n    retry: {on: [connect_failure, 500]}\n", "retry.on"),
        // Client certificate policies (issue 11).
        ("listen: {https: \"127.0.0.1:0\"}\ntls:\n  self_signed: true\n  client_auth:\n    - {hosts: [a.test], ca: ./ca.pem}\n    - {hosts: [a.test], ca: ./ca.pem}\n", "already has a policy"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls:\n  self_signed: true\n  client_auth:\n    - {hosts: [a.test], ca: ./ca.pem, mode: sometimes}\n", "use require"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls:\n  self_signed: true\n  client_auth:\n    - {hosts: [\"10.0.0.5\"], ca: ./ca.pem}\n", "IP address"),
        // Per-route headers (issue 11): framing fields are limen's.
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    upstreams: [\"http://127.0.0.1:1\"]\n    headers: {request: {set: {content-length: \"5\"}}}\n", "framing header"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    upstreams: [\"http://127.0.0.1:1\"]\n    headers: {response: {remove: [\"bad name\"]}}\n", "not a valid header name"),
        // Who may reach a route (issue 23).
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    respond: {}\n    access: {allow: [\"10.0.0.0/33\"]}\n", "CIDR"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    respond: {}\n    access: {allow: []}\n", "admits no one"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    respond: {}\n    rate_limit: {rate: 100/d}\n", "100/s"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    respond: {}\n    rate_limit: {rate: 1/s, key: ip}\n", "header:NAME"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    respond: {}\n    auth: {basic: {users_file: ./u}, forward: {url: \"http://a:1/\"}}\n", "not both"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    respond: {}\n    auth: {forward: {url: \"ftp://a/check\"}}\n", "http://"),
        // Redirects (issue 24).
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    redirect: {to: \"//evil.test{path}\"}\n", "another host"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    redirect: {to: \"/x\", status: 200}\n", "301, 302"),
        ("listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    respond: {}\n    redirect: {to: \"/x\"}\n", "keep one"),
    ];
    for (yaml, needle) in cases {
        std::fs::write(&path, yaml).unwrap();
        let (code, text) = check(&path);
        assert_eq!(code, 1, "{yaml}\n{text}");
        assert!(
            text.contains(needle),
            "message should mention {needle:?}:\n{text}"
        );
        assert!(
            text.contains("proxy.yaml"),
            "message should name the file:\n{text}"
        );
        let has_line_col = text.lines().any(|l| {
            l.split_once("proxy.yaml:").is_some_and(|(_, rest)| {
                let mut it = rest.splitn(3, ':');
                let line = it.next().is_some_and(|n| n.parse::<u32>().is_ok());
                let col = it.next().is_some_and(|n| n.parse::<u32>().is_ok());
                line && col
            })
        });
        assert!(has_line_col, "message should give line:column:\n{text}");
    }
}

/// A users file with a weak hash fails `--check`, naming the file and the line, never the hash.
#[test]
fn check_refuses_a_users_file_with_a_weak_hash_by_file_and_line() {
    let dir = Proxy::dir();
    let users = dir.path().join("admin.htpasswd");
    std::fs::write(
        &users,
        "# admins\nalice:$apr1$q8VDpV2X$8r8QX1lQvQ7s4lT2bFq4a/\n",
    )
    .unwrap();
    set_mode(&users, 0o600);
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        "listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: a.test\n    respond: {}\n    auth: {basic: {users_file: ./admin.htpasswd}}\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("admin.htpasswd") && text.contains("line 2") && text.contains("MD5"),
        "{text}"
    );
    assert!(!text.contains("q8VDpV2X"), "the hash is not shown: {text}");
    std::fs::write(&users, format!("alice:{}\n", bcrypt::hash("x", 4).unwrap())).unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn check_reports_a_broken_certificate_by_file() {
    let pki = Pki::new();
    let dir = Proxy::dir();
    let certs = dir.path().join("certs");
    let issued = pki.issue(&["a.test"]);
    let (crt, _) = issued.write(&certs, "a");
    let pem = issued.cert_pem;
    std::fs::write(&crt, &pem[..pem.len() / 2]).unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config_yaml("", "  - {host: a.test, respond: {}}\n")).unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("a.crt"), "{text}");

    // Fixed: OK.
    pki.issue(&["a.test"]).write(&certs, "a");
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn a_bad_config_at_start_exits_1_without_serving() {
    let dir = Proxy::dir();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, "listen: {https: \"127.0.0.1:0\"}\nrouts: []\n").unwrap();
    let out = limen().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("routs"), "{err}");
}

/// A limen process; killed if the test ends early.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary and waits for its "serving" log line; returns the https and admin addresses.
fn spawn(path: &std::path::Path) -> (Process, std::net::SocketAddr, std::net::SocketAddr) {
    let mut cmd = limen();
    cmd.arg("--config")
        .arg(path)
        .arg("--log-format")
        .arg("json");
    let (p, https, admin, _) = spawn_command(cmd);
    (p, https, admin)
}

/// Starts `cmd` (limen with JSON logs, perhaps behind a shell) and waits for its "serving" line;
/// also returns the log lines before it.
fn spawn_command(
    cmd: Command,
) -> (
    Process,
    std::net::SocketAddr,
    std::net::SocketAddr,
    Vec<String>,
) {
    let (p, https, admin, before, _) = spawn_logging(cmd);
    (p, https, admin, before)
}

/// `spawn_command` (JSON or text logs), and the log lines that come after the "serving" line.
fn spawn_logging(
    mut cmd: Command,
) -> (
    Process,
    std::net::SocketAddr,
    std::net::SocketAddr,
    Vec<String>,
    std::sync::mpsc::Receiver<String>,
) {
    let mut process = Process(
        cmd.stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stderr = process.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                // keep draining so the child never blocks on a full pipe
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut before = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("limen did not report that it is serving");
        if line.contains("limen is serving") {
            let https = serving_addr(&line, "https");
            let admin = serving_addr(&line, "admin");
            return (process, https, admin, before, rx);
        }
        before.push(line);
    }
}

async fn admin_status(admin: std::net::SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn sigterm_turns_unready_then_lets_in_flight_requests_finish_and_exits_0() {
    let pki = Pki::new();
    let backend = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&["app.test"])
        .write(&dir.path().join("certs"), "app");
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        format!(
            "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\ntls: {{cert_dirs: [./certs]}}\ntimeouts:\n  shutdown_delay: 700ms\n  shutdown_grace: 10s\nroutes:\n  - {{host: \"*\", upstreams: [\"{}\"]}}\n",
            backend.url()
        ),
    )
    .unwrap();
    let (mut process, https, admin) = spawn(&path);
    assert_eq!(admin_status(admin, "/readyz").await, Some(200));
    assert_eq!(admin_status(admin, "/healthz").await, Some(200));

    let client = Client::new(&pki);
    let mut conn = client.open(https, "app.test", Proto::H1).await;
    let slow = tokio::spawn(async move { conn.get("app.test", "/sleep/2000").await });
    eventually(
        Duration::from_secs(5),
        "the slow request reached the backend",
        || {
            let n = backend.requests.load(Ordering::Relaxed);
            async move { n == 1 }
        },
    )
    .await;

    let pid = process.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    eventually(
        Duration::from_secs(2),
        "readyz turns 503 at once",
        || async { admin_status(admin, "/readyz").await == Some(503) },
    )
    .await;
    // Within shutdown_delay, new connections are still accepted.
    assert_eq!(
        client.get(https, "app.test", "/").await.status,
        StatusCode::OK
    );

    let got = slow.await.unwrap().unwrap();
    assert_eq!(got.status, StatusCode::OK, "the in-flight request finished");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = process.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "limen did not exit after draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    assert!(
        tokio::net::TcpStream::connect(https).await.is_err(),
        "the listener is closed"
    );
}

#[test]
fn check_refuses_an_oversized_config_a_fifo_and_an_encrypted_key_saying_why() {
    let dir = Proxy::dir();
    let path = dir.path().join("proxy.yaml");

    let mut big = config_yaml("", "  - {host: a.test, respond: {}}\n");
    big.push('#');
    big.push_str(&"x".repeat(5 * 1024 * 1024));
    std::fs::write(&path, &big).unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("4194304-byte limit"), "{text}");

    std::fs::remove_file(&path).unwrap();
    assert!(Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap()
        .success());
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("FIFO"), "{text}");
    std::fs::remove_file(&path).unwrap();

    let pki = Pki::new();
    let certs = dir.path().join("certs");
    let (_, key) = pki.issue(&["a.test"]).write(&certs, "a");
    std::fs::write(
        &key,
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::write(&path, config_yaml("", "  - {host: a.test, respond: {}}\n")).unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("a.key") && text.contains("encrypted"),
        "{text}"
    );
}

#[tokio::test]
async fn with_few_descriptors_new_clients_are_refused_first_and_those_inside_reach_upstreams() {
    let pki = Pki::new();
    let backend = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&["app.test"])
        .write(&dir.path().join("certs"), "app");
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config_yaml("", &route_all_to(&backend))).unwrap();
    // Hard limit 100, soft 50: limen raises the soft limit to 100, and fits its connection
    // limit (10000 by default) into (100 - 64) / 2 = 18.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -Sn 50 && ulimit -Hn 100 && exec \"$0\" --config \"$1\" --log-format json")
        .arg(env!("CARGO_BIN_EXE_limen"))
        .arg(&path);
    let (process, https, _, logs) = spawn_command(cmd);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", process.0.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().nth(3),
        Some("100"),
        "the soft limit was raised to the hard one: {open_files}"
    );
    let warned = logs
        .iter()
        .find(|l| l.contains("max_connections") && l.contains("WARN"))
        .unwrap_or_else(|| panic!("no warning about the cap: {logs:?}"));
    assert!(warned.contains("\"using\":18"), "{warned}");

    let client = Client::new(&pki);
    let mut inside = Vec::new();
    for i in 0..18 {
        let mut conn = client.open(https, "app.test", Proto::H1).await;
        let got = conn.get("app.test", "/").await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "connection {i}");
        inside.push(conn);
    }
    // The 19th is refused at accept: its handshake never completes.
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        let tls = client.connect(https, "app.test", Proto::H1).await;
        match tls {
            Err(_) => true,
            Ok(mut tls) => {
                use tokio::io::AsyncReadExt;
                let mut b = [0u8; 1];
                matches!(tls.read(&mut b).await, Ok(0) | Err(_))
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(refused, "a connection over the fitted limit is refused");
    // Those inside still reach the upstream, all at once (one upstream connection each).
    let answers = futures_util::future::join_all(
        inside
            .iter_mut()
            .map(|conn| conn.get("app.test", "/sleep/200")),
    )
    .await;
    for got in answers {
        assert_eq!(got.unwrap().status, StatusCode::OK);
    }
    // One HTTP/2 client with 100 streams in flight would need 100 upstream connections, more
    // than the process may open: they share the upstream budget ((100 - 64) - 18 = 18 places),
    // waiting for a place instead of failing for want of descriptors.
    drop(inside);
    let deadline = Instant::now() + Duration::from_secs(10);
    let tls = loop {
        // limen frees the closed connections' places a moment after the client drops them.
        if let Ok(tls) = client.connect(https, "app.test", Proto::H2).await {
            break tls;
        }
        assert!(
            Instant::now() < deadline,
            "no place came free after the clients left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let h2 = Conn::H2(send);
    let answers = futures_util::future::join_all((0..100).map(|_| {
        let req = h2.request("GET", "app.test", "/sleep/100", body(""));
        let mut conn = match &h2 {
            Conn::H2(s) => Conn::H2(s.clone()),
            Conn::H1(_) => unreachable!(),
        };
        async move { conn.fetch(req).await }
    }))
    .await;
    let statuses: Vec<u16> = answers
        .into_iter()
        .map(|r| r.map_or(0, |g| g.status.as_u16()))
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    drop(process);
}

#[tokio::test]
async fn the_access_log_names_the_client_the_proxy_protocol_header_gave() {
    let pki = Pki::new();
    let dir = Proxy::dir();
    pki.issue(&["app.test"])
        .write(&dir.path().join("certs"), "app");
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  proxy_protocol: {from: [\"127.0.0.2\"]}\ntls: {cert_dirs: [./certs]}\nroutes:\n  - {host: \"*\", respond: {}}\n",
    )
    .unwrap();
    let mut cmd = limen();
    cmd.arg("--config")
        .arg(&path)
        .arg("--log-format")
        .arg("json");
    let (_p, https, _, _, logs) = spawn_logging(cmd);
    let client = Client::new(&pki);
    let mut via_lb = client
        .open_after(
            "127.0.0.2".parse().unwrap(),
            https,
            "app.test",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n",
        )
        .await
        .unwrap();
    assert_eq!(
        via_lb.get("app.test", "/lb").await.unwrap().status,
        StatusCode::OK
    );
    let mut direct = client
        .open_after("127.0.0.1".parse().unwrap(), https, "app.test", b"")
        .await
        .unwrap();
    assert_eq!(
        direct.get("app.test", "/direct").await.unwrap().status,
        StatusCode::OK
    );
    let mut clients = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while clients.len() < 2 {
        let line = logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("two access log lines");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["target"] == "limen::access" {
            let f = &v["fields"];
            clients.insert(
                f["path"].as_str().unwrap().to_string(),
                f["client"].as_str().unwrap().to_string(),
            );
        }
    }
    assert_eq!(clients["/lb"], "203.0.113.7:51234");
    assert!(clients["/direct"].starts_with("127.0.0.1:"), "{clients:?}");
}

/// Warnings about standing conditions are said when the condition appears or changes, not
/// again at every publish: `limits.max_connections` over the open-file limit, a route host no
/// certificate covers, a `workers` change waiting for a restart.
#[tokio::test]
async fn standing_warnings_are_logged_once_per_distinct_value_not_at_every_reload() {
    let pki = Pki::new();
    let dir = Proxy::dir();
    pki.issue(&["app.test"])
        .write(&dir.path().join("certs"), "app");
    let path = dir.path().join("proxy.yaml");
    // `bare.test` has a route and no certificate.
    let yaml = |limits: &str, body: &str| {
        config_yaml(
            &format!("reload: {{interval: 50ms}}\n{limits}"),
            &format!("  - {{host: \"*\", respond: {{status: 200, body: \"{body}\"}}}}\n  - {{host: bare.test, respond: {{}}}}\n"),
        )
    };
    std::fs::write(&path, yaml("", "v0")).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -Sn 50 && ulimit -Hn 100 && exec \"$0\" --config \"$1\" --log-format json")
        .arg(env!("CARGO_BIN_EXE_limen"))
        .arg(&path);
    let (_process, https, _, before, after) = spawn_logging(cmd);
    let client = Client::new(&pki);
    let served = |body: String| {
        let client = client.clone();
        async move { client.get(https, "app.test", "/").await.text() == body }
    };
    // Ten reloads that each publish a new snapshot, the limits unchanged; from the third on,
    // another worker count.
    for i in 1..=10 {
        let workers = if i >= 3 { "workers: 1\n" } else { "" };
        write_atomic(&path, &yaml(workers, &format!("v{i}")));
        eventually(Duration::from_secs(10), "the edit is served", || {
            served(format!("v{i}"))
        })
        .await;
    }
    // Then another max_connections, still over the limit: a new value, said once more.
    write_atomic(
        &path,
        &yaml("workers: 1\nlimits: {max_connections: 5000}\n", "v11"),
    );
    eventually(Duration::from_secs(10), "the edit is served", || {
        served("v11".into())
    })
    .await;
    write_atomic(
        &path,
        &yaml("workers: 1\nlimits: {max_connections: 5000}\n", "v12"),
    );
    eventually(Duration::from_secs(10), "the edit is served", || {
        served("v12".into())
    })
    .await;
    // Every line so far, then whatever the log pipe still holds a moment later: one warning at
    // start, one for the new value, none for the twelve reloads.
    let mut lines: Vec<String> = before;
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Ok(line) = after.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        lines.push(line);
    }
    let said = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
    assert_eq!(said("does not fit the open-file limit"), 2, "{lines:#?}");
    assert_eq!(said("no certificate covers route host"), 1, "{lines:#?}");
    assert_eq!(said("takes effect at the next restart"), 1, "{lines:#?}");
}

/// The request id and a `traceparent`'s trace id are in the access log line, text and JSON, and
/// in limen's own warnings about that request (through the request's span).
#[tokio::test]
async fn the_request_id_and_trace_id_are_in_the_access_log_and_the_requests_warnings() {
    let pki = Pki::new();
    let dir = Proxy::dir();
    pki.issue(&["app.test"])
        .write(&dir.path().join("certs"), "app");
    let (dead, _hold) = refused_port();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        config_yaml(
            "",
            &format!("  - {{host: \"*\", path: /dead, upstreams: [\"http://{dead}\"]}}\n  - {{host: \"*\", respond: {{}}}}\n"),
        ),
    )
    .unwrap();
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{TRACE}-00f067aa0ba902b7-01");
    for format in ["json", "text"] {
        let mut cmd = limen();
        cmd.arg("--config")
            .arg(&path)
            .arg("--log-format")
            .arg(format);
        let (_p, https, _, _, logs) = spawn_logging(cmd);
        let client = Client::new(&pki);
        let mut ids = Vec::new();
        for target in ["/ok", "/dead"] {
            let mut conn = client.open(https, "app.test", Proto::H1).await;
            let mut req = conn.request("GET", "app.test", target, body(""));
            req.headers_mut()
                .insert("traceparent", traceparent.parse().unwrap());
            let got = conn.fetch(req).await.unwrap();
            ids.push(got.headers["x-request-id"].to_str().unwrap().to_owned());
        }
        // The lines of both requests, then a moment for the pipe.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = Vec::new();
        while !ids.iter().all(|id| {
            lines
                .iter()
                .any(|l: &String| l.contains("limen::access") && l.contains(id.as_str()))
        }) {
            match logs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => lines.push(l),
                Err(_) => panic!("{format}: no access line for {ids:?}: {lines:#?}"),
            }
        }
        for id in &ids {
            let access = lines
                .iter()
                .find(|l| l.contains("limen::access") && l.contains(id.as_str()))
                .unwrap();
            if format == "json" {
                let v: serde_json::Value = serde_json::from_str(access).unwrap();
                assert_eq!(v["fields"]["request_id"], id.as_str());
                assert_eq!(v["fields"]["trace_id"], TRACE);
                assert_eq!(v["fields"]["proto"], "h1");
            } else {
                // Quoted and escaped, as every string field that may come from a client.
                assert!(access.contains(&format!("request_id=\"{id}\"")), "{access}");
                assert!(
                    access.contains(&format!("trace_id=\"{TRACE}\"")),
                    "{access}"
                );
                assert!(access.contains("proto=\"h1\""), "{access}");
            }
        }
        // The failed try's warning names the request it belongs to.
        let warned = lines
            .iter()
            .find(|l| l.contains("upstream try failed"))
            .unwrap_or_else(|| panic!("{format}: no warning: {lines:#?}"));
        assert!(warned.contains(ids[1].as_str()), "{format}: {warned}");
    }
}

/// The address of `field` in the "serving" line: `field=ADDR` in text logs, `"field":"ADDR"` in
/// JSON ones.
fn serving_addr(line: &str, field: &str) -> std::net::SocketAddr {
    let rest = [format!("{field}="), format!("\"{field}\":\"")]
        .iter()
        .find_map(|p| line.find(p.as_str()).map(|at| &line[at + p.len()..]))
        .expect("the serving line names the address");
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    addr.parse().unwrap()
}
