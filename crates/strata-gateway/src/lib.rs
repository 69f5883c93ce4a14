//! The gateway: OpenAI-compatible routes in front of engine replicas. It
//! authenticates each request, applies the tenant's limits, budget and fair
//! share, validates it, routes it to the ready replica with the fewest
//! outstanding tokens, streams the answer through and meters usage. The
//! admin API manages tenants and keys.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod budget;
mod conversations;
pub mod dashboard;
mod extract;
pub mod fairq;
#[doc(hidden)]
pub mod fuzzing;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod prefix_index;
pub mod proxy;
pub mod replicas;
mod responses;
pub mod router;
pub mod shared_limits;
pub mod snapshots;
pub mod stored;
pub mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};

use crate::extract::Query;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde_json::json;
use strata_core::config::ModelPrice;
use strata_core::openai::{
    parse_body, request_id, ChatCompletionRequest, CompletionRequest, Generation, ModelList,
};
use strata_core::store::Store;
use strata_core::{read_body, tls, ApiError, ReplicaEndpoint};
use strata_store::Vault;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::admin::AdminState;
use crate::admission::{Charge, Estimate, Policy};
use crate::auth::{Authenticator, Principal};
use crate::ledger::Ledger;
use crate::metrics::{GatewayMetrics, RequestLabels};
use crate::proxy::{Forward, Proxy, Route};
use crate::replicas::ReplicaSet;
use crate::snapshots::Snapshots;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("gateway.shared_limits_url: {0}")]
    SharedLimits(String),
}

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
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
    /// Mutual TLS to the replicas with strata's own certificates.
    pub replica_tls: Option<tls::ReplicaPki>,
    /// Where drained replicas' KV snapshots are kept (sealed).
    pub snapshots: SnapshotPlace,
    /// At shutdown, drain every replica (their processes stop with this
    /// one), so their sessions' caches outlive them.
    pub drain_on_shutdown: bool,
    /// Route requests without a session by prompt prefix, or by load only.
    pub routing: strata_core::config::Routing,
    /// Where to publish the load (every 100 ms), for an autoscaler.
    pub load: Option<watch::Sender<Load>>,
    /// With no replica ready, requests wait in the fair queue (for a
    /// replica that is starting: scale from zero) instead of a 503.
    pub hold_when_empty: bool,
    /// The controller of the replicas, when it runs beside this gateway:
    /// it asks for drains, and takes preemption notices from the admin API.
    pub link: Option<strata_core::link::GatewayLink>,
    /// Label generation metrics with the tenant id.
    pub metrics_tenant_labels: bool,
    /// Redis URL where every gateway of a cluster keeps the rate limits.
    pub shared_limits_url: Option<String>,
    /// How old a tenant's month spend may get before it is read again from
    /// the ledger (other gateways spend from the same budget); `None` on
    /// one machine.
    pub budget_refresh: Option<Duration>,
    /// The pool's latency objectives, drawn on the dashboard.
    pub slo: dashboard::Slo,
    /// More metrics for `/metrics` (the controller's, when it runs in this
    /// process): OpenMetrics text ending in `# EOF`.
    pub more_metrics: Option<MoreMetrics>,
}

/// Renders metrics kept elsewhere in the process.
#[derive(Clone)]
pub struct MoreMetrics(pub Arc<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for MoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MoreMetrics")
    }
}

pub use strata_core::Load;

/// Where KV snapshots of drained replicas' sessions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotPlace {
    /// A local directory (one machine).
    Dir(std::path::PathBuf),
    /// The database, shared by every gateway of a cluster.
    Database,
    Off,
}

/// An HTTP client for replicas: with `pki`, it trusts only strata's replica
/// CA and presents the gateway's client certificate.
pub fn replica_client(
    pki: Option<&tls::ReplicaPki>,
    connect_timeout: Duration,
) -> Result<reqwest::Client, GatewayError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        // A replica never redirects; no redirect layer on every request.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(pki) = pki {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| tls::TlsError::Certificate(p.to_owned(), e.to_string()))
        };
        let mut identity = read(&pki.client.cert)?;
        identity.extend(read(&pki.client.key)?);
        let bad = |e: reqwest::Error| tls::TlsError::Config(e.to_string());
        builder = builder
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(&read(&pki.ca_cert)?).map_err(bad)?,
            )
            .identity(reqwest::Identity::from_pem(&identity).map_err(bad)?);
    }
    Ok(builder
        .build()
        .map_err(|e| tls::TlsError::Config(e.to_string()))?)
}

pub(crate) use strata_core::now_ms;

/// A map looked up on every request (limits, budgets, keys, the fair
/// queue's counters): foldhash
/// instead of SipHash, which was ~3% of a proxied request's instructions.
/// Its keys are strata's own ids and digests, not text a client chooses.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Output tokens assumed for a request without `max_tokens`, for balancing only.
const ASSUMED_OUTPUT_TOKENS: u64 = 256;

struct AppState {
    proxy: Proxy,
    hold_when_empty: bool,
    store: Arc<dyn Store>,
    snapshots: Option<Arc<Snapshots>>,
    policy: Arc<Policy>,
    max_body_bytes: usize,
    started: u64,
    /// This gateway's OpenAPI document, as served at `/openapi.json`.
    openapi: std::sync::OnceLock<String>,
    more_metrics: Option<MoreMetrics>,
}

/// Serves until `shutdown`; replica endpoints come from `endpoints`. The
/// `vault` is the one the store seals with (for KEK rotation by the admin API).
pub async fn serve(
    settings: GatewaySettings,
    endpoints: watch::Receiver<Vec<ReplicaEndpoint>>,
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
    let metrics =
        Arc::new(GatewayMetrics::new().with_tenant_labels(settings.metrics_tenant_labels));
    let replicas = Arc::new(ReplicaSet::default());
    replicas.set_prefix_routing(settings.routing == strata_core::config::Routing::Prefix);
    let client = replica_client(settings.replica_tls.as_ref(), settings.connect_timeout)?;
    let (ledger, ledger_task) = Ledger::spawn(store.clone(), metrics.clone());
    let shared_limits = match &settings.shared_limits_url {
        Some(url) => Some(
            shared_limits::SharedLimiter::connect(url)
                .await
                .map_err(GatewayError::SharedLimits)?,
        ),
        None => None,
    };
    let policy = Arc::new(Policy {
        limiter: Default::default(),
        shared_limits,
        budgets: Default::default(),
        budget_refresh: settings.budget_refresh,
        metrics: metrics.clone(),
        pools: fairq::Pools::new(settings.max_waiting_per_tenant),
        replicas: replicas.clone(),
        slots_per_replica: settings.slots_per_replica,
        pricing: settings.pricing.clone(),
        store: store.clone(),
        queue_timeout: settings.queue_timeout,
        epoch: Instant::now(),
    });
    let auth = Arc::new(Authenticator::new(store.clone()));
    let snapshots = match (&settings.snapshots, &vault) {
        (SnapshotPlace::Dir(dir), Some(vault)) => {
            Some(Arc::new(Snapshots::new(dir.clone(), vault.clone())))
        }
        (SnapshotPlace::Database, _) => Some(Arc::new(Snapshots::Store(store.clone()))),
        _ => None,
    };
    let admin = Arc::new(AdminState {
        store: store.clone(),
        auth: auth.clone(),
        vault,
        max_body_bytes: settings.max_body_bytes,
        replicas: replicas.clone(),
        client: client.clone(),
        snapshots: snapshots.clone(),
        notices: settings.link.as_ref().map(|l| l.notices.clone()),
    });
    let dashboard = Arc::new(dashboard::Dashboard::new(
        store.clone(),
        auth.clone(),
        settings.slo,
        acceptor.is_some(),
    ));
    let background = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(snapshots) = &snapshots {
        tasks.spawn(drain_leaving(
            endpoints.clone(),
            replicas.clone(),
            client.clone(),
            snapshots.clone(),
            store.clone(),
            background.clone(),
        ));
    }
    tasks.spawn(replicas::follow_endpoints(
        replicas.clone(),
        endpoints,
        background.clone(),
    ));
    tasks.spawn(replicas::check_health(
        replicas.clone(),
        client.clone(),
        settings.health_interval,
        background.clone(),
    ));
    if let Some(link) = &settings.link {
        tasks.spawn(serve_drains(
            link.drains.clone(),
            replicas.clone(),
            client.clone(),
            snapshots.clone(),
            background.clone(),
        ));
    }
    tasks.spawn(follow_capacity(
        policy.clone(),
        metrics.clone(),
        settings.load.clone(),
        dashboard.clone(),
        background.clone(),
    ));
    let state = Arc::new(AppState {
        hold_when_empty: settings.hold_when_empty,
        proxy: Proxy {
            upstreams: upstream::Upstreams::new(client.clone(), settings.connect_timeout),
            client,
            replicas,
            metrics,
            ledger,
            hold: settings.hold_when_empty.then_some(settings.queue_timeout),
        },
        policy,
        store: store.clone(),
        snapshots,
        max_body_bytes: settings.max_body_bytes,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        openapi: Default::default(),
        more_metrics: settings.more_metrics.clone(),
    });
    let last = (settings.drain_on_shutdown).then(|| {
        (
            state.snapshots.clone(),
            state.proxy.replicas.clone(),
            state.proxy.client.clone(),
        )
    });
    tls::serve(
        listener,
        router(state, admin, auth, dashboard),
        acceptor,
        settings.require_tls,
        shutdown,
    )
    .await;
    // The replicas are about to stop with this process: keep their
    // sessions' caches for whichever replicas serve the next turns.
    if let Some((Some(snapshots), replicas, client)) = last {
        for r in replicas.snapshot().iter().filter(|r| r.is_ready()) {
            let id = &r.endpoint.id;
            if let Err(e) = snapshots
                .drain(&replicas, &client, id, Duration::from_secs(5))
                .await
            {
                tracing::warn!(replica = %id, error = %e.message, "no snapshots taken at shutdown");
            }
        }
    }
    background.cancel();
    while tasks.join_next().await.is_some() {}
    // The router (and with it the last `Ledger`) is gone: the writer flushes and ends.
    let _ = ledger_task.await;
    Ok(())
}

/// Drains the replicas the controller is about to let go, each in its own
/// task, and answers when each is done (also when it failed: the replica
/// goes either way).
async fn serve_drains(
    drains: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<strata_core::link::DrainRequest>>>,
    replicas: Arc<ReplicaSet>,
    client: reqwest::Client,
    snapshots: Option<Arc<Snapshots>>,
    cancel: CancellationToken,
) {
    let mut drains = drains.lock().await;
    loop {
        let request = tokio::select! {
            _ = cancel.cancelled() => return,
            r = drains.recv() => match r { Some(r) => r, None => return },
        };
        let (replicas, client, snapshots) = (replicas.clone(), client.clone(), snapshots.clone());
        tokio::spawn(async move {
            let id = &request.replica;
            let started = Instant::now();
            match &snapshots {
                Some(s) => {
                    if let Err(e) = s.drain(&replicas, &client, id, request.wait).await {
                        tracing::warn!(replica = %id, error = %e.message, "drain incomplete");
                    }
                }
                None => {
                    if let Some(r) = replicas.find(id) {
                        r.quiesce(request.wait).await;
                    }
                }
            }
            tracing::info!(replica = %id, secs = started.elapsed().as_secs_f64(), "drained for the controller");
            let _ = request.done.send(());
        });
    }
}

/// Cluster mode: replicas the controller lets go arrive marked `draining`
/// (every gateway stops sending them new requests). The gateway that takes
/// the replica's drain lease first keeps its sessions' caches as snapshots
/// in the database, then takes its drained lease, which the controller
/// waits for before it stops the replica.
async fn drain_leaving(
    mut endpoints: watch::Receiver<Vec<ReplicaEndpoint>>,
    replicas: Arc<ReplicaSet>,
    client: reqwest::Client,
    snapshots: Arc<Snapshots>,
    store: Arc<dyn Store>,
    cancel: CancellationToken,
) {
    let me = format!("gateway-{}", uuid::Uuid::new_v4().simple());
    let mut seen = std::collections::HashSet::new();
    loop {
        let leaving: Vec<String> = endpoints
            .borrow_and_update()
            .iter()
            .filter(|e| e.draining && seen.insert(e.id.clone()))
            .map(|e| e.id.clone())
            .collect();
        for id in leaving {
            let (replicas, client, snapshots, store, me) = (
                replicas.clone(),
                client.clone(),
                snapshots.clone(),
                store.clone(),
                me.clone(),
            );
            tokio::spawn(async move {
                let lease = strata_core::drain_lease(&id);
                if !matches!(store.claim_lease(&lease, &me, 120_000).await, Ok(true)) {
                    return;
                }
                // Every gateway saw it leave; give their last requests a moment.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let kept = snapshots
                    .drain(&replicas, &client, &id, Duration::from_secs(20))
                    .await;
                if let Err(e) = &kept {
                    tracing::warn!(replica = %id, error = %e.message, "drain incomplete");
                }
                let done = strata_core::drained_lease(&id);
                if let Err(e) = store.claim_lease(&done, &me, 3_600_000).await {
                    tracing::warn!(replica = %id, error = %e, "cannot tell the controller the drain is done");
                }
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = endpoints.changed() => if changed.is_err() { return },
        }
    }
}

/// Keeps each pool's fair-queue capacity at its ready replicas × slots, and
/// the load gauges current; samples the load for the dashboard.
async fn follow_capacity(
    policy: Arc<Policy>,
    metrics: Arc<GatewayMetrics>,
    load: Option<watch::Sender<Load>>,
    dashboard: Arc<dashboard::Dashboard>,
    cancel: CancellationToken,
) {
    let mut sampled = (Instant::now(), metrics.tokens.get());
    loop {
        policy
            .pools
            .set_capacities(&policy.replicas.ready_by_pool(), policy.slots_per_replica);
        let (in_flight, waiting) = policy.pools.load();
        metrics.in_flight.set(in_flight as i64);
        metrics.waiting.set(waiting as i64);
        if sampled.0.elapsed() >= dashboard::SAMPLE_EVERY {
            let tokens = metrics.tokens.get();
            dashboard.record(dashboard::LoadSample {
                at_ms: now_ms(),
                in_flight,
                waiting,
                capacity: policy.replicas.ready_count() * policy.slots_per_replica,
                tokens_per_s: tokens.saturating_sub(sampled.1) as f64
                    / sampled.0.elapsed().as_secs_f64(),
            });
            sampled = (Instant::now(), tokens);
        }
        if let Some(load) = &load {
            let (ttft_p95_ms, tpot_p95_ms) = metrics.recent.p95();
            load.send_replace(Load {
                requests_total: metrics.arrived.get(),
                tokens_total: metrics.tokens.get(),
                prompt_tokens_total: metrics.prompt_tokens.get(),
                in_flight,
                waiting,
                routable: policy.replicas.ready_in(None),
                ttft_p95_ms,
                tpot_p95_ms,
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The gateway's routes; the OpenAPI document describing them, built from
/// the same handlers' `#[utoipa::path]` attributes, is kept for `/openapi.json`.
pub(crate) fn router(
    state: Arc<AppState>,
    admin: Arc<AdminState>,
    auth: Arc<Authenticator>,
    dashboard: Arc<dashboard::Dashboard>,
) -> Router {
    use utoipa_axum::routes;
    let authenticated = OpenApiRouter::new()
        .routes(routes!(completions))
        .routes(routes!(chat_completions, list_completions))
        .routes(routes!(models))
        .routes(routes!(responses::create))
        .routes(routes!(responses::show, responses::delete))
        .routes(routes!(responses::input_items))
        .routes(routes!(conversations::create))
        .routes(routes!(
            conversations::show,
            conversations::update,
            conversations::delete
        ))
        .routes(routes!(conversations::list_items, conversations::add_items))
        .routes(routes!(
            conversations::show_item,
            conversations::delete_item
        ))
        .with_state(state.clone())
        .merge(stored::routes(state.store.clone()))
        .merge(admin::routes(admin))
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            auth::require_key,
        ));
    let public = OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics))
        .routes(routes!(document))
        .with_state(state.clone())
        .merge(dashboard::routes(dashboard));
    let (router, mut doc) = OpenApiRouter::with_openapi(openapi::Frame::openapi())
        .merge(authenticated)
        .merge(public)
        .split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let json = doc
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    state.openapi.set(json).expect("the router is built once");
    router
        .fallback(|| async { ApiError::not_found("Unknown route.") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    summary = "Complete a prompt",
    request_body = strata_core::openai::CompletionRequest,
    responses((status = 200, description = "The completion, or server-sent events of `text_completion` chunks with `stream`", body = strata_core::openai::Completion), crate::openapi::Failures),
    security(("api_key" = []))
)]
async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Arc<Principal>>,
    req: Request,
) -> Response {
    route(state, p, req, "/v1/completions").await
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    summary = "Answer a chat",
    request_body = strata_core::openai::ChatCompletionRequest,
    responses((status = 200, description = "The chat completion, or server-sent events of `chat.completion.chunk`s with `stream`", body = strata_core::openai::ChatCompletion), crate::openapi::Failures),
    security(("api_key" = []))
)]
async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Arc<Principal>>,
    req: Request,
) -> Response {
    route(state, p, req, "/v1/chat/completions").await
}

#[utoipa::path(
    get,
    path = "/v1/chat/completions",
    tag = "openai",
    summary = "List stored chat completions",
    params(("after" = Option<String>, Query, description = "The last id of the previous page"), ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "1 to 100 (20)")),
    responses((status = 200, description = "Newest first", body = crate::openapi::Page), crate::openapi::Failures),
    security(("api_key" = []))
)]
async fn list_completions(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Arc<Principal>>,
    Query(q): Query<stored::ListQuery>,
) -> Response {
    stored::list(state.store.clone(), p, q).await
}

async fn route(
    state: Arc<AppState>,
    p: Arc<Principal>,
    req: Request,
    path: &'static str,
) -> Response {
    let arrived = Instant::now();
    let response = match forward(&state, p, req, path, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    count_request(&state, path, &response);
    response
}

/// Counts a finished request by route and status.
fn count_request(state: &AppState, route: &'static str, response: &Response) {
    state
        .proxy
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            status: response.status().as_u16(),
        })
        .inc();
}

async fn forward(
    state: &AppState,
    p: Arc<Principal>,
    req: Request,
    path: &'static str,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), state.max_body_bytes).await?;
    // The gateway checks what it can without a tokenizer; the replica checks the context.
    let generation: Generation = match path {
        "/v1/completions" => parse_body::<CompletionRequest>(&body)?.validate()?,
        _ => parse_body::<ChatCompletionRequest>(&body)?.validate()?,
    };
    let request_id = request_id();
    let span = request_span(&request_id, &p, &generation, path);
    let (charge, estimated_tokens) = admit(state, &p, &generation, body.len())
        .instrument(span.clone())
        .await?;
    let keep = generation.store.then(|| {
        let messages = serde_json::from_slice::<serde_json::Value>(&body)
            .map(|v| v["messages"].clone())
            .unwrap_or_default();
        stored::Keep {
            store: state.store.clone(),
            principal: p.clone(),
            messages,
            metadata: generation.metadata.clone(),
        }
    });
    let prefix = state
        .proxy
        .replicas
        .prefix_of(p.tenant.id.as_str(), &generation.input);
    let forward = Forward {
        route: Route {
            path,
            principal: p,
            session: None,
            prefix,
            body,
            model: generation.model,
            estimated_tokens,
        },
        keep,
        charge,
        stream: generation.stream,
        include_usage: generation.include_usage,
        request_id,
        arrived,
    };
    state.proxy.forward(forward).instrument(span).await
}

/// A generation request's span: who asks for what; the proxy adds the
/// replica that answered, how many it tried before, and its status.
pub(crate) fn request_span(
    request_id: &str,
    p: &Principal,
    generation: &Generation,
    path: &'static str,
) -> tracing::Span {
    tracing::info_span!(
        "request",
        id = %request_id,
        tenant = %p.tenant.id,
        key = %p.key.id,
        model = %generation.model,
        path,
        stream = generation.stream,
        replica = tracing::field::Empty,
        retries = tracing::field::Empty,
        status = tracing::field::Empty,
    )
}

/// Admission for a generation whose upstream body is `body_len` bytes: a
/// ready replica in the tenant's pool, then limits, budget and fair queue.
/// Returns the charge to settle and the tokens to balance load by.
async fn admit(
    state: &AppState,
    p: &Arc<Principal>,
    generation: &Generation,
    body_len: usize,
) -> Result<(Charge, u64), ApiError> {
    let estimate = Estimate {
        // About four bytes of JSON per prompt token; the replica counts exactly.
        prompt_tokens: body_len as u64 / 4,
        output_tokens: generation
            .max_tokens
            .map_or(ASSUMED_OUTPUT_TOKENS, u64::from),
    };
    let pool = p.pool();
    state.proxy.metrics.arrived.inc();
    if state.proxy.replicas.ready_in(pool) == 0 && !(state.hold_when_empty && pool.is_none()) {
        return Err(ApiError::unavailable(match pool {
            Some(_) => "No replica reserved for this tenant is ready; retry shortly.",
            None => "No replica is ready to serve requests; retry shortly.",
        }));
    }
    let charge = state
        .policy
        .admit(p, pool, &generation.model, estimate)
        .await?;
    Ok((charge, estimate.prompt_tokens + estimate.output_tokens))
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    summary = "List the models this key may use",
    responses((status = 200, description = "OK", body = strata_core::openai::ModelList), crate::openapi::Failures),
    security(("api_key" = []))
)]
async fn models(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Arc<Principal>>,
) -> Json<ModelList> {
    let visible = state
        .proxy
        .replicas
        .models()
        .into_iter()
        .filter(|m| p.key.allows_model(m))
        .collect::<Vec<_>>();
    Json(ModelList::of(visible, state.started))
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    summary = "This document",
    responses((status = 200, description = "OpenAPI 3 (JSON)", content_type = "application/json"))
)]
async fn document(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.get().cloned().unwrap_or_default(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    summary = "Whether the gateway can serve",
    responses((status = 200, description = "Ready, or scaled to zero", body = crate::openapi::Health), (status = 503, description = "No replica and no waiting allowed", body = crate::openapi::Health))
)]
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let replicas: Vec<_> = state
        .proxy
        .replicas
        .snapshot()
        .iter()
        .map(|r| {
            json!({
                "id": r.endpoint.id, "url": r.endpoint.url, "ready": r.is_ready(), "draining": r.is_draining(),
                "reserved_for": r.endpoint.reserved_for,
                "outstanding_tokens": r.outstanding_tokens(),
            })
        })
        .collect();
    let ready = state.proxy.replicas.ready_count();
    // Scaled to zero, the gateway still takes requests: they wait for a replica.
    let status = match (ready, state.hold_when_empty) {
        (0, false) => "unavailable",
        (0, true) => "idle",
        _ => "ok",
    };
    let body = Json(json!({"status": status, "replicas_ready": ready, "replicas": replicas}));
    if ready > 0 || state.hold_when_empty {
        body.into_response()
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.proxy.metrics;
    m.replicas_ready
        .set(state.proxy.replicas.ready_count() as i64);
    let mut text = m.render();
    if let Some(more) = &state.more_metrics {
        // One exposition: a single `# EOF`, at the end.
        if let Some(body) = text.strip_suffix("# EOF\n") {
            text.truncate(body.len());
        }
        text.push_str(&(more.0)());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
