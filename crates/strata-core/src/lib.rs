//! strata's vocabulary, shared by every other crate: the OpenAI wire types,
//! the one error type that becomes an OpenAI-shaped HTTP error, request
//! validation, the chat template, the config schema and the `Store` trait.
//! Nothing here does I/O, except behind the `axum` and `tls` features: the
//! HTTP plumbing (error rendering, body limits, the TLS listener) that the
//! gateway and the engine share.

pub mod batch;
pub mod calendar;
pub mod config;
pub mod error;
pub mod latency;
#[cfg(feature = "link")]
pub mod link;
pub mod openai;
pub mod responses;
pub mod sampling;
pub mod snapshot;
pub mod store;
pub mod template;
pub mod tenant;
#[cfg(feature = "tls")]
pub mod tls;
pub mod whole;

#[cfg(feature = "axum")]
pub use error::read_body;
pub use error::ApiError;

/// The environment variable that hands a replica token to an engine and a
/// gateway: the gateway sends it as `Authorization: Bearer`, engines take
/// only that or a verified client certificate (`strata_engine::server::Trust`).
pub const REPLICA_TOKEN_ENV: &str = "STRATA_REPLICA_TOKEN";

/// The environment variable that gives a cluster's controllers and
/// gateways the secret the API keys of their `openai` engines are derived
/// from (`strata serve` makes keys of its own and needs none).
pub const ENGINE_KEY_ENV: &str = "STRATA_ENGINE_KEY";

/// The API key of pool `pool`'s engines of kind `openai`, derived from
/// `secret` (HMAC-SHA256): every process that holds the secret gets the
/// same key for a pool, and one pool's key says nothing of another's.
pub fn engine_api_key(secret: &str, pool: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(b"strata engine api key\0");
    mac.update(pool.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Request header from the gateway to an engine naming whose cached prompt
/// prefixes the request may reuse: the tenant id. Requests without it share
/// one unnamed scope. The gateway always sets it, so a client cannot; an
/// engine honours it only from its gateway (a verified client certificate
/// or the replica token).
pub const CACHE_SCOPE_HEADER: &str = "x-strata-cache-scope";

/// Request header from the gateway to an engine naming the session (a
/// conversation or response chain) whose next turn the request is; the
/// engine keeps the finished cells under it, for snapshots.
pub const SESSION_HEADER: &str = "x-strata-session";

/// Request header from the gateway to strata's engine naming the request's
/// class when it is not interactive: `batch` (a Batch API line), which the
/// engine steps only in what interactive requests leave. Like the cache
/// scope, honoured only from a gateway.
pub const PRIORITY_HEADER: &str = "x-strata-priority";

/// Engine routes for KV snapshots, reached only by the gateway.
pub const KV_EXPORT_PATH: &str = "/internal/kv/export";
pub const KV_IMPORT_PATH: &str = "/internal/kv/import";
/// Engine route: drops every kept sequence of the cache scope in the JSON
/// body `{"scope": …}` (a deleted tenant's cells); gateway only.
pub const KV_FORGET_PATH: &str = "/internal/kv/forget";

/// What a gateway sees of its load: the controller's signals.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Requests received since start (arrivals, before any queueing).
    pub requests_total: u64,
    /// Prompt + completion tokens served since start.
    pub tokens_total: u64,
    /// Of those, prompt tokens.
    pub prompt_tokens_total: u64,
    /// Requests holding a replica slot, and waiting for one.
    pub in_flight: usize,
    pub waiting: usize,
    /// Batch lines holding or waiting for a slot: not demand (they take
    /// what interactive work leaves), but a pool they run on is kept at
    /// one replica at least rather than scaled to zero under them.
    pub batch_lines: usize,
    /// Tokens a second the batches running here need to end within their
    /// windows (`batch::Pace::needed_per_s`, summed): the controller adds
    /// replicas for it only where interactive work leaves too little.
    pub batch_tokens_per_s: f64,
    /// Tokens the batches running here have left (`batch::Pace::backlog_tokens`,
    /// summed): with `pool.batch_spot_max_replicas`, the controller may add
    /// spot replicas to work it off sooner where spot is cheap.
    pub batch_backlog_tokens: f64,
    /// Replicas that take requests.
    pub routable: usize,
    /// p95 time to first token and time per output token (streamed
    /// requests) over the last half minute, in milliseconds; `None`
    /// without requests to measure.
    pub ttft_p95_ms: Option<f64>,
    pub tpot_p95_ms: Option<f64>,
}

/// The load a gateway publishes: its whole load, and each catalog
/// model's share (what that model's pool's autoscaler reads).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loads {
    pub total: Load,
    pub by_model: std::collections::BTreeMap<String, Load>,
}

impl Loads {
    /// `model`'s pool's load (`None`: the whole gateway's); a model the
    /// gateway does not serve yet has none.
    pub fn of(&self, model: Option<&str>) -> Load {
        match model {
            None => self.total,
            Some(m) => self.by_model.get(m).copied().unwrap_or_default(),
        }
    }
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A replica endpoint as a provider publishes it to the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaEndpoint {
    /// Stable name for logs and the ledger (`local-0`, a pod name, a URL).
    pub id: String,
    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    /// The tenant (by name) this replica is reserved for; `None` is the
    /// shared pool. Dedicated tenants use only their replicas, and no other
    /// tenant's request ever reaches those.
    pub reserved_for: Option<String>,
    /// On its way out (a cluster's controller let it go): it takes no new
    /// request, and one gateway keeps its sessions' caches as snapshots.
    pub draining: bool,
    /// The model of the pool it belongs to, where the provider knows it
    /// (one pool per model): the gateway routes that model's requests to
    /// it, and counts it in that model's pool. `None`: whatever models the
    /// replica reports.
    pub model: Option<String>,
    /// A replica that is not `strata engine` (engine kind `openai`): how
    /// the gateway reaches it and what it may rely on. `None`: strata's own.
    pub external: Option<ExternalEngine>,
}

/// How the gateway talks to a replica of another server (engine kind
/// `openai`), and what that server does not do: it keeps no KV snapshots,
/// gets no cache scope or session headers, and only continues an answer
/// cut short where it takes `continue_final_message`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ExternalEngine {
    /// The pool's API key, sent as `Authorization: Bearer` (instead of
    /// strata's replica token, which never leaves strata's own processes).
    pub api_key: String,
    /// The path that answers 200 once the server takes requests.
    pub ready_path: String,
    /// The server takes `continue_final_message`.
    pub continues: bool,
    /// The `priority` a Batch API line is sent with (the server schedules
    /// by it); `None`: the field is never sent.
    pub batch_priority: Option<i64>,
}

impl std::fmt::Debug for ExternalEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalEngine")
            .field("api_key", &"(hidden)")
            .field("ready_path", &self.ready_path)
            .field("continues", &self.continues)
            .field("batch_priority", &self.batch_priority)
            .finish()
    }
}

/// The lease a gateway takes to drain a leaving replica (one gateway does).
pub fn drain_lease(replica: &str) -> String {
    format!("drain/{replica}")
}

/// The lease a gateway takes once a leaving replica's sessions are kept:
/// the controller waits for it before it stops the replica.
pub fn drained_lease(replica: &str) -> String {
    format!("drained/{replica}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_key_is_the_same_for_a_pool_everywhere_and_apart_between_pools() {
        let key = engine_api_key("secret", "chat");
        assert_eq!(key, engine_api_key("secret", "chat"));
        assert_eq!(key.len(), 64);
        assert_ne!(key, engine_api_key("secret", "code"));
        assert_ne!(key, engine_api_key("other secret", "chat"));
        // Not the secret, nor anything that contains it.
        assert!(!key.contains("secret"));
    }
}
