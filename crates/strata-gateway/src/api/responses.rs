//! The Responses API: a turn is read from the stored context (a previous
//! response's chain or a conversation's items) plus the new input, generated
//! by a replica's chat endpoint (preferring the replica that served the
//! session's last turn, where its KV cache lives), streamed back as response
//! events, and stored sealed before the final event, with the conversation's
//! new items in the same transaction.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};
use strata_core::openai::{parse_body, ChatCompletionRequest, Generation, Usage};
use strata_core::responses::{
    chat_messages, new_id, response_object, EventWriter, Item, ItemRole, Outcome, PageQuery,
    ResponseMeta, ResponsesRequest, TurnRequest,
};
use strata_core::store::{ConversationStore, StoredItem, StoredResponse};
use strata_core::{read_body, ApiError};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::api::catalog;
use crate::api::generate::{span, with_model, Inference};
use crate::api::objects::{deleted, stored_item, Objects};
use crate::fleet::snapshots::Snapshots;
use crate::http::error::{event_stream, json_response, store_error};
use crate::http::extract::{Path, Query};
use crate::relay::answer::{Answer, Piece};
use crate::relay::forward::{Exchange, ReplicaRequest};
use crate::relay::ledger::TokenMeter;
use crate::tenancy::principal::Principal;

const ROUTE: &str = "/v1/responses";

/// What a stored response keeps: the response object, its own input items,
/// and the context items before them (so a later `previous_response_id`
/// needs one read, however long the chain).
fn document(response: &Value, input: &[Item], context: &[Item]) -> Value {
    json!({
        "response": response,
        "input": input.iter().map(Item::to_json).collect::<Vec<_>>(),
        "context": context.iter().map(Item::to_json).collect::<Vec<_>>(),
    })
}

fn items_of(v: &Value) -> Vec<Item> {
    v.as_array()
        .map(|a| a.iter().filter_map(Item::from_json).collect())
        .unwrap_or_default()
}

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
    };
    let run = Turn {
        meter: g.relay.ledger.meter(&request.model),
        answer: Answer::new(g.relay.clone(), request, flight, upstream),
        g,
        meta,
        input: turn.input,
        context,
        exchange,
        events: EventWriter::default(),
        sink: None,
    };
    if !turn.stream {
        return run
            .pump()
            .instrument(span)
            .await
            .map(|v| Json(v).into_response());
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(
        Turn {
            sink: Some(tx),
            ..run
        }
        .pump()
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

/// One turn in flight.
struct Turn {
    g: Arc<Inference>,
    /// The model's demand counters, each streamed token counted there.
    meter: TokenMeter,
    meta: ResponseMeta,
    input: Vec<Item>,
    context: Vec<Item>,
    exchange: Exchange,
    /// The answer, from the replica that took the turn and any that took
    /// the rest after one failed.
    answer: Answer,
    events: EventWriter,
    /// The client's event stream; `None` when the answer is returned whole.
    sink: Option<mpsc::Sender<Bytes>>,
}

/// The answer as it streams in.
struct Reply {
    item_id: String,
    text: String,
    /// Seconds from arrival to the first text.
    first_byte: Option<f64>,
    /// Text deltas streamed (each one token or more), counted as served
    /// tokens as they pass.
    deltas: u32,
    outcome: Outcome,
    usage: Option<Usage>,
}

impl Reply {
    /// The output message, as stored and shown.
    fn item(&self) -> Item {
        let mut item = Item::new(ItemRole::Assistant, self.text.clone());
        item.id = self.item_id.clone();
        if self.outcome == Outcome::Incomplete {
            item.status = "incomplete";
        }
        item
    }
}

/// The client went away; the turn is dropped (and the replica's generation
/// with it).
struct Gone;

impl Turn {
    async fn emit(&mut self, kind: &str, fields: Value) -> Result<(), Gone> {
        let event = self.events.event(kind, fields);
        match &self.sink {
            Some(tx) => tx.send(Bytes::from(event)).await.map_err(|_| Gone),
            None => Ok(()),
        }
    }

    /// Reads the answer through to the end, emitting events, then stores,
    /// meters and returns the final response object.
    async fn pump(mut self) -> Result<Value, ApiError> {
        let mut reply = Reply {
            item_id: new_id("msg"),
            text: String::new(),
            first_byte: None,
            deltas: 0,
            outcome: Outcome::InProgress,
            usage: None,
        };
        let streamed = self.stream_reply(&mut reply).await;
        let Reply {
            first_byte,
            usage,
            deltas,
            ..
        } = reply;
        let latency = self.exchange.elapsed();
        if streamed.is_err() {
            // 499: the client went away before the end, as nginx logs it.
            let row = self.usage_row(499, usage, first_byte.unwrap_or(latency), latency);
            self.g.relay.ledger.record_streamed(row, deltas.into());
            return Err(ApiError::bad_gateway("The client went away."));
        }
        let output = match reply.outcome {
            Outcome::Failed(_) => Vec::new(),
            _ => vec![reply.item()],
        };
        let mut outcome = reply.outcome;
        if !matches!(outcome, Outcome::Failed(_)) && self.meta.store {
            if let Err(e) = self.save(&outcome, &output, usage).await {
                outcome = Outcome::Failed(e);
            }
        }
        let status = match &outcome {
            Outcome::Failed(e) => e.status,
            _ => 200,
        };
        let row = self.usage_row(status, usage, first_byte.unwrap_or(latency), latency);
        if self.meta.store || self.exchange.charge.meter_before_answering() {
            // Metered before the client hears the turn is done.
            self.g.relay.ledger.record_now(row, deltas.into()).await;
        } else {
            self.g.relay.ledger.record_streamed(row, deltas.into());
        }
        let response = response_object(&self.meta, &outcome, &output, usage);
        let last = match &outcome {
            Outcome::Incomplete => "response.incomplete",
            Outcome::Failed(_) => "response.failed",
            _ => "response.completed",
        };
        let _ = self.emit(last, json!({"response": response})).await;
        match outcome {
            Outcome::Failed(e) => Err(e),
            _ => Ok(response),
        }
    }

    fn usage_row(
        &mut self,
        status: u16,
        usage: Option<Usage>,
        ttft: f64,
        latency: f64,
    ) -> strata_core::store::UsageRecord {
        self.exchange.usage_row(
            self.answer.request(),
            self.answer.replica(),
            status,
            usage,
            ttft,
            latency,
        )
    }

    /// The answer's chunks as response events.
    async fn stream_reply(&mut self, a: &mut Reply) -> Result<(), Gone> {
        let item_id = a.item_id.clone();
        let item_id = item_id.as_str();
        let in_progress = response_object(&self.meta, &Outcome::InProgress, &[], None);
        self.emit("response.created", json!({"response": in_progress}))
            .await?;
        self.emit("response.in_progress", json!({"response": in_progress}))
            .await?;
        let item = json!({"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []});
        self.emit(
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        )
        .await?;
        let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
        self.emit(
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
        )
        .await?;
        let mut finish: Option<String> = None;
        while let Some(piece) = self.answer.next().await {
            let chunk = match piece {
                Piece::Chunk(chunk) => chunk,
                Piece::Failed(e) => {
                    a.outcome = Outcome::Failed(e);
                    return Ok(());
                }
            };
            let Some(data) = chunk.data() else {
                continue;
            };
            if let Some(message) = data.error() {
                a.outcome = Outcome::Failed(ApiError::internal(message));
                return Ok(());
            }
            if let Some(delta) = data.text() {
                if a.first_byte.is_none() {
                    let t = self.exchange.elapsed();
                    self.g.relay.metrics.first_byte.observe(t);
                    a.first_byte = Some(t);
                }
                a.text.push_str(delta);
                a.deltas += 1;
                self.g.relay.ledger.streamed_token(&self.meter);
                self.emit(
                    "response.output_text.delta",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}),
                )
                .await?;
            }
            if let Some(f) = data.finish_reason() {
                finish = Some(f.to_owned());
            }
        }
        // Counted for the whole answer, however many replicas it took.
        a.usage = self.exchange.stream_usage(
            self.answer.replica(),
            self.answer.reader().usage,
            self.answer.reader().deltas,
        );
        a.outcome = match finish.as_deref() {
            Some("length") => Outcome::Incomplete,
            Some(_) => Outcome::Completed,
            None => Outcome::Failed(ApiError::bad_gateway(
                "The replica ended the response early.",
            )),
        };
        if matches!(a.outcome, Outcome::Failed(_)) {
            return Ok(());
        }
        let done_part =
            json!({"type": "output_text", "text": a.text, "annotations": [], "logprobs": []});
        self.emit(
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": a.text, "logprobs": []}),
        )
        .await?;
        self.emit(
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": done_part}),
        )
        .await?;
        self.emit(
            "response.output_item.done",
            json!({"output_index": 0, "item": a.item().to_json()}),
        )
        .await?;
        Ok(())
    }

    /// Stores the response, and its input and output as the conversation's
    /// next items, in one transaction. (`&mut`: a turn is `Send` but not
    /// `Sync`, and is held across the writes.)
    async fn save(
        &mut self,
        outcome: &Outcome,
        output: &[Item],
        usage: Option<Usage>,
    ) -> Result<(), ApiError> {
        let response = response_object(&self.meta, outcome, output, usage);
        let doc = document(&response, &self.input, &self.context);
        let now = strata_core::now_ms();
        let record = StoredResponse {
            id: self.meta.id.clone(),
            created_at_ms: now,
            model: self.meta.model.clone(),
            conversation_id: self.meta.conversation.clone(),
            replica: Some(self.answer.replica().endpoint.id.clone()),
            content: serde_json::to_vec(&doc).expect("JSON values serialise"),
        };
        let items: Vec<StoredItem> = self
            .input
            .iter()
            .chain(output)
            .map(|i| stored_item(i, now))
            .collect();
        let p = &self.answer.request().principal;
        let objects = &self.g.objects;
        let written = objects
            .conversations
            .put_response(&p.tenant.id, &record, &items)
            .await;
        let result = match &written {
            Ok(true) => "ok",
            _ => "error",
        };
        objects
            .audit
            .record(
                p,
                "response.create",
                p.tenant.id.as_str(),
                &record.id,
                result,
            )
            .await;
        match written {
            Ok(true) => Ok(()),
            Ok(false) => Err(ApiError::not_found(
                "The conversation was deleted during the response.",
            )),
            Err(e) => Err(store_error(e)),
        }
    }
}

/// `GET /v1/responses/{id}`.
#[utoipa::path(
    get,
    operation_id = "show_response",
    path = "/v1/responses/{id}",
    tag = "openai",
    summary = "A stored response",
    params(("id" = String, Path, description = "A response id (`resp_…`)")),
    responses((status = 200, description = "OK", body = crate::http::openapi::ResponseObject), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn show(
    State(o): State<Arc<Objects>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = stored_doc(&*o.conversations, &p, &id)
        .await
        .map(|(_, doc)| doc["response"].clone());
    o.audit.answer(&p, "response.read", &id, result).await
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
