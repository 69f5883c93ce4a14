//! The Batch API's routes: create a batch from an uploaded file, read it
//! (its request counts counted from the lines finished so far), list, and
//! cancel. The lines run in `batch_runner`, on slots interactive work
//! leaves. Every query names the caller's tenant.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};
use strata_core::batch::{batch_object, parse_input, set_status, CreateBatch, Status};
use strata_core::openai::parse_body;
use strata_core::responses::{list_page, new_id, page_limit};
use strata_core::store::{BatchStore, StoredBatch};
use strata_core::tenant::TenantId;
use strata_core::{read_body, ApiError};

use crate::api::files::{self, BATCH};
use crate::api::objects::{NewestQuery, Objects};
use crate::http::error::store_error;
use crate::http::extract::{Path, Query};
use crate::tenancy::principal::Principal;

pub(crate) fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No batch with id `{id}`."))
}

/// What a batch's row keeps: the batch object, and the key it runs as
/// (not shown to clients).
pub(crate) struct Doc {
    pub batch: Value,
    pub key_id: String,
}

impl Doc {
    pub(crate) fn read(b: &StoredBatch) -> Result<Doc, ApiError> {
        let v: Value = serde_json::from_slice(&b.content)
            .map_err(|_| ApiError::internal("A stored batch could not be read."))?;
        Ok(Doc {
            batch: v["batch"].clone(),
            key_id: v["key_id"].as_str().unwrap_or_default().to_owned(),
        })
    }

    pub(crate) fn status(&self) -> Status {
        self.batch["status"]
            .as_str()
            .and_then(Status::parse)
            .unwrap_or(Status::Failed)
    }

    pub(crate) fn row(&self, id: &str, created_at_ms: i64) -> StoredBatch {
        StoredBatch {
            id: id.to_owned(),
            created_at_ms,
            status: self.status().as_str().to_owned(),
            content: serde_json::to_vec(&json!({"batch": self.batch, "key_id": self.key_id}))
                .expect("JSON values serialise"),
        }
    }
}

/// The batch object with its request counts as they stand.
pub(crate) async fn with_counts(
    store: &dyn BatchStore,
    tenant: &TenantId,
    b: &StoredBatch,
) -> Result<Value, ApiError> {
    let mut batch = Doc::read(b)?.batch;
    let (completed, failed) = store
        .line_counts(tenant, &b.id)
        .await
        .map_err(store_error)?;
    batch["request_counts"]["completed"] = json!(completed);
    batch["request_counts"]["failed"] = json!(failed);
    Ok(batch)
}

#[utoipa::path(
    post,
    operation_id = "create_batch",
    path = "/v1/batches",
    tag = "openai",
    summary = "Run an uploaded file's requests as a batch, within 24 hours",
    request_body = strata_core::batch::CreateBatch,
    responses((status = 200, description = "The batch, `validating`", body = crate::http::openapi::Batch), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn create(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    req: Request,
) -> Response {
    let mut target = String::new();
    let result = async {
        p.may_change("create batches")?;
        let body = read_body(req.into_body(), 64 * 1024).await?;
        let create: CreateBatch = parse_body(&body)?;
        create.validate()?;
        let file = o
            .files
            .file(&p.tenant.id, &create.input_file_id, true)
            .await
            .map_err(store_error)?
            .filter(|f| f.purpose == BATCH)
            .ok_or_else(|| files::not_found(&create.input_file_id).with_param("input_file_id"))?;
        let lines = parse_input(&file.content)
            .map_err(|errors| strata_core::batch::input_error(&errors))?;
        create.check_lines(&lines)?;
        let model = &lines[0].model;
        // A model the key may not use is a model that does not exist to it.
        if !p.key.allows_model(model) {
            return Err(ApiError::model_not_found(model));
        }
        let id = new_id("batch");
        let now_ms = strata_core::now_ms();
        let doc = Doc {
            batch: batch_object(&id, &create, model, lines.len(), now_ms / 1000),
            key_id: p.key.id.clone(),
        };
        o.batches
            .create_batch(&p.tenant.id, &doc.row(&id, now_ms))
            .await
            .map_err(store_error)?;
        o.batch_created.notify_one();
        target.clone_from(&id);
        Ok(doc.batch)
    }
    .await;
    o.audit.answer(&p, "batch.create", &target, result).await
}

async fn fetch(o: &Objects, p: &Principal, id: &str) -> Result<StoredBatch, ApiError> {
    o.batches
        .batch(&p.tenant.id, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(id))
}

#[utoipa::path(
    get,
    operation_id = "show_batch",
    path = "/v1/batches/{id}",
    tag = "openai",
    summary = "A batch, with its request counts so far",
    params(("id" = String, Path, description = "A batch id (`batch_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::Batch), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn show(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let b = fetch(&o, &p, &id).await?;
        with_counts(&*o.batches, &p.tenant.id, &b).await
    }
    .await;
    o.audit.answer(&p, "batch.read", &id, result).await
}

#[utoipa::path(
    get,
    operation_id = "list_batches",
    path = "/v1/batches",
    tag = "openai",
    summary = "List the tenant's batches, newest first",
    params(crate::http::openapi::NewestParams),
    responses((status = 200, description = "Newest first", body = crate::http::openapi::Page), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn list(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Query(q): Query<NewestQuery>,
) -> Response {
    let result = async {
        let limit = page_limit(q.limit.as_deref())?;
        let rows = o
            .batches
            .batches(&p.tenant.id, q.after.as_deref(), limit + 1)
            .await
            .map_err(store_error)?;
        // Counts only for the rows shown: the one past `limit` only says
        // there is more.
        let mut data = Vec::new();
        for b in rows.iter().take(limit as usize) {
            data.push(with_counts(&*o.batches, &p.tenant.id, b).await?);
        }
        Ok(list_page(data, rows.len() > limit as usize))
    }
    .await;
    o.audit.answer(&p, "batch.list", "", result).await
}

#[utoipa::path(
    post,
    operation_id = "cancel_batch",
    path = "/v1/batches/{id}/cancel",
    tag = "openai",
    summary = "Cancel a batch: no more lines start; the finished ones are kept in its files",
    params(("id" = String, Path, description = "A batch id (`batch_…`)")),
    responses((status = 200, description = "The batch, `cancelling` (or already ended)", body = crate::http::openapi::Batch), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn cancel(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        p.may_change("cancel batches")?;
        // The runner writes the same row: change it only from the status
        // read, and read again if the runner moved it first.
        for _ in 0..5 {
            let b = fetch(&o, &p, &id).await?;
            let mut doc = Doc::read(&b)?;
            let from = doc.status();
            if from == Status::Cancelling || from == Status::Cancelled {
                return with_counts(&*o.batches, &p.tenant.id, &b).await;
            }
            if from.ended() {
                return Err(ApiError::conflict(format!(
                    "The batch is {}; only a batch that has not ended can be cancelled.",
                    from.as_str()
                )));
            }
            set_status(
                &mut doc.batch,
                Status::Cancelling,
                strata_core::now_ms() / 1000,
            );
            let row = doc.row(&id, b.created_at_ms);
            if o.batches
                .update_batch(&p.tenant.id, &row, from.as_str())
                .await
                .map_err(store_error)?
            {
                o.batch_created.notify_one();
                return with_counts(&*o.batches, &p.tenant.id, &row).await;
            }
        }
        Err(ApiError::conflict(
            "The batch kept changing while it was being cancelled; try again.",
        ))
    }
    .await;
    o.audit.answer(&p, "batch.cancel", &id, result).await
}
