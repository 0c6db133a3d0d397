//! The access log: one line per request, written when its response ends or is dropped.
//!
//! Owns: what a line holds and when it is written. Must not touch: the response itself.

#[allow(unused_imports)]
use super::*;

/// One line per request, written when the response body is finished or dropped.
pub(super) struct AccessLog {
    pub(super) request_id: HeaderValue,
    /// A well-formed `traceparent`'s trace id.
    pub(super) trace_id: Option<String>,
    /// The client's address (from the PROXY header when one came).
    pub(super) client: SocketAddr,
    pub(super) method: Method,
    /// `h1`, `h2` or `h3`.
    pub(super) proto: &'static str,
    pub(super) host: String,
    pub(super) path: String,
    pub(super) status: u16,
    pub(super) route: Option<Arc<Route>>,
    pub(super) upstream: Option<Arc<str>>,
    pub(super) started: Instant,
    pub(super) bytes: u64,
    pub(super) activity: Arc<Activity>,
    pub(super) shared: Arc<Shared>,
    pub(super) enabled: bool,
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.activity.request_finished();
        static NONE: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        let m = &self.shared.metrics;
        let seconds = self.started.elapsed().as_secs_f64();
        let label = match &self.route {
            Some(r) => {
                r.watch.answered(self.status);
                r.duration
                    .get_or_init(|| {
                        m.request_duration
                            .get_or_create_owned(&crate::metrics::RouteLabel {
                                route: r.label.clone(),
                            })
                    })
                    .observe(seconds);
                r.label.clone()
            }
            None => {
                let none = NONE.get_or_init(|| Arc::from("none")).clone();
                m.request_duration
                    .get_or_create(&crate::metrics::RouteLabel {
                        route: none.clone(),
                    })
                    .observe(seconds);
                none
            }
        };
        m.requests
            .get_or_create(&crate::metrics::RequestLabels {
                route: label,
                code: self.status,
            })
            .inc();
        if !self.enabled {
            return;
        }
        tracing::info!(
            target: "limen::access",
            client = %self.client,
            method = %self.method,
            proto = self.proto,
            host = %self.host,
            path = %self.path,
            status = self.status,
            bytes = self.bytes,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            route = self.route.as_ref().map_or("-", |r| &*r.label),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            request_id = self.request_id.to_str().unwrap_or("-"),
            trace_id = self.trace_id.as_deref().unwrap_or("-"),
        );
    }
}
