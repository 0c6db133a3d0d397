//! `reload.probation`: a config change whose new or changed routes fail is rolled back by
//! itself, a good one is kept, and routes the change did not touch never trigger anything.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use http::StatusCode;

const HOST: &str = "app.test";
const PROBATION: &str =
    "reload: {interval: 50ms, probation: {window: 3s, min_requests: 10, max_error_ratio: 0.5}}";

fn route(path: &str, upstream: &str) -> String {
    format!("  - {{host: {HOST}, path: {path}, upstreams: [\"{upstream}\"]}}\n")
}

/// An address nothing listens on: a typo'd upstream.
fn dead_upstream() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

async fn statuses(client: &Client, proxy: &Proxy, path: &str, n: usize) -> Vec<StatusCode> {
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(conn.get(HOST, path).await.unwrap().status);
    }
    out
}

async fn metrics(proxy: &Proxy) -> String {
    admin_get(proxy.admin(), "/metrics").await.1
}

fn file_metric(m: &str, name: &str, file: &std::path::Path) -> Option<f64> {
    metric(m, &format!("{name}{{file=\"{}\"}}", file.display()))
}

#[tokio::test]
async fn a_typo_in_an_upstream_is_rolled_back_by_itself() {
    let pki = Pki::new();
    let good = Switch::start("good").await;
    let yaml = |up: &str| config_yaml(PROBATION, &route("/api", up));
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let proxy = Proxy::start_in(dir, &yaml(&good.url())).await;
    let client = Client::new(&pki);
    let gen_before = proxy.generation();

    // The typo ships: every request on the changed route fails.
    proxy.reconfigure(&yaml(&dead_upstream()), PATIENCE).await;
    let failed = statuses(&client, &proxy, "/api", 12).await;
    assert!(
        failed.iter().all(|s| *s == StatusCode::BAD_GATEWAY),
        "{failed:?}"
    );

    // Within a poll, limen puts the previous routes back by itself.
    eventually(PATIENCE, "the change is rolled back", || async {
        statuses(&client, &proxy, "/api", 1).await == [StatusCode::OK]
    })
    .await;
    let st = status_json(&proxy).await;
    let rb = &st["reload"]["config"]["rolled_back"];
    assert_eq!(rb["generation"], gen_before, "{rb}");
    let reason = rb["reason"].as_str().unwrap();
    // Every answer on the changed route failed: the 12 above and any sent while waiting.
    let counts = reason
        .strip_prefix(&format!("rolled back to generation {gen_before}: "))
        .and_then(|r| r.strip_suffix(" requests failed"))
        .and_then(|r| r.split_once(" of "))
        .map(|(f, a)| (f.parse::<u32>().unwrap(), a.parse::<u32>().unwrap()));
    assert!(counts.is_some_and(|(f, a)| f == a && f >= 12), "{reason}");
    let event = &st["reload"]["history"][0];
    assert_eq!(event["result"], "rolled_back", "{event}");
    assert_eq!(event["file"], proxy.config_path.display().to_string());
    let m = metrics(&proxy).await;
    let file = &proxy.config_path;
    assert_eq!(
        file_metric(&m, "limen_config_rollbacks_total", file),
        Some(1.0)
    );
    assert_eq!(file_metric(&m, "limen_config_pending", file), Some(1.0));
    assert_eq!(st["config_files"][0]["pending"], true);

    // The same content is not applied again, even when the file is touched or polled again.
    let gen = proxy.generation();
    let text = std::fs::read_to_string(file).unwrap();
    write_atomic(file, &text);
    for _ in 0..5 {
        let polls = proxy.status().polls;
        eventually(PATIENCE, "a poll", || async {
            proxy.status().polls > polls
        })
        .await;
    }
    assert_eq!(proxy.generation(), gen, "the refused content came back");
    assert_eq!(statuses(&client, &proxy, "/api", 1).await, [StatusCode::OK]);

    // A fixed file applies, and clears the pending flag.
    let other = Switch::start("other").await;
    proxy.reconfigure(&yaml(&other.url()), PATIENCE).await;
    assert_eq!(statuses(&client, &proxy, "/api", 1).await, [StatusCode::OK]);
    assert_eq!(other.hits.load(Ordering::Relaxed), 1);
    let m = metrics(&proxy).await;
    assert_eq!(file_metric(&m, "limen_config_pending", file), Some(0.0));
}

#[tokio::test]
async fn a_good_change_is_kept_after_its_window() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    let yaml = |up: &str| config_yaml(PROBATION, &route("/api", up));
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let proxy = Proxy::start_in(dir, &yaml(&a.url())).await;
    let client = Client::new(&pki);

    proxy.reconfigure(&yaml(&b.url()), PATIENCE).await;
    let gen = proxy.generation();
    // A few failures among many answers stay under the ratio.
    b.answer.store(503, Ordering::Relaxed);
    let some_failed = statuses(&client, &proxy, "/api", 4).await;
    b.answer.store(200, Ordering::Relaxed);
    let fine = statuses(&client, &proxy, "/api", 16).await;
    assert!(some_failed
        .iter()
        .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE));
    assert!(fine.iter().all(|s| *s == StatusCode::OK));
    // Past the window (3 s) and a few polls more, nothing was rolled back.
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let polls = proxy.status().polls;
    eventually(PATIENCE, "more polls", || async {
        proxy.status().polls > polls + 2
    })
    .await;
    assert_eq!(proxy.generation(), gen);
    let st = status_json(&proxy).await;
    assert!(st["reload"]["config"]["rolled_back"].is_null(), "{st}");
    // After the window, failures on the new route no longer count.
    b.answer.store(502, Ordering::Relaxed);
    let _ = statuses(&client, &proxy, "/api", 12).await;
    let polls = proxy.status().polls;
    eventually(PATIENCE, "more polls", || async {
        proxy.status().polls > polls + 2
    })
    .await;
    assert_eq!(proxy.generation(), gen, "a kept change was rolled back");
    assert_eq!(b.hits.load(Ordering::Relaxed), 32);
}

#[tokio::test]
async fn failures_on_routes_the_change_did_not_touch_trigger_nothing() {
    let pki = Pki::new();
    let (stable, a, b) = (
        Switch::start("stable").await,
        Switch::start("a").await,
        Switch::start("b").await,
    );
    let yaml = |up: &str| {
        config_yaml(
            PROBATION,
            &(route("/stable", &stable.url()) + &route("/api", up)),
        )
    };
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let proxy = Proxy::start_in(dir, &yaml(&a.url())).await;
    let client = Client::new(&pki);

    proxy.reconfigure(&yaml(&b.url()), PATIENCE).await;
    let gen = proxy.generation();
    // The upstream of the route the change left alone breaks down during probation.
    stable.answer.store(502, Ordering::Relaxed);
    let failed = statuses(&client, &proxy, "/stable", 20).await;
    assert!(failed.iter().all(|s| *s == StatusCode::BAD_GATEWAY));
    let ok = statuses(&client, &proxy, "/api", 10).await;
    assert!(ok.iter().all(|s| *s == StatusCode::OK));
    for _ in 0..5 {
        let polls = proxy.status().polls;
        eventually(PATIENCE, "a poll", || async {
            proxy.status().polls > polls
        })
        .await;
    }
    assert_eq!(
        proxy.generation(),
        gen,
        "an untouched route's failures rolled back a change"
    );
    assert_eq!(statuses(&client, &proxy, "/api", 1).await, [StatusCode::OK]);
    assert_eq!(b.hits.load(Ordering::Relaxed), 11);
}

#[tokio::test]
async fn a_routes_dir_file_is_rolled_back_alone() {
    let pki = Pki::new();
    let (good, kept) = (Switch::start("good").await, Switch::start("kept").await);
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let routes_d = dir.path().join("routes.d");
    std::fs::create_dir(&routes_d).unwrap();
    let file = |name: &str, path: &str, up: &str| {
        write_atomic(
            &routes_d.join(name),
            &format!("routes:\n{}", route(path, up)),
        );
    };
    file("a.yaml", "/a", &good.url());
    file("b.yaml", "/b", &kept.url());
    let yaml = config_yaml(&format!("{PROBATION}\nroutes_dir: ./routes.d"), "  []");
    let proxy = Proxy::start_in(dir, &yaml).await;
    let client = Client::new(&pki);

    let gen = proxy.generation();
    file("a.yaml", "/a", &dead_upstream());
    eventually(PATIENCE, "a.yaml applied", || async {
        proxy.generation() > gen
    })
    .await;
    let failed = statuses(&client, &proxy, "/a", 10).await;
    assert!(failed.iter().all(|s| *s == StatusCode::BAD_GATEWAY));
    eventually(PATIENCE, "a.yaml rolled back", || async {
        statuses(&client, &proxy, "/a", 1).await == [StatusCode::OK]
    })
    .await;
    assert_eq!(statuses(&client, &proxy, "/b", 1).await, [StatusCode::OK]);
    let m = metrics(&proxy).await;
    let a = routes_d.join("a.yaml");
    assert_eq!(
        file_metric(&m, "limen_config_rollbacks_total", &a),
        Some(1.0)
    );
    assert_eq!(file_metric(&m, "limen_config_pending", &a), Some(1.0));
    assert_eq!(
        file_metric(&m, "limen_config_pending", &routes_d.join("b.yaml")),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_new_routes_file_that_fails_is_taken_out_again() {
    let pki = Pki::new();
    let good = Switch::start("good").await;
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let routes_d = dir.path().join("routes.d");
    std::fs::create_dir(&routes_d).unwrap();
    write_atomic(
        &routes_d.join("a.yaml"),
        &format!("routes:\n{}", route("/a", &good.url())),
    );
    let yaml = config_yaml(&format!("{PROBATION}\nroutes_dir: ./routes.d"), "  []");
    let proxy = Proxy::start_in(dir, &yaml).await;
    let client = Client::new(&pki);

    // A file that was not there before ships a route to nowhere.
    let gen = proxy.generation();
    let new = routes_d.join("new.yaml");
    write_atomic(
        &new,
        &format!("routes:\n{}", route("/new", &dead_upstream())),
    );
    eventually(PATIENCE, "new.yaml applied", || async {
        proxy.generation() > gen
    })
    .await;
    let failed = statuses(&client, &proxy, "/new", 10).await;
    assert!(failed.iter().all(|s| *s == StatusCode::BAD_GATEWAY));
    eventually(PATIENCE, "new.yaml's routes are taken out", || async {
        statuses(&client, &proxy, "/new", 1).await == [StatusCode::NOT_FOUND]
    })
    .await;
    assert_eq!(statuses(&client, &proxy, "/a", 1).await, [StatusCode::OK]);
    let m = metrics(&proxy).await;
    assert_eq!(
        file_metric(&m, "limen_config_rollbacks_total", &new),
        Some(1.0)
    );
    assert_eq!(file_metric(&m, "limen_config_pending", &new), Some(1.0));
}

const PATIENCE: Duration = Duration::from_secs(5);
