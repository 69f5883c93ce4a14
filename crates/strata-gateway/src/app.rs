//! The gateway put together: its settings and its links to the rest of the
//! process, one application state whose parts each route takes (axum's
//! `FromRef`), the router (and the OpenAPI document made from the same
//! lines), the background tasks, and serving until shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::FromRef;
use axum::Router;
use strata_core::config::{ModelPrice, Routing};
use strata_core::link::GatewayLink;
use strata_core::store::{
    AuditStore, BackgroundStore, BatchStore, CompletionStore, ConversationStore, DecisionStore,
    FileStore, InstanceStore, KeyStore, LeaseStore, ModelStore, SnapshotStore, Store, TenantStore,
    UsageStore,
};
use strata_core::{tls, ApiError, Load, Loads, ReplicaEndpoint};
use strata_store::Vault;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::api::batch_runner::{BatchRunner, Paces};
use crate::api::catalog::CatalogModel;
use crate::api::generate::Inference;
use crate::api::objects::Objects;
use crate::api::running::Background;
use crate::fleet::client::{replica_client, ReplicaAuth, Upstreams};
use crate::fleet::replicas::ReplicaSet;
use crate::fleet::snapshots::Snapshots;
use crate::fleet::{drains, health};
use crate::metrics::{GatewayMetrics, MoreMetrics};
use crate::ops::admin::Admin;
use crate::ops::dashboard::{self, Dashboard, Slo};
use crate::ops::models::{ModelHost, Models};
use crate::ops::status::Status;
use crate::relay::forward::Relay;
use crate::relay::ledger::Ledger;
use crate::tenancy::admission::{Gate, GateSettings};
use crate::tenancy::audit::Audit;
use crate::tenancy::auth::{require_key, Authenticator};
use crate::tenancy::shared_limits::SharedLimiter;
use crate::{api, ops};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("gateway.shared_limits_url: {0}")]
    SharedLimits(String),
}

/// How the gateway is set up (from the config and flags).
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    /// What a chat without `max_tokens` may generate at most: the engines'
    /// `engine.default_max_tokens`, reserved against limits and budget.
    pub default_max_tokens: u32,
    pub health_interval: Duration,
    pub connect_timeout: Duration,
    pub slots_per_replica: usize,
    pub max_waiting_per_tenant: usize,
    pub queue_timeout: Duration,
    pub pricing: BTreeMap<String, ModelPrice>,
    /// Serve HTTPS with these files.
    pub tls: Option<tls::TlsFiles>,
    /// Refuse plain HTTP (needs `tls`).
    pub require_tls: bool,
    /// How the gateway proves itself to its replicas: mutual TLS with
    /// strata's own certificates, and/or the replica token.
    pub replica_auth: ReplicaAuth,
    /// Where drained replicas' KV snapshots are kept (sealed).
    pub snapshots: SnapshotPlace,
    /// At shutdown, drain every replica (their processes stop with this
    /// one), so their sessions' caches outlive them.
    pub drain_on_shutdown: bool,
    /// Route requests without a session by prompt prefix, or by load only.
    pub routing: Routing,
    /// With no replica ready, requests wait in the fair queue (for a
    /// replica that is starting: scale from zero) instead of a 503.
    pub hold_when_empty: bool,
    /// Label generation metrics with the tenant id.
    pub metrics_tenant_labels: bool,
    /// Redis URL where every gateway of a cluster keeps the rate limits.
    pub shared_limits_url: Option<String>,
    /// How old a tenant's month spend may get before it is read again from
    /// the ledger (other gateways spend from the same budget); `None` on
    /// one machine.
    pub budget_refresh: Option<Duration>,
    /// The pool's latency objectives, drawn on the dashboard.
    pub slo: Slo,
    /// Keyed checkpoints of the audit trail's head, outside the database.
    pub audit_checkpoints: Option<crate::tenancy::audit::Checkpoints>,
    /// After a tenant is deleted, rotate the KEK (where it is a file).
    pub rotate_kek_on_shred: bool,
    /// The Files and Batch APIs' settings.
    pub batch: BatchSettings,
}

/// How files, batches and background responses are taken and run.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    /// Background responses' streams one tenant may follow at once here.
    pub streams_per_tenant: usize,
    /// Largest file an upload may hold.
    pub max_file_bytes: usize,
    /// A batch line's price over an interactive request's (0.5: half).
    pub price_factor: f64,
    /// Lines of one batch waiting or running at once.
    pub lines_in_flight: usize,
    /// Share of each pool's slots kept for batch lines that wait.
    pub reserved_share: f64,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            streams_per_tenant: 16,
            max_file_bytes: 64 * 1024 * 1024,
            price_factor: 0.5,
            lines_in_flight: 32,
            reserved_share: 0.125,
        }
    }
}

/// What the gateway is linked to in its process: where its replicas come
/// from, and what it tells or hears from the controller.
pub struct Links {
    /// The replica endpoints, as the provider (or discovery) publishes them.
    pub endpoints: watch::Receiver<Vec<ReplicaEndpoint>>,
    /// Where to publish the load (every 100 ms), for autoscalers: the
    /// whole gateway's, and each catalog model's.
    pub load: Option<watch::Sender<Loads>>,
    /// The models of this gateway's own pools (one pool each), as the
    /// process running them publishes them: listed by `/v1/models` whether
    /// or not a replica is up (a pool at zero starts one for a request); a
    /// request for another model is a 404. `None`: no catalog, the models
    /// the replicas report.
    pub catalog: Option<watch::Receiver<Vec<CatalogModel>>>,
    /// The process running the pools, which checks and applies the models
    /// deployed through the admin API (`strata serve`).
    pub model_host: Option<Arc<dyn ModelHost>>,
    /// The controller of the replicas, when it runs beside this gateway:
    /// it asks for drains, and takes preemption notices from the admin API.
    pub controller: Option<GatewayLink>,
    /// More metrics for `/metrics` (the controller's, in this process).
    pub more_metrics: Option<MoreMetrics>,
}

impl Links {
    /// A fixed or published replica list, nothing else.
    pub fn endpoints(endpoints: watch::Receiver<Vec<ReplicaEndpoint>>) -> Links {
        Links {
            endpoints,
            load: None,
            catalog: None,
            model_host: None,
            controller: None,
            more_metrics: None,
        }
    }
}

/// Where KV snapshots of drained replicas' sessions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotPlace {
    /// A local directory (one machine).
    Dir(std::path::PathBuf),
    /// The database, shared by every gateway of a cluster.
    Database,
    Off,
}

/// The store once per trait it implements, so that each part of the
/// gateway holds only what it uses.
struct Stores {
    usage: Arc<dyn UsageStore>,
    instances: Arc<dyn InstanceStore>,
    tenants: Arc<dyn TenantStore>,
    keys: Arc<dyn KeyStore>,
    audit: Arc<dyn AuditStore>,
    completions: Arc<dyn CompletionStore>,
    conversations: Arc<dyn ConversationStore>,
    snapshots: Arc<dyn SnapshotStore>,
    decisions: Arc<dyn DecisionStore>,
    leases: Arc<dyn LeaseStore>,
    models: Arc<dyn ModelStore>,
    files: Arc<dyn FileStore>,
    batches: Arc<dyn BatchStore>,
    background: Arc<dyn BackgroundStore>,
}

impl Stores {
    fn of(store: &Arc<dyn Store>) -> Stores {
        Stores {
            usage: store.clone(),
            instances: store.clone(),
            tenants: store.clone(),
            keys: store.clone(),
            audit: store.clone(),
            completions: store.clone(),
            conversations: store.clone(),
            snapshots: store.clone(),
            decisions: store.clone(),
            leases: store.clone(),
            models: store.clone(),
            files: store.clone(),
            batches: store.clone(),
            background: store.clone(),
        }
    }
}

/// The application state: every route takes the part it needs.
#[derive(Clone)]
pub(crate) struct AppState {
    inference: Arc<Inference>,
    objects: Arc<Objects>,
    admin: Arc<Admin>,
    models: Arc<Models>,
    dashboard: Arc<Dashboard>,
    status: Arc<Status>,
}

/// Each part of the state is what a route takes (`State<Arc<Part>>`).
macro_rules! parts {
    ($($part:ty => $field:ident),* $(,)?) => {$(
        impl FromRef<AppState> for Arc<$part> {
            fn from_ref(s: &AppState) -> Self {
                s.$field.clone()
            }
        }
    )*};
}

parts! {
    Inference => inference,
    Objects => objects,
    Admin => admin,
    Models => models,
    Dashboard => dashboard,
    Status => status,
}

/// A gateway that runs: its router and the background tasks it owns.
pub struct Gateway {
    router: Router,
    background: CancellationToken,
    tasks: JoinSet<()>,
    ledger_task: JoinHandle<()>,
    /// Replicas to drain at shutdown, with what it takes.
    last: Option<(Arc<ReplicaSet>, reqwest::Client, Arc<Snapshots>)>,
    /// The background responses this gateway runs, stopped first.
    responses: Arc<Background>,
}

impl Gateway {
    /// Builds the gateway and starts its background tasks: following the
    /// replica endpoints and their health, drains, fair-queue capacity and
    /// load reports, the ledger writer. The `vault` is the one the store
    /// seals with (for snapshots on disk and KEK rotation).
    pub async fn start(
        settings: GatewaySettings,
        links: Links,
        store: Arc<dyn Store>,
        vault: Option<Arc<Vault>>,
    ) -> Result<Gateway, GatewayError> {
        let stores = Stores::of(&store);
        let metrics =
            Arc::new(GatewayMetrics::new().with_tenant_labels(settings.metrics_tenant_labels));
        let catalog = links
            .catalog
            .clone()
            .unwrap_or_else(|| watch::channel(Vec::new()).1);
        let hold = settings.hold_when_empty.then_some(settings.queue_timeout);
        let replicas = Arc::new(ReplicaSet::new(settings.routing, hold));
        let client = replica_client(&settings.replica_auth, settings.connect_timeout)?;
        let (ledger, ledger_task) = Ledger::spawn(stores.usage.clone(), metrics.clone());
        let shared_limits = match &settings.shared_limits_url {
            Some(url) => Some(
                SharedLimiter::connect(url)
                    .await
                    .map_err(GatewayError::SharedLimits)?,
            ),
            None => None,
        };
        let gate = Gate::new(
            GateSettings {
                slots_per_replica: settings.slots_per_replica,
                max_waiting_per_tenant: settings.max_waiting_per_tenant,
                queue_timeout: settings.queue_timeout,
                pricing: settings.pricing.clone(),
                batch_price_factor: settings.batch.price_factor,
                batch_reserved_share: settings.batch.reserved_share,
                budget_refresh: settings.budget_refresh,
            },
            stores.usage.clone(),
            shared_limits,
            metrics.clone(),
        );
        let audit = Audit::new(stores.audit.clone());
        let auth = Arc::new(
            Authenticator::new(stores.keys.clone(), stores.tenants.clone())
                .with_audit(audit.clone()),
        );
        let snapshots = match (&settings.snapshots, &vault) {
            (SnapshotPlace::Dir(dir), Some(vault)) => {
                Some(Arc::new(Snapshots::new(dir.clone(), vault.clone())))
            }
            (SnapshotPlace::Database, _) => {
                Some(Arc::new(Snapshots::Store(stores.snapshots.clone())))
            }
            _ => None,
        };
        let objects = Arc::new(Objects {
            completions: stores.completions.clone(),
            conversations: stores.conversations.clone(),
            files: stores.files.clone(),
            batches: stores.batches.clone(),
            background: stores.background.clone(),
            followers: crate::tenancy::followers::Followers::new(settings.batch.streams_per_tenant),
            batch_created: Arc::new(tokio::sync::Notify::new()),
            audit: audit.clone(),
            max_body_bytes: settings.max_body_bytes,
            max_file_bytes: settings.batch.max_file_bytes,
        });
        // Who holds this gateway's leases (on batches, background responses).
        let holder = format!("gateway-{}", uuid::Uuid::new_v4().simple());
        let relay = Relay {
            upstreams: Upstreams::new(&settings.replica_auth, settings.connect_timeout)?,
            replicas: replicas.clone(),
            metrics: metrics.clone(),
            ledger,
        };
        let inference = Arc::new(Inference {
            gate: gate.clone(),
            relay,
            objects: objects.clone(),
            snapshots: snapshots.clone(),
            client: client.clone(),
            max_body_bytes: settings.max_body_bytes,
            default_max_tokens: settings.default_max_tokens,
            models: catalog.clone(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            background: Arc::new(Background::new(
                stores.background.clone(),
                stores.leases.clone(),
                stores.keys.clone(),
                stores.tenants.clone(),
                holder.clone(),
            )),
        });
        let admin = Arc::new(Admin {
            tenants: stores.tenants.clone(),
            keys: stores.keys.clone(),
            usage: stores.usage.clone(),
            trail: stores.audit.clone(),
            audit: audit.clone(),
            auth: auth.clone(),
            vault,
            max_body_bytes: settings.max_body_bytes,
            replicas: replicas.clone(),
            client: client.clone(),
            snapshots: snapshots.clone(),
            notices: links.controller.as_ref().map(|l| l.notices.clone()),
            rotate_kek_on_shred: settings.rotate_kek_on_shred,
        });
        let models = Arc::new(Models {
            store: stores.models.clone(),
            host: links.model_host.clone(),
            catalog: catalog.clone(),
            replicas: replicas.clone(),
            audit: audit.clone(),
            max_body_bytes: settings.max_body_bytes,
        });
        let dashboard = Arc::new(Dashboard::new(
            dashboard::Reads {
                tenants: stores.tenants.clone(),
                keys: stores.keys.clone(),
                usage: stores.usage.clone(),
                instances: stores.instances.clone(),
                decisions: stores.decisions.clone(),
            },
            audit,
            auth.clone(),
            settings.slo,
            settings.tls.is_some(),
        ));
        let status = Arc::new(Status {
            replicas: replicas.clone(),
            auth: auth.clone(),
            metrics: metrics.clone(),
            more_metrics: links.more_metrics.clone(),
            openapi: OnceLock::new(),
        });

        let background = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if let Some(snapshots) = &snapshots {
            tasks.spawn(drains::drain_leaving(
                links.endpoints.clone(),
                replicas.clone(),
                client.clone(),
                snapshots.clone(),
                stores.leases.clone(),
                background.clone(),
            ));
        }
        if let Some(place) = settings.audit_checkpoints.clone() {
            tasks.spawn(crate::tenancy::audit::write_checkpoints(
                stores.audit.clone(),
                place,
                background.clone(),
            ));
        }
        tasks.spawn(health::follow_endpoints(
            replicas.clone(),
            links.endpoints,
            background.clone(),
        ));
        tasks.spawn(health::check_health(
            replicas.clone(),
            client.clone(),
            settings.health_interval,
            background.clone(),
        ));
        if let Some(link) = &links.controller {
            tasks.spawn(drains::serve_drains(
                link.drains.clone(),
                replicas.clone(),
                client.clone(),
                snapshots.clone(),
                background.clone(),
            ));
        }
        let paces = Arc::new(Paces::default());
        tasks.spawn(follow_capacity(
            gate,
            replicas.clone(),
            metrics,
            LoadReport {
                to: links.load,
                paces: paces.clone(),
            },
            catalog,
            dashboard.clone(),
            background.clone(),
        ));
        let last = match (&snapshots, settings.drain_on_shutdown) {
            (Some(snapshots), true) => Some((replicas, client, snapshots.clone())),
            _ => None,
        };
        let state = AppState {
            inference,
            objects: objects.clone(),
            admin,
            models,
            dashboard,
            status,
        };
        let runner = Arc::new(BatchRunner {
            batches: stores.batches.clone(),
            files: stores.files.clone(),
            keys: stores.keys.clone(),
            tenants: stores.tenants.clone(),
            leases: stores.leases.clone(),
            inference: state.inference.clone(),
            holder,
            lines_in_flight: settings.batch.lines_in_flight,
            wake: objects.batch_created.clone(),
            paces,
        });
        tasks.spawn(runner.run(background.clone()));
        tasks.spawn(crate::api::responses::background::take_over(
            state.inference.clone(),
            background.clone(),
        ));
        Ok(Gateway {
            responses: state.inference.background.clone(),
            router: router(state, auth),
            background,
            tasks,
            ledger_task,
            last,
        })
    }

    /// The gateway's routes, to serve (or to call in-process).
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Stops the background tasks once requests have ended: drains the
    /// replicas first when they stop with this process, and lets the
    /// ledger writer flush.
    pub async fn stop(self) {
        let Gateway {
            router,
            background,
            mut tasks,
            ledger_task,
            last,
            responses,
        } = self;
        // Background responses stop where they are, unended: the next
        // gateway (or this one restarted) goes on with them.
        responses.stop().await;
        // The replicas are about to stop with this process: keep their
        // sessions' caches for whichever replicas serve the next turns.
        if let Some((replicas, client, snapshots)) = last {
            drains::drain_all(&replicas, &client, &snapshots).await;
        }
        background.cancel();
        while tasks.join_next().await.is_some() {}
        // With the router gone, so is the last `Ledger`: the writer flushes and ends.
        drop(router);
        let _ = ledger_task.await;
    }
}

/// Serves until `shutdown`: the listener, then the gateway, which stops
/// once open connections have ended.
pub async fn serve(
    settings: GatewaySettings,
    links: Links,
    store: Arc<dyn Store>,
    vault: Option<Arc<Vault>>,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let acceptor = settings
        .tls
        .as_ref()
        .map(|files| tls::acceptor(files, None))
        .transpose()?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| GatewayError::Listen(settings.listen, e))?;
    tracing::info!(listen = %settings.listen, tls = acceptor.is_some(), require_tls = settings.require_tls, "gateway listening");
    let require_tls = settings.require_tls;
    let gateway = Gateway::start(settings, links, store, vault).await?;
    tls::serve(listener, gateway.router(), acceptor, require_tls, shutdown).await;
    gateway.stop().await;
    Ok(())
}

/// Where a gateway reports its load (to the controller's link; nowhere
/// without one), with the pace of the batches it runs.
struct LoadReport {
    to: Option<watch::Sender<Loads>>,
    paces: Arc<Paces>,
}

/// Keeps each pool's fair-queue capacity at its ready replicas × slots, and
/// the load gauges current; samples the load for the dashboard.
async fn follow_capacity(
    gate: Arc<Gate>,
    replicas: Arc<ReplicaSet>,
    metrics: Arc<GatewayMetrics>,
    report: LoadReport,
    mut catalog: watch::Receiver<Vec<CatalogModel>>,
    dashboard: Arc<Dashboard>,
    cancel: CancellationToken,
) {
    let LoadReport { to: load, paces } = report;
    let slots = gate.slots_per_replica();
    let mut sampled = (Instant::now(), metrics.tokens.get());
    loop {
        gate.pools()
            .set_capacities(&replicas.ready_by_pool(), slots);
        let (in_flight, waiting) = gate.pools().load();
        metrics.in_flight.set(in_flight as i64);
        metrics.waiting.set(waiting as i64);
        if sampled.0.elapsed() >= dashboard::SAMPLE_EVERY {
            let tokens = metrics.tokens.get();
            dashboard.record(dashboard::LoadSample {
                at_ms: strata_core::now_ms(),
                in_flight,
                waiting,
                capacity: replicas.ready_count() * slots,
                tokens_per_s: tokens.saturating_sub(sampled.1) as f64
                    / sampled.0.elapsed().as_secs_f64(),
            });
            sampled = (Instant::now(), tokens);
        }
        if let Some(load) = &load {
            let catalog = catalog.borrow_and_update();
            // Pools scale by their own model's load; an alias's requests
            // count where they went.
            let models = catalog.iter().filter(|m| !m.is_alias());
            metrics.track_models(models.clone().map(|m| m.id.as_str()));
            load.send_replace(Loads {
                total: pool_load(&gate, &replicas, &metrics, &paces, None),
                by_model: models
                    .map(|m| {
                        (
                            m.id.clone(),
                            pool_load(&gate, &replicas, &metrics, &paces, Some(&m.id)),
                        )
                    })
                    .collect(),
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The load `model`'s pool sees (`None`: the whole gateway's, over every
/// model and queue).
fn pool_load(
    gate: &Gate,
    replicas: &ReplicaSet,
    metrics: &GatewayMetrics,
    paces: &Paces,
    model: Option<&str>,
) -> Load {
    let (in_flight, waiting, batch_lines) = gate.pools().load_of(model);
    let batch_tokens_per_s = paces.needed_per_s(model);
    let batch_backlog_tokens = paces.backlog_tokens(model);
    let routable = replicas.ready_in(None, model);
    let demand = model.and_then(|m| metrics.demand(m));
    let Some(d) = demand else {
        let (ttft_p95_ms, tpot_p95_ms) = metrics.recent.p95();
        return Load {
            requests_total: metrics.arrived.get(),
            tokens_total: metrics.tokens.get(),
            prompt_tokens_total: metrics.prompt_tokens.get(),
            in_flight,
            waiting,
            batch_lines,
            batch_tokens_per_s,
            batch_backlog_tokens,
            routable,
            ttft_p95_ms,
            tpot_p95_ms,
        };
    };
    let (ttft_p95_ms, tpot_p95_ms) = d.recent.p95();
    Load {
        requests_total: d.arrived.load(Ordering::Relaxed),
        tokens_total: d.tokens.load(Ordering::Relaxed),
        prompt_tokens_total: d.prompt_tokens.load(Ordering::Relaxed),
        in_flight,
        waiting,
        batch_lines,
        batch_tokens_per_s,
        batch_backlog_tokens,
        routable,
        ttft_p95_ms,
        tpot_p95_ms,
    }
}

/// The gateway's routes; the OpenAPI document describing them, built from
/// the same handlers' `#[utoipa::path]` attributes, is kept for `/openapi.json`.
fn router(state: AppState, auth: Arc<Authenticator>) -> Router {
    let authenticated = OpenApiRouter::<AppState>::new()
        .merge(api::routes())
        .merge(ops::admin::routes())
        .merge(ops::models::routes())
        .route_layer(axum::middleware::from_fn_with_state(auth, require_key));
    let public = OpenApiRouter::<AppState>::new()
        .merge(ops::status::routes())
        .merge(ops::dashboard::routes());
    let (router, mut doc) = OpenApiRouter::with_openapi(crate::http::openapi::Frame::openapi())
        .merge(authenticated)
        .merge(public)
        .split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut doc = serde_json::to_value(&doc).expect("the OpenAPI document serialises");
    crate::http::openapi::add_rules(&mut doc);
    let json = serde_json::to_string_pretty(&doc).expect("the OpenAPI document serialises");
    state
        .status
        .openapi
        .set(json)
        .expect("the router is built once");
    router
        .fallback(|| async { ApiError::not_found("Unknown route.") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}
