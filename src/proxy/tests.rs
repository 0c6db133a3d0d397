use super::*;

/// A snapshot with these routes, and a connection whose certificate covers `a.test` and
/// `*.b.test`, from `peer`.
fn fixture(routes: &str) -> (Snapshot, ConnInfo) {
    let text = format!(
        "listen: {{https: \"127.0.0.1:1\"}}\ntls: {{self_signed: true}}\nroutes:\n{routes}"
    );
    let config = Arc::new(Config::parse(&text, std::path::Path::new("/x.yaml")).unwrap());
    let registry = crate::upstream::UpstreamRegistry::default();
    let routes = Arc::new(crate::routing::RouteTable::build(
        &config.routes,
        Duration::from_secs(1),
        &crate::routing::Inputs {
            registry: &registry,
            tls: &crate::upstream::TlsConfigs::default(),
            limiters: &crate::ratelimit::Limiters::default(),
            users: &Default::default(),
        },
    ));
    let tls = crate::tls::TlsShared::new().unwrap();
    let cert = Arc::new(
        crate::tls::self_signed(&["a.test".into(), "*.b.test".into()], tls.provider()).unwrap(),
    );
    let certs = Arc::new(crate::tls::CertStore::new(vec![cert.clone()]));
    let snap = Snapshot {
        generation: 1,
        tls: crate::tls::ServerTls::plain(
            tls.server_config(certs.clone(), crate::config::TlsVersion::V12, true)
                .unwrap(),
        ),
        config,
        routes,
        certs,
    };
    let (_tx, shutdown) = tokio::sync::watch::channel(false);
    let permit = crate::state::ConnLimit::new(1).try_acquire().unwrap();
    let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
    let conn = ConnInfo {
        peer,
        sni: Some("a.test".into()),
        presented: Some(cert),
        forwarding: PeerForwarding::new(peer.ip()),
        client_auth: None,
        client_cert: None,
        activity: Arc::new(Activity::new()),
        shutdown,
        _permit: permit,
    };
    (snap, conn)
}

fn get(target: &str, host: &str) -> Request<()> {
    Request::get(target)
        .header(header::HOST, host)
        .body(())
        .unwrap()
}

#[test]
fn admit_refuses_in_order_host_cover_method_path_route_size() {
    let (snap, conn) = fixture(concat!(
        "  - {host: a.test, path: /app, respond: {}}\n",
        "  - {host: x.b.test, respond: {}}\n",
    ));
    let refused = |req: Request<()>| admit(&req, &conn, &snap).err();
    assert!(matches!(
        refused(get("/app", "a b")),
        Some(ErrorKind::BadRequest(_))
    ));
    assert_eq!(refused(get("/app", "c.test")), Some(ErrorKind::Misdirected));
    let mut trace = get("/app", "a.test");
    *trace.method_mut() = Method::TRACE;
    assert_eq!(refused(trace), Some(ErrorKind::MethodNotAllowed));
    assert!(matches!(
        refused(get("/app/../..", "a.test")),
        Some(ErrorKind::BadRequest(_))
    ));
    assert_eq!(refused(get("/other", "a.test")), Some(ErrorKind::NoRoute));
    let ok = admit(&get("/x/../app/./y?q=1", "A.test:8443"), &conn, &snap).unwrap();
    assert_eq!(ok.host, "a.test");
    assert_eq!(ok.target, "/app/y?q=1");
    assert_eq!(
        admit(&get("/", "x.b.test"), &conn, &snap).unwrap().host,
        "x.b.test"
    );
}

#[test]
fn prepare_sets_forwarding_and_restates_only_real_upgrades() {
    let (snap, conn) = fixture("  - {host: a.test, path: /app, strip_prefix: true, respond: {}}\n");
    let mut req = get("/app/ws", "a.test");
    let h = req.headers_mut();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("upgrade, x-secret"),
    );
    h.insert(header::UPGRADE, HeaderValue::from_static("h2c, websocket"));
    h.insert("x-secret", HeaderValue::from_static("1"));
    h.insert("x_forwarded_for", HeaderValue::from_static("6.6.6.6"));
    let offered = offered_upgrades(&req);
    assert_eq!(offered.as_ref().unwrap(), "websocket");
    let admitted = admit(&req, &conn, &snap).unwrap();
    let (parts, ()) = req.into_parts();
    let p = prepare(parts, &admitted, &conn, &snap.config, offered).unwrap();
    assert_eq!(p.uri, "/ws");
    assert_eq!(p.headers["x-forwarded-for"], "192.0.2.7");
    assert_eq!(p.headers[header::UPGRADE], "websocket");
    assert_eq!(p.headers[header::CONNECTION], "upgrade");
    assert_eq!(p.headers[header::VIA], "1.1 limen");
    assert!(p.headers.get("x-secret").is_none());
    assert!(p.headers.get("x_forwarded_for").is_none());

    let mut only_h2c = get("/app", "a.test");
    only_h2c
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    only_h2c
        .headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("h2c"));
    assert!(offered_upgrades(&only_h2c).is_none());
}

#[test]
fn every_error_makes_one_answer_that_never_shows_its_cause() {
    let secret = "connect to 10.1.2.3:8080 failed: Connection refused (os error 111)";
    for (kind, status, grpc, closes) in [
        (ErrorKind::BadRequest("bad"), 400, 13, true),
        (ErrorKind::Misdirected, 421, 14, false),
        (ErrorKind::ClientAuthMismatch, 421, 14, true),
        (ErrorKind::MethodNotAllowed, 405, 12, false),
        (ErrorKind::NoRoute, 404, 12, false),
        (ErrorKind::TooLarge, 413, 8, true),
        (ErrorKind::NotImplemented, 501, 12, true),
        (ErrorKind::NoUpstream, 502, 14, false),
        (ErrorKind::UpstreamFailed, 502, 14, false),
        (ErrorKind::BadUpstreamResponse, 502, 14, true),
        (ErrorKind::Timeout, 504, 4, false),
        (ErrorKind::Overloaded, 503, 14, false),
        (ErrorKind::BodyIdle, 408, 4, true),
        (ErrorKind::BodySlow, 408, 4, true),
        (ErrorKind::BodyAborted, 400, 13, true),
        (ErrorKind::Forbidden, 403, 7, false),
        (ErrorKind::Unauthorized, 401, 16, false),
        (ErrorKind::RateLimited(2), 429, 8, false),
        (ErrorKind::AuthUnavailable, 503, 14, false),
    ] {
        for side in [Side::Client, Side::Upstream, Side::Limen] {
            let error = || RequestError::new(kind).side(side).because(secret);
            let r = error().into_response();
            assert_eq!(r.status().as_u16(), status, "{kind:?}");
            assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(
                r.headers().contains_key(header::CONNECTION),
                closes,
                "{kind:?}"
            );
            let Inner::Full(Some(body)) = &r.body().inner else {
                panic!("{kind:?}: no body");
            };
            let text = std::str::from_utf8(body).unwrap();
            assert!(text.contains(kind.message()), "{text}");
            assert!(
                !text.contains("10.1.2.3") && !text.contains("os error"),
                "{text}"
            );

            let g = error().into_grpc_response();
            let expect_http = if status == 421 { 421 } else { 200 };
            assert_eq!(g.status().as_u16(), expect_http, "{kind:?}");
            assert_eq!(g.headers()["grpc-status"], grpc.to_string().as_str());
            assert_eq!(g.headers()["grpc-message"], kind.message());
        }
    }
    assert!(upgrade_agreed(
        &{
            let mut h = HeaderMap::new();
            h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
            h
        },
        &HeaderValue::from_static("websocket, foo")
    ));
    assert!(!upgrade_agreed(
        &HeaderMap::new(),
        &HeaderValue::from_static("websocket")
    ));
}

#[test]
fn hosts_lose_ports_and_case() {
    assert_eq!(
        host_without_port("App.Test:8443").as_deref(),
        Some("app.test")
    );
    assert_eq!(host_without_port("[::1]:443").as_deref(), Some("::1"));
    assert_eq!(host_without_port("a.test").as_deref(), Some("a.test"));
    assert_eq!(host_without_port("a.test:x"), None);
    assert_eq!(host_without_port("a b"), None);
    assert_eq!(host_without_port(""), None);
}

#[test]
fn hop_by_hop_headers_go() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("close, x-secret"),
    );
    h.insert("x-secret", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
    h.insert("x-keep", HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut h);
    assert!(h.get("x-secret").is_none());
    assert!(h.get("keep-alive").is_none());
    assert!(h.get(header::CONNECTION).is_none());
    assert_eq!(h.get(header::TE).unwrap(), "trailers");
    assert_eq!(h.get("x-keep").unwrap(), "1");
}
