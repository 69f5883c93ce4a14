//! What strata keeps, whatever the backend: one trait per stored kind, and
//! `Store` for all of them. Every backend implements them in `strata-store`.
//! Every call on tenant data takes the tenant's id; there is no by-id lookup
//! without it.

use async_trait::async_trait;
use serde::Serialize;

use crate::tenant::{ApiKeyRecord, AuditEntry, AuditKey, AuditRecord, Tenant, TenantId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store: {0}")]
    Open(String),
    #[error("store migration failed: {0}")]
    Migration(String),
    #[error("store query failed: {0}")]
    Query(String),
    /// A unique name or id is taken.
    #[error("{0} already exists")]
    Conflict(String),
    /// Sealing or opening tenant content failed (no data key, tampering).
    #[error("tenant content cannot be sealed or opened: {0}")]
    Crypto(String),
    /// The database cannot be reached (restarting, network, pool timeout):
    /// the operation did not happen; retrying later may succeed.
    #[error("the database is unreachable: {0}")]
    Unavailable(String),
    /// The database's disk is full: nothing was written.
    #[error("the database's disk is full: {0}")]
    Full(String),
}

/// One served request, as metered by the gateway.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRecord {
    pub request_id: String,
    pub tenant_id: String,
    pub key_id: String,
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
    /// Price of the tokens at the model's configured rates.
    pub cost_usd: f64,
    /// A batch's line (the batch class): served on spare slots, so not
    /// demand the autoscaler buys capacity for.
    pub batch: bool,
}

/// Sums over the usage ledger for one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageTotals {
    pub model: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
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
    /// What it is and what it costs.
    pub kind: InstanceKind,
}

/// What an instance is: its pool and model, its catalog offering, its
/// price and the tokens per second it serves at full load (for the idle share).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceKind {
    pub pool: String,
    pub model: String,
    pub instance_type: String,
    pub zone: String,
    pub capacity: crate::config::CapacityType,
    pub price_per_hour: f64,
    pub tokens_per_s: f64,
}

impl Default for InstanceKind {
    fn default() -> Self {
        InstanceKind {
            pool: "default".into(),
            model: String::new(),
            instance_type: crate::config::LOCAL_TYPE.into(),
            zone: "local".into(),
            capacity: crate::config::CapacityType::OnDemand,
            price_per_hour: 0.0,
            tokens_per_s: 0.0,
        }
    }
}

/// Tokens a tenant used on one replica for one model within one hour.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaUsage {
    pub replica: String,
    pub tenant_id: String,
    pub model: String,
    /// Start of the hour (Unix milliseconds) the requests arrived in.
    pub hour_ms: i64,
    pub tokens: u64,
    /// Batch lines' tokens (a row of their own), else interactive ones.
    pub batch: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Starting,
    Ready,
    Exited,
    Stopped,
    /// Reclaimed by the cloud (spot), after its notice.
    Preempted,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Ready => "ready",
            InstanceState::Exited => "exited",
            InstanceState::Stopped => "stopped",
            InstanceState::Preempted => "preempted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "starting" => InstanceState::Starting,
            "ready" => InstanceState::Ready,
            "exited" => InstanceState::Exited,
            "stopped" => InstanceState::Stopped,
            "preempted" => InstanceState::Preempted,
            _ => return None,
        })
    }
}

/// A chat completion kept because the request said `store: true`; its
/// content (request and answer as JSON) is sealed at rest.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCompletion {
    pub id: String,
    pub created_at_ms: i64,
    pub model: String,
    /// The plaintext JSON document, opened with the tenant's data key.
    pub content: Vec<u8>,
}

#[async_trait]
pub trait UsageStore: Send + Sync {
    /// Appends rows to the usage ledger in one transaction.
    async fn record_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError>;
    /// Ledger totals per model, for one tenant or for all.
    async fn usage_totals(&self, tenant: Option<&TenantId>)
        -> Result<Vec<UsageTotals>, StoreError>;
    /// Dollars the tenant's requests cost since `since_ms`.
    async fn tenant_spend(&self, tenant: &TenantId, since_ms: i64) -> Result<f64, StoreError>;
    /// Tokens per replica, tenant, model and hour, for requests that
    /// arrived in `[since_ms, until_ms)` (the cost ledger's usage side).
    async fn usage_by_replica(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<ReplicaUsage>, StoreError>;
    /// The newest `limit` rows of requests that arrived at or after
    /// `since_ms`, oldest first (the dashboard's charts).
    async fn usage_since(&self, since_ms: i64, limit: u32) -> Result<Vec<UsageRecord>, StoreError>;
}

#[async_trait]
pub trait InstanceStore: Send + Sync {
    /// Inserts or updates an instance by id.
    async fn upsert_instance(&self, instance: &InstanceRecord) -> Result<(), StoreError>;
    /// All instances, newest first.
    async fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError>;
    /// The instances that have not ended, newest first (what a cluster's
    /// gateways route to, read every second).
    async fn running_instances(&self) -> Result<Vec<InstanceRecord>, StoreError>;
    /// The instances that have not ended or ended at or after `since_ms`,
    /// newest first.
    async fn instances_since(&self, since_ms: i64) -> Result<Vec<InstanceRecord>, StoreError>;
}

#[async_trait]
pub trait TenantStore: Send + Sync {
    /// Creates the tenant and its data key; a taken name is `Conflict`.
    async fn create_tenant(&self, tenant: &Tenant) -> Result<(), StoreError>;
    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>, StoreError>;
    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError>;
    /// Saves name, isolation, limits and budget; false if there is no such tenant.
    async fn update_tenant(&self, tenant: &Tenant) -> Result<bool, StoreError>;
    /// Destroys the tenant's data key first (crypto-shredding), then its keys
    /// and content rows; the usage ledger keeps its (content-free) rows.
    async fn delete_tenant(&self, id: &TenantId) -> Result<bool, StoreError>;
}

#[async_trait]
pub trait KeyStore: Send + Sync {
    async fn create_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError>;
    /// Keys whose digest starts with `lookup` (see `tenant::digest_lookup`);
    /// the caller compares full digests in constant time.
    async fn keys_by_lookup(&self, lookup: i64) -> Result<Vec<ApiKeyRecord>, StoreError>;
    async fn keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError>;
    async fn key(&self, tenant: &TenantId, id: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Marks the key revoked at `at_ms`; false if the tenant has no such key.
    async fn revoke_key(&self, tenant: &TenantId, id: &str, at_ms: i64)
        -> Result<bool, StoreError>;
}

#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends one row, chained to the previous one by a MAC under the
    /// audit key (the keyring's, so it needs the KEK).
    async fn append_audit(&self, entry: &AuditEntry) -> Result<AuditRecord, StoreError>;
    /// Rows oldest first: every tenant's, or those about one tenant.
    async fn audit(&self, tenant: Option<&TenantId>) -> Result<Vec<AuditRecord>, StoreError>;
    /// At most `limit` rows after `after_seq`, oldest first: every
    /// tenant's, or those about one tenant (as `audit`).
    async fn audit_page(
        &self,
        tenant: Option<&TenantId>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError>;
    /// The newest row's place and hash, if any.
    async fn audit_head(&self) -> Result<Option<(i64, String)>, StoreError>;
    /// The key the chain is keyed with, for checkpoints and verification.
    async fn audit_key(&self) -> Result<AuditKey, StoreError>;
}

#[async_trait]
pub trait CompletionStore: Send + Sync {
    /// Seals and stores the content under the tenant's data key, replacing
    /// the tenant's row with the same id.
    async fn put_completion(
        &self,
        tenant: &TenantId,
        completion: &StoredCompletion,
    ) -> Result<(), StoreError>;
    async fn completion(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<StoredCompletion>, StoreError>;
    /// Newest first, at most `limit`, older than the `after` id when given.
    async fn completions(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredCompletion>, StoreError>;
    async fn delete_completion(&self, tenant: &TenantId, id: &str) -> Result<bool, StoreError>;
}

/// A response of the Responses API. Its content (the response object, its
/// own input items, and the context items before them) is sealed at rest.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub id: String,
    pub created_at_ms: i64,
    pub model: String,
    pub conversation_id: Option<String>,
    /// The replica that served it, where the next turn finds its KV cache.
    pub replica: Option<String>,
    pub content: Vec<u8>,
}

/// A conversation; its content (the metadata as JSON) is sealed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredConversation {
    pub id: String,
    pub created_at_ms: i64,
    pub content: Vec<u8>,
}

/// One item of a conversation (a message), sealed; items keep the order in
/// which they were appended.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredItem {
    pub id: String,
    pub created_at_ms: i64,
    pub content: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

#[async_trait]
pub trait ConversationStore: Send + Sync {
    /// Stores the response and appends `items` (the turn's input and
    /// output) to its conversation in one transaction: after a crash the
    /// conversation holds the whole turn or none of it. False, with nothing
    /// written, when the response names a conversation that does not exist.
    async fn put_response(
        &self,
        tenant: &TenantId,
        response: &StoredResponse,
        items: &[StoredItem],
    ) -> Result<bool, StoreError>;
    async fn response(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<StoredResponse>, StoreError>;
    async fn delete_response(&self, tenant: &TenantId, id: &str) -> Result<bool, StoreError>;
    /// The replica that served the conversation's latest stored response.
    async fn conversation_replica(
        &self,
        tenant: &TenantId,
        conversation: &str,
    ) -> Result<Option<String>, StoreError>;
    /// Creates the conversation with its first items, atomically.
    async fn create_conversation(
        &self,
        tenant: &TenantId,
        conversation: &StoredConversation,
        items: &[StoredItem],
    ) -> Result<(), StoreError>;
    async fn conversation(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<StoredConversation>, StoreError>;
    /// Replaces the content (metadata); false if there is no such conversation.
    async fn update_conversation(
        &self,
        tenant: &TenantId,
        conversation: &StoredConversation,
    ) -> Result<bool, StoreError>;
    /// Deletes the conversation and its items.
    async fn delete_conversation(&self, tenant: &TenantId, id: &str) -> Result<bool, StoreError>;
    /// Appends items in order; false if there is no such conversation.
    async fn append_items(
        &self,
        tenant: &TenantId,
        conversation: &str,
        items: &[StoredItem],
    ) -> Result<bool, StoreError>;
    /// At most `limit` items in `order`, starting past the `after` item when
    /// given; `None` if there is no such conversation.
    async fn items(
        &self,
        tenant: &TenantId,
        conversation: &str,
        after: Option<&str>,
        limit: u32,
        order: Order,
    ) -> Result<Option<Vec<StoredItem>>, StoreError>;
    async fn item(
        &self,
        tenant: &TenantId,
        conversation: &str,
        id: &str,
    ) -> Result<Option<StoredItem>, StoreError>;
    async fn delete_item(
        &self,
        tenant: &TenantId,
        conversation: &str,
        id: &str,
    ) -> Result<bool, StoreError>;
}

/// Where a background response stands while a gateway runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    Running,
    /// A cancel was asked for: its gateway stops it.
    Cancelling,
}

impl Running {
    pub fn as_str(self) -> &'static str {
        match self {
            Running::Running => "running",
            Running::Cancelling => "cancelling",
        }
    }

    pub fn parse(s: &str) -> Option<Running> {
        match s {
            "running" => Some(Running::Running),
            "cancelling" => Some(Running::Cancelling),
            _ => None,
        }
    }
}

/// What keeping a background response's events found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Every event was kept; false when one of their sequence numbers was
    /// kept already (another gateway runs the response now) and nothing
    /// was written.
    pub kept: bool,
    /// Where the response stands now; `None` when it no longer runs (it
    /// ended, or was deleted).
    pub running: Option<Running>,
}

/// Background responses (`background: true`): the response row a poll
/// reads while it runs, and its events, sealed, where every gateway reads
/// them (a client resumes the stream from any gateway; a gateway taking
/// over a response whose gateway died goes on after the last event kept).
/// A response ends with `ConversationStore::put_response`, which clears
/// its running state.
#[async_trait]
pub trait BackgroundStore: Send + Sync {
    /// Stores a background response that runs (or replaces the content of
    /// one that still runs, its cancel kept); false, with nothing written,
    /// when it has ended already.
    async fn put_running(
        &self,
        tenant: &TenantId,
        response: &StoredResponse,
    ) -> Result<bool, StoreError>;
    /// Where the response stands; `None` when it is not running (or there
    /// is no such response).
    async fn running(&self, tenant: &TenantId, id: &str) -> Result<Option<Running>, StoreError>;
    /// Keeps `events` as sequence numbers `first`, `first + 1`, ... in one
    /// transaction, unless one of them is kept already or the response no
    /// longer runs.
    async fn append_events(
        &self,
        tenant: &TenantId,
        id: &str,
        first: u64,
        events: &[Vec<u8>],
    ) -> Result<Appended, StoreError>;
    /// At most `limit` events after sequence number `after` (all from the
    /// first without it), in order.
    async fn events(
        &self,
        tenant: &TenantId,
        id: &str,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Asks a running response to stop: `Some(true)` when it ran,
    /// `Some(false)` when it does not (it ended, or never ran in the
    /// background), `None` when there is no such response.
    async fn cancel_running(&self, tenant: &TenantId, id: &str)
        -> Result<Option<bool>, StoreError>;
    /// Every tenant's running background responses, oldest first.
    async fn running_responses(&self) -> Result<Vec<(TenantId, String)>, StoreError>;
}

/// KV snapshots of sessions, sealed, where every gateway of a cluster finds
/// them (the database); a single machine keeps them in its data directory.
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// Seals and keeps the snapshot of `session`, replacing an older one.
    async fn put_snapshot(
        &self,
        tenant: &TenantId,
        session: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError>;
    /// Removes and opens the snapshot of `session`, if there is one.
    async fn take_snapshot(
        &self,
        tenant: &TenantId,
        session: &str,
    ) -> Result<Option<Vec<u8>>, StoreError>;
    async fn has_snapshot(&self, tenant: &TenantId, session: &str) -> Result<bool, StoreError>;
}

/// One autoscaler decision that changed a pool, with what it saw.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecisionRecord {
    pub at_ms: i64,
    pub pool: String,
    pub from_replicas: u32,
    pub to_replicas: u32,
    pub reason: String,
    /// The inputs, as JSON (demand over both windows, load, capacity).
    pub inputs: String,
}

#[async_trait]
pub trait DecisionStore: Send + Sync {
    async fn record_decision(&self, decision: &DecisionRecord) -> Result<(), StoreError>;
    /// The newest `limit` decisions, oldest first.
    async fn decisions(&self, limit: u32) -> Result<Vec<DecisionRecord>, StoreError>;
}

/// Who holds a lease, until when (on the store's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub expires_at_ms: i64,
    /// How many times the lease changed hands.
    pub transitions: i64,
}

/// Leases for leader election: one holder per name at a time, for a term
/// measured on the store's own clock (so the contenders' clocks need not
/// agree).
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Takes `name` for `holder` for `ttl_ms`, or extends it when `holder`
    /// has it already; `true` when `holder` holds it now. Refused while
    /// another holder's term runs.
    async fn claim_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, StoreError>;
    /// Ends `holder`'s term at once (nothing when it does not hold it), so a
    /// standby need not wait for the term to run out.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
    async fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError>;
}

/// One gateway's last report of its load (a cluster's gateways report to
/// the controller through the store).
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayLoad {
    pub gateway: String,
    /// Empty: the gateway's whole load; else one catalog model's share.
    pub model: String,
    pub load: crate::Load,
    /// How long ago it reported, on the store's clock.
    pub age_ms: i64,
}

#[async_trait]
pub trait LoadStore: Send + Sync {
    /// Replaces `gateway`'s report of its load for `model` (empty: its
    /// whole load), stamped with the store's clock.
    async fn report_load(
        &self,
        gateway: &str,
        model: &str,
        load: &crate::Load,
    ) -> Result<(), StoreError>;
    /// Every gateway's last report; reports older than `forget_ms` are
    /// deleted first (gateways that went away).
    async fn gateway_loads(&self, forget_ms: i64) -> Result<Vec<GatewayLoad>, StoreError>;
}

/// A model deployed at run time: its `[[models]]` entry, as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployedModel {
    pub id: String,
    pub spec: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// The models deployed at run time (beside those of the config file).
#[async_trait]
pub trait ModelStore: Send + Sync {
    /// Adds `model`, or replaces the one with its id (keeping when it was
    /// first deployed).
    async fn put_model(&self, model: &DeployedModel) -> Result<(), StoreError>;
    /// Every deployed model, by id.
    async fn models(&self) -> Result<Vec<DeployedModel>, StoreError>;
    /// `true` when a model was removed.
    async fn delete_model(&self, id: &str) -> Result<bool, StoreError>;
}

/// A file of the Files API. Its name and its bytes are sealed at rest;
/// `content` is empty where a listing did not read it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFile {
    pub id: String,
    pub created_at_ms: i64,
    /// `batch` (uploaded), `batch_output` (written by a batch).
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub content: Vec<u8>,
}

#[async_trait]
pub trait FileStore: Send + Sync {
    /// Keeps a new file; a file with its id already kept stays as it is
    /// (a batch's output written again after a crash).
    async fn put_file(&self, tenant: &TenantId, file: &StoredFile) -> Result<(), StoreError>;
    /// The file, with its content when `content` is asked for.
    async fn file(
        &self,
        tenant: &TenantId,
        id: &str,
        content: bool,
    ) -> Result<Option<StoredFile>, StoreError>;
    /// Newest first (oldest with `Order::Asc`), at most `limit`, past the
    /// `after` id when given, of one purpose when given; without content.
    async fn files(
        &self,
        tenant: &TenantId,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: u32,
        order: Order,
    ) -> Result<Vec<StoredFile>, StoreError>;
    async fn delete_file(&self, tenant: &TenantId, id: &str) -> Result<bool, StoreError>;
}

/// A batch of the Batch API: `status` in the clear (runners look for
/// unfinished batches of every tenant), the batch object sealed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBatch {
    pub id: String,
    pub created_at_ms: i64,
    pub status: String,
    /// The batch object as JSON, without its request counts (those are
    /// counted from the lines).
    pub content: Vec<u8>,
}

/// One finished line of a batch: its output (or error) line, sealed.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLine {
    /// Its place in the input file, from 0.
    pub line: u32,
    /// It went to the output file (else to the error file).
    pub ok: bool,
    pub content: Vec<u8>,
}

#[async_trait]
pub trait BatchStore: Send + Sync {
    async fn create_batch(&self, tenant: &TenantId, batch: &StoredBatch) -> Result<(), StoreError>;
    /// Replaces the batch if its status is still `from`; false (nothing
    /// written) when another writer changed it first.
    async fn update_batch(
        &self,
        tenant: &TenantId,
        batch: &StoredBatch,
        from: &str,
    ) -> Result<bool, StoreError>;
    async fn batch(&self, tenant: &TenantId, id: &str) -> Result<Option<StoredBatch>, StoreError>;
    /// Newest first, at most `limit`, older than the `after` id when given.
    async fn batches(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredBatch>, StoreError>;
    /// Every tenant's batches that have not ended, oldest first.
    async fn unfinished_batches(&self) -> Result<Vec<(TenantId, String)>, StoreError>;
    /// Keeps a line's result unless one is kept already (a line finishes
    /// once); false when it was.
    async fn finish_line(
        &self,
        tenant: &TenantId,
        batch: &str,
        line: &BatchLine,
    ) -> Result<bool, StoreError>;
    /// The batch's finished lines in input order; without their content
    /// unless `content`.
    async fn finished_lines(
        &self,
        tenant: &TenantId,
        batch: &str,
        content: bool,
    ) -> Result<Vec<BatchLine>, StoreError>;
    /// (succeeded, failed) lines so far.
    async fn line_counts(&self, tenant: &TenantId, batch: &str) -> Result<(u64, u64), StoreError>;
}

/// Everything strata keeps.
pub trait Store:
    UsageStore
    + InstanceStore
    + TenantStore
    + KeyStore
    + AuditStore
    + CompletionStore
    + ConversationStore
    + SnapshotStore
    + DecisionStore
    + LeaseStore
    + LoadStore
    + ModelStore
    + FileStore
    + BatchStore
    + BackgroundStore
    + 'static
{
}

impl<T> Store for T where
    T: UsageStore
        + InstanceStore
        + TenantStore
        + KeyStore
        + AuditStore
        + CompletionStore
        + ConversationStore
        + SnapshotStore
        + DecisionStore
        + LeaseStore
        + LoadStore
        + ModelStore
        + FileStore
        + BatchStore
        + BackgroundStore
        + 'static
{
}
