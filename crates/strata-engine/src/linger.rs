//! Serving on after SIGTERM (`strata engine --linger-secs`). On Kubernetes
//! a spot node's interruption handler evicts its Pods at the preemption
//! notice, while the node itself stays up until the notice ends; with
//! `pool.preemption_drain_secs` the gateways keep sending such a replica
//! requests until shortly before then. A lingering engine keeps accepting
//! them after the signal and stops once gateways have stopped using it (no
//! request in flight for [`QUIET`]) or the linger ends, whichever is
//! first. An engine that nobody uses when the signal comes (one a
//! scale-down let go, already drained) therefore stops [`QUIET`] later.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures_util::StreamExt;
use tokio::time::Instant;

/// How long without a request in flight before a lingering engine stops.
pub const QUIET: Duration = Duration::from_secs(10);

/// Requests in flight (a streamed answer until its last byte is taken or
/// its client goes), and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    last_end: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_end: Mutex::new(Instant::now()),
        }
    }
}

/// One request in flight; dropping it ends the request.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last_end.lock().expect("activity lock") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// How long no request has been in flight (zero while one is).
    fn quiet_for(&self, now: Instant) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        now.saturating_duration_since(*self.last_end.lock().expect("activity lock"))
    }

    fn restart_quiet(&self, now: Instant) {
        *self.last_end.lock().expect("activity lock") = now;
    }
}

/// Middleware counting the requests a gateway uses the engine for:
/// probes and scrapes (`/health`, `/metrics`) keep no engine alive.
pub async fn track(
    State(activity): State<Arc<Activity>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if matches!(req.uri().path(), "/health" | "/metrics") {
        return next.run(req).await;
    }
    let busy = activity.begin();
    let (parts, body) = next.run(req).await.into_parts();
    // The request ends when its body does, not when its head is sent.
    let body = body.into_data_stream().map(move |chunk| {
        let _ = &busy;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// Returns once a signalled engine may stop: at once without a linger;
/// else when no request has been in flight for [`QUIET`] (counted from the
/// signal at the earliest), or when `linger` has passed.
pub async fn until_unused(activity: &Activity, linger: Duration) {
    wait(activity, linger, QUIET).await
}

async fn wait(activity: &Activity, linger: Duration, quiet: Duration) {
    if linger.is_zero() {
        return;
    }
    let signalled = Instant::now();
    activity.restart_quiet(signalled);
    tracing::info!(
        linger_secs = linger.as_secs_f64(),
        "serving on while gateways send requests"
    );
    let tick = (quiet / 40).min(Duration::from_millis(250));
    loop {
        let now = Instant::now();
        if now >= signalled + linger {
            tracing::info!("linger over; stopping");
            return;
        }
        if activity.quiet_for(now) >= quiet {
            tracing::info!("no request for a while; stopping");
            return;
        }
        tokio::time::sleep(tick).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Duration = Duration::from_millis(400);

    #[tokio::test]
    async fn a_used_engine_lingers_and_an_unused_one_stops_after_the_quiet() {
        let activity = Arc::new(Activity::default());
        // Unused: stops the quiet after the signal.
        let t0 = Instant::now();
        wait(&activity, Duration::from_secs(30), Q).await;
        let took = t0.elapsed();
        assert!(took >= Q && took < Q * 3, "{took:?}");
        // In use all along: stops at the linger's end.
        let busy = activity.begin();
        let t0 = Instant::now();
        wait(&activity, Q * 3, Q).await;
        let took = t0.elapsed();
        assert!(took >= Q * 3 && took < Q * 5, "{took:?}");
        // Used until 2Q after the signal: stops the quiet after that.
        let t0 = Instant::now();
        let ended = async {
            tokio::time::sleep(Q * 2).await;
            drop(busy);
        };
        tokio::join!(wait(&activity, Duration::from_secs(30), Q), ended);
        let took = t0.elapsed();
        assert!(took >= Q * 3 && took < Q * 5, "{took:?}");
        // No linger: at once.
        let t0 = Instant::now();
        wait(&activity, Duration::ZERO, Q).await;
        assert!(t0.elapsed() < Q / 4);
    }
}
