//! Scale benchmarks: how reload and lookup costs grow with the number of certificates and hosts.
//! `cargo bench --bench scale` (release build). Prints one table; the figures go in
//! docs/performance.md and docs/reload.md.
//!
//! Measured: a full load of N certificates; a metadata poll over N cert pairs with nothing
//! changed; one changed certificate among N applied; route lookup and SNI resolution with 10 vs
//! 10,000 hosts; a poll over a routes_dir of 1,000 files, and one of them changed; the CPU that
//! health checkers of 1,000 upstreams (1 s interval) cost.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use limen::reload::Reloader;
use limen::state::Shared;
use limen::tls::TlsShared;
use limen::upstream::UpstreamRegistry;

fn write_certs(dir: &Path, n: usize, ca: &(rcgen::CertificateParams, rcgen::KeyPair)) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca.0, &ca.1);
    for i in 0..n {
        let (c, k) = issue(&format!("host{i}.bench.test"), &issuer);
        std::fs::write(certs.join(format!("host{i}.crt")), c).unwrap();
        std::fs::write(certs.join(format!("host{i}.key")), k).unwrap();
    }
}

fn issue(name: &str, issuer: &rcgen::Issuer<'_, &rcgen::KeyPair>) -> (String, String) {
    let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn ca() -> (rcgen::CertificateParams, rcgen::KeyPair) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    (p, rcgen::KeyPair::generate().unwrap())
}

fn config(dir: &Path, routes: usize) -> std::path::PathBuf {
    let mut y = String::from(
        "listen: {https: \"127.0.0.1:0\"}\ntls: {cert_dirs: [./certs]}\nreload: {verify_every: 1h}\nroutes:\n",
    );
    for i in 0..routes {
        y.push_str(&format!(
            "  - {{host: host{i}.bench.test, respond: {{}}}}\n"
        ));
    }
    let p = dir.join("proxy.yaml");
    std::fs::write(&p, y).unwrap();
    p
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Row(String, Duration);

fn scale(n: usize, ca: &(rcgen::CertificateParams, rcgen::KeyPair), rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path(), n, ca);
    let path = config(dir.path(), 1);
    let tls = TlsShared::new().unwrap();
    let registry = UpstreamRegistry::default();

    let t = Instant::now();
    let mut reloader = Reloader::new(&path);
    let snap = reloader.initial_load(&tls, &registry).unwrap();
    rows.push(Row(format!("full load of {n} certs"), t.elapsed()));
    assert_eq!(snap.certs.certs().len(), n);
    let shared = Shared::new(snap, tls, registry);

    // LIMEN_BENCH_POLLS=N adds N polls, for profiling the poll alone.
    let extra: usize = std::env::var("LIMEN_BENCH_POLLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for _ in 0..extra {
        black_box(reloader.poll(&shared));
    }
    let polls: Vec<Duration> = (0..7)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(reloader.poll(&shared), None);
            t.elapsed()
        })
        .collect();
    let poll = median(polls);
    rows.push(Row(
        format!("metadata poll over {n} cert pairs, no change (median of 7)"),
        poll,
    ));
    // The floor a poll cannot go below: listing the directory and one `stat` per file (2n),
    // with the paths already built. The poll's own work is what it costs above this.
    let certs = dir.path().join("certs");
    let files: Vec<std::path::PathBuf> = std::fs::read_dir(&certs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let floors: Vec<Duration> = (0..7)
        .map(|_| {
            let t = Instant::now();
            black_box(std::fs::read_dir(&certs).unwrap().count());
            for f in &files {
                black_box(std::fs::metadata(f).ok());
            }
            t.elapsed()
        })
        .collect();
    let floor = median(floors);
    rows.push(Row(
        format!(
            "floor: readdir + {} stat calls (median of 7); the poll is {:.2}x it",
            files.len(),
            poll.as_secs_f64() / floor.as_secs_f64()
        ),
        floor,
    ));

    let issuer = rcgen::Issuer::from_params(&ca.0, &ca.1);
    let mut applies = Vec::new();
    for round in 0..5 {
        let (c, k) = issue("host0.bench.test", &issuer);
        let certs = dir.path().join("certs");
        std::fs::write(certs.join("host0.key"), k).unwrap();
        std::fs::write(certs.join("host0.crt"), c).unwrap();
        let t = Instant::now();
        let g = reloader.poll(&shared);
        let applied = t.elapsed();
        assert!(g.is_some(), "round {round}: the change was applied");
        // The poll right after, with nothing changed: what the change cost beyond its poll,
        // paired so that the machine's drift between rounds cancels out.
        let t = Instant::now();
        assert_eq!(reloader.poll(&shared), None);
        applies.push((applied, applied.saturating_sub(t.elapsed())));
    }
    rows.push(Row(
        format!("one changed cert among {n} applied: poll + load + publish (median of 5)"),
        median(applies.iter().map(|a| a.0).collect()),
    ));
    rows.push(Row(
        "  of which the change itself (minus the no-change poll right after; median of 5)"
            .to_string(),
        median(applies.iter().map(|a| a.1).collect()),
    ));
}

fn table_of(path: &Path) -> limen::routing::RouteTable {
    let cfg = limen::config::Config::load(path).unwrap();
    limen::routing::RouteTable::build(
        &cfg.routes,
        Duration::from_secs(1),
        &limen::routing::Inputs {
            registry: &UpstreamRegistry::default(),
            tls: &limen::upstream::TlsConfigs::default(),
            limiters: &limen::ratelimit::Limiters::default(),
            users: &Default::default(),
        },
    )
}

fn lookups(n: usize, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let table = table_of(&config(dir.path(), n));
    let hosts: Vec<String> = (0..1024)
        .map(|i| format!("host{}.bench.test", (i * 7919) % n))
        .collect();
    let iters: u32 = 2_000_000;
    let req = http::Request::new(());
    let facts = limen::routing::Facts::of(&req);
    let t = Instant::now();
    for i in 0..iters {
        black_box(table.lookup(
            black_box(&hosts[i as usize % hosts.len()]),
            "/some/path",
            &facts,
        ));
    }
    rows.push(Row(
        format!("route lookup, {n} hosts (per lookup)"),
        t.elapsed() / iters,
    ));

    // One host with n routes: n/2 paths, each twice (a header-matched canary and the plain
    // route), asked for the canary of one path in the middle.
    let mut y = String::from(
        "listen: {https: \"127.0.0.1:0\"}\ntls: {cert_dirs: [./certs]}\nreload: {verify_every: 1h}\nroutes:\n",
    );
    for i in 0..n / 2 {
        y.push_str(&format!(
            "  - {{host: one.bench.test, path: /svc{i}/api, respond: {{}}}}\n  - {{host: one.bench.test, path: /svc{i}/api, match: {{headers: {{x-canary: \"true\"}}, methods: [GET]}}, respond: {{}}}}\n"
        ));
    }
    let p = dir.path().join("one-host.yaml");
    std::fs::write(&p, y).unwrap();
    let table = table_of(&p);
    let path = format!("/svc{}/api/users/42", n / 4);
    let req = http::Request::builder()
        .header("x-canary", "true")
        .header("accept", "*/*")
        .body(())
        .unwrap();
    let facts = limen::routing::Facts::of(&req);
    let t = Instant::now();
    for _ in 0..iters {
        black_box(table.lookup(black_box("one.bench.test"), black_box(&path), &facts));
    }
    rows.push(Row(
        format!("route lookup, one host with {n} routes, a header match (per lookup)"),
        t.elapsed() / iters,
    ));

    // SNI: a store with n names, built from one certificate object to keep set-up short.
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["x.test".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let src = limen::tls::CertSource {
        cert: "x.crt".into(),
        key: "x.key".into(),
    };
    let base = limen::tls::parse_pair(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        &src,
        &provider,
    )
    .unwrap();
    let certs: Vec<Arc<limen::tls::LoadedCert>> = (0..n)
        .map(|i| {
            Arc::new(limen::tls::LoadedCert {
                key: base.key.clone(),
                names: vec![format!("host{i}.bench.test")],
                not_after: base.not_after,
                cert_file: base.cert_file.clone(),
                key_file: base.key_file.clone(),
                sha256: base.sha256.clone(),
                serial: base.serial.clone(),
            })
        })
        .collect();
    let store = limen::tls::CertStore::new(certs);
    let t = Instant::now();
    for i in 0..iters {
        black_box(store.select(Some(black_box(&hosts[i as usize % hosts.len()]))));
    }
    rows.push(Row(
        format!("SNI resolution, {n} certs (per lookup)"),
        t.elapsed() / iters,
    ));
}

/// Time from a cert rename on disk to a published snapshot, with the real reload thread.
fn detection(
    interval_ms: u64,
    ca: &(rcgen::CertificateParams, rcgen::KeyPair),
    rows: &mut Vec<Row>,
) {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path(), 1, ca);
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        format!("listen: {{https: \"127.0.0.1:0\"}}\ntls: {{cert_dirs: [./certs]}}\nreload: {{interval: {interval_ms}ms}}\nroutes: []\n"),
    )
    .unwrap();
    let tls = TlsShared::new().unwrap();
    let registry = UpstreamRegistry::default();
    let mut reloader = Reloader::new(&path);
    let snap = reloader.initial_load(&tls, &registry).unwrap();
    let shared = Arc::new(Shared::new(snap, tls, registry));
    let (tx, rx) = std::sync::mpsc::channel();
    limen::reload::spawn(reloader, shared.clone(), rx).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca.0, &ca.1);
    let certs = dir.path().join("certs");
    let mut seen = Vec::new();
    for _ in 0..20 {
        let gen = shared.snapshot.load().generation;
        let (c, k) = issue("host0.bench.test", &issuer);
        std::fs::write(certs.join("tmp.key"), k).unwrap();
        std::fs::write(certs.join("tmp.crt"), c).unwrap();
        let t = Instant::now();
        std::fs::rename(certs.join("tmp.key"), certs.join("host0.key")).unwrap();
        std::fs::rename(certs.join("tmp.crt"), certs.join("host0.crt")).unwrap();
        while shared.snapshot.load().generation == gen {
            assert!(t.elapsed() < Duration::from_secs(5), "not detected");
            std::thread::sleep(Duration::from_micros(200));
        }
        seen.push(t.elapsed());
    }
    drop(tx);
    seen.sort();
    rows.push(Row(
        format!("detection latency, interval {interval_ms}ms (median of 20)"),
        seen[10],
    ));
    rows.push(Row(
        format!("detection latency, interval {interval_ms}ms (max of 20)"),
        seen[19],
    ));
}

/// CPU time of this process's threads named `name` (utime + stime), from /proc.
fn threads_cpu(name: &str) -> Duration {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the command name (which is in parentheses): utime is the 12th, stime 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        total += (ticks(11) + ticks(12)) / tick;
    }
    Duration::from_secs_f64(total)
}

/// `n` upstreams (distinct loopback addresses, one answering server) under http checks every
/// second: the checkers' CPU per second of wall time, on a runtime of their own.
fn health_checkers(n: usize, rows: &mut Vec<Row>) {
    limen::server::raise_nofile();
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-upstream")
        .enable_all()
        .build()
        .unwrap();
    let port = server.block_on(async {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        port
    });
    let mut y = String::from(
        "listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nroutes:\n  - host: \"*\"\n    health: {path: /healthz, interval: 1s, timeout: 500ms}\n    upstreams:\n",
    );
    for i in 0..n {
        y.push_str(&format!(
            "      - \"http://127.0.{}.{}:{port}\"\n",
            i / 250,
            i % 250 + 1
        ));
    }
    let cfg = limen::config::Config::parse(&y, Path::new("/bench.yaml")).unwrap();
    let checks = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("limen-checks")
        .enable_all()
        .build()
        .unwrap();
    let registry = UpstreamRegistry::default();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let family = prometheus_client::metrics::family::Family::default();
    let table = limen::routing::RouteTable::build(
        &cfg.routes,
        Duration::from_secs(1),
        &limen::routing::Inputs {
            registry: &registry,
            tls: &limen::upstream::TlsConfigs::default(),
            limiters: &limen::ratelimit::Limiters::default(),
            users: &Default::default(),
        },
    );
    registry.start_checkers(checks.handle().clone(), shutdown, family.clone());
    // Every checker has fired and dialled within the first interval or two.
    std::thread::sleep(Duration::from_secs(3));
    let (cpu0, t0) = (threads_cpu("limen-checks"), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let (cpu, wall) = (threads_cpu("limen-checks") - cpu0, t0.elapsed());
    let checked: f64 = {
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register("checks", "", family);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out.lines()
            .filter(|l| l.contains("result=\"success\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    drop(table);
    rows.push(Row(
        format!("health checkers of {n} upstreams (http, 1 s), CPU per second of wall time ({checked:.0} checks passed)"),
        cpu.div_f64(wall.as_secs_f64()),
    ));
}

/// A routes_dir of `n` files, one route each: the poll with nothing changed, and one file
/// changed among them applied.
fn routes_dir(n: usize, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.d");
    std::fs::create_dir(&routes).unwrap();
    let file = |i: usize, body: &str| {
        std::fs::write(
            routes.join(format!("r{i}.yaml")),
            format!("routes:\n  - {{host: host{i}.bench.test, respond: {{body: {body}}}}}\n"),
        )
        .unwrap();
    };
    for i in 0..n {
        file(i, "a");
    }
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        "listen: {https: \"127.0.0.1:0\"}\ntls: {self_signed: true}\nreload: {verify_every: 1h}\nroutes_dir: ./routes.d\n",
    )
    .unwrap();
    let tls = TlsShared::new().unwrap();
    let registry = UpstreamRegistry::default();
    let mut reloader = Reloader::new(&path);
    let snap = reloader.initial_load(&tls, &registry).unwrap();
    assert_eq!(snap.routes.routes().len(), n);
    let shared = Shared::new(snap, tls, registry);
    let polls: Vec<Duration> = (0..7)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(reloader.poll(&shared), None);
            t.elapsed()
        })
        .collect();
    rows.push(Row(
        format!("metadata poll over a routes_dir of {n} files, no change (median of 7)"),
        median(polls),
    ));
    // The floor: what any poll must do, list the folder and stat each file (once to see it is
    // a regular file through its symlinks, once for its fingerprint).
    let floors: Vec<Duration> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for e in std::fs::read_dir(&routes).unwrap().flatten() {
                black_box(std::fs::metadata(e.path()).ok());
                black_box(std::fs::metadata(e.path()).ok());
            }
            t.elapsed()
        })
        .collect();
    rows.push(Row(
        format!("  floor: read_dir and 2 stat calls per file over the same {n} files"),
        median(floors),
    ));
    let applies: Vec<Duration> = (0..5)
        .map(|round| {
            file(0, &format!("b{round}"));
            let t = Instant::now();
            assert!(reloader.poll(&shared).is_some());
            t.elapsed()
        })
        .collect();
    rows.push(Row(
        format!("one changed file among {n} routes_dir files applied (median of 5)"),
        median(applies),
    ));
}

fn main() {
    let ca = ca();
    let mut rows = Vec::new();
    // LIMEN_BENCH_PARTS=reload measures only what a poll costs (cert pairs and routes_dir files),
    // for a before/after of a change to the reloader.
    let only_reload = std::env::var("LIMEN_BENCH_PARTS").is_ok_and(|p| p == "reload");
    if !only_reload {
        detection(100, &ca, &mut rows);
    }
    let sizes: Vec<usize> = std::env::var("LIMEN_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 1000, 10_000]);
    for n in sizes {
        scale(n, &ca, &mut rows);
    }
    if !only_reload {
        for n in [10, 10_000] {
            lookups(n, &mut rows);
        }
    }
    routes_dir(1000, &mut rows);
    if !only_reload {
        health_checkers(1000, &mut rows);
    }
    println!("| measurement | time |\n|---|---:|");
    for Row(what, d) in rows {
        if d < Duration::from_micros(10) {
            println!("| {what} | {} ns |", d.as_nanos());
        } else {
            println!("| {what} | {:.3} ms |", d.as_secs_f64() * 1000.0);
        }
    }
}
