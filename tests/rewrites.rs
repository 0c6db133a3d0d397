//! A route may change what the upstream sees (issue 24): its path (a prefix replaced, or a
//! regular expression's replacement) and its Host, after routing and before forwarding, the
//! result normalized again.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

const HOST: &str = "app.example.test";

async fn start(pki: &Pki, b: &Backend) -> Proxy {
    let routes = format!(
        "  - {{host: \"{HOST}\", path: /v1, rewrite: {{path_prefix: /api/v1, host: internal.app.svc}}, upstreams: [\"{b}\"]}}\n  - {{host: \"{HOST}\", path: /r, rewrite: {{path_regex: \"^/r/users/([0-9]+)$\", replace: \"/users?id=$1\"}}, upstreams: [\"{b}\"]}}\n  - {{host: \"{HOST}\", path: /any, rewrite: {{path_regex: \"^/any/(.*)$\", replace: \"/base/$1\"}}, upstreams: [\"{b}\"]}}\n  - {{host: \"{HOST}\", path: /slow, rewrite: {{path_regex: \"^/slow/(a+)+$\", replace: \"/matched\"}}, upstreams: [\"{b}\"]}}\n  - {{host: \"{HOST}\", path: /strip, strip_prefix: true, upstreams: [\"{b}\"]}}\n",
        b = b.url()
    );
    Proxy::start(pki, &[HOST], "", &routes).await
}

#[tokio::test]
async fn the_upstream_sees_the_rewritten_path_and_host() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, &b).await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        for (path, want_path, want_host, prefix) in [
            (
                "/v1/users?a=1",
                "/api/v1/users?a=1",
                "internal.app.svc",
                Some("/v1"),
            ),
            ("/v1", "/api/v1", "internal.app.svc", Some("/v1")),
            ("/r/users/42?x=1", "/users?id=42&x=1", HOST, None),
            ("/r/users/abc", "/r/users/abc", HOST, None),
            ("/strip/a", "/a", HOST, Some("/strip")),
        ] {
            let mut conn = client.open(proxy.addr, HOST, proto).await;
            let got = conn.get(HOST, path).await.unwrap();
            assert_eq!(got.status, StatusCode::OK, "{path} {proto:?}");
            let echo = got.echo();
            assert!(
                echo.path.ends_with(want_path),
                "{path} {proto:?}: {}",
                echo.path
            );
            let host = echo.header("host").map(str::to_owned).unwrap_or_else(|| {
                // HTTP/2 upstreams get :authority, which the echo puts before the path.
                echo.path.trim_end_matches(want_path).to_owned()
            });
            assert!(host.starts_with(want_host), "{path} {proto:?}: {host}");
            assert_eq!(
                echo.header("x-forwarded-prefix"),
                prefix,
                "{path} {proto:?}"
            );
        }
    }
    // /status.json lists what each route does besides forwarding.
    let status = status_json(&proxy).await;
    let actions: Vec<serde_json::Value> = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["actions"].clone())
        .collect();
    assert_eq!(
        actions[0],
        serde_json::json!(["rewrite.path_prefix", "rewrite.host"])
    );
    assert_eq!(actions[1], serde_json::json!(["rewrite.path_regex"]));
    assert_eq!(actions[4], serde_json::json!(["strip_prefix"]));
}

/// Hostile paths: encoded dots and slashes become what normalization makes of them before the
/// rewrite, the rewrite's result is normalized again (it can never climb out or keep a dot
/// segment), and a pattern that would backtrack for ever in a backtracking engine answers at
/// once (the regex crate runs in linear time).
#[tokio::test]
async fn hostile_paths_are_normalized_around_the_rewrite_and_regexes_run_in_linear_time() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, &b).await;
    let client = Client::new(&pki);
    for (path, status, want) in [
        ("/any/x/%2e%2e/y", 200, Some("/base/y")),
        ("/any/a%2fb", 200, Some("/base/a%2Fb")),
        ("/any//double", 200, Some("/base/double")),
        // Climbing above the route is refused by normalization before routing.
        ("/any/%2e%2e/%2e%2e/etc", 400, None),
    ] {
        let got = client.get(proxy.addr, HOST, path).await;
        assert_eq!(got.status.as_u16(), status, "{path}: {}", got.text());
        if let Some(want) = want {
            let echo = got.echo();
            assert!(echo.path.ends_with(want), "{path}: {}", echo.path);
            assert!(!echo.path.contains(".."), "{path}: {}", echo.path);
        }
    }
    // (a+)+$ against many a's and a final !: exponential for a backtracking engine.
    let evil = format!("/slow/{}!", "a".repeat(20_000));
    let got = tokio::time::timeout(Duration::from_secs(10), client.get(proxy.addr, HOST, &evil))
        .await
        .expect("answered within 10 s");
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.echo().path.ends_with(&evil), "no match: unchanged");
}
