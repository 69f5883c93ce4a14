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

use crate::extract::{Path, Query};
use axum::http::{header, HeaderValue};
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
use strata_core::store::{Store, StoredItem, StoredResponse};
use strata_core::{read_body, ApiError};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::admin::{record_audit, store_error};
use crate::auth::Principal;
use crate::proxy::{
    continued, json_response, no_replica_for_the_rest, resumed_usage, usage_row, Forward, Moves,
    Route, SseEvents,
};
use crate::replicas::InFlight;
use crate::snapshots::Snapshots;
use crate::stored::{answer, deleted, may_change};
use crate::upstream::Upstream;
use crate::AppState;

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
    store: &dyn Store,
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

/// The items before this turn's input, and the replica that served the
/// session's last turn.
async fn context(
    store: &dyn Store,
    p: &Principal,
    turn: &TurnRequest,
) -> Result<(Vec<Item>, Option<String>), ApiError> {
    if let Some(prev) = &turn.previous_response_id {
        let (stored, doc) = stored_doc(store, p, prev)
            .await
            .map_err(|e| e.with_param("previous_response_id"))?;
        let mut items = items_of(&doc["context"]);
        items.extend(items_of(&doc["input"]));
        items.extend(items_of(&doc["response"]["output"]));
        return Ok((items, stored.replica));
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
        return Ok((items, replica));
    }
    Ok((Vec::new(), None))
}

/// `POST /v1/responses`.
#[utoipa::path(
    post,
    operation_id = "create_response",
    path = "/v1/responses",
    tag = "openai",
    summary = "Create a response (a turn)",
    request_body = strata_core::responses::ResponsesRequest,
    responses((status = 200, description = "The response, or its server-sent events with `stream`", body = crate::openapi::ResponseObject), crate::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Arc<Principal>>,
    req: Request,
) -> Response {
    let arrived = Instant::now();
    let response = match start(state.clone(), p, req, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    crate::count_request(&state, ROUTE, &response);
    response
}

/// The chat request a turn becomes for the replica, with `items` (the
/// stored context, then the new input), checked as any chat request is
/// (model name, sampling bounds).
pub(crate) fn chat_request(
    turn: &TurnRequest,
    items: &[Item],
) -> Result<(Value, Bytes, Generation), ApiError> {
    let request = json!({
        "model": turn.model,
        "messages": chat_messages(turn.instructions.as_deref(), items),
        "max_tokens": turn.max_output_tokens,
        "temperature": turn.temperature,
        "top_p": turn.top_p,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let chat = Bytes::from(request.to_string());
    let generation = parse_body::<ChatCompletionRequest>(&chat)?.validate()?;
    Ok((request, chat, generation))
}

async fn start(
    state: Arc<AppState>,
    p: Arc<Principal>,
    req: Request,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), state.max_body_bytes).await?;
    let turn = parse_body::<ResponsesRequest>(&body)?.validate()?;
    let (context, replica) = context(&*state.store, &p, &turn).await?;
    let mut items = context.clone();
    items.extend(turn.input.iter().cloned());
    let (request, chat, generation) = chat_request(&turn, &items)?;
    let request_id = strata_core::openai::request_id();
    let span = crate::request_span(&request_id, &p, &generation, ROUTE);
    let (charge, estimated_tokens) = crate::admit(&state, &p, &generation, chat.len())
        .instrument(span.clone())
        .await?;
    let response_id = new_id("resp");
    // The replica holding the session's cache, or one it was moved to.
    let replica = match (
        &state.snapshots,
        turn.conversation
            .as_ref()
            .or(turn.previous_response_id.as_ref()),
    ) {
        (Some(snapshots), Some(session)) => {
            restore_if_moved(&state, snapshots, &p, &generation.model, replica, session).await
        }
        _ => replica,
    };
    let prefix = state
        .proxy
        .replicas
        .prefix_of(p.tenant.id.as_str(), &generation.input);
    let mut forward = Forward {
        route: Route {
            path: "/v1/chat/completions",
            principal: p,
            // A conversation's turns share its id; a chain's next turn names this response.
            session: Some(
                turn.conversation
                    .clone()
                    .unwrap_or_else(|| response_id.clone()),
            ),
            prefix,
            body: chat,
            model: generation.model,
            estimated_tokens,
        },
        charge,
        keep: None,
        stream: true,
        include_usage: true,
        request_id,
        arrived,
    };
    let (flight, upstream) = match state
        .proxy
        .open(&forward.route, replica.as_deref())
        .instrument(span.clone())
        .await
    {
        Ok(opened) => opened,
        Err(refusal) => return Ok(refusal),
    };
    let status = upstream.status();
    if !status.is_success() {
        // The replica refused (the context is too long, ...): its error, metered.
        let body = upstream.bytes().await.unwrap_or_default();
        let t = arrived.elapsed().as_secs_f64();
        state.proxy.ledger.record(usage_row(
            &mut forward,
            &flight,
            status.as_u16(),
            None,
            t,
            t,
        ));
        return Ok(json_response(status, body));
    }
    let meta = ResponseMeta {
        id: response_id,
        created_at: crate::now_ms() / 1000,
        model: forward.route.model.clone(),
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
        state: state.clone(),
        meta,
        input: turn.input,
        context,
        request,
        forward,
        flight,
        events: EventWriter::default(),
        sink: None,
    };
    if !turn.stream {
        return run
            .pump(upstream)
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
        .pump(upstream)
        .instrument(span),
    );
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        Some((Ok::<_, std::io::Error>(event), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// When the replica that served the session's last turn can no longer take
/// it (drained, gone) and a snapshot of the session was kept, restores it on
/// the replica the turn will go to and prefers that one.
async fn restore_if_moved(
    state: &AppState,
    snapshots: &Snapshots,
    p: &Principal,
    model: &str,
    home: Option<String>,
    session: &str,
) -> Option<String> {
    let replicas = &state.proxy.replicas;
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
    if snapshots
        .restore(&state.proxy.client, &target, tenant, session)
        .await
    {
        tracing::info!(%session, replica = %target.endpoint.id, "session's KV cache restored from a snapshot");
        return Some(target.endpoint.id.clone());
    }
    home
}

/// One turn in flight.
struct Turn {
    state: Arc<AppState>,
    meta: ResponseMeta,
    /// The chat request sent upstream, kept to resume it elsewhere.
    request: Value,
    input: Vec<Item>,
    context: Vec<Item>,
    forward: Forward,
    flight: InFlight,
    events: EventWriter,
    /// The client's event stream; `None` when the answer is returned whole.
    sink: Option<mpsc::Sender<Bytes>>,
}

/// The answer as it streams in.
struct Answer {
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

impl Answer {
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

    /// Reads the replica's chat stream through to the end, emitting events,
    /// then stores, meters and returns the final response object.
    async fn pump(mut self, upstream: Upstream) -> Result<Value, ApiError> {
        let mut answer = Answer {
            item_id: new_id("msg"),
            text: String::new(),
            first_byte: None,
            deltas: 0,
            outcome: Outcome::InProgress,
            usage: None,
        };
        let streamed = self.stream_answer(upstream, &mut answer).await;
        let Answer {
            first_byte,
            usage,
            deltas,
            ..
        } = answer;
        let latency = self.forward.arrived.elapsed().as_secs_f64();
        if streamed.is_err() {
            // 499: the client went away before the end, as nginx logs it.
            let row = usage_row(
                &mut self.forward,
                &self.flight,
                499,
                usage,
                first_byte.unwrap_or(latency),
                latency,
            );
            self.state.proxy.ledger.record_streamed(row, deltas.into());
            return Err(ApiError::bad_gateway("The client went away."));
        }
        let output = match answer.outcome {
            Outcome::Failed(_) => Vec::new(),
            _ => vec![answer.item()],
        };
        let mut outcome = answer.outcome;
        if !matches!(outcome, Outcome::Failed(_)) && self.meta.store {
            if let Err(e) = self.save(&outcome, &output, usage).await {
                outcome = Outcome::Failed(e);
            }
        }
        let status = match &outcome {
            Outcome::Failed(e) => e.status,
            _ => 200,
        };
        let row = usage_row(
            &mut self.forward,
            &self.flight,
            status,
            usage,
            first_byte.unwrap_or(latency),
            latency,
        );
        if self.meta.store {
            // Metered before the client hears the turn is done.
            self.state.proxy.ledger.record_now(row, deltas.into()).await;
        } else {
            self.state.proxy.ledger.record_streamed(row, deltas.into());
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

    async fn stream_answer(&mut self, upstream: Upstream, a: &mut Answer) -> Result<(), Gone> {
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
        let mut sse = SseEvents::new(false);
        let mut body = upstream.bytes_stream();
        let mut finish: Option<String> = None;
        // Deltas streamed before the latest resumption.
        let (mut before_resume, mut moves) = (0u32, Moves::default());
        loop {
            let chunk = match body.next().await {
                Some(Ok(c)) => c,
                ended => {
                    if finish.is_some() {
                        break;
                    }
                    // The replica died (or ended) mid-answer: continue the
                    // answer on another one; the client sees one stream.
                    let replica = self.flight.replica().clone();
                    if let Some(Err(e)) = &ended {
                        tracing::warn!(replica = %replica.endpoint.id, error = %crate::upstream::describe(e), "replica failed mid-response");
                        replica.mark_down();
                    }
                    if !moves.allow(a.deltas.into()) {
                        a.outcome = Outcome::Failed(moves.exhausted());
                        return Ok(());
                    }
                    let Some(next) = self.resume(&a.text, a.deltas).await else {
                        a.outcome = Outcome::Failed(no_replica_for_the_rest());
                        return Ok(());
                    };
                    tracing::info!(from = %replica.endpoint.id, to = %self.flight.replica().endpoint.id, "response resumed on another replica");
                    self.state.proxy.metrics.retries.inc();
                    body = next.bytes_stream();
                    sse = SseEvents::new(false);
                    before_resume = a.deltas;
                    continue;
                }
            };
            let events = sse.push(&chunk);
            for data in sse_data(&events) {
                if data == "[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if let Some(e) = v.get("error") {
                    let message = e["message"]
                        .as_str()
                        .unwrap_or("generation failed")
                        .to_owned();
                    a.outcome = Outcome::Failed(ApiError::internal(message));
                    return Ok(());
                }
                let choice = &v["choices"][0];
                if let Some(delta) = choice["delta"]["content"]
                    .as_str()
                    .filter(|d| !d.is_empty())
                {
                    if a.first_byte.is_none() {
                        let t = self.forward.arrived.elapsed().as_secs_f64();
                        self.state.proxy.metrics.first_byte.observe(t);
                        a.first_byte = Some(t);
                    }
                    a.text.push_str(delta);
                    a.deltas += 1;
                    self.state.proxy.ledger.streamed_token();
                    self.emit(
                        "response.output_text.delta",
                        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}),
                    )
                    .await?;
                }
                if let Some(f) = choice["finish_reason"].as_str() {
                    finish = Some(f.to_owned());
                }
            }
        }
        a.usage = sse.usage.map(|u| match moves.count {
            0 => u,
            _ => resumed_usage(u, before_resume),
        });
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

    /// Sends the turn again, to another replica, for the rest of the
    /// answer (`proxy::continued`).
    async fn resume(&mut self, partial: &str, generated: u32) -> Option<Upstream> {
        let rest = continued(&self.request, partial, generated);
        self.forward.route.body = Bytes::from(rest.to_string());
        let (flight, upstream) = self.state.proxy.reopen(&self.forward.route).await?;
        self.flight = flight;
        Some(upstream)
    }

    /// Stores the response, and its input and output as the conversation's
    /// next items, in one transaction.
    async fn save(
        &self,
        outcome: &Outcome,
        output: &[Item],
        usage: Option<Usage>,
    ) -> Result<(), ApiError> {
        let response = response_object(&self.meta, outcome, output, usage);
        let doc = document(&response, &self.input, &self.context);
        let now = crate::now_ms();
        let record = StoredResponse {
            id: self.meta.id.clone(),
            created_at_ms: now,
            model: self.meta.model.clone(),
            conversation_id: self.meta.conversation.clone(),
            replica: Some(self.flight.replica().endpoint.id.clone()),
            content: serde_json::to_vec(&doc).expect("JSON values serialise"),
        };
        let items: Vec<StoredItem> = self
            .input
            .iter()
            .chain(output)
            .map(|i| stored_item(i, now))
            .collect();
        let p = &self.forward.route.principal;
        let written = self
            .state
            .store
            .put_response(&p.tenant.id, &record, &items)
            .await;
        let result = match &written {
            Ok(true) => "ok",
            _ => "error",
        };
        record_audit(
            &*self.state.store,
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

pub(crate) fn stored_item(item: &Item, at_ms: i64) -> StoredItem {
    StoredItem {
        id: item.id.clone(),
        created_at_ms: at_ms,
        content: serde_json::to_vec(&item.to_json()).expect("JSON values serialise"),
    }
}

/// The `data:` payloads of complete SSE events.
pub(crate) fn sse_data(events: &[u8]) -> Vec<&str> {
    std::str::from_utf8(events)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .collect()
}

/// `GET /v1/responses/{id}`.
#[utoipa::path(
    get,
    operation_id = "show_response",
    path = "/v1/responses/{id}",
    tag = "openai",
    summary = "A stored response",
    params(("id" = String, Path, description = "A response id (`resp_…`)")),
    responses((status = 200, description = "OK", body = crate::openapi::ResponseObject), crate::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = stored_doc(&*state.store, &p, &id)
        .await
        .map(|(_, doc)| doc["response"].clone());
    answer(&*state.store, &p, "response.read", &id, result).await
}

/// `DELETE /v1/responses/{id}`.
#[utoipa::path(
    delete,
    operation_id = "delete_response",
    path = "/v1/responses/{id}",
    tag = "openai",
    summary = "Delete a stored response",
    params(("id" = String, Path, description = "A response id (`resp_…`)")),
    responses((status = 200, description = "OK", body = crate::openapi::Deleted), crate::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        may_change(&p, "delete stored responses")?;
        let done = state.store.delete_response(&p.tenant.id, &id).await;
        deleted(
            done,
            json!({"id": id, "object": "response", "deleted": true}),
            || not_found(&id),
        )
    }
    .await;
    answer(&*state.store, &p, "response.delete", &id, result).await
}

/// `GET /v1/responses/{id}/input_items`.
#[utoipa::path(
    get,
    operation_id = "list_response_input_items",
    path = "/v1/responses/{id}/input_items",
    tag = "openai",
    summary = "The input items of a stored response",
    params(("id" = String, Path, description = "A response id (`resp_…`)"), crate::openapi::PageParams),
    responses((status = 200, description = "OK", body = crate::openapi::Page), crate::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn input_items(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let result = async {
        let page = q.validate()?;
        let (_, doc) = stored_doc(&*state.store, &p, &id).await?;
        let items: Vec<Value> = doc["input"].as_array().cloned().unwrap_or_default();
        let (data, more) = page.slice(&items, |v| v["id"].as_str().unwrap_or_default());
        Ok(strata_core::responses::list_page(data, more))
    }
    .await;
    answer(&*state.store, &p, "response.input_items", &id, result).await
}
