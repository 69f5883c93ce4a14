//! The operations routes: `/health` and `/openapi.json` without a key
//! (whether the gateway can serve; nothing about tenants or replicas), and
//! `/metrics` (Prometheus) for a key of the platform tenant with the admin or
//! reader role: its series may name tenants and show their spend.

use std::sync::{Arc, OnceLock};

use axum::extract::{FromRef, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::fleet::replicas::ReplicaSet;
use crate::metrics::{GatewayMetrics, MoreMetrics};
use crate::tenancy::auth::Authenticator;
use strata_core::tenant::Role;
use strata_core::ApiError;

/// The state of the status routes.
pub struct Status {
    pub replicas: Arc<ReplicaSet>,
    /// Who may read `/metrics`.
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<GatewayMetrics>,
    /// The controller's metrics, when it runs in this process.
    pub more_metrics: Option<MoreMetrics>,
    /// This gateway's OpenAPI document, as served at `/openapi.json`.
    pub openapi: OnceLock<String>,
}

/// The status routes, for a router whose state holds a `Status`.
pub fn routes<S>() -> OpenApiRouter<S>
where
    Arc<Status>: FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics))
        .routes(routes!(document))
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    summary = "This document",
    responses((status = 200, description = "OpenAPI 3 (JSON)", content_type = "application/json"))
)]
async fn document(State(status): State<Arc<Status>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        status.openapi.get().cloned().unwrap_or_default(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    summary = "Whether the gateway can serve",
    responses((status = 200, description = "Ready, or scaled to zero", body = crate::http::openapi::Health), (status = 503, description = "No replica and no waiting allowed", body = crate::http::openapi::Health))
)]
async fn health(State(status): State<Arc<Status>>) -> Response {
    let ready = status.replicas.ready_count();
    let holds = status.replicas.holds_when_empty();
    // Scaled to zero, the gateway still takes requests: they wait for a replica.
    let state = match (ready, holds) {
        (0, false) => "unavailable",
        (0, true) => "idle",
        _ => "ok",
    };
    // Replicas by name, address and load: `GET /admin/v1/replicas`.
    let body = Json(json!({"status": state, "replicas_ready": ready}));
    if ready > 0 || holds {
        body.into_response()
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics (a platform admin or reader key)",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn metrics(State(status): State<Arc<Status>>, headers: axum::http::HeaderMap) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let principal = match status.auth.authenticate(authorization).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if !(principal.tenant.id.is_platform()
        && matches!(principal.role(), Role::Admin | Role::Reader))
    {
        return ApiError::forbidden(
            "Metrics name tenants: they need a key of the platform tenant (admin or reader).",
        )
        .into_response();
    }
    let m = &status.metrics;
    m.replicas_ready.set(status.replicas.ready_count() as i64);
    let mut text = m.render();
    if let Some(more) = &status.more_metrics {
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
