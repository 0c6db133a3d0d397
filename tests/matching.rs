//! A route may ask more of a request than its host and path (issue 24): methods, header fields
//! and query parameters. A canary header sends requests to another pool; among routes of one
//! host and prefix the one with more conditions is tried first; routes no request could tell
//! apart are refused whole, wherever they meet (one file, two routes_dir files, a reload); and the
//! match is part of the route everywhere a route is named (status, diff, probation).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use http::StatusCode;

const HOST: &str = "app.example.test";
const RELOAD: &str = "reload: {interval: 50ms}";

fn canary_routes(stable: &Backend, canary: &Backend) -> String {
    format!(
        concat!(
            "  - {{name: stable, host: \"{h}\", path: /api, upstreams: [\"{s}\"]}}\n",
            "  - {{name: canary, host: \"{h}\", path: /api, match: {{headers: {{x-canary: \"true\"}}}}, upstreams: [\"{c}\"]}}\n",
            "  - {{name: debug, host: \"{h}\", path: /api, match: {{methods: [GET, HEAD], query: {{debug: \"1\"}}}}, respond: {{body: debug}}}}\n",
            "  - {{name: reports, host: \"{h}\", path: /reports, match: {{methods: [GET, HEAD]}}, upstreams: [\"{s}\"]}}\n",
        ),
        h = HOST,
        s = stable.url(),
        c = canary.url()
    )
}

async fn fetch(
    client: &Client,
    proxy: &Proxy,
    proto: Proto,
    method: &str,
    path: &str,
    fields: &[(&str, &str)],
) -> Got {
    client
        .fetch_with(proxy.addr, HOST, proto, method, path, fields)
        .await
}

#[tokio::test]
async fn a_canary_header_a_method_and_a_query_parameter_each_pick_their_route() {
    let pki = Pki::new();
    let (stable, canary) = (
        Backend::start("stable").await,
        Backend::start("canary").await,
    );
    let proxy = Proxy::start(&pki, &[HOST], "", &canary_routes(&stable, &canary)).await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let to = |got: &Got| got.echo().backend;
        let got = fetch(&client, &proxy, proto, "GET", "/api/x", &[]).await;
        assert_eq!(to(&got), "stable", "{proto:?}");
        let canary_req = [("x-canary", "true")];
        let got = fetch(&client, &proxy, proto, "POST", "/api/x", &canary_req).await;
        assert_eq!(to(&got), "canary", "{proto:?}");
        // A value compares whole: `TRUE` and `true-ish` are not `true`.
        for other in ["TRUE", "true-ish", ""] {
            let got = fetch(
                &client,
                &proxy,
                proto,
                "GET",
                "/api",
                &[("x-canary", other)],
            )
            .await;
            assert_eq!(to(&got), "stable", "{proto:?} {other:?}");
        }
        // Two conditions (methods and query) beat one (the header), whatever the file order.
        let got = fetch(&client, &proxy, proto, "GET", "/api?debug=1", &canary_req).await;
        assert_eq!(got.text(), "debug", "{proto:?}");
        let got = fetch(&client, &proxy, proto, "GET", "/api?x=2&debug=%31", &[]).await;
        assert_eq!(
            got.text(),
            "debug",
            "{proto:?}: query values compare decoded"
        );
        let got = fetch(&client, &proxy, proto, "POST", "/api?debug=1", &[]).await;
        assert_eq!(
            to(&got),
            "stable",
            "{proto:?}: POST is not in the debug route's methods"
        );
        // A route whose only condition fails, with no other route for the host: 404 as ever.
        let got = fetch(&client, &proxy, proto, "GET", "/reports/q1", &[]).await;
        assert_eq!(to(&got), "stable", "{proto:?}");
        let got = fetch(&client, &proxy, proto, "DELETE", "/reports/q1", &[]).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{proto:?}");
    }
    // /status.json and the status page show each route's conditions in their canonical form.
    let status = status_json(&proxy).await;
    let matches: Vec<serde_json::Value> = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["match"].clone())
        .collect();
    assert_eq!(
        matches,
        [
            serde_json::Value::Null,
            "header x-canary = \"true\"".into(),
            "methods GET,HEAD; query \"debug\" = \"1\"".into(),
            "methods GET,HEAD".into(),
        ]
    );
    let (code, page) = admin_get(proxy.admin(), "/").await;
    assert_eq!(code, 200);
    assert!(
        page.contains("header x-canary = &quot;true&quot;"),
        "the page shows the match, escaped"
    );
}

#[tokio::test]
async fn routes_no_request_could_tell_apart_are_refused_and_the_served_set_stays() {
    let pki = Pki::new();
    let (stable, canary) = (
        Backend::start("stable").await,
        Backend::start("canary").await,
    );
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let good = config_yaml(RELOAD, &canary_routes(&stable, &canary));
    let proxy = Proxy::start_in(dir, &good).await;
    let client = Client::new(&pki);
    let gen = proxy.generation();

    // The same conditions spelled another way (header case, method order) on another upstream.
    let twin = format!(
        "  - {{name: twin, host: \"{HOST}\", path: /api, match: {{methods: [HEAD, GET], query: {{debug: \"1\"}}}}, upstreams: [\"{}\"]}}\n",
        canary.url()
    );
    let bad = config_yaml(RELOAD, &(canary_routes(&stable, &canary) + &twin));
    std::fs::write(proxy.path("candidate.yaml"), &bad).unwrap();
    let (code, said) = check_config(&proxy.path("candidate.yaml"));
    assert_ne!(code, 0, "{said}");
    assert!(
        said.contains("no request could tell the two apart"),
        "{said}"
    );
    let twin_line = bad.lines().position(|l| l.contains("twin")).unwrap() + 1;
    assert!(said.contains(&format!(":{twin_line}:")), "{said}");

    // Shipped anyway: refused whole, logged once, and the previous routes keep serving.
    write_atomic(&proxy.config_path, &bad);
    eventually(PATIENCE, "the edit is refused", || async {
        !proxy.status().config.errors.is_empty()
    })
    .await;
    assert_eq!(proxy.generation(), gen);
    let got = fetch(&client, &proxy, Proto::H2, "GET", "/api?debug=1", &[]).await;
    assert_eq!(got.text(), "debug");

    // A condition that means nothing is refused at its key's line and column.
    let typo = format!(
        "  - {{host: \"{HOST}\", path: /x, respond: {{}},\n     match: {{headers: {{\"x canary\": \"1\"}}}}}}\n"
    );
    std::fs::write(proxy.path("typo.yaml"), config_yaml("", &typo)).unwrap();
    let (code, said) = check_config(&proxy.path("typo.yaml"));
    assert_ne!(code, 0, "{said}");
    let key_line = config_yaml("", &typo)
        .lines()
        .position(|l| l.contains("x canary"))
        .unwrap()
        + 1;
    assert!(
        said.contains(&format!(":{key_line}:")) && said.contains("not a valid header name"),
        "{said}"
    );

    // Put back: the error clears at the next poll.
    write_atomic(&proxy.config_path, &good);
    eventually(PATIENCE, "the error clears", || async {
        proxy.status().config.errors.is_empty()
    })
    .await;
}

/// A path and its variants belong to one file: a routes_dir file that adds a canary to a path
/// another file serves is refused (else a condition that always holds, such as a header's
/// absence, would take that path from its owner); the owning file adds the canary itself.
#[tokio::test]
async fn a_canary_lives_in_the_file_that_serves_its_path() {
    let pki = Pki::new();
    let (stable, canary) = (
        Backend::start("stable").await,
        Backend::start("canary").await,
    );
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let routes_d = dir.path().join("routes.d");
    std::fs::create_dir(&routes_d).unwrap();
    let stable_route = format!(
        "  - {{host: \"{HOST}\", path: /api, upstreams: [\"{}\"]}}\n",
        stable.url()
    );
    let canary_route = |condition: &str| {
        format!(
            "  - {{host: \"{HOST}\", path: /api, match: {{headers: {{{condition}}}}}, upstreams: [\"{}\"]}}\n",
            canary.url()
        )
    };
    write_atomic(
        &routes_d.join("team.yaml"),
        &format!("routes:\n{stable_route}"),
    );
    let yaml = config_yaml(&format!("{RELOAD}\nroutes_dir: ./routes.d"), "  []");
    let proxy = Proxy::start_in(dir, &yaml).await;
    let client = Client::new(&pki);
    let to = |got: Got| got.echo().backend;

    // Another file's "canary" that would hold for every request: refused, alone.
    let gen = proxy.generation();
    write_atomic(
        &routes_d.join("aaa-takeover.yaml"),
        &format!("routes:\n{}", canary_route("x-zz: {present: false}")),
    );
    eventually(PATIENCE, "the takeover file is refused", || async {
        let st = status_json(&proxy).await;
        st["config_files"].as_array().unwrap().iter().any(|f| {
            f["file"]
                .as_str()
                .is_some_and(|p| p.ends_with("aaa-takeover.yaml"))
                && f["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("its host and path is already served by"))
        })
    })
    .await;
    assert_eq!(proxy.generation(), gen);
    assert_eq!(
        to(fetch(&client, &proxy, Proto::H1, "GET", "/api", &[]).await),
        "stable"
    );

    // The owner ships the canary beside its stable route: both serve.
    std::fs::remove_file(routes_d.join("aaa-takeover.yaml")).unwrap();
    write_atomic(
        &routes_d.join("team.yaml"),
        &format!(
            "routes:\n{stable_route}{}",
            canary_route("x-canary: \"true\"")
        ),
    );
    eventually(PATIENCE, "the canary is served", || async {
        let got = fetch(
            &client,
            &proxy,
            Proto::H2,
            "GET",
            "/api",
            &[("x-canary", "true")],
        )
        .await;
        got.status == StatusCode::OK && to(got) == "canary"
    })
    .await;
    assert_eq!(
        to(fetch(&client, &proxy, Proto::H1, "GET", "/api", &[]).await),
        "stable"
    );
}

/// `--check --diff` names a route by its host, path and match: the running config against its
/// own instance has no changes, and a new canary is one added line.
#[tokio::test(flavor = "multi_thread")]
async fn the_diff_names_a_route_by_its_match_too() {
    let pki = Pki::new();
    let (stable, canary) = (
        Backend::start("stable").await,
        Backend::start("canary").await,
    );
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let routes = canary_routes(&stable, &canary);
    let proxy = Proxy::start_in(dir, &config_yaml(RELOAD, &routes)).await;
    let diff = |config: std::path::PathBuf| {
        let url = format!("http://{}", proxy.admin());
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_limen"))
                .arg("--config")
                .arg(config)
                .args(["--check", "--diff", &url])
                .env_remove("LIMEN_ADMIN_TOKEN")
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        })
    };
    let (code, out) = diff(proxy.config_path.clone()).await.unwrap();
    assert_eq!((code, out.as_str()), (Some(0), "no changes\n"));

    let beta = format!(
        "  - {{name: beta, host: \"{HOST}\", path: /api, match: {{headers: {{x-env: {{prefix: beta}}}}}}, upstreams: [\"{}\"]}}\n",
        canary.url()
    );
    let next = proxy.path("next.yaml");
    std::fs::write(&next, config_yaml(RELOAD, &(routes + &beta))).unwrap();
    let (code, out) = diff(next).await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        out,
        format!(
            "+ route {HOST} /api [header x-env prefix \"beta\"] -> {}\n",
            canary.url()
        )
    );
}

/// Probation judges the routes a change added by their whole identity: a new canary whose pool
/// fails is rolled back by itself, and the stable route of the same path is neither judged nor
/// touched.
#[tokio::test]
async fn a_failing_canary_is_rolled_back_and_the_stable_route_of_its_path_is_not_judged() {
    let pki = Pki::new();
    let stable = Backend::start("stable").await;
    let probation =
        "reload: {interval: 50ms, probation: {window: 3s, min_requests: 10, max_error_ratio: 0.5}}";
    let plain = format!(
        "  - {{host: \"{HOST}\", path: /api, upstreams: [\"{}\"]}}\n",
        stable.url()
    );
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let proxy = Proxy::start_in(dir, &config_yaml(probation, &plain)).await;
    let client = Client::new(&pki);
    let gen_before = proxy.generation();
    let (dead, _hold) = refused_port();
    let canary = format!(
        "  - {{host: \"{HOST}\", path: /api, match: {{headers: {{x-canary: \"true\"}}}}, upstreams: [\"http://{dead}\"]}}\n"
    );
    proxy
        .reconfigure(&config_yaml(probation, &(plain + &canary)), PATIENCE)
        .await;
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    for _ in 0..12 {
        let mut req = conn.request("GET", HOST, "/api", body(""));
        req.headers_mut()
            .insert("x-canary", http::HeaderValue::from_static("true"));
        let got = conn.fetch(req).await.unwrap();
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        let got = conn.get(HOST, "/api").await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
    }
    eventually(PATIENCE, "the canary is rolled back", || async {
        status_json(&proxy).await["reload"]["config"]["rolled_back"]["generation"] == gen_before
    })
    .await;
    let reason = status_json(&proxy).await["reload"]["config"]["rolled_back"]["reason"].clone();
    // Only the canary's answers were judged: all of them failed, and none of the stable ones.
    assert!(
        reason
            .as_str()
            .is_some_and(|r| r.ends_with(" requests failed") && {
                let counts = r.rsplit(": ").next().unwrap_or("");
                let mut n = counts.split(" of ");
                n.next() == n.next().map(|a| a.trim_end_matches(" requests failed"))
            }),
        "{reason}"
    );
    let mut req = conn.request("GET", HOST, "/api", body(""));
    req.headers_mut()
        .insert("x-canary", http::HeaderValue::from_static("true"));
    let got = conn.fetch(req).await.unwrap();
    assert_eq!(got.echo().backend, "stable");
}

const PATIENCE: Duration = Duration::from_secs(10);
