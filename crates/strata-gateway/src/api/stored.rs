//! Stored chat completions (`store: true`): the request's messages and the
//! answer are kept, sealed under the tenant's data key, and read back through
//! `/v1/chat/completions/{id}`, its messages, the list, and delete. Every
//! query names the caller's tenant; another tenant's id is a plain 404.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};
use strata_core::responses::{list_page, page_limit, page_of, PageQuery};
use strata_core::store::{CompletionStore, StoredCompletion};
use strata_core::{read_body, ApiError};

use crate::api::objects::{deleted, parse_update, NewestQuery, Objects};
use crate::http::error::store_error;
use crate::http::extract::{Path, Query};
use crate::tenancy::principal::Principal;

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No chat completion with id `{id}` is stored."))
}

fn content(c: &StoredCompletion) -> Result<Value, ApiError> {
    serde_json::from_slice(&c.content)
        .map_err(|_| ApiError::internal("A stored completion could not be read."))
}

async fn fetch(store: &dyn CompletionStore, p: &Principal, id: &str) -> Result<Value, ApiError> {
    let c = store
        .completion(&p.tenant.id, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(id))?;
    content(&c)
}

#[utoipa::path(
    get,
    operation_id = "show_stored_completion",
    path = "/v1/chat/completions/{id}",
    tag = "openai",
    summary = "A stored chat completion",
    params(("id" = String, Path, description = "A completion id (`chatcmpl-…`)")),
    responses((status = 200, description = "OK", body = strata_core::openai::ChatCompletion), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn show(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = fetch(&*o.completions, &p, &id)
        .await
        .map(|doc| doc["completion"].clone());
    o.audit.answer(&p, "completion.read", &id, result).await
}

#[utoipa::path(
    get,
    operation_id = "list_stored_completion_messages",
    path = "/v1/chat/completions/{id}/messages",
    tag = "openai",
    summary = "The messages of a stored chat completion (oldest first unless `order=desc`)",
    params(("id" = String, Path, description = "A completion id (`chatcmpl-…`)"), crate::http::openapi::PageParams),
    responses((status = 200, description = "OK", body = crate::http::openapi::Page), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn messages(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(mut q): Query<PageQuery>,
) -> Response {
    let result = async {
        // Oldest first unless asked otherwise, as OpenAI lists them.
        q.order.get_or_insert_with(|| "asc".to_owned());
        let page = q.validate()?;
        let doc = fetch(&*o.completions, &p, &id).await?;
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
    o.audit.answer(&p, "completion.messages", &id, result).await
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
    request_body = crate::api::objects::MetadataUpdate,
    responses((status = 200, description = "OK", body = strata_core::openai::ChatCompletion), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn update(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Response {
    let result = async {
        p.may_change("change stored completions")?;
        // Sixteen pairs of at most 64 + 512 characters fit many times over.
        let body = read_body(req.into_body(), 64 * 1024).await?;
        let metadata = parse_update(&body)?;
        let stored = o
            .completions
            .completion(&p.tenant.id, &id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| not_found(&id))?;
        let mut doc = content(&stored)?;
        doc["completion"]["metadata"] = json!(metadata);
        o.completions
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
    o.audit.answer(&p, "completion.update", &id, result).await
}

#[utoipa::path(
    delete,
    operation_id = "delete_stored_completion",
    path = "/v1/chat/completions/{id}",
    tag = "openai",
    summary = "Delete a stored chat completion",
    params(("id" = String, Path, description = "A completion id (`chatcmpl-…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::Deleted), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn delete(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        p.may_change("delete stored completions")?;
        let done = o.completions.delete_completion(&p.tenant.id, &id).await;
        let body = json!({"object": "chat.completion.deleted", "id": id, "deleted": true});
        deleted(done, body, || not_found(&id))
    }
    .await;
    o.audit.answer(&p, "completion.delete", &id, result).await
}

/// `GET /v1/chat/completions`: the tenant's stored completions, newest first.
#[utoipa::path(
    get,
    path = "/v1/chat/completions",
    tag = "openai",
    summary = "List stored chat completions",
    params(crate::http::openapi::NewestParams),
    responses((status = 200, description = "Newest first", body = crate::http::openapi::Page), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn list_completions(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Query(q): Query<NewestQuery>,
) -> Response {
    let result = async {
        let limit = page_limit(q.limit.as_deref())?;
        let rows = o
            .completions
            .completions(&p.tenant.id, q.after.as_deref(), limit + 1)
            .await
            .map_err(store_error)?;
        let data = rows
            .iter()
            .map(|c| content(c).map(|doc| doc["completion"].clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page_of(data, limit))
    }
    .await;
    o.audit.answer(&p, "completion.list", "", result).await
}
