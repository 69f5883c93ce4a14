//! The `kubernetes` provider: one Deployment per pool variant (pool ×
//! instance type × zone × capacity type), its replicas set as the planner
//! launches and lets go of instances; a cluster autoscaler (Karpenter, a
//! managed node pool) brings the nodes the Pods' node selectors ask for.
//!
//! The controller speaks of single instances; the provider maps them onto
//! Pods: a launch raises its variant's replica count and names an instance
//! that the next Pod of that variant fills; letting an instance go marks its
//! Pod with the lowest `controller.kubernetes.io/pod-deletion-cost` and
//! lowers the count, so that Pod is the one removed. Health comes from the
//! Pods' Ready condition (the engine's `/health` as readiness probe),
//! endpoints from Pod IPs (recorded in the store, where the gateways read
//! them). A Pod on a node carrying one of the preemption taints (set by
//! spot interruption handlers) is preempted: the controller replaces it at
//! once and it leaves when its node does. With `pool.preemption_drain_secs`
//! shorter than the notice, a replica serves through the notice: gateways
//! keep routing to it until that long before the reclaim, then drain it
//! (its Pod outlasts the eviction: strata's engine lingers after its
//! signal, another server's container sleeps before it); its Pod says
//! when its node goes, so a controller taking over drains it in time. A
//! Pod that someone else deletes or evicts is drained while it still runs,
//! and its Deployment's new Pod replaces it; one that vanishes otherwise
//! failed.
//! A Pod that no node takes within `kubernetes.schedule_timeout_secs`, or
//! that is not ready within `kubernetes.start_timeout_secs`, is given up;
//! an unscheduled Pod is a sold-out offer (`Unavailable`).
//! A replica let go or preempted is recorded as leaving at once (the
//! gateways stop routing to it and one of them keeps its sessions' KV
//! caches); its Pod is removed once that gateway says so (the
//! `drained/<id>` lease) or after the drain wait. On shutdown the
//! Deployments stay (the next leader adopts them), unless the pool is
//! retiring (its model left the catalog): then every replica drains and
//! the pool's Deployments are deleted. `remove_other_pools` deletes the
//! engine Deployments of pools whose model left while no controller acted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use strata_control::planner::{Offer, Slot};
use strata_control::provider::{drain_due, Instance, Provider, ProviderEvent};
use strata_control::ControlError;
use strata_core::config::{CapacityType, Config};
use strata_core::now_ms;
use strata_core::store::{InstanceKind, InstanceRecord, InstanceState, Store};

use tokio_util::sync::CancellationToken;

use crate::render::{
    self, PoolModel, Variant, CAPACITY_LABEL, COMPONENT, ENGINE_KEYS_SECRET, MANAGED_BY,
    POOL_LABEL, TYPE_LABEL, ZONE_LABEL,
};

/// The annotation that makes a Pod the first one a scale-down removes.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// When a Pod serving through its node's preemption notice loses its node
/// (milliseconds since the epoch), so that a controller taking over keeps
/// serving from it and drains it in time.
pub const RECLAIM_AT: &str = "strata.dev/reclaim-at";
const FIELD_MANAGER: &str = "strata";

/// One instance the controller knows, and the Pod that fills it.
#[derive(Debug, Clone)]
struct Tracked {
    variant: Variant,
    pod: Option<String>,
    ready: bool,
    record: InstanceRecord,
    /// When its node goes, for a replica serving through its preemption
    /// notice (`pool.preemption_drain_secs`).
    reclaim_at: Option<Instant>,
    /// When it was launched (or adopted): its Pod has until
    /// `kubernetes.schedule_timeout_secs` after this to get a node, and
    /// `kubernetes.start_timeout_secs` to be ready.
    since: Instant,
}

pub struct KubeProvider {
    config: Arc<Config>,
    pool: String,
    model: PoolModel,
    deployments: Api<Deployment>,
    pods: Api<Pod>,
    nodes: Api<Node>,
    secrets: Api<Secret>,
    /// An `openai` pool's API key, written to `ENGINE_KEYS_SECRET` before
    /// its Deployments change.
    engine_key: Option<String>,
    store: Arc<dyn Store>,
    /// Replicas wanted per variant, as last applied.
    desired: BTreeMap<Variant, u32>,
    /// Price and throughput per variant, from the offers launched.
    kinds: BTreeMap<Variant, (f64, f64)>,
    running: BTreeMap<String, Tracked>,
    /// Let go or preempted, waiting for their Pods to go.
    leaving: BTreeMap<String, Tracked>,
    events: Vec<ProviderEvent>,
    next: u64,
    poll_every: Duration,
    last_poll: Option<Instant>,
    adopted: bool,
    /// Leaving instances whose Pods stay until a gateway has kept their
    /// sessions (the `drained/<id>` lease) or the deadline passes.
    drains: BTreeMap<String, Instant>,
    drain_wait: Duration,
    /// Cancelled when the pool's model leaves the catalog: shutdown then
    /// drains every replica and deletes the pool's Deployments.
    retiring: CancellationToken,
}

fn api_err(what: &str) -> impl Fn(kube::Error) -> ControlError + '_ {
    move |e| ControlError::Provider(format!("{what}: {e}"))
}

impl KubeProvider {
    /// The provider of `model`'s pool (`model.issue` must be `None`).
    pub fn new(
        client: Client,
        config: Arc<Config>,
        model: PoolModel,
        store: Arc<dyn Store>,
    ) -> Self {
        let ns = config.kubernetes.namespace.clone();
        KubeProvider {
            pool: model.pool.clone(),
            model,
            deployments: Api::namespaced(client.clone(), &ns),
            pods: Api::namespaced(client.clone(), &ns),
            secrets: Api::namespaced(client.clone(), &ns),
            engine_key: None,
            nodes: Api::all(client),
            store,
            config,
            desired: BTreeMap::new(),
            kinds: BTreeMap::new(),
            running: BTreeMap::new(),
            leaving: BTreeMap::new(),
            events: Vec::new(),
            next: 0,
            poll_every: Duration::from_secs(2),
            last_poll: None,
            adopted: false,
            drains: BTreeMap::new(),
            drain_wait: Duration::from_secs(30),
            retiring: CancellationToken::new(),
        }
    }

    /// The API key of this pool's `openai` engines (`model.external`),
    /// which the gateways derive alike.
    pub fn with_engine_key(mut self, key: String) -> Self {
        self.engine_key = Some(key);
        self
    }

    /// Where gateways reach the replica at `ip`: HTTPS (mutual TLS) by
    /// default; plain HTTP to another server, which checks the pool's
    /// API key instead.
    fn endpoint(&self, ip: &str) -> String {
        let https = self.config.serve.replica_mtls && self.model.external.is_none();
        let scheme = if https { "https" } else { "http" };
        format!("{scheme}://{ip}:{}", self.config.kubernetes.engine_port)
    }

    /// Puts the pool's API key where its Pods read it (their Deployment
    /// names the entry; a Pod whose entry is missing waits for it).
    async fn write_engine_key(&self) -> Result<(), ControlError> {
        let (Some(server), Some(key)) = (&self.model.external, &self.engine_key) else {
            return Ok(());
        };
        let entry = render::key_entry(&server.key_of);
        let patch = json!({"data": {entry: ByteString(key.as_bytes().to_vec())}});
        self.secrets
            .patch(
                ENGINE_KEYS_SECRET,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(api_err(
                "writing the pool's API key (is the strata-engine-keys Secret of `strata k8s render` applied?)",
            ))?;
        Ok(())
    }

    /// `retiring`, once cancelled, makes shutdown end the pool for good.
    pub fn retiring(mut self, retiring: CancellationToken) -> Self {
        self.retiring = retiring;
        self
    }

    /// Longest a leaving replica's Pod waits for a gateway to keep its
    /// sessions before it is removed (zero: removed at once).
    pub fn with_drain_wait(mut self, wait: Duration) -> Self {
        self.drain_wait = wait;
        self
    }

    /// Removes the Pod of a leaving instance now, or once drained.
    async fn let_go(&mut self, id: &str, t: &Tracked) {
        if self.drain_wait.is_zero() || t.pod.is_none() {
            self.shrink(t).await;
        } else {
            self.drains
                .insert(id.to_owned(), Instant::now() + self.drain_wait);
        }
    }

    /// Shrinks the variants of leaving instances that are drained (or
    /// waited long enough).
    async fn finish_drains(&mut self) {
        let ids: Vec<(String, Instant)> =
            self.drains.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (id, deadline) in ids {
            let drained = matches!(
                self.store.lease(&strata_core::drained_lease(&id)).await,
                Ok(Some(_))
            );
            if !drained && Instant::now() < deadline {
                continue;
            }
            self.drains.remove(&id);
            if let Some(t) = self.leaving.get(&id).cloned() {
                self.shrink(&t).await;
            }
        }
    }

    /// How often `poll` reads the API (the controller ticks faster).
    pub fn with_poll_every(mut self, every: Duration) -> Self {
        self.poll_every = every;
        self
    }

    fn selector(&self) -> String {
        format!(
            "{}={},{POOL_LABEL}={}",
            MANAGED_BY.0,
            MANAGED_BY.1,
            render::label_value(&self.pool)
        )
    }

    /// The notice a node marked for reclaim gives its Pods
    /// (`kubernetes.preemption_notice_secs`, at most a year by the config
    /// check).
    fn notice(&self) -> Duration {
        Duration::from_secs_f64(self.config.kubernetes.preemption_notice_secs)
    }

    fn variant(&self, slot: &Slot) -> Variant {
        Variant {
            pool: self.pool.clone(),
            instance_type: slot.instance_type.clone(),
            zone: slot.zone.clone(),
            capacity: slot.capacity,
        }
    }

    fn new_id(&mut self, v: &Variant) -> String {
        self.next += 1;
        format!("{}-{:x}-{}", v.name(), now_ms(), self.next)
    }

    fn record(&self, id: &str, v: &Variant) -> InstanceRecord {
        let (price, tokens) = self.kinds.get(v).copied().unwrap_or_else(|| {
            let price = self
                .config
                .catalog
                .iter()
                .find(|o| {
                    o.instance_type == v.instance_type
                        && o.zone == v.zone
                        && o.capacity == v.capacity
                })
                .map_or(0.0, |o| o.price_per_hour);
            (price, 0.0)
        });
        InstanceRecord {
            id: id.to_owned(),
            provider: "kubernetes".into(),
            endpoint: String::new(),
            state: InstanceState::Starting,
            started_at_ms: now_ms(),
            ended_at_ms: None,
            detail: None,
            kind: InstanceKind {
                pool: self.pool.clone(),
                model: self.model.name.clone(),
                instance_type: v.instance_type.clone(),
                zone: v.zone.clone(),
                capacity: v.capacity,
                price_per_hour: price,
                tokens_per_s: tokens,
            },
        }
    }

    async fn save(&self, r: &InstanceRecord) {
        if let Err(e) = self.store.upsert_instance(r).await {
            tracing::warn!(instance = %r.id, error = %e, "cannot record instance");
        }
    }

    /// Makes the variant's Deployment say `desired[v]` replicas (server-side
    /// apply: created when missing, only our fields changed).
    async fn apply(&self, v: &Variant) -> Result<(), ControlError> {
        let replicas = self.desired.get(v).copied().unwrap_or(0);
        if replicas > 0 {
            self.write_engine_key().await?;
        }
        let deployment = render::engine_deployment(&self.config, v, replicas, &self.model);
        self.deployments
            .patch(
                &v.name(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&deployment),
            )
            .await
            .map_err(api_err("applying a Deployment"))?;
        Ok(())
    }

    /// The Pod goes first when its Deployment shrinks; one serving through
    /// a preemption notice also says when its node goes.
    async fn mark_for_removal(&self, pod: &str, reclaim_at_ms: Option<i64>) {
        let mut annotations = json!({DELETION_COST: "-1000"});
        if let Some(at) = reclaim_at_ms {
            annotations[RECLAIM_AT] = json!(at.to_string());
        }
        let patch = json!({"metadata": {"annotations": annotations}});
        if let Err(e) = self
            .pods
            .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(%pod, error = %e, "cannot mark a Pod for removal");
        }
    }

    /// One fewer replica of the instance's variant, removing its Pod. A Pod
    /// of another server that would sleep through a preemption notice
    /// before stopping (`render::pre_stop_sleep`) is deleted with a short
    /// grace instead: strata let it go, and nothing is sent to it any more.
    async fn shrink(&mut self, t: &Tracked) {
        if let Some(pod) = &t.pod {
            self.mark_for_removal(pod, None).await;
        }
        self.lower(&t.variant).await;
        let sleeps =
            self.model.external.is_some() && render::pre_stop_sleep(&self.config).is_some();
        if let (true, Some(pod)) = (sleeps, &t.pod) {
            let params = DeleteParams::default().grace_period(render::STOP_GRACE_SECS);
            match self.pods.delete(pod, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    tracing::warn!(%pod, error = %e, "cannot cut a stopping Pod's sleep short")
                }
            }
        }
    }

    /// One fewer replica of `v` (whichever Pod the Deployment picks).
    async fn lower(&mut self, v: &Variant) {
        let n = self.desired.entry(v.clone()).or_default();
        *n = n.saturating_sub(1);
        if let Err(e) = self.apply(v).await {
            tracing::warn!(error = %e, "cannot shrink a Deployment");
        }
    }

    /// Takes a running instance out of the pool with `event`: recorded at
    /// once as `state` (the gateways stop routing to it), its Pod removed,
    /// and `Gone` once the Pod has gone.
    async fn retire(
        &mut self,
        id: &str,
        state: InstanceState,
        detail: String,
        event: ProviderEvent,
    ) {
        let Some(mut t) = self.running.remove(id) else {
            return;
        };
        self.events.push(event);
        t.record.state = state;
        t.record.detail = Some(detail);
        self.save(&t.record).await;
        self.let_go(id, &t).await;
        self.leaving.insert(id.to_owned(), t);
    }

    /// A replica whose node is reclaimed keeps serving through the notice
    /// (`pool.preemption_drain_secs`): out of the pool at once, so its
    /// replacement is planned now, and its Pod removed at once (its engine
    /// lingers while gateways use it, `strata engine --linger-secs`), but
    /// recorded as serving until the drain before the reclaim
    /// (`finish_reclaims`).
    async fn serve_through(&mut self, id: &str, notice: Duration, event: ProviderEvent) {
        let Some(mut t) = self.running.remove(id) else {
            return;
        };
        self.events.push(event);
        t.reclaim_at = Some(Instant::now() + notice);
        t.record.detail =
            Some("its node was marked for reclaim; serving through the notice".into());
        self.save(&t.record).await;
        // Not `shrink`: the Pod takes its full grace to serve through.
        if let Some(pod) = &t.pod {
            let at = now_ms().saturating_add(notice.as_millis() as i64);
            self.mark_for_removal(pod, Some(at)).await;
        }
        self.lower(&t.variant).await;
        self.leaving.insert(id.to_owned(), t);
    }

    /// A replica whose Pod someone else deletes or evicts (a node drained
    /// by hand): the Pod may run a while yet (its grace, a lingering
    /// engine, a preStop sleep), so the replica is drained now, while it
    /// still serves, and is gone with its Pod. Its Deployment makes
    /// another Pod, which `bind` adopts as the replacement: the count is
    /// left as it is.
    async fn evicted(&mut self, id: &str) {
        let Some(mut t) = self.running.remove(id) else {
            return;
        };
        let why = "its Pod is being deleted".to_owned();
        tracing::warn!(instance = %id, pod = ?t.pod, "{why}");
        t.record.state = InstanceState::Stopped;
        t.record.detail = Some(why.clone());
        self.save(&t.record).await;
        self.events.push(ProviderEvent::Failed {
            id: id.to_owned(),
            detail: why,
        });
        self.leaving.insert(id.to_owned(), t);
    }

    /// A replica that never served, given up and its Pod removed (nothing
    /// ran on it: no drain). A Pod left unscheduled is how a sold-out
    /// offer shows on Kubernetes (the node autoscaler cannot get the
    /// instance type in that zone), so it is `Unavailable`: the controller
    /// keeps the zone's spot, or that on-demand offer, at what it holds for
    /// the cooldown and plans the replica elsewhere. Otherwise it failed
    /// to start.
    async fn give_up(&mut self, id: &str, cause: NeverServed) {
        let Some(mut t) = self.running.remove(id) else {
            return;
        };
        let v = &t.variant;
        let k = &self.config.kubernetes;
        let why = match cause {
            NeverServed::NoNode => format!(
                "no node took its Pod in {}s (no {} {} capacity in {}?)",
                k.schedule_timeout_secs,
                v.capacity.as_str(),
                v.instance_type,
                v.zone
            ),
            NeverServed::NoPod => format!(
                "its Deployment made no Pod for it in {}s (a quota?)",
                k.schedule_timeout_secs
            ),
            NeverServed::NotReady => format!(
                "its Pod was not ready {}s after the launch (its image, the model's fetch, the engine's start?)",
                k.start_timeout_secs
            ),
        };
        tracing::warn!(instance = %id, pod = ?t.pod, "{why}");
        t.record.state = InstanceState::Exited;
        t.record.detail = Some(why.clone());
        self.save(&t.record).await;
        self.events.push(match cause {
            NeverServed::NoNode => ProviderEvent::Unavailable { slot: slot_of(v) },
            _ => ProviderEvent::Failed {
                id: id.to_owned(),
                detail: why,
            },
        });
        self.shrink(&t).await;
        self.gone_or_leaving(id, t).await;
    }

    /// An instance taken out of the pool: gone at once when no Pod filled
    /// it yet (nothing to wait for), else leaving until its Pod has gone.
    async fn gone_or_leaving(&mut self, id: &str, mut t: Tracked) {
        if t.pod.is_none() {
            t.record.ended_at_ms = Some(now_ms());
            self.save(&t.record).await;
            self.events.push(ProviderEvent::Gone { id: id.to_owned() });
        } else {
            self.leaving.insert(id.to_owned(), t);
        }
    }

    /// Replicas serving through their notice that are now within
    /// `pool.preemption_drain_secs` of the reclaim: recorded as preempted,
    /// so the gateways drain them (their requests finish or move, one
    /// gateway keeps their sessions' caches) while the engine is still up.
    async fn finish_reclaims(&mut self) {
        let Some(drain) = render::preemption_drain(&self.config) else {
            return;
        };
        let now = Instant::now();
        let due: Vec<(String, String)> = self
            .leaving
            .iter()
            .filter(|(_, t)| t.record.state != InstanceState::Preempted)
            .filter_map(|(id, t)| {
                let (_, why) = drain_due(t.reclaim_at?, drain, now)?;
                Some((id.clone(), why))
            })
            .collect();
        for (id, why) in due {
            let t = self.leaving.get_mut(&id).expect("listed");
            t.record.state = InstanceState::Preempted;
            t.record.detail = Some(why);
            let record = t.record.clone();
            tracing::info!(instance = %id, "draining before the reclaim");
            self.save(&record).await;
        }
    }

    /// On first sight of the cluster: the Deployments a previous leader
    /// left keep their replica counts (their Pods are adopted below).
    async fn adopt(&mut self) -> Result<(), ControlError> {
        let list = self
            .deployments
            .list(&ListParams::default().labels(&self.selector()))
            .await
            .map_err(api_err("listing Deployments"))?;
        for d in list.items {
            let labels = d.metadata.labels.clone().unwrap_or_default();
            if let Some(v) = variant_of(&labels) {
                let replicas = d.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32;
                self.desired.insert(v, replicas);
            }
        }
        self.adopted = true;
        Ok(())
    }

    async fn observe(&mut self) -> Result<(), ControlError> {
        if !self.adopted {
            self.adopt().await?;
        }
        self.finish_drains().await;
        let pods = self
            .pods
            .list(&ListParams::default().labels(&self.selector()))
            .await
            .map_err(api_err("listing Pods"))?
            .items;
        let nodes = self
            .nodes
            .list(&ListParams::default())
            .await
            .map_err(api_err("listing Nodes"))?
            .items;
        let k = &self.config.kubernetes;
        let reclaimed: BTreeSet<String> = nodes
            .iter()
            .filter(|n| {
                let tainted =
                    n.spec
                        .as_ref()
                        .and_then(|s| s.taints.as_ref())
                        .is_some_and(|taints| {
                            taints.iter().any(|t| k.preemption_taints.contains(&t.key))
                        });
                let flagged = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|conditions| {
                        conditions.iter().any(|c| {
                            c.status == "True" && k.preemption_conditions.contains(&c.type_)
                        })
                    });
                tainted || flagged
            })
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let seen: BTreeMap<String, PodView> = pods
            .iter()
            .filter_map(PodView::of)
            .map(|p| (p.name.clone(), p))
            .collect();
        self.bind(&seen).await;
        self.gone(&seen).await;
        self.finish_reclaims().await;
        self.health(&seen, &reclaimed).await;
        Ok(())
    }

    /// Pods not yet filling an instance fill the oldest unfilled instance
    /// of their variant, or become instances of their own (adopted).
    async fn bind(&mut self, seen: &BTreeMap<String, PodView>) {
        let bound: BTreeSet<String> = self
            .running
            .values()
            .chain(self.leaving.values())
            .filter_map(|t| t.pod.clone())
            .collect();
        for p in seen.values().filter(|p| !bound.contains(&p.name)) {
            if p.deleting {
                self.adopt_serving_through(p).await;
                continue;
            }
            let free = self
                .running
                .iter()
                .filter(|(_, t)| t.pod.is_none() && t.variant == p.variant)
                .map(|(id, t)| (t.record.started_at_ms, id.clone()))
                .min();
            let id = match free {
                Some((_, id)) => id,
                None => {
                    let id = self.new_id(&p.variant);
                    let record = self.record(&id, &p.variant);
                    tracing::info!(instance = %id, pod = %p.name, "adopted a Pod");
                    self.running.insert(
                        id.clone(),
                        Tracked {
                            variant: p.variant.clone(),
                            pod: None,
                            ready: false,
                            record,
                            reclaim_at: None,
                            since: Instant::now(),
                        },
                    );
                    id
                }
            };
            let endpoint = p.ip.as_deref().map(|ip| self.endpoint(ip));
            let t = self.running.get_mut(&id).expect("just found or made");
            t.pod = Some(p.name.clone());
            if let Some(endpoint) = endpoint {
                t.record.endpoint = endpoint;
            }
            let record = t.record.clone();
            self.save(&record).await;
        }
    }

    /// A Pod that a previous controller left serving through its node's
    /// preemption notice (`RECLAIM_AT`, `serve_through`): it keeps serving
    /// as a leaving replica, drained within `pool.preemption_drain_secs` of
    /// the reclaim as if this controller had seen the notice. Other
    /// terminating Pods are not adopted.
    async fn adopt_serving_through(&mut self, p: &PodView) {
        let now = now_ms();
        let (Some(at), Some(ip), Some(_)) = (
            p.reclaim_at_ms.filter(|at| *at > now),
            p.ip.as_deref(),
            render::preemption_drain(&self.config),
        ) else {
            return;
        };
        let id = self.new_id(&p.variant);
        let mut record = self.record(&id, &p.variant);
        record.state = InstanceState::Ready;
        record.endpoint = self.endpoint(ip);
        record.detail = Some(
            "its node was marked for reclaim; serving through the notice (adopted from the previous controller)"
                .into(),
        );
        tracing::info!(instance = %id, pod = %p.name, "adopted a Pod serving through its notice");
        self.save(&record).await;
        // No further off than a notice is long, whatever the annotation says.
        let left = Duration::from_millis((at - now) as u64).min(self.notice());
        self.leaving.insert(
            id,
            Tracked {
                variant: p.variant.clone(),
                pod: Some(p.name.clone()),
                ready: true,
                record,
                reclaim_at: Some(Instant::now() + left),
                since: Instant::now(),
            },
        );
    }

    /// Instances whose Pods vanished: those let go are gone; others failed
    /// (deleted by someone else, evicted), and their variant keeps as many
    /// Pods as it has instances, so that the controller's replacement does
    /// not come on top of the Deployment's own.
    async fn gone(&mut self, seen: &BTreeMap<String, PodView>) {
        let left: Vec<String> = self
            .leaving
            .iter()
            .filter(|(_, t)| t.pod.as_ref().is_none_or(|p| !seen.contains_key(p)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in left {
            let mut t = self.leaving.remove(&id).expect("listed");
            self.drains.remove(&id);
            if matches!(
                t.record.state,
                InstanceState::Starting | InstanceState::Ready
            ) {
                // One serving through its notice went before its drain.
                t.record.state = match t.reclaim_at {
                    Some(_) => InstanceState::Preempted,
                    None => InstanceState::Stopped,
                };
            }
            t.record.ended_at_ms = Some(now_ms());
            self.save(&t.record).await;
            self.events.push(ProviderEvent::Gone { id });
        }
        let lost: Vec<String> = self
            .running
            .iter()
            .filter(|(_, t)| t.pod.as_ref().is_some_and(|p| !seen.contains_key(p)))
            .map(|(id, _)| id.clone())
            .collect();
        let mut shrunk = BTreeSet::new();
        for id in lost {
            let mut t = self.running.remove(&id).expect("listed");
            shrunk.insert(t.variant.clone());
            t.record.state = InstanceState::Exited;
            t.record.ended_at_ms = Some(now_ms());
            t.record.detail = Some("its Pod was deleted".into());
            self.save(&t.record).await;
            self.events.push(ProviderEvent::Failed {
                id,
                detail: "its Pod was deleted".into(),
            });
        }
        // The variant keeps as many Pods as it has instances: a Deployment
        // that already replaced the Pod (its new Pod adopted above) keeps
        // it; one that has not will not, and the controller's replacement
        // is the only one. Lowering by one per lost Pod instead would
        // remove a serving Pod for a replacement already adopted.
        for v in shrunk {
            let live = self.running.values().filter(|t| t.variant == v).count() as u32;
            if self.desired.get(&v).is_some_and(|d| *d > live) {
                self.desired.insert(v.clone(), live);
                if let Err(e) = self.apply(&v).await {
                    tracing::warn!(error = %e, "cannot shrink a Deployment");
                }
            }
        }
    }

    /// Readiness, failures and preemption notices of the bound Pods, and
    /// replicas whose Pod found no node, or was not ready, in time.
    async fn health(&mut self, seen: &BTreeMap<String, PodView>, reclaimed: &BTreeSet<String>) {
        let ids: Vec<String> = self.running.keys().cloned().collect();
        let k = &self.config.kubernetes;
        let schedule = Duration::from_secs_f64(k.schedule_timeout_secs);
        let start = Duration::from_secs_f64(k.start_timeout_secs);
        for id in ids {
            let t = self.running[&id].clone();
            let pod = t.pod.as_ref().and_then(|name| seen.get(name));
            let waited = t.since.elapsed();
            let cause = match pod {
                None if waited >= schedule => Some(NeverServed::NoPod),
                Some(p) if p.node.is_none() && waited >= schedule => Some(NeverServed::NoNode),
                Some(p) if !t.ready && !p.ready && waited >= start => Some(NeverServed::NotReady),
                _ => None,
            };
            if let Some(cause) = cause {
                self.give_up(&id, cause).await;
                continue;
            }
            let Some(p) = pod else {
                continue;
            };
            if p.node.as_ref().is_some_and(|n| reclaimed.contains(n)) {
                tracing::warn!(instance = %id, pod = %p.name, node = ?p.node, "node marked for reclaim");
                let notice = self.notice();
                let event = ProviderEvent::Preempting {
                    id: id.clone(),
                    slot: slot_of(&t.variant),
                    notice,
                };
                match render::preemption_drain(&self.config) {
                    Some(_) => self.serve_through(&id, notice, event).await,
                    None => {
                        let why = "its node was marked for reclaim".to_owned();
                        self.retire(&id, InstanceState::Preempted, why, event).await;
                    }
                }
                continue;
            }
            if p.deleting {
                self.evicted(&id).await;
                continue;
            }
            if let Some(why) = &p.failed {
                let event = ProviderEvent::Failed {
                    id: id.clone(),
                    detail: why.clone(),
                };
                self.retire(&id, InstanceState::Exited, why.clone(), event)
                    .await;
                continue;
            }
            if p.ready && !t.ready {
                let endpoint = p.ip.as_deref().map(|ip| self.endpoint(ip));
                let t = self.running.get_mut(&id).expect("listed");
                t.ready = true;
                t.record.state = InstanceState::Ready;
                if let Some(endpoint) = endpoint {
                    t.record.endpoint = endpoint;
                }
                let record = t.record.clone();
                self.save(&record).await;
                self.events.push(ProviderEvent::Ready { id });
            }
        }
    }
}

/// Why a replica that never served is given up (`give_up`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum NeverServed {
    /// Its Deployment made no Pod for it within the schedule timeout.
    NoPod,
    /// Its Pod got no node within the schedule timeout.
    NoNode,
    /// Its Pod was not ready within the start timeout.
    NotReady,
}

/// What the provider reads of a Pod.
#[derive(Debug, Clone)]
struct PodView {
    name: String,
    variant: Variant,
    ready: bool,
    ip: Option<String>,
    /// The node it is bound to; none while no node can take it.
    node: Option<String>,
    deleting: bool,
    /// When its node goes, for one serving through a preemption notice.
    reclaim_at_ms: Option<i64>,
    /// Why it cannot serve (failed, crash looping).
    failed: Option<String>,
}

impl PodView {
    fn of(p: &Pod) -> Option<PodView> {
        let name = p.metadata.name.clone()?;
        let variant = variant_of(p.metadata.labels.as_ref()?)?;
        let status = p.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let crash = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| {
                cs.iter().find_map(|c| {
                    let waiting = c.state.as_ref()?.waiting.as_ref()?;
                    (waiting.reason.as_deref() == Some("CrashLoopBackOff"))
                        .then(|| format!("container {} is crash looping", c.name))
                })
            });
        let failed = match status.and_then(|s| s.phase.as_deref()) {
            Some("Failed") => Some(
                status
                    .and_then(|s| s.reason.clone())
                    .unwrap_or_else(|| "the Pod failed".into()),
            ),
            _ => crash,
        };
        Some(PodView {
            name,
            variant,
            ready,
            ip: status.and_then(|s| s.pod_ip.clone()),
            node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            deleting: p.metadata.deletion_timestamp.is_some(),
            reclaim_at_ms: p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(RECLAIM_AT)?.parse().ok()),
            failed,
        })
    }
}

fn variant_of(labels: &BTreeMap<String, String>) -> Option<Variant> {
    Some(Variant {
        pool: labels.get(POOL_LABEL)?.clone(),
        instance_type: labels.get(TYPE_LABEL)?.clone(),
        zone: labels.get(ZONE_LABEL)?.clone(),
        capacity: CapacityType::parse(labels.get(CAPACITY_LABEL)?)?,
    })
}

fn slot_of(v: &Variant) -> Slot {
    Slot {
        instance_type: v.instance_type.clone(),
        zone: v.zone.clone(),
        capacity: v.capacity,
    }
}

#[async_trait]
impl Provider for KubeProvider {
    async fn launch(&mut self, offer: &Offer) -> Result<String, ControlError> {
        let v = self.variant(&Slot::from(offer));
        self.kinds
            .insert(v.clone(), (offer.price_per_hour, offer.tokens_per_s));
        *self.desired.entry(v.clone()).or_default() += 1;
        if let Err(e) = self.apply(&v).await {
            *self.desired.entry(v.clone()).or_default() -= 1;
            return Err(e);
        }
        let id = self.new_id(&v);
        let record = self.record(&id, &v);
        self.save(&record).await;
        self.running.insert(
            id.clone(),
            Tracked {
                variant: v,
                pod: None,
                ready: false,
                record,
                reclaim_at: None,
                since: Instant::now(),
            },
        );
        Ok(id)
    }

    async fn terminate(&mut self, id: &str, why: &str) {
        let Some(mut t) = self.running.remove(id) else {
            return;
        };
        t.record.detail = Some(why.to_owned());
        // Recorded as stopping at once, so the gateways send it nothing new
        // while its Pod finishes what it has (its termination grace period).
        t.record.state = InstanceState::Stopped;
        self.save(&t.record).await;
        self.let_go(id, &t).await;
        self.gone_or_leaving(id, t).await;
    }

    fn list(&self) -> Vec<Instance> {
        self.running
            .iter()
            .map(|(id, t)| Instance {
                id: id.clone(),
                slot: slot_of(&t.variant),
                ready: t.ready,
                busy: None,
            })
            .collect()
    }

    async fn poll(&mut self) -> Vec<ProviderEvent> {
        let due = self
            .last_poll
            .is_none_or(|at| at.elapsed() >= self.poll_every);
        if due {
            self.last_poll = Some(Instant::now());
            if let Err(e) = self.observe().await {
                tracing::warn!(error = %e, "cannot read the cluster");
            }
        }
        std::mem::take(&mut self.events)
    }

    /// The Deployments outlive this controller: a standby that takes over
    /// adopts them, so serving never stops for a controller restart. A
    /// retiring pool ends: its replicas drain (gateways keep their
    /// sessions), then its Deployments are deleted.
    async fn shutdown(&mut self) {
        if !self.retiring.is_cancelled() {
            return;
        }
        // Replicas that were never ready hold no sessions: no wait for them.
        let mut ids: Vec<String> = Vec::new();
        for (id, t) in self.running.iter_mut() {
            t.record.state = InstanceState::Stopped;
            t.record.detail = Some("its model was undeployed".into());
            if t.ready {
                ids.push(id.clone());
            }
        }
        let records: Vec<InstanceRecord> =
            self.running.values().map(|t| t.record.clone()).collect();
        for record in &records {
            self.save(record).await;
        }
        let never = CancellationToken::new();
        strata_control::provider::local::wait_drained(&*self.store, &ids, self.drain_wait, &never)
            .await;
        if let Err(e) = self.delete_deployments().await {
            tracing::warn!(pool = %self.pool, error = %e, "cannot delete a retiring pool's Deployments");
        }
        let ended = now_ms();
        let left: Vec<Tracked> = std::mem::take(&mut self.running)
            .into_values()
            .chain(std::mem::take(&mut self.leaving).into_values())
            .collect();
        for mut t in left {
            t.record.ended_at_ms.get_or_insert(ended);
            if matches!(
                t.record.state,
                InstanceState::Starting | InstanceState::Ready
            ) {
                t.record.state = InstanceState::Stopped;
            }
            self.save(&t.record).await;
        }
        self.desired.clear();
        self.drains.clear();
    }
}

impl KubeProvider {
    /// Deletes every Deployment of this pool (their Pods go with them).
    async fn delete_deployments(&self) -> Result<(), ControlError> {
        let list = self
            .deployments
            .list(&ListParams::default().labels(&self.selector()))
            .await
            .map_err(api_err("listing Deployments"))?;
        let names: BTreeSet<String> = list
            .items
            .into_iter()
            .filter_map(|d| d.metadata.name)
            .chain(self.desired.keys().map(Variant::name))
            .collect();
        for name in names {
            delete_deployment(&self.deployments, &name).await?;
        }
        Ok(())
    }
}

/// Deletes a Deployment and, in the background, its Pods; one already gone
/// is no error.
async fn delete_deployment(api: &Api<Deployment>, name: &str) -> Result<(), ControlError> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(api_err("deleting a Deployment")(e)),
    }
}

/// Deletes the engine Deployments of every pool but `keep` (pool names,
/// as `PoolModel::pool`): those of models that left the catalog while no
/// controller acted. Returns the Deployments deleted.
pub async fn remove_other_pools(
    client: Client,
    config: &Config,
    keep: &[String],
) -> Result<Vec<String>, ControlError> {
    let api: Api<Deployment> = Api::namespaced(client, &config.kubernetes.namespace);
    let selector = format!("{}={},{COMPONENT}=engine", MANAGED_BY.0, MANAGED_BY.1);
    let keep: BTreeSet<String> = keep.iter().map(|p| render::label_value(p)).collect();
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_err("listing Deployments"))?;
    let mut deleted = Vec::new();
    for d in list.items {
        let pool = d
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(POOL_LABEL))
            .cloned()
            .unwrap_or_default();
        let Some(name) = d.metadata.name else {
            continue;
        };
        if keep.contains(&pool) {
            continue;
        }
        delete_deployment(&api, &name).await?;
        tracing::info!(deployment = %name, %pool, "deleted the engines of a model no longer deployed");
        deleted.push(name);
    }
    Ok(deleted)
}

/// Removes from `ENGINE_KEYS_SECRET` the API keys of every `openai` pool
/// but those derived from `keep` (`ExternalServer::key_of`): a model no
/// longer deployed keeps no key its old engines would take. Returns the
/// entries removed.
pub async fn prune_engine_keys(
    client: Client,
    config: &Config,
    keep: &[String],
) -> Result<Vec<String>, ControlError> {
    let api: Api<Secret> = Api::namespaced(client, &config.kubernetes.namespace);
    let secret = match api.get(ENGINE_KEYS_SECRET).await {
        Ok(s) => s,
        // Not applied: no keys to remove.
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Vec::new()),
        Err(e) => return Err(api_err("reading the engines' API keys")(e)),
    };
    let keep: BTreeSet<String> = keep.iter().map(|k| render::key_entry(k)).collect();
    let gone: Vec<String> = secret
        .data
        .unwrap_or_default()
        .into_keys()
        .filter(|entry| !keep.contains(entry))
        .collect();
    if gone.is_empty() {
        return Ok(gone);
    }
    let nulls: serde_json::Map<String, serde_json::Value> = gone
        .iter()
        .map(|entry| (entry.clone(), serde_json::Value::Null))
        .collect();
    api.patch(
        ENGINE_KEYS_SECRET,
        &PatchParams::default(),
        &Patch::Merge(&json!({"data": nulls})),
    )
    .await
    .map_err(api_err("removing the API keys of undeployed models"))?;
    Ok(gone)
}
