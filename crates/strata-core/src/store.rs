//! The `Store` trait: everything strata keeps, whatever the backend. Every
//! backend implements it in `strata-store`.

use async_trait::async_trait;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store: {0}")]
    Open(String),
    #[error("store migration failed: {0}")]
    Migration(String),
    #[error("store query failed: {0}")]
    Query(String),
}

/// One served request, as metered by the gateway.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRecord {
    pub request_id: String,
    /// Unix milliseconds when the request arrived.
    pub at_ms: i64,
    pub model: String,
    pub replica: String,
    pub status: u16,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Time to first byte of the response, milliseconds.
    pub ttft_ms: f64,
    pub latency_ms: f64,
    pub stream: bool,
}

/// Sums over the usage ledger for one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageTotals {
    pub model: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// An engine process launched by a provider, and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceRecord {
    pub id: String,
    pub provider: String,
    pub endpoint: String,
    pub state: InstanceState,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    /// Why it ended (exit status, signal, shutdown).
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Starting,
    Ready,
    Exited,
    Stopped,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Ready => "ready",
            InstanceState::Exited => "exited",
            InstanceState::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "starting" => InstanceState::Starting,
            "ready" => InstanceState::Ready,
            "exited" => InstanceState::Exited,
            "stopped" => InstanceState::Stopped,
            _ => return None,
        })
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Appends rows to the usage ledger in one transaction.
    async fn record_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError>;
    /// Ledger totals per model.
    async fn usage_totals(&self) -> Result<Vec<UsageTotals>, StoreError>;
    /// Inserts or updates an instance by id.
    async fn upsert_instance(&self, instance: &InstanceRecord) -> Result<(), StoreError>;
    /// All instances, newest first.
    async fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError>;
}
