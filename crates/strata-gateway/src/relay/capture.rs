//! Answer capture for stored chat completions (`store: true`): the answer
//! put together from a stream's chunks (`Transcript`) or taken whole, and
//! kept with the request's messages, sealed under the tenant's key (`Keep`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};
use strata_core::store::{CompletionStore, StoredCompletion};

use crate::tenancy::audit::Audit;
use crate::tenancy::principal::Principal;

/// Where and what to keep for one request.
pub struct Keep {
    pub completions: Arc<dyn CompletionStore>,
    pub audit: Audit,
    /// Whose request it was: the tenant owns the row, the key is audited.
    pub principal: Arc<Principal>,
    pub messages: Value,
    pub metadata: BTreeMap<String, String>,
}

impl Keep {
    /// Seals and writes the answer with its request; a failure is logged (the
    /// client already has its answer) and counted as not stored.
    pub async fn save(&self, mut completion: Value) {
        let Some(id) = completion["id"].as_str().map(str::to_owned) else {
            tracing::warn!("answer without an id; not stored");
            return;
        };
        completion["metadata"] = json!(self.metadata);
        let doc = json!({"completion": completion, "messages": self.messages});
        let record = StoredCompletion {
            id,
            created_at_ms: strata_core::now_ms(),
            model: completion["model"].as_str().unwrap_or_default().to_owned(),
            content: serde_json::to_vec(&doc).expect("JSON values serialise"),
        };
        let p = &self.principal;
        let written = self.completions.put_completion(&p.tenant.id, &record).await;
        if let Err(e) = &written {
            tracing::error!(error = %e, id = %record.id, "cannot store the completion");
        }
        let result = if written.is_ok() { "ok" } else { "error" };
        self.audit
            .record(
                p,
                "completion.create",
                p.tenant.id.as_str(),
                &record.id,
                result,
            )
            .await;
    }
}

/// The answer of a streamed chat completion, put together chunk by chunk.
#[derive(Debug, Default)]
pub struct Transcript {
    id: Option<String>,
    created: Option<Value>,
    model: Option<String>,
    content: String,
    finish_reason: Option<Value>,
    usage: Option<Value>,
}

impl Transcript {
    pub fn observe(&mut self, chunk: &Value) {
        if self.id.is_none() {
            self.id = chunk["id"].as_str().map(str::to_owned);
            self.created = chunk.get("created").cloned();
            self.model = chunk["model"].as_str().map(str::to_owned);
        }
        if let Some(choice) = chunk["choices"].get(0) {
            if let Some(text) = choice["delta"]["content"].as_str() {
                self.content.push_str(text);
            }
            if !choice["finish_reason"].is_null() {
                self.finish_reason = Some(choice["finish_reason"].clone());
            }
        }
        if !chunk["usage"].is_null() {
            self.usage = Some(chunk["usage"].clone());
        }
    }

    /// Only an answer that ended (a finish reason arrived) is worth keeping.
    pub fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }

    pub fn into_completion(self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": self.content},
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }],
            "usage": self.usage,
        })
    }
}
