//! The pools of `strata serve` and of a cluster's acting controller: one
//! per model of the catalog (the config file's `[[models]]`, or its one
//! model of `[engine]`, then the models deployed through the admin API,
//! kept in the database). Each pool is a provider (`local` engine
//! processes, or `kubernetes` engine Deployments) with its own
//! controller, scaled by its own model's load. The
//! fleet follows the stored catalog: a deployed model gets a pool, a
//! changed one a new pool before the old one drains, an undeployed one
//! leaves the catalog at once and its replicas drain (their sessions' KV
//! caches kept as snapshots) before they stop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use strata_control::controller::{Controller, PoolSpec};
use strata_control::metrics::ControllerMetrics;
use strata_control::provider::local::LocalProvider;
use strata_core::config::{Config, EngineKind, KubernetesConfig, ModelEntry, ServedModel};
use strata_core::link::{ControllerLink, DrainRequest, PreemptNotice};
use strata_core::store::{DeployedModel, Store};
use strata_core::{Load, Loads, ReplicaEndpoint};
use strata_gateway::ops::models::ModelHost;
use strata_gateway::CatalogModel;
use strata_k8s::provider::KubeProvider;
use strata_k8s::render::{ExternalServer, ModelFile, PoolModel};
use strata_models::fetch::ModelSource;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::EngineFlags;
use crate::launch::{local_launch, pool_processes, ReplicaTrust};

/// How long a leaving pool's replicas may take to finish their requests.
const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// How often the stored catalog is read (besides the admin API's nudges).
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// How long a model whose pool could not start waits before another try.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Where a fleet's pools run their engines.
#[derive(Clone)]
pub enum Launcher {
    /// Engine processes on this machine, proving the gateway with `trust`.
    Local(ReplicaTrust),
    /// Engine Deployments in the cluster this client talks to; their Pods
    /// fetch and check their model's file themselves.
    Kube(strata_k8s::Client),
}

/// What every pool is made from.
pub struct FleetParts {
    pub config: Config,
    pub config_path: PathBuf,
    /// The default model's engine flags and `--replicas`.
    pub flags: EngineFlags,
    pub replicas: Option<u32>,
    pub launcher: Launcher,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<ControllerMetrics>,
    /// The acting controller of a cluster: no gateway shares this process,
    /// so replicas that go are drained through the store.
    pub in_cluster: bool,
}

/// One model's running pool.
struct Pool {
    /// Which entry it runs (changed: a new pool replaces it).
    version: String,
    /// Its key among the published endpoint lists.
    instance: u64,
    /// The model id and what it may generate at most without `max_tokens`.
    catalog: CatalogModel,
    stop: CancellationToken,
    /// Cancelled before `stop` when the pool leaves for good (its model
    /// undeployed or changed): a Kubernetes pool then deletes its
    /// Deployments, where stopping alone leaves them to the next leader.
    retiring: CancellationToken,
    task: JoinHandle<Result<(), strata_control::ControlError>>,
    endpoints: watch::Receiver<Vec<ReplicaEndpoint>>,
}

/// Each pool's published replicas, merged into the one list the gateway follows.
#[derive(Clone)]
struct Endpoints {
    pools: Arc<Mutex<BTreeMap<u64, watch::Receiver<Vec<ReplicaEndpoint>>>>>,
    publish: Arc<watch::Sender<Vec<ReplicaEndpoint>>>,
}

impl Endpoints {
    fn republish(&self) {
        let all = self
            .pools
            .lock()
            .expect("endpoints lock")
            .values()
            .flat_map(|p| p.borrow().clone())
            .collect();
        self.publish.send_replace(all);
    }

    fn add(
        &self,
        instance: u64,
        mut pool: watch::Receiver<Vec<ReplicaEndpoint>>,
        stop: CancellationToken,
    ) {
        self.pools
            .lock()
            .expect("endpoints lock")
            .insert(instance, pool.clone());
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                this.republish();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = pool.changed() => if changed.is_err() { return },
                }
            }
        });
    }

    fn remove(&self, instance: u64) {
        self.pools.lock().expect("endpoints lock").remove(&instance);
        self.republish();
    }
}

pub struct Fleet {
    parts: Arc<FleetParts>,
    pools: BTreeMap<String, Pool>,
    next_instance: u64,
    endpoints: Endpoints,
    catalog: watch::Sender<Vec<CatalogModel>>,
    loads: watch::Receiver<Loads>,
    drains: mpsc::Sender<DrainRequest>,
    notices: Arc<Mutex<BTreeMap<u64, mpsc::Sender<PreemptNotice>>>>,
    /// Cancelled when `strata serve` stops: every pool stops with it.
    stop: CancellationToken,
    wake: Arc<Notify>,
    leaving: Vec<JoinHandle<()>>,
    /// Models whose pool could not start: the entry's version, and when.
    failed: BTreeMap<String, (String, std::time::Instant)>,
    /// The catalog's aliases (no pool of their own).
    aliases: Vec<CatalogModel>,
}

/// What the gateway gets of the fleet.
pub struct FleetLinks {
    pub endpoints: watch::Receiver<Vec<ReplicaEndpoint>>,
    pub catalog: watch::Receiver<Vec<CatalogModel>>,
    pub load: watch::Sender<Loads>,
    pub host: Arc<dyn ModelHost>,
}

impl Fleet {
    /// A fleet with no pool yet; `link` is the controllers' end of the
    /// gateway link (drains to the gateway, preemption notices from it).
    pub fn new(
        parts: FleetParts,
        link: ControllerLink,
        stop: CancellationToken,
    ) -> (Fleet, FleetLinks) {
        let (publish, endpoints) = watch::channel(Vec::new());
        let (catalog, catalog_rx) = watch::channel(Vec::new());
        let (load, loads) = watch::channel(Loads::default());
        let notices = Arc::new(Mutex::new(BTreeMap::new()));
        tokio::spawn(fan_out(link.notices, notices.clone()));
        let wake = Arc::new(Notify::new());
        let parts = Arc::new(parts);
        let host = Arc::new(Host {
            parts: parts.clone(),
            wake: wake.clone(),
        });
        let fleet = Fleet {
            parts,
            pools: BTreeMap::new(),
            next_instance: 0,
            endpoints: Endpoints {
                pools: Default::default(),
                publish: Arc::new(publish),
            },
            catalog,
            loads,
            drains: link.drains,
            notices,
            stop,
            wake,
            leaving: Vec::new(),
            failed: BTreeMap::new(),
            aliases: Vec::new(),
        };
        let links = FleetLinks {
            endpoints,
            catalog: catalog_rx,
            load,
            host,
        };
        (fleet, links)
    }

    /// Follows the stored catalog until `strata serve` stops, then waits
    /// for every pool to stop.
    pub async fn run(mut self) -> Result<()> {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(LOOK_EVERY) => {}
            }
            if let Err(e) = self.sync().await {
                tracing::warn!(error = %format!("{e:#}"), "cannot follow the model catalog");
            }
        }
        for (_, pool) in std::mem::take(&mut self.pools) {
            pool.task.await.context("a pool's task panicked")??;
        }
        for task in self.leaving.drain(..) {
            let _ = task.await;
        }
        Ok(())
    }

    /// The models to serve now, the config file's then the stored ones,
    /// and the aliases for them.
    async fn desired(&self) -> Result<Desired> {
        desired(&self.parts.config, &self.parts.store.models().await?)
    }

    /// The first start: every pool of the catalog; a model of the config
    /// file that cannot start stops `strata serve` with its reason (a
    /// deployed one is logged and tried again later, as at run time). On
    /// Kubernetes, the engines of models that left the catalog while no
    /// controller acted are removed.
    pub async fn start(&mut self) -> Result<()> {
        let desired = self.desired().await?;
        let keep: Vec<String> = desired.0.iter().map(|(m, v)| kube_pool(m, v)).collect();
        let keys = external_keys(&desired);
        self.apply(desired, true).await?;
        if let Launcher::Kube(client) = &self.parts.launcher {
            // Tried again by the next leader; serving goes on meanwhile.
            if let Err(e) =
                strata_k8s::provider::remove_other_pools(client.clone(), &self.parts.config, &keep)
                    .await
            {
                tracing::warn!(error = %e, "cannot remove the engines of undeployed models");
            }
            self.prune_keys(client, &keys).await;
        }
        Ok(())
    }

    /// Removes the API keys of `openai` models no longer deployed (tried
    /// again at the next change of the catalog or the next leader's start).
    async fn prune_keys(&self, client: &strata_k8s::Client, keep: &[String]) {
        let config = &self.parts.config;
        match strata_k8s::provider::prune_engine_keys(client.clone(), config, keep).await {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(entries = ?gone, "removed the API keys of undeployed models")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove the API keys of undeployed models"),
        }
    }

    /// Starts, replaces and stops pools until they match the catalog.
    async fn sync(&mut self) -> Result<()> {
        let desired = self.desired().await?;
        let keys = external_keys(&desired);
        let before: Vec<String> = self.pools.keys().cloned().collect();
        self.apply(desired, false).await?;
        let undeployed = before.iter().any(|id| !self.pools.contains_key(id));
        if let (Launcher::Kube(client), true) = (&self.parts.launcher, undeployed) {
            self.prune_keys(client, &keys).await;
        }
        Ok(())
    }

    async fn apply(&mut self, (desired, aliases): Desired, strict: bool) -> Result<()> {
        self.aliases = aliases;
        // Engines of every pool share the cores.
        let mut processes = 0;
        for (model, _) in &desired {
            processes += self.pool_size(model)?.1;
        }
        let ids: Vec<String> = desired
            .iter()
            .map(|(m, _)| pool_id(&self.parts.flags, m))
            .collect();
        let gone: Vec<String> = self
            .pools
            .keys()
            .filter(|k| !ids.contains(k))
            .cloned()
            .collect();
        for id in gone {
            let pool = self.pools.remove(&id).expect("a running pool");
            tracing::info!(model = %id, "model undeployed: draining its pool");
            self.publish_catalog();
            self.retire(pool);
        }
        for ((model, version), id) in desired.into_iter().zip(ids) {
            if self.pools.get(&id).is_some_and(|p| p.version == version) {
                continue;
            }
            // One that failed is tried again a while later, not every look.
            if self
                .failed
                .get(&id)
                .is_some_and(|(v, at)| *v == version && at.elapsed() < RETRY_AFTER)
            {
                continue;
            }
            // Files are found, hashed or downloaded off the async threads
            // (on Kubernetes, by each engine Pod).
            let resolved = match &self.parts.launcher {
                Launcher::Local(_) => {
                    let model = model.clone();
                    tokio::task::spawn_blocking(move || resolve_source(&model))
                        .await
                        .context("resolving a model's file panicked")?
                }
                Launcher::Kube(_) => Ok(model.config.clone()),
            };
            let started = resolved
                .and_then(|config| self.start_pool(&model, config, version.clone(), processes));
            match started {
                Ok(pool) => {
                    tracing::info!(model = %id, "pool started");
                    self.failed.remove(&id);
                    if let Some(old) = self.pools.insert(id, pool) {
                        self.retire(old);
                    }
                }
                Err(e) if strict && version == "config" => {
                    return Err(e.context(format!("cannot start the pool of model `{id}`")))
                }
                // The version before (if any) keeps serving.
                Err(e) => {
                    tracing::error!(model = %id, error = %format!("{e:#}"), "cannot start the model's pool; trying again in a minute");
                    self.failed.insert(id, (version, std::time::Instant::now()));
                }
            }
        }
        self.publish_catalog();
        Ok(())
    }

    fn publish_catalog(&self) {
        let pools = self.pools.values().map(|p| p.catalog.clone());
        self.catalog
            .send_replace(pools.chain(self.aliases.iter().cloned()).collect());
    }

    /// The replicas a pool keeps to start with, and the engine processes it
    /// may run at once.
    fn pool_size(&self, model: &ServedModel) -> Result<(u32, u32)> {
        let replicas = match self
            .parts
            .replicas
            .filter(|_| is_default(&self.parts.config, model))
        {
            Some(r) => r,
            None => model.config.serve.replicas,
        };
        pool_processes(&model.config, replicas).with_context(|| model_context(model.id.as_deref()))
    }

    /// Starts `model`'s pool on `config` (its own, its file found).
    fn start_pool(
        &mut self,
        model: &ServedModel,
        config: Config,
        version: String,
        processes: u32,
    ) -> Result<Pool> {
        let parts = self.parts.clone();
        let (replicas, _) = self.pool_size(model)?;
        let no_flags = EngineFlags::default();
        let flags = if is_default(&parts.config, model) {
            &parts.flags
        } else {
            &no_flags
        };
        let instance = self.next_instance;
        let stop = self.stop.child_token();
        let retiring = CancellationToken::new();
        // The one model of a file without `[[models]]` has the whole load
        // (a cluster's gateways may not know its id).
        let load = || model_load(self.loads.clone(), model.id.clone(), stop.clone());
        let (catalog, endpoints, task) = match &parts.launcher {
            Launcher::Local(trust) => {
                let mut settings = local_launch(
                    &config,
                    &parts.config_path,
                    flags,
                    processes,
                    trust,
                    model.id.as_deref(),
                )
                .with_context(|| model_context(model.id.as_deref()))?;
                settings.drain_via_store = parts.in_cluster;
                if let (true, Some(x)) = (parts.in_cluster, settings.external.as_mut()) {
                    // The cluster's gateways derive the same key.
                    x.engine.api_key = cluster_engine_key(&settings.pool)
                        .with_context(|| model_context(model.id.as_deref()))?;
                }
                let (publish, endpoints) = watch::channel(Vec::new());
                let (notice_tx, notice_rx) = mpsc::channel(64);
                self.notices
                    .lock()
                    .expect("notices lock")
                    .insert(instance, notice_tx);
                let catalog =
                    CatalogModel::model(settings.model.clone(), config.engine.default_max_tokens)
                        .for_tenant(model.tenant.clone());
                let pool_name = settings.pool.clone();
                let provider = LocalProvider::new(
                    settings,
                    parts.store.clone(),
                    publish,
                    trust.health.clone(),
                    ControllerLink {
                        drains: self.drains.clone(),
                        notices: notice_rx,
                    },
                );
                let task = self.run_pool(pool_name, &config, replicas, provider, load(), &stop);
                (catalog, endpoints, task)
            }
            Launcher::Kube(client) => {
                let pool = pool_model(model, &version, flags, &config.kubernetes)?;
                let catalog =
                    CatalogModel::model(pool.name.clone(), config.engine.default_max_tokens)
                        .for_tenant(model.tenant.clone());
                let pool_name = pool.pool.clone();
                let key = match &pool.external {
                    Some(server) => Some(cluster_engine_key(&server.key_of)?),
                    None => None,
                };
                let mut provider = KubeProvider::new(
                    client.clone(),
                    Arc::new(config.clone()),
                    pool,
                    parts.store.clone(),
                )
                .retiring(retiring.clone());
                if let Some(key) = key {
                    provider = provider.with_engine_key(key);
                }
                // Gateways find the replicas in the store.
                let (_, endpoints) = watch::channel(Vec::new());
                let task = self.run_pool(pool_name, &config, replicas, provider, load(), &stop);
                (catalog, endpoints, task)
            }
        };
        self.next_instance += 1;
        self.endpoints
            .add(instance, endpoints.clone(), stop.clone());
        Ok(Pool {
            version,
            instance,
            catalog,
            stop,
            retiring,
            task,
            endpoints,
        })
    }

    /// The controller of one pool: it keeps the pool's replicas,
    /// `serve.replicas` of them, or with `pool.autoscale` as many as its
    /// model's load needs (from zero with `scale_to_zero_after_secs`).
    /// While none takes requests, requests wait for one.
    fn run_pool<P: strata_control::provider::Provider + 'static>(
        &self,
        name: String,
        config: &Config,
        replicas: u32,
        provider: P,
        load: watch::Receiver<Load>,
        stop: &CancellationToken,
    ) -> JoinHandle<Result<(), strata_control::ControlError>> {
        let controller = Controller::new(PoolSpec {
            name,
            ..PoolSpec::from_config(config, replicas)
        });
        tokio::spawn(strata_control::controller::run(
            controller,
            provider,
            load,
            self.parts.store.clone(),
            Some(self.parts.metrics.clone()),
            stop.clone(),
        ))
    }

    /// Lets a pool go in the background: the gateway drains its replicas
    /// (their sessions kept), then its controller stops them.
    fn retire(&mut self, pool: Pool) {
        let drains = self.drains.clone();
        let endpoints = self.endpoints.clone();
        let notices = self.notices.clone();
        self.leaving.retain(|t| !t.is_finished());
        self.leaving.push(tokio::spawn(async move {
            let replicas: Vec<String> = pool.endpoints.borrow().iter().map(|e| e.id.clone()).collect();
            let mut done = Vec::new();
            for replica in replicas {
                let (tx, rx) = oneshot::channel();
                let asked = drains
                    .send(DrainRequest {
                        replica,
                        wait: DRAIN_WAIT,
                        done: tx,
                    })
                    .await;
                if asked.is_ok() {
                    done.push(rx);
                }
            }
            for rx in done {
                let _ = rx.await;
            }
            pool.retiring.cancel();
            pool.stop.cancel();
            match pool.task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(model = %pool.catalog.id, error = %e, "a leaving pool's controller failed"),
                Err(e) => tracing::warn!(model = %pool.catalog.id, error = %e, "a leaving pool's task panicked"),
            }
            notices.lock().expect("notices lock").remove(&pool.instance);
            endpoints.remove(pool.instance);
            tracing::info!(model = %pool.catalog.id, "pool stopped");
        }));
    }
}

/// The catalog to serve: each model with its entry's version (`config`
/// for the file's), and the aliases for them.
pub type Desired = (Vec<(ServedModel, String)>, Vec<CatalogModel>);

/// What strata relies on of `model`'s engine, and where it degrades (for
/// `strata status`).
pub fn engine_report(model: &ServedModel) -> serde_json::Value {
    let e = &model.config.engine;
    let (prefix_cache, snapshots, cut_answers) = match e.kind {
        EngineKind::Strata => ("per tenant", "kept", "continued"),
        EngineKind::Openai => (
            if e.capabilities.shared_prefix_cache {
                "shared: one tenant"
            } else {
                "off"
            },
            "none: prefilled again",
            if e.capabilities.continue_final_message {
                "continued"
            } else {
                "error event"
            },
        ),
    };
    // How a replica knows the gateway.
    let gateway = match (e.kind, model.config.serve.replica_mtls) {
        (EngineKind::Strata, true) => "mutual TLS",
        (EngineKind::Strata, false) => "replica token",
        (EngineKind::Openai, _) => "API key, plain HTTP",
    };
    serde_json::json!({
        "model": pool_id(&EngineFlags::default(), model),
        "kind": e.kind.as_str(),
        "prefix_cache": prefix_cache,
        "snapshots": snapshots,
        "cut_answers": cut_answers,
        "gateway": gateway,
        "tenant": model.tenant.as_deref().unwrap_or("any"),
    })
}

/// The config file's models, then the `stored` ones, and the aliases of
/// both; a stored entry that does not parse or is not valid with this
/// config is logged and left out.
pub fn desired(config: &Config, stored: &[DeployedModel]) -> Result<Desired> {
    let mut served: Vec<(ServedModel, String)> = config
        .served()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .into_iter()
        .map(|m| (m, "config".to_owned()))
        .collect();
    let mut aliases: Vec<CatalogModel> = config
        .aliases()
        .into_iter()
        .map(|(id, alias)| CatalogModel::alias(id, alias))
        .collect();
    for stored in stored {
        let entry: ModelEntry = match serde_json::from_str(&stored.spec) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(model = %stored.id, error = %e, "a stored model does not parse; not served");
                continue;
            }
        };
        if entry.is_alias() {
            aliases.push(CatalogModel::alias(entry.id, entry.alias));
            continue;
        }
        match config.served_entry(&entry) {
            Ok(m) => served.push((m, stored.spec.clone())),
            Err(e) => {
                tracing::warn!(model = %stored.id, error = %e, "a stored model is not valid here; not served")
            }
        }
    }
    Ok((served, aliases))
}

/// The catalog a cluster's gateway serves, as the acting controller's
/// pools do (from the same config file and database), and how it reaches
/// the engines of kind `openai`, by model.
fn cluster_catalog(config: &Config, stored: &[DeployedModel]) -> Result<ClusterCatalog> {
    let (served, aliases) = desired(config, stored)?;
    let flags = EngineFlags::default();
    let mut engines = BTreeMap::new();
    for (m, _) in &served {
        let e = &m.config.engine;
        if e.kind != EngineKind::Openai {
            continue;
        }
        // As the controller's pools derive it, locally and on Kubernetes.
        let pool = key_of(m);
        // No key: requests fail (401), and nothing of strata's own
        // credentials goes to the other server (logged when published).
        let api_key = cluster_engine_key(pool).unwrap_or_default();
        let engine = strata_core::ExternalEngine {
            api_key,
            ready_path: e.ready_path.clone(),
            continues: e.capabilities.continue_final_message,
            batch_priority: e.capabilities.batch_priority,
        };
        engines.insert(pool_id(&flags, m), engine);
    }
    let catalog = served
        .iter()
        .map(|(m, _)| {
            CatalogModel::model(pool_id(&flags, m), m.config.engine.default_max_tokens)
                .for_tenant(m.tenant.clone())
        })
        .chain(aliases)
        .collect();
    Ok((catalog, engines))
}

/// A cluster's catalog, and its `openai` engines by model.
type ClusterCatalog = (Vec<CatalogModel>, Engines);

/// How a cluster's gateways reach the `openai` engines, by model.
pub type Engines = BTreeMap<String, strata_core::ExternalEngine>;

/// The API key of `pool`'s `openai` engines in a cluster, from the
/// secret every controller and gateway of it shares.
fn cluster_engine_key(pool: &str) -> Result<String> {
    match std::env::var(strata_core::ENGINE_KEY_ENV) {
        Ok(secret) if !secret.is_empty() => Ok(strata_core::engine_api_key(&secret, pool)),
        _ => bail!(
            "engine kind `openai` in a cluster needs {}: one secret for every controller and gateway, \
             from which each pool's API key is derived",
            strata_core::ENGINE_KEY_ENV
        ),
    }
}

/// The endpoints a cluster's gateway routes to: those the store records,
/// each of a model with an `openai` engine marked so (its key, readiness
/// path), kept current until `stop`.
pub fn with_engines(
    mut recorded: watch::Receiver<Vec<ReplicaEndpoint>>,
    mut engines: watch::Receiver<Engines>,
    stop: CancellationToken,
) -> watch::Receiver<Vec<ReplicaEndpoint>> {
    let (publish, endpoints) = watch::channel(Vec::new());
    tokio::spawn(async move {
        loop {
            let marked: Vec<ReplicaEndpoint> = {
                let engines = engines.borrow_and_update();
                recorded
                    .borrow_and_update()
                    .iter()
                    .map(|e| ReplicaEndpoint {
                        external: e.model.as_ref().and_then(|m| engines.get(m)).cloned(),
                        ..e.clone()
                    })
                    .collect()
            };
            publish.send_if_modified(|now| {
                let changed = *now != marked;
                *now = marked;
                changed
            });
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = recorded.changed() => if changed.is_err() { return },
                changed = engines.changed() => if changed.is_err() { return },
            }
        }
    });
    endpoints
}

/// A cluster's gateway: the catalog as the database holds it (read every
/// `LOOK_EVERY`, and at once after this gateway's admin API changed it),
/// and the admin API's host, which checks an entry's settings here and
/// leaves its file to the acting controller (which logs a file it cannot
/// serve and tries again later).
pub fn follow_cluster_catalog(
    store: Arc<dyn Store>,
    config: &Config,
    stop: &CancellationToken,
) -> (
    watch::Receiver<Vec<CatalogModel>>,
    watch::Receiver<Engines>,
    Arc<dyn ModelHost>,
) {
    let config = Arc::new(config.clone());
    let wake = Arc::new(Notify::new());
    let (publish, catalog) = watch::channel(Vec::new());
    let (publish_engines, engines) = watch::channel(BTreeMap::new());
    let (look, stop) = (wake.clone(), stop.clone());
    let file = config.clone();
    tokio::spawn(async move {
        loop {
            let read = async { cluster_catalog(&file, &store.models().await?) };
            match read.await {
                Ok((now, external)) => {
                    publish.send_if_modified(|c| {
                        let changed = *c != now;
                        *c = now;
                        changed
                    });
                    let keyless: Vec<String> = external
                        .iter()
                        .filter(|(_, e)| e.api_key.is_empty())
                        .map(|(model, _)| model.clone())
                        .collect();
                    let changed = publish_engines.send_if_modified(|e| {
                        let changed = *e != external;
                        *e = external;
                        changed
                    });
                    // Once per change of the catalog, not every look.
                    for model in keyless.iter().filter(|_| changed) {
                        tracing::error!(
                            %model,
                            "its replicas cannot be reached: engine kind `openai` in a cluster needs {} on every gateway",
                            strata_core::ENGINE_KEY_ENV
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the model catalog")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = look.notified() => {}
                _ = tokio::time::sleep(LOOK_EVERY) => {}
            }
        }
    });
    (catalog, engines, Arc::new(ClusterHost { config, wake }))
}

/// The admin API's host on a cluster's gateway.
struct ClusterHost {
    config: Arc<Config>,
    wake: Arc<Notify>,
}

#[async_trait]
impl ModelHost for ClusterHost {
    fn declared(&self) -> Vec<String> {
        declared(&self.config, &EngineFlags::default())
    }

    async fn check(&self, entry: &ModelEntry) -> Result<(), String> {
        let served = check_entry(&self.config, entry)?;
        if served.config.engine.kind == EngineKind::Openai {
            cluster_engine_key(key_of(&served)).map_err(|e| format!("{e:#}"))?;
        }
        if let Some(source) = entry.source.as_deref() {
            builtin(source).map_err(|e| format!("{e:#}"))?;
        }
        Ok(())
    }

    fn changed(&self) {
        self.wake.notify_one();
    }
}

/// The config file's model ids (pools and aliases), which the admin API
/// lists but does not change.
fn declared(config: &Config, flags: &EngineFlags) -> Vec<String> {
    match config.served() {
        Ok(models) => models
            .iter()
            .map(|m| pool_id(flags, m))
            .chain(config.aliases().into_iter().map(|(id, _)| id))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// What is wrong with `entry`'s settings as one more model of `config`'s
/// catalog, if anything.
fn check_entry(config: &Config, entry: &ModelEntry) -> Result<ServedModel, String> {
    if let Some(issue) = strata_core::config::deployed_engine_issue(entry) {
        return Err(issue.to_string());
    }
    if let Some(issue) = config.entry_issues(entry).into_iter().next() {
        return Err(issue.to_string());
    }
    // Before anything is fetched or opened.
    if let Some(issue) = config.deploy_source_issue(entry) {
        return Err(issue);
    }
    config.served_entry(entry).map_err(|e| e.to_string())
}

/// The model that `--replicas` and the engine flags are for: the config's
/// first (or only) one.
fn is_default(config: &Config, model: &ServedModel) -> bool {
    match (&model.id, config.models.first()) {
        (None, _) => true,
        (Some(id), Some(first)) => *id == first.id,
        (Some(_), None) => false,
    }
}

/// The key of a model's pool: its id (for the one model of `[engine]`,
/// the model name its engines report).
fn pool_id(flags: &EngineFlags, model: &ServedModel) -> String {
    match &model.id {
        Some(id) => id.clone(),
        None => crate::launch::engine_settings(&model.config, flags, 1).model_name,
    }
}

/// What the API keys of the `openai` models among `desired` derive from.
fn external_keys((desired, _): &Desired) -> Vec<String> {
    desired
        .iter()
        .filter(|(m, _)| m.config.engine.kind == EngineKind::Openai)
        .map(|(m, _)| key_of(m).to_owned())
        .collect()
}

/// What the gateways and the engines of `model`'s `openai` pool derive its
/// API key from: its id (`default` for the one model of `[engine]`).
fn key_of(model: &ServedModel) -> &str {
    model.id.as_deref().unwrap_or("default")
}

/// The server of `model`'s engine Pods where its kind is `openai`: its
/// image and command, `{threads}` as the Pod's CPU request rounds up to
/// (or `engine.threads`).
fn external_server(model: &ServedModel, k: &KubernetesConfig) -> Result<Option<ExternalServer>> {
    let e = &model.config.engine;
    if e.kind != EngineKind::Openai {
        return Ok(None);
    }
    let Some(image) = e.image.clone() else {
        bail!(
            "{}: engine kind `openai` on Kubernetes needs engine.image, the container image holding its server",
            model_context(model.id.as_deref())
        );
    };
    let threads = match e.threads {
        0 => cpu_cores(&k.engine_cpu),
        n => n,
    };
    Ok(Some(ExternalServer {
        image,
        command: e.command.clone(),
        env: e.env.clone().into_iter().collect(),
        threads,
        key_of: key_of(model).to_owned(),
    }))
}

/// Whole cores of a Kubernetes CPU quantity (`2`, `1.5`, `500m`), at
/// least one.
fn cpu_cores(quantity: &str) -> u32 {
    let q = quantity.trim();
    let cores = match q.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().map(|m| m / 1000.0),
        None => q.parse::<f64>(),
    };
    cores.map_or(1, |c| c.ceil().max(1.0) as u32)
}

/// The name of `model`'s pool on Kubernetes (its Deployments' pool
/// label): `default` for the one model of `[engine]`, a model's id for
/// the config file's, and for a deployed one its id and its entry's
/// version, so a changed entry's new pool starts beside the old one, which
/// drains and deletes its own Deployments.
fn kube_pool(model: &ServedModel, version: &str) -> String {
    use sha2::{Digest, Sha256};
    match (&model.id, version) {
        (None, _) => "default".into(),
        (Some(id), "config") => id.clone(),
        (Some(id), spec) => {
            let digest = Sha256::digest(spec.as_bytes());
            let short: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
            format!("{id}-{short}")
        }
    }
}

/// What `model`'s engine Pods serve on Kubernetes: its id, its own
/// `[engine]` section and where its file comes from (the Pods fetch and
/// check it). The one model of `[engine]` is the built-in default model,
/// as it has always been there.
pub fn pool_model(
    model: &ServedModel,
    version: &str,
    flags: &EngineFlags,
    k: &KubernetesConfig,
) -> Result<PoolModel> {
    let external = external_server(model, k)?;
    let id = model.id.as_deref().unwrap_or_default();
    let builtin_file = |source: &str| -> Result<ModelFile> {
        let b = builtin_for(model, source)?;
        Ok(ModelFile::Builtin {
            name: source.to_owned(),
            file_name: b.file_name,
            sha256: b.sha256,
        })
    };
    let on_volume = |path: &Path, sha256: Option<String>| ModelFile::Path {
        path: path.display().to_string(),
        sha256,
    };
    let file = match (&model.id, &model.url, &model.source) {
        // `engine.model` names a file (or, for another server, a
        // directory) on the model volume.
        (None, _, _) => match &model.config.engine.model {
            Some(path) => on_volume(path, None),
            None => builtin_file(&ModelSource::builtin_ids()[0])?,
        },
        (Some(_), Some(url), _) => ModelFile::Url {
            url: url.clone(),
            sha256: model
                .sha256
                .clone()
                .with_context(|| format!("model `{id}`: a `url` needs its `sha256`"))?,
        },
        (Some(_), None, Some(source)) => builtin_file(source)?,
        (Some(_), None, None) => on_volume(
            model
                .config
                .engine
                .model
                .as_ref()
                .with_context(|| format!("model `{id}` names no file"))?,
            model.sha256.clone(),
        ),
    };
    let engine = match (&model.id, &external) {
        (Some(_), None) => {
            Some(serde_json::to_string(&model.config.engine).context("the engine section")?)
        }
        _ => None,
    };
    let pool = PoolModel {
        pool: kube_pool(model, version),
        name: pool_id(flags, model),
        file,
        engine,
        external,
    };
    if let Some(issue) = pool.issue(k) {
        bail!(issue);
    }
    Ok(pool)
}

/// `model`'s share of the gateway's load (`None`: the whole of it), for
/// a pool's controller, kept current until `stop`.
pub fn model_load(
    mut all: watch::Receiver<Loads>,
    model: Option<String>,
    stop: CancellationToken,
) -> watch::Receiver<Load> {
    let (tx, rx) = watch::channel(all.borrow().of(model.as_deref()));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = all.changed() => if changed.is_err() { return },
            }
            let load = all.borrow_and_update().of(model.as_deref());
            tx.send_replace(load);
        }
    });
    rx
}

/// Each preemption notice to every pool's provider (only the one running
/// that replica acts on it).
async fn fan_out(
    mut notices: mpsc::Receiver<PreemptNotice>,
    to: Arc<Mutex<BTreeMap<u64, mpsc::Sender<PreemptNotice>>>>,
) {
    while let Some(notice) = notices.recv().await {
        let pools: Vec<_> = to.lock().expect("notices lock").values().cloned().collect();
        for pool in pools {
            let _ = pool.send(notice.clone()).await;
        }
    }
}

/// Checks models deployed through the admin API, and nudges the fleet.
struct Host {
    parts: Arc<FleetParts>,
    wake: Arc<Notify>,
}

#[async_trait]
impl ModelHost for Host {
    fn declared(&self) -> Vec<String> {
        declared(&self.parts.config, &self.parts.flags)
    }

    async fn check(&self, entry: &ModelEntry) -> Result<(), String> {
        let served = check_entry(&self.parts.config, entry)?;
        tokio::task::spawn_blocking(move || resolve_source(&served).map(|_| ()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{e:#}"))
    }

    fn changed(&self) {
        self.wake.notify_one();
    }
}

/// The built-in model `source` names.
fn builtin(source: &str) -> Result<ModelSource> {
    ModelSource::named(source).with_context(|| {
        format!(
            "source `{source}` is not a built-in model ({})",
            ModelSource::builtin_ids().join(", ")
        )
    })
}

/// The built-in model `source` names, for `model`, whose entry's `sha256`
/// (where it gives one) must be that model's.
fn builtin_for(model: &ServedModel, source: &str) -> Result<ModelSource> {
    let found = builtin(source).with_context(|| model_context(model.id.as_deref()))?;
    if model
        .sha256
        .as_ref()
        .is_some_and(|h| !h.eq_ignore_ascii_case(&found.sha256))
    {
        bail!(
            "{}: sha256 does not match the built-in source `{source}` ({})",
            model_context(model.id.as_deref()),
            found.sha256
        );
    }
    Ok(found)
}

/// The served model's configuration with its file's place: a built-in
/// source where `strata model fetch --model` puts it, a `url`'s download
/// (cached by hash), or its `path`, checked against its `sha256` when it
/// names one. Blocks: call it off the async threads.
pub fn resolve_source(model: &ServedModel) -> Result<Config> {
    let mut config = model.config.clone();
    let id = model.id.as_deref().unwrap_or_default();
    if let Some(url) = &model.url {
        let sha256 = model
            .sha256
            .as_deref()
            .context("a `url` needs its `sha256`")?;
        let runtime = tokio::runtime::Handle::current();
        let mut logged = -1.0;
        let mut progress = |p: strata_models::fetch::Progress| {
            if p.done - logged >= 0.1 || p.done >= 1.0 {
                logged = p.done;
                tracing::info!(model = %id, stage = p.stage, done = format!("{:.0}%", p.done * 100.0), "model download");
            }
        };
        let (path, _) = runtime
            .block_on(strata_models::remote::fetch_url(url, sha256, &mut progress))
            .map_err(|e| anyhow::anyhow!("model `{id}`: {e}"))?;
        config.engine.model = Some(path);
    } else if let Some(source) = &model.source {
        let builtin = builtin_for(model, source)?;
        let path = strata_models::fetch::default_model_path(&builtin.file_name);
        if !path.is_file() {
            bail!(
                "model `{id}`: {} does not exist; run `strata model fetch --model {source}`",
                path.display()
            );
        }
        config.engine.model = Some(path);
    } else if let Some(path) = &config.engine.model {
        if !path.is_file() {
            bail!("model `{id}`: {} is not a file", path.display());
        }
        if let Some(expected) = &model.sha256 {
            check_sha256(id, path, expected)?;
        }
    }
    Ok(config)
}

fn check_sha256(id: &str, path: &Path, expected: &str) -> Result<()> {
    let actual = strata_models::fetch::sha256_file(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !actual.eq_ignore_ascii_case(expected) {
        bail!(
            "model `{id}`: {} has sha256 {actual}, not the {expected} its entry names; not serving it",
            path.display()
        );
    }
    Ok(())
}

pub fn model_context(id: Option<&str>) -> String {
    match id {
        Some(id) => format!("model `{id}`"),
        None => "the model of [engine]".into(),
    }
}

/// strata-k8s's fake Kubernetes API server (no API server runs here).
#[cfg(test)]
#[path = "../../strata-k8s/tests/fake_api/mod.rs"]
mod fake_api;

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(text: &str) -> Config {
        Config::from_toml(text).unwrap()
    }

    fn stored(id: &str, spec: &str) -> DeployedModel {
        DeployedModel {
            id: id.into(),
            spec: spec.into(),
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn on_kubernetes_each_model_has_a_pool_with_its_own_file_and_a_new_one_per_version() {
        let sha = "ab".repeat(32);
        let config = catalog(&format!(
            r#"
[[models]]
id = "chat"
source = "SmolLM2-135M-Instruct.Q4_1"
[models.engine]
context_size = 2048
[[models]]
id = "code"
url = "https://models.example/code.gguf"
sha256 = "{sha}"
"#
        ));
        let deployed = stored(
            "mine",
            r#"{"id":"mine","url":"s3://bucket/mine.gguf","sha256":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"}"#,
        );
        let (served, _) = desired(&config, std::slice::from_ref(&deployed)).unwrap();
        let k = &config.kubernetes;
        let flags = EngineFlags::default();
        let pools: Vec<PoolModel> = served
            .iter()
            .map(|(m, v)| pool_model(m, v, &flags, k).unwrap())
            .collect();
        let chat = &pools[0];
        assert_eq!((chat.pool.as_str(), chat.name.as_str()), ("chat", "chat"));
        assert!(
            matches!(&chat.file, ModelFile::Builtin { name, .. } if name == "SmolLM2-135M-Instruct.Q4_1")
        );
        let engine: serde_json::Value =
            serde_json::from_str(chat.engine.as_ref().unwrap()).unwrap();
        assert_eq!(engine["context_size"], 2048);
        assert_eq!(
            pools[1].file,
            ModelFile::Url {
                url: "https://models.example/code.gguf".into(),
                sha256: sha.clone()
            }
        );
        // A deployed model's pool is named by its entry's version too: a
        // changed entry's pool starts beside the old one, apart from it.
        let mine = &pools[2];
        assert_eq!(mine.name, "mine");
        assert!(
            mine.pool.starts_with("mine-") && mine.pool.len() == "mine-".len() + 8,
            "{}",
            mine.pool
        );
        let changed = stored(
            "mine",
            &deployed
                .spec
                .replace(r#""id":"mine","#, r#""id":"mine","replicas":2,"#),
        );
        let (again, _) = desired(&config, &[changed]).unwrap();
        let next = pool_model(&again[2].0, &again[2].1, &flags, k).unwrap();
        assert_ne!(next.pool, mine.pool);
        let (same, _) = desired(&config, &[deployed]).unwrap();
        assert_eq!(
            pool_model(&same[2].0, &same[2].1, &flags, k).unwrap().pool,
            mine.pool
        );
        // The one model of [engine] keeps the pool name it always had.
        let plain = Config::default();
        let (served, _) = desired(&plain, &[]).unwrap();
        let one = pool_model(&served[0].0, &served[0].1, &flags, &plain.kubernetes).unwrap();
        assert_eq!(
            (one.pool.as_str(), one.name.as_str()),
            ("default", "gemma-3-270m-q4_k_m")
        );
        assert_eq!(one.engine, None);
    }

    #[test]
    fn a_model_its_engine_pods_could_not_get_is_refused_with_the_reason() {
        let flags = EngineFlags::default();
        let config = catalog("[[models]]\nid = \"mine\"\npath = \"/models/mine.gguf\"\n");
        let (served, _) = desired(&config, &[]).unwrap();
        let err = pool_model(&served[0].0, "config", &flags, &config.kubernetes).unwrap_err();
        assert!(
            format!("{err:#}").contains("kubernetes.model_pvc"),
            "{err:#}"
        );
        let mut with_volume = config.clone();
        with_volume.kubernetes.model_pvc = Some("models".into());
        let pool = pool_model(&served[0].0, "config", &flags, &with_volume.kubernetes).unwrap();
        assert_eq!(
            pool.file,
            ModelFile::Path {
                path: "/models/mine.gguf".into(),
                sha256: None
            }
        );
        let wrong = catalog(&format!(
            "[[models]]\nid = \"chat\"\nsource = \"SmolLM2-135M-Instruct.Q4_1\"\nsha256 = \"{}\"\n",
            "00".repeat(32)
        ));
        let (served, _) = desired(&wrong, &[]).unwrap();
        let err = pool_model(&served[0].0, "config", &flags, &wrong.kubernetes).unwrap_err();
        assert!(format!("{err:#}").contains("does not match"), "{err:#}");
    }

    /// Each pool's Deployments' replicas, by pool label.
    fn pools(cluster: &fake_api::Shared) -> BTreeMap<String, u64> {
        let mut pools = BTreeMap::new();
        for d in cluster.lock().unwrap().deployments.values() {
            let pool = d["metadata"]["labels"]["strata.dev/pool"].as_str().unwrap();
            *pools.entry(pool.to_owned()).or_default() += d["spec"]["replicas"].as_u64().unwrap();
        }
        pools
    }

    async fn until(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "waited 20 s for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kube_fleet(
        cluster: &fake_api::Shared,
        config: &Config,
        store: &Arc<dyn Store>,
        stop: &CancellationToken,
    ) -> (Fleet, FleetLinks) {
        // As in a cluster's controller: no gateway in this process.
        let (_, link) = strata_core::link::link();
        Fleet::new(
            FleetParts {
                config: config.clone(),
                config_path: PathBuf::from("/nonexistent/strata.toml"),
                flags: EngineFlags::default(),
                replicas: None,
                launcher: Launcher::Kube(fake_api::client(cluster.clone())),
                store: store.clone(),
                metrics: Arc::new(ControllerMetrics::new()),
                in_cluster: true,
            },
            link,
            stop.clone(),
        )
    }

    #[tokio::test]
    async fn on_kubernetes_deployed_models_get_engines_of_their_own_and_take_them_when_they_go() {
        let cluster = fake_api::Cluster::shared();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            strata_store::SqlStore::open_without_vault(&dir.path().join("s.db"))
                .await
                .unwrap(),
        );
        let config = catalog(
            "[pool]\nautoscale = false\n[[models]]\nid = \"chat\"\nsource = \"SmolLM2-135M-Instruct.Q4_1\"\nreplicas = 1\n",
        );
        let stop = CancellationToken::new();
        let (mut fleet, links) = kube_fleet(&cluster, &config, &store, &stop);
        fleet.start().await.unwrap();
        let running = tokio::spawn(fleet.run());
        until("the config file's model's engines", || {
            pools(&cluster) == BTreeMap::from([("chat".into(), 1)])
        })
        .await;
        // Deployed through the admin API (as a gateway stores it).
        let spec = r#"{"id":"mine","source":"gemma-3-270m-q4_k_m"}"#;
        store.put_model(&stored("mine", spec)).await.unwrap();
        links.host.changed();
        until("the deployed model's engines", || {
            pools(&cluster).len() == 2
        })
        .await;
        let first = pools(&cluster)
            .into_keys()
            .find(|p| p.starts_with("mine-"))
            .expect("a pool of the deployed model's own");
        let args = cluster
            .lock()
            .unwrap()
            .deployments
            .values()
            .find(|d| d["metadata"]["labels"]["strata.dev/pool"] == first.as_str())
            .unwrap()["spec"]["template"]["spec"]["initContainers"][0]["args"]
            .to_string();
        assert!(
            args.contains(r#""--model","gemma-3-270m-q4_k_m""#),
            "{args}"
        );
        // Changed: a new pool, and the old one's engines go.
        let changed = r#"{"id":"mine","source":"gemma-3-270m-q4_k_m","replicas":2}"#;
        store.put_model(&stored("mine", changed)).await.unwrap();
        links.host.changed();
        until("the changed model's engines, and the old ones gone", || {
            let now = pools(&cluster);
            now.len() == 2 && !now.contains_key(&first) && now.values().sum::<u64>() == 3
        })
        .await;
        // Undeployed: its engines go.
        store.delete_model("mine").await.unwrap();
        links.host.changed();
        until("the undeployed model's engines gone", || {
            pools(&cluster) == BTreeMap::from([("chat".into(), 1)])
        })
        .await;
        // The controller stops (its lease lost): the engines keep serving.
        stop.cancel();
        running.await.unwrap().unwrap();
        assert_eq!(pools(&cluster), BTreeMap::from([("chat".into(), 1)]));
        // A model undeployed while no controller acted: the next leader
        // removes its engines and adopts the others.
        cluster.lock().unwrap().deployments.insert(
            "strata-engine-gone-local-any-od".into(),
            serde_json::json!({"metadata": {"name": "strata-engine-gone-local-any-od", "labels": {
                "app.kubernetes.io/managed-by": "strata", "app.kubernetes.io/component": "engine",
                "strata.dev/pool": "gone"}}, "spec": {"replicas": 1}}),
        );
        // The chat model's Pod runs, for the next leader to adopt.
        cluster.lock().unwrap().reconcile(true);
        let stop = CancellationToken::new();
        let (mut fleet, _links) = kube_fleet(&cluster, &config, &store, &stop);
        fleet.start().await.unwrap();
        let now = pools(&cluster);
        assert!(
            now.contains_key("chat") && !now.contains_key("gone"),
            "{now:?}"
        );
        stop.cancel();
        fleet.run().await.unwrap();
    }

    /// An `openai` model of the config file: a server image of its own.
    const SERVER: &str = r#"
[kubernetes]
engine_cpu = "1500m"
[[models]]
id = "team/chat"
source = "SmolLM2-135M-Instruct.Q4_1"
replicas = 1
[models.engine]
kind = "openai"
image = "registry.example/llama-server:b4000"
command = ["llama-server", "-m", "{model_path}", "--host", "{host}", "--port", "{port}",
           "-t", "{threads}", "--api-key", "{api_key}", "--no-cache-prompt"]
[models.engine.capabilities]
shared_prefix_cache = false
"#;

    #[test]
    fn on_kubernetes_an_openai_model_needs_its_image_and_gets_threads_from_its_cpu() {
        let flags = EngineFlags::default();
        let config = catalog(SERVER);
        let (served, _) = desired(&config, &[]).unwrap();
        let pool = pool_model(&served[0].0, "config", &flags, &config.kubernetes).unwrap();
        let server = pool.external.as_ref().expect("another server");
        assert_eq!(server.image, "registry.example/llama-server:b4000");
        assert_eq!((server.threads, server.key_of.as_str()), (2, "team/chat"));
        // Its own engine section is not given to a server that reads none.
        assert_eq!(pool.engine, None);
        let without =
            catalog(&SERVER.replace("image = \"registry.example/llama-server:b4000\"\n", ""));
        let (served, _) = desired(&without, &[]).unwrap();
        let err = pool_model(&served[0].0, "config", &flags, &without.kubernetes).unwrap_err();
        assert!(format!("{err:#}").contains("engine.image"), "{err:#}");
        assert_eq!(
            [
                cpu_cores("2"),
                cpu_cores("500m"),
                cpu_cores("2.5"),
                cpu_cores("x")
            ],
            [2, 1, 3, 1]
        );
        // The one model of `[engine]` naming its file: read from the model
        // volume (a vLLM directory, say), which it then needs.
        let one = catalog("[engine]\nmodel = \"/models/llama-3.1-8b\"\n");
        let (served, _) = desired(&one, &[]).unwrap();
        let err = pool_model(&served[0].0, "config", &flags, &one.kubernetes).unwrap_err();
        assert!(
            format!("{err:#}").contains("kubernetes.model_pvc"),
            "{err:#}"
        );
        let mut k = one.kubernetes.clone();
        k.model_pvc = Some("models".into());
        let pool = pool_model(&served[0].0, "config", &flags, &k).unwrap();
        assert_eq!(pool.file_in_pod(), "/models/llama-3.1-8b");
    }

    #[tokio::test]
    async fn on_kubernetes_an_openai_pool_gets_its_key_before_its_pods_and_stale_keys_go() {
        let secret = "fleet-test-engine-secret";
        std::env::set_var(strata_core::ENGINE_KEY_ENV, secret);
        let cluster = fake_api::Cluster::shared();
        cluster.lock().unwrap().add_engine_keys();
        // The key of a model undeployed while no controller acted.
        cluster
            .lock()
            .unwrap()
            .secrets
            .get_mut("strata-engine-keys")
            .unwrap()["data"] = serde_json::json!({"old": "b2xk"});
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            strata_store::SqlStore::open_without_vault(&dir.path().join("s.db"))
                .await
                .unwrap(),
        );
        let config = catalog(&format!("[pool]\nautoscale = false\n{SERVER}"));
        let stop = CancellationToken::new();
        let (mut fleet, _links) = kube_fleet(&cluster, &config, &store, &stop);
        fleet.start().await.unwrap();
        let running = tokio::spawn(fleet.run());
        until("the server's engines", || {
            pools(&cluster).values().sum::<u64>() == 1
        })
        .await;
        let entry = strata_k8s::render::key_entry("team/chat");
        let calls = cluster.lock().unwrap().take_calls();
        let wrote = calls
            .iter()
            .position(|c| c == &format!("patch secret strata-engine-keys +{entry}"))
            .unwrap_or_else(|| panic!("no key written: {calls:?}"));
        let applied = calls
            .iter()
            .position(|c| c.starts_with("apply ") && c.ends_with("replicas=1"))
            .unwrap();
        assert!(wrote < applied, "the key after the Pods: {calls:?}");
        assert!(
            calls
                .iter()
                .any(|c| c == "patch secret strata-engine-keys -old"),
            "{calls:?}"
        );
        assert!(
            !calls.iter().any(|c| c.starts_with("forbidden")),
            "{calls:?}"
        );
        // The entry holds the key the gateways derive, and the Deployment
        // only a reference to it.
        let (data, deployment) = {
            let c = cluster.lock().unwrap();
            (
                c.secrets["strata-engine-keys"]["data"].clone(),
                c.deployments.values().next().unwrap().clone(),
            )
        };
        let key = strata_core::engine_api_key(secret, "team/chat");
        let encoded: k8s_openapi::ByteString =
            serde_json::from_value(data[&entry].clone()).unwrap();
        assert_eq!(encoded.0, key.as_bytes());
        assert!(data.get("old").is_none(), "{data}");
        let spec = deployment.to_string();
        assert!(!spec.contains(&key) && !spec.contains(secret), "{spec}");
        let engine = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(engine["image"], "registry.example/llama-server:b4000");
        let command: Vec<&str> = engine["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            command[command.len() - 4..],
            [
                "2",
                "--api-key",
                "$(STRATA_ENGINE_API_KEY)",
                "--no-cache-prompt"
            ]
        );
        stop.cancel();
        running.await.unwrap().unwrap();
    }
}
