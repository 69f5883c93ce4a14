//! What a background response keeps, and the writer of its events: the
//! stored document (response, input, context; while it runs, what it
//! takes to run it), each event kept before anyone hears it, and the row
//! written at its end.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};
use strata_core::responses::{response_object, Item, Outcome, ResponseMeta};
use strata_core::store::{Appended, BackgroundStore, Running, StoredItem, StoredResponse};
use strata_core::tenant::TenantId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::generate::Inference;

/// What a stored response keeps: the response object, its own input items,
/// and the context items before them (so a later `previous_response_id`
/// needs one read, however long the chain).
pub(super) fn document(response: &Value, input: &[Item], context: &[Item]) -> Value {
    json!({
        "response": response,
        "input": input.iter().map(Item::to_json).collect::<Vec<_>>(),
        "context": context.iter().map(Item::to_json).collect::<Vec<_>>(),
    })
}

pub(super) fn items_of(v: &Value) -> Vec<Item> {
    v.as_array()
        .map(|a| a.iter().filter_map(Item::from_json).collect())
        .unwrap_or_default()
}

/// Why a turn stopped before its end.
pub(super) enum Stop {
    /// The client went away; the turn is dropped (and the replica's
    /// generation with it).
    Gone,
    /// A cancel of the background response was asked for.
    Cancelled,
    /// Another gateway runs the background response now (or it ended, or
    /// was deleted): this one stops without a word.
    Lost,
}

/// The events after which nothing follows.
pub(super) const ENDS: [&str; 4] = [
    "response.completed",
    "response.incomplete",
    "response.failed",
    "response.cancelled",
];

/// The event's kind (`event: <kind>` of its SSE frame).
pub(super) fn kind_of(event: &[u8]) -> &str {
    std::str::from_utf8(event)
        .ok()
        .and_then(|e| e.strip_prefix("event: "))
        .and_then(|e| e.split('\n').next())
        .unwrap_or_default()
}

/// The event's data, as JSON.
pub(super) fn data_of(event: &[u8]) -> Value {
    std::str::from_utf8(event)
        .ok()
        .and_then(|e| e.split_once("\ndata: "))
        .and_then(|(_, d)| serde_json::from_str(d.trim_end()).ok())
        .unwrap_or_default()
}

/// What a gateway needs to run a background response, kept with it (sealed)
/// while it runs.
#[derive(Clone)]
pub(super) struct Run {
    pub meta: ResponseMeta,
    pub input: Vec<Item>,
    pub context: Vec<Item>,
    /// The id of the output message (the same whoever streams it).
    pub item_id: String,
    /// The key that created it: a gateway taking it over acts as this key.
    pub key_id: String,
    /// The chat request the replica gets, as first sent.
    pub chat: Value,
    pub session: Option<String>,
}

impl Run {
    pub(super) fn row(&self, outcome: &Outcome, replica: Option<String>) -> StoredResponse {
        let response = response_object(&self.meta, outcome, &[], None);
        let mut doc = document(&response, &self.input, &self.context);
        doc["run"] = json!({
            "item_id": self.item_id,
            "key_id": self.key_id,
            "chat": self.chat,
            "session": self.session,
        });
        StoredResponse {
            id: self.meta.id.clone(),
            created_at_ms: self.meta.created_at * 1000,
            model: self.meta.model.clone(),
            conversation_id: self.meta.conversation.clone(),
            replica,
            content: serde_json::to_vec(&doc).expect("JSON values serialise"),
        }
    }

    pub(super) fn read(doc: &Value) -> Option<Run> {
        let run = &doc["run"];
        Some(Run {
            meta: ResponseMeta::from_object(&doc["response"])?,
            input: items_of(&doc["input"]),
            context: items_of(&doc["context"]),
            item_id: run["item_id"].as_str()?.to_owned(),
            key_id: run["key_id"].as_str()?.to_owned(),
            chat: run["chat"].clone(),
            session: run["session"].as_str().map(str::to_owned),
        })
    }
}

/// A background response's events as they are written: each kept in the
/// store, then passed to the client while one listens.
pub(super) struct Log {
    pub(super) store: Arc<dyn BackgroundStore>,
    pub(super) tenant: TenantId,
    pub(super) id: String,
    /// Events before this number are kept already (by a gateway whose
    /// response this one took over).
    pub(super) resume_at: u64,
    pub(super) client: Option<mpsc::Sender<Bytes>>,
    /// Cancelled when this gateway lost the response's lease.
    pub(super) lost: CancellationToken,
}

impl Log {
    pub(super) fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub(super) fn resume_at(&self) -> u64 {
        self.resume_at
    }

    /// Keeps event `seq`, then passes it on. `Stop::Cancelled` once a
    /// cancel was asked for (the event is kept), `Stop::Lost` when the
    /// event was not kept: another gateway runs the response now, or it
    /// ended, or was deleted.
    pub(super) async fn keep(&mut self, seq: u64, event: String) -> Result<(), Stop> {
        if seq < self.resume_at {
            return Ok(());
        }
        if self.lost.is_cancelled() {
            return Err(Stop::Lost);
        }
        let event = Bytes::from(event);
        let cancelling = match self
            .store
            .append_events(&self.tenant, &self.id, seq, &[event.to_vec()])
            .await
        {
            Ok(Appended {
                kept: true,
                running,
            }) => running == Some(Running::Cancelling),
            Ok(_) => return Err(Stop::Lost),
            Err(e) => {
                // Its lease runs out; a gateway takes it over from the
                // events kept.
                tracing::warn!(error = %e, response = %self.id, "cannot keep a background response's event; it goes on later");
                return Err(Stop::Lost);
            }
        };
        if let Some(client) = &self.client {
            if client.send(event).await.is_err() {
                self.client = None;
            }
        }
        if cancelling {
            Err(Stop::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Stores the response as it ended (`doc`; `replica` served it), with
/// `items` appended to its conversation; when the conversation is gone,
/// the response alone (so it no longer runs).
pub(super) async fn end(
    g: &Inference,
    tenant: &TenantId,
    meta: &ResponseMeta,
    replica: Option<String>,
    doc: Value,
    items: &[StoredItem],
) {
    let mut record = StoredResponse {
        id: meta.id.clone(),
        created_at_ms: meta.created_at * 1000,
        model: meta.model.clone(),
        conversation_id: meta.conversation.clone(),
        replica,
        content: serde_json::to_vec(&doc).expect("JSON values serialise"),
    };
    let conversations = &g.objects.conversations;
    match conversations.put_response(tenant, &record, items).await {
        Ok(true) => {}
        Ok(false) => {
            record.conversation_id = None;
            let _ = conversations.put_response(tenant, &record, &[]).await;
        }
        Err(e) => {
            tracing::warn!(error = %e, response = %record.id, "cannot store a background response's end; it is ended again later")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_core::responses::EventWriter;

    #[test]
    fn a_kept_event_is_read_back_as_written() {
        let mut w = EventWriter::default();
        w.skip_to(7);
        let frame = w.event("response.output_text.delta", json!({"delta": "Once"}));
        assert_eq!(kind_of(frame.as_bytes()), "response.output_text.delta");
        let data = data_of(frame.as_bytes());
        assert_eq!(
            (data["delta"].as_str(), data["sequence_number"].as_u64()),
            (Some("Once"), Some(7))
        );
        let end = w.event("response.completed", json!({"response": {"id": "resp_1"}}));
        assert!(ENDS.contains(&kind_of(end.as_bytes())));
        assert_eq!(data_of(end.as_bytes())["response"]["id"], "resp_1");
        // Not a frame: no kind, no data.
        assert_eq!((kind_of(b"data: x"), data_of(b"\xff")), ("", Value::Null));
    }
}
