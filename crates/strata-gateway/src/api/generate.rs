//! `POST /v1/chat/completions` and `POST /v1/completions`, in the order a
//! request goes through them: read and check the body, admit it (a replica
//! in the tenant's pool, limits, budget, fair-queue slot), make the request
//! a replica gets, send it and relay the answer. The Responses route goes
//! through the same admission (`Inference::admit`).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use strata_core::openai::{
    parse_body, request_id, ChatCompletionRequest, CompletionRequest, Generation,
};
use strata_core::{read_body, ApiError};
use tokio::sync::watch;
use tracing::Instrument;

use crate::api::catalog::{self, CatalogModel};
use crate::api::objects::Objects;
use crate::fleet::snapshots::Snapshots;
use crate::metrics::RequestLabels;
use crate::relay::capture::Keep;
use crate::relay::forward::{Exchange, Relay, ReplicaRequest};
use crate::relay::passthrough;
use crate::tenancy::admission::{Charge, Estimate, Gate};
use crate::tenancy::fairq::Class;
use crate::tenancy::principal::Principal;

/// The state of the generation routes (chat, completions, Responses, the
/// model list).
pub struct Inference {
    pub gate: Arc<Gate>,
    pub relay: Relay,
    /// Where answers and turns are stored.
    pub objects: Arc<Objects>,
    /// Where drained replicas' sessions were kept, and the client that
    /// restores them on another replica.
    pub snapshots: Option<Arc<Snapshots>>,
    pub client: reqwest::Client,
    pub max_body_bytes: usize,
    /// What a chat without `max_tokens` may generate at most (a model of
    /// the catalog: its own engines' figure).
    pub default_max_tokens: u32,
    /// The models of this gateway's pools, one pool each, and the aliases
    /// for them, as they are now: listed even while no replica runs; a
    /// request names one of them or gets a 404. Empty: replicas report
    /// what they serve (a cluster's gateway).
    pub models: watch::Receiver<Vec<CatalogModel>>,
    /// Unix seconds the gateway started (the models' `created`).
    pub started: u64,
    /// Background responses: where they and their events are kept, and
    /// which this gateway runs.
    pub background: Arc<crate::api::running::Background>,
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    summary = "Complete a prompt",
    request_body = strata_core::openai::CompletionRequest,
    responses((status = 200, description = "The completion, or server-sent events of `text_completion` chunks with `stream`", content((strata_core::openai::Completion = "application/json"), ("text/event-stream"))), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn completions(
    State(g): State<Arc<Inference>>,
    Extension(p): Extension<Arc<Principal>>,
    req: Request,
) -> Response {
    generate(&g, p, req, "/v1/completions").await
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    summary = "Answer a chat",
    request_body = strata_core::openai::ChatCompletionRequest,
    responses((status = 200, description = "The chat completion, or server-sent events of `chat.completion.chunk`s with `stream`", content((strata_core::openai::ChatCompletion = "application/json"), ("text/event-stream"))), crate::http::openapi::Failures),
    security(("api_key" = []))
)]
pub(crate) async fn chat_completions(
    State(g): State<Arc<Inference>>,
    Extension(p): Extension<Arc<Principal>>,
    req: Request,
) -> Response {
    generate(&g, p, req, "/v1/chat/completions").await
}

/// One chat completion or completion, counted by route and status.
async fn generate(g: &Inference, p: Arc<Principal>, req: Request, path: &'static str) -> Response {
    let arrived = Instant::now();
    let response = match phases(g, p, req, path, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    g.count(path, &response);
    response
}

async fn phases(
    g: &Inference,
    p: Arc<Principal>,
    req: Request,
    path: &'static str,
    arrived: Instant,
) -> Result<Response, ApiError> {
    // 1. The body, checked as far as a gateway can without the tokenizer;
    //    the replica checks the context and its 4xx passes through.
    let body = read_body(req.into_body(), g.max_body_bytes).await?;
    let mut generation: Generation = match path {
        "/v1/completions" => parse_body::<CompletionRequest>(&body)?.validate()?,
        _ => parse_body::<ChatCompletionRequest>(&body)?.validate()?,
    };
    // 2. An alias's model for this conversation (the replica gets its id),
    //    then admission.
    let (body, asked) = match g.alias_target(&generation.model, None, || {
        catalog::conversation_key(p.tenant.id.as_str(), &generation.input)
    }) {
        Some(target) => (
            with_model(&body, &target)?,
            Some(std::mem::replace(&mut generation.model, target)),
        ),
        None => (body, None),
    };
    let request_id = request_id();
    let span = span(&request_id, &p, &generation, path);
    let (charge, estimated_tokens) = g
        .admit(&p, &generation, asked.as_deref(), body.len())
        .instrument(span.clone())
        .await?;
    // 3. What the replica gets, and where the answer is kept.
    let keep = generation.store.then(|| keep(g, &p, &body, &generation));
    let request = ReplicaRequest {
        path,
        prefix: g
            .relay
            .replicas
            .prefix_of(p.tenant.id.as_str(), &generation.input),
        principal: p,
        session: None,
        body,
        model: generation.model,
        estimated_tokens,
    };
    let exchange = Exchange {
        charge,
        request_id,
        arrived,
        stream: generation.stream,
    };
    // 4. Sent to a replica (another while one fails before answering), the
    //    answer relayed back and metered.
    Ok(
        passthrough::relay(&g.relay, request, exchange, generation.include_usage, keep)
            .instrument(span)
            .await,
    )
}

/// `body` (a JSON object) with `model` set to `model`: what the replica of
/// an alias's model gets, since an engine answers only for its own model.
pub(crate) fn with_model(body: &Bytes, model: &str) -> Result<Bytes, ApiError> {
    let mut object: serde_json::Map<String, serde_json::Value> = parse_body(body)?;
    object.insert("model".into(), model.into());
    serde_json::to_vec(&object)
        .map(Bytes::from)
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Where a `store: true` answer is kept, with the request's messages.
fn keep(g: &Inference, p: &Arc<Principal>, body: &Bytes, generation: &Generation) -> Keep {
    let messages = serde_json::from_slice::<serde_json::Value>(body)
        .map(|v| v["messages"].clone())
        .unwrap_or_default();
    Keep {
        completions: g.objects.completions.clone(),
        audit: g.objects.audit.clone(),
        principal: p.clone(),
        messages,
        metadata: generation.metadata.clone(),
    }
}

/// A generation request's span: who asks for what; the relay adds the
/// replica that answered, how many it tried before, and its status.
pub(crate) fn span(
    request_id: &str,
    p: &Principal,
    generation: &Generation,
    path: &'static str,
) -> tracing::Span {
    tracing::info_span!(
        "request",
        id = %request_id,
        tenant = %p.tenant.id,
        key = %p.key.id,
        model = %generation.model,
        path,
        stream = generation.stream,
        replica = tracing::field::Empty,
        retries = tracing::field::Empty,
        status = tracing::field::Empty,
    )
}

impl Inference {
    /// The model a request for `asked` goes to where `asked` is an alias of
    /// the catalog: the model of the conversation's last turn
    /// (`previous`) while the alias names it, else the alias's weighted
    /// pick for the conversation's `key`. `None`: not an alias, or none of
    /// its models can take it (admission answers 404).
    pub(crate) fn alias_target(
        &self,
        asked: &str,
        previous: Option<&str>,
        key: impl FnOnce() -> Vec<u8>,
    ) -> Option<String> {
        let models = self.models.borrow();
        let alias = &models.iter().find(|m| m.id == asked && m.is_alias())?.alias;
        let served = |id: &str| models.iter().any(|m| m.id == id && !m.is_alias());
        catalog::pick(alias, served, previous, &key()).map(str::to_owned)
    }

    /// Admission for a generation whose upstream body is `body_len` bytes:
    /// a replica in the tenant's pool (or, where the gateway waits for
    /// one, a pool that will have one), then the tenancy gate. Returns the
    /// charge to settle and the tokens to balance load by.
    /// `asked` is the alias the client named, where `generation.model` is
    /// one of its models: the key's allow-list is checked against it.
    pub(crate) async fn admit(
        &self,
        p: &Arc<Principal>,
        generation: &Generation,
        asked: Option<&str>,
        body_len: usize,
    ) -> Result<(Charge, u64), ApiError> {
        let asked = asked.unwrap_or(&generation.model);
        // A model of the catalog goes to its own pool; with a catalog,
        // no other model is served.
        let catalogued = {
            let models = self.models.borrow();
            // A model kept to another tenant does not exist for this one.
            let model = models.iter().find(|m| {
                m.id == generation.model && !m.is_alias() && m.visible_to(&p.tenant.name)
            });
            if !models.is_empty() && model.is_none() {
                self.relay.metrics.arrived.inc();
                return Err(ApiError::model_not_found(asked));
            }
            model.map(|m| m.default_max_tokens)
        };
        let default_max_tokens = catalogued.unwrap_or(self.default_max_tokens);
        let estimate = Estimate {
            // About four bytes of JSON per prompt token; the replica counts exactly.
            prompt_tokens: body_len as u64 / 4,
            // As many as the engine may generate (the same rule decides
            // both), so limits and budgets hold without `max_tokens` too.
            output_tokens: u64::from(generation.max_output_tokens(default_max_tokens)),
        };
        // A batch line is not an arrival the autoscaler plans for.
        if p.class != Class::Batch {
            self.relay.metrics.arrived.inc();
            if let Some(d) = self.relay.metrics.demand(&generation.model) {
                d.arrived.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let lane = catalogued.map(|_| generation.model.as_str());
        let routable = self.relay.replicas.available(p.pool(), lane)?;
        let charge = self
            .gate
            .admit(p, routable, asked, &generation.model, lane, estimate)
            .await?;
        Ok((charge, estimate.tokens()))
    }

    /// Counts a finished generation request by route and status.
    pub(crate) fn count(&self, route: &'static str, response: &Response) {
        self.relay
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                route,
                status: response.status().as_u16(),
            })
            .inc();
    }
}
