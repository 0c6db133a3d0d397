//! Upstream health: what the active checker and live traffic (passive outlier detection) say
//! about one upstream, and the checker task itself.
//!
//! Owns: `Health` (the state, its thresholds and ejection backoff) and the checks (http over the
//! upstream's own protocol and TLS, tcp connect, `grpc.health.v1.Health/Check`). A check uses the
//! upstream's pool like a request would, but never the route's retry or passive logic and never
//! the request metrics. Must not touch: choosing upstreams (balance), requests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;

use super::client::{send, Deadlines, Lease};
use super::Upstream;
use crate::body::RequestBody;
use crate::config::{CheckKind, HealthCheck, Passive, UpstreamScheme, MAX_EJECTION};
use crate::error::ErrorKind;
use crate::metrics::UpstreamLabels;

/// The counter of checks, by upstream and result.
pub type CheckCounter = prometheus_client::metrics::family::Family<
    UpstreamLabels,
    prometheus_client::metrics::counter::Counter,
>;

/// Bodies of health answers are read this far and no further.
const HTTP_BODY_LIMIT: usize = 4096;
const GRPC_BODY_LIMIT: usize = 1024;

/// Milliseconds since the process's first look at the clock: ejection deadlines fit an atomic.
fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The last active check, for the status page.
#[derive(Debug, Clone)]
pub struct LastCheck {
    pub at: SystemTime,
    pub ok: bool,
    pub reason: Option<String>,
}

/// Where an upstream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    /// Taken out by its active check.
    Down,
    /// Taken out by passive outlier detection, until a moment.
    Ejected,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Ejected => "ejected",
        }
    }
}

#[derive(Debug, Default)]
struct Active {
    successes: u32,
    failures: u32,
    last: Option<LastCheck>,
}

#[derive(Debug, Default)]
struct Outlier {
    consecutive: u32,
    /// Ejections in a row: the next one lasts `ejection << level`.
    level: u32,
    until: Option<Instant>,
    /// Since when no failure was seen (the last failure, or the end of the last ejection).
    quiet_since: Option<Instant>,
}

/// One upstream's health, active and passive. Starts up.
#[derive(Debug)]
pub struct Health {
    pub check: Option<HealthCheck>,
    pub passive: Passive,
    down: AtomicBool,
    active: Mutex<Active>,
    /// `now_ms()` until which the upstream is ejected; 0: not ejected.
    ejected_until: AtomicU64,
    /// Failures seen since the last success, as a hint that the lock is worth taking.
    failing: AtomicBool,
    outlier: Mutex<Outlier>,
    pub(super) checker_started: AtomicBool,
    /// Dropped with the upstream: its checker then stops.
    pub(super) stop: tokio::sync::watch::Sender<()>,
}

impl Health {
    pub fn new(check: Option<HealthCheck>, passive: Passive) -> Health {
        Health {
            check,
            passive,
            down: AtomicBool::new(false),
            active: Mutex::new(Active::default()),
            ejected_until: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            outlier: Mutex::new(Outlier::default()),
            checker_started: AtomicBool::new(false),
            stop: tokio::sync::watch::channel(()).0,
        }
    }

    /// May take requests: not down, not ejected.
    pub fn available(&self) -> bool {
        !self.down.load(Ordering::Relaxed) && self.ejected_until.load(Ordering::Relaxed) <= now_ms()
    }

    pub fn state(&self) -> State {
        if self.down.load(Ordering::Relaxed) {
            State::Down
        } else if self.ejected_until.load(Ordering::Relaxed) > now_ms() {
            State::Ejected
        } else {
            State::Up
        }
    }

    pub fn last_check(&self) -> Option<LastCheck> {
        self.active.lock().ok()?.last.clone()
    }

    /// When the current ejection ends, if the upstream is ejected now.
    pub fn ejected_until(&self) -> Option<SystemTime> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let now = now_ms();
        (until > now).then(|| SystemTime::now() + Duration::from_millis(until - now))
    }

    /// A request to this upstream went well: the consecutive-failure count starts again.
    pub fn passive_success(&self) {
        if self.failing.load(Ordering::Relaxed) {
            self.failing.store(false, Ordering::Relaxed);
            if let Ok(mut o) = self.outlier.lock() {
                o.consecutive = 0;
            }
        }
    }

    /// A request to this upstream failed (connect error, reset, timeout, 502/503/504). Some: the
    /// upstream was ejected by this failure, for that long.
    pub fn passive_failure(&self, now: Instant) -> Option<Duration> {
        let n = self.passive.consecutive_failures;
        if n == 0 {
            return None;
        }
        let mut o = self.outlier.lock().ok()?;
        if let Some(until) = o.until {
            if now < until {
                // Failures of requests already in flight when it was ejected.
                return None;
            }
            // The ejection ended: counting starts again from 0.
            o.until = None;
            o.consecutive = 0;
            o.quiet_since = Some(until);
        }
        if o.quiet_since
            .is_some_and(|q| now.saturating_duration_since(q) >= self.passive.ejection)
        {
            o.level = 0;
        }
        o.quiet_since = Some(now);
        o.consecutive += 1;
        self.failing.store(true, Ordering::Relaxed);
        if o.consecutive < n {
            return None;
        }
        let factor = 1u32.checked_shl(o.level.min(16)).unwrap_or(u32::MAX);
        let ejection = self
            .passive
            .ejection
            .checked_mul(factor)
            .unwrap_or(MAX_EJECTION)
            .min(MAX_EJECTION);
        o.until = Some(now + ejection);
        o.level += 1;
        o.consecutive = 0;
        let left = (now + ejection).saturating_duration_since(Instant::now());
        self.ejected_until
            .store(now_ms() + left.as_millis() as u64, Ordering::Relaxed);
        Some(ejection)
    }

    /// Records a check's result and applies the thresholds. Some: the upstream changed state
    /// (true: it is up again).
    fn note_check(&self, check: &HealthCheck, result: &Result<(), String>) -> Option<bool> {
        let mut a = self.active.lock().ok()?;
        a.last = Some(LastCheck {
            at: SystemTime::now(),
            ok: result.is_ok(),
            reason: result.as_ref().err().cloned(),
        });
        let down = self.down.load(Ordering::Relaxed);
        if result.is_ok() {
            a.failures = 0;
            a.successes = a.successes.saturating_add(1);
            if down && a.successes >= check.healthy_after {
                self.down.store(false, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            a.successes = 0;
            a.failures = a.failures.saturating_add(1);
            if !down && a.failures >= check.unhealthy_after {
                self.down.store(true, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }
}

/// What the checkers need from the process: where to run, when to stop, what to count.
pub(super) struct Runner {
    pub handle: tokio::runtime::Handle,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub checks: CheckCounter,
}

/// Starts the checker of `up` if it has a check and none runs yet.
pub(super) fn start_checker(up: &Arc<Upstream>, runner: &Runner) {
    let Some(check) = up.health.check.clone() else {
        return;
    };
    if up.health.checker_started.swap(true, Ordering::Relaxed) {
        return;
    }
    let weak = Arc::downgrade(up);
    let stop = up.health.stop.subscribe();
    let shutdown = runner.shutdown.clone();
    let checks = runner.checks.clone();
    runner
        .handle
        .spawn(run_checker(weak, check, stop, shutdown, checks));
}

/// A number in `[0, 1)`, different in every call (jitter; not for secrets).
pub fn random_unit() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

pub fn random_u64() -> u64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(now_ms());
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        // xorshift64*
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

async fn run_checker(
    up: Weak<Upstream>,
    check: HealthCheck,
    mut stop: tokio::sync::watch::Receiver<()>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    checks: CheckCounter,
) {
    // The first check at a random point of the first interval, so a thousand upstreams loaded at
    // once do not fire at once; then every interval, give or take 10 %.
    let mut wait = check.interval.mul_f64(random_unit());
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let Some(up) = up.upgrade() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + check.timeout;
        let result = probe(&up, &check, deadline).await;
        checks
            .get_or_create(&UpstreamLabels {
                upstream: up.authority.clone(),
                result: if result.is_ok() { "success" } else { "failure" },
            })
            .inc();
        match up.health.note_check(&check, &result) {
            Some(true) => {
                tracing::info!(upstream = %up.url, "upstream is up again: its health check passed {} times in a row", check.healthy_after);
            }
            Some(false) => {
                tracing::warn!(upstream = %up.url, reason = result.as_ref().err().map(String::as_str).unwrap_or(""), "upstream is down: its health check failed {} times in a row", check.unhealthy_after);
            }
            None => {}
        }
        drop(up);
        wait = check.interval.mul_f64(0.9 + 0.2 * random_unit());
    }
}

/// One check, over by `deadline`. An http check's verdict is its status: a body still coming at
/// the deadline only costs the connection.
async fn probe(
    up: &Arc<Upstream>,
    check: &HealthCheck,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    // An http or gRPC check's own steps end by `deadline`; the margin only keeps a verdict
    // reached right at it.
    let margin = deadline + Duration::from_millis(50);
    let verdict = match check.kind {
        CheckKind::Http => tokio::time::timeout_at(margin, http_probe(up, check, deadline)).await,
        CheckKind::Grpc => tokio::time::timeout_at(margin, grpc_probe(up, check, deadline)).await,
        CheckKind::Tcp => tokio::time::timeout_at(deadline, tcp_probe(up, check)).await,
    };
    verdict.unwrap_or_else(|_| Err(late(check)))
}

async fn tcp_probe(up: &Arc<Upstream>, check: &HealthCheck) -> Result<(), String> {
    let place = up
        .registry
        .place(check.timeout)
        .await
        .ok_or("no descriptor left for the check")?;
    let tcp = tokio::net::TcpStream::connect(&*up.addr)
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    drop((tcp, place));
    Ok(())
}

/// The request of a check, in HTTP/1.1 form (the client puts it in HTTP/2 form for an HTTP/2
/// connection).
fn check_request(
    up: &Upstream,
    method: Method,
    path: &str,
    host: Option<&str>,
    body: RequestBody,
) -> Result<Request<RequestBody>, String> {
    let host = host
        .map(str::to_owned)
        .or_else(|| up.tls.as_ref().map(|t| t.server_name.to_str().into_owned()))
        .unwrap_or_else(|| up.addr.to_string());
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().map_err(|_| "the check's URL is not valid")?;
    let host = HeaderValue::from_str(&host).map_err(|_| "the check's Host is not valid")?;
    let h = req.headers_mut();
    h.insert(header::HOST, host);
    h.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("limen-health-check/", env!("CARGO_PKG_VERSION"))),
    );
    Ok(req)
}

/// A check's exchange goes through the upstream client like a request's (the same checkout,
/// stale-connection and refusal handling), all over by `deadline`.
async fn check_send(
    up: &Arc<Upstream>,
    req: Request<RequestBody>,
    check: &HealthCheck,
    deadline: tokio::time::Instant,
) -> Result<(http::Response<hyper::body::Incoming>, Lease), String> {
    let deadlines = Deadlines {
        connect: check.timeout,
        checkout_by: deadline,
        response: deadline.saturating_duration_since(tokio::time::Instant::now()),
        clients: false,
        write: check.timeout,
    };
    send(up, req, &deadlines)
        .await
        .map_err(|e| match e.error.kind {
            ErrorKind::Timeout => late(check),
            // Nothing reached the upstream: the dial's own words say why.
            _ if e.unsent.is_some() => e.error.chain(),
            _ => format!("request failed: {}", e.error.chain()),
        })
}

fn late(check: &HealthCheck) -> String {
    format!("no answer within health.timeout ({:?})", check.timeout)
}

/// The verdict comes from the status; the body is read (a little, until `deadline`) only to
/// reuse the connection.
async fn http_probe(
    up: &Arc<Upstream>,
    check: &HealthCheck,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    let req = check_request(
        up,
        Method::GET,
        &check.path,
        check.host.as_deref(),
        RequestBody::whole(Bytes::new(), None),
    )?;
    let (resp, lease) = check_send(up, req, check, deadline).await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let drained = tokio::time::timeout_at(deadline, async {
        let mut read = 0usize;
        while !body.is_end_stream() {
            match body.frame().await {
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, |d| d.len());
                    if read > HTTP_BODY_LIMIT {
                        return false;
                    }
                }
                Some(Err(_)) => return false,
                None => break,
            }
        }
        true
    })
    .await;
    lease.finish(drained == Ok(true));
    if check.expect.contains(status) {
        Ok(())
    } else {
        Err(format!("status {status}, not in {}", check.expect))
    }
}

async fn grpc_probe(
    up: &Arc<Upstream>,
    check: &HealthCheck,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    let h1_only = "gRPC health checks need HTTP/2, and the upstream chose HTTP/1.1";
    if up.scheme == UpstreamScheme::Http || up.alpn.load(Ordering::Relaxed) == 1 {
        return Err(h1_only.into());
    }
    // A HealthCheckRequest for the whole server (empty service name) is an empty message.
    let mut req = check_request(
        up,
        Method::POST,
        "/grpc.health.v1.Health/Check",
        None,
        RequestBody::whole(Bytes::from_static(&[0, 0, 0, 0, 0]), None),
    )?;
    let h = req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    let ms = check.timeout.as_millis().clamp(1, 99_999_999);
    if let Ok(v) = HeaderValue::from_str(&format!("{ms}m")) {
        h.insert("grpc-timeout", v);
    }
    let (resp, _lease) = check_send(up, req, check, deadline).await?;
    if resp.version() != http::Version::HTTP_2 {
        return Err(h1_only.into());
    }
    if resp.status() != StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status().as_u16()));
    }
    let head_status = grpc_status(resp.headers());
    let mut body = resp.into_body();
    let mut data = Vec::new();
    let mut status = head_status;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reply cut short: {e}"))?;
        match frame.into_data() {
            Ok(d) => {
                if data.len() + d.len() > GRPC_BODY_LIMIT + 5 {
                    return Err("oversized reply".into());
                }
                data.extend_from_slice(&d);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    status = grpc_status(&t).or(status);
                }
            }
        }
    }
    match status {
        Some(0) => {}
        Some(code) => return Err(format!("grpc-status {code}")),
        None => return Err("no grpc-status in the reply".into()),
    }
    match serving_status(&data)? {
        1 => Ok(()),
        0 => Err("UNKNOWN".into()),
        2 => Err("NOT_SERVING".into()),
        3 => Err("SERVICE_UNKNOWN".into()),
        n => Err(format!("serving status {n}")),
    }
}

fn grpc_status(h: &http::HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// The `status` field (1, varint) of one framed `HealthCheckResponse`; a missing field is 0.
fn serving_status(framed: &[u8]) -> Result<u64, String> {
    let [flag, a, b, c, d, msg @ ..] = framed else {
        return Err("malformed reply: no message".into());
    };
    if *flag != 0 {
        return Err("compressed reply".into());
    }
    let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
    if len > GRPC_BODY_LIMIT || msg.len() != len {
        return Err("malformed reply: bad message length".into());
    }
    let mut rest = msg;
    let mut status = 0;
    while !rest.is_empty() {
        let key = varint(&mut rest)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = varint(&mut rest)?,
            (_, 0) => {
                varint(&mut rest)?;
            }
            (_, 1) => rest = rest.get(8..).ok_or("malformed reply")?,
            (_, 2) => {
                let n = usize::try_from(varint(&mut rest)?).map_err(|_| "malformed reply")?;
                rest = rest.get(n..).ok_or("malformed reply")?;
            }
            (_, 5) => rest = rest.get(4..).ok_or("malformed reply")?,
            _ => return Err("malformed reply".into()),
        }
    }
    Ok(status)
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first().ok_or("malformed reply")?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("malformed reply".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passive(n: u32, ms: u64) -> Health {
        Health::new(
            None,
            Passive {
                consecutive_failures: n,
                ejection: Duration::from_millis(ms),
            },
        )
    }

    #[test]
    fn ejections_double_up_to_the_cap_and_go_back_after_a_quiet_period() {
        let h = passive(2, 1000);
        let t0 = Instant::now();
        assert_eq!(h.passive_failure(t0), None);
        assert_eq!(h.passive_failure(t0), Some(Duration::from_secs(1)));
        // Failures while ejected do not count.
        assert_eq!(h.passive_failure(t0 + Duration::from_millis(500)), None);
        // After it ends, the count starts again from 0: two more to eject, for twice as long.
        let t1 = t0 + Duration::from_millis(1100);
        assert_eq!(h.passive_failure(t1), None);
        assert_eq!(h.passive_failure(t1), Some(Duration::from_secs(2)));
        let t2 = t1 + Duration::from_millis(2100);
        assert_eq!(h.passive_failure(t2), None);
        assert_eq!(h.passive_failure(t2), Some(Duration::from_secs(4)));
        // One ejection period (1 s) with no failure after it ended: back to the first length.
        let t3 = t2 + Duration::from_millis(4000 + 1500);
        assert_eq!(h.passive_failure(t3), None);
        assert_eq!(h.passive_failure(t3), Some(Duration::from_secs(1)));
    }

    #[test]
    fn an_ejection_never_exceeds_five_minutes() {
        let h = passive(1, 100_000);
        let mut t = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..6 {
            last = h.passive_failure(t).unwrap();
            t += last + Duration::from_millis(1);
        }
        assert_eq!(last, MAX_EJECTION);
    }

    #[test]
    fn a_success_resets_the_count_and_zero_is_off() {
        let h = passive(2, 1000);
        let t = Instant::now();
        assert_eq!(h.passive_failure(t), None);
        h.passive_success();
        assert_eq!(h.passive_failure(t), None);
        assert!(h.available());
        assert_eq!(passive(0, 1000).passive_failure(t), None);
    }

    #[test]
    fn thresholds_take_an_upstream_out_and_back() {
        let check: HealthCheck = HealthCheck {
            kind: CheckKind::Http,
            path: "/".into(),
            host: None,
            expect: Default::default(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_after: 2,
            unhealthy_after: 3,
        };
        let h = Health::new(Some(check.clone()), Passive::default());
        let bad = Err("status 503".to_string());
        assert_eq!(h.note_check(&check, &bad), None);
        assert_eq!(h.note_check(&check, &Ok(())), None);
        assert_eq!(h.note_check(&check, &bad), None);
        assert_eq!(h.note_check(&check, &bad), None);
        assert_eq!(h.note_check(&check, &bad), Some(false));
        assert_eq!(h.state(), State::Down);
        assert_eq!(h.note_check(&check, &Ok(())), None);
        assert_eq!(h.note_check(&check, &Ok(())), Some(true));
        assert_eq!(h.state(), State::Up);
    }

    #[test]
    fn serving_status_is_read_from_the_message() {
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 8, 1]), Ok(1));
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Ok(0));
        // An unknown length-delimited field first, then status 2.
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 6, 0x12, 2, b'h', b'i', 8, 2]),
            Ok(2)
        );
        assert!(serving_status(&[1, 0, 0, 0, 2, 8, 1]).is_err());
        assert!(serving_status(&[0, 0, 0, 0, 9, 8, 1]).is_err());
        assert!(serving_status(&[0, 0, 0, 0, 1, 0xff]).is_err());
        assert!(serving_status(&[0, 0]).is_err());
    }
}
