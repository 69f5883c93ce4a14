//! One turn in flight: the replica's answer read chunk by chunk and told
//! as response events (to the client, to a background response's log, or
//! to nobody when the answer is returned whole), then stored and metered.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};
use strata_core::openai::Usage;
use strata_core::responses::{
    new_id, response_object, EventWriter, Item, ItemRole, Outcome, ResponseMeta,
};
use strata_core::store::{StoredItem, StoredResponse};
use strata_core::ApiError;
use tokio::sync::mpsc;

use crate::api::generate::Inference;
use crate::api::objects::stored_item;
use crate::api::responses::kept::{self, document, Log, Stop};
use crate::http::error::store_error;
use crate::relay::answer::{Answer, Piece};
use crate::relay::forward::Exchange;
use crate::relay::ledger::TokenMeter;

/// One turn in flight.
pub(super) struct Turn {
    pub(super) g: Arc<Inference>,
    /// The model's demand counters, each streamed token counted there.
    pub(super) meter: TokenMeter,
    pub(super) meta: ResponseMeta,
    pub(super) input: Vec<Item>,
    pub(super) context: Vec<Item>,
    pub(super) exchange: Exchange,
    /// The answer, from the replica that took the turn and any that took
    /// the rest after one failed.
    pub(super) answer: Answer,
    pub(super) events: EventWriter,
    pub(super) sink: Sink,
}

/// Where a turn's events go.
pub(super) enum Sink {
    /// Nowhere: the answer is returned whole.
    Whole,
    /// The client's event stream.
    Client(mpsc::Sender<Bytes>),
    /// A background response's: each event kept, then passed to the client
    /// while one listens.
    Kept(Log),
}

/// The answer as it streams in.
pub(super) struct Reply {
    pub(super) item_id: String,
    pub(super) text: String,
    /// Seconds from arrival to the first text.
    pub(super) first_byte: Option<f64>,
    /// Text deltas streamed (each one token or more), counted as served
    /// tokens as they pass.
    pub(super) deltas: u32,
    pub(super) outcome: Outcome,
    pub(super) usage: Option<Usage>,
}

impl Reply {
    /// Nothing streamed yet; the output message gets `item_id` (a new id
    /// without it).
    pub(super) fn new(item_id: Option<String>) -> Reply {
        Reply {
            item_id: item_id.unwrap_or_else(|| new_id("msg")),
            text: String::new(),
            first_byte: None,
            deltas: 0,
            outcome: Outcome::InProgress,
            usage: None,
        }
    }

    /// The output message, as stored and shown.
    fn item(&self) -> Item {
        let mut item = Item::new(ItemRole::Assistant, self.text.clone());
        item.id = self.item_id.clone();
        if matches!(self.outcome, Outcome::Incomplete | Outcome::Cancelled) {
            item.status = "incomplete";
        }
        item
    }
}

impl Turn {
    async fn emit(&mut self, kind: &str, fields: Value) -> Result<(), Stop> {
        let seq = self.events.next();
        let event = self.events.event(kind, fields);
        match &mut self.sink {
            Sink::Whole => Ok(()),
            Sink::Client(tx) => tx.send(Bytes::from(event)).await.map_err(|_| Stop::Gone),
            Sink::Kept(log) => log.keep(seq, event).await,
        }
    }

    /// Reads the answer through to the end, emitting events, then stores,
    /// meters and returns the final response object.
    pub(super) async fn pump(mut self, mut reply: Reply) -> Result<Value, ApiError> {
        let streamed = self.stream_reply(&mut reply).await;
        let latency = self.exchange.elapsed();
        match streamed {
            Ok(()) => {}
            Err(Stop::Gone) => {
                // 499: the client went away before the end, as nginx logs it.
                let row = self.usage_row(
                    499,
                    reply.usage,
                    reply.first_byte.unwrap_or(latency),
                    latency,
                );
                self.g
                    .relay
                    .ledger
                    .record_streamed(row, reply.deltas.into());
                return Err(ApiError::bad_gateway("The client went away."));
            }
            Err(Stop::Lost) => {
                return Err(ApiError::bad_gateway(
                    "Another gateway runs this response now.",
                ))
            }
            Err(Stop::Cancelled) => {
                reply.outcome = Outcome::Cancelled;
                // What was generated until the cancel is charged.
                reply.usage = reply.usage.or_else(|| {
                    let prompt = self.exchange.charge.estimated_prompt();
                    Some(Usage::new(
                        prompt.min(u64::from(u32::MAX)) as u32,
                        reply.deltas,
                    ))
                });
            }
        }
        if matches!(self.sink, Sink::Kept(_)) {
            return self.end_kept(reply, latency).await;
        }
        let Reply {
            first_byte,
            usage,
            deltas,
            ..
        } = reply;
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
        let _ = self
            .emit(last_event(&outcome), json!({"response": response}))
            .await;
        match outcome {
            Outcome::Failed(e) => Err(e),
            _ => Ok(response),
        }
    }

    /// The end of a background response: its last event kept first (a
    /// gateway that takes over a response whose last event was kept only
    /// writes its row), then metered, then its row and the conversation's
    /// new items written, and audited.
    async fn end_kept(mut self, reply: Reply, latency: f64) -> Result<Value, ApiError> {
        let output = match reply.outcome {
            Outcome::Failed(_) => Vec::new(),
            _ => vec![reply.item()],
        };
        let outcome = reply.outcome;
        let response = response_object(&self.meta, &outcome, &output, reply.usage);
        if let Err(Stop::Lost) = self
            .emit(last_event(&outcome), json!({"response": response}))
            .await
        {
            return Err(ApiError::bad_gateway(
                "Another gateway runs this response now.",
            ));
        }
        let status = match &outcome {
            Outcome::Failed(e) => e.status,
            _ => 200,
        };
        let ttft = reply.first_byte.unwrap_or(latency);
        let mut row = self.usage_row(status, reply.usage, ttft, latency);
        // Under the response's id: a gateway that takes over a response
        // whose last event was kept writes its row under the same id, and
        // the ledger keeps one row per id.
        row.request_id = self.meta.id.clone();
        self.g
            .relay
            .ledger
            .record_now(row, reply.deltas.into())
            .await;
        let now = strata_core::now_ms();
        let items: Vec<StoredItem> = match outcome {
            Outcome::Completed | Outcome::Incomplete => self
                .input
                .iter()
                .chain(&output)
                .map(|i| stored_item(i, now))
                .collect(),
            _ => Vec::new(),
        };
        let Sink::Kept(log) = &self.sink else {
            unreachable!("end_kept is the end of a kept turn")
        };
        let doc = document(&response, &self.input, &self.context);
        let replica = Some(self.answer.replica().endpoint.id.clone());
        kept::end(&self.g, log.tenant(), &self.meta, replica, doc, &items).await;
        let p = &self.answer.request().principal;
        let result = match outcome {
            Outcome::Failed(_) => "error",
            _ => "ok",
        };
        self.g
            .objects
            .audit
            .record(
                p,
                "response.create",
                p.tenant.id.as_str(),
                &self.meta.id,
                result,
            )
            .await;
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
    async fn stream_reply(&mut self, a: &mut Reply) -> Result<(), Stop> {
        let item_id = a.item_id.clone();
        let item_id = item_id.as_str();
        let created = match self.meta.background {
            true => Outcome::Queued,
            false => Outcome::InProgress,
        };
        let created = response_object(&self.meta, &created, &[], None);
        self.emit("response.created", json!({"response": created}))
            .await?;
        let in_progress = response_object(&self.meta, &Outcome::InProgress, &[], None);
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
        // A response taken over goes on after the events kept.
        if let Sink::Kept(log) = &self.sink {
            self.events.skip_to(log.resume_at());
        }
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

/// The event a response's stream ends with.
pub(super) fn last_event(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Incomplete => "response.incomplete",
        Outcome::Failed(_) => "response.failed",
        Outcome::Cancelled => "response.cancelled",
        _ => "response.completed",
    }
}
