//! Stored chat completions (`store: true`): the request's messages and the
//! answer are kept, sealed under the tenant's data key, and read back through
//! `/v1/chat/completions/{id}`, its messages, the list, and delete. Every
//! query names the caller's tenant; another tenant's id is a plain 404.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;

use crate::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};
use strata_core::responses::{list_page, page_limit, PageQuery};
use strata_core::store::{Store, StoreError, StoredCompletion};
use strata_core::{read_body, ApiError};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::admin::{finish, record_audit, store_error};
use crate::auth::Principal;

/// Where and what to keep for one request.
pub struct Keep {
    pub store: Arc<dyn Store>,
    /// Whose request it was: the tenant owns the row, the key is audited.
    pub principal: Arc<Principal>,
    pub messages: Value,
    pub metadata: BTreeMap<String, String>,
}

impl Keep {
    /// Seals and writes the answer with its request; a failure is logged (the
    /// client already has its answer) and counted as not stored.
    pub async fn save(&self, mut completion: Value) {
        let Some(id) = completion["id"].as_str().map(str::to_owned) else {
            tracing::warn!("answer without an id; not stored");
            return;
        };
        completion["metadata"] = json!(self.metadata);
        let doc = json!({"completion": completion, "messages": self.messages});
        let record = StoredCompletion {
            id,
            created_at_ms: crate::now_ms(),
            model: completion["model"].as_str().unwrap_or_default().to_owned(),
            content: serde_json::to_vec(&doc).expect("JSON values serialise"),
        };
        let p = &self.principal;
        let written = self.store.put_completion(&p.tenant.id, &record).await;
        if let Err(e) = &written {
            tracing::error!(error = %e, id = %record.id, "cannot store the completion");
        }
        let result = if written.is_ok() { "ok" } else { "error" };
        record_audit(
            &*self.store,
            p,
            "completion.create",
            p.tenant.id.as_str(),
            &record.id,
            result,
        )
        .await;
    }
}

/// The answer of a streamed chat completion, put together chunk by chunk.
#[derive(Debug, Default)]
pub struct Transcript {
    id: Option<String>,
    created: Option<Value>,
    model: Option<String>,
    content: String,
    finish_reason: Option<Value>,
    usage: Option<Value>,
}

impl Transcript {
    pub fn observe(&mut self, chunk: &Value) {
        if self.id.is_none() {
            self.id = chunk["id"].as_str().map(str::to_owned);
            self.created = chunk.get("created").cloned();
            self.model = chunk["model"].as_str().map(str::to_owned);
        }
        if let Some(choice) = chunk["choices"].get(0) {
            if let Some(text) = choice["delta"]["content"].as_str() {
                self.content.push_str(text);
            }
            if !choice["finish_reason"].is_null() {
                self.finish_reason = Some(choice["finish_reason"].clone());
            }
        }
        if !chunk["usage"].is_null() {
            self.usage = Some(chunk["usage"].clone());
        }
    }

    /// Only an answer that ended (a finish reason arrived) is worth keeping.
    pub fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }

    pub fn into_completion(self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": self.content},
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }],
            "usage": self.usage,
        })
    }
}

pub fn routes(store: Arc<dyn Store>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(show, update, delete))
        .routes(routes!(messages))
        .with_state(store)
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No chat completion with id `{id}` is stored."))
}

fn content(c: &StoredCompletion) -> Result<Value, ApiError> {
    serde_json::from_slice(&c.content)
        .map_err(|_| ApiError::internal("A stored completion could not be read."))
}

async fn fetch(store: &dyn Store, p: &Principal, id: &str) -> Result<Value, ApiError> {
    let c = store
        .completion(&p.tenant.id, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(id))?;
    content(&c)
}

/// Audits an access to one of the caller's stored objects and renders it.
pub(crate) async fn answer(
    store: &dyn Store,
    p: &Principal,
    action: &str,
    target: &str,
    result: Result<Value, ApiError>,
) -> Response {
    let tenant = p.tenant.id.as_str();
    finish(
        store,
        p,
        action,
        tenant,
        target,
        result.map(|v| (StatusCode::OK, v)),
    )
    .await
}

/// Readers may look but not change or delete (`what`: "delete stored responses").
pub(crate) fn may_change(p: &Principal, what: &str) -> Result<(), ApiError> {
    if p.role().may_generate() {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "This key's role ({}) may not {what}.",
            p.role().as_str()
        )))
    }
}

#[utoipa::path(
    get,
    operation_id = "show_stored_completion",
    path = "/v1/chat/completions/{id}",
    tag = "openai",
    summary = "A stored chat completion",
    params(("id" = String, Path, description = "A completion id (`chatcmpl-…`)")),
    responses((status = 200, description = "OK", body = strata_core::openai::ChatCompletion), crate::openapi::Failures),
    security(("api_key" = []))
)]
async fn show(
    State(store): State<Arc<dyn Store>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = fetch(&*store, &p, &id)
        .await
        .map(|doc| doc["completion"].clone());
    answer(&*store, &p, "completion.read", &id, result).await
}

#[utoipa::path(
    get,
    operation_id = "list_stored_completion_messages",
    path = "/v1/chat/completions/{id}/messages",
    tag = "openai",
    summary = "The messages of a stored chat completion (oldest first unless `order=desc`)",
    params(("id" = String, Path, description = "A completion id (`chatcmpl-…`)"), crate::openapi::PageParams),
    responses((status = 200, description = "OK", body = crate::openapi::Page), crate::openapi::Failures),
    security(("api_key" = []))
)]
async fn messages(
    State(store): State<Arc<dyn Store>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(mut q): Query<PageQuery>,
) -> Response {
    let result = async {
        // Oldest first unless asked otherwise, as OpenAI lists them.
        q.order.get_or_insert_with(|| "asc".to_owned());
        let page = q.validate()?;
        let doc = fetch(&*store, &p, &id).await?;
        let all: Vec<Value> = doc["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, mut m)| {
                m["id"] = json!(format!("{id}-{i}"));
                m
            })
            .collect();
        let (data, more) = page.slice(&all, |m| m["id"].as_str().unwrap_or_default());
        Ok(list_page(data, more))
    }
    .await;
    answer(&*store, &p, "completion.messages", &id, result).await
}

/// `POST /v1/chat/completions/{id}`: replaces the metadata, the one part of a
/// stored completion OpenAI lets a caller change.
#[utoipa::path(
    post,
    operation_id = "update_stored_completion",
    path = "/v1/chat/completions/{id}",
    tag = "openai",
    summary = "Replace a stored completion's metadata",
    params(("id" = String, Path, description = "A completion id (`chatcmpl-…`)")),
    request_body = crate::conversations::MetadataUpdate,
    responses((status = 200, description = "OK", body = strata_core::openai::ChatCompletion), crate::openapi::Failures),
    security(("api_key" = []))
)]
async fn update(
    State(store): State<Arc<dyn Store>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Response {
    let result = async {
        may_change(&p, "change stored completions")?;
        // Sixteen pairs of at most 64 + 512 characters fit many times over.
        let body = read_body(req.into_body(), 64 * 1024).await?;
        let metadata = crate::conversations::parse_update(&body)?;
        let stored = store
            .completion(&p.tenant.id, &id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| not_found(&id))?;
        let mut doc = content(&stored)?;
        doc["completion"]["metadata"] = json!(metadata);
        store
            .put_completion(
                &p.tenant.id,
                &StoredCompletion {
                    content: serde_json::to_vec(&doc).expect("JSON values serialise"),
                    ..stored
                },
            )
            .await
            .map_err(store_error)?;
        Ok(doc["completion"].clone())
    }
    .await;
    answer(&*store, &p, "completion.update", &id, result).await
}

#[utoipa::path(
    delete,
    operation_id = "delete_stored_completion",
    path = "/v1/chat/completions/{id}",
    tag = "openai",
    summary = "Delete a stored chat completion",
    params(("id" = String, Path, description = "A completion id (`chatcmpl-…`)")),
    responses((status = 200, description = "OK", body = crate::openapi::Deleted), crate::openapi::Failures),
    security(("api_key" = []))
)]
async fn delete(
    State(store): State<Arc<dyn Store>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        may_change(&p, "delete stored completions")?;
        let done = store.delete_completion(&p.tenant.id, &id).await;
        let body = json!({"object": "chat.completion.deleted", "id": id, "deleted": true});
        deleted(done, body, || not_found(&id))
    }
    .await;
    answer(&*store, &p, "completion.delete", &id, result).await
}

/// What a delete route answers: `body` when the store deleted the object,
/// else `missing`'s 404.
pub(crate) fn deleted(
    done: Result<bool, StoreError>,
    body: Value,
    missing: impl FnOnce() -> ApiError,
) -> Result<Value, ApiError> {
    if done.map_err(store_error)? {
        Ok(body)
    } else {
        Err(missing())
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/chat/completions`: the tenant's stored completions, newest first.
pub async fn list(store: Arc<dyn Store>, p: Arc<Principal>, q: ListQuery) -> Response {
    let result = async {
        let limit = page_limit(q.limit.as_deref())?;
        let rows = store
            .completions(&p.tenant.id, q.after.as_deref(), limit + 1)
            .await
            .map_err(store_error)?;
        let has_more = rows.len() > limit as usize;
        let data = rows
            .iter()
            .take(limit as usize)
            .map(|c| content(c).map(|doc| doc["completion"].clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(list_page(data, has_more))
    }
    .await;
    answer(&*store, &p, "completion.list", "", result).await
}
