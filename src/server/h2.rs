//! The HTTP/2 stream driver: `StreamExecutor` is the hyper executor of each HTTP/2 connection; it
//! hands every stream's future, under a `watch::StreamClock` (a task-local its response body
//! sees), to `H2Driver`, which polls the connection and its streams in the connection's one task
//! (no task per stream). The watchdog's `sweep` cancels a stream whose body waited on a zero
//! window for `write_idle`, or tells the watchdog to close the connection when every open stream
//! is stalled.
//!
//! Must not touch: hyper's connection settings or the watchdog's decisions (`conn`, `watchdog`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::watch::StreamClock;

type StreamFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs each HTTP/2 stream of one connection inside the connection's own task (`H2Driver`), with
/// a clock the watchdog reads and a cancel it can pull.
#[derive(Clone, Default)]
pub(super) struct StreamExecutor {
    streams: Arc<std::sync::Mutex<Vec<std::sync::Weak<StreamClock>>>>,
    /// Streams hyper handed over since the driver last took them.
    started: Arc<std::sync::Mutex<Vec<StreamFuture>>>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let clock = Arc::new(StreamClock::new());
        if let Ok(mut list) = self.streams.lock() {
            if list.len() >= 64 && list.len().is_power_of_two() {
                list.retain(|w| w.strong_count() > 0);
            }
            list.push(Arc::downgrade(&clock));
        }
        // One allocation for the stream's future, its clock's scope and its cancel.
        let fut: StreamFuture = Box::pin(clock.cancellable(fut));
        if let Ok(mut started) = self.started.lock() {
            started.push(fut);
        }
    }
}

/// An HTTP/2 connection and its streams, polled in one task: a stream's wake-up polls the
/// connection's task, and no stream costs a task of its own (docs/performance.md). Ends with the
/// connection; streams still running then are dropped (h2 has failed them by then).
pub(super) struct H2Driver<C> {
    conn: Pin<Box<C>>,
    /// hyper's `graceful_shutdown` of the connection (its bounds are the caller's to prove).
    shutdown: fn(Pin<&mut C>),
    running: futures_util::stream::FuturesUnordered<StreamFuture>,
    started: Arc<std::sync::Mutex<Vec<StreamFuture>>>,
    /// Swapped with `started` at each turn, so neither list allocates again.
    taken: Vec<StreamFuture>,
}

impl<C> H2Driver<C> {
    pub(super) fn new(
        conn: C,
        shutdown: fn(Pin<&mut C>),
        executor: &StreamExecutor,
    ) -> H2Driver<C> {
        H2Driver {
            conn: Box::pin(conn),
            shutdown,
            running: futures_util::stream::FuturesUnordered::new(),
            started: executor.started.clone(),
            taken: Vec::new(),
        }
    }

    pub(super) fn graceful_shutdown(mut self: Pin<&mut Self>) {
        let shutdown = self.shutdown;
        shutdown(self.conn.as_mut());
    }
}

impl<C: std::future::Future> std::future::Future for H2Driver<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        use futures_util::StreamExt;
        let this = &mut *self;
        loop {
            let done = this.conn.as_mut().poll(cx);
            let (mut added, mut polled) = (false, false);
            // Streams started while streams were polled (hyper's executor is theirs to call
            // too) are taken in the same turn: nothing else would wake this task for them.
            loop {
                if let Ok(mut s) = this.started.lock() {
                    std::mem::swap(&mut *s, &mut this.taken);
                }
                if this.taken.is_empty() && polled {
                    break;
                }
                added |= !this.taken.is_empty();
                this.running.extend(this.taken.drain(..));
                while let Poll::Ready(Some(())) = this.running.poll_next_unpin(cx) {}
                polled = true;
            }
            if let Poll::Ready(out) = done {
                return Poll::Ready(out);
            }
            // New streams may have queued their first frames: the connection writes them now.
            if !added {
                return Poll::Pending;
            }
        }
    }
}

impl StreamExecutor {
    /// Cancels every stream whose body has waited on the client's window for `limit`. True when
    /// streams are open and every one of them is stalled: the connection should close.
    pub(super) fn sweep(&self, limit: Duration) -> bool {
        let Ok(mut list) = self.streams.lock() else {
            return false;
        };
        list.retain(|w| w.strong_count() > 0);
        let (mut open, mut stalled) = (0usize, 0usize);
        for clock in list.iter().filter_map(std::sync::Weak::upgrade) {
            if clock.is_cancelled() {
                continue;
            }
            open += 1;
            if clock.stalled_for(limit) {
                stalled += 1;
                clock.cancel();
            }
        }
        open > 0 && stalled == open
    }
}
