//! An operator watches limen: health and readiness, Prometheus metrics, the status data and the
//! status page (in a real headless browser), and a Kubernetes ConfigMap update seen live.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

const FAST: &str = "reload:\n  interval: 50ms";

fn metric_value(metrics: &str, line_prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_cover_requests_upstreams_connections_handshakes_reloads_and_certs() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue_until(&["app.test"], 2090)
        .write(&dir.path().join("certs"), "app");
    let routes = format!(
        "  - {{name: api, host: \"*\", path: /api, upstreams: [\"{}\"]}}\n  - {{host: \"*\", respond: {{}}}}\n",
        b.url()
    );
    let proxy = Proxy::start_in(dir, &config_yaml(FAST, &routes)).await;
    let client = Client::new(&pki);
    for _ in 0..3 {
        assert_eq!(
            client.get(proxy.addr, "app.test", "/api/x").await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        client.get(proxy.addr, "app.test", "/").await.status,
        StatusCode::OK
    );
    let _ = client.served_names(proxy.addr, "unknown.test").await; // a refused handshake

    let (code, m) = admin_get(proxy.admin(), "/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "limen_requests_total",
        "limen_request_duration_seconds_bucket",
        "limen_upstream_requests_total",
        "limen_connections_open",
        "limen_tls_handshakes_total",
        "limen_reloads_total",
        "limen_config_reload_successful",
        "limen_config_last_reload_success_timestamp_seconds",
        "limen_certificate_expiry_timestamp_seconds",
        "limen_snapshot_generation",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    assert_eq!(
        metric_value(&m, "limen_requests_total{route=\"api\",code=\"200\"}"),
        Some(3.0)
    );
    assert_eq!(
        metric_value(&m, "limen_requests_total{route=\"1\",code=\"200\"}"),
        Some(1.0)
    );
    let up = format!(
        "limen_upstream_requests_total{{upstream=\"{}\",result=\"ok\"}}",
        b.addr
    );
    assert_eq!(metric_value(&m, &up), Some(3.0), "{m}");
    assert_eq!(
        metric_value(&m, "limen_tls_handshakes_total{result=\"failure\"}"),
        Some(1.0)
    );
    assert!(
        metric_value(&m, "limen_tls_handshakes_total{result=\"success\"}").unwrap_or(0.0) >= 4.0
    );
    assert_eq!(
        metric_value(&m, "limen_config_reload_successful"),
        Some(1.0)
    );
    assert_eq!(metric_value(&m, "limen_snapshot_generation"), Some(1.0));
    let expiry = m
        .lines()
        .find(|l| l.starts_with("limen_certificate_expiry_timestamp_seconds{name=\"app.test\""))
        .unwrap_or_else(|| panic!("no expiry gauge for app.test:\n{m}"));
    assert!(expiry.contains("app.crt"), "{expiry}");
    assert!(
        expiry.ends_with(" 3786912000"),
        "2090-01-01T00:00:00Z: {expiry}"
    );
    assert!(expiry.contains("/certs/app.crt\""), "{expiry}");

    // A broken config: the gauge says so, the failure is counted, and fixing it recovers.
    let good = std::fs::read_to_string(&proxy.config_path).unwrap();
    write_atomic(
        &proxy.config_path,
        &format!("{good}  - {{host: \"*\", upstreams: [nope]}}\n"),
    );
    eventually(
        Duration::from_secs(2),
        "limen_config_reload_successful 0",
        || async {
            let (_, m) = admin_get(proxy.admin(), "/metrics").await;
            metric_value(&m, "limen_config_reload_successful") == Some(0.0)
                && metric_value(
                    &m,
                    "limen_reloads_total{kind=\"config\",result=\"failure\"}",
                ) == Some(1.0)
        },
    )
    .await;
    write_atomic(&proxy.config_path, &good.replace("name: api", "name: api2"));
    eventually(Duration::from_secs(2), "recovered", || async {
        let (_, m) = admin_get(proxy.admin(), "/metrics").await;
        metric_value(&m, "limen_config_reload_successful") == Some(1.0)
            && metric_value(&m, "limen_snapshot_generation") == Some(2.0)
    })
    .await;
    // The renamed route's old series are gone rather than kept until restart.
    let (_, m) = admin_get(proxy.admin(), "/metrics").await;
    assert!(!m.contains("route=\"api\""), "{m}");
    assert_eq!(
        client.get(proxy.addr, "app.test", "/api/x").await.status,
        StatusCode::OK
    );
    let (_, m) = admin_get(proxy.admin(), "/metrics").await;
    assert_eq!(
        metric_value(&m, "limen_requests_total{route=\"api2\",code=\"200\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn health_readiness_and_status_json() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(
        &pki,
        &["app.test", "www.app.test"],
        FAST,
        &format!(
            "  - {{host: app.test, path: /api, upstreams: [\"{}\"]}}\n",
            b.url()
        ),
    )
    .await;
    assert_eq!(admin_get(proxy.admin(), "/healthz").await.0, 200);
    assert_eq!(admin_get(proxy.admin(), "/readyz").await.0, 200);
    assert_eq!(admin_get(proxy.admin(), "/nope").await.0, 404);
    let (code, body) = admin_get(proxy.admin(), "/status.json").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["generation"], 1);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_seconds"].is_u64());
    assert_eq!(v["routes"][0]["host"], "app.test");
    assert_eq!(v["routes"][0]["path"], "/api");
    assert_eq!(v["routes"][0]["upstreams"][0], b.url());
    assert_eq!(
        v["certs"][0]["names"],
        serde_json::json!(["app.test", "www.app.test"])
    );
    assert!(v["certs"][0]["file"]
        .as_str()
        .unwrap()
        .ends_with("site.crt"));
    assert_eq!(v["certs"][0]["not_after"], "2099-01-01T00:00:00Z");
    assert!(v["certs"][0]["days_left"].as_i64().unwrap() > 20_000);
    for kind in ["config", "certs"] {
        assert_eq!(v["reload"][kind]["ok"], true, "{kind}");
        assert!(v["reload"][kind]["at"].as_str().unwrap().ends_with('Z'));
        assert!(v["reload"][kind]["error"].is_null());
    }
}

/// Headless Chromium over TCP only, as the status page is plain HTTP.
fn browse(url: &str, profile: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--disable-quic", "--hide-scrollbars"];
    all.extend_from_slice(args);
    common::browse(url, profile, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_certificates_and_a_failed_reload_in_a_real_browser() {
    let pki = Pki::new();
    let dir = Proxy::dir();
    let certs = dir.path().join("certs");
    pki.issue(&["app.test", "www.app.test"])
        .write(&certs, "app");
    // A cert that expires in a few days is highlighted.
    let soon = {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let days = now / 86_400 + 5;
        // civil date of `days` since the epoch (Howard Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        (y as i32, m as u8, d as u8)
    };
    pki.issue_expiring(&["soon.test"], soon)
        .write(&certs, "soon");
    let proxy = Proxy::start_in(dir, &config_yaml(FAST, "  - {host: \"*\", respond: {}}\n")).await;
    // Inject a reload error: a route with a malformed upstream.
    let good = std::fs::read_to_string(&proxy.config_path).unwrap();
    write_atomic(
        &proxy.config_path,
        &format!("{good}  - {{host: \"*\", path: /x, upstreams: [\"ftp://bad\"]}}\n"),
    );
    eventually(
        Duration::from_secs(2),
        "the failure is recorded",
        || async { proxy.status().config.failures == 1 },
    )
    .await;

    let url = format!("http://{}/", proxy.admin());
    let profile = tempfile::tempdir().unwrap();
    let shot = proxy.dir.path().join("status-page.png");
    let (url2, p2, shot2) = (url.clone(), profile.path().to_path_buf(), shot.clone());
    let (dom, shot_out) = tokio::task::spawn_blocking(move || {
        let dom = browse(&url2, &p2, &["--dump-dom"]);
        let shot = browse(
            &url2,
            &p2,
            &[
                "--window-size=1200,900",
                &format!("--screenshot={}", shot2.display()),
            ],
        );
        (dom, shot)
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(dom.contains("<h1>limen"), "the page rendered:\n{dom}");
    for name in ["app.test", "www.app.test", "soon.test"] {
        assert!(dom.contains(name), "{name} shown:\n{dom}");
    }
    assert!(
        dom.contains("reload-error"),
        "the reload error is shown:\n{dom}"
    );
    assert!(
        dom.contains("ftp://bad") && dom.contains("proxy.yaml:"),
        "with its cause and place:\n{dom}"
    );
    assert!(
        dom.contains("class=\"bad\">failed"),
        "the config reload is marked failed:\n{dom}"
    );
    let soon_row = dom
        .split("<tr")
        .find(|row| row.contains("soon.test"))
        .unwrap();
    assert!(
        soon_row.contains("expiring"),
        "a cert 5 days from expiry is highlighted: {soon_row}"
    );
    let app_row = dom
        .split("<tr")
        .find(|row| row.contains("www.app.test"))
        .unwrap();
    assert!(!app_row.contains("expiring"));
    assert!(
        shot_out.status.success(),
        "{}",
        String::from_utf8_lossy(&shot_out.stderr)
    );
    let png = std::fs::read(&shot).expect("a screenshot was saved");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5000,
        "{} bytes",
        png.len()
    );
    if let Ok(keep) = std::env::var("LIMEN_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}

#[tokio::test]
async fn a_configmap_update_by_kubelet_symlink_swap_is_applied_live() {
    let pki = Pki::new();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    // The config itself is a ConfigMap mounted as a directory: proxy.yaml -> ..data/proxy.yaml.
    let dir = Proxy::dir();
    pki.issue(&["app.test"])
        .write(&dir.path().join("certs"), "app");
    let cm = dir.path().join("cm");
    let ts1 = "..2026_11_25_08_00_00.1";
    let yaml = |up: &str| {
        config_yaml(
            FAST,
            &format!("  - {{host: \"*\", upstreams: [\"{up}\"]}}\n"),
        )
        .replace("./certs", "../certs")
    };
    std::fs::create_dir_all(cm.join(ts1)).unwrap();
    std::fs::write(cm.join(ts1).join("proxy.yaml"), yaml(&a.url())).unwrap();
    std::os::unix::fs::symlink(ts1, cm.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/proxy.yaml", cm.join("proxy.yaml")).unwrap();
    let config_path = cm.join("proxy.yaml");
    let running = limen::server::start(&config_path).await.unwrap();
    let addr = running.https_addr;
    let client = Client::new(&pki);
    let mut conn = client.open(addr, "app.test", Proto::H2).await;
    assert_eq!(conn.get("app.test", "/").await.unwrap().echo().backend, "a");

    let ts2 = "..2026_11_25_08_01_00.2";
    std::fs::create_dir_all(cm.join(ts2)).unwrap();
    std::fs::write(cm.join(ts2).join("proxy.yaml"), yaml(&b.url())).unwrap();
    std::os::unix::fs::symlink(ts2, cm.join("..data_tmp")).unwrap();
    std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
    std::fs::remove_dir_all(cm.join(ts1)).unwrap();
    // The same HTTP/2 connection sees the new routes on its next request.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        if conn.get("app.test", "/").await.unwrap().echo().backend == "b" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new ConfigMap was not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_each_upstreams_health_in_a_real_browser() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    a.health.store(503, std::sync::atomic::Ordering::SeqCst);
    let routes = format!(
        "  - {{name: app, host: \"app.test\", upstreams: [\"{}\", {{url: \"{}\", weight: 3}}], health: {{path: /healthz, interval: 100ms, timeout: 100ms, unhealthy_after: 1}}}}\n",
        a.url(),
        b.url()
    );
    let proxy = Proxy::start(&pki, &["app.test"], FAST, &routes).await;
    eventually(Duration::from_secs(10), "a is down", || async {
        upstream_state(&proxy, "app", &a.url()).await["state"] == "down"
    })
    .await;
    let url = format!("http://{}/", proxy.admin());
    let profile = tempfile::tempdir().unwrap();
    let dom = tokio::task::spawn_blocking(move || browse(&url, profile.path(), &["--dump-dom"]))
        .await
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let routes = dom.split("id=\"routes\"").nth(1).unwrap_or("");
    let row = routes
        .split("<tr")
        .find(|row| row.contains("app.test"))
        .unwrap_or_else(|| panic!("the route's row:\n{dom}"));
    // In the upstreams' order, each with a mark and a word (readable without colour).
    let down = row
        .find("class=\"health down\"")
        .unwrap_or_else(|| panic!("a is shown down: {row}"));
    let up = row.find("class=\"health up\"").expect("b is shown up");
    assert!(down < up, "{row}");
    assert!(row.contains("✖ down") && row.contains("✔ up"), "{row}");
    assert!(row.contains("503"), "the reason is shown: {row}");
    assert!(row.contains("weight 3"), "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_reload_history_and_a_rollback_in_a_real_browser() {
    let pki = Pki::new();
    let good = Switch::start("good").await;
    let probation =
        "reload: {interval: 50ms, probation: {window: 5s, min_requests: 3, max_error_ratio: 0.5}}";
    let yaml = |up: &str| {
        config_yaml(
            probation,
            &format!("  - {{host: app.test, path: /api, upstreams: [\"{up}\"]}}\n"),
        )
    };
    let dir = Proxy::dir();
    pki.issue(&["app.test"])
        .write(&dir.path().join("certs"), "app");
    let proxy = Proxy::start_in(dir, &yaml(&good.url())).await;
    let client = Client::new(&pki);
    // A broken edit, then a typo'd upstream that probation rolls back.
    write_atomic(&proxy.config_path, "listen: [not a map\n");
    eventually(
        Duration::from_secs(3),
        "the failure is recorded",
        || async { proxy.status().config.failures == 1 },
    )
    .await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    proxy
        .reconfigure(&yaml(&dead), Duration::from_secs(3))
        .await;
    let mut conn = client.open(proxy.addr, "app.test", Proto::H1).await;
    for _ in 0..4 {
        let _ = conn.get("app.test", "/api").await;
    }
    eventually(
        Duration::from_secs(3),
        "the change is rolled back",
        || async { proxy.status().rolled_back.is_some() },
    )
    .await;

    let url = format!("http://{}/", proxy.admin());
    let profile = tempfile::tempdir().unwrap();
    let dom = tokio::task::spawn_blocking(move || browse(&url, profile.path(), &["--dump-dom"]))
        .await
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let notice = dom
        .split("id=\"rolled-back\"")
        .nth(1)
        .unwrap_or_else(|| panic!("the rollback is announced:\n{dom}"));
    // 3 or 4 of them: the poll that judges may fall before the last request.
    assert!(
        ["3 of 3", "4 of 4"]
            .iter()
            .any(|n| notice.contains(&format!("rolled back to generation 1: {n} requests failed"))),
        "{notice}"
    );
    let history = dom.split("id=\"history\"").nth(1).unwrap_or("");
    let events: Vec<&str> = history
        .split("<li")
        .skip(1)
        .take_while(|e| !e.starts_with("</ol"))
        .collect();
    // Newest first: rolled back, applied, failed, started.
    let results: Vec<&str> = events
        .iter()
        .map(|e| {
            ["rolled_back", "applied", "failed"]
                .into_iter()
                .find(|r| e.contains(&format!("event {r}")))
                .unwrap_or("?")
        })
        .collect();
    assert_eq!(
        results,
        ["rolled_back", "applied", "failed", "applied"],
        "{history}"
    );
    assert!(events[1].contains("routes +0 -0 ~1"), "{}", events[1]);
    assert!(events[2].contains("proxy.yaml:1:"), "{}", events[2]);
    assert!(events[3].contains("started"), "{}", events[3]);
    let files = dom.split("id=\"files\"").nth(1).unwrap_or("");
    assert!(files.contains("pending (rolled back)"), "{files}");
}
