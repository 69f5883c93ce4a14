//! The Conversations API: conversations and their items, sealed per tenant,
//! every access audited. Responses created with `conversation` append their
//! turn here (see `responses`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};
use strata_core::openai::{check_metadata, parse_body};
use strata_core::responses::{list_page, new_id, parse_items, Item, PageQuery};
use strata_core::store::{ConversationStore, StoredConversation, StoredItem};
use strata_core::{read_body, ApiError};

use crate::api::objects::{deleted, parse_update, stored_item, MetadataUpdate, Objects};
use crate::http::error::store_error;
use crate::http::extract::{Path, Query};
use crate::tenancy::principal::Principal;

/// OpenAI's bound on items added in one request.
const MAX_NEW_ITEMS: usize = 20;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewConversation {
    #[serde(default)]
    #[schema(value_type = Option<Vec<strata_core::responses::InputItem>>, max_items = 20)]
    items: Option<Vec<Value>>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewItems {
    #[schema(value_type = Vec<strata_core::responses::InputItem>, max_items = 20)]
    items: Vec<Value>,
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No conversation with id `{id}`."))
}

fn object(c: &StoredConversation) -> Result<Value, ApiError> {
    let doc: Value = serde_json::from_slice(&c.content)
        .map_err(|_| ApiError::internal("A stored conversation could not be read."))?;
    Ok(json!({
        "id": c.id,
        "object": "conversation",
        "created_at": c.created_at_ms / 1000,
        "metadata": doc["metadata"],
    }))
}

fn item_json(i: &StoredItem) -> Result<Value, ApiError> {
    serde_json::from_slice(&i.content)
        .map_err(|_| ApiError::internal("A stored conversation item could not be read."))
}

fn new_items(values: &[Value]) -> Result<Vec<Item>, ApiError> {
    if values.len() > MAX_NEW_ITEMS {
        return Err(ApiError::invalid_request(
            Some("items"),
            format!("At most {MAX_NEW_ITEMS} items can be added at once."),
        ));
    }
    parse_items(values, "items")
}

/// A create body, checked: the metadata and the first items.
pub(crate) fn parse_new(bytes: &[u8]) -> Result<(BTreeMap<String, String>, Vec<Item>), ApiError> {
    let new: NewConversation = parse_body(bytes)?;
    let metadata = new.metadata.unwrap_or_default();
    check_metadata(&metadata)?;
    Ok((
        metadata,
        new_items(new.items.as_deref().unwrap_or_default())?,
    ))
}

/// An items body, checked.
pub(crate) fn parse_new_items(bytes: &[u8]) -> Result<Vec<Item>, ApiError> {
    new_items(&parse_body::<NewItems>(bytes)?.items)
}

async fn fetch(
    store: &dyn ConversationStore,
    p: &Principal,
    id: &str,
) -> Result<StoredConversation, ApiError> {
    store
        .conversation(&p.tenant.id, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(id))
}

/// `POST /v1/conversations`.
#[utoipa::path(
    post,
    operation_id = "create_conversation",
    path = "/v1/conversations",
    tag = "openai",
    summary = "Create a conversation",
    request_body = NewConversation,
    responses((status = 200, description = "OK", body = crate::http::openapi::ConversationObject), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn create(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    req: Request,
) -> Response {
    let id = new_id("conv");
    let result = async {
        p.may_change("create conversations")?;
        let (metadata, items) = parse_new(&read_body(req.into_body(), o.max_body_bytes).await?)?;
        let now = strata_core::now_ms();
        let conversation = StoredConversation {
            id: id.clone(),
            created_at_ms: now,
            content: serde_json::to_vec(&json!({"metadata": metadata}))
                .expect("JSON values serialise"),
        };
        let items: Vec<StoredItem> = items.iter().map(|i| stored_item(i, now)).collect();
        o.conversations
            .create_conversation(&p.tenant.id, &conversation, &items)
            .await
            .map_err(store_error)?;
        object(&conversation)
    }
    .await;
    o.audit.answer(&p, "conversation.create", &id, result).await
}

/// `GET /v1/conversations/{id}`.
#[utoipa::path(
    get,
    operation_id = "show_conversation",
    path = "/v1/conversations/{id}",
    tag = "openai",
    summary = "A conversation",
    params(("id" = String, Path, description = "A conversation id (`conv_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::ConversationObject), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn show(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = async { object(&fetch(&*o.conversations, &p, &id).await?) }.await;
    o.audit.answer(&p, "conversation.read", &id, result).await
}

/// `POST /v1/conversations/{id}`: new metadata.
#[utoipa::path(
    post,
    operation_id = "update_conversation",
    path = "/v1/conversations/{id}",
    tag = "openai",
    summary = "Replace a conversation's metadata",
    params(("id" = String, Path, description = "A conversation id (`conv_…`)")),
    request_body = MetadataUpdate,
    responses((status = 200, description = "OK", body = crate::http::openapi::ConversationObject), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn update(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let result = async {
        p.may_change("change conversations")?;
        let metadata = parse_update(&read_body(req.into_body(), o.max_body_bytes).await?)?;
        let mut c = fetch(&*o.conversations, &p, &id).await?;
        c.content =
            serde_json::to_vec(&json!({"metadata": metadata})).expect("JSON values serialise");
        if !o
            .conversations
            .update_conversation(&p.tenant.id, &c)
            .await
            .map_err(store_error)?
        {
            return Err(not_found(&id));
        }
        object(&c)
    }
    .await;
    o.audit.answer(&p, "conversation.update", &id, result).await
}

/// `DELETE /v1/conversations/{id}`: the conversation and its items.
#[utoipa::path(
    delete,
    operation_id = "delete_conversation",
    path = "/v1/conversations/{id}",
    tag = "openai",
    summary = "Delete a conversation and its items",
    params(("id" = String, Path, description = "A conversation id (`conv_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::Deleted), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn delete(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        p.may_change("delete conversations")?;
        let done = o.conversations.delete_conversation(&p.tenant.id, &id).await;
        let body = json!({"id": id, "object": "conversation.deleted", "deleted": true});
        deleted(done, body, || not_found(&id))
    }
    .await;
    o.audit.answer(&p, "conversation.delete", &id, result).await
}

/// `GET /v1/conversations/{id}/items`.
#[utoipa::path(
    get,
    operation_id = "list_conversation_items",
    path = "/v1/conversations/{id}/items",
    tag = "openai",
    summary = "A conversation's items",
    params(("id" = String, Path, description = "A conversation id (`conv_…`)"), crate::http::openapi::PageParams),
    responses((status = 200, description = "OK", body = crate::http::openapi::Page), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn list_items(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let result = async {
        let page = q.validate()?;
        let rows = o
            .conversations
            .items(
                &p.tenant.id,
                &id,
                page.after.as_deref(),
                page.limit + 1,
                page.order,
            )
            .await
            .map_err(store_error)?
            .ok_or_else(|| not_found(&id))?;
        let more = rows.len() > page.limit as usize;
        let data = rows
            .iter()
            .take(page.limit as usize)
            .map(item_json)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(list_page(data, more))
    }
    .await;
    o.audit
        .answer(&p, "conversation.items.list", &id, result)
        .await
}

/// `POST /v1/conversations/{id}/items`.
#[utoipa::path(
    post,
    operation_id = "add_conversation_items",
    path = "/v1/conversations/{id}/items",
    tag = "openai",
    summary = "Append items to a conversation",
    params(("id" = String, Path, description = "A conversation id (`conv_…`)")),
    request_body = NewItems,
    responses((status = 200, description = "OK", body = crate::http::openapi::Page), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn add_items(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let result = async {
        p.may_change("change conversations")?;
        let items = parse_new_items(&read_body(req.into_body(), o.max_body_bytes).await?)?;
        let now = strata_core::now_ms();
        let stored: Vec<StoredItem> = items.iter().map(|i| stored_item(i, now)).collect();
        if !o
            .conversations
            .append_items(&p.tenant.id, &id, &stored)
            .await
            .map_err(store_error)?
        {
            return Err(not_found(&id));
        }
        Ok(list_page(items.iter().map(Item::to_json).collect(), false))
    }
    .await;
    o.audit
        .answer(&p, "conversation.items.create", &id, result)
        .await
}

fn item_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No item with id `{id}` in this conversation."))
}

/// `GET /v1/conversations/{id}/items/{item_id}`.
#[utoipa::path(
    get,
    operation_id = "show_conversation_item",
    path = "/v1/conversations/{id}/items/{item_id}",
    tag = "openai",
    summary = "One item of a conversation",
    params(("id" = String, Path, description = "A conversation id (`conv_…`)"), ("item_id" = String, Path, description = "An item id (`msg_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::Item), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn show_item(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path((id, item)): Path<(String, String)>,
) -> Response {
    let result = async {
        let stored = o
            .conversations
            .item(&p.tenant.id, &id, &item)
            .await
            .map_err(store_error)?
            .ok_or_else(|| item_not_found(&item))?;
        item_json(&stored)
    }
    .await;
    o.audit
        .answer(&p, "conversation.items.read", &id, result)
        .await
}

/// `DELETE /v1/conversations/{id}/items/{item_id}`: answers with the conversation.
#[utoipa::path(
    delete,
    operation_id = "delete_conversation_item",
    path = "/v1/conversations/{id}/items/{item_id}",
    tag = "openai",
    summary = "Delete an item; answers the conversation",
    params(("id" = String, Path, description = "A conversation id (`conv_…`)"), ("item_id" = String, Path, description = "An item id (`msg_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::ConversationObject), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn delete_item(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path((id, item)): Path<(String, String)>,
) -> Response {
    let result = async {
        p.may_change("change conversations")?;
        if !o
            .conversations
            .delete_item(&p.tenant.id, &id, &item)
            .await
            .map_err(store_error)?
        {
            return Err(item_not_found(&item));
        }
        object(&fetch(&*o.conversations, &p, &id).await?)
    }
    .await;
    o.audit
        .answer(&p, "conversation.items.delete", &id, result)
        .await
}
