//! How a route spreads its requests and tries again: weighted round robin gives each upstream
//! its share, least_request avoids the busy one, and retries go to another upstream only when it is
//! safe, within the route's budget.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use http::StatusCode;

const HOST: &str = "app.example.test";

async fn proxy(pki: &Pki, routes: &str) -> Proxy {
    Proxy::start(pki, &[HOST], "", routes).await
}

fn route(name: &str, path: &str, upstreams: &str, keys: &str) -> String {
    format!(
        "  - {{name: {name}, host: \"{HOST}\", path: {path}, upstreams: [{upstreams}], {keys}}}\n"
    )
}

async fn metrics(proxy: &Proxy) -> String {
    admin_get(proxy.admin(), "/metrics").await.1
}

#[tokio::test]
async fn weighted_round_robin_gives_one_to_three_smoothly() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    // A plain string is weight 1; the map form sets it.
    let ups = format!("\"{}\", {{url: \"{}\", weight: 3}}", a.url(), b.url());
    let proxy = proxy(&pki, &route("app", "/", &ups, "")).await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    let mut names = Vec::new();
    for _ in 0..400 {
        let got = conn.get(HOST, "/").await.unwrap();
        names.push(got.text().split(' ').next().unwrap().to_string());
    }
    let to_a = names.iter().filter(|n| *n == "a").count();
    assert!((96..=104).contains(&to_a), "a got {to_a} of 400");
    // Smooth: never two a's in a row.
    assert!(
        names.windows(2).all(|w| !(w[0] == "a" && w[1] == "a")),
        "{names:?}"
    );
    let st = status_json(&proxy).await;
    assert_eq!(st["routes"][0]["upstream_health"][1]["weight"], 3);
}

#[tokio::test]
async fn weighted_random_follows_the_weights() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    let ups = format!("\"{}\", {{url: \"{}\", weight: 3}}", a.url(), b.url());
    let proxy = proxy(&pki, &route("app", "/", &ups, "balance: random")).await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    for _ in 0..800 {
        assert_eq!(conn.get(HOST, "/").await.unwrap().status, StatusCode::OK);
    }
    let to_a = a.hits.load(Ordering::SeqCst);
    assert!(
        (120..=280).contains(&to_a),
        "a got {to_a} of 800 (expected about 200)"
    );
}

#[tokio::test]
async fn least_request_prefers_the_upstream_with_fewer_requests_in_flight() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    // The `/slow` route uses a alone: its slow requests count in a's in-flight requests, which the
    // other route, over both, sees.
    let routes = format!(
        "{}{}",
        route(
            "slow",
            "/slow",
            &format!("\"{}\"", a.url()),
            "strip_prefix: true"
        ),
        route(
            "app",
            "/",
            &format!("\"{}\", \"{}\"", a.url(), b.url()),
            "balance: least_request"
        ),
    );
    let proxy = proxy(&pki, &routes).await;
    let client = Client::new(&pki);
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            let addr = proxy.addr;
            tokio::spawn(async move { client.get(addr, HOST, "/slow/sleep/3000").await.status })
        })
        .collect();
    eventually(
        Duration::from_secs(5),
        "8 slow requests in flight on a",
        || async { a.hits.load(Ordering::SeqCst) == 8 },
    )
    .await;
    let st = status_json(&proxy).await;
    assert_eq!(
        st["routes"][1]["upstream_health"][0]["in_flight"], 8,
        "{st}"
    );
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    for _ in 0..20 {
        assert_eq!(conn.get(HOST, "/").await.unwrap().status, StatusCode::OK);
    }
    assert!(
        b.hits.load(Ordering::SeqCst) >= 19,
        "b took {} of 20",
        b.hits.load(Ordering::SeqCst)
    );
    for s in slow {
        assert_eq!(s.await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test]
async fn a_reset_get_is_retried_on_the_other_upstream_and_a_streamed_post_never_is() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    a.answer.store(0, Ordering::SeqCst);
    let ups = format!("\"{}\", \"{}\"", a.url(), b.url());
    // A budget of 100 %: this test is about which requests may be retried, not how many.
    let keys = "retry: {attempts: 1, on: [reset, connect_failure], budget: 100%}, passive: {consecutive_failures: 0}";
    let proxy = proxy(&pki, &route("app", "/", &ups, keys)).await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    for _ in 0..6 {
        let got = conn.get(HOST, "/").await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        assert_eq!(got.text(), "b 0");
    }
    assert!(
        a.hits.load(Ordering::SeqCst) >= 2,
        "a was tried first in turn"
    );
    let m = metrics(&proxy).await;
    assert!(
        metric(
            &m,
            "limen_upstream_retries_total{route=\"app\",reason=\"reset\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );

    // A small PUT is kept whole and sent again with its body; a streamed POST goes once.
    for i in 0..4 {
        let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
        let put = conn.request("PUT", HOST, "/", body("p".repeat(10_000)));
        let got = conn.fetch(put).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "PUT {i}");
        assert_eq!(got.text(), "b 10000");
    }
    let a_before = a.hits.load(Ordering::SeqCst);
    let mut post_failed = 0;
    for _ in 0..4 {
        let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
        let post = conn.request("POST", HOST, "/", streamed_body(50_000));
        let got = conn.fetch(post).await.unwrap();
        if got.status == StatusCode::BAD_GATEWAY {
            post_failed += 1;
        } else {
            assert_eq!(got.text(), "b 50000");
        }
    }
    // Round robin sends every other POST to a, which reads it and drops the connection.
    assert_eq!(a.hits.load(Ordering::SeqCst) - a_before, 2);
    assert_eq!(
        post_failed, 2,
        "a streamed POST that reached a was tried again"
    );
}

#[tokio::test]
async fn only_the_statuses_in_retry_on_are_retried_and_attempts_0_never() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    let (c, d) = (Switch::start("c").await, Switch::start("d").await);
    a.answer.store(503, Ordering::SeqCst);
    c.answer.store(503, Ordering::SeqCst);
    let routes = format!(
        "{}{}",
        route(
            "app",
            "/",
            &format!("\"{}\", \"{}\"", a.url(), b.url()),
            "retry: {on: [503, \"502\"]}, passive: {consecutive_failures: 0}"
        ),
        route(
            "none",
            "/none",
            &format!("\"{}\", \"{}\"", c.url(), d.url()),
            "retry: {attempts: 0, on: [\"503\"]}, passive: {consecutive_failures: 0}"
        ),
    );
    let proxy = proxy(&pki, &routes).await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    for _ in 0..4 {
        assert_eq!(conn.get(HOST, "/").await.unwrap().status, StatusCode::OK);
        let none = conn.get(HOST, "/none").await.unwrap();
        assert!(none.status == StatusCode::OK || none.status == StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(c.hits.load(Ordering::SeqCst) >= 1);
    let m = metrics(&proxy).await;
    assert!(
        metric(
            &m,
            "limen_upstream_retries_total{route=\"app\",reason=\"503\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "limen_upstream_retries_total{route=\"none\""),
        None,
        "{m}"
    );
    // 500 is not in `on`: relayed as it is.
    a.answer.store(500, Ordering::SeqCst);
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(conn.get(HOST, "/").await.unwrap().status.as_u16());
        }
        v
    };
    assert!(statuses.contains(&500), "{statuses:?}");
}

#[tokio::test]
async fn the_budget_stops_a_retry_storm() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    a.answer.store(503, Ordering::SeqCst);
    b.answer.store(503, Ordering::SeqCst);
    let keys =
        "retry: {attempts: 3, on: [\"503\"], budget: 20%}, passive: {consecutive_failures: 0}";
    let proxy = proxy(
        &pki,
        &route(
            "app",
            "/",
            &format!("\"{}\", \"{}\"", a.url(), b.url()),
            keys,
        ),
    )
    .await;
    let client = Client::new(&pki);
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let client = client.clone();
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut conn = client.open(addr, HOST, Proto::H1).await;
                for _ in 0..1000 / 16 {
                    let got = conn.get(HOST, "/").await.unwrap();
                    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let requests = (1000 / 16) * 16;
    let sent = a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst);
    let retries = sent - requests;
    // 20 % of the requests, plus the floor and what 16 requests racing for the last retries
    // can add.
    assert!(
        retries <= requests / 5 + limen::upstream::RETRY_BUDGET_FLOOR as usize + 16,
        "{retries} retries for {requests} requests"
    );
    assert!(
        retries >= requests / 10,
        "the budget allowed only {retries} retries"
    );
    let m = metrics(&proxy).await;
    assert!(
        metric(&m, "limen_retry_budget_exhausted_total{route=\"app\"}").unwrap_or(0.0) > 0.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_connect_failure_is_retried_whatever_the_method() {
    let pki = Pki::new();
    let b = Switch::start("b").await;
    let (dead, _held) = refused_port();
    let ups = format!("\"http://{dead}\", \"{}\"", b.url());
    let proxy = proxy(
        &pki,
        &route("app", "/", &ups, "passive: {consecutive_failures: 0}"),
    )
    .await;
    let client = Client::new(&pki);
    for _ in 0..4 {
        let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
        let post = conn.request("POST", HOST, "/", streamed_body(1000));
        let got = conn.fetch(post).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        assert_eq!(got.text(), "b 1000");
    }
    let m = metrics(&proxy).await;
    assert!(
        metric(
            &m,
            "limen_upstream_retries_total{route=\"app\",reason=\"connect_failure\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );
}

/// An upstream that refuses connections (nothing listens on its port).
fn refusing() -> (String, socket2::Socket) {
    let (dead, held) = refused_port();
    (format!("http://{dead}"), held)
}

/// A dead upstream beside a live one, with the default `retry` and `passive` settings: no client
/// ever sees an error, before the dead one is ejected or after, sequential or concurrent, GET or
/// a streamed POST (which is never sent again once it reached an upstream, but this one never
/// reached one). Failing over is not a retry: it spends no budget, so a quiet route's 4th and 5th
/// failover before the ejection are not 502s (they were, with a budget floor of 3).
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_upstream_never_costs_a_client_an_error() {
    let pki = Pki::new();
    let live = Switch::start("live").await;
    let (hole, _fill, _listener) = black_holed();
    let (refused, _held) = refusing();
    for (kind, dead) in [
        ("refused", refused),
        ("black-holed", format!("http://{hole}")),
    ] {
        let ups = format!("\"{dead}\", \"{}\"", live.url());
        let proxy = Proxy::start(
            &pki,
            &[HOST],
            "timeouts: {upstream_connect: 1s}\n",
            &route("app", "/", &ups, "balance: round_robin"),
        )
        .await;
        let client = Client::new(&pki);
        let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
        for i in 0..50 {
            let req = if i % 2 == 0 {
                conn.request("GET", HOST, "/", body(""))
            } else {
                conn.request("POST", HOST, "/", streamed_body(100_000))
            };
            let got = conn.fetch(req).await.unwrap();
            assert_eq!(
                got.status,
                StatusCode::OK,
                "{kind}: request {i}: {}",
                got.text()
            );
        }
        let workers: Vec<_> = (0..200)
            .map(|i| {
                let client = client.clone();
                let addr = proxy.addr;
                tokio::spawn(async move {
                    let mut conn = client.open(addr, HOST, Proto::H1).await;
                    let req = if i % 2 == 0 {
                        conn.request("GET", HOST, "/", body(""))
                    } else {
                        conn.request("POST", HOST, "/", streamed_body(10_000))
                    };
                    let got = conn.fetch(req).await.unwrap();
                    (got.status, got.text())
                })
            })
            .collect();
        for w in workers {
            let (status, text) = w.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{kind}: concurrent: {text}");
        }
        let m = metrics(&proxy).await;
        assert!(
            metric(&m, "limen_upstream_ejections_total").unwrap_or(0.0) >= 1.0,
            "{kind}: the dead upstream was ejected along the way: {m}"
        );
        assert_eq!(
            metric(&m, "limen_retry_budget_exhausted_total{route=\"app\"}"),
            None,
            "{kind}: failing over spends no budget: {m}"
        );
    }
}

/// An upstream that resets every connection, beside a live one, with `retry.on: [reset]` and
/// otherwise default settings: in sequential traffic (a quiet route, so the budget is its floor)
/// every reset GET is retried until passive detection ejects the bad upstream after 5 in a row.
/// With a floor of 3 retries per 10 s, the 4th and 5th were 502s.
#[tokio::test]
async fn every_reset_get_is_retried_until_the_upstream_is_ejected() {
    let pki = Pki::new();
    let (bad, good) = (Switch::start("bad").await, Switch::start("good").await);
    bad.answer.store(0, Ordering::SeqCst);
    let ups = format!("\"{}\", \"{}\"", bad.url(), good.url());
    let proxy = proxy(
        &pki,
        &route(
            "app",
            "/",
            &ups,
            "balance: round_robin, retry: {on: [reset]}",
        ),
    )
    .await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    for i in 0..30 {
        let got = conn.get(HOST, "/").await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "request {i}: {}", got.text());
    }
    let m = metrics(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "limen_upstream_retries_total{route=\"app\",reason=\"reset\"}"
        ),
        Some(5.0),
        "five resets, each retried, then the ejection: {m}"
    );
    assert!(
        metric(&m, "limen_upstream_ejections_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

/// A retry storm: every upstream resets every connection, `retry.on: [reset]` with 3 attempts.
/// 1,000 requests from 50 clients, then 150 from 2: re-sends stay within the budget's 20 % plus
/// its floor (and what the clients racing for the last retries can add), and failing over would
/// not have helped (nothing was refused), so the budget is what bounds them.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_storm_of_resets_stays_within_the_budget() {
    let pki = Pki::new();
    for (clients, each) in [(50usize, 20usize), (2, 75)] {
        let (a, b) = (Switch::start("a").await, Switch::start("b").await);
        a.answer.store(0, Ordering::SeqCst);
        b.answer.store(0, Ordering::SeqCst);
        let keys =
            "retry: {attempts: 3, on: [reset], budget: 20%}, passive: {consecutive_failures: 0}";
        let ups = format!("\"{}\", \"{}\"", a.url(), b.url());
        let proxy = proxy(&pki, &route("app", "/", &ups, keys)).await;
        let client = Client::new(&pki);
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let client = client.clone();
                let addr = proxy.addr;
                tokio::spawn(async move {
                    for _ in 0..each {
                        let mut conn = client.open(addr, HOST, Proto::H1).await;
                        let got = conn.get(HOST, "/").await.unwrap();
                        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        let requests = clients * each;
        let m = metrics(&proxy).await;
        let retries = metric(
            &m,
            "limen_upstream_retries_total{route=\"app\",reason=\"reset\"}",
        )
        .unwrap_or(0.0) as usize;
        let bound = requests / 5 + limen::upstream::RETRY_BUDGET_FLOOR as usize + clients;
        assert!(
            retries <= bound,
            "{clients} clients: {retries} re-sends for {requests} requests (bound {bound})"
        );
        assert!(
            retries >= requests / 10,
            "{clients} clients: the budget allowed only {retries} re-sends"
        );
    }
}
