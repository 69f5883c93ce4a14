//! The gateway's view of its replicas: endpoints from a provider, readiness
//! from health checks (and from failed requests), load from requests in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
use strata_core::openai::PromptInput;
use strata_core::ReplicaEndpoint;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::prefix_index::{block_hashes, prompt_text, PrefixIndex};
use crate::router::{pick_with_affinity, ReplicaLoad};
use crate::upstream::Target;

pub struct Replica {
    pub endpoint: ReplicaEndpoint,
    ready: AtomicBool,
    /// Draining: finishing what it runs, taking nothing new.
    draining: AtomicBool,
    outstanding: AtomicU64,
    models: RwLock<Vec<String>>,
    /// Parsed URLs of the routes requests go to, so a request clones one
    /// rather than parsing it again.
    urls: Mutex<Vec<(&'static str, Target)>>,
}

impl Replica {
    fn new(endpoint: ReplicaEndpoint) -> Self {
        Replica {
            endpoint,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            outstanding: AtomicU64::new(0),
            models: RwLock::new(Vec::new()),
            urls: Mutex::new(Vec::new()),
        }
    }

    /// Where a request for `path` goes on this replica; `None` if the
    /// endpoint does not parse as a URL's start.
    pub fn target(&self, path: &'static str) -> Option<Target> {
        let mut urls = self.urls.lock().expect("replica urls lock");
        if let Some((_, target)) = urls.iter().find(|(p, _)| *p == path) {
            return Some(target.clone());
        }
        let target = Target::parse(&format!("{}{path}", self.endpoint.url))?;
        urls.push((path, target.clone()));
        Some(target)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// Takes no new requests from now on and waits (up to `wait`) for the
    /// ones it runs to end.
    pub async fn quiesce(&self, wait: Duration) {
        self.set_draining(true);
        let deadline = std::time::Instant::now() + wait;
        while self.outstanding_tokens() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ready and not draining: may take a new request.
    pub fn is_routable(&self) -> bool {
        self.is_ready() && !self.is_draining()
    }

    /// A request could not reach it: no new requests until a health check passes.
    pub fn mark_down(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    pub fn outstanding_tokens(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    fn serves(&self, model: &str) -> bool {
        self.models
            .read()
            .expect("models lock")
            .iter()
            .any(|m| m == model)
    }
}

/// Tokens charged to a replica while a request is in flight; released on drop.
pub struct InFlight {
    replica: Arc<Replica>,
    tokens: u64,
}

impl InFlight {
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.replica
            .outstanding
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct ReplicaSet {
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    rotation: AtomicUsize,
    prefix_routing: AtomicBool,
    prefixes: Mutex<PrefixIndex>,
}

/// Why no replica was chosen.
#[derive(Debug, PartialEq, Eq)]
pub enum NoReplica {
    /// Nothing is ready at all.
    NoneReady,
    /// Replicas are ready but none serves this model.
    UnknownModel,
    /// Every ready replica for the model was tried.
    Exhausted,
}

impl ReplicaSet {
    pub fn snapshot(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas.read().expect("replica lock").clone()
    }

    /// Replaces the endpoint list, keeping state of replicas that stay.
    pub fn set_endpoints(&self, endpoints: &[ReplicaEndpoint]) {
        let old = self.snapshot();
        let next = endpoints
            .iter()
            .map(|e| {
                let same = |r: &&Arc<Replica>| {
                    r.endpoint.id == e.id
                        && r.endpoint.url == e.url
                        && r.endpoint.reserved_for == e.reserved_for
                };
                let r = old
                    .iter()
                    .find(same)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Replica::new(e.clone())));
                // Once leaving, always leaving: no new request goes there.
                if e.draining {
                    r.set_draining(true);
                }
                r
            })
            .collect();
        let live: Vec<&str> = endpoints.iter().map(|e| e.id.as_str()).collect();
        self.prefixes.lock().expect("prefix lock").retain(&live);
        *self.replicas.write().expect("replica lock") = Arc::new(next);
    }

    /// Routes by prompt prefix too (`gateway.routing = "prefix"`), or by
    /// load and session only.
    pub fn set_prefix_routing(&self, on: bool) {
        self.prefix_routing.store(on, Ordering::Relaxed);
    }

    /// The block hashes `choose` routes `input` by: none when routing by
    /// load only, so the prompt is not hashed for nothing.
    pub fn prefix_of(&self, tenant: &str, input: &PromptInput) -> Vec<u64> {
        if !self.prefix_routing.load(Ordering::Relaxed) {
            return Vec::new();
        }
        block_hashes(tenant, &prompt_text(input))
    }

    /// Picks a replica of `pool` (a dedicated tenant's name, or `None` for
    /// the shared pool) for `model`, not one of `tried` (endpoint ids), and
    /// charges it `tokens` until the returned guard drops. Within bounds,
    /// `prefer` (an endpoint id holding the session's KV cache) wins, then
    /// the replica that was sent the longest prefix of `prefix` (block
    /// hashes, see `prefix_index`).
    pub fn choose(
        &self,
        pool: Option<&str>,
        model: &str,
        tried: &[String],
        prefer: Option<&str>,
        prefix: &[u64],
        tokens: u64,
    ) -> Result<InFlight, NoReplica> {
        let all: Vec<Arc<Replica>> = self
            .snapshot()
            .iter()
            .filter(|r| r.endpoint.reserved_for.as_deref() == pool)
            .cloned()
            .collect();
        if !all.iter().any(|r| r.is_routable()) {
            return Err(NoReplica::NoneReady);
        }
        let candidates: Vec<&Arc<Replica>> = all.iter().filter(|r| r.serves(model)).collect();
        if !candidates.iter().any(|r| r.is_routable()) {
            return Err(NoReplica::UnknownModel);
        }
        let loads: Vec<ReplicaLoad> = candidates
            .iter()
            .map(|r| ReplicaLoad {
                ready: r.is_routable(),
                outstanding_tokens: r.outstanding_tokens(),
            })
            .collect();
        let tried_idx: Vec<usize> = (0..candidates.len())
            .filter(|&i| tried.contains(&candidates[i].endpoint.id))
            .collect();
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        let preferred = prefer.and_then(|id| candidates.iter().position(|r| r.endpoint.id == id));
        let by_prefix = !prefix.is_empty() && self.prefix_routing.load(Ordering::Relaxed);
        let ids: Vec<&str> = candidates.iter().map(|r| r.endpoint.id.as_str()).collect();
        let matches = match by_prefix {
            true => self
                .prefixes
                .lock()
                .expect("prefix lock")
                .matches(&ids, prefix),
            false => Vec::new(),
        };
        let i = pick_with_affinity(&loads, &tried_idx, rotation, preferred, &matches)
            .ok_or(NoReplica::Exhausted)?;
        if by_prefix {
            self.prefixes
                .lock()
                .expect("prefix lock")
                .record(ids[i], prefix);
        }
        let replica = candidates[i].clone();
        replica.outstanding.fetch_add(tokens, Ordering::Relaxed);
        Ok(InFlight { replica, tokens })
    }

    pub fn find(&self, id: &str) -> Option<Arc<Replica>> {
        self.snapshot()
            .iter()
            .find(|r| r.endpoint.id == id)
            .cloned()
    }

    /// Whether the replica `id` exists and may take new requests.
    pub fn is_routable(&self, id: &str) -> bool {
        self.find(id).is_some_and(|r| r.is_routable())
    }

    /// Models served by ready replicas, sorted, without repeats.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .snapshot()
            .iter()
            .filter(|r| r.is_ready())
            .flat_map(|r| r.models.read().expect("models lock").clone())
            .collect();
        models.sort();
        models.dedup();
        models
    }

    pub fn ready_count(&self) -> usize {
        self.snapshot().iter().filter(|r| r.is_ready()).count()
    }

    /// Routable (ready, not draining) replicas of one pool (`None`: the shared pool).
    pub fn ready_in(&self, pool: Option<&str>) -> usize {
        self.snapshot()
            .iter()
            .filter(|r| r.is_routable() && r.endpoint.reserved_for.as_deref() == pool)
            .count()
    }

    /// Routable replicas per pool, every pool that has replicas included.
    pub fn ready_by_pool(&self) -> std::collections::HashMap<Option<String>, usize> {
        let mut pools = std::collections::HashMap::new();
        for r in self.snapshot().iter() {
            *pools.entry(r.endpoint.reserved_for.clone()).or_insert(0) +=
                usize::from(r.is_routable());
        }
        pools
    }
}

/// Follows the provider's endpoint list until `cancel`.
pub async fn follow_endpoints(
    set: Arc<ReplicaSet>,
    mut endpoints: watch::Receiver<Vec<ReplicaEndpoint>>,
    cancel: CancellationToken,
) {
    loop {
        set.set_endpoints(&endpoints.borrow_and_update().clone());
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = endpoints.changed() => if changed.is_err() { return },
        }
    }
}

/// Checks every replica's `/health` (and learns its models) each `interval`.
pub async fn check_health(
    set: Arc<ReplicaSet>,
    client: reqwest::Client,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let checks = set
            .snapshot()
            .iter()
            .map(|r| probe(r.clone(), &client, interval))
            .collect::<Vec<_>>();
        futures_util::future::join_all(checks).await;
    }
}

async fn probe(replica: Arc<Replica>, client: &reqwest::Client, timeout: Duration) {
    let base = &replica.endpoint.url;
    let timeout = timeout.max(Duration::from_secs(1));
    let healthy = matches!(
        client.get(format!("{base}/health")).timeout(timeout).send().await,
        Ok(r) if r.status().is_success()
    );
    if healthy && replica.models.read().expect("models lock").is_empty() {
        let models = async {
            let v: Value = client
                .get(format!("{base}/v1/models"))
                .timeout(timeout)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some(
                v["data"]
                    .as_array()?
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect::<Vec<_>>(),
            )
        };
        match models.await {
            Some(m) if !m.is_empty() => *replica.models.write().expect("models lock") = m,
            // Ready only once we know what it serves.
            _ => return replica.mark_down(),
        }
    }
    let was = replica.ready.swap(healthy, Ordering::Relaxed);
    if was != healthy {
        tracing::info!(replica = %replica.endpoint.id, url = %base, ready = healthy, "replica readiness changed");
    }
}
