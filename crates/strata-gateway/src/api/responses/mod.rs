//! The Responses API: a turn is read from the stored context (a previous
//! response's chain or a conversation's items) plus the new input, generated
//! by a replica's chat endpoint (preferring the replica that served the
//! session's last turn, where its KV cache lives), streamed back as response
//! events, and stored sealed before the final event, with the conversation's
//! new items in the same transaction.

use std::sync::Arc;
use std::time::Instant;

use crate::tenancy::fairq::Class;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use serde_json::{json, Value};
use strata_core::openai::{parse_body, ChatCompletionRequest, Generation};
use strata_core::responses::{
    chat_messages, new_id, EventWriter, Item, PageQuery, ResponseMeta, ResponsesRequest,
    TurnRequest,
};
use strata_core::store::{ConversationStore, StoredResponse};
use strata_core::{read_body, ApiError};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::api::catalog;
use crate::api::generate::{span, with_model, Inference};
use crate::api::objects::{deleted, Objects};
use crate::fleet::snapshots::Snapshots;
use crate::http::error::{event_stream, json_response, store_error};
use crate::http::extract::{Path, Query};
use crate::relay::answer::Answer;
use crate::relay::forward::{Exchange, ReplicaRequest};
use crate::tenancy::principal::Principal;
use kept::items_of;
use turn::{Reply, Sink, Turn};

pub mod background;
mod kept;
mod turn;

const ROUTE: &str = "/v1/responses";

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No response with id `{id}` is stored."))
}

async fn stored_doc(
    store: &dyn ConversationStore,
    p: &Principal,
    id: &str,
) -> Result<(StoredResponse, Value), ApiError> {
    let r = store
        .response(&p.tenant.id, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(id))?;
    let doc = serde_json::from_slice(&r.content)
        .map_err(|_| ApiError::internal("A stored response could not be read."))?;
    Ok((r, doc))
}

/// What a turn continues: the items before its input, the replica that
/// served the session's last turn, and the model that answered it.
#[derive(Default)]
struct Context {
    items: Vec<Item>,
    replica: Option<String>,
    model: Option<String>,
}

/// The items before this turn's input, and where its session's last turn
/// ran.
async fn context(
    store: &dyn ConversationStore,
    p: &Principal,
    turn: &TurnRequest,
) -> Result<Context, ApiError> {
    if let Some(prev) = &turn.previous_response_id {
        let (stored, doc) = stored_doc(store, p, prev)
            .await
            .map_err(|e| e.with_param("previous_response_id"))?;
        let mut items = items_of(&doc["context"]);
        items.extend(items_of(&doc["input"]));
        items.extend(items_of(&doc["response"]["output"]));
        return Ok(Context {
            items,
            replica: stored.replica,
            model: doc["response"]["model"].as_str().map(str::to_owned),
        });
    }
    if let Some(conv) = &turn.conversation {
        let missing = || {
            ApiError::not_found(format!("No conversation with id `{conv}`."))
                .with_param("conversation")
        };
        let stored = store
            .items(
                &p.tenant.id,
                conv,
                None,
                u32::MAX,
                strata_core::store::Order::Asc,
            )
            .await
            .map_err(store_error)?
            .ok_or_else(missing)?;
        let items = stored
            .iter()
            .filter_map(|i| serde_json::from_slice(&i.content).ok())
            .filter_map(|v: Value| Item::from_json(&v))
            .collect();
        let replica = store
            .conversation_replica(&p.tenant.id, conv)
            .await
            .map_err(store_error)?;
        return Ok(Context {
            items,
            replica,
            model: None,
        });
    }
    Ok(Context::default())
}

/// `POST /v1/responses`.
#[utoipa::path(
    post,
    operation_id = "create_response",
    path = "/v1/responses",
    tag = "openai",
    summary = "Create a response (a turn)",
    request_body = strata_core::responses::ResponsesRequest,
    responses((status = 200, description = "The response, or its server-sent events with `stream`", content((crate::http::openapi::ResponseObject = "application/json"), ("text/event-stream"))), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn create(
    State(g): State<Arc<Inference>>,
    Extension(p): Extension<Arc<Principal>>,
    req: Request,
) -> Response {
    let arrived = Instant::now();
    let response = match start(g.clone(), p, req, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    g.count(ROUTE, &response);
    response
}

/// The chat request a turn becomes for the replica, with `items` (the
/// stored context, then the new input), checked as any chat request is
/// (model name, sampling bounds).
pub(crate) fn chat_request(
    turn: &TurnRequest,
    items: &[Item],
) -> Result<(Bytes, Generation), ApiError> {
    let mut request = json!({
        "model": turn.model,
        "messages": chat_messages(turn.instructions.as_deref(), items),
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    // Only what the turn sets: some servers refuse a `null` for a number.
    for (key, value) in [
        ("max_tokens", turn.max_output_tokens.map(|v| json!(v))),
        ("temperature", turn.temperature.map(|v| json!(v))),
        ("top_p", turn.top_p.map(|v| json!(v))),
    ] {
        if let Some(v) = value {
            request[key] = v;
        }
    }
    let chat = Bytes::from(request.to_string());
    let generation = parse_body::<ChatCompletionRequest>(&chat)?.validate()?;
    Ok((chat, generation))
}

/// A turn, phase by phase: the body, its stored context, admission, the
/// replica holding the session, then the answer as events (or whole).
async fn start(
    g: Arc<Inference>,
    p: Arc<Principal>,
    req: Request,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), g.max_body_bytes).await?;
    let turn = parse_body::<ResponsesRequest>(&body)?.validate()?;
    let Context {
        items: context,
        replica,
        model: previous,
    } = context(&*g.objects.conversations, &p, &turn).await?;
    let mut items = context.clone();
    items.extend(turn.input.iter().cloned());
    let (chat, mut generation) = chat_request(&turn, &items)?;
    // An alias's model for this conversation: the one its last turn used
    // (the stored response says; for a conversation, the model of the
    // replica holding it) while the alias names it.
    let tenant = p.tenant.id.as_str();
    let previous = previous.or_else(|| {
        let home = g.relay.replicas.find(replica.as_deref()?)?;
        home.endpoint.model.clone()
    });
    let session = turn
        .conversation
        .as_ref()
        .or(turn.previous_response_id.as_ref());
    let (chat, asked) =
        match g.alias_target(&generation.model, previous.as_deref(), || match session {
            Some(s) => catalog::session_key(tenant, s),
            None => catalog::conversation_key(tenant, &generation.input),
        }) {
            Some(target) => (
                with_model(&chat, &target)?,
                Some(std::mem::replace(&mut generation.model, target)),
            ),
            None => (chat, None),
        };
    if turn.background && p.class == Class::Batch {
        return Err(ApiError::invalid_request(
            Some("background"),
            "A batch's line cannot run in the background.",
        ));
    }
    let request_id = strata_core::openai::request_id();
    let span = span(&request_id, &p, &generation, ROUTE);
    let (charge, estimated_tokens) = g
        .admit(&p, &generation, asked.as_deref(), chat.len())
        .instrument(span.clone())
        .await?;
    let response_id = new_id("resp");
    // The replica holding the session's cache, or one it was moved to.
    let replica = match (
        &g.snapshots,
        turn.conversation
            .as_ref()
            .or(turn.previous_response_id.as_ref()),
    ) {
        (Some(snapshots), Some(session)) => {
            restore_if_moved(&g, snapshots, &p, &generation.model, replica, session).await
        }
        _ => replica,
    };
    let request = ReplicaRequest {
        path: "/v1/chat/completions",
        prefix: g
            .relay
            .replicas
            .prefix_of(p.tenant.id.as_str(), &generation.input),
        principal: p,
        // A conversation's turns share its id; a chain's next turn names this response.
        session: Some(
            turn.conversation
                .clone()
                .unwrap_or_else(|| response_id.clone()),
        ),
        body: chat,
        model: generation.model,
        estimated_tokens,
    };
    let mut exchange = Exchange {
        charge,
        request_id,
        arrived,
        stream: true,
    };
    let meta = ResponseMeta {
        id: response_id,
        created_at: strata_core::now_ms() / 1000,
        model: request.model.clone(),
        instructions: turn.instructions.clone(),
        previous_response_id: turn.previous_response_id.clone(),
        conversation: turn.conversation.clone(),
        max_output_tokens: turn.max_output_tokens,
        temperature: turn.temperature,
        top_p: turn.top_p,
        metadata: turn.metadata.clone(),
        store: turn.store,
        background: turn.background,
    };
    if turn.background {
        let run = kept::Run {
            meta,
            input: turn.input,
            context,
            item_id: new_id("msg"),
            key_id: request.principal.key.id.clone(),
            chat: serde_json::from_slice(&request.body)
                .map_err(|_| ApiError::internal("A turn's chat request is not JSON."))?,
            session: request.session.clone(),
        };
        return background::start(g, run, request, exchange, replica, turn.stream)
            .instrument(span)
            .await;
    }
    let (flight, upstream) = match g
        .relay
        .send(&request, replica.as_deref())
        .instrument(span.clone())
        .await
    {
        Ok(sent) => sent,
        Err(refusal) => return Ok(refusal),
    };
    let status = upstream.status();
    if !status.is_success() {
        // The replica refused (the context is too long, ...): its error, metered.
        let body = upstream.bytes().await.unwrap_or_default();
        let t = exchange.elapsed();
        let row = exchange.usage_row(&request, flight.replica(), status.as_u16(), None, t, t);
        g.relay.ledger.record(row);
        return Ok(json_response(status, body));
    }
    let run = Turn {
        meter: g.relay.ledger.meter(&request.model),
        answer: Answer::new(g.relay.clone(), request, flight, upstream),
        g,
        meta,
        input: turn.input,
        context,
        exchange,
        events: EventWriter::default(),
        sink: Sink::Whole,
    };
    if !turn.stream {
        return run
            .pump(Reply::new(None))
            .instrument(span)
            .await
            .map(|v| Json(v).into_response());
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(
        Turn {
            sink: Sink::Client(tx),
            ..run
        }
        .pump(Reply::new(None))
        .instrument(span),
    );
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        Some((Ok::<_, std::io::Error>(event), rx))
    });
    Ok(event_stream(StatusCode::OK, Body::from_stream(stream)))
}

/// When the replica that served the session's last turn can no longer take
/// it (drained, gone) and a snapshot of the session was kept, restores it on
/// the replica the turn will go to and prefers that one.
async fn restore_if_moved(
    g: &Inference,
    snapshots: &Snapshots,
    p: &Principal,
    model: &str,
    home: Option<String>,
    session: &str,
) -> Option<String> {
    let replicas = &g.relay.replicas;
    let tenant = p.tenant.id.as_str();
    if home.as_deref().is_some_and(|id| replicas.is_routable(id))
        || !snapshots.has(tenant, session).await
    {
        return home;
    }
    let target = replicas
        .choose(p.pool(), model, &[], None, &[], 0)
        .ok()?
        .replica()
        .clone();
    if snapshots.restore(&g.client, &target, tenant, session).await {
        tracing::info!(%session, replica = %target.endpoint.id, "session's KV cache restored from a snapshot");
        return Some(target.endpoint.id.clone());
    }
    home
}

/// The query of `GET /v1/responses/{id}`.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ShowQuery {
    /// `true`: the events of a background response, from its start or
    /// after `starting_after`, then those that follow until its end.
    #[param(value_type = Option<bool>)]
    stream: Option<String>,
    /// With `stream`: the sequence number of the last event the client
    /// has (ignored without it).
    #[param(value_type = Option<i64>, minimum = 0)]
    starting_after: Option<String>,
}

impl ShowQuery {
    /// `Some(after)` for a stream (`after`: the last event the client
    /// has), `None` for the response object.
    fn stream(&self) -> Result<Option<Option<u64>>, ApiError> {
        let stream = match self.stream.as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => {
                return Err(ApiError::invalid_request(
                    Some("stream"),
                    "`stream` must be true or false.",
                ))
            }
        };
        let after = match self.starting_after.as_deref() {
            None => None,
            Some(n) => match n.parse::<i64>() {
                Ok(n) if n >= 0 => Some(n as u64),
                _ => {
                    return Err(ApiError::invalid_request(
                        Some("starting_after"),
                        "`starting_after` must be an event's sequence number (a whole number, 0 or more).",
                    ))
                }
            },
        };
        Ok(stream.then_some(after))
    }
}

/// `GET /v1/responses/{id}`.
#[utoipa::path(
    get,
    operation_id = "show_response",
    path = "/v1/responses/{id}",
    tag = "openai",
    summary = "A stored response, or a background response's events",
    params(("id" = String, Path, description = "A response id (`resp_…`)"), ShowQuery),
    responses((status = 200, description = "The response, or with `stream=true` its server-sent events", content((crate::http::openapi::ResponseObject = "application/json"), ("text/event-stream"))), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn show(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Response {
    let result = async {
        let stream = q.stream()?;
        let (_, doc) = stored_doc(&*o.conversations, &p, &id).await?;
        let response = doc["response"].clone();
        if stream.is_some() && response["background"] != json!(true) {
            return Err(ApiError::invalid_request(
                Some("stream"),
                "Only a background response's events can be streamed again.",
            ));
        }
        Ok((response, stream))
    }
    .await;
    match result {
        Ok((_, Some(after))) => {
            let Some(place) = o.followers.enter(&p.tenant.id) else {
                let refused = ApiError::rate_limited(
                    "Too many streams of background responses are open for this organization on this server; close one, or retry shortly.",
                    1,
                );
                return o
                    .audit
                    .answer(&p, "response.stream", &id, Err(refused))
                    .await;
            };
            o.audit
                .record(&p, "response.stream", p.tenant.id.as_str(), &id, "ok")
                .await;
            background::follow(o.background.clone(), place, id, after)
        }
        Ok((response, None)) => o.audit.answer(&p, "response.read", &id, Ok(response)).await,
        Err(e) => o.audit.answer(&p, "response.read", &id, Err(e)).await,
    }
}

/// `POST /v1/responses/{id}/cancel`.
#[utoipa::path(
    post,
    operation_id = "cancel_response",
    path = "/v1/responses/{id}/cancel",
    tag = "openai",
    summary = "Cancel a background response",
    params(("id" = String, Path, description = "A response id (`resp_…`)")),
    responses((status = 200, description = "The response as it stands after the cancel", body = crate::http::openapi::ResponseObject), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn cancel(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        p.may_change("cancel responses")?;
        match background::cancel(&*o.background, &p.tenant.id, &id).await? {
            None => return Err(not_found(&id)),
            Some(false) => {
                let (_, doc) = stored_doc(&*o.conversations, &p, &id).await?;
                if doc["response"]["background"] != json!(true) {
                    return Err(ApiError::invalid_request(
                        None,
                        "Only a background response can be cancelled.",
                    ));
                }
            }
            Some(true) => {}
        }
        let (_, doc) = stored_doc(&*o.conversations, &p, &id).await?;
        Ok(doc["response"].clone())
    }
    .await;
    o.audit.answer(&p, "response.cancel", &id, result).await
}

/// `DELETE /v1/responses/{id}`.
#[utoipa::path(
    delete,
    operation_id = "delete_response",
    path = "/v1/responses/{id}",
    tag = "openai",
    summary = "Delete a stored response",
    params(("id" = String, Path, description = "A response id (`resp_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::Deleted), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn delete(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        p.may_change("delete stored responses")?;
        let done = o.conversations.delete_response(&p.tenant.id, &id).await;
        deleted(
            done,
            json!({"id": id, "object": "response", "deleted": true}),
            || not_found(&id),
        )
    }
    .await;
    o.audit.answer(&p, "response.delete", &id, result).await
}

/// `GET /v1/responses/{id}/input_items`.
#[utoipa::path(
    get,
    operation_id = "list_response_input_items",
    path = "/v1/responses/{id}/input_items",
    tag = "openai",
    summary = "The input items of a stored response",
    params(("id" = String, Path, description = "A response id (`resp_…`)"), crate::http::openapi::PageParams),
    responses((status = 200, description = "OK", body = crate::http::openapi::Page), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn input_items(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let result = async {
        let page = q.validate()?;
        let (_, doc) = stored_doc(&*o.conversations, &p, &id).await?;
        let items: Vec<Value> = doc["input"].as_array().cloned().unwrap_or_default();
        let (data, more) = page.slice(&items, |v| v["id"].as_str().unwrap_or_default());
        Ok(strata_core::responses::list_page(data, more))
    }
    .await;
    o.audit
        .answer(&p, "response.input_items", &id, result)
        .await
}
