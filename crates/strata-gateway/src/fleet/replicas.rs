//! The gateway's view of its replicas: endpoints from a provider, readiness
//! from health checks (and from failed requests), load from requests in
//! flight; which pools can take a request now.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use strata_core::config::Routing;
use strata_core::openai::PromptInput;
use strata_core::{ApiError, ReplicaEndpoint};

use crate::fleet::client::Target;
use crate::fleet::pick::{pick_with_affinity, ReplicaLoad};
use crate::fleet::prefix_index::{block_hashes, prompt_text, PrefixIndex};

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

    /// Whether it is in `model`'s pool: the pool's model as its provider
    /// published it, else any model it reports.
    fn serves(&self, model: &str) -> bool {
        if let Some(own) = &self.endpoint.model {
            return own == model;
        }
        self.models
            .read()
            .expect("models lock")
            .iter()
            .any(|m| m == model)
    }

    /// Whether its models are known yet (a health check asks once).
    pub(crate) fn knows_models(&self) -> bool {
        !self.models.read().expect("models lock").is_empty()
    }

    pub(crate) fn set_models(&self, models: Vec<String>) {
        *self.models.write().expect("models lock") = models;
    }

    /// Records a health check's verdict; returns the one before.
    pub(crate) fn set_ready(&self, ready: bool) -> bool {
        self.ready.swap(ready, Ordering::Relaxed)
    }
}

/// A fair queue's replicas: a tenant's reserved ones (`None`: the shared
/// pool) of one model's pool (`None`: replicas of no model's pool in
/// particular, which take every model they report).
pub type Lane = (Option<String>, Option<String>);

impl Replica {
    /// Whether it counts for `lane`'s model: every replica counts for no
    /// model in particular, and one whose pool's model is not published
    /// counts for every model.
    fn in_lane(&self, lane: Option<&str>) -> bool {
        match (lane, &self.endpoint.model) {
            (Some(model), Some(own)) => own == model,
            _ => true,
        }
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
    prefix_routing: bool,
    prefixes: Mutex<PrefixIndex>,
    /// With no replica of the shared pool taking requests (all starting or
    /// draining: scaled to zero, a lone replica replaced), requests wait
    /// this long for one instead of a 503.
    hold_when_empty: Option<Duration>,
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

/// What a request hears when its pool has no replica to take it.
pub fn none_ready(pool: Option<&str>) -> ApiError {
    ApiError::unavailable(match pool {
        Some(_) => "No replica reserved for this tenant is ready; retry shortly.",
        None => "No replica is ready to serve requests; retry shortly.",
    })
}

impl ReplicaSet {
    /// Routing by prompt prefix or by load only; the shared pool's requests
    /// wait up to `hold_when_empty` for a replica when none is routable.
    pub fn new(routing: Routing, hold_when_empty: Option<Duration>) -> ReplicaSet {
        ReplicaSet {
            prefix_routing: routing == Routing::Prefix,
            hold_when_empty,
            ..ReplicaSet::default()
        }
    }

    /// How long a request of `pool` may wait for a replica when none is
    /// routable: only the shared pool waits (for one its provider starts),
    /// and only where the gateway is set to.
    pub fn hold(&self, pool: Option<&str>) -> Option<Duration> {
        self.hold_when_empty.filter(|_| pool.is_none())
    }

    /// Whether the gateway waits for replicas rather than refuse when none
    /// is ready (what `/health` reports as `idle`).
    pub fn holds_when_empty(&self) -> bool {
        self.hold_when_empty.is_some()
    }

    /// The routable replicas of `pool` for `lane` (a model of the
    /// catalog: its own pool's), or the 503 when it has none and its
    /// requests may not wait for one.
    pub fn available(&self, pool: Option<&str>, lane: Option<&str>) -> Result<usize, ApiError> {
        let routable = self.ready_in(pool, lane);
        if routable == 0 && self.hold(pool).is_none() {
            return Err(none_ready(pool));
        }
        Ok(routable)
    }

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

    /// The block hashes `choose` routes `input` by: none when routing by
    /// load only, so the prompt is not hashed for nothing.
    pub fn prefix_of(&self, tenant: &str, input: &PromptInput) -> Vec<u64> {
        if !self.prefix_routing {
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
        // Replicas of another model's pool are not this request's: with
        // none of its own ready, it waits for one as a pool at zero does.
        let all: Vec<Arc<Replica>> = self
            .snapshot()
            .iter()
            .filter(|r| r.endpoint.reserved_for.as_deref() == pool && r.in_lane(Some(model)))
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
        let by_prefix = !prefix.is_empty() && self.prefix_routing;
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

    /// Replicas of `model`'s pool (as their provider published them):
    /// listed, and ready.
    pub fn of_model(&self, model: &str) -> (usize, usize) {
        let all = self.snapshot();
        let pool = all
            .iter()
            .filter(|r| r.endpoint.model.as_deref() == Some(model));
        let ready = pool.clone().filter(|r| r.is_ready()).count();
        (pool.count(), ready)
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

    /// Routable (ready, not draining) replicas of one pool (`None`: the
    /// shared pool), of `lane`'s model where the replicas' pools are per
    /// model (`None`: every model).
    pub fn ready_in(&self, pool: Option<&str>, lane: Option<&str>) -> usize {
        self.snapshot()
            .iter()
            .filter(|r| {
                r.is_routable() && r.endpoint.reserved_for.as_deref() == pool && r.in_lane(lane)
            })
            .count()
    }

    /// Routable replicas per pool and model (the model its provider
    /// published, if any), every pool that has replicas included.
    pub fn ready_by_pool(&self) -> std::collections::HashMap<Lane, usize> {
        let mut pools = std::collections::HashMap::new();
        for r in self.snapshot().iter() {
            let lane = (r.endpoint.reserved_for.clone(), r.endpoint.model.clone());
            *pools.entry(lane).or_insert(0) += usize::from(r.is_routable());
        }
        pools
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(id: &str, model: Option<&str>) -> ReplicaEndpoint {
        ReplicaEndpoint {
            id: id.into(),
            url: format!("http://{id}"),
            reserved_for: None,
            draining: false,
            model: model.map(str::to_owned),
            external: None,
        }
    }

    fn ready(set: &ReplicaSet, endpoints: &[ReplicaEndpoint], reported: &[&str]) {
        set.set_endpoints(endpoints);
        for r in set.snapshot().iter() {
            r.set_ready(true);
            r.set_models(reported.iter().map(|m| (*m).to_owned()).collect());
        }
    }

    #[test]
    fn a_model_whose_pool_has_no_replica_waits_rather_than_take_anothers() {
        let set = ReplicaSet::new(Routing::LeastLoad, Some(Duration::from_secs(1)));
        // Replica `a` is model m's pool; model n's pool is at zero. The
        // replica reports both models (an engine would not, but a tag is
        // what the provider says it runs).
        ready(&set, &[tagged("a", Some("m"))], &["m", "n"]);
        let none = set.choose(None, "n", &[], None, &[], 1).err();
        assert_eq!(none, Some(NoReplica::NoneReady), "held for n's own replica");
        assert_eq!(set.ready_in(None, Some("n")), 0);
        assert_eq!(set.ready_in(None, Some("m")), 1);
        let m = set.choose(None, "m", &[], None, &[], 1).unwrap();
        assert_eq!(m.replica().endpoint.id, "a");
        // Untagged replicas (a fixed list, a cluster) serve what they report.
        ready(&set, &[tagged("u", None)], &["m"]);
        assert_eq!(
            set.choose(None, "n", &[], None, &[], 1).err(),
            Some(NoReplica::UnknownModel)
        );
        assert!(set.choose(None, "m", &[], None, &[], 1).is_ok());
        assert_eq!(set.ready_in(None, Some("m")), 1);
    }
}
