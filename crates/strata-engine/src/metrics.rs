//! The engine's Prometheus metrics, updated by the scheduler thread and read
//! by `GET /metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

pub struct EngineMetrics {
    registry: Registry,
    pub running: Gauge,
    pub queued: Gauge,
    pub kv_used: Gauge,
    pub kv_total: Gauge,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub batch_generated_tokens: Counter,
    pub batch_held_steps: Counter,
    pub requests_rejected: Counter,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub step_tokens: Counter<f64, AtomicU64>,
    pub prefix_hits: Counter,
    pub prefix_reused_tokens: Counter,
    pub prefix_cache_tokens: Gauge,
    pub prefix_cache_entries: Gauge,
}

impl EngineMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("strata_engine");
        let m = EngineMetrics {
            running: Gauge::default(),
            queued: Gauge::default(),
            kv_used: Gauge::default(),
            kv_total: Gauge::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            batch_generated_tokens: Counter::default(),
            batch_held_steps: Counter::default(),
            requests_rejected: Counter::default(),
            ttft: Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            tpot: Histogram::new([0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0]),
            step_tokens: Counter::default(),
            prefix_hits: Counter::default(),
            prefix_reused_tokens: Counter::default(),
            prefix_cache_tokens: Gauge::default(),
            prefix_cache_entries: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "running_sequences",
            "Sequences in the running batch",
            m.running.clone(),
        );
        registry.register(
            "queued_requests",
            "Requests waiting for a sequence slot",
            m.queued.clone(),
        );
        registry.register(
            "kv_cache_used_tokens",
            "KV cache cells holding tokens",
            m.kv_used.clone(),
        );
        registry.register(
            "kv_cache_total_tokens",
            "KV cache cells in all",
            m.kv_total.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens read",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "generation_tokens",
            "Tokens generated",
            m.generated_tokens.clone(),
        );
        registry.register(
            "batch_generation_tokens",
            "Tokens generated for batch-class requests",
            m.batch_generated_tokens.clone(),
        );
        registry.register(
            "batch_held_steps",
            "Steps that left batch work waiting for interactive work",
            m.batch_held_steps.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests refused because the queue was full",
            m.requests_rejected.clone(),
        );
        registry.register_with_unit(
            "time_to_first_token",
            "From arrival to the first generated token",
            Unit::Seconds,
            m.ttft.clone(),
        );
        registry.register_with_unit(
            "time_per_output_token",
            "Between consecutive generated tokens of one sequence",
            Unit::Seconds,
            m.tpot.clone(),
        );
        registry.register(
            "batch_tokens",
            "Tokens sent through llama_decode",
            m.step_tokens.clone(),
        );
        registry.register(
            "prefix_cache_hits",
            "Requests that reused a cached prefix of their own tenant",
            m.prefix_hits.clone(),
        );
        registry.register(
            "prefix_cache_reused_tokens",
            "Prompt tokens taken from the prefix cache instead of prefilled",
            m.prefix_reused_tokens.clone(),
        );
        registry.register(
            "prefix_cache_tokens",
            "KV cells held by finished sequences kept for reuse",
            m.prefix_cache_tokens.clone(),
        );
        registry.register(
            "prefix_cache_entries",
            "Finished sequences kept for reuse",
            m.prefix_cache_entries.clone(),
        );
        EngineMetrics { registry, ..m }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self::new()
    }
}
