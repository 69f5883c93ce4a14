//! The Files API: a tenant uploads a batch's input (JSONL, each line
//! checked like the request it names) and reads a batch's output and error
//! files. Names and bytes are sealed under the tenant's data key; every
//! query names the caller's tenant, so another tenant's id is a plain 404.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};
use strata_core::batch::{input_error, parse_input};
use strata_core::responses::{new_id, page_limit, page_of};
use strata_core::store::{Order, StoredFile};
use strata_core::{read_body, ApiError};

use crate::api::objects::{deleted, Objects};
use crate::http::error::store_error;
use crate::http::extract::{Path, Query};
use crate::tenancy::principal::Principal;

/// The purpose of an uploaded file; a batch's results are `batch_output`.
pub const BATCH: &str = "batch";
pub const BATCH_OUTPUT: &str = "batch_output";

pub(crate) fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No file with id `{id}`."))
}

/// The file object OpenAI answers with.
pub(crate) fn file_object(f: &StoredFile) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at_ms / 1000,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "expires_at": null,
        "status_details": null,
    })
}

/// A new file of `tenant`'s (its id made here).
pub(crate) fn new_file(purpose: &str, filename: String, content: Vec<u8>) -> StoredFile {
    StoredFile {
        id: new_id("file"),
        created_at_ms: strata_core::now_ms(),
        purpose: purpose.to_owned(),
        filename,
        bytes: content.len() as i64,
        content,
    }
}

/// The `file` and `purpose` fields of a multipart upload.
async fn read_upload(req: Request, limit: usize) -> Result<(String, String, Vec<u8>), ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let boundary = multer::parse_boundary(&content_type).map_err(|_| {
        ApiError::invalid_request(
            None,
            "Upload a file as multipart/form-data with `file` and `purpose` fields.",
        )
    })?;
    // The multipart framing adds a little to the file itself.
    let body = read_body(req.into_body(), limit + 64 * 1024).await?;
    let mut form = multer::Multipart::new(
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) }),
        boundary,
    );
    let bad = |e: multer::Error| {
        ApiError::invalid_request(None, format!("The multipart body is not valid: {e}"))
    };
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form.next_field().await.map_err(bad)? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(bad)?),
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_owned();
                file = Some((name, field.bytes().await.map_err(bad)?.to_vec()));
            }
            _ => {}
        }
    }
    let purpose = purpose
        .ok_or_else(|| ApiError::invalid_request(Some("purpose"), "`purpose` is required."))?;
    let (name, bytes) =
        file.ok_or_else(|| ApiError::invalid_request(Some("file"), "`file` is required."))?;
    if bytes.len() > limit {
        return Err(ApiError::payload_too_large(limit));
    }
    Ok((purpose, name, bytes))
}

#[utoipa::path(
    post,
    operation_id = "upload_file",
    path = "/v1/files",
    tag = "openai",
    summary = "Upload a batch input file (multipart: `file`, `purpose` = `batch`)",
    request_body(content = crate::http::openapi::UploadForm, content_type = "multipart/form-data"),
    responses((status = 200, description = "The file object", body = crate::http::openapi::FileObject), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn upload(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    req: Request,
) -> Response {
    let mut target = String::new();
    let result = async {
        p.may_change("upload files")?;
        let (purpose, filename, content) = read_upload(req, o.max_file_bytes).await?;
        if purpose != BATCH {
            return Err(ApiError::invalid_request(
                Some("purpose"),
                format!("`purpose` must be `{BATCH}`: files here are batch inputs."),
            ));
        }
        parse_input(&content).map_err(|errors| input_error(&errors))?;
        let file = new_file(BATCH, filename, content);
        o.files
            .put_file(&p.tenant.id, &file)
            .await
            .map_err(store_error)?;
        target.clone_from(&file.id);
        Ok(file_object(&file))
    }
    .await;
    o.audit.answer(&p, "file.upload", &target, result).await
}

#[derive(Deserialize)]
pub(crate) struct ListQuery {
    purpose: Option<String>,
    after: Option<String>,
    limit: Option<String>,
    order: Option<String>,
}

#[utoipa::path(
    get,
    operation_id = "list_files",
    path = "/v1/files",
    tag = "openai",
    summary = "List the tenant's files (newest first unless `order=asc`)",
    params(("purpose" = Option<String>, Query, description = "Only files of this purpose"), crate::http::openapi::PageParams),
    responses((status = 200, description = "OK", body = crate::http::openapi::Page), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn list(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Query(q): Query<ListQuery>,
) -> Response {
    let result = async {
        let limit = page_limit(q.limit.as_deref())?;
        let order = match q.order.as_deref() {
            None | Some("desc") => Order::Desc,
            Some("asc") => Order::Asc,
            Some(_) => {
                return Err(ApiError::invalid_request(
                    Some("order"),
                    "`order` must be `asc` or `desc`.",
                ))
            }
        };
        let rows = o
            .files
            .files(
                &p.tenant.id,
                q.purpose.as_deref(),
                q.after.as_deref(),
                limit + 1,
                order,
            )
            .await
            .map_err(store_error)?;
        Ok(page_of(rows.iter().map(file_object).collect(), limit))
    }
    .await;
    o.audit.answer(&p, "file.list", "", result).await
}

async fn fetch(
    o: &Objects,
    p: &Principal,
    id: &str,
    content: bool,
) -> Result<StoredFile, ApiError> {
    o.files
        .file(&p.tenant.id, id, content)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(id))
}

#[utoipa::path(
    get,
    operation_id = "show_file",
    path = "/v1/files/{id}",
    tag = "openai",
    summary = "A file's object",
    params(("id" = String, Path, description = "A file id (`file_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::FileObject), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn show(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = fetch(&o, &p, &id, false).await.map(|f| file_object(&f));
    o.audit.answer(&p, "file.read", &id, result).await
}

#[utoipa::path(
    get,
    operation_id = "show_file_content",
    path = "/v1/files/{id}/content",
    tag = "openai",
    summary = "A file's bytes",
    params(("id" = String, Path, description = "A file id (`file_…`)")),
    responses((status = 200, description = "The bytes as uploaded or written", content_type = "application/octet-stream"), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn content(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = fetch(&o, &p, &id, true).await;
    let label = crate::tenancy::audit::result_label(&result);
    o.audit
        .record(&p, "file.content", p.tenant.id.as_str(), &id, label)
        .await;
    match result {
        Ok(f) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Body::from(f.content),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(
    delete,
    operation_id = "delete_file",
    path = "/v1/files/{id}",
    tag = "openai",
    summary = "Delete a file",
    params(("id" = String, Path, description = "A file id (`file_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::Deleted), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn delete(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        p.may_change("delete files")?;
        let done = o.files.delete_file(&p.tenant.id, &id).await;
        let body = json!({"object": "file", "id": id, "deleted": true});
        deleted(done, body, || not_found(&id))
    }
    .await;
    o.audit.answer(&p, "file.delete", &id, result).await
}
