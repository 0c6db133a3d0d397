//! Teams keep their routes in a folder of files (`routes_dir`), each file its own unit: one team's
//! broken or greedy file costs only that file, Kubernetes' ConfigMap swap of many keys at once is
//! followed, a removed file goes after two polls, and metrics and `/status.json` tell, per file,
//! what is served and what is stuck.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::check_config as check;
use common::*;
use http::StatusCode;

const HOST: &str = "app.test";
/// A poll every 50 ms.
const FAST: &str = "reload:\n  interval: 50ms";
/// No poll unless the test asks for one (as SIGHUP does): the test counts polls exactly.
const MANUAL: &str = "reload:\n  interval: 1h";
/// Many polls' worth, with room for a loaded machine.
const PATIENCE: Duration = Duration::from_secs(3);

const SUCCESSFUL: &str = "limen_config_file_reload_successful";
const FAILURES: &str = "limen_config_file_reload_failures_total";
const PENDING: &str = "limen_config_pending";

#[tokio::test]
async fn a_broken_file_keeps_its_own_routes_while_the_other_files_changes_apply() {
    let pki = Pki::new();
    let (proxy, client) = start(
        &pki,
        FAST,
        &[("/main", "main")],
        &[
            ("a.yaml", routes(&[("/a", "a1")])),
            ("b.yaml", routes(&[("/b", "b1")])),
            ("c.yaml", routes(&[("/c", "c1")])),
        ],
    )
    .await;
    let (a, b, c) = (
        routes_file(&proxy, "a.yaml"),
        routes_file(&proxy, "b.yaml"),
        routes_file(&proxy, "c.yaml"),
    );
    for (path, body) in [("/main", "main"), ("/a", "a1"), ("/b", "b1"), ("/c", "c1")] {
        assert_eq!(served(&client, &proxy, path).await.as_deref(), Some(body));
    }

    // b's team breaks their file twice in a row, in two different ways.
    let broken = [
        (
            "invalid YAML",
            "routes:\n  - {host: app.test, path: /b, respond: {body: b2\n",
            None,
        ),
        (
            "an unknown key",
            "routes:\n  - {host: app.test, path: /b, respond: {body: b2}, retries: 3}\n",
            Some("retries"),
        ),
    ];
    for (round, (what, text, needle)) in broken.into_iter().enumerate() {
        let failures = (round + 1) as f64;
        write_atomic(&b, text);
        eventually(
            PATIENCE,
            &format!("{what} in b.yaml is counted"),
            || async { per_file(&metrics(&proxy).await, FAILURES, &b) == Some(failures) },
        )
        .await;

        // Meanwhile a's and c's teams ship, and their changes apply.
        let (a_body, c_body) = (format!("a{}", round + 2), format!("c{}", round + 2));
        write_atomic(&a, &routes(&[("/a", a_body.as_str())]));
        write_atomic(&c, &routes(&[("/c", c_body.as_str())]));
        eventually(
            PATIENCE,
            "a.yaml's and c.yaml's edits are served",
            || async {
                served(&client, &proxy, "/a").await.as_deref() == Some(a_body.as_str())
                    && served(&client, &proxy, "/c").await.as_deref() == Some(c_body.as_str())
            },
        )
        .await;

        // Many polls later the failure has still been counted once, and b serves its last good.
        polls_later(&proxy, 5).await;
        assert_eq!(
            served(&client, &proxy, "/b").await.as_deref(),
            Some("b1"),
            "{what}: b.yaml's last good routes stay in force"
        );
        assert_eq!(
            served(&client, &proxy, "/main").await.as_deref(),
            Some("main")
        );
        let m = metrics(&proxy).await;
        assert_eq!(per_file(&m, SUCCESSFUL, &b), Some(0.0), "{what}\n{m}");
        assert_eq!(
            per_file(&m, FAILURES, &b),
            Some(failures),
            "{what}: counted once\n{m}"
        );
        assert_eq!(per_file(&m, PENDING, &b), Some(1.0), "{what}\n{m}");
        for healthy in [&a, &c] {
            assert_eq!(per_file(&m, SUCCESSFUL, healthy), Some(1.0), "{m}");
            assert_eq!(per_file(&m, PENDING, healthy), Some(0.0), "{m}");
        }
        let entry = file_entry(&proxy, &b).await.expect("b.yaml is listed");
        assert_eq!(entry["ok"], false, "{entry}");
        assert_eq!(entry["pending"], true, "{entry}");
        assert_eq!(
            entry["routes"], 1,
            "its last good route is still served: {entry}"
        );
        let err = entry["error"].as_str().unwrap_or_default();
        assert!(
            err.contains(&shown(&b)),
            "{what}: the error names the file: {err}"
        );
        if let Some(needle) = needle {
            assert!(err.contains(needle), "{what}: the error says what: {err}");
        }
        let a_entry = file_entry(&proxy, &a).await.expect("a.yaml is listed");
        assert_eq!(a_entry["ok"], true, "{a_entry}");
        assert!(a_entry["error"].is_null(), "{a_entry}");
    }

    // Fixed: b's new routes apply and nothing is pending any more.
    write_atomic(&b, &routes(&[("/b", "b2")]));
    eventually(PATIENCE, "the fixed b.yaml is served", || async {
        served(&client, &proxy, "/b").await.as_deref() == Some("b2")
    })
    .await;
    eventually(PATIENCE, "b.yaml is no longer pending", || async {
        let m = metrics(&proxy).await;
        per_file(&m, PENDING, &b) == Some(0.0) && per_file(&m, SUCCESSFUL, &b) == Some(1.0)
    })
    .await;
    assert_eq!(per_file(&metrics(&proxy).await, FAILURES, &b), Some(2.0));
    let entry = file_entry(&proxy, &b).await.unwrap();
    assert_eq!(entry["ok"], true, "{entry}");
    assert_eq!(entry["pending"], false, "{entry}");
    assert!(entry["error"].is_null(), "{entry}");
}

#[tokio::test]
async fn a_new_file_claiming_a_served_route_is_refused_whole_and_the_owner_keeps_it() {
    let pki = Pki::new();
    let (proxy, client) = start(
        &pki,
        FAST,
        &[("/main", "main")],
        &[("a.yaml", routes(&[("/shared", "a")]))],
    )
    .await;
    let (a, n) = (routes_file(&proxy, "a.yaml"), routes_file(&proxy, "n.yaml"));

    // Another team adds a file with a route of its own and one that a.yaml already serves.
    write_atomic(&n, &routes(&[("/own", "n-own"), ("/shared", "n")]));
    eventually(PATIENCE, "n.yaml is refused", || async {
        file_entry(&proxy, &n)
            .await
            .is_some_and(|e| e["error"].is_string())
    })
    .await;
    let entry = file_entry(&proxy, &n).await.unwrap();
    let err = entry["error"].as_str().unwrap();
    assert!(
        err.contains(&shown(&n)) && err.contains(&shown(&a)),
        "the error names both files: {err}"
    );
    assert_eq!(entry["ok"], false, "{entry}");
    assert_eq!(entry["pending"], true, "{entry}");
    assert_eq!(entry["routes"], 0, "nothing of n.yaml is served: {entry}");
    assert!(entry["sha256"].is_null(), "n.yaml never applied: {entry}");
    let st = status_json(&proxy).await;
    let config_error = st["reload"]["config"]["error"].as_str().unwrap_or_default();
    assert!(config_error.contains(&shown(&n)), "{st}");

    // However many polls later: the owner keeps the route, and the newcomer serves nothing at
    // all, not even its route that clashes with nobody.
    polls_later(&proxy, 5).await;
    assert_eq!(
        served(&client, &proxy, "/shared").await.as_deref(),
        Some("a")
    );
    assert_eq!(served(&client, &proxy, "/own").await, None);
    let m = metrics(&proxy).await;
    assert_eq!(per_file(&m, SUCCESSFUL, &n), Some(0.0), "{m}");
    assert_eq!(per_file(&m, FAILURES, &n), Some(1.0), "counted once: {m}");
    assert_eq!(per_file(&m, PENDING, &n), Some(1.0), "{m}");

    // The newcomer drops its claim: the rest of its file applies.
    write_atomic(&n, &routes(&[("/own", "n-own")]));
    eventually(PATIENCE, "n.yaml's own route is served", || async {
        served(&client, &proxy, "/own").await.as_deref() == Some("n-own")
    })
    .await;
    assert_eq!(
        served(&client, &proxy, "/shared").await.as_deref(),
        Some("a")
    );
    let entry = file_entry(&proxy, &n).await.unwrap();
    assert_eq!(entry["ok"], true, "{entry}");
    assert!(entry["error"].is_null(), "{entry}");
}

/// Another team's file cannot take a served route by spelling its path differently: prefixes are
/// compared in the form requests are routed on, so `/%61pi` is `/api` and `/a%2fb` is `/a%2Fb`,
/// and a prefix whose escapes hide a dot segment is refused outright. The newcomer's name sorts
/// first, so it would have been matched first had it applied.
#[tokio::test]
async fn a_file_spelling_a_served_path_differently_is_refused_and_the_owner_keeps_it() {
    let pki = Pki::new();
    let (proxy, client) = start(
        &pki,
        FAST,
        &[("/main", "main")],
        &[("a.yaml", routes(&[("/api", "a"), ("/a%2Fb", "a2")]))],
    )
    .await;
    let (a, first) = (routes_file(&proxy, "a.yaml"), routes_file(&proxy, "0.yaml"));
    for (spelling, owner_path, owner) in [
        ("/%61pi", "/api", Some(&a)),
        ("/a%2fb", "/a%2Fb", Some(&a)),
        ("/x/%2E%2E/api", "/api", None),
    ] {
        write_atomic(&first, &routes(&[(spelling, "intruder")]));
        eventually(PATIENCE, "0.yaml is refused", || async {
            file_entry(&proxy, &first)
                .await
                .is_some_and(|e| e["error"].is_string() && e["ok"] == false)
        })
        .await;
        let entry = file_entry(&proxy, &first).await.unwrap();
        let err = entry["error"].as_str().unwrap();
        match owner {
            Some(owner) => assert!(
                err.contains(&shown(&first)) && err.contains(&shown(owner)),
                "{spelling}: the error names both files: {err}"
            ),
            None => assert!(err.contains("normalized form"), "{spelling}: {err}"),
        }
        polls_later(&proxy, 3).await;
        let expected = if owner_path == "/api" { "a" } else { "a2" };
        for path in [owner_path, spelling] {
            assert_eq!(
                served(&client, &proxy, path).await.as_deref(),
                Some(expected),
                "{spelling}: {path} is still the owner's"
            );
        }
        std::fs::remove_file(&first).unwrap();
        eventually(PATIENCE, "0.yaml is forgotten", || async {
            file_entry(&proxy, &first).await.is_none()
        })
        .await;
    }
}

/// Whoever may add a file to routes_dir must not make limen read, let alone show, a file outside
/// it: a link out of the folder is refused unread, and no error shows a file's bytes (a parse
/// error names the file, line and column and the parser's reason, never the value it found).
#[tokio::test]
async fn a_link_out_of_the_folder_is_refused_and_no_error_shows_a_files_bytes() {
    let pki = Pki::new();
    let (proxy, client) = start(
        &pki,
        FAST,
        &[("/main", "main")],
        &[("a.yaml", routes(&[("/a", "a")]))],
    )
    .await;
    let secret = proxy.path("secret.pem");
    std::fs::write(&secret, "SECRETMARKER1 -----BEGIN PRIVATE KEY-----\n").unwrap();
    let (steal, key, bad) = (
        routes_file(&proxy, "steal.yaml"),
        routes_file(&proxy, "key.yaml"),
        routes_file(&proxy, "bad.yaml"),
    );
    std::os::unix::fs::symlink(&secret, &steal).unwrap();
    std::os::unix::fs::symlink(proxy.path("certs/site.key"), &key).unwrap();
    // Inside the folder, a type error whose value is the marker.
    std::fs::write(&bad, "routes: \"SECRETMARKER2\"\n").unwrap();
    for (file, says) in [
        (&steal, "outside routes_dir"),
        (&key, "outside routes_dir"),
        (&bad, "bad.yaml:1:"),
    ] {
        eventually(PATIENCE, "the file is refused", || async {
            file_entry(&proxy, file)
                .await
                .is_some_and(|e| e["error"].is_string())
        })
        .await;
        let entry = file_entry(&proxy, file).await.unwrap();
        let err = entry["error"].as_str().unwrap();
        assert!(err.contains(says), "{err}");
        assert_eq!(entry["routes"], 0, "{entry}");
    }
    let (_, page) = admin_get(proxy.admin(), "/").await;
    let status = status_json(&proxy).await.to_string();
    let m = metrics(&proxy).await;
    for shown in [&page, &status, &m] {
        for marker in ["SECRETMARKER", "BEGIN", "PRIVATE KEY"] {
            assert!(!shown.contains(marker), "{marker} shown: {shown}");
        }
    }
    assert_eq!(served(&client, &proxy, "/a").await.as_deref(), Some("a"));
    // limen --check says the same, without the bytes either.
    let (code, text) = check(&proxy.path("proxy.yaml"));
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("outside routes_dir") || text.contains("bad.yaml:1:"),
        "{text}"
    );
    for marker in ["SECRETMARKER", "BEGIN", "PRIVATE KEY"] {
        assert!(!text.contains(marker), "{marker} in --check: {text}");
    }
}

#[tokio::test]
async fn limen_does_not_start_on_a_conflict_between_files_or_a_broken_file() {
    let pki = Pki::new();
    let dir = site(&pki, &[("x.yaml", routes(&[("/x", "dir")]))]);
    let config = dir.path().join("proxy.yaml");
    let (x, y) = (
        dir.path().join("routes.d/x.yaml"),
        dir.path().join("routes.d/y.yaml"),
    );

    // The main file and a file of the folder serve the same host and path.
    std::fs::write(&config, main_config(FAST, &[("/x", "main")])).unwrap();
    assert_names(&start_error(&config).await, &[&config, &x]);

    // Two files of the folder do.
    std::fs::write(&config, main_config(FAST, &[("/main", "main")])).unwrap();
    std::fs::write(&y, routes(&[("/x", "y")])).unwrap();
    assert_names(&start_error(&config).await, &[&x, &y]);

    // A file of the folder is broken: strict at start, as the main file is.
    for broken in [
        "routes:\n  - {host: app.test, path: /y\n",
        "routez:\n  - {host: app.test, path: /y, respond: {body: y}}\n",
    ] {
        std::fs::write(&y, broken).unwrap();
        assert_names(&start_error(&config).await, &[&y]);
    }

    // Everything fixed: limen starts and serves every file.
    std::fs::write(&y, routes(&[("/y", "y")])).unwrap();
    let yaml = std::fs::read_to_string(&config).unwrap();
    let proxy = Proxy::start_in(dir, &yaml).await;
    let client = Client::new(&pki);
    for (path, body) in [("/main", "main"), ("/x", "dir"), ("/y", "y")] {
        assert_eq!(served(&client, &proxy, path).await.as_deref(), Some(body));
    }
}

#[test]
fn check_exits_1_naming_both_files_of_a_conflict_or_the_broken_file() {
    let pki = Pki::new();
    let dir = site(&pki, &[("x.yaml", routes(&[("/x", "dir")]))]);
    let config = dir.path().join("proxy.yaml");
    let (x, y) = (
        dir.path().join("routes.d/x.yaml"),
        dir.path().join("routes.d/y.yaml"),
    );

    std::fs::write(&config, main_config(FAST, &[("/x", "main")])).unwrap();
    let (code, text) = check(&config);
    assert_eq!(code, 1, "{text}");
    assert_names(&text, &[&config, &x]);

    std::fs::write(&config, main_config(FAST, &[("/main", "main")])).unwrap();
    std::fs::write(&y, routes(&[("/x", "y")])).unwrap();
    let (code, text) = check(&config);
    assert_eq!(code, 1, "{text}");
    assert_names(&text, &[&x, &y]);

    // One file serving one path under two spellings.
    std::fs::write(&y, routes(&[("/y", "y"), ("/%79", "y2")])).unwrap();
    let (code, text) = check(&config);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("repeats"), "{text}");

    std::fs::write(&y, "routes:\n  - {host: app.test, path: /y\n").unwrap();
    let (code, text) = check(&config);
    assert_eq!(code, 1, "{text}");
    assert_names(&text, &[&y]);

    std::fs::write(&y, routes(&[("/y", "y")])).unwrap();
    let (code, text) = check(&config);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("OK"), "{text}");
}

#[tokio::test]
async fn a_configmap_swap_of_many_keys_applies_changed_added_and_removed_keys() {
    let pki = Pki::new();
    let dir = site(&pki, &[]);
    let cm = dir.path().join("routes.d");
    // What kubelet writes: a timestamped folder, `..data` pointing at it, a link per key.
    let v1 = "..2026_01_01_00_00_00.1";
    configmap_version(
        &cm,
        v1,
        &[
            ("a.yaml", routes(&[("/a", "a1")])),
            ("b.yaml", routes(&[("/b", "b1")])),
        ],
    );
    std::os::unix::fs::symlink(v1, cm.join("..data")).unwrap();
    for key in ["a.yaml", "b.yaml"] {
        std::os::unix::fs::symlink(format!("..data/{key}"), cm.join(key)).unwrap();
    }
    let proxy = Proxy::start_in(dir, &main_config(FAST, &[("/main", "main")])).await;
    let client = Client::new(&pki);
    assert_eq!(served(&client, &proxy, "/a").await.as_deref(), Some("a1"));
    assert_eq!(served(&client, &proxy, "/b").await.as_deref(), Some("b1"));
    assert_eq!(served(&client, &proxy, "/c").await, None);

    // The ConfigMap is updated: a.yaml changed, b.yaml removed, c.yaml added. Kubelet writes
    // the new version, swaps `..data` by rename, then adds and removes the keys' links.
    let v2 = "..2026_01_01_00_01_00.2";
    configmap_version(
        &cm,
        v2,
        &[
            ("a.yaml", routes(&[("/a", "a2")])),
            ("c.yaml", routes(&[("/c", "c1")])),
        ],
    );
    std::os::unix::fs::symlink(v2, cm.join("..data_tmp")).unwrap();
    std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/c.yaml", cm.join("c.yaml")).unwrap();
    std::fs::remove_file(cm.join("b.yaml")).unwrap();
    std::fs::remove_dir_all(cm.join(v1)).unwrap();

    eventually(
        PATIENCE,
        "the new version of the ConfigMap is served",
        || async {
            served(&client, &proxy, "/a").await.as_deref() == Some("a2")
                && served(&client, &proxy, "/c").await.as_deref() == Some("c1")
                && served(&client, &proxy, "/b").await.is_none()
        },
    )
    .await;
    assert_eq!(
        served(&client, &proxy, "/main").await.as_deref(),
        Some("main")
    );
    let st = status_json(&proxy).await;
    let files: Vec<&str> = st["config_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert_eq!(f["ok"], true, "nothing failed along the way: {f}");
            f["file"].as_str().unwrap()
        })
        .collect();
    let want = [
        proxy.config_path.clone(),
        cm.join("a.yaml"),
        cm.join("c.yaml"),
    ];
    assert_eq!(files.len(), want.len(), "{files:?}");
    for f in &want {
        assert!(
            files.contains(&shown(f).as_str()),
            "{} in {files:?}",
            f.display()
        );
    }
    assert!(st["reload"]["config"]["error"].is_null(), "{st}");
}

#[tokio::test]
async fn a_removed_file_goes_at_its_second_missed_poll_and_an_added_one_comes_at_the_first() {
    let pki = Pki::new();
    let (proxy, client) = start(
        &pki,
        MANUAL,
        &[("/main", "main")],
        &[
            ("a.yaml", routes(&[("/a", "a1")])),
            ("b.yaml", routes(&[("/b", "b1")])),
        ],
    )
    .await;
    let (a, b, c) = (
        routes_file(&proxy, "a.yaml"),
        routes_file(&proxy, "b.yaml"),
        routes_file(&proxy, "c.yaml"),
    );

    // b.yaml deleted: one poll without it may be the first half of a replacement.
    std::fs::remove_file(&b).unwrap();
    poll_once(&proxy).await;
    assert_eq!(
        served(&client, &proxy, "/b").await.as_deref(),
        Some("b1"),
        "still served after the first poll that misses it"
    );
    poll_once(&proxy).await;
    assert_eq!(
        served(&client, &proxy, "/b").await,
        None,
        "gone at the second"
    );
    assert!(file_entry(&proxy, &b).await.is_none(), "no longer listed");
    assert_eq!(served(&client, &proxy, "/a").await.as_deref(), Some("a1"));

    // A new file is served at the first poll that sees it.
    std::fs::write(&c, routes(&[("/c", "c1")])).unwrap();
    poll_once(&proxy).await;
    assert_eq!(served(&client, &proxy, "/c").await.as_deref(), Some("c1"));

    // Replaced without a rename (rm, then a new write): served all along, then the new version.
    std::fs::remove_file(&a).unwrap();
    poll_once(&proxy).await;
    assert_eq!(served(&client, &proxy, "/a").await.as_deref(), Some("a1"));
    std::fs::write(&a, routes(&[("/a", "a2")])).unwrap();
    poll_once(&proxy).await;
    assert_eq!(served(&client, &proxy, "/a").await.as_deref(), Some("a2"));
    poll_once(&proxy).await;
    assert_eq!(served(&client, &proxy, "/a").await.as_deref(), Some("a2"));
}

#[tokio::test]
async fn a_files_unnamed_routes_are_labelled_by_file_and_index_and_names_are_unique_across_files() {
    let pki = Pki::new();
    let a_text = "routes:\n  - {host: app.test, path: /plain, respond: {status: 200, body: plain}}\n  - {host: app.test, path: /api, name: api, respond: {status: 200, body: api}}\n";
    let (proxy, client) = start(
        &pki,
        FAST,
        &[("/main", "main")],
        &[("a.yaml", a_text.to_string())],
    )
    .await;
    let (a, n) = (routes_file(&proxy, "a.yaml"), routes_file(&proxy, "n.yaml"));
    assert_eq!(
        served(&client, &proxy, "/plain").await.as_deref(),
        Some("plain")
    );
    for _ in 0..2 {
        assert_eq!(
            served(&client, &proxy, "/api").await.as_deref(),
            Some("api")
        );
    }
    assert_eq!(
        served(&client, &proxy, "/main").await.as_deref(),
        Some("main")
    );
    let m = metrics(&proxy).await;
    for (route, count) in [("a.yaml/0", 1.0), ("api", 2.0), ("0", 1.0)] {
        assert_eq!(
            metric(
                &m,
                &format!("limen_requests_total{{route=\"{route}\",code=\"200\"}}")
            ),
            Some(count),
            "route {route}:\n{m}"
        );
    }

    // Another file names a route `api` too: refused, like a host and path served twice.
    write_atomic(
        &n,
        "routes:\n  - {host: app.test, path: /n, name: api, respond: {status: 200, body: n}}\n",
    );
    eventually(PATIENCE, "n.yaml is refused", || async {
        file_entry(&proxy, &n)
            .await
            .is_some_and(|e| e["error"].is_string())
    })
    .await;
    let entry = file_entry(&proxy, &n).await.unwrap();
    let err = entry["error"].as_str().unwrap();
    assert!(
        err.contains(&shown(&n)) && err.contains(&shown(&a)),
        "the error names both files: {err}"
    );
    assert_eq!(served(&client, &proxy, "/n").await, None);
    assert_eq!(
        served(&client, &proxy, "/api").await.as_deref(),
        Some("api")
    );
}

#[tokio::test]
async fn config_info_shows_the_sha256_of_each_applied_file_and_follows_changes() {
    let pki = Pki::new();
    let a1 = routes(&[("/a", "a1")]);
    let (proxy, client) = start(&pki, FAST, &[("/main", "main")], &[("a.yaml", a1.clone())]).await;
    let a = routes_file(&proxy, "a.yaml");
    let main = proxy.config_path.clone();
    let main_sha = sha256_hex(&std::fs::read(&main).unwrap());

    // From the start: one series per file, the main file included.
    let m = metrics(&proxy).await;
    assert_eq!(info(&m, &main, &main_sha), Some(1.0), "{m}");
    assert_eq!(info(&m, &a, &sha256_hex(a1.as_bytes())), Some(1.0), "{m}");
    for file in [&main, &a] {
        assert_eq!(per_file(&m, SUCCESSFUL, file), Some(1.0), "{m}");
        assert_eq!(per_file(&m, FAILURES, file), Some(0.0), "{m}");
        assert_eq!(per_file(&m, PENDING, file), Some(0.0), "{m}");
    }
    let entry = file_entry(&proxy, &main)
        .await
        .expect("the main file is listed");
    assert_eq!(entry["sha256"], main_sha.as_str(), "{entry}");
    assert_eq!(entry["routes"], 1, "{entry}");

    // a.yaml changes: its series follows, the old one goes.
    let a2 = routes(&[("/a", "a2")]);
    write_atomic(&a, &a2);
    let a2_sha = sha256_hex(a2.as_bytes());
    eventually(PATIENCE, "the new SHA-256 of a.yaml is shown", || async {
        info(&metrics(&proxy).await, &a, &a2_sha) == Some(1.0)
    })
    .await;
    let m = metrics(&proxy).await;
    assert_eq!(info(&m, &a, &sha256_hex(a1.as_bytes())), None, "{m}");
    assert_eq!(info(&m, &main, &main_sha), Some(1.0), "{m}");
    assert_eq!(served(&client, &proxy, "/a").await.as_deref(), Some("a2"));
    let entry = file_entry(&proxy, &a).await.unwrap();
    assert_eq!(entry["sha256"], a2_sha.as_str(), "{entry}");

    // A broken edit: what is served (and shown) is still a2, and the file is pending.
    let broken = "routes:\n  - {host: app.test, path: /a\n";
    write_atomic(&a, broken);
    eventually(PATIENCE, "a.yaml is pending", || async {
        per_file(&metrics(&proxy).await, PENDING, &a) == Some(1.0)
    })
    .await;
    let m = metrics(&proxy).await;
    assert_eq!(info(&m, &a, &a2_sha), Some(1.0), "{m}");
    assert_eq!(info(&m, &a, &sha256_hex(broken.as_bytes())), None, "{m}");
    let entry = file_entry(&proxy, &a).await.unwrap();
    assert_eq!(
        entry["sha256"],
        a2_sha.as_str(),
        "the applied content: {entry}"
    );
    assert_eq!(entry["pending"], true, "{entry}");

    // The main file changes too: its series follows.
    let new_main = main_config(FAST, &[("/main", "main"), ("/more", "more")]);
    write_atomic(&main, &new_main);
    let new_main_sha = sha256_hex(new_main.as_bytes());
    eventually(
        PATIENCE,
        "the new SHA-256 of the main file is shown",
        || async { info(&metrics(&proxy).await, &main, &new_main_sha) == Some(1.0) },
    )
    .await;
    assert_eq!(
        served(&client, &proxy, "/more").await.as_deref(),
        Some("more")
    );
    let m = metrics(&proxy).await;
    assert_eq!(info(&m, &main, &main_sha), None, "{m}");
    assert_eq!(
        info(&m, &a, &a2_sha),
        Some(1.0),
        "a.yaml is still the same: {m}"
    );
}

// ---------------------------------------------------------------- helpers

/// List items answering each (path, body) on app.test by themselves.
#[tokio::test]
async fn a_file_whose_upstream_tls_cannot_load_is_refused_alone_and_the_others_apply() {
    let pki = Pki::new();
    let (proxy, client) = start(
        &pki,
        MANUAL,
        &[("/main", "main")],
        &[
            ("a.yaml", routes(&[("/a", "a1")])),
            ("b.yaml", routes(&[("/b", "b1")])),
        ],
    )
    .await;
    let (a, b) = (routes_file(&proxy, "a.yaml"), routes_file(&proxy, "b.yaml"));
    // b.yaml parses, but its https upstream names a CA bundle that is not there: its routes
    // cannot be served. That must cost b.yaml alone.
    write_atomic(
        &b,
        &format!(
            "routes:\n  - {{host: {HOST}, path: /b, upstreams: [\"https://127.0.0.1:9\"], upstream_tls: {{ca: ./missing-ca.pem}}}}\n"
        ),
    );
    write_atomic(&a, &routes(&[("/a", "a2")]));
    // One poll: the snapshot with both cannot be served, b takes the blame, a goes out alone.
    poll_once(&proxy).await;
    assert_eq!(served(&client, &proxy, "/a").await.as_deref(), Some("a2"));
    assert_eq!(served(&client, &proxy, "/b").await.as_deref(), Some("b1"));
    let entry = file_entry(&proxy, &b).await.unwrap();
    assert_eq!(entry["pending"], true, "{entry}");
    assert!(
        entry["error"]
            .as_str()
            .unwrap_or("")
            .contains("upstream_tls"),
        "{entry}"
    );
    let main = file_entry(&proxy, &proxy.config_path).await.unwrap();
    assert_eq!(main["ok"], true, "the main file is not to blame: {main}");
    // Later edits of other files still apply.
    write_atomic(&a, &routes(&[("/a", "a3")]));
    poll_once(&proxy).await;
    assert_eq!(served(&client, &proxy, "/a").await.as_deref(), Some("a3"));
    assert_eq!(served(&client, &proxy, "/b").await.as_deref(), Some("b1"));
    let m = metrics(&proxy).await;
    assert_eq!(per_file(&m, PENDING, &b), Some(1.0));
    assert_eq!(per_file(&m, PENDING, &a), Some(0.0));
}

#[tokio::test]
async fn a_main_file_claiming_a_files_route_is_counted_once_and_a_deleted_broken_file_is_forgotten()
{
    let pki = Pki::new();
    let (proxy, client) = start(
        &pki,
        FAST,
        &[("/main", "main")],
        &[("a.yaml", routes(&[("/a", "a1")]))],
    )
    .await;
    let main = proxy.config_path.clone();
    // The main file takes a.yaml's route: refused, and tried again at every poll (a.yaml may let
    // go), but counted and logged once.
    write_atomic(
        &main,
        &main_config(FAST, &[("/main", "main2"), ("/a", "stolen")]),
    );
    eventually(PATIENCE, "the claim is refused", || async {
        proxy.status().config.failures == 1
    })
    .await;
    polls_later(&proxy, 5).await;
    assert_eq!(proxy.status().config.failures, 1);
    let st = status_json(&proxy).await;
    let failed = st["reload"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["result"] == "failed")
        .count();
    assert_eq!(failed, 1, "one history event: {}", st["reload"]["history"]);
    assert_eq!(per_file(&metrics(&proxy).await, FAILURES, &main), Some(1.0));
    assert_eq!(served(&client, &proxy, "/a").await.as_deref(), Some("a1"));

    // A file that never loaded, then deleted: its series and status entry go with it.
    let bad = routes_file(&proxy, "bad.yaml");
    std::fs::write(&bad, "routes: [oops\n").unwrap();
    eventually(PATIENCE, "bad.yaml is pending", || async {
        per_file(&metrics(&proxy).await, PENDING, &bad) == Some(1.0)
    })
    .await;
    std::fs::remove_file(&bad).unwrap();
    eventually(PATIENCE, "bad.yaml is forgotten", || async {
        per_file(&metrics(&proxy).await, PENDING, &bad).is_none()
            && file_entry(&proxy, &bad).await.is_none()
    })
    .await;
}

fn items(answers: &[(&str, &str)]) -> String {
    answers
        .iter()
        .map(|(path, body)| {
            format!(
                "  - {{host: {HOST}, path: {path}, respond: {{status: 200, body: \"{body}\"}}}}\n"
            )
        })
        .collect()
}

/// A routes file's text.
fn routes(answers: &[(&str, &str)]) -> String {
    format!("routes:\n{}", items(answers))
}

/// The main file: `reload` settings, `routes_dir: ./routes.d`, and its own routes.
fn main_config(reload: &str, answers: &[(&str, &str)]) -> String {
    config_yaml(
        &format!("{reload}\nroutes_dir: ./routes.d"),
        &items(answers),
    )
}

/// A temp dir with a certificate for app.test and `routes.d/` holding `files`.
fn site(pki: &Pki, files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let routes_d = dir.path().join("routes.d");
    std::fs::create_dir(&routes_d).unwrap();
    for (name, text) in files {
        std::fs::write(routes_d.join(name), text).unwrap();
    }
    dir
}

/// A limen whose main file serves `main` and whose `routes.d` holds `files`.
async fn start(
    pki: &Pki,
    reload: &str,
    main: &[(&str, &str)],
    files: &[(&str, String)],
) -> (Proxy, Client) {
    let dir = site(pki, files);
    let proxy = Proxy::start_in(dir, &main_config(reload, main)).await;
    (proxy, Client::new(pki))
}

fn routes_file(proxy: &Proxy, name: &str) -> PathBuf {
    proxy.path(&format!("routes.d/{name}"))
}

/// Writes one version of a ConfigMap's keys in its timestamped folder, as kubelet does.
fn configmap_version(dir: &Path, version: &str, keys: &[(&str, String)]) {
    std::fs::create_dir_all(dir.join(version)).unwrap();
    for (key, text) in keys {
        std::fs::write(dir.join(version).join(key), text).unwrap();
    }
}

/// What app.test answers at `path`: Some(body) for a 200, None for limen's 404 (no route).
async fn served(client: &Client, proxy: &Proxy, path: &str) -> Option<String> {
    let got = client.get(proxy.addr, HOST, path).await;
    match got.status {
        StatusCode::OK => Some(got.text()),
        StatusCode::NOT_FOUND => None,
        other => panic!("{path}: unexpected {other}: {}", got.text()),
    }
}

async fn metrics(proxy: &Proxy) -> String {
    let (code, m) = admin_get(proxy.admin(), "/metrics").await;
    assert_eq!(code, 200);
    m
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// A per-file series: `NAME{file="PATH"}`.
fn per_file(metrics: &str, name: &str, file: &Path) -> Option<f64> {
    metric(metrics, &format!("{name}{{file=\"{}\"}}", file.display()))
}

/// `limen_config_info{file="PATH",sha256="HEX"}`.
fn info(metrics: &str, file: &Path, sha256: &str) -> Option<f64> {
    metric(
        metrics,
        &format!(
            "limen_config_info{{file=\"{}\",sha256=\"{sha256}\"}}",
            file.display()
        ),
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `config_files` entry of `file` in `/status.json`, if listed.
async fn file_entry(proxy: &Proxy, file: &Path) -> Option<serde_json::Value> {
    let st = status_json(proxy).await;
    st["config_files"]
        .as_array()
        .unwrap_or_else(|| panic!("no config_files in /status.json: {st}"))
        .iter()
        .find(|f| f["file"] == shown(file).as_str())
        .cloned()
}

/// Waits until `n` more polls have run.
async fn polls_later(proxy: &Proxy, n: u64) {
    let polls = proxy.status().polls;
    eventually(PATIENCE, &format!("{n} more polls ran"), || async {
        proxy.status().polls >= polls + n
    })
    .await;
}

/// Asks for one poll (as SIGHUP does) and waits until it has run; with `MANUAL`, exactly one.
async fn poll_once(proxy: &Proxy) {
    let polls = proxy.status().polls;
    proxy.running().reload_now();
    eventually(PATIENCE, "the poll ran", || async {
        proxy.status().polls > polls
    })
    .await;
    assert_eq!(proxy.status().polls, polls + 1, "exactly one poll ran");
}

/// Why `limen::server::start` refused `config`.
async fn start_error(config: &Path) -> String {
    match limen::server::start(config).await {
        Ok(_) => panic!("limen started on {}", config.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_names(text: &str, files: &[&PathBuf]) {
    for f in files {
        assert!(
            text.contains(&shown(f)),
            "{} should be named:\n{text}",
            f.display()
        );
    }
}

/// A team's routes file carries its own guards (access, rate limit, basic auth with a users file
/// beside it). When the team names a users file that is not there, that file alone is refused:
/// its previous guarded routes stay, with their check, and another team's edit applies.
#[tokio::test]
async fn a_routes_file_carries_its_guards_and_a_missing_users_file_costs_only_that_file() {
    use base64::Engine;
    let pki = Pki::new();
    let guarded = |users_file: &str, body: &str| {
        format!(
            "routes:\n  - host: {HOST}\n    path: /team\n    respond: {{body: \"{body}\"}}\n    access: {{allow: [\"127.0.0.0/8\"]}}\n    rate_limit: {{rate: 1000/s}}\n    auth: {{basic: {{users_file: {users_file}}}}}\n"
        )
    };
    let dir = site(&pki, &[("b.yaml", routes(&[("/b", "b1")]))]);
    let users = dir.path().join("routes.d/team.htpasswd");
    std::fs::write(
        &users,
        format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap()),
    )
    .unwrap();
    set_mode(&users, 0o600);
    std::fs::write(
        dir.path().join("routes.d/team.yaml"),
        guarded("./team.htpasswd", "t1"),
    )
    .unwrap();
    let proxy = Proxy::start_in(dir, &main_config(FAST, &[("/main", "main")])).await;
    let client = Client::new(&pki);
    let team = |authorization: Option<&'static str>| {
        let (client, addr) = (client.clone(), proxy.addr);
        async move {
            let mut conn = client.open(addr, HOST, Proto::H1).await;
            let mut req = conn.request("GET", HOST, "/team", body(""));
            if let Some(a) = authorization {
                req.headers_mut()
                    .insert("authorization", a.parse().unwrap());
            }
            let got = conn.fetch(req).await.unwrap();
            (got.status, got.text())
        }
    };
    let alice: &'static str = Box::leak(
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:pw")
        )
        .into_boxed_str(),
    );
    assert_eq!(team(None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(team(Some(alice)).await, (StatusCode::OK, "t1".to_owned()));

    // The team names a users file that is not there; b's team ships meanwhile.
    let team_file = routes_file(&proxy, "team.yaml");
    write_atomic(&team_file, &guarded("./gone.htpasswd", "t2"));
    write_atomic(&routes_file(&proxy, "b.yaml"), &routes(&[("/b", "b2")]));
    eventually(PATIENCE, "b.yaml's edit is served", || async {
        served(&client, &proxy, "/b").await.as_deref() == Some("b2")
    })
    .await;
    eventually(PATIENCE, "team.yaml is pending", || async {
        per_file(&metrics(&proxy).await, PENDING, &team_file) == Some(1.0)
    })
    .await;
    // The previous team routes, still guarded.
    assert_eq!(team(None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(team(Some(alice)).await, (StatusCode::OK, "t1".to_owned()));

    // The file appears: the team's edit applies.
    let gone = proxy.path("routes.d/gone.htpasswd");
    std::fs::write(&gone, format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap())).unwrap();
    set_mode(&gone, 0o600);
    eventually(PATIENCE, "team.yaml's edit applies", || async {
        team(Some(alice)).await == (StatusCode::OK, "t2".to_owned())
    })
    .await;
    assert_eq!(team(None).await.0, StatusCode::UNAUTHORIZED);
}
