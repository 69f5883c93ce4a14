//! `/admin/v1/models` (platform admins): the catalog of models this
//! platform serves, one pool each. Models of the config file are listed
//! and read-only here; models deployed through this API are kept in the
//! database, checked before they are stored (settings; under `strata
//! serve`, which runs the pools, also the file and its sha256), and
//! started, replaced or drained and stopped by whatever runs the pools
//! (`strata serve`, or a cluster's acting controller). Aliases name models
//! of the catalog by weight. Every action is audited.

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{FromRef, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};
use strata_core::config::ModelEntry;
use strata_core::openai::parse_body;
use strata_core::store::{DeployedModel, ModelStore};
use strata_core::{read_body, ApiError};
use tokio::sync::watch;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::catalog::CatalogModel;
use crate::fleet::replicas::ReplicaSet;
use crate::http::error::store_error;
use crate::http::extract::Path as UrlPath;
use crate::ops::admin::{list_json, role_allows, Need};
use crate::tenancy::audit::Audit;
use crate::tenancy::principal::Principal;

/// The process that runs the pools (`strata serve`): what it declares, what
/// it can serve, and a nudge when the stored catalog changes.
#[async_trait]
pub trait ModelHost: Send + Sync {
    /// Model ids the config file declares (changed there, not here).
    fn declared(&self) -> Vec<String>;
    /// Why `entry` cannot be served here (its settings, its file, its
    /// sha256), if it cannot.
    async fn check(&self, entry: &ModelEntry) -> Result<(), String>;
    /// The stored catalog changed: apply it now rather than at the next look.
    fn changed(&self);
}

/// The state of the model routes.
pub struct Models {
    pub store: Arc<dyn ModelStore>,
    /// `None`: no pools follow this gateway's catalog (`strata gateway`
    /// with fixed `--replica`s): the routes list, but deploy nothing.
    pub host: Option<Arc<dyn ModelHost>>,
    /// The models the pools serve now.
    pub catalog: watch::Receiver<Vec<CatalogModel>>,
    pub replicas: Arc<ReplicaSet>,
    pub audit: Audit,
    pub max_body_bytes: usize,
}

/// The model routes, for a router whose state holds a `Models`.
pub fn routes<S>() -> OpenApiRouter<S>
where
    Arc<Models>: FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    OpenApiRouter::new()
        .routes(routes!(deploy, list))
        .routes(routes!(show, update, undeploy))
}

/// A model to deploy: the `[[models]]` entry of the config, as JSON.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) struct ModelSpec {
    /// The model id clients send.
    #[schema(min_length = 1, max_length = 256, pattern = r"^\S+$")]
    id: String,
    /// A built-in model (`strata model fetch --model` ids); or `path`.
    source: Option<String>,
    /// A GGUF file on the machine running the pools.
    path: Option<String>,
    /// A GGUF file to download: `https://…`, `http://…` or
    /// `s3://BUCKET/KEY` (needs `sha256`; cached by hash).
    url: Option<String>,
    /// The file's SHA-256, checked before a replica loads it.
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    sha256: Option<String>,
    #[schema(minimum = 1, maximum = 64)]
    replicas: Option<u32>,
    /// `{"prompt_per_million": …, "completion_per_million": …}`.
    price: Option<Object>,
    /// `[engine]` keys this model sets for itself.
    engine: Option<Object>,
    /// `[pool]` keys this model's pool sets for itself.
    pool: Option<Object>,
    /// The model's own throughput profile on instance types, by type name,
    /// key by key over `[instance_types]`.
    instance_types: Option<Object>,
    /// An alias instead of a model: models of the catalog by weight
    /// (`{"v1": 90, "v2": 10}`), nothing else but `id`.
    alias: Option<std::collections::BTreeMap<String, u32>>,
}

type Object = std::collections::BTreeMap<String, Value>;

const MAX_ID: usize = 256;
/// How long a deploy or undeploy waits for the pools to apply it before it
/// answers (what it answers is true either way: `serving` says which).
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn entry_json(entry: &ModelEntry) -> Value {
    serde_json::to_value(entry).unwrap_or_else(|_| json!({"id": entry.id}))
}

impl Models {
    fn host(&self) -> Result<&Arc<dyn ModelHost>, ApiError> {
        self.host.as_ref().ok_or_else(|| {
            ApiError::invalid_request(
                None,
                "No pools follow this gateway's catalog (fixed replicas): models are deployed through `strata serve` or a cluster's gateways.",
            )
            .with_code("no_model_host")
        })
    }

    fn declared(&self) -> Vec<String> {
        self.host.as_ref().map(|h| h.declared()).unwrap_or_default()
    }

    async fn stored(&self, id: &str) -> Result<Option<DeployedModel>, ApiError> {
        Ok(self
            .store
            .models()
            .await
            .map_err(store_error)?
            .into_iter()
            .find(|m| m.id == id))
    }

    /// What the API shows of a model: where it is declared, its entry, and
    /// its pool now.
    fn view(
        &self,
        id: &str,
        managed: &str,
        spec: Value,
        deployed: Option<&DeployedModel>,
    ) -> Value {
        let replicas = self.replicas.of_model(id);
        json!({
            "object": "model.deployment",
            "id": id,
            "managed_by": managed,
            "spec": spec,
            "serving": self.catalog.borrow().iter().any(|m| m.id == id),
            "replicas": replicas.0,
            "replicas_ready": replicas.1,
            "created_at": deployed.map(|d| d.created_at_ms / 1000),
            "updated_at": deployed.map(|d| d.updated_at_ms / 1000),
        })
    }

    /// The entry after its checks: its own (id, keys) and the host's.
    async fn checked(&self, entry: ModelEntry) -> Result<ModelEntry, ApiError> {
        if entry.id.is_empty()
            || entry.id.len() > MAX_ID
            || entry.id.chars().any(char::is_whitespace)
        {
            return Err(ApiError::invalid_request(
                Some("id"),
                "`id` must be 1 to 256 characters without spaces.",
            ));
        }
        let invalid = |e: String| ApiError::invalid_request(None, e).with_code("invalid_model");
        let host = self.host()?;
        if entry.is_alias() {
            // An alias names models the pools serve now.
            let catalog = self.catalog.borrow();
            let served = |id: &str| catalog.iter().any(|m| m.id == id && !m.is_alias());
            if let Some(issue) = entry.alias_issues(&served).into_iter().next() {
                return Err(invalid(format!("alias: {issue}")));
            }
            return Ok(entry);
        }
        host.check(&entry).await.map_err(invalid)?;
        Ok(entry)
    }

    /// The aliases of the catalog that name `id`.
    fn aliases_of(&self, id: &str) -> Vec<String> {
        self.catalog
            .borrow()
            .iter()
            .filter(|m| m.alias.contains_key(id))
            .map(|m| m.id.clone())
            .collect()
    }

    /// Audits an action on the catalog (the platform's, in the acting
    /// platform admin's trail) and answers with its result.
    async fn finish(
        &self,
        p: &Principal,
        action: &str,
        target: &str,
        result: Result<(StatusCode, Value), ApiError>,
    ) -> Response {
        let platform = p.tenant.id.to_string();
        self.audit
            .finish(p, action, &platform, target, result)
            .await
    }

    /// Waits (a few seconds at most) for the pools to apply the stored
    /// catalog: until `entry` is served (an alias: with its weights).
    async fn applied(&self, entry: &ModelEntry) {
        let mut catalog = self.catalog.clone();
        let _ = tokio::time::timeout(
            APPLY_WAIT,
            catalog.wait_for(|c| c.iter().any(|m| m.id == entry.id && m.alias == entry.alias)),
        )
        .await;
    }

    async fn keep(&self, entry: &ModelEntry, created_at_ms: i64) -> Result<(), ApiError> {
        let now = strata_core::now_ms();
        let spec = serde_json::to_string(entry).map_err(|e| ApiError::internal(e.to_string()))?;
        self.store
            .put_model(&DeployedModel {
                id: entry.id.clone(),
                spec,
                created_at_ms: if created_at_ms > 0 {
                    created_at_ms
                } else {
                    now
                },
                updated_at_ms: now,
            })
            .await
            .map_err(store_error)?;
        if let Some(host) = &self.host {
            host.changed();
        }
        Ok(())
    }
}

async fn body(state: &Models, req: Request) -> Result<Value, ApiError> {
    let bytes = read_body(req.into_body(), state.max_body_bytes).await?;
    let value: Value = parse_body(&bytes)?;
    if !value.is_object() {
        return Err(ApiError::invalid_request(
            None,
            "The body must be a JSON object.",
        ));
    }
    Ok(value)
}

fn entry_of(value: Value) -> Result<ModelEntry, ApiError> {
    let bytes = serde_json::to_vec(&value).map_err(|e| ApiError::internal(e.to_string()))?;
    parse_body::<ModelEntry>(&bytes)
}

/// `POST /admin/v1/models`: deploys a model; its pool starts as its entry
/// says (from zero, where it scales to zero).
#[utoipa::path(
    post,
    path = "/admin/v1/models",
    tag = "admin",
    summary = "Deploy a model (platform admin)",
    request_body = ModelSpec,
    responses((status = 201, description = "Deployed", body = Object), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn deploy(
    State(state): State<Arc<Models>>,
    Extension(p): Extension<Arc<Principal>>,
    req: Request,
) -> Response {
    let mut target = String::new();
    let result = async {
        role_allows(&p, Need::Platform)?;
        let entry = entry_of(body(&state, req).await?)?;
        target = entry.id.clone();
        if state.declared().contains(&entry.id) || state.stored(&entry.id).await?.is_some() {
            return Err(ApiError::conflict(format!(
                "A model `{}` is deployed already; PATCH it, or DELETE it first.",
                entry.id
            ))
            .with_code("model_exists"));
        }
        let entry = state.checked(entry).await?;
        state.keep(&entry, 0).await?;
        state.applied(&entry).await;
        let stored = state.stored(&entry.id).await?;
        Ok((
            StatusCode::CREATED,
            state.view(&entry.id, "api", entry_json(&entry), stored.as_ref()),
        ))
    }
    .await;
    state.finish(&p, "model.deploy", &target, result).await
}

/// `GET /admin/v1/models`: every model of the catalog, the config file's
/// and those deployed here, with its pool's replicas.
#[utoipa::path(
    get,
    path = "/admin/v1/models",
    tag = "admin",
    summary = "The catalog of models and their pools (platform admin)",
    responses((status = 200, description = "OK", body = crate::http::openapi::List), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn list(
    State(state): State<Arc<Models>>,
    Extension(p): Extension<Arc<Principal>>,
) -> Response {
    let result = async {
        role_allows(&p, Need::Platform)?;
        let mut data: Vec<Value> = state
            .declared()
            .iter()
            .map(|id| state.view(id, "config", json!({"id": id}), None))
            .collect();
        for m in state.store.models().await.map_err(store_error)? {
            let spec = serde_json::from_str(&m.spec).unwrap_or(Value::Null);
            data.push(state.view(&m.id, "api", spec, Some(&m)));
        }
        Ok((StatusCode::OK, list_json(data)))
    }
    .await;
    state.finish(&p, "model.list", "", result).await
}

async fn find(state: &Models, id: &str) -> Result<Value, ApiError> {
    if state.declared().iter().any(|d| d == id) {
        return Ok(state.view(id, "config", json!({"id": id}), None));
    }
    let m = state
        .stored(id)
        .await?
        .ok_or_else(|| ApiError::model_not_found(id))?;
    let spec = serde_json::from_str(&m.spec).unwrap_or(Value::Null);
    Ok(state.view(id, "api", spec, Some(&m)))
}

/// A model of the config file, which the API does not change.
fn declared_here(id: &str) -> ApiError {
    ApiError::conflict(format!(
        "The model `{id}` is declared in the config file; change it there."
    ))
    .with_code("model_in_config")
}

#[utoipa::path(
    get,
    path = "/admin/v1/models/{id}",
    tag = "admin",
    summary = "A model of the catalog and its pool (platform admin)",
    params(("id" = String, Path, description = "A model id")),
    responses((status = 200, description = "OK", body = Object), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn show(
    State(state): State<Arc<Models>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let result = async {
        role_allows(&p, Need::Platform)?;
        Ok((StatusCode::OK, find(&state, &id).await?))
    }
    .await;
    state.finish(&p, "model.read", &id, result).await
}

/// `PATCH /admin/v1/models/{id}`: a JSON merge patch of a deployed
/// model's entry (`null` removes a key); checked like a new one, then its
/// pool is replaced (drained, its sessions kept) by one of the new entry.
#[utoipa::path(
    patch,
    path = "/admin/v1/models/{id}",
    tag = "admin",
    summary = "Change a deployed model (platform admin)",
    params(("id" = String, Path, description = "A model id")),
    request_body = Object,
    responses((status = 200, description = "OK", body = Object), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn update(
    State(state): State<Arc<Models>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
    req: Request,
) -> Response {
    let result = async {
        role_allows(&p, Need::Platform)?;
        if state.declared().contains(&id) {
            return Err(declared_here(&id));
        }
        let stored = state
            .stored(&id)
            .await?
            .ok_or_else(|| ApiError::model_not_found(&id))?;
        let patch = body(&state, req).await?;
        let mut spec: Value = serde_json::from_str(&stored.spec).unwrap_or_else(|_| json!({}));
        merge_patch(&mut spec, &patch);
        let entry = entry_of(spec)?;
        if entry.id != id {
            return Err(ApiError::invalid_request(
                Some("id"),
                "A model's id cannot change; deploy it under the new id.",
            ));
        }
        let entry = state.checked(entry).await?;
        state.keep(&entry, stored.created_at_ms).await?;
        if entry.is_alias() {
            // New weights apply to the next request once answered.
            state.applied(&entry).await;
        }
        let stored = state.stored(&id).await?;
        Ok((
            StatusCode::OK,
            state.view(&id, "api", entry_json(&entry), stored.as_ref()),
        ))
    }
    .await;
    state.finish(&p, "model.update", &id, result).await
}

/// `DELETE /admin/v1/models/{id}`: undeploys a model: it leaves the
/// catalog at once (new requests for it get 404), its replicas drain (their
/// sessions' KV caches are kept as snapshots) and stop.
#[utoipa::path(
    delete,
    path = "/admin/v1/models/{id}",
    tag = "admin",
    summary = "Undeploy a model (platform admin)",
    params(("id" = String, Path, description = "A model id")),
    responses((status = 200, description = "OK", body = crate::http::openapi::Deleted), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
async fn undeploy(
    State(state): State<Arc<Models>>,
    Extension(p): Extension<Arc<Principal>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let result = async {
        role_allows(&p, Need::Platform)?;
        if state.declared().contains(&id) {
            return Err(declared_here(&id));
        }
        // An alias's clients would get 404s: the alias moves first.
        if let Some(alias) = state.aliases_of(&id).first() {
            return Err(ApiError::conflict(format!(
                "The alias `{alias}` names `{id}`; take `{id}` out of it first."
            ))
            .with_code("model_in_use"));
        }
        if !state.store.delete_model(&id).await.map_err(store_error)? {
            return Err(ApiError::model_not_found(&id));
        }
        if let Some(host) = &state.host {
            host.changed();
        }
        Ok((
            StatusCode::OK,
            json!({"id": id, "object": "model.deployment", "deleted": true}),
        ))
    }
    .await;
    state.finish(&p, "model.undeploy", &id, result).await
}

/// RFC 7396: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().expect("an object");
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_patch_replaces_merges_and_removes() {
        let mut spec = json!({"id": "m", "replicas": 1, "pool": {"min_replicas": 0, "max_replicas": 2}, "sha256": "x"});
        merge_patch(
            &mut spec,
            &json!({"replicas": 2, "pool": {"max_replicas": 4}, "sha256": null}),
        );
        assert_eq!(
            spec,
            json!({"id": "m", "replicas": 2, "pool": {"min_replicas": 0, "max_replicas": 4}})
        );
    }
}
