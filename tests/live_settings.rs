//! Nothing but `workers` waits for a restart: an operator moves listeners, adds and removes them,
//! resizes the connection limit, shortens timeouts and limits, trusts a balancer or turns on the
//! PROXY protocol, all by editing the config, and limen follows without cutting anyone off.
//! Every new setting applies to new connections and new requests; what is already open keeps
//! going.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const HOST: &str = "app.test";
/// The reload interval (50 ms) plus a second, as tests/reload.rs gives a change to be seen.
const PATIENCE: Duration = Duration::from_millis(1050);
/// Anything limen should do at once gets this long at most.
const PROMPT: Duration = Duration::from_secs(10);
/// Any free port, chosen at bind.
const EPHEMERAL: &str = "127.0.0.1:0";
/// A route that answers `ok` by itself.
const ANSWER: &str = "  - {host: \"*\", respond: {body: ok}}\n";

// ---------------------------------------------------------------- listeners

#[tokio::test]
async fn the_https_listener_moves_and_requests_in_flight_on_the_old_address_finish() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let grace = "timeouts:\n  shutdown_grace: 10s";
    let at = |https: &str| {
        config(
            &listen(https, None, Some(EPHEMERAL)),
            grace,
            &route_all_to(&b),
        )
    };
    let proxy = start(&pki, &at(EPHEMERAL)).await;
    let client = Client::new(&pki);
    let (old, admin) = (proxy.addr, proxy.admin());
    assert_eq!(
        listeners(admin).await,
        Some(Listeners::at(old, None, Some(admin)))
    );

    // A slow request in flight on the old address, one per protocol.
    let mut pending = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(old, HOST, proto).await;
        pending.push((
            proto,
            tokio::spawn(async move {
                let got = conn.get(HOST, "/sleep/3000").await;
                (conn, got)
            }),
        ));
    }
    eventually(PROMPT, "both slow requests reached the backend", || async {
        b.requests.load(Ordering::SeqCst) == 2
    })
    .await;

    let new = free_addr();
    proxy.reconfigure(&at(&new.to_string()), PATIENCE).await;
    assert!(
        pending.iter().all(|(_, p)| !p.is_finished()),
        "the slow requests were still in flight when https moved"
    );
    eventually(PATIENCE, "status.json lists the new address", || async {
        listeners(admin).await == Some(Listeners::at(new, None, Some(admin)))
    })
    .await;
    assert_eq!(client.get(new, HOST, "/").await.status, StatusCode::OK);
    eventually(
        PATIENCE,
        "the old address turns new connections away",
        || async { refused(&client, old).await },
    )
    .await;

    for (proto, p) in pending {
        let (mut conn, got) = tokio::time::timeout(PROMPT, p)
            .await
            .unwrap_or_else(|_| panic!("{proto:?}: the in-flight request never ended"))
            .unwrap();
        let got = got.unwrap_or_else(|e| panic!("{proto:?}: the in-flight request was cut: {e}"));
        assert_eq!(got.status, StatusCode::OK, "{proto:?}");
        // Its connection belongs to a listener that is gone: closed once the request is done,
        // within shutdown_grace.
        assert!(
            closes_within(&mut conn, PROMPT).await,
            "{proto:?}: a connection of the removed listener stayed open"
        );
    }
    assert_eq!(client.get(new, HOST, "/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn an_http_listener_comes_and_goes_and_the_admin_listener_moves() {
    let pki = Pki::new();
    let proxy = start(
        &pki,
        &config(&listen(EPHEMERAL, None, Some(EPHEMERAL)), "", ANSWER),
    )
    .await;
    let client = Client::new(&pki);
    let (https, admin) = (proxy.addr, proxy.admin());
    assert_eq!(
        listeners(admin).await,
        Some(Listeners::at(https, None, Some(admin)))
    );

    // Added: it binds, and redirects to where https is.
    let http = free_addr();
    let with_http = listen(EPHEMERAL, Some(&http.to_string()), Some(EPHEMERAL));
    proxy
        .reconfigure(&config(&with_http, "", ANSWER), PATIENCE)
        .await;
    eventually(PATIENCE, "status.json lists the http listener", || async {
        listeners(admin).await == Some(Listeners::at(https, Some(http), Some(admin)))
    })
    .await;
    let (status, location) = plain_get(http, "/x?y=1")
        .await
        .expect("the added http listener answers");
    assert_eq!(status, 308);
    assert_eq!(location, format!("https://{HOST}:{}/x?y=1", https.port()));

    // Removed: it stops accepting.
    proxy
        .reconfigure(
            &config(&listen(EPHEMERAL, None, Some(EPHEMERAL)), "", ANSWER),
            PATIENCE,
        )
        .await;
    eventually(
        PATIENCE,
        "the removed http listener turns connections away",
        || async { plain_get(http, "/").await.is_none() },
    )
    .await;
    assert_eq!(
        listeners(admin).await,
        Some(Listeners::at(https, None, Some(admin)))
    );

    // The admin listener moved: status.json answers at the new address, and the old one closes.
    let new_admin = free_addr();
    proxy
        .reconfigure(
            &config(
                &listen(EPHEMERAL, None, Some(&new_admin.to_string())),
                "",
                ANSWER,
            ),
            PATIENCE,
        )
        .await;
    eventually(
        PATIENCE,
        "status.json answers at the new admin address",
        || async {
            listeners(new_admin).await == Some(Listeners::at(https, None, Some(new_admin)))
        },
    )
    .await;
    eventually(PATIENCE, "the old admin address is closed", || async {
        TcpStream::connect(admin).await.is_err()
    })
    .await;
    // https, never touched, served throughout.
    assert_eq!(client.get(https, HOST, "/").await.text(), "ok");
}

#[tokio::test]
async fn a_move_to_a_port_in_use_keeps_the_old_listener_and_refuses_the_whole_edit() {
    let pki = Pki::new();
    let answer = |body: &str| format!("  - {{host: \"*\", respond: {{body: {body}}}}}\n");
    let at =
        |https: &str, body: &str| config(&listen(https, None, Some(EPHEMERAL)), "", &answer(body));
    let proxy = start(&pki, &at(EPHEMERAL, "before")).await;
    let client = Client::new(&pki);
    let (https, admin) = (proxy.addr, proxy.admin());
    let generation = proxy.generation();

    // Another process holds the port this edit moves https to; the same edit changes a route.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().to_string();
    let failures = proxy.status().config.failures;
    write_atomic(&proxy.config_path, &at(&taken, "after"));
    eventually(PATIENCE, "the failed reload is reported", || async {
        proxy.status().config.failures > failures
    })
    .await;

    let st = proxy.status();
    assert!(!st.config.last_ok);
    let errors = st.config.errors.join("\n");
    assert!(errors.contains(&taken), "the error names {taken}: {errors}");
    let json = status_json(&proxy).await;
    let shown = json["reload"]["config"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(shown.contains(&taken), "status.json names {taken}: {json}");
    let (_, m) = admin_get(admin, "/metrics").await;
    assert_eq!(metric(&m, "limen_config_reload_successful"), Some(0.0));

    // Nothing of the edit applies: the old listener serves the old route.
    assert_eq!(proxy.generation(), generation);
    assert_eq!(client.get(https, HOST, "/").await.text(), "before");
    assert_eq!(
        listeners(admin).await,
        Some(Listeners::at(https, None, Some(admin)))
    );

    // The operator gives up the move and keeps the route change: applied.
    proxy.reconfigure(&at(EPHEMERAL, "after"), PATIENCE).await;
    assert_eq!(client.get(https, HOST, "/").await.text(), "after");
    let (_, m) = admin_get(admin, "/metrics").await;
    assert_eq!(metric(&m, "limen_config_reload_successful"), Some(1.0));
    drop(holder);
}

// ---------------------------------------------------------------- the connection limit

#[tokio::test]
async fn max_connections_lowered_under_load_cuts_no_one_and_admits_again_under_the_new_limit() {
    let pki = Pki::new();
    let limit = |n: usize| {
        config(
            &listen(EPHEMERAL, None, Some(EPHEMERAL)),
            &format!("limits:\n  max_connections: {n}"),
            ANSWER,
        )
    };
    let proxy = start(&pki, &limit(10)).await;
    let client = Client::new(&pki);
    let addr = proxy.addr;
    let mut inside = Vec::new();
    for _ in 0..4 {
        let mut conn = client.open(addr, HOST, Proto::H1).await;
        assert_eq!(conn.get(HOST, "/").await.unwrap().status, StatusCode::OK);
        inside.push(conn);
    }

    // Lowered to 2 with 4 open: the 4 stay and are served; newcomers are turned away.
    proxy.reconfigure(&limit(2), PATIENCE).await;
    for (i, conn) in inside.iter_mut().enumerate() {
        let got = conn
            .get(HOST, "/")
            .await
            .unwrap_or_else(|e| panic!("connection {i} was cut by the lower limit: {e}"));
        assert_eq!(got.status, StatusCode::OK, "connection {i}");
    }
    eventually(PATIENCE, "a new connection is refused", || async {
        refused(&client, addr).await
    })
    .await;

    // Two leave: 2 open, at the limit, still no room.
    inside.truncate(2);
    eventually(PROMPT, "limen has seen two connections go", || async {
        open_h1(&proxy).await == Some(2.0)
    })
    .await;
    assert!(refused(&client, addr).await, "no room at the limit");

    // One more leaves: under the limit, a newcomer gets in, and then it is full again.
    inside.truncate(1);
    inside.push(admitted_within(&client, addr, PROMPT).await);
    assert!(refused(&client, addr).await, "no room at the limit");

    // Raised to 10: room at once for 8 more, without anyone leaving.
    proxy.reconfigure(&limit(10), PATIENCE).await;
    inside.push(admitted_within(&client, addr, PATIENCE).await);
    for i in 0..7 {
        let conn = admitted(&client, addr)
            .await
            .unwrap_or_else(|| panic!("newcomer {i} refused under the raised limit"));
        inside.push(conn);
    }
    assert!(refused(&client, addr).await, "10 open: full");
    for (i, conn) in inside.iter_mut().enumerate() {
        assert_eq!(
            conn.get(HOST, "/").await.unwrap().status,
            StatusCode::OK,
            "connection {i}"
        );
    }
}

// ---------------------------------------------------------------- timeouts and limits

#[tokio::test]
async fn a_shorter_idle_timeout_applies_to_connections_opened_after_the_reload() {
    let pki = Pki::new();
    let idle = |d: &str| {
        config(
            &listen(EPHEMERAL, None, Some(EPHEMERAL)),
            &format!("timeouts:\n  idle: {d}"),
            ANSWER,
        )
    };
    let proxy = start(&pki, &idle("30s")).await;
    let client = Client::new(&pki);
    let mut before = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    assert_eq!(ask(&mut before).await, 200);

    proxy.reconfigure(&idle("300ms"), PATIENCE).await;
    let mut after = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    assert_eq!(ask(&mut after).await, 200);
    let idle_since = Instant::now();
    let (_, closed) = read_until_close(&mut after, Duration::from_secs(5)).await;
    let took = idle_since.elapsed();
    assert!(closed, "a connection opened after the reload idled for 5 s");
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "closed after {took:?} idle, for an idle timeout of 300 ms"
    );

    // The one opened before keeps its 30 s: idle well past 300 ms, it is still open and served.
    let (_, closed) = read_until_close(&mut before, Duration::from_millis(1500)).await;
    assert!(
        !closed,
        "a connection opened before the reload was closed at the new idle timeout"
    );
    assert_eq!(ask(&mut before).await, 200);
}

#[tokio::test]
async fn a_lower_body_limit_applies_to_the_next_request_and_a_workers_change_applies_the_rest() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let with = |extra: &str| {
        config(
            &listen(EPHEMERAL, None, Some(EPHEMERAL)),
            extra,
            &route_all_to(&b),
        )
    };
    let proxy = start(&pki, &with("limits:\n  max_body_bytes: 1000000")).await;
    let client = Client::new(&pki);
    let mut kept = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        assert_eq!(post(&mut conn, 5000).await, StatusCode::OK, "{proto:?}");
        kept.push((proto, conn));
    }

    // `workers` waits for a restart (a warning says so); the rest of the edit applies.
    proxy
        .reconfigure(
            &with("workers: 3\nlimits:\n  max_body_bytes: 1000"),
            PATIENCE,
        )
        .await;
    let st = proxy.status();
    assert!(
        st.config.last_ok && st.config.errors.is_empty(),
        "{:?}",
        st.config.errors
    );
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        assert_eq!(
            post(&mut conn, 1000).await,
            StatusCode::OK,
            "{proto:?}: at the limit"
        );
        assert_eq!(
            post(&mut conn, 5000).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{proto:?}: over the new limit"
        );
    }
    // The next request on a connection opened before the reload meets the new limit too.
    for (proto, conn) in &mut kept {
        assert_eq!(
            post(conn, 5000).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{proto:?}: a kept connection"
        );
    }
}

// ---------------------------------------------------------------- who the client is

#[tokio::test]
async fn trusted_proxies_added_and_removed_decide_whether_a_forwarded_for_is_kept() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let with = |extra: &str| {
        config(
            &listen(EPHEMERAL, None, Some(EPHEMERAL)),
            extra,
            &route_all_to(&b),
        )
    };
    let proxy = start(&pki, &with("")).await;
    let client = Client::new(&pki);
    assert_eq!(
        forwarded_for(&client, proxy.addr).await,
        "127.0.0.1",
        "an untrusted client's X-Forwarded-For is replaced"
    );

    proxy
        .reconfigure(&with("trusted_proxies: [\"127.0.0.0/8\"]"), PATIENCE)
        .await;
    assert_eq!(
        forwarded_for(&client, proxy.addr).await,
        "203.0.113.9, 127.0.0.1",
        "a trusted proxy's chain is kept"
    );

    proxy.reconfigure(&with(""), PATIENCE).await;
    assert_eq!(forwarded_for(&client, proxy.addr).await, "127.0.0.1");
}

#[tokio::test]
async fn the_access_log_turned_off_and_on_again_follows_the_config() {
    capture_access_log();
    let pki = Pki::new();
    let with_log = |on: bool| {
        config(
            &listen(EPHEMERAL, None, Some(EPHEMERAL)),
            &format!("access_log: {on}"),
            ANSWER,
        )
    };
    let proxy = start(&pki, &with_log(true)).await;
    let client = Client::new(&pki);
    // Paths of this proxy alone: the log captured is the whole test process's.
    let port = proxy.addr.port();
    let path = |what: &str| format!("/access-{port}-{what}");

    assert_eq!(
        client.get(proxy.addr, HOST, &path("on")).await.status,
        StatusCode::OK
    );
    eventually(PATIENCE, "the request is logged", || async {
        logged(&path("on"))
    })
    .await;

    proxy.reconfigure(&with_log(false), PATIENCE).await;
    assert_eq!(
        client.get(proxy.addr, HOST, &path("off")).await.status,
        StatusCode::OK
    );

    proxy.reconfigure(&with_log(true), PATIENCE).await;
    assert_eq!(
        client.get(proxy.addr, HOST, &path("back")).await.status,
        StatusCode::OK
    );
    eventually(PATIENCE, "the request is logged again", || async {
        logged(&path("back"))
    })
    .await;
    // Logged in order: had the request served while the log was off been logged, it would be
    // there by now.
    assert!(
        !logged(&path("off")),
        "a request served with access_log: false was logged"
    );
}

#[tokio::test]
async fn the_proxy_protocol_turned_on_at_runtime_applies_to_new_connections() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let timeouts = "timeouts:\n  handshake: 1s";
    let plain = config(
        &listen(EPHEMERAL, None, Some(EPHEMERAL)),
        timeouts,
        &route_all_to(&b),
    );
    let behind_lb = config(
        &format!(
            "{}  proxy_protocol: {{from: [\"127.0.0.1/32\"]}}\n",
            listen(EPHEMERAL, None, Some(EPHEMERAL))
        ),
        timeouts,
        &route_all_to(&b),
    );
    let proxy = start(&pki, &plain).await;
    let client = Client::new(&pki);
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";

    let mut before = client.open_after(lo, proxy.addr, HOST, b"").await.unwrap();
    assert_eq!(who(&mut before).await, "127.0.0.1");

    proxy.reconfigure(&behind_lb, PATIENCE).await;
    assert!(
        client.open_after(lo, proxy.addr, HOST, b"").await.is_err(),
        "a new connection from 127.0.0.1 without a PROXY header is closed"
    );
    let mut via_lb = client
        .open_after(lo, proxy.addr, HOST, header)
        .await
        .expect("a new connection with a PROXY v1 header is served");
    assert_eq!(who(&mut via_lb).await, "203.0.113.7");
    // The connection opened before is left as it was: the listener itself did not change.
    assert_eq!(who(&mut before).await, "127.0.0.1");

    // Off again: a header is just bytes before TLS, and a plain connection is served.
    proxy.reconfigure(&plain, PATIENCE).await;
    assert!(client
        .open_after(lo, proxy.addr, HOST, header)
        .await
        .is_err());
    let mut direct = client.open_after(lo, proxy.addr, HOST, b"").await.unwrap();
    assert_eq!(who(&mut direct).await, "127.0.0.1");
}

// ---------------------------------------------------------------- helpers

/// The `listen:` block for these addresses.
fn listen(https: &str, http: Option<&str>, admin: Option<&str>) -> String {
    let mut block = format!("listen:\n  https: \"{https}\"\n");
    if let Some(a) = http {
        block.push_str(&format!("  http: \"{a}\"\n"));
    }
    if let Some(a) = admin {
        block.push_str(&format!("  admin: \"{a}\"\n"));
    }
    block
}

/// A whole config polled every 50 ms: the `listen` block, other top-level keys, the routes.
fn config(listen: &str, extra: &str, routes: &str) -> String {
    format!(
        "{listen}tls:\n  cert_dirs: [\"./certs\"]\nreload:\n  interval: 50ms\n{extra}\nroutes:\n{routes}"
    )
}

/// limen on `yaml`, serving a certificate for HOST.
async fn start(pki: &Pki, yaml: &str) -> Proxy {
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    Proxy::start_in(dir, yaml).await
}

/// A loopback address nothing listens on (bound a moment to learn a free port).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The bound addresses `/status.json` lists under `listeners`.
#[derive(Debug, PartialEq)]
struct Listeners {
    https: Option<String>,
    http: Option<String>,
    admin: Option<String>,
}

impl Listeners {
    fn at(https: SocketAddr, http: Option<SocketAddr>, admin: Option<SocketAddr>) -> Listeners {
        Listeners {
            https: Some(https.to_string()),
            http: http.map(|a| a.to_string()),
            admin: admin.map(|a| a.to_string()),
        }
    }
}

/// `listeners` of `/status.json` from the admin listener at `admin`; None while nothing answers.
async fn listeners(admin: SocketAddr) -> Option<Listeners> {
    let st = status_at(admin).await?;
    let addr = |kind: &str| st["listeners"][kind].as_str().map(str::to_owned);
    Some(Listeners {
        https: addr("https"),
        http: addr("http"),
        admin: addr("admin"),
    })
}

/// `/status.json` from the admin listener at `admin`; None while nothing answers there.
async fn status_at(admin: SocketAddr) -> Option<Value> {
    let tcp = TcpStream::connect(admin).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get("/status.json")
        .header(http::header::HOST, "admin")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(PROMPT, send.send_request(req))
        .await
        .ok()?
        .ok()?;
    if resp.status() != StatusCode::OK {
        return None;
    }
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .ok()?
        .to_bytes();
    serde_json::from_slice(&body).ok()
}

/// Whether a new connection to `addr` is turned away: nothing accepts it, or it is closed before
/// its TLS handshake completes.
async fn refused(client: &Client, addr: SocketAddr) -> bool {
    let attempt = client.connect(addr, HOST, Proto::H1);
    matches!(
        tokio::time::timeout(Duration::from_secs(3), attempt).await,
        Ok(Err(_))
    )
}

/// A new HTTP/1.1 connection, if limen admits it and answers a request on it.
async fn admitted(client: &Client, addr: SocketAddr) -> Option<Conn> {
    tokio::time::timeout(Duration::from_secs(5), try_admit(client, addr))
        .await
        .ok()
        .flatten()
}

async fn try_admit(client: &Client, addr: SocketAddr) -> Option<Conn> {
    let tls = client.connect(addr, HOST, Proto::H1).await.ok()?;
    let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .ok()?;
    tokio::spawn(connection);
    let mut conn = Conn::H1(send);
    let got = conn.get(HOST, "/").await.ok()?;
    (got.status == StatusCode::OK).then_some(conn)
}

/// A connection limen admits and serves, waiting up to `patience` for room.
async fn admitted_within(client: &Client, addr: SocketAddr, patience: Duration) -> Conn {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(conn) = admitted(client, addr).await {
            return conn;
        }
        assert!(
            Instant::now() < deadline,
            "no new connection admitted within {patience:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// HTTP/1.1 client connections open, as `limen_connections_open` says.
async fn open_h1(proxy: &Proxy) -> Option<f64> {
    let (_, m) = admin_get(proxy.admin(), "/metrics").await;
    metric(&m, "limen_connections_open{protocol=\"h1\"}")
}

/// Whether limen closes `conn` within `patience`: until then, requests on it are answered.
async fn closes_within(conn: &mut Conn, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        match tokio::time::timeout(PROMPT, conn.get(HOST, "/")).await {
            Ok(Err(_)) => return true,
            Ok(Ok(_)) if Instant::now() < deadline => {}
            _ => return false,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One GET on a raw HTTP/1.1 TLS connection, read to the end of its answer: the status.
async fn ask(tls: &mut TlsStream<TcpStream>) -> u16 {
    let req = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            }
        }
        let n = tokio::time::timeout(PROMPT, tls.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("the connection reads");
        assert!(n > 0, "closed before the answer was complete");
        got.extend_from_slice(&buf[..n]);
    }
}

/// A plain-HTTP GET on a new connection: the status and the Location; None when nothing accepts
/// the connection or it is closed without an answer.
async fn plain_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.ok()?;
    let mut text = String::new();
    tokio::time::timeout(PROMPT, tcp.read_to_string(&mut text))
        .await
        .ok()?
        .ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let location = text
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("location")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    Some((status, location))
}

/// A POST of `len` bytes: the status.
async fn post(conn: &mut Conn, len: usize) -> StatusCode {
    let req = conn.request("POST", HOST, "/upload", body(vec![b'x'; len]));
    conn.fetch(req).await.unwrap().status
}

/// The X-Forwarded-For the backend sees for a request, on a new connection, that says it was
/// forwarded for 203.0.113.9.
async fn forwarded_for(client: &Client, addr: SocketAddr) -> String {
    let mut conn = client.open(addr, HOST, Proto::H1).await;
    let mut req = conn.request("GET", HOST, "/", body(""));
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    let echo = conn.fetch(req).await.unwrap().echo();
    echo.header("x-forwarded-for").unwrap_or("-").to_string()
}

/// Who the backend was told the client is.
async fn who(conn: &mut Conn) -> String {
    let echo = conn.get(HOST, "/who").await.unwrap().echo();
    echo.header("x-forwarded-for").unwrap_or("-").to_string()
}

// ---- the access log of this test process

/// Every `limen::access` line written in this test process, as JSON lines.
static ACCESS_LOG: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        ACCESS_LOG
            .lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the access log of the limens in this test process to `ACCESS_LOG` (the harness runs
/// limen in-process with no subscriber, so nothing is logged otherwise).
fn capture_access_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("limen::access=info"))
            .json()
            .with_writer(|| Capture)
            .try_init()
            .expect("no other subscriber in this test process");
    });
}

/// Whether a request for `path` is in the access log.
fn logged(path: &str) -> bool {
    ACCESS_LOG
        .lock()
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|v| v["target"] == "limen::access" && v["fields"]["path"] == path)
}
