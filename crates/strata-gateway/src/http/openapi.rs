//! The OpenAPI 3 description of the gateway's own API, served at
//! `/openapi.json`. Every route is registered through
//! `utoipa_axum::routes!` from its handler's `#[utoipa::path]`, so the
//! document and the router come from the same lines; the shapes below are
//! the JSON objects the handlers build by hand (the request and completion
//! types derive their schemas in strata-core).

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

/// The document's frame: title, version, tags and the bearer-key scheme.
/// The paths are added by the routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "strata",
        description = "OpenAI-compatible inference (completions, chat completions, Responses, Conversations) and strata's admin API. Every route but /health, /metrics, /openapi.json and the dashboard's (/ui, which has its own login) takes `Authorization: Bearer <key>`.",
        license(name = "Apache-2.0"),
    ),
    modifiers(&BearerKey),
    tags(
        (name = "openai", description = "OpenAI-compatible routes"),
        (name = "admin", description = "Tenants, keys, usage, audit, replicas (/admin/v1/)"),
        (name = "operations", description = "Health, metrics and this document"),
        (name = "dashboard", description = "The operators' web page at /ui (a platform admin key logs in)"),
    ),
)]
pub struct Frame;

struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("sk-strata-…")
                    .build(),
            ),
        );
    }
}

/// An OpenAI-shaped error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorFields,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorFields {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// What every keyed route may answer besides its success: OpenAI-shaped errors.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum Failures {
    /// Bad input, no or wrong key, not allowed, not found, rate limited, over budget.
    #[response(status = "4XX")]
    Client(ErrorBody),
    /// No replica, or a replica or the store failed.
    #[response(status = "5XX")]
    Server(ErrorBody),
}

/// `{"id", "object", "deleted": true}` after a delete.
#[derive(Serialize, ToSchema)]
pub struct Deleted {
    pub id: String,
    pub object: String,
    pub deleted: bool,
}

/// A page of a list route (`after`/`limit`/`order`).
#[derive(Serialize, ToSchema)]
pub struct Page {
    pub object: String,
    pub data: Vec<serde_json::Value>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// A file of the Files API.
#[derive(Serialize, ToSchema)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: i64,
    pub created_at: i64,
    pub filename: String,
    /// `batch` (uploaded) or `batch_output` (a batch's results).
    pub purpose: String,
    pub status: String,
}

/// `POST /v1/files`'s multipart form.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// JSONL, one request per line:
    /// `{"custom_id", "method": "POST", "url", "body"}`.
    #[schema(value_type = String, format = Binary)]
    pub file: Vec<u8>,
    /// `batch`.
    pub purpose: String,
}

/// A batch of the Batch API, with OpenAI's statuses and request counts.
#[derive(Serialize, ToSchema)]
pub struct Batch {
    pub id: String,
    pub object: String,
    pub endpoint: String,
    pub status: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    /// `total`, `completed`, `failed`.
    pub request_counts: serde_json::Value,
    pub metadata: serde_json::Value,
}

/// A whole list (admin routes).
#[derive(Serialize, ToSchema)]
pub struct List {
    pub object: String,
    pub data: Vec<serde_json::Value>,
}

/// A message item of a response or a conversation.
#[derive(Serialize, ToSchema)]
pub struct Item {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub role: String,
    pub status: String,
    /// `input_text` or `output_text` parts.
    pub content: Vec<serde_json::Value>,
}

/// A response of the Responses API (or, streamed, its server-sent events).
#[derive(Serialize, ToSchema)]
pub struct ResponseObject {
    pub id: String,
    pub object: String,
    pub created_at: i64,
    /// `completed`, `incomplete`, `in_progress` or `failed`.
    pub status: String,
    pub model: String,
    pub output: Vec<Item>,
    pub usage: Option<serde_json::Value>,
    pub error: Option<serde_json::Value>,
    pub previous_response_id: Option<String>,
    pub conversation: Option<serde_json::Value>,
    pub metadata: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize, ToSchema)]
pub struct ConversationObject {
    pub id: String,
    pub object: String,
    pub created_at: i64,
    pub metadata: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize, ToSchema)]
pub struct Tenant {
    pub object: String,
    pub id: String,
    pub name: String,
    /// `shared` or `dedicated`.
    pub isolation: String,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub batch_tokens_per_minute: Option<u32>,
    pub monthly_budget_usd: Option<f64>,
    /// `interactive` or `sheddable`.
    pub priority: String,
    pub created_at: i64,
}

/// A key as listed: never its secret.
#[derive(Serialize, ToSchema)]
pub struct ApiKey {
    pub object: String,
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// `admin`, `member` or `reader`.
    pub role: String,
    pub models: Option<Vec<String>>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub batch_tokens_per_minute: Option<u32>,
    /// `interactive` or `sheddable` (a key of a sheddable tenant is sheddable).
    pub priority: String,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
    /// The secret, only in the answer that creates the key.
    pub key: Option<String>,
}

/// Usage totals by model (and, for one tenant, its month's spend).
#[derive(Serialize, ToSchema)]
pub struct UsageReport {
    pub object: String,
    pub data: Vec<serde_json::Value>,
    pub tenant_id: Option<String>,
    pub month_spend_usd: Option<f64>,
    pub monthly_budget_usd: Option<f64>,
}

/// `/health`: whether the gateway can serve, and its replicas.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `idle` (scaled to zero; requests wait) or `unavailable`.
    pub status: String,
    pub replicas_ready: u32,
}

/// `after`, `limit` and `order` of a paged list.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct PageParams {
    /// The last id of the previous page.
    after: Option<String>,
    /// 1 to 100 (20 when not given).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// `asc` or `desc`: newest first unless the route says otherwise.
    #[param(pattern = "^(asc|desc)$")]
    order: Option<String>,
}

/// `after` and `limit` of a list that is always newest first.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct NewestParams {
    /// The last id of the previous page
    after: Option<String>,
    /// 1 to 100 (20)
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

/// A tenant or key name as the admin routes take it: 1 to 64 characters,
/// not only spaces, no control characters.
#[derive(utoipa::ToSchema)]
#[schema(
    min_length = 1,
    max_length = 64,
    pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
)]
#[allow(dead_code)]
pub struct Name(String);

/// A model id in a key's allow-list.
#[derive(utoipa::ToSchema)]
#[schema(min_length = 1, max_length = 256)]
#[allow(dead_code)]
pub struct ModelId(String);

/// Rules between fields that the request types' `validate` applies and
/// their derived schemas cannot say, written into the document as JSON
/// Schema 2020-12 keywords utoipa has no builder for (`if`/`then`, `not`,
/// `contains`), so that a schema-valid request is one strata accepts.
/// Two rules stay in words only, because no schema can hold them (and a
/// deployed model's file, which only the machine running the pools can
/// check: `ops::models`): a chat's
/// `continue_final_message` needs an assistant message last, and a key's
/// `expires_at` must be in the future.
pub fn add_rules(doc: &mut serde_json::Value) {
    use serde_json::json;
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(|s| s.as_object_mut())
    else {
        return;
    };
    // `stream_options` only with `stream: true`.
    let stream_options = json!({
        "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
        "then": {"required": ["stream"], "properties": {"stream": {"const": true}}},
    });
    // A chat needs a user's message.
    let a_user_message = json!({"properties": {"messages": {"contains": {
        "type": "object", "required": ["role"], "properties": {"role": {"const": "user"}},
    }}}});
    // A turn continues a response or a conversation, not both; a turn in a
    // conversation is stored, and so is a background one.
    let one_thread = json!({"not": {
        "required": ["previous_response_id", "conversation"],
        "properties": {"previous_response_id": {"type": "string"}, "conversation": {"not": {"type": "null"}}},
    }});
    let stored_in_a_conversation = json!({
        "if": {"required": ["conversation"], "properties": {"conversation": {"not": {"type": "null"}}}},
        "then": {"properties": {"store": {"not": {"const": false}}}},
    });
    let stored_in_the_background = json!({
        "if": {"required": ["background"], "properties": {"background": {"const": true}}},
        "then": {"properties": {"store": {"not": {"const": false}}}},
    });
    let rules = [
        ("CompletionRequest", vec![stream_options.clone()]),
        (
            "ChatCompletionRequest",
            vec![stream_options, a_user_message],
        ),
        (
            "ResponsesRequest",
            vec![
                one_thread,
                stored_in_a_conversation,
                stored_in_the_background,
            ],
        ),
    ];
    for (name, more) in rules {
        let Some(schema) = schemas.get_mut(name) else {
            continue;
        };
        let all = match schema.get_mut("allOf").and_then(|a| a.as_array_mut()) {
            Some(all) => all,
            None => {
                *schema = json!({"allOf": [schema.take()]});
                schema["allOf"].as_array_mut().expect("just made")
            }
        };
        all.extend(more);
    }
    // A batch calls one of the endpoints, within the one window there is;
    // an upload is a batch's input.
    if let Some(props) = schemas
        .get_mut("CreateBatch")
        .and_then(|s| s.get_mut("properties"))
    {
        props["endpoint"]["enum"] = json!(strata_core::batch::ENDPOINTS);
        props["completion_window"]["enum"] = json!([strata_core::batch::WINDOW]);
    }
    if let Some(props) = schemas
        .get_mut("UploadForm")
        .and_then(|s| s.get_mut("properties"))
    {
        props["purpose"]["enum"] = json!(["batch"]);
    }
    // OpenAI's bounds on `metadata` (`strata_core::openai::check_metadata`),
    // wherever a schema has it.
    for schema in schemas.values_mut() {
        let parts = match schema.get_mut("allOf").and_then(|a| a.as_array_mut()) {
            Some(all) => all.iter_mut().collect::<Vec<_>>(),
            None => vec![schema],
        };
        for part in parts {
            if let Some(metadata) = part.pointer_mut("/properties/metadata") {
                metadata["maxProperties"] = json!(strata_core::openai::MAX_METADATA_PAIRS);
                metadata["propertyNames"]["maxLength"] =
                    json!(strata_core::openai::MAX_METADATA_KEY);
                metadata["additionalProperties"]["maxLength"] =
                    json!(strata_core::openai::MAX_METADATA_VALUE);
            }
        }
    }
}
