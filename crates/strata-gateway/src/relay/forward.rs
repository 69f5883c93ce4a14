//! Sending one request to a replica: pick one (`fleet`), send it, and try
//! another while nothing has reached the client (a connection error, a 5xx
//! or a 429). The request as sent is kept (`ReplicaRequest`) so that an
//! answer cut short can be asked of another replica; what it holds and how
//! it is metered travels with it (`Exchange`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use strata_core::openai::Usage;
use strata_core::store::UsageRecord;
use strata_core::{ApiError, CACHE_SCOPE_HEADER, PRIORITY_HEADER, SESSION_HEADER};

use crate::fleet::client::{describe, Upstream, Upstreams};
use crate::fleet::replicas::{none_ready, InFlight, NoReplica, Replica, ReplicaSet};
use crate::http::error::json_response;
use crate::metrics::GatewayMetrics;
use crate::relay::ledger::Ledger;
use crate::relay::resume::RESUME_WAIT;
use crate::tenancy::admission::Charge;
use crate::tenancy::fairq::Class;
use crate::tenancy::principal::Principal;

/// What is sent to a replica, and what picking one needs: kept to send it
/// again (elsewhere, to resume an answer).
#[derive(Clone)]
pub struct ReplicaRequest {
    /// The replica's route (`/v1/chat/completions`, `/v1/completions`).
    pub path: &'static str,
    /// Who asked: tenant and key for the ledger, and the replica pool.
    pub principal: Arc<Principal>,
    /// The session (conversation or response chain) a stateful turn
    /// continues; the replica keeps its cells under it.
    pub session: Option<String>,
    /// Block hashes of the prompt, for prefix-aware routing.
    pub prefix: Vec<u64>,
    pub body: Bytes,
    pub model: String,
    /// Prompt + output tokens the request may use, for load balancing.
    pub estimated_tokens: u64,
}

/// One admitted generation, for its usage row: what admission reserved
/// for it (settled with the usage), its id, when it arrived, how it was asked.
pub struct Exchange {
    pub charge: Charge,
    pub request_id: String,
    pub arrived: Instant,
    pub stream: bool,
}

impl Exchange {
    /// The usage row of the request's end: `usage` (none: nothing
    /// generated) recorded on the charge and priced, by `replica`.
    pub fn usage_row(
        &mut self,
        request: &ReplicaRequest,
        replica: &Replica,
        status: u16,
        usage: Option<Usage>,
        ttft: f64,
        latency: f64,
    ) -> UsageRecord {
        let usage = usage.unwrap_or_default();
        let cost_usd = self.charge.record(usage);
        let at_ms = strata_core::now_ms() - (latency * 1000.0) as i64;
        UsageRecord {
            request_id: self.request_id.clone(),
            tenant_id: request.principal.tenant.id.to_string(),
            key_id: request.principal.key.id.clone(),
            cost_usd,
            at_ms,
            model: request.model.clone(),
            replica: replica.endpoint.id.clone(),
            status,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            ttft_ms: ttft * 1000.0,
            latency_ms: latency * 1000.0,
            stream: self.stream,
            batch: request.principal.class == crate::tenancy::fairq::Class::Batch,
        }
    }

    /// A stream's usage: as `replica` reported it; or, where another server
    /// reports none in streams (llama-cpp-python ignores
    /// `stream_options`), its `deltas` (one token each) and the prompt as
    /// admission estimated it, so that nothing it generates goes unmetered.
    pub fn stream_usage(
        &self,
        replica: &Replica,
        usage: Option<Usage>,
        deltas: u64,
    ) -> Option<Usage> {
        usage.or_else(|| {
            (replica.endpoint.external.is_some() && deltas > 0).then(|| {
                let prompt = self.charge.estimated_prompt().min(u64::from(u32::MAX)) as u32;
                Usage::new(prompt, deltas.min(u64::from(u32::MAX)) as u32)
            })
        })
    }

    /// Seconds since the request arrived.
    pub fn elapsed(&self) -> f64 {
        self.arrived.elapsed().as_secs_f64()
    }
}

/// Sends requests to replicas and meters their answers.
#[derive(Clone)]
pub struct Relay {
    pub replicas: Arc<ReplicaSet>,
    pub upstreams: Upstreams,
    pub metrics: Arc<GatewayMetrics>,
    pub ledger: Ledger,
}

impl Relay {
    /// Sends the request to a replica (`prefer`red when it is fit to take
    /// it), trying another while none has answered: on a connection error,
    /// a 5xx or a 429. Returns the replica's answer, or what to tell the
    /// client when every replica failed.
    pub async fn send(
        &self,
        req: &ReplicaRequest,
        prefer: Option<&str>,
    ) -> Result<(InFlight, Upstream), Response> {
        let mut tried: Vec<String> = Vec::new();
        let mut last_failure: Option<(StatusCode, Bytes)> = None;
        let pool = req.principal.pool();
        let hold_until = self.replicas.hold(pool).map(|h| Instant::now() + h);
        loop {
            let flight = match self.replicas.choose(
                pool,
                &req.model,
                &tried,
                prefer,
                &req.prefix,
                req.estimated_tokens,
            ) {
                Ok(f) => f,
                // The shared pool is between replicas (the one it had is
                // draining, the next is starting): wait for it.
                Err(NoReplica::NoneReady)
                    if tried.is_empty() && hold_until.is_some_and(|t| Instant::now() < t) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(NoReplica::NoneReady) => return Err(none_ready(pool).into_response()),
                Err(NoReplica::UnknownModel) if tried.is_empty() => {
                    return Err(ApiError::model_not_found(&req.model).into_response())
                }
                Err(_) => break,
            };
            if !tried.is_empty() {
                self.metrics.retries.inc();
            }
            let replica = flight.replica().clone();
            tried.push(replica.endpoint.id.clone());
            let Some(target) = replica.target(req.path) else {
                tracing::warn!(replica = %replica.endpoint.id, url = %replica.endpoint.url, "replica URL does not parse; trying another");
                replica.mark_down();
                continue;
            };
            // strata's engine scopes its cache by tenant, keeps a
            // session's cells and steps batch lines after interactive work;
            // another server gets none of these headers (no tenant id in
            // its logs), only its pool's key.
            let bearer;
            let mut body = req.body.clone();
            let mut headers = [("", ""); 3];
            let mut n = 0;
            let mut add = |header| {
                headers[n] = header;
                n += 1;
            };
            match &replica.endpoint.external {
                Some(x) => {
                    bearer = format!("Bearer {}", x.api_key);
                    add(("authorization", bearer.as_str()));
                    // Its own scheduler's class, where it has one.
                    if let (Class::Batch, Some(priority)) = (req.principal.class, x.batch_priority)
                    {
                        body = with_priority(&body, priority);
                    }
                }
                None => {
                    add((CACHE_SCOPE_HEADER, req.principal.tenant.id.as_str()));
                    if let Some(session) = &req.session {
                        add((SESSION_HEADER, session.as_str()));
                    }
                    if req.principal.class == Class::Batch {
                        add((PRIORITY_HEADER, "batch"));
                    }
                }
            }
            let headers = &headers[..n];
            let sent = self.upstreams.post(target, headers, body).await;
            let upstream = match sent {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(replica = %replica.endpoint.id, error = %describe(&e), "replica unreachable; trying another");
                    replica.mark_down();
                    continue;
                }
            };
            let status = upstream.status();
            let span = tracing::Span::current();
            span.record("replica", replica.endpoint.id.as_str());
            span.record("retries", tried.len() - 1);
            span.record("status", status.as_u16());
            // Overload and server errors may go better elsewhere; client errors will not.
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                let body = upstream.bytes().await.unwrap_or_default();
                tracing::warn!(replica = %replica.endpoint.id, %status, "replica failed before the first byte; trying another");
                last_failure = Some((status, body));
                continue;
            }
            return Ok((flight, upstream));
        }
        Err(match last_failure {
            Some((status, body)) => json_response(status, body),
            None => {
                ApiError::bad_gateway("Every replica failed to take the request.").into_response()
            }
        })
    }

    /// `req` sent again after its replica failed mid-answer. Every replica
    /// may be down at once (the others lost too, or still starting): waits
    /// up to `RESUME_WAIT` for one rather than fail.
    pub async fn resend(&self, req: &ReplicaRequest) -> Option<(InFlight, Upstream)> {
        let deadline = Instant::now() + RESUME_WAIT;
        loop {
            match self.send(req, None).await {
                Ok((flight, upstream)) if upstream.status().is_success() => {
                    return Some((flight, upstream))
                }
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                _ => return None,
            }
        }
    }
}
/// `body` (a JSON object, as checked on the way in) with `priority` set.
fn with_priority(body: &Bytes, priority: i64) -> Bytes {
    let Ok(mut object) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
    else {
        return body.clone();
    };
    object.insert("priority".into(), priority.into());
    serde_json::to_vec(&object).map_or_else(|_| body.clone(), Bytes::from)
}
