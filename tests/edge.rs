//! limen at the edge: per-route header edits, the admin API behind a token, PROXY protocol from
//! the load balancers allowed to send it.

mod common;

use common::*;
use http::StatusCode;

const HOST: &str = "app.example.test";

#[tokio::test]
async fn a_routes_header_edits_apply_both_ways_and_to_limens_own_errors() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = spare.local_addr().unwrap();
    drop(spare);
    let edits = "headers: {request: {set: {x-env: prod}, remove: [x-debug]}, response: {set: {strict-transport-security: max-age=31536000}, remove: [content-type, x-hop]}}";
    let routes = format!(
        "  - {{host: \"{HOST}\", upstreams: [\"{}\"], {edits}}}\n  - {{host: \"{HOST}\", path: /down, upstreams: [\"http://{dead}\"], {edits}}}\n  - {{host: \"{HOST}\", path: /plain, upstreams: [\"{}\"]}}\n",
        b.url(),
        b.url()
    );
    let proxy = Proxy::start(&pki, &[HOST], "", &routes).await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let mut req = conn.request("GET", HOST, "/x", body(""));
        req.headers_mut().insert("x-debug", "1".parse().unwrap());
        req.headers_mut().insert("x-env", "dev".parse().unwrap());
        let got = conn.fetch(req).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{proto:?}");
        let echo = got.echo();
        assert_eq!(
            echo.header("x-env"),
            Some("prod"),
            "{proto:?}: set replaces"
        );
        assert_eq!(echo.headers.get("x-env").map(Vec::len), Some(1));
        assert!(echo.header("x-debug").is_none(), "{proto:?}: removed");
        assert_eq!(
            got.headers["strict-transport-security"], "max-age=31536000",
            "{proto:?}"
        );
        assert!(!got.headers.contains_key("content-type"), "{proto:?}");

        // limen's own 502 on that route carries the route's response edits too.
        let down = conn.get(HOST, "/down").await.unwrap();
        assert_eq!(down.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            down.headers["strict-transport-security"],
            "max-age=31536000"
        );
        assert!(!down.headers.contains_key("content-type"));

        // Another route is untouched.
        let plain = conn.get(HOST, "/plain").await.unwrap();
        assert!(!plain.headers.contains_key("strict-transport-security"));
        assert_eq!(plain.echo().header("x-env"), None);
    }
}

/// Writes a secret file readable by its owner only, by rename (as a Secret volume update does).
fn write_secret(path: &std::path::Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn the_admin_api_wants_the_token_and_follows_its_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Proxy::dir();
    let token = dir.path().join("admin-token");
    write_secret(&token, "s3cret-one\n");
    let yaml = "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  admin_token_file: ./admin-token\ntls:\n  self_signed: true\nreload:\n  interval: 50ms\nroutes:\n  - {host: \"*\", respond: {}}\n";
    let proxy = Proxy::start_in(dir, yaml).await;
    let admin = proxy.admin();
    for path in ["/metrics", "/status.json", "/"] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic czNjcmV0LW9uZQ=="),
            Some("Bearer s3cret-on"),
        ] {
            let (status, headers, body) = admin_get_with(admin, path, auth).await;
            assert_eq!(status, 401, "{path} {auth:?}");
            assert_eq!(headers["www-authenticate"], "Bearer");
            assert!(body.is_empty(), "nothing else in the body: {body}");
        }
        let (status, _, _) = admin_get_with(admin, path, Some("Bearer s3cret-one")).await;
        assert_eq!(status, 200, "{path}");
    }
    // Probes need no token: kubelet sends none.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(admin_get(admin, path).await.0, 200, "{path}");
    }

    // Rotated: the new token works, the old one no longer does.
    write_secret(&proxy.dir.path().join("admin-token"), "s3cret-two");
    eventually(
        std::time::Duration::from_secs(5),
        "the new token is in force",
        || async {
            admin_get_with(admin, "/metrics", Some("Bearer s3cret-two"))
                .await
                .0
                == 200
        },
    )
    .await;
    assert_eq!(
        admin_get_with(admin, "/metrics", Some("Bearer s3cret-one"))
            .await
            .0,
        401
    );

    // A world-readable file is refused; the last good token stays.
    let path = proxy.dir.path().join("admin-token");
    write_secret(&path, "s3cret-three");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    eventually(
        std::time::Duration::from_secs(5),
        "the refusal is counted",
        || async {
            let (_, _, m) = admin_get_with(admin, "/metrics", Some("Bearer s3cret-two")).await;
            metric(
                &m,
                "limen_reloads_total{kind=\"admin_token\",result=\"failure\"}",
            ) == Some(1.0)
        },
    )
    .await;
    assert_eq!(
        admin_get_with(admin, "/metrics", Some("Bearer s3cret-three"))
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn limen_does_not_start_with_a_token_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Proxy::dir();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "t").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  admin_token_file: ./admin-token\ntls:\n  self_signed: true\nroutes:\n  - {host: \"*\", respond: {}}\n").unwrap();
    let err = limen::server::start(&config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("admin-token") && err.contains("chmod o-r"),
        "{err}"
    );
}
