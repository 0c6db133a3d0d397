//! A reload storm, alone in its test binary so that memory and open files are its own.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

const PATIENCE: Duration = Duration::from_millis(1050);

fn versioned(pki: &Pki, v: usize) -> Issued {
    pki.issue(&["app.test", &format!("v{v}.app.test")])
}

async fn await_version(client: &Client, proxy: &Proxy, v: usize) {
    let want = format!("v{v}.app.test");
    eventually(PATIENCE, &format!("{want} is served"), || async {
        client
            .served_names(proxy.addr, "app.test")
            .await
            .is_ok_and(|n| n.contains(&want))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_storm_ends_in_the_final_state_with_memory_and_files_back_to_baseline() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    let certs = dir.path().join("certs");
    versioned(&pki, 0).write(&certs, "app");
    let proxy = Proxy::start_in(
        dir,
        &config_yaml("reload:\n  interval: 10ms", &route_all_to(&b)),
    )
    .await;
    let client = Client::new(&pki);
    // Warm up, then take the baseline.
    for _ in 0..20 {
        assert_eq!(
            client.get(proxy.addr, "app.test", "/").await.status,
            StatusCode::OK
        );
    }
    let (fds_before, rss_before) = (open_fds(), rss_kib());

    let pairs: Vec<Issued> = (1..=8).map(|v| versioned(&pki, v)).collect();
    let started = std::time::Instant::now();
    let mut i = 0usize;
    while started.elapsed() < Duration::from_secs(5) {
        let p = &pairs[i % pairs.len()];
        write_atomic(&certs.join("app.key"), &p.key_pem);
        write_atomic(&certs.join("app.crt"), &p.cert_pem);
        let body = format!("gen-{i}");
        write_atomic(
            &proxy.config_path,
            &config_yaml(
                "reload:\n  interval: 10ms",
                &format!("  - {{host: \"*\", respond: {{body: \"{body}\"}}}}\n"),
            ),
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last = i - 1;
    let final_version = (last % pairs.len()) + 1;
    await_version(&client, &proxy, final_version).await;
    eventually(PATIENCE, "the final config is served", || async {
        client.get(proxy.addr, "app.test", "/").await.text() == format!("gen-{last}")
    })
    .await;
    assert!(
        proxy.generation() > 20,
        "many reloads happened ({})",
        proxy.generation()
    );
    eventually(
        Duration::from_secs(5),
        "open files return to baseline",
        || async { open_fds() <= fds_before + 4 },
    )
    .await;
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 32 * 1024,
        "RSS grew by {grown} KiB across the storm"
    );
}
