//! Usage metering off the request path: records go through a bounded channel
//! to one task that writes them to the store in batches.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use strata_core::store::{UsageRecord, UsageStore};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::metrics::{GatewayMetrics, ModelLabels, UsageLabels};

/// A streamed answer's model's demand counters (`Ledger::meter`).
pub struct TokenMeter {
    demand: Option<std::sync::Arc<crate::metrics::Demand>>,
}

#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<UsageRecord>,
    metrics: Arc<GatewayMetrics>,
    store: Arc<dyn UsageStore>,
}

impl Ledger {
    /// Starts the writer; it flushes and ends once every `Ledger` is dropped.
    pub fn spawn(
        store: Arc<dyn UsageStore>,
        metrics: Arc<GatewayMetrics>,
    ) -> (Ledger, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(10_000);
        let task = tokio::spawn(write_batches(store.clone(), rx));
        (Ledger { tx, metrics, store }, task)
    }

    /// Never blocks a request: when the writer is far behind, the row is
    /// dropped and counted in `strata_gateway_ledger_dropped_total`.
    pub fn record(&self, row: UsageRecord) {
        self.record_streamed(row, 0);
    }

    /// Where a streamed answer for `model` counts its tokens: looked up
    /// once per request, not per token.
    pub fn meter(&self, model: &str) -> TokenMeter {
        TokenMeter {
            demand: self.metrics.demand(model),
        }
    }

    /// One output token passed on mid-stream: served tokens (the
    /// autoscaler's demand signal) count it now, so a long stream is demand
    /// while it runs; `record_streamed` settles the rest at the end.
    pub fn streamed_token(&self, meter: &TokenMeter) {
        self.metrics.tokens.inc();
        if let Some(d) = &meter.demand {
            d.tokens.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// As `record`, for a request whose `counted` tokens went through
    /// `streamed_token` already.
    pub fn record_streamed(&self, row: UsageRecord, counted: u64) {
        self.count(&row, counted);
        self.batch(row);
    }

    /// The row of an answer another gateway served and died before it
    /// metered, written before it returns: its cost counts here, not its
    /// tokens or latency (they were load on that gateway, not this one's now).
    pub async fn record_late(&self, row: UsageRecord) {
        self.count_cost(&row);
        self.write_now(row).await;
    }

    /// As `record_streamed`, written before it returns: for an answer that
    /// is stored, so that once the client has it, its usage is metered
    /// (a batch waits up to 50 ms, and a gateway killed meanwhile loses
    /// it). A store that fails now gets the row in the next batch.
    pub async fn record_now(&self, row: UsageRecord, counted: u64) {
        self.count(&row, counted);
        self.write_now(row).await;
    }

    /// Writes `row` now; a store that fails gets it in the next batch.
    async fn write_now(&self, row: UsageRecord) {
        if let Err(e) = self.store.record_usage(std::slice::from_ref(&row)).await {
            tracing::warn!(error = %e, "cannot write a usage row now; batching it");
            self.batch(row);
        }
    }

    fn batch(&self, row: UsageRecord) {
        if self.tx.try_send(row).is_err() {
            self.metrics.ledger_dropped.inc();
        }
    }

    /// The row's share of the gateway's metrics. A batch line's tokens are
    /// counted apart: they ran on slots interactive work left, and counted
    /// as demand a backlog alone would make the autoscaler buy replicas.
    fn count(&self, row: &UsageRecord, counted: u64) {
        let tokens = u64::from(row.prompt_tokens) + u64::from(row.completion_tokens);
        self.count_cost(row);
        if row.batch {
            self.metrics.batch_tokens.inc_by(tokens);
            return;
        }
        self.metrics.tokens.inc_by(tokens.saturating_sub(counted));
        self.metrics
            .prompt_tokens
            .inc_by(u64::from(row.prompt_tokens));
        let demand = self.metrics.demand(&row.model);
        if let Some(d) = &demand {
            d.tokens
                .fetch_add(tokens.saturating_sub(counted), Ordering::Relaxed);
            d.prompt_tokens
                .fetch_add(u64::from(row.prompt_tokens), Ordering::Relaxed);
        }
        if row.stream && row.status == 200 && row.completion_tokens > 0 {
            let tpot = (row.completion_tokens > 1).then(|| {
                (row.latency_ms - row.ttft_ms).max(0.0) / f64::from(row.completion_tokens - 1)
            });
            self.metrics.recent.record(row.ttft_ms, tpot);
            if let Some(d) = &demand {
                d.recent.record(row.ttft_ms, tpot);
            }
            let model = ModelLabels {
                model: row.model.clone(),
            };
            self.metrics
                .ttft
                .get_or_create(&model)
                .observe(row.ttft_ms / 1000.0);
            if let Some(tpot) = tpot {
                self.metrics
                    .tpot
                    .get_or_create(&model)
                    .observe(tpot / 1000.0);
            }
        }
    }

    /// Requests and cost by model, status (and tenant), for every class.
    fn count_cost(&self, row: &UsageRecord) {
        let labels = UsageLabels {
            model: row.model.clone(),
            status: row.status,
            tenant: if self.metrics.tenant_labels {
                row.tenant_id.clone()
            } else {
                String::new()
            },
        };
        self.metrics.generations.get_or_create(&labels).inc();
        self.metrics
            .cost
            .get_or_create(&labels)
            .inc_by(row.cost_usd.max(0.0));
    }
}

/// Rows held for a store that is failing (PostgreSQL restarting, a full
/// disk) before new ones are dropped and counted.
const MAX_HELD: usize = 100_000;
/// How long a stopping gateway keeps retrying rows the store refuses.
const FINAL_RETRIES: Duration = Duration::from_secs(10);

async fn write_batches(store: Arc<dyn UsageStore>, mut rx: mpsc::Receiver<UsageRecord>) {
    let mut batch = Vec::with_capacity(256);
    let mut backoff = Duration::ZERO;
    let mut closed_at: Option<tokio::time::Instant> = None;
    loop {
        if batch.is_empty() {
            if rx.recv_many(&mut batch, 256).await == 0 {
                return;
            }
            // Let a burst gather into one transaction.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // While the store fails, rows gather here rather than in the channel.
        let cap = if backoff.is_zero() { 1024 } else { MAX_HELD };
        while batch.len() < cap {
            match rx.try_recv() {
                Ok(row) => batch.push(row),
                Err(_) => break,
            }
        }
        if rx.is_closed() {
            closed_at.get_or_insert_with(tokio::time::Instant::now);
        }
        // A retried batch may have been written already (its commit's
        // answer lost): rows are keyed by request id, so it counts once.
        match store.record_usage(&batch).await {
            Ok(()) => {
                if !backoff.is_zero() {
                    tracing::info!(
                        rows = batch.len(),
                        "usage rows written after the store recovered"
                    );
                }
                backoff = Duration::ZERO;
                batch.clear();
            }
            Err(e) if closed_at.is_some_and(|t| t.elapsed() > FINAL_RETRIES) => {
                tracing::error!(error = %e, rows = batch.len(), "stopping with usage rows the store refused; they are lost");
                return;
            }
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(250), Duration::from_secs(5));
                tracing::warn!(error = %e, rows = batch.len(), retry_in_ms = backoff.as_millis() as u64, "cannot write usage rows; keeping them to retry");
                tokio::time::sleep(backoff).await;
            }
        }
    }
}
