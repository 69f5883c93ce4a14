//! Usage metering off the request path: records go through a bounded channel
//! to one task that writes them to the store in batches.

use std::sync::Arc;
use std::time::Duration;

use strata_core::store::{Store, UsageRecord};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::metrics::{GatewayMetrics, ModelLabels, UsageLabels};

#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<UsageRecord>,
    metrics: Arc<GatewayMetrics>,
}

impl Ledger {
    /// Starts the writer; it flushes and ends once every `Ledger` is dropped.
    pub fn spawn(store: Arc<dyn Store>, metrics: Arc<GatewayMetrics>) -> (Ledger, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(10_000);
        let task = tokio::spawn(write_batches(store, rx));
        (Ledger { tx, metrics }, task)
    }

    /// Never blocks a request: when the writer is far behind, the row is
    /// dropped and counted in `strata_gateway_ledger_dropped_total`.
    pub fn record(&self, row: UsageRecord) {
        self.record_streamed(row, 0);
    }

    /// One output token passed on mid-stream: served tokens (the
    /// autoscaler's demand signal) count it now, so a long stream is demand
    /// while it runs; `record_streamed` settles the rest at the end.
    pub fn streamed_token(&self) {
        self.metrics.tokens.inc();
    }

    /// As `record`, for a request whose `counted` tokens went through
    /// `streamed_token` already.
    pub fn record_streamed(&self, row: UsageRecord, counted: u64) {
        let tokens = u64::from(row.prompt_tokens) + u64::from(row.completion_tokens);
        self.metrics.tokens.inc_by(tokens.saturating_sub(counted));
        self.metrics
            .prompt_tokens
            .inc_by(u64::from(row.prompt_tokens));
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
        if row.stream && row.status == 200 && row.completion_tokens > 0 {
            let tpot = (row.completion_tokens > 1).then(|| {
                (row.latency_ms - row.ttft_ms).max(0.0) / f64::from(row.completion_tokens - 1)
            });
            self.metrics.recent.record(row.ttft_ms, tpot);
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
        if self.tx.try_send(row).is_err() {
            self.metrics.ledger_dropped.inc();
        }
    }
}

async fn write_batches(store: Arc<dyn Store>, mut rx: mpsc::Receiver<UsageRecord>) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        // Let a burst gather into one transaction.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(row) => batch.push(row),
                Err(_) => break,
            }
        }
        if let Err(e) = store.record_usage(&batch).await {
            tracing::warn!(error = %e, rows = batch.len(), "cannot write usage rows");
        }
        batch.clear();
    }
}
