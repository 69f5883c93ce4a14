//! The gateway's Prometheus metrics.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

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

/// A finished generation request: its model, status and (when the operator
/// enables tenant labels; else empty, which Prometheus treats as absent) its
/// tenant id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    pub model: String,
    pub status: u16,
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

type Histograms = Family<ModelLabels, Histogram, fn() -> Histogram>;

fn token_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0,
    ])
}

pub struct GatewayMetrics {
    registry: Registry,
    /// Label generation metrics with the tenant id (`gateway.metrics_tenant_labels`).
    pub tenant_labels: bool,
    pub generations: Family<UsageLabels, Counter>,
    pub cost: Family<UsageLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Streamed requests: arrival to first token, and between tokens.
    pub ttft: Histograms,
    pub tpot: Histograms,
    pub requests: Family<RequestLabels, Counter>,
    pub retries: Counter,
    pub ledger_dropped: Counter,
    /// Requests checked by this gateway's own limiter because the shared
    /// (Redis) one could not be reached.
    pub limits_fallback: Counter,
    pub replicas_ready: Gauge,
    pub latency: Histogram,
    pub first_byte: Histogram,
    /// Requests holding a replica slot, and waiting in the fair queues.
    pub in_flight: Gauge,
    pub waiting: Gauge,
    /// Prompt + completion tokens served (the autoscaler's demand signal).
    pub tokens: Counter,
    pub prompt_tokens: Counter,
    /// Tokens of batch lines: served on spare slots, not demand.
    pub batch_tokens: Counter,
    /// Generation requests received (before queueing), for request-rate signals.
    pub arrived: Counter,
    /// Recent streamed requests' latencies, for the SLO signals.
    pub recent: LatencyWindow,
    /// The same demand signals per model of the catalog, for each model's
    /// pool (models outside it count only in the totals).
    demand: std::sync::RwLock<std::collections::HashMap<String, Arc<Demand>>>,
}

/// One model's demand signals: what its pool's autoscaler scales by.
#[derive(Default)]
pub struct Demand {
    pub arrived: AtomicU64,
    pub tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub recent: LatencyWindow,
}

/// The gateway's latency window: `strata_core::latency::LatencyWindow` on
/// the real clock, shared by the ledger (writer) and the load publisher.
pub struct LatencyWindow {
    epoch: std::time::Instant,
    window: std::sync::Mutex<strata_core::latency::LatencyWindow>,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        LatencyWindow {
            epoch: std::time::Instant::now(),
            window: Default::default(),
        }
    }
}

impl LatencyWindow {
    pub fn record(&self, ttft_ms: f64, tpot_ms: Option<f64>) {
        let at = self.epoch.elapsed();
        self.window
            .lock()
            .expect("latency window lock")
            .record(at, ttft_ms, tpot_ms);
    }

    /// p95 TTFT and p95 TPOT (milliseconds) over the last half minute.
    pub fn p95(&self) -> (Option<f64>, Option<f64>) {
        let now = self.epoch.elapsed();
        self.window.lock().expect("latency window lock").p95(now)
    }
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let buckets = [
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let m = GatewayMetrics {
            registry: Registry::default(),
            tenant_labels: false,
            generations: Family::default(),
            cost: Family::default(),
            ttft: Family::new_with_constructor(token_histogram as fn() -> Histogram),
            tpot: Family::new_with_constructor(token_histogram as fn() -> Histogram),
            requests: Family::default(),
            retries: Counter::default(),
            ledger_dropped: Counter::default(),
            limits_fallback: Counter::default(),
            replicas_ready: Gauge::default(),
            latency: Histogram::new(buckets),
            first_byte: Histogram::new(buckets),
            in_flight: Gauge::default(),
            waiting: Gauge::default(),
            tokens: Counter::default(),
            prompt_tokens: Counter::default(),
            batch_tokens: Counter::default(),
            arrived: Counter::default(),
            recent: LatencyWindow::default(),
            demand: Default::default(),
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
            "shared_limits_fallback",
            "Requests rate-limited by this gateway alone because Redis was unreachable",
            m.limits_fallback.clone(),
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
            "batch_tokens",
            "Prompt and completion tokens of batch lines (not in tokens: not demand)",
            m.batch_tokens.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens served",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "generations",
            "Generation requests finished, by model, status and (if enabled) tenant",
            m.generations.clone(),
        );
        registry.register_with_unit(
            "cost",
            "Price of the tokens served, by model, status and (if enabled) tenant",
            Unit::Other("dollars".into()),
            m.cost.clone(),
        );
        registry.register_with_unit(
            "stream_time_to_first_token",
            "Streamed requests: arrival to the first token, by model",
            Unit::Seconds,
            m.ttft.clone(),
        );
        registry.register_with_unit(
            "stream_time_per_output_token",
            "Streamed requests: mean time between tokens, by model",
            Unit::Seconds,
            m.tpot.clone(),
        );
        GatewayMetrics { registry, ..m }
    }

    /// With the tenant id as a label of the generation metrics (one series
    /// per tenant: for operators with few tenants).
    pub fn with_tenant_labels(mut self, on: bool) -> Self {
        self.tenant_labels = on;
        self
    }

    /// Demand is kept per model for these models' pools (the catalog as
    /// it is now; a model that leaves it keeps its counters, should it
    /// come back).
    pub fn track_models<'a>(&self, models: impl IntoIterator<Item = &'a str> + Clone) {
        let known = self.demand.read().expect("demand lock");
        if models.clone().into_iter().all(|m| known.contains_key(m)) {
            return;
        }
        drop(known);
        let mut demand = self.demand.write().expect("demand lock");
        for m in models {
            if !demand.contains_key(m) {
                demand.insert(m.to_owned(), Arc::new(Demand::default()));
            }
        }
    }

    /// `model`'s demand signals, when it is one of the catalog's.
    pub fn demand(&self, model: &str) -> Option<Arc<Demand>> {
        self.demand.read().expect("demand lock").get(model).cloned()
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

/// Renders metrics kept elsewhere in the process (the controller's, when it
/// runs beside the gateway): OpenMetrics text ending in `# EOF`, appended to
/// `/metrics`.
#[derive(Clone)]
pub struct MoreMetrics(pub std::sync::Arc<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for MoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MoreMetrics")
    }
}
