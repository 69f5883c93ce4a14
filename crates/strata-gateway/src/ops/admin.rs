//! The admin API under `/admin/v1/`: tenants, their keys, limits, budgets,
//! usage and the audit trail. Visibility first (another tenant's id is a 404,
//! exactly like an unknown one), then the role; every action is audited.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use strata_core::openai::parse_body;
use strata_core::store::{AuditStore, KeyStore, TenantStore, UsageStore};
use strata_core::tenant::{ApiKeyRecord, Isolation, Priority, RateLimits, Role, Tenant, TenantId};
use strata_core::{read_body, whole, ApiError};
use strata_store::{Kek, KekSource, Vault};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::fleet::replicas::ReplicaSet;
use crate::fleet::snapshots::Snapshots;
use crate::http::error::store_error;
use crate::http::extract::{Path as UrlPath, Query};
use crate::tenancy::audit::Audit;
use crate::tenancy::auth::Authenticator;
use crate::tenancy::keys::new_key_record;
use crate::tenancy::principal::Principal;

/// The state of the admin routes.
pub struct Admin {
    pub tenants: Arc<dyn TenantStore>,
    pub keys: Arc<dyn KeyStore>,
    pub usage: Arc<dyn UsageStore>,
    /// The trail, to read; `audit` appends to it.
    pub trail: Arc<dyn AuditStore>,
    pub audit: Audit,
    pub auth: Arc<Authenticator>,
    pub vault: Option<Arc<Vault>>,
    pub max_body_bytes: usize,
    pub replicas: Arc<ReplicaSet>,
    pub client: reqwest::Client,
    pub snapshots: Option<Arc<Snapshots>>,
    /// Preemption notices to the provider (`strata serve` only).
    pub notices: Option<tokio::sync::mpsc::Sender<strata_core::link::PreemptNotice>>,
    /// After a tenant is deleted, re-wrap the survivors' data keys under a
    /// new KEK and destroy the old one (where the KEK is a file).
    pub rotate_kek_on_shred: bool,
}

/// The admin routes, for a router whose state holds an `Admin`.
pub fn routes<S>() -> OpenApiRouter<S>
where
    Arc<Admin>: FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    OpenApiRouter::new()
        .routes(routes!(create_tenant, list_tenants))
        .routes(routes!(show_tenant, update_tenant, delete_tenant))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(show_key, revoke_key))
        .routes(routes!(tenant_usage))
        .routes(routes!(all_usage))
        .routes(routes!(audit))
        .routes(routes!(rotate_kek))
        .routes(routes!(list_replicas))
        .routes(routes!(drain_replica))
        .routes(routes!(undrain_replica))
        .routes(routes!(preempt_replica))
}

const MAX_NAME: usize = 64;
const MAX_MODELS: usize = 64;
const MAX_LIMIT: u32 = 1_000_000_000;

fn not_found(kind: &str, id: &str) -> ApiError {
    ApiError::not_found(format!("No {kind} with id `{id}`."))
}

fn tenant_json(t: &Tenant) -> Value {
    json!({
        "object": "tenant",
        "id": t.id,
        "name": t.name,
        "isolation": t.isolation,
        "requests_per_minute": t.limits.requests_per_minute,
        "tokens_per_minute": t.limits.tokens_per_minute,
        "batch_tokens_per_minute": t.limits.batch_tokens_per_minute,
        "monthly_budget_usd": t.monthly_budget_usd,
        "priority": t.priority,
        "created_at": t.created_at_ms / 1000,
    })
}

fn key_json(k: &ApiKeyRecord) -> Value {
    json!({
        "object": "api_key",
        "id": k.id,
        "tenant_id": k.tenant_id,
        "name": k.name,
        "role": k.role,
        "models": k.models,
        "requests_per_minute": k.limits.requests_per_minute,
        "tokens_per_minute": k.limits.tokens_per_minute,
        "batch_tokens_per_minute": k.limits.batch_tokens_per_minute,
        "priority": k.priority,
        "expires_at": k.expires_at_ms.map(|m| m / 1000),
        "revoked_at": k.revoked_at_ms.map(|m| m / 1000),
        "created_at": k.created_at_ms / 1000,
    })
}

pub(crate) fn list_json(data: Vec<Value>) -> Value {
    json!({"object": "list", "data": data})
}

/// What an admin route needs of the caller on the tenant it names.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Need {
    /// Admin or reader of the tenant (or the platform admin).
    Read,
    /// Admin of the tenant (or the platform admin).
    Manage,
    /// The platform admin only.
    Platform,
}

pub(crate) fn role_allows(p: &Principal, need: Need) -> Result<(), ApiError> {
    let ok = p.is_platform_admin()
        || match need {
            Need::Read => matches!(p.role(), Role::Admin | Role::Reader),
            Need::Manage => p.role() == Role::Admin,
            Need::Platform => false,
        };
    if ok {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "This key's role ({}) may not do this.",
            p.role().as_str()
        )))
    }
}

/// The named tenant if the caller may see it: another tenant's id is a 404.
async fn visible_tenant(
    state: &Admin,
    p: &Principal,
    id: &str,
    need: Need,
) -> Result<Tenant, ApiError> {
    if !p.is_platform_admin() && p.tenant.id.as_str() != id {
        return Err(not_found("tenant", id));
    }
    let tenant = state
        .tenants
        .tenant(&TenantId(id.to_owned()))
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found("tenant", id))?;
    role_allows(p, need)?;
    Ok(tenant)
}

/// `Some(None)` for an explicit `null`, `None` for a missing field.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `present` for an integer field, read as `whole::opt` reads one.
fn present_whole<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u32>>, D::Error> {
    whole::opt(d).map(Some)
}

fn check_name(name: &str, param: &str) -> Result<(), ApiError> {
    if name.trim().is_empty()
        || name.chars().count() > MAX_NAME
        || name.chars().any(char::is_control)
    {
        return Err(ApiError::invalid_request(
            Some(param),
            format!("`{param}` must be 1 to {MAX_NAME} characters without control characters."),
        ));
    }
    Ok(())
}

fn check_limit(v: Option<u32>, param: &str) -> Result<(), ApiError> {
    match v {
        Some(0) => Err(ApiError::invalid_request(
            Some(param),
            format!("`{param}` must be at least 1, or null for no limit."),
        )),
        Some(n) if n > MAX_LIMIT => Err(ApiError::invalid_request(
            Some(param),
            format!("`{param}` must be at most {MAX_LIMIT}."),
        )),
        _ => Ok(()),
    }
}

fn check_budget(v: Option<f64>) -> Result<(), ApiError> {
    match v {
        Some(b) if !b.is_finite() || !(0.0..=1e9).contains(&b) => Err(ApiError::invalid_request(
            Some("monthly_budget_usd"),
            "`monthly_budget_usd` must be between 0 and 1e9 dollars, or null for no budget.",
        )),
        _ => Ok(()),
    }
}

/// A body the admin routes take, checked on its own before the route
/// touches the store: the route and the fuzz target parse it the same way.
pub(crate) trait AdminBody: serde::de::DeserializeOwned {
    fn check(&self) -> Result<(), ApiError>;
}

/// `bytes` as `T`, checked; an empty body is `{}`.
/// No body, and a JSON `null` (what an optional body's schema allows), are
/// read as `{}`: a route whose body is optional changes nothing; a route
/// that needs one names the first missing field.
pub(crate) fn parse_admin<T: AdminBody>(bytes: &[u8]) -> Result<T, ApiError> {
    let trimmed = bytes.trim_ascii();
    let none = trimmed.is_empty() || trimmed == b"null";
    let body: T = parse_body(if none { b"{}" } else { bytes })?;
    body.check()?;
    Ok(body)
}

async fn body_of<T: AdminBody>(state: &Admin, req: Request) -> Result<T, ApiError> {
    parse_admin(&read_body(req.into_body(), state.max_body_bytes).await?)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTenant {
    #[schema(value_type = crate::http::openapi::Name)]
    name: String,
    #[serde(default)]
    isolation: Isolation,
    #[serde(default, deserialize_with = "whole::opt")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    requests_per_minute: Option<u32>,
    #[serde(default, deserialize_with = "whole::opt")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    tokens_per_minute: Option<u32>,
    /// Tokens per minute of batch lines, apart from the interactive limits.
    #[serde(default, deserialize_with = "whole::opt")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    batch_tokens_per_minute: Option<u32>,
    #[schema(minimum = 0, maximum = 1e9)]
    monthly_budget_usd: Option<f64>,
    /// `sheddable`: refused first (503, `Retry-After`) when the replicas
    /// are full, instead of waiting.
    #[serde(default)]
    priority: Priority,
}

impl AdminBody for CreateTenant {
    fn check(&self) -> Result<(), ApiError> {
        check_name(&self.name, "name")?;
        check_limit(self.requests_per_minute, "requests_per_minute")?;
        check_limit(self.tokens_per_minute, "tokens_per_minute")?;
        check_limit(self.batch_tokens_per_minute, "batch_tokens_per_minute")?;
        check_budget(self.monthly_budget_usd)
    }
}

#[utoipa::path(
    post,
    path = "/admin/v1/tenants",
    tag = "admin",
    summary = "Create a tenant (platform admin)",
    request_body = CreateTenant,
    responses((status = 201, description = "Created", body = crate::http::openapi::Tenant), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn create_tenant(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    req: Request,
) -> Response {
    let result = async {
        role_allows(&p, Need::Platform)?;
        let c: CreateTenant = body_of(&state, req).await?;
        let tenant = Tenant {
            id: TenantId::new(),
            name: c.name,
            isolation: c.isolation,
            limits: RateLimits {
                requests_per_minute: c.requests_per_minute,
                tokens_per_minute: c.tokens_per_minute,
                batch_tokens_per_minute: c.batch_tokens_per_minute,
            },
            monthly_budget_usd: c.monthly_budget_usd,
            priority: c.priority,
            created_at_ms: strata_core::now_ms(),
        };
        state
            .tenants
            .create_tenant(&tenant)
            .await
            .map_err(store_error)?;
        Ok((StatusCode::CREATED, tenant_json(&tenant)))
    }
    .await;
    let target = result.as_ref().map_or(String::new(), |(_, v)| {
        v["id"].as_str().unwrap_or("").to_owned()
    });
    state
        .audit
        .finish(&p, "tenant.create", &target, &target, result)
        .await
}

#[utoipa::path(
    get,
    path = "/admin/v1/tenants",
    tag = "admin",
    summary = "The tenants the key may see",
    responses((status = 200, description = "OK", body = crate::http::openapi::List), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn list_tenants(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
) -> Response {
    let result = async {
        let tenants = if p.is_platform_admin() {
            state.tenants.tenants().await.map_err(store_error)?
        } else {
            role_allows(&p, Need::Read)?;
            state
                .tenants
                .tenant(&p.tenant.id)
                .await
                .map_err(store_error)?
                .into_iter()
                .collect()
        };
        Ok((
            StatusCode::OK,
            list_json(tenants.iter().map(tenant_json).collect()),
        ))
    }
    .await;
    state
        .audit
        .finish(&p, "tenant.list", p.tenant.id.as_str(), "", result)
        .await
}

#[utoipa::path(
    get,
    path = "/admin/v1/tenants/{tenant}",
    tag = "admin",
    summary = "A tenant",
    params(("tenant" = String, Path, description = "A tenant id (`ten_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::Tenant), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn show_tenant(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let result = visible_tenant(&state, &p, &id, Need::Read)
        .await
        .map(|t| (StatusCode::OK, tenant_json(&t)));
    state
        .audit
        .finish(&p, "tenant.read", &id, &id, result)
        .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateTenant {
    #[schema(value_type = Option<crate::http::openapi::Name>)]
    name: Option<String>,
    isolation: Option<Isolation>,
    #[serde(default, deserialize_with = "present_whole")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    requests_per_minute: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present_whole")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    tokens_per_minute: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present_whole")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    batch_tokens_per_minute: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(minimum = 0, maximum = 1e9)]
    monthly_budget_usd: Option<Option<f64>>,
    priority: Option<Priority>,
}

impl AdminBody for UpdateTenant {
    fn check(&self) -> Result<(), ApiError> {
        if let Some(name) = &self.name {
            check_name(name, "name")?;
        }
        if let Some(v) = self.requests_per_minute {
            check_limit(v, "requests_per_minute")?;
        }
        if let Some(v) = self.tokens_per_minute {
            check_limit(v, "tokens_per_minute")?;
        }
        if let Some(v) = self.batch_tokens_per_minute {
            check_limit(v, "batch_tokens_per_minute")?;
        }
        if let Some(v) = self.monthly_budget_usd {
            check_budget(v)?;
        }
        Ok(())
    }
}

#[utoipa::path(
    patch,
    path = "/admin/v1/tenants/{tenant}",
    tag = "admin",
    summary = "Change a tenant's name, isolation, limits, budget or priority",
    params(("tenant" = String, Path, description = "A tenant id (`ten_…`)")),
    request_body(content = Option<UpdateTenant>, description = "The fields to change; none (or no body) changes nothing"),
    responses((status = 200, description = "OK", body = crate::http::openapi::Tenant), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn update_tenant(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
    req: Request,
) -> Response {
    let result = async {
        let mut t = visible_tenant(&state, &p, &id, Need::Platform).await?;
        let u: UpdateTenant = body_of(&state, req).await?;
        if let Some(name) = u.name {
            t.name = name;
        }
        if let Some(i) = u.isolation {
            t.isolation = i;
        }
        if let Some(v) = u.requests_per_minute {
            t.limits.requests_per_minute = v;
        }
        if let Some(v) = u.tokens_per_minute {
            t.limits.tokens_per_minute = v;
        }
        if let Some(v) = u.batch_tokens_per_minute {
            t.limits.batch_tokens_per_minute = v;
        }
        if let Some(v) = u.monthly_budget_usd {
            t.monthly_budget_usd = v;
        }
        if let Some(v) = u.priority {
            t.priority = v;
        }
        if !state.tenants.update_tenant(&t).await.map_err(store_error)? {
            return Err(not_found("tenant", &id));
        }
        state.auth.forget_tenant(&id);
        Ok((StatusCode::OK, tenant_json(&t)))
    }
    .await;
    state
        .audit
        .finish(&p, "tenant.update", &id, &id, result)
        .await
}

#[utoipa::path(
    delete,
    path = "/admin/v1/tenants/{tenant}",
    tag = "admin",
    summary = "Delete a tenant and shred its data key",
    params(("tenant" = String, Path, description = "A tenant id (`ten_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::Deleted), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn delete_tenant(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let result = async {
        let t = visible_tenant(&state, &p, &id, Need::Platform).await?;
        if t.id.is_platform() {
            return Err(ApiError::forbidden(
                "The platform tenant cannot be deleted.",
            ));
        }
        state
            .tenants
            .delete_tenant(&t.id)
            .await
            .map_err(store_error)?;
        state.auth.forget_tenant(&id);
        let kek_rotated = shred_after(&state, &id).await;
        Ok((
            StatusCode::OK,
            json!({"object": "tenant.deleted", "id": id, "deleted": true, "kek_rotated": kek_rotated}),
        ))
    }
    .await;
    state
        .audit
        .finish(&p, "tenant.delete", &id, &id, result)
        .await
}

/// What follows a tenant's deletion (its data key is already destroyed):
/// its cells leave every replica's prefix cache, its snapshot files go,
/// and, where the KEK is a file and `rotate_kek_on_shred` holds, every
/// surviving data key is wrapped under a new KEK and the old one destroyed,
/// so a backup taken before (database and keyring) no longer opens with the
/// KEK in use. Whether the KEK was rotated.
async fn shred_after(state: &Admin, tenant: &str) -> bool {
    let body = json!({"scope": tenant});
    for r in state.replicas.snapshot().iter() {
        let url = format!("{}{}", r.endpoint.url, strata_core::KV_FORGET_PATH);
        let sent = state
            .client
            .post(url)
            .json(&body)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        // An engine without the route (not strata's) keeps its cache.
        if let Err(e) = sent {
            tracing::warn!(replica = %r.endpoint.id, error = %e, "cannot drop a deleted tenant's cells");
        }
    }
    if let Some(snapshots) = &state.snapshots {
        if let Err(e) = snapshots.forget_tenant(tenant) {
            tracing::warn!(error = %e, "cannot remove a deleted tenant's snapshot files");
        }
    }
    let Some(vault) = state.vault.as_ref().filter(|_| state.rotate_kek_on_shred) else {
        return false;
    };
    let KekSource::File(path) = vault.kek_source() else {
        tracing::warn!("the KEK comes from STRATA_KEK: not rotated after the shred");
        return false;
    };
    match vault.rotate_kek_to_file(Kek::generate(), &path).await {
        Ok(id) => {
            tracing::info!(kek = %id, "KEK rotated after a shred");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "KEK rotation after a shred failed; the old KEK is still in use");
            false
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateKey {
    #[schema(value_type = crate::http::openapi::Name)]
    name: String,
    role: Role,
    #[schema(value_type = Option<Vec<crate::http::openapi::ModelId>>, min_items = 1, max_items = 64)]
    models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "whole::opt")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    requests_per_minute: Option<u32>,
    #[serde(default, deserialize_with = "whole::opt")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    tokens_per_minute: Option<u32>,
    /// Tokens per minute of batch lines, apart from the interactive limits.
    #[serde(default, deserialize_with = "whole::opt")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    batch_tokens_per_minute: Option<u32>,
    /// Unix seconds; must be in the future.
    #[serde(default, deserialize_with = "whole::opt")]
    #[schema(minimum = 1)]
    expires_at: Option<i64>,
    /// `sheddable`: refused first (503, `Retry-After`) when the replicas
    /// are full; a key of a sheddable tenant is sheddable whatever this says.
    #[serde(default)]
    priority: Priority,
}

impl AdminBody for CreateKey {
    fn check(&self) -> Result<(), ApiError> {
        check_name(&self.name, "name")?;
        check_limit(self.requests_per_minute, "requests_per_minute")?;
        check_limit(self.tokens_per_minute, "tokens_per_minute")?;
        check_limit(self.batch_tokens_per_minute, "batch_tokens_per_minute")?;
        if let Some(models) = &self.models {
            if models.is_empty()
                || models.len() > MAX_MODELS
                || models.iter().any(|m| m.is_empty() || m.len() > 256)
            {
                return Err(ApiError::invalid_request(
                    Some("models"),
                    format!("`models` must list 1 to {MAX_MODELS} model ids, or be null for all models."),
                ));
            }
        }
        if self
            .expires_at
            .is_some_and(|e| e.saturating_mul(1000) <= strata_core::now_ms())
        {
            return Err(ApiError::invalid_request(
                Some("expires_at"),
                "`expires_at` must be in the future (Unix seconds).",
            ));
        }
        Ok(())
    }
}

#[utoipa::path(
    post,
    path = "/admin/v1/tenants/{tenant}/keys",
    tag = "admin",
    summary = "Create a key (its secret is shown once)",
    params(("tenant" = String, Path, description = "A tenant id (`ten_…`)")),
    request_body = CreateKey,
    responses((status = 201, description = "Created", body = crate::http::openapi::ApiKey), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn create_key(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
    req: Request,
) -> Response {
    let result = async {
        let t = visible_tenant(&state, &p, &id, Need::Manage).await?;
        let c: CreateKey = body_of(&state, req).await?;
        let (mut record, secret) = new_key_record(&t.id, c.name, c.role);
        record.models = c.models;
        record.limits = RateLimits {
            requests_per_minute: c.requests_per_minute,
            tokens_per_minute: c.tokens_per_minute,
            batch_tokens_per_minute: c.batch_tokens_per_minute,
        };
        record.expires_at_ms = c.expires_at.map(|e| e.saturating_mul(1000));
        record.priority = c.priority;
        state.keys.create_key(&record).await.map_err(store_error)?;
        let mut body = key_json(&record);
        body["key"] = Value::String(secret);
        Ok((StatusCode::CREATED, body))
    }
    .await;
    let target = result.as_ref().map_or(String::new(), |(_, v)| {
        v["id"].as_str().unwrap_or("").to_owned()
    });
    state
        .audit
        .finish(&p, "key.create", &id, &target, result)
        .await
}

#[utoipa::path(
    get,
    path = "/admin/v1/tenants/{tenant}/keys",
    tag = "admin",
    summary = "A tenant's keys (no secrets)",
    params(("tenant" = String, Path, description = "A tenant id (`ten_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::List), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn list_keys(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let result = async {
        let t = visible_tenant(&state, &p, &id, Need::Read).await?;
        let keys = state.keys.keys(&t.id).await.map_err(store_error)?;
        Ok((
            StatusCode::OK,
            list_json(keys.iter().map(key_json).collect()),
        ))
    }
    .await;
    state.audit.finish(&p, "key.list", &id, "", result).await
}

#[utoipa::path(
    get,
    path = "/admin/v1/tenants/{tenant}/keys/{key}",
    tag = "admin",
    summary = "A key (no secret)",
    params(("tenant" = String, Path, description = "A tenant id (`ten_…`)"), ("key" = String, Path, description = "A key id (`key_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::ApiKey), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn show_key(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath((id, key)): UrlPath<(String, String)>,
) -> Response {
    let result = async {
        let t = visible_tenant(&state, &p, &id, Need::Read).await?;
        let k = state
            .keys
            .key(&t.id, &key)
            .await
            .map_err(store_error)?
            .ok_or_else(|| not_found("key", &key))?;
        Ok((StatusCode::OK, key_json(&k)))
    }
    .await;
    state.audit.finish(&p, "key.read", &id, &key, result).await
}

#[utoipa::path(
    delete,
    path = "/admin/v1/tenants/{tenant}/keys/{key}",
    tag = "admin",
    summary = "Revoke a key",
    params(("tenant" = String, Path, description = "A tenant id (`ten_…`)"), ("key" = String, Path, description = "A key id (`key_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::ApiKey), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn revoke_key(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath((id, key)): UrlPath<(String, String)>,
) -> Response {
    let result = async {
        let t = visible_tenant(&state, &p, &id, Need::Manage).await?;
        if !state
            .keys
            .revoke_key(&t.id, &key, strata_core::now_ms())
            .await
            .map_err(store_error)?
        {
            return Err(not_found("key", &key));
        }
        state.auth.forget_tenant(&id);
        let k = state
            .keys
            .key(&t.id, &key)
            .await
            .map_err(store_error)?
            .ok_or_else(|| not_found("key", &key))?;
        Ok((StatusCode::OK, key_json(&k)))
    }
    .await;
    state
        .audit
        .finish(&p, "key.revoke", &id, &key, result)
        .await
}

fn usage_json(totals: Vec<strata_core::store::UsageTotals>) -> Value {
    list_json(
        totals
            .into_iter()
            .map(|u| {
                json!({
                    "object": "usage", "model": u.model, "requests": u.requests,
                    "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                    "cost_usd": u.cost_usd,
                })
            })
            .collect(),
    )
}

#[utoipa::path(
    get,
    path = "/admin/v1/tenants/{tenant}/usage",
    tag = "admin",
    summary = "A tenant's usage by model and its month's spend",
    params(("tenant" = String, Path, description = "A tenant id (`ten_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::UsageReport), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn tenant_usage(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let result = async {
        let t = visible_tenant(&state, &p, &id, Need::Read).await?;
        let totals = state
            .usage
            .usage_totals(Some(&t.id))
            .await
            .map_err(store_error)?;
        let month = state
            .usage
            .tenant_spend(
                &t.id,
                strata_core::calendar::month_start_ms(strata_core::now_ms()),
            )
            .await
            .map_err(store_error)?;
        let mut body = usage_json(totals);
        body["tenant_id"] = json!(t.id);
        body["month_spend_usd"] = json!(month);
        body["monthly_budget_usd"] = json!(t.monthly_budget_usd);
        Ok((StatusCode::OK, body))
    }
    .await;
    state.audit.finish(&p, "usage.read", &id, "", result).await
}

#[utoipa::path(
    get,
    path = "/admin/v1/usage",
    tag = "admin",
    summary = "Usage by model over all tenants (platform admin)",
    responses((status = 200, description = "OK", body = crate::http::openapi::UsageReport), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn all_usage(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
) -> Response {
    let result = async {
        role_allows(&p, Need::Platform)?;
        let totals = state.usage.usage_totals(None).await.map_err(store_error)?;
        Ok((StatusCode::OK, usage_json(totals)))
    }
    .await;
    state.audit.finish(&p, "usage.read", "*", "", result).await
}

#[utoipa::path(
    get,
    path = "/admin/v1/audit",
    tag = "admin",
    summary = "The audit trail (a tenant admin sees its tenant's), a page at a time",
    params(
        ("after" = Option<i64>, Query, description = "The `seq` of the last row of the previous page"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Rows per page, 1 to 1000 (default 100)"),
    ),
    responses((status = 200, description = "OK", body = crate::http::openapi::List), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn audit(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    Query(page): Query<AuditPage>,
) -> Response {
    let result = async {
        role_allows(&p, Need::Manage)?;
        let limit = page.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid_request(
                Some("limit"),
                "limit must be between 1 and 1000.",
            ));
        }
        let scope = (!p.is_platform_admin()).then_some(&p.tenant.id);
        // One more than asked: whether another page follows.
        let mut rows = state
            .trail
            .audit_page(scope, page.after.unwrap_or(0), limit + 1)
            .await
            .map_err(store_error)?;
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok((
            StatusCode::OK,
            json!({"object": "list", "data": rows, "has_more": has_more,
                   "first_id": rows.first().map(|r| r.seq), "last_id": rows.last().map(|r| r.seq)}),
        ))
    }
    .await;
    state
        .audit
        .finish(&p, "audit.read", p.tenant.id.as_str(), "", result)
        .await
}

/// `GET /admin/v1/audit`'s page.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditPage {
    after: Option<i64>,
    limit: Option<u32>,
}

#[utoipa::path(
    post,
    path = "/admin/v1/kek/rotate",
    tag = "admin",
    summary = "Re-wrap every data key under a new KEK (platform admin)",
    responses((status = 200, description = "OK", body = Object, description = "`{object: kek, previous_id, id}`"), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn rotate_kek(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
) -> Response {
    let result = async {
        role_allows(&p, Need::Platform)?;
        let vault = state
            .vault
            .as_ref()
            .ok_or_else(|| ApiError::invalid_request(None, "This gateway holds no keyring."))?;
        let KekSource::File(path) = vault.kek_source() else {
            return Err(ApiError::invalid_request(
                None,
                "The KEK comes from STRATA_KEK; rotate it by restarting with a new value after re-wrapping offline.",
            ));
        };
        let old = vault.kek_id();
        let new = Kek::generate();
        let id = vault.rotate_kek_to_file(new, &path).await.map_err(|e| {
            tracing::error!(error = %e, "KEK rotation failed");
            ApiError::internal("KEK rotation failed; the old KEK is still in use.")
        })?;
        Ok((StatusCode::OK, json!({"object": "kek", "previous_id": old, "id": id})))
    }
    .await;
    state.audit.finish(&p, "kek.rotate", "*", "", result).await
}

/// `GET /admin/v1/replicas` (platform admins): this gateway's replicas, with
/// their addresses, state, the dedicated tenant each is reserved for, and
/// their outstanding tokens (what `/health` showed to anyone before).
#[utoipa::path(
    get,
    path = "/admin/v1/replicas",
    tag = "admin",
    summary = "This gateway's replicas: address, state, reservation, load",
    responses((status = 200, description = "OK", body = crate::http::openapi::List), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn list_replicas(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
) -> Response {
    let result = async {
        role_allows(&p, Need::Platform)?;
        let replicas = state
            .replicas
            .snapshot()
            .iter()
            .map(|r| {
                json!({
                    "object": "replica",
                    "id": r.endpoint.id, "url": r.endpoint.url, "ready": r.is_ready(),
                    "draining": r.is_draining(), "reserved_for": r.endpoint.reserved_for,
                    "model": r.endpoint.model,
                    "outstanding_tokens": r.outstanding_tokens(),
                })
            })
            .collect();
        Ok((StatusCode::OK, list_json(replicas)))
    }
    .await;
    state
        .audit
        .finish(&p, "replica.list", p.tenant.id.as_str(), "", result)
        .await
}

/// `POST /admin/v1/replicas/{id}/drain` (platform admins): the replica
/// takes no new requests; once its running ones end (up to 30 s) its
/// sessions' KV caches are kept as sealed snapshots for the next turns.
#[utoipa::path(
    post,
    path = "/admin/v1/replicas/{id}/drain",
    tag = "admin",
    summary = "Drain a replica: no new requests, sessions kept as snapshots",
    params(("id" = String, Path, description = "A replica id")),
    responses((status = 200, description = "OK", body = Object, description = "What was drained"), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn drain_replica(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let result = async {
        role_allows(&p, Need::Platform)?;
        let snapshots = state.snapshots.as_ref().ok_or_else(|| {
            ApiError::invalid_request(None, "This gateway keeps no KV snapshots.")
        })?;
        let drained = snapshots
            .drain(&state.replicas, &state.client, &id, Duration::from_secs(30))
            .await?;
        Ok((StatusCode::OK, json!(drained)))
    }
    .await;
    state
        .audit
        .finish(&p, "replica.drain", "*", &id, result)
        .await
}

/// `POST /admin/v1/replicas/{id}/undrain` (platform admins): a drained
/// replica that is still up takes requests again.
#[utoipa::path(
    post,
    path = "/admin/v1/replicas/{id}/undrain",
    tag = "admin",
    summary = "Route to a drained replica again",
    params(("id" = String, Path, description = "A replica id")),
    responses((status = 200, description = "OK", body = Object), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn undrain_replica(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let result = async {
        role_allows(&p, Need::Platform)?;
        let replica = state
            .replicas
            .find(&id)
            .ok_or_else(|| ApiError::not_found(format!("No replica with id `{id}`.")))?;
        replica.set_draining(false);
        Ok((StatusCode::OK, json!({"replica": id, "draining": false})))
    }
    .await;
    state
        .audit
        .finish(&p, "replica.undrain", "*", &id, result)
        .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Preempt {
    /// Seconds between the notice and the machine going away.
    #[schema(minimum = 0, maximum = 3600)]
    notice_secs: Option<f64>,
}

impl AdminBody for Preempt {
    fn check(&self) -> Result<(), ApiError> {
        match self.notice_secs {
            Some(s) if !s.is_finite() || !(0.0..=3600.0).contains(&s) => {
                Err(ApiError::invalid_request(
                    Some("notice_secs"),
                    "`notice_secs` must be between 0 and 3600.",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// `POST /admin/v1/replicas/{id}/preempt` (platform admins): emulates a
/// spot reclaim of the replica, as a cloud's interruption notice would
/// announce it: the provider drains it, plans a replacement at once, and
/// stops it when the notice runs out (default: `pool.preemption_notice_secs`).
#[utoipa::path(
    post,
    path = "/admin/v1/replicas/{id}/preempt",
    tag = "admin",
    summary = "Report a preemption notice for a replica",
    params(("id" = String, Path, description = "A replica id")),
    request_body(content = Option<Preempt>, description = "Optional: no body takes `pool.preemption_notice_secs`"),
    responses((status = 202, description = "Accepted", body = Object), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn preempt_replica(
    State(state): State<Arc<Admin>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
    req: Request,
) -> Response {
    let result = async {
        role_allows(&p, Need::Platform)?;
        let b: Preempt = body_of(&state, req).await?;
        let notices = state.notices.as_ref().ok_or_else(|| {
            ApiError::invalid_request(
                None,
                "This gateway's replicas have no provider here (`strata serve` has one).",
            )
        })?;
        let notice = b.notice_secs.map(Duration::from_secs_f64);
        if state.replicas.find(&id).is_none() {
            return Err(ApiError::not_found(format!("No replica with id `{id}`.")));
        }
        notices
            .send(strata_core::link::PreemptNotice {
                replica: id.clone(),
                notice,
            })
            .await
            .map_err(|_| ApiError::unavailable("The provider is not running."))?;
        Ok((
            StatusCode::ACCEPTED,
            json!({"replica": id, "preempting": true, "notice_secs": b.notice_secs}),
        ))
    }
    .await;
    state
        .audit
        .finish(&p, "replica.preempt", "*", &id, result)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_optional_body_may_be_missing_or_null_and_integers_may_be_written_as_412_0() {
        for none in [&b""[..], b"null", b" null\n"] {
            let u: UpdateTenant = parse_admin(none).unwrap();
            assert!(u.name.is_none() && u.tokens_per_minute.is_none());
        }
        let u: UpdateTenant =
            parse_admin(br#"{"tokens_per_minute": 412.0, "requests_per_minute": null}"#).unwrap();
        assert_eq!(u.tokens_per_minute, Some(Some(412)));
        assert_eq!(u.requests_per_minute, Some(None));
        // A body a route needs is still needed.
        let e = parse_admin::<CreateTenant>(b"null").err().unwrap();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("name"), "{}", e.message);
    }

    #[test]
    fn fractions_and_out_of_range_integers_are_refused_naming_the_field() {
        for (body, field) in [
            (&br#"{"tokens_per_minute": 1.5}"#[..], "tokens_per_minute"),
            (br#"{"requests_per_minute": -1.0}"#, "requests_per_minute"),
            (br#"{"requests_per_minute": 0}"#, "requests_per_minute"),
        ] {
            let e = parse_admin::<UpdateTenant>(body).err().unwrap();
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(field), "{}", e.message);
        }
    }
}
