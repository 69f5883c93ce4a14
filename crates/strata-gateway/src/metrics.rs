//! The gateway's Prometheus metrics.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

pub struct GatewayMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub retries: Counter,
    pub ledger_dropped: Counter,
    pub replicas_ready: Gauge,
    pub latency: Histogram,
    pub first_byte: Histogram,
    /// Requests holding a replica slot, and waiting in the fair queues.
    pub in_flight: Gauge,
    pub waiting: Gauge,
    /// Prompt + completion tokens served (the autoscaler's demand signal).
    pub tokens: Counter,
    pub prompt_tokens: Counter,
    /// Generation requests received (before queueing), for request-rate signals.
    pub arrived: Counter,
    /// Recent streamed requests' latencies, for the SLO signals.
    pub recent: LatencyWindow,
}

/// Time to first token and time per output token of the streamed requests
/// of the last `LatencyWindow::SPAN`, for p95s against the pool's SLOs.
#[derive(Default)]
pub struct LatencyWindow {
    samples: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, f64, Option<f64>)>>,
}

impl LatencyWindow {
    pub const SPAN: std::time::Duration = std::time::Duration::from_secs(30);
    const MAX: usize = 8192;

    pub fn record(&self, ttft_ms: f64, tpot_ms: Option<f64>) {
        let mut s = self.samples.lock().expect("latency window lock");
        if s.len() == Self::MAX {
            s.pop_front();
        }
        s.push_back((std::time::Instant::now(), ttft_ms, tpot_ms));
    }

    /// p95 TTFT and p95 TPOT (milliseconds) over the window.
    pub fn p95(&self) -> (Option<f64>, Option<f64>) {
        let mut s = self.samples.lock().expect("latency window lock");
        while s.front().is_some_and(|f| f.0.elapsed() > Self::SPAN) {
            s.pop_front();
        }
        let ttft: Vec<f64> = s.iter().map(|x| x.1).collect();
        let tpot: Vec<f64> = s.iter().filter_map(|x| x.2).collect();
        drop(s);
        (p95(ttft), p95(tpot))
    }
}

fn p95(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((v.len() as f64) * 0.95).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let buckets = [
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let m = GatewayMetrics {
            registry: Registry::default(),
            requests: Family::default(),
            retries: Counter::default(),
            ledger_dropped: Counter::default(),
            replicas_ready: Gauge::default(),
            latency: Histogram::new(buckets),
            first_byte: Histogram::new(buckets),
            in_flight: Gauge::default(),
            waiting: Gauge::default(),
            tokens: Counter::default(),
            prompt_tokens: Counter::default(),
            arrived: Counter::default(),
            recent: LatencyWindow::default(),
        };
        let mut registry = Registry::with_prefix("strata_gateway");
        registry.register(
            "requests",
            "Requests by route and status",
            m.requests.clone(),
        );
        registry.register(
            "retries",
            "Requests sent to another replica after one failed",
            m.retries.clone(),
        );
        registry.register(
            "ledger_dropped",
            "Usage rows dropped because the writer fell behind",
            m.ledger_dropped.clone(),
        );
        registry.register(
            "replicas_ready",
            "Replicas passing health checks",
            m.replicas_ready.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Arrival to last byte",
            Unit::Seconds,
            m.latency.clone(),
        );
        registry.register_with_unit(
            "time_to_first_byte",
            "Arrival to first response byte",
            Unit::Seconds,
            m.first_byte.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests holding a replica slot",
            m.in_flight.clone(),
        );
        registry.register(
            "requests_waiting",
            "Requests waiting in the per-tenant fair queues",
            m.waiting.clone(),
        );
        registry.register(
            "tokens",
            "Prompt and completion tokens served",
            m.tokens.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens served",
            m.prompt_tokens.clone(),
        );
        GatewayMetrics { registry, ..m }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_the_nearest_rank() {
        assert_eq!(p95(vec![]), None);
        assert_eq!(p95(vec![7.0]), Some(7.0));
        let hundred: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(p95(hundred), Some(95.0));
        let w = LatencyWindow::default();
        w.record(10.0, None);
        w.record(30.0, Some(4.0));
        assert_eq!(w.p95(), (Some(30.0), Some(4.0)));
    }
}
