//! Users change files and limen follows, by itself: editors, `cp`, Kubernetes' symlink swap,
//! cert-manager rotations, broken files and storms. Nothing that worked stops working.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use http::StatusCode;

const FAST: &str = "reload:\n  interval: 50ms";
/// interval + 1s, as the issue asks of detection.
const PATIENCE: Duration = Duration::from_millis(1050);

fn versioned(pki: &Pki, v: usize) -> Issued {
    pki.issue(&["app.test", &format!("v{v}.app.test")])
}

/// A limen polling every 50 ms, serving version `v` of app.test's cert from `certs/app.*`, and
/// routing everything to `b`. Returns the proxy and its cert dir.
async fn proxy_with_version(pki: &Pki, b: &Backend, v: usize) -> (Proxy, std::path::PathBuf) {
    let dir = Proxy::dir();
    let certs = dir.path().join("certs");
    versioned(pki, v).write(&certs, "app");
    let proxy = Proxy::start_in(dir, &config_yaml(FAST, &route_all_to(b))).await;
    (proxy, certs)
}

async fn served_version(client: &Client, proxy: &Proxy) -> Option<String> {
    let names = client.served_names(proxy.addr, "app.test").await.ok()?;
    names.into_iter().find(|n| n.starts_with('v'))
}

async fn await_version(client: &Client, proxy: &Proxy, v: usize) {
    let want = format!("v{v}.app.test");
    eventually(PATIENCE, &format!("{want} is served"), || async {
        served_version(client, proxy).await.as_deref() == Some(want.as_str())
    })
    .await;
}

/// Requests on fresh TLS connections and on one keep-alive connection, counting failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(client: &Client, addr: std::net::SocketAddr, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for proto in [Proto::H1, Proto::H2] {
            let (client, stop, ok, failed) =
                (client.clone(), stop.clone(), ok.clone(), failed.clone());
            // keep-alive connection
            tasks.push(tokio::spawn(async move {
                let mut conn = client.open(addr, "app.test", proto).await;
                while !stop.load(Ordering::Relaxed) {
                    match conn.get("app.test", path).await {
                        Ok(g) if g.status.is_success() => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("keep-alive {proto:?} failure: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
        let (client, stop2, ok2, failed2) =
            (client.clone(), stop.clone(), ok.clone(), failed.clone());
        // a new handshake per request
        tasks.push(tokio::spawn(async move {
            while !stop2.load(Ordering::Relaxed) {
                let r = async {
                    let mut c = client.open(addr, "app.test", Proto::H1).await;
                    c.get("app.test", path).await
                };
                match tokio::time::timeout(Duration::from_secs(5), r).await {
                    Ok(Ok(g)) if g.status.is_success() => ok2.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("new-connection failure: {other:?}");
                        failed2.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .unwrap()
                .unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cert_replaced_by_rename_is_served_quickly_and_50_swaps_under_load_fail_nothing() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let (proxy, certs) = proxy_with_version(&pki, &b, 0).await;
    let client = Client::new(&pki);
    await_version(&client, &proxy, 0).await;

    let load = Load::start(&client, proxy.addr, "/");
    let versions: Vec<Issued> = (1..=50).map(|v| versioned(&pki, v)).collect();
    for (i, v) in versions.iter().enumerate() {
        // Key first then cert, each by rename: between the two the pair mismatches, and limen
        // must keep serving the old pair through that window.
        write_atomic(&certs.join("app.key"), &v.key_pem);
        write_atomic(&certs.join("app.crt"), &v.cert_pem);
        await_version(&client, &proxy, i + 1).await;
    }
    let (ok, failed) = load.finish().await;
    assert_eq!(
        failed, 0,
        "{failed} requests failed during 50 swaps ({ok} succeeded)"
    );
    assert!(ok > 50, "the load ran ({ok} requests)");
}

#[tokio::test]
async fn a_kubernetes_secret_update_by_symlink_swap_is_served() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    let secret = dir.path().join("certs").join("app-tls");
    // What kubelet writes: a timestamped dir, `..data` pointing at it, and links through `..data`.
    let ts1 = "..2026_11_25_08_00_00.111";
    versioned(&pki, 1).write(&secret.join(ts1), "tls");
    std::os::unix::fs::symlink(ts1, secret.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", secret.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", secret.join("tls.key")).unwrap();
    let proxy = Proxy::start_in(dir, &config_yaml(FAST, &route_all_to(&b))).await;
    let client = Client::new(&pki);
    await_version(&client, &proxy, 1).await;

    for (v, ts) in [
        (2, "..2026_11_25_09_00_00.222"),
        (3, "..2026_11_25_10_00_00.333"),
    ] {
        let old = std::fs::read_link(secret.join("..data")).unwrap();
        versioned(&pki, v).write(&secret.join(ts), "tls");
        std::os::unix::fs::symlink(ts, secret.join("..data_tmp")).unwrap();
        std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).unwrap();
        std::fs::remove_dir_all(secret.join(old)).unwrap();
        await_version(&client, &proxy, v).await;
    }
    assert_eq!(
        client.get(proxy.addr, "app.test", "/").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_non_atomic_copy_of_cert_then_key_never_serves_an_error() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let (proxy, certs) = proxy_with_version(&pki, &b, 1).await;
    let client = Client::new(&pki);
    await_version(&client, &proxy, 1).await;

    // `cp new.crt app.crt`: the cert changes in place; the key is still the old one.
    let v2 = versioned(&pki, 2);
    std::fs::write(certs.join("app.crt"), &v2.cert_pem).unwrap();
    let failures_before = proxy.status().certs.failures;
    eventually(PATIENCE, "the mismatch is noticed and reported", || async {
        proxy.status().certs.failures > failures_before
    })
    .await;
    // Through the window, every handshake gets the old, whole pair.
    for _ in 0..10 {
        assert_eq!(
            served_version(&client, &proxy).await.as_deref(),
            Some("v1.app.test")
        );
        assert_eq!(
            client.get(proxy.addr, "app.test", "/").await.status,
            StatusCode::OK
        );
    }
    let errors = proxy.status().certs.errors;
    assert!(
        errors.iter().any(|e| e.contains("does not belong")),
        "{errors:?}"
    );
    // `cp new.key app.key`: now the pair matches and is applied.
    std::fs::write(certs.join("app.key"), &v2.key_pem).unwrap();
    await_version(&client, &proxy, 2).await;
    eventually(PATIENCE, "the error clears", || async {
        proxy.status().certs.errors.is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_half_written_cert_keeps_the_old_one_until_it_is_complete() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let (proxy, certs) = proxy_with_version(&pki, &b, 1).await;
    let client = Client::new(&pki);

    let v2 = versioned(&pki, 2);
    std::fs::write(certs.join("app.key"), &v2.key_pem).unwrap();
    std::fs::write(certs.join("app.crt"), &v2.cert_pem[..v2.cert_pem.len() / 2]).unwrap();
    eventually(PATIENCE, "the truncated file is reported", || async {
        proxy
            .status()
            .certs
            .errors
            .iter()
            .any(|e| e.contains("app.crt"))
    })
    .await;
    assert_eq!(
        served_version(&client, &proxy).await.as_deref(),
        Some("v1.app.test")
    );
    std::fs::write(certs.join("app.crt"), &v2.cert_pem).unwrap();
    await_version(&client, &proxy, 2).await;
}

#[tokio::test]
async fn changes_are_seen_when_mtime_goes_backwards_or_two_writes_share_a_second() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let (proxy, certs) = proxy_with_version(&pki, &b, 1).await;
    let client = Client::new(&pki);

    // New content with an mtime from the past, as `cp -p` or `tar x` leave it.
    let past = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    let v2 = versioned(&pki, 2);
    for (name, pem) in [("app.key", &v2.key_pem), ("app.crt", &v2.cert_pem)] {
        let p = certs.join(name);
        std::fs::write(&p, pem).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(past)
            .unwrap();
    }
    await_version(&client, &proxy, 2).await;

    // Two config writes within one second, the same size: the second one is what serves.
    let routes_a = "  - {host: \"*\", respond: {body: \"AAAA\"}}\n";
    let routes_b = "  - {host: \"*\", respond: {body: \"BBBB\"}}\n";
    std::fs::write(&proxy.config_path, config_yaml(FAST, routes_a)).unwrap();
    std::fs::write(&proxy.config_path, config_yaml(FAST, routes_b)).unwrap();
    eventually(PATIENCE, "the second write is served", || async {
        client.get(proxy.addr, "app.test", "/").await.text() == "BBBB"
    })
    .await;
}

#[tokio::test]
async fn a_broken_config_keeps_the_old_routes_reports_once_and_recovers() {
    let pki = Pki::new();
    let (old, new) = (Backend::start("old").await, Backend::start("new").await);
    let proxy = Proxy::start(&pki, &["app.test"], FAST, &route_all_to(&old)).await;
    let client = Client::new(&pki);
    let broken = [
        (
            "invalid YAML",
            config_yaml(FAST, "  - {host: \"*\", upstreams: [oops\n"),
        ),
        (
            "unknown key",
            config_yaml(
                FAST,
                &format!(
                    "  - {{host: \"*\", upstreams: [\"{}\"], retries: 3}}\n",
                    new.url()
                ),
            ),
        ),
        (
            "malformed URL",
            config_yaml(FAST, "  - {host: \"*\", upstreams: [\"http//nope\"]}\n"),
        ),
    ];
    for (what, yaml) in broken {
        let failures = proxy.status().config.failures;
        write_atomic(&proxy.config_path, &yaml);
        eventually(PATIENCE, &format!("{what} is reported"), || async {
            proxy.status().config.failures == failures + 1
        })
        .await;
        let st = proxy.status();
        assert!(!st.config.last_ok);
        let err = st.config.errors.join("\n");
        assert!(
            err.contains("proxy.yaml:"),
            "{what}: the error names the file and line: {err}"
        );
        // Many polls later it has still been counted (and logged) once, and the old routes serve.
        let polls = st.polls;
        eventually(PATIENCE, "several more polls ran", || async {
            proxy.status().polls >= polls + 5
        })
        .await;
        assert_eq!(
            proxy.status().config.failures,
            failures + 1,
            "{what}: reported once"
        );
        let got = client.get(proxy.addr, "app.test", "/").await;
        assert_eq!(
            got.echo().backend,
            "old",
            "{what}: the previous routes stay in force"
        );
    }
    write_atomic(&proxy.config_path, &config_yaml(FAST, &route_all_to(&new)));
    eventually(PATIENCE, "the fixed config is served", || async {
        client.get(proxy.addr, "app.test", "/").await.echo().backend == "new"
    })
    .await;
    assert!(proxy.status().config.last_ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_see_route_changes_and_100_reloads_under_load_give_no_5xx() {
    let pki = Pki::new();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let routes =
        |extra: &str| format!("  - {{host: \"*\", upstreams: [\"{}\"]}}\n{extra}", a.url());
    let proxy = Proxy::start(&pki, &["app.test"], FAST, &routes("")).await;
    let client = Client::new(&pki);
    let mut h1 = client.open(proxy.addr, "app.test", Proto::H1).await;
    let mut h2 = client.open(proxy.addr, "app.test", Proto::H2).await;
    for conn in [&mut h1, &mut h2] {
        assert_eq!(
            conn.get("app.test", "/new").await.unwrap().echo().backend,
            "a"
        );
    }
    // Added: the same connections route /new to b.
    proxy
        .reconfigure(
            &config_yaml(
                FAST,
                &routes(&format!(
                    "  - {{host: \"*\", path: /new, upstreams: [\"{}\"]}}\n",
                    b.url()
                )),
            ),
            PATIENCE,
        )
        .await;
    for conn in [&mut h1, &mut h2] {
        assert_eq!(
            conn.get("app.test", "/new").await.unwrap().echo().backend,
            "b"
        );
    }
    // Changed: /new answers by itself.
    proxy
        .reconfigure(
            &config_yaml(
                FAST,
                &routes("  - {host: \"*\", path: /new, respond: {body: changed}}\n"),
            ),
            PATIENCE,
        )
        .await;
    for conn in [&mut h1, &mut h2] {
        assert_eq!(
            conn.get("app.test", "/new").await.unwrap().text(),
            "changed"
        );
    }
    // Removed: back to a.
    proxy
        .reconfigure(&config_yaml(FAST, &routes("")), PATIENCE)
        .await;
    for conn in [&mut h1, &mut h2] {
        assert_eq!(
            conn.get("app.test", "/new").await.unwrap().echo().backend,
            "a"
        );
    }

    // 100 reloads under load, alternating two route tables that both serve /.
    let load = Load::start(&client, proxy.addr, "/");
    for i in 0..100 {
        let extra = format!(
            "  - {{host: \"*\", path: /r{i}, upstreams: [\"{}\"]}}\n",
            b.url()
        );
        proxy
            .reconfigure(&config_yaml(FAST, &routes(&extra)), PATIENCE)
            .await;
    }
    let (ok, failed) = load.finish().await;
    assert_eq!(failed, 0, "{failed} failures during 100 reloads ({ok} ok)");
    assert!(
        a.connections.load(Ordering::Relaxed) < 20,
        "upstream pools survived reloads"
    );
}

#[tokio::test]
async fn a_websocket_survives_20_config_and_cert_reloads() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let (proxy, certs) = proxy_with_version(&pki, &b, 0).await;
    let client = Client::new(&pki);
    let tls = client
        .connect(proxy.addr, "app.test", Proto::H1)
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("wss://app.test/ws", tls)
        .await
        .unwrap();
    for i in 1..=20 {
        let gen = proxy.generation();
        if i % 2 == 0 {
            let v = versioned(&pki, i);
            write_atomic(&certs.join("app.key"), &v.key_pem);
            write_atomic(&certs.join("app.crt"), &v.cert_pem);
        } else {
            let extra = format!("  - {{host: \"*\", path: /x{i}, respond: {{}}}}\n");
            write_atomic(
                &proxy.config_path,
                &config_yaml(FAST, &format!("{}{extra}", route_all_to(&b))),
            );
        }
        eventually(PATIENCE, "reload applied", || async {
            proxy.generation() > gen
        })
        .await;
        let msg = format!("after reload {i}");
        ws.send(Message::text(msg.clone())).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    assert!(proxy.generation() >= 21);
}

#[tokio::test]
async fn a_deleted_cert_is_still_served_and_a_world_writable_key_is_refused() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    let certs = dir.path().join("certs");
    versioned(&pki, 1).write(&certs, "app");
    pki.issue(&["other.test"]).write(&certs, "other");
    let proxy = Proxy::start_in(dir, &config_yaml(FAST, &route_all_to(&b))).await;
    let client = Client::new(&pki);

    // The key alone deleted: the pair is incomplete, the last good cert keeps serving.
    std::fs::remove_file(certs.join("app.key")).unwrap();
    let polls = proxy.status().polls;
    eventually(PATIENCE, "several polls", || async {
        proxy.status().polls >= polls + 4
    })
    .await;
    assert_eq!(
        served_version(&client, &proxy).await.as_deref(),
        Some("v1.app.test")
    );

    // A world-writable key is refused with a message that says why and what to do.
    let v2 = versioned(&pki, 2);
    std::fs::write(certs.join("app.key"), &v2.key_pem).unwrap();
    set_mode(&certs.join("app.key"), 0o666);
    std::fs::write(certs.join("app.crt"), &v2.cert_pem).unwrap();
    eventually(PATIENCE, "the world-writable key is refused", || async {
        proxy
            .status()
            .certs
            .errors
            .iter()
            .any(|e| e.contains("world-writable") && e.contains("chmod"))
    })
    .await;
    assert_eq!(
        served_version(&client, &proxy).await.as_deref(),
        Some("v1.app.test")
    );
    set_mode(&certs.join("app.key"), 0o600);
    await_version(&client, &proxy, 2).await;

    // A whole pair removed on purpose goes away after two polls.
    std::fs::remove_file(certs.join("other.crt")).unwrap();
    std::fs::remove_file(certs.join("other.key")).unwrap();
    eventually(PATIENCE, "the removed pair stops being served", || async {
        client.served_names(proxy.addr, "other.test").await.is_err()
    })
    .await;
}

#[tokio::test]
async fn putting_back_the_config_in_force_after_a_failed_edit_clears_the_failure() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&pki, &["app.test"], FAST, &route_all_to(&b)).await;
    let good = std::fs::read_to_string(&proxy.config_path).unwrap();
    write_atomic(
        &proxy.config_path,
        &good.replace("upstreams:", "upstreamz:"),
    );
    eventually(PATIENCE, "the failed edit is reported", || async {
        !proxy.status().config.errors.is_empty()
    })
    .await;
    write_atomic(&proxy.config_path, &good);
    eventually(PATIENCE, "the failure clears", || async {
        let st = proxy.status();
        st.config.errors.is_empty() && st.config.last_ok
    })
    .await;
    assert_eq!(proxy.status().config.failures, 1);
    assert_eq!(proxy.generation(), 1, "nothing new to publish");
}

#[tokio::test]
async fn sighup_polls_at_once_even_with_a_long_interval() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(
        &pki,
        &["app.test"],
        "reload:\n  interval: 1h",
        &route_all_to(&b),
    )
    .await;
    let client = Client::new(&pki);
    write_atomic(
        &proxy.config_path,
        &config_yaml(
            "reload:\n  interval: 1h",
            "  - {host: \"*\", respond: {body: now}}\n",
        ),
    );
    // What main() does on SIGHUP.
    proxy.running().reload_now();
    eventually(
        PATIENCE,
        "the change is applied without waiting an hour",
        || async { client.get(proxy.addr, "app.test", "/").await.text() == "now" },
    )
    .await;
}

#[tokio::test]
async fn a_vanished_cert_directory_keeps_serving_its_certificates_until_it_is_back() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    let certs = dir.path().join("certs");
    let mounted = dir.path().join("mounted");
    versioned(&pki, 1).write(&certs, "app");
    pki.issue(&["other.test"]).write(&mounted, "other");
    let yaml = format!(
        "listen:\n  https: \"127.0.0.1:0\"\ntls:\n  cert_dirs: [\"./certs\", \"./mounted\"]\n{FAST}\nroutes:\n{}",
        route_all_to(&b)
    );
    let proxy = Proxy::start_in(dir, &yaml).await;
    let client = Client::new(&pki);

    // The volume goes away whole (an unmount, a non-atomic swap of the directory).
    let away = proxy.path("mounted.away");
    std::fs::rename(&mounted, &away).unwrap();
    let polls = proxy.status().polls;
    eventually(
        PATIENCE * 2,
        "several polls without the directory",
        || async { proxy.status().polls >= polls + 5 },
    )
    .await;
    assert!(
        client.served_names(proxy.addr, "other.test").await.is_ok(),
        "the vanished directory's certificate is still served"
    );
    assert!(
        proxy
            .status()
            .certs
            .errors
            .iter()
            .any(|e| e.contains("mounted")),
        "the missing directory is reported: {:?}",
        proxy.status().certs.errors
    );

    // Back, then emptied on purpose: now the pair goes, as any removed pair does.
    std::fs::rename(&away, &mounted).unwrap();
    eventually(
        PATIENCE,
        "the directory is back and nothing is wrong",
        || async { proxy.status().certs.errors.is_empty() },
    )
    .await;
    std::fs::remove_file(mounted.join("other.crt")).unwrap();
    std::fs::remove_file(mounted.join("other.key")).unwrap();
    eventually(PATIENCE, "the removed pair stops being served", || async {
        client.served_names(proxy.addr, "other.test").await.is_err()
    })
    .await;
}

#[tokio::test]
async fn a_fifo_or_an_oversized_file_in_place_of_a_cert_is_refused_and_the_poller_goes_on() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let (proxy, certs) = proxy_with_version(&pki, &b, 1).await;
    let client = Client::new(&pki);
    let crt = certs.join("app.crt");

    // A FIFO under the cert's name: reading it would block the poller until a writer came.
    std::fs::remove_file(&crt).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&crt)
        .status()
        .unwrap();
    assert!(made.success());
    eventually(PATIENCE, "the FIFO is reported", || async {
        proxy
            .status()
            .certs
            .errors
            .iter()
            .any(|e| e.contains("FIFO"))
    })
    .await;
    let polls = proxy.status().polls;
    eventually(PATIENCE, "the poller keeps polling", || async {
        proxy.status().polls >= polls + 3
    })
    .await;
    assert_eq!(
        served_version(&client, &proxy).await.as_deref(),
        Some("v1.app.test")
    );

    // A 2 MiB file: refused before it is read.
    std::fs::remove_file(&crt).unwrap();
    std::fs::write(&crt, vec![b'A'; 2 * 1024 * 1024]).unwrap();
    eventually(PATIENCE, "the oversized file is reported", || async {
        proxy
            .status()
            .certs
            .errors
            .iter()
            .any(|e| e.contains("1048576-byte limit"))
    })
    .await;
    assert_eq!(
        served_version(&client, &proxy).await.as_deref(),
        Some("v1.app.test")
    );

    // Fixed: the new version loads.
    std::fs::remove_file(&crt).unwrap();
    versioned(&pki, 2).write(&certs, "app");
    await_version(&client, &proxy, 2).await;

    // The config file itself replaced by a FIFO: refused, the routes in force stay.
    let gen = proxy.generation();
    std::fs::remove_file(&proxy.config_path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&proxy.config_path)
        .status()
        .unwrap();
    assert!(made.success());
    eventually(PATIENCE, "the FIFO config is reported", || async {
        proxy
            .status()
            .config
            .errors
            .iter()
            .any(|e| e.contains("FIFO"))
    })
    .await;
    assert_eq!(proxy.generation(), gen);
    let got = client.get(proxy.addr, "app.test", "/").await;
    assert_eq!(got.status, StatusCode::OK);
}
