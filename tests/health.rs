//! Sick upstreams meet limen: active checks (http, tcp, gRPC) take them out and bring them back
//! with their thresholds, live traffic ejects the ones that fail (for longer each time), a route
//! whose upstreams are all down still tries them (fail open), and the health state lives as long
//! as the upstream and its settings do.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

const HOST: &str = "app.example.test";
const PROMPT: Duration = Duration::from_secs(10);
const CHECK: &str = "health: {path: /healthz, interval: 100ms, timeout: 100ms, healthy_after: 2, unhealthy_after: 3}";

/// One route named `app` for HOST over `upstreams` (YAML list items), with `keys` added.
async fn proxy(pki: &Pki, upstreams: &str, keys: &str) -> Proxy {
    Proxy::start(
        pki,
        &[HOST],
        "",
        &format!("  - {{name: app, host: \"{HOST}\", upstreams: [{upstreams}], {keys}}}\n"),
    )
    .await
}

async fn state(proxy: &Proxy, url: &str) -> String {
    upstream_state(proxy, "app", url).await["state"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn metrics(proxy: &Proxy) -> String {
    admin_get(proxy.admin(), "/metrics").await.1
}

/// Sends `n` requests one by one; the names of the upstreams that answered 200.
async fn answered_by(client: &Client, proxy: &Proxy, n: usize, path: &str) -> Vec<String> {
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    let mut names = Vec::new();
    for _ in 0..n {
        let got = conn.get(HOST, path).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        names.push(got.text().split(' ').next().unwrap().to_string());
    }
    names
}

#[tokio::test]
async fn an_http_check_takes_a_503_upstream_out_after_its_threshold_and_back() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    let proxy = proxy(&pki, &format!("\"{}\", \"{}\"", a.url(), b.url()), CHECK).await;
    let client = Client::new(&pki);
    // Both start up, before any check has run.
    let names = answered_by(&client, &proxy, 4, "/").await;
    assert!(
        names.contains(&"a".into()) && names.contains(&"b".into()),
        "{names:?}"
    );

    a.health.store(503, Ordering::SeqCst);
    let failing_since = a.checks();
    eventually(PROMPT, "a is down", || async {
        state(&proxy, &a.url()).await == "down"
    })
    .await;
    assert!(
        a.checks() - failing_since >= 3,
        "down only after unhealthy_after (3) failed checks"
    );
    let seen = upstream_state(&proxy, "app", &a.url()).await;
    assert_eq!(seen["healthy"], false);
    assert_eq!(seen["last_check"]["ok"], false);
    let reason = seen["last_check"]["reason"].as_str().unwrap();
    assert!(reason.contains("503"), "{reason}");
    let m = metrics(&proxy).await;
    assert_eq!(
        metric(&m, &format!("limen_upstream_up{{upstream=\"{}\"}}", a.addr)),
        Some(0.0),
        "{m}"
    );
    assert!(
        metric(
            &m,
            &format!(
                "limen_upstream_health_checks_total{{upstream=\"{}\",result=\"failure\"}}",
                a.addr
            )
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{m}"
    );
    let before = a.hits.load(Ordering::SeqCst);
    let names = answered_by(&client, &proxy, 10, "/").await;
    assert!(names.iter().all(|n| n == "b"), "{names:?}");
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        before,
        "no request went to a"
    );

    a.health.store(200, Ordering::SeqCst);
    eventually(PROMPT, "a is up again", || async {
        state(&proxy, &a.url()).await == "up"
    })
    .await;
    let names = answered_by(&client, &proxy, 4, "/").await;
    assert!(names.contains(&"a".into()), "{names:?}");
    // The checks were not requests: only the 18 requests above were counted.
    let m = metrics(&proxy).await;
    let counted: f64 = m
        .lines()
        .filter(|l| l.starts_with("limen_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, 18.0, "{m}");
}

#[tokio::test]
async fn a_health_endpoint_that_hangs_is_down_by_its_timeout() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    let proxy = proxy(&pki, &format!("\"{}\", \"{}\"", a.url(), b.url()), CHECK).await;
    a.health.store(0, Ordering::SeqCst);
    eventually(PROMPT, "a is down", || async {
        state(&proxy, &a.url()).await == "down"
    })
    .await;
    let seen = upstream_state(&proxy, "app", &a.url()).await;
    let reason = seen["last_check"]["reason"].as_str().unwrap();
    assert!(reason.contains("health.timeout"), "{reason}");
}

#[tokio::test]
async fn a_tcp_check_takes_a_closed_port_out_and_back() {
    let pki = Pki::new();
    let a = Switch::start("a").await;
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = spare.local_addr().unwrap();
    drop(spare);
    let gone_url = format!("http://{gone}");
    let proxy = proxy(
        &pki,
        &format!("\"{}\", \"{gone_url}\"", a.url()),
        "health: {kind: tcp, interval: 100ms, timeout: 100ms, healthy_after: 1, unhealthy_after: 1}",
    )
    .await;
    eventually(PROMPT, "the closed port is down", || async {
        state(&proxy, &gone_url).await == "down"
    })
    .await;
    let back = Switch::start_at("back", gone).await;
    eventually(PROMPT, "the port listens again: up", || async {
        state(&proxy, &gone_url).await == "up"
    })
    .await;
    assert_eq!(back.checks(), 0, "a tcp check sends no request");
    assert_eq!(back.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn passive_detection_ejects_after_consecutive_502s_for_longer_each_time() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    a.answer.store(502, Ordering::SeqCst);
    let proxy = proxy(
        &pki,
        &format!("\"{}\", \"{}\"", a.url(), b.url()),
        "passive: {consecutive_failures: 3, ejection: 1s}, retry: {attempts: 0}",
    )
    .await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    // Round robin: a's three 502s (relayed, with no retry) come among b's answers.
    let mut bad = 0;
    while bad < 3 {
        let got = conn.get(HOST, "/").await.unwrap();
        if got.status == StatusCode::BAD_GATEWAY {
            bad += 1;
        }
    }
    let seen = upstream_state(&proxy, "app", &a.url()).await;
    assert_eq!(seen["state"], "ejected", "{seen}");
    assert!(seen["ejected_until"].is_string(), "{seen}");
    let hits = a.hits.load(Ordering::SeqCst);
    for _ in 0..6 {
        assert_eq!(conn.get(HOST, "/").await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        hits,
        "an ejected upstream gets no request"
    );
    let m = metrics(&proxy).await;
    let ejections = format!("limen_upstream_ejections_total{{upstream=\"{}\"}}", a.addr);
    assert_eq!(metric(&m, &ejections), Some(1.0), "{m}");

    // Back after 1 s; three more failures eject it again, for twice as long. (The doubling holds
    // while the next failure comes within one ejection period of the end of the last, so the
    // period is long enough for a loaded CI machine to get there.)
    eventually(PROMPT, "the first ejection ends", || async {
        state(&proxy, &a.url()).await == "up"
    })
    .await;
    let mut bad = 0;
    while bad < 3 {
        if conn.get(HOST, "/").await.unwrap().status == StatusCode::BAD_GATEWAY {
            bad += 1;
        }
    }
    let again = Instant::now();
    assert_eq!(state(&proxy, &a.url()).await, "ejected");
    eventually(PROMPT, "the second ejection ends", || async {
        state(&proxy, &a.url()).await == "up"
    })
    .await;
    let lasted = again.elapsed();
    assert!(
        lasted >= Duration::from_millis(1800) && lasted < Duration::from_secs(5),
        "the second ejection lasted {lasted:?}, not about 2 s"
    );
    assert_eq!(metric(&metrics(&proxy).await, &ejections), Some(2.0));
}

#[tokio::test]
async fn when_every_upstream_is_down_requests_still_reach_them() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    let proxy = proxy(&pki, &format!("\"{}\", \"{}\"", a.url(), b.url()), CHECK).await;
    a.health.store(503, Ordering::SeqCst);
    b.health.store(503, Ordering::SeqCst);
    for s in [&a, &b] {
        eventually(PROMPT, "down", || async {
            state(&proxy, &s.url()).await == "down"
        })
        .await;
    }
    let all_down = "limen_route_all_upstreams_down{route=\"app\"}";
    assert_eq!(metric(&metrics(&proxy).await, all_down), Some(1.0));
    let client = Client::new(&pki);
    let names = answered_by(&client, &proxy, 6, "/").await;
    assert!(
        names.contains(&"a".into()) && names.contains(&"b".into()),
        "fail open spreads over all of them: {names:?}"
    );
    a.health.store(200, Ordering::SeqCst);
    eventually(PROMPT, "a is up", || async {
        state(&proxy, &a.url()).await == "up"
    })
    .await;
    assert_eq!(metric(&metrics(&proxy).await, all_down), Some(0.0));
    let names = answered_by(&client, &proxy, 6, "/").await;
    assert!(names.iter().all(|n| n == "a"), "{names:?}");
}

#[tokio::test]
async fn health_state_survives_a_reload_that_keeps_it_and_starts_afresh_when_it_changes() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    let route = |check: &str| {
        format!(
            "  - {{name: app, host: \"{HOST}\", upstreams: [\"{}\", \"{}\"], {check}}}\n",
            a.url(),
            b.url()
        )
    };
    let mut proxy = Proxy::start(&pki, &[HOST], "reload:\n  interval: 50ms", &route(CHECK)).await;
    a.health.store(503, Ordering::SeqCst);
    eventually(PROMPT, "a is down", || async {
        state(&proxy, &a.url()).await == "down"
    })
    .await;

    // Another route added: a's upstream and settings are the same, so it stays down.
    let other = format!("  - {{host: \"*\", respond: {{}}}}\n{}", route(CHECK));
    proxy
        .reconfigure(&config_yaml("reload:\n  interval: 50ms", &other), PROMPT)
        .await;
    assert_eq!(state(&proxy, &a.url()).await, "down");

    // New health settings: a new checker, and a starts up with no check seen yet.
    let changed = CHECK.replace("interval: 100ms", "interval: 3s");
    proxy
        .reconfigure(
            &config_yaml("reload:\n  interval: 50ms", &route(&changed)),
            PROMPT,
        )
        .await;
    let fresh = upstream_state(&proxy, "app", &a.url()).await;
    assert_eq!(fresh["state"], "up", "{fresh}");
    assert!(fresh["last_check"].is_null(), "{fresh}");
    // The old checker stopped: at 3 s intervals, a sees at most a check or two from now on.
    let checks = a.checks();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(a.checks() - checks <= 1, "the 100 ms checker still runs");
    proxy.shutdown().await;
}

/// What one gRPC check carried: path, content-type, te, body.
type SeenCheck = (String, String, String, Vec<u8>);

/// An h2c server that answers `grpc.health.v1.Health/Check` with the serving status in `status`
/// (1 SERVING, 2 NOT_SERVING), and remembers what each check carried.
struct GrpcHealth {
    addr: std::net::SocketAddr,
    status: std::sync::Arc<std::sync::atomic::AtomicU8>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<SeenCheck>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcHealth {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcHealth {
    async fn start() -> GrpcHealth {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(1));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (st, sn) = (status.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (st, sn) = (st.clone(), sn.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (st, sn) = (st.clone(), sn.clone());
                            async move {
                                let h = |n: &str| {
                                    req.headers()
                                        .get(n)
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("")
                                        .to_string()
                                };
                                let (path, ct, te) =
                                    (req.uri().path().to_string(), h("content-type"), h("te"));
                                let body =
                                    req.into_body().collect().await.unwrap().to_bytes().to_vec();
                                sn.lock().unwrap().push((path, ct, te, body));
                                let msg = vec![0, 0, 0, 0, 2, 8, st.load(Ordering::SeqCst)];
                                let mut trailers = http::HeaderMap::new();
                                trailers.insert("grpc-status", "0".parse().unwrap());
                                let frames = futures_util::stream::iter([
                                    Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                        bytes::Bytes::from(msg),
                                    )),
                                    Ok(hyper::body::Frame::trailers(trailers)),
                                ]);
                                let mut resp =
                                    http::Response::new(http_body_util::StreamBody::new(frames));
                                resp.headers_mut()
                                    .insert("content-type", "application/grpc".parse().unwrap());
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        GrpcHealth {
            addr,
            status,
            seen,
            task,
        }
    }
}

#[tokio::test]
async fn a_grpc_check_follows_serving_and_not_serving() {
    let pki = Pki::new();
    let server = GrpcHealth::start().await;
    let url = format!("h2c://{}", server.addr);
    let proxy = proxy(
        &pki,
        &format!("\"{url}\""),
        "health: {kind: grpc, interval: 100ms, timeout: 100ms, healthy_after: 1, unhealthy_after: 2}",
    )
    .await;
    eventually(PROMPT, "a check arrived", || async {
        !server.seen.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(state(&proxy, &url).await, "up");
    {
        let seen = server.seen.lock().unwrap();
        let (path, ct, te, body) = &seen[0];
        assert_eq!(path, "/grpc.health.v1.Health/Check");
        assert_eq!(ct, "application/grpc");
        assert_eq!(te, "trailers");
        assert_eq!(
            body,
            &[0, 0, 0, 0, 0],
            "an empty HealthCheckRequest: the whole server"
        );
    }
    server.status.store(2, Ordering::SeqCst);
    eventually(PROMPT, "NOT_SERVING takes it out", || async {
        state(&proxy, &url).await == "down"
    })
    .await;
    let seen = upstream_state(&proxy, "app", &url).await;
    assert_eq!(seen["last_check"]["reason"], "NOT_SERVING", "{seen}");
    server.status.store(1, Ordering::SeqCst);
    eventually(PROMPT, "SERVING brings it back", || async {
        state(&proxy, &url).await == "up"
    })
    .await;
}

#[tokio::test]
async fn an_http_check_of_an_h2c_upstream_speaks_http2_with_the_routes_host() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    // Over h2c: the harness's backend echoes, so the check is a 200 when it arrives as HTTP/2.
    let h2c = proxy(&pki, &format!("\"{}\"", backend.url()), CHECK).await;
    eventually(PROMPT, "checked over HTTP/2", || async {
        backend.requests.load(Ordering::SeqCst) >= 2
    })
    .await;
    let seen = upstream_state(&h2c, "app", &backend.url()).await;
    assert_eq!(seen["last_check"]["ok"], true, "{seen}");
    // Over HTTP/1.1: Host is the route's exact host unless `health.host` says otherwise.
    let _p = proxy(&pki, &format!("\"{}\"", a.url()), CHECK).await;
    let _q = proxy(
        &pki,
        &format!("\"{}\"", b.url()),
        &CHECK.replace("path: /healthz", "path: /healthz, host: app.internal"),
    )
    .await;
    eventually(PROMPT, "both checked", || async {
        a.checks() > 0 && b.checks() > 0
    })
    .await;
    assert_eq!(a.checks.lock().unwrap()[0], HOST);
    assert_eq!(b.checks.lock().unwrap()[0], "app.internal");
    assert_eq!(
        a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn a_client_sent_deadline_cannot_eject_an_upstream() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    let proxy = proxy(
        &pki,
        &format!("\"{}\", \"{}\"", a.url(), b.url()),
        "passive: {consecutive_failures: 2}",
    )
    .await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    // Not gRPC: the header is the client's business, and the route's timeout applies.
    for _ in 0..6 {
        let mut req = conn.request("GET", HOST, "/sleep/100", body(""));
        req.headers_mut()
            .insert("grpc-timeout", "1m".parse().unwrap());
        let got = conn.fetch(req).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    }
    for s in [&a, &b] {
        assert_eq!(state(&proxy, &s.url()).await, "up");
    }
}

#[tokio::test]
async fn garbage_and_endless_health_answers_are_judged_without_hanging() {
    let pki = Pki::new();
    let garbage = Canned::start(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", false).await;
    // A 200 whose body never ends: the status decides; the connection is not kept.
    let endless = Canned::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\nxxxxxxxx",
        true,
    )
    .await;
    let proxy = proxy(
        &pki,
        &format!("\"{}\", \"{}\"", garbage.url(), endless.url()),
        "health: {path: /healthz, interval: 200ms, timeout: 200ms, healthy_after: 1, unhealthy_after: 1}",
    )
    .await;
    eventually(PROMPT, "the garbage upstream is down", || async {
        state(&proxy, &garbage.url()).await == "down"
    })
    .await;
    let seen = upstream_state(&proxy, "app", &garbage.url()).await;
    assert!(
        seen["last_check"]["reason"]
            .as_str()
            .unwrap()
            .contains("request failed"),
        "{seen}"
    );
    eventually(PROMPT, "the endless one was checked twice", || async {
        endless.requests.load(Ordering::SeqCst) >= 2
    })
    .await;
    let seen = upstream_state(&proxy, "app", &endless.url()).await;
    assert_eq!(seen["state"], "up", "{seen}");
    assert_eq!(seen["last_check"]["ok"], true, "{seen}");
    assert!(
        endless.connections.load(Ordering::SeqCst) >= 2,
        "a connection with a body still coming is not reused"
    );
}
