//! The audit trail as the routes write it: one row per admin action and per
//! access to a stored object (who, what, whose, which, how it went), then
//! the route's answer.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use strata_core::store::AuditStore;
use strata_core::tenant::AuditEntry;
use strata_core::ApiError;

use crate::tenancy::principal::Principal;

/// Appends rows to the audit trail.
#[derive(Clone)]
pub struct Audit {
    store: Arc<dyn AuditStore>,
}

impl Audit {
    pub fn new(store: Arc<dyn AuditStore>) -> Audit {
        Audit { store }
    }

    /// Appends the row for `action` by `p` on `tenant`'s `target`; a store
    /// that fails is logged (the action itself went as `result` says).
    pub async fn record(
        &self,
        p: &Principal,
        action: &str,
        tenant: &str,
        target: &str,
        result: &str,
    ) {
        let entry = AuditEntry {
            at_ms: strata_core::now_ms(),
            actor_key: p.key.id.clone(),
            actor_tenant: p.tenant.id.to_string(),
            action: action.to_owned(),
            tenant: tenant.to_owned(),
            target: target.to_owned(),
            result: result.to_owned(),
        };
        if let Err(e) = self.store.append_audit(&entry).await {
            tracing::error!(error = %e, action, "cannot append the audit row");
        }
    }

    /// Audits an action (admin or on a stored object) and renders its result.
    pub async fn finish(
        &self,
        p: &Principal,
        action: &str,
        tenant: &str,
        target: &str,
        result: Result<(StatusCode, Value), ApiError>,
    ) -> Response {
        self.record(p, action, tenant, target, result_label(&result))
            .await;
        match result {
            Ok((status, body)) => (status, Json(body)).into_response(),
            Err(e) => e.into_response(),
        }
    }

    /// Audits an access to one of the caller's own stored objects and
    /// renders it.
    pub async fn answer(
        &self,
        p: &Principal,
        action: &str,
        target: &str,
        result: Result<Value, ApiError>,
    ) -> Response {
        let tenant = p.tenant.id.as_str();
        self.finish(
            p,
            action,
            tenant,
            target,
            result.map(|v| (StatusCode::OK, v)),
        )
        .await
    }
}

/// How an action went, as the trail says it.
pub fn result_label<T>(result: &Result<T, ApiError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => match e.status {
            401 | 403 => "denied",
            404 => "not_found",
            400 | 409 | 413 | 422 => "invalid",
            _ => "error",
        },
    }
}
