//! The gateway: OpenAI-compatible routes in front of engine replicas. It
//! validates each request, routes it to the ready replica with the fewest
//! outstanding tokens, streams the answer through and meters usage.

pub mod ledger;
pub mod metrics;
pub mod proxy;
pub mod replicas;
pub mod router;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use strata_core::openai::{
    parse_body, response_id, ChatCompletionRequest, CompletionRequest, Generation, ModelList,
};
use strata_core::store::Store;
use strata_core::{read_body, ApiError, ReplicaEndpoint};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ledger::Ledger;
use crate::metrics::{GatewayMetrics, RequestLabels};
use crate::proxy::{Forward, Proxy};
use crate::replicas::ReplicaSet;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("gateway server failed: {0}")]
    Serve(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub health_interval: Duration,
    pub connect_timeout: Duration,
}

/// Output tokens assumed for a request without `max_tokens`, for balancing only.
const ASSUMED_OUTPUT_TOKENS: u64 = 256;

struct AppState {
    proxy: Proxy,
    max_body_bytes: usize,
    started: u64,
}

/// Serves until `shutdown`; replica endpoints come from `endpoints`.
pub async fn serve(
    settings: GatewaySettings,
    endpoints: watch::Receiver<Vec<ReplicaEndpoint>>,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| GatewayError::Listen(settings.listen, e))?;
    tracing::info!(listen = %settings.listen, "gateway listening");
    let metrics = Arc::new(GatewayMetrics::new());
    let replicas = Arc::new(ReplicaSet::default());
    let client = reqwest::Client::builder()
        .connect_timeout(settings.connect_timeout)
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()
        .expect("a client without TLS always builds");
    let (ledger, ledger_task) = Ledger::spawn(store, metrics.clone());
    let background = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
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
    let state = Arc::new(AppState {
        proxy: Proxy {
            client,
            replicas,
            metrics,
            ledger,
        },
        max_body_bytes: settings.max_body_bytes,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    background.cancel();
    while tasks.join_next().await.is_some() {}
    // The router (and with it the last `Ledger`) is gone: the writer flushes and ends.
    let _ = ledger_task.await;
    served.map_err(GatewayError::Serve)
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("Unknown route.") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

async fn completions(State(state): State<Arc<AppState>>, req: Request) -> Response {
    route(state, req, "/v1/completions").await
}

async fn chat_completions(State(state): State<Arc<AppState>>, req: Request) -> Response {
    route(state, req, "/v1/chat/completions").await
}

async fn route(state: Arc<AppState>, req: Request, path: &'static str) -> Response {
    let arrived = Instant::now();
    let response = match forward(&state, req, path, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state
        .proxy
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route: path,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

async fn forward(
    state: &AppState,
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
    let request_id = response_id("req");
    let span = tracing::info_span!("request", id = %request_id, model = %generation.model, path);
    let _enter = span.enter();
    let estimated_tokens = body.len() as u64 / 4
        + generation
            .max_tokens
            .map_or(ASSUMED_OUTPUT_TOKENS, u64::from);
    let forward = Forward {
        path,
        model: generation.model,
        stream: generation.stream,
        include_usage: generation.include_usage,
        body,
        estimated_tokens,
        request_id,
        arrived,
    };
    drop(_enter);
    state.proxy.forward(forward).await
}

async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList::of(state.proxy.replicas.models(), state.started))
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let replicas: Vec<_> = state
        .proxy
        .replicas
        .snapshot()
        .iter()
        .map(|r| {
            json!({
                "id": r.endpoint.id, "url": r.endpoint.url, "ready": r.is_ready(),
                "outstanding_tokens": r.outstanding_tokens(),
            })
        })
        .collect();
    let ready = state.proxy.replicas.ready_count();
    let body = Json(
        json!({"status": if ready > 0 { "ok" } else { "unavailable" }, "replicas_ready": ready, "replicas": replicas}),
    );
    if ready > 0 {
        body.into_response()
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.proxy.metrics;
    m.replicas_ready
        .set(state.proxy.replicas.ready_count() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}
