//! Forwarding one request to a replica: retry on another replica while
//! nothing has reached the client, stream SSE through event by event, and
//! meter usage into the ledger.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use serde_json::Value;
use strata_core::openai::Usage;
use strata_core::store::UsageRecord;
use strata_core::{ApiError, CACHE_SCOPE_HEADER, SESSION_HEADER};

use crate::admission::Charge;
use crate::auth::Principal;
use crate::ledger::Ledger;
use crate::metrics::GatewayMetrics;
use crate::replicas::{InFlight, NoReplica, ReplicaSet};
use crate::stored::{Keep, Transcript};
use crate::upstream::{describe, ByteStream, Upstream, Upstreams};

/// Where a request goes and what it sends: what `Proxy::open` needs to
/// pick a replica and send it there (again, to resume a stream elsewhere).
#[derive(Clone)]
pub struct Route {
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

/// What the gateway learned about a request before forwarding it.
pub struct Forward {
    pub route: Route,
    /// Limits, budget and fair-queue slot held for this request; settled
    /// with the metered usage when the request ends.
    pub charge: Charge,
    /// Where to keep the answer (`store: true`).
    pub keep: Option<Keep>,
    pub stream: bool,
    /// The client asked for the usage chunk; otherwise the gateway asks the
    /// replica for it anyway (to meter) and removes it from the stream.
    pub include_usage: bool,
    pub request_id: String,
    pub arrived: Instant,
}

#[derive(Clone)]
pub struct Proxy {
    /// For everything but generation requests (snapshots, probes).
    pub client: reqwest::Client,
    pub upstreams: Upstreams,
    pub replicas: Arc<ReplicaSet>,
    pub metrics: Arc<GatewayMetrics>,
    pub ledger: Ledger,
    /// With no replica taking requests (all starting or draining), wait
    /// this long for one instead of answering 503 (`hold_when_empty`).
    pub hold: Option<std::time::Duration>,
}

/// Moves an answer may make to another replica after the one serving it
/// fails mid-stream, however well it goes.
pub const MAX_MOVES: u32 = 8;
/// Moves in a row that brought no new token, after which the answer is not
/// moved again: a request that itself brings replicas down stops there.
pub const MAX_STALLED_MOVES: u32 = 3;
/// How long a resumption waits for a replica to take the rest of an answer.
pub const RESUME_WAIT: Duration = Duration::from_secs(30);

impl Proxy {
    pub async fn forward(&self, mut req: Forward) -> Result<Response, ApiError> {
        if req.stream && !req.include_usage {
            req.route.body = with_usage_requested(&req.route.body);
        }
        let (flight, upstream) = match self.open(&req.route, None).await {
            Ok(opened) => opened,
            Err(refusal) => return Ok(refusal),
        };
        Ok(if req.stream && upstream.status().is_success() {
            self.stream_response(req, flight, upstream)
        } else {
            self.whole_response(req, flight, upstream).await
        })
    }

    /// Sends the request to a replica (`prefer`red when it is fit to take
    /// it), trying another while none has answered: on a connection error,
    /// a 5xx or a 429. Returns the replica's answer, or what to tell the
    /// client when every replica failed.
    pub async fn open(
        &self,
        req: &Route,
        prefer: Option<&str>,
    ) -> Result<(InFlight, Upstream), Response> {
        let mut tried: Vec<String> = Vec::new();
        let mut last_failure: Option<(StatusCode, Bytes)> = None;
        let hold_until = self.hold.map(|h| std::time::Instant::now() + h);
        loop {
            let flight = match self.replicas.choose(
                req.principal.pool(),
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
                    if tried.is_empty()
                        && req.principal.pool().is_none()
                        && hold_until.is_some_and(|t| std::time::Instant::now() < t) =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
                Err(NoReplica::NoneReady) => {
                    return Err(ApiError::unavailable(
                        "No replica is ready to serve requests; retry shortly.",
                    )
                    .into_response())
                }
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
            let scope = (CACHE_SCOPE_HEADER, req.principal.tenant.id.as_str());
            let headers = match &req.session {
                Some(session) => &[scope, (SESSION_HEADER, session.as_str())][..],
                None => &[scope][..],
            };
            let sent = self.upstreams.post(target, headers, req.body.clone()).await;
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

    /// `route` sent again after its replica failed mid-answer. Every
    /// replica may be down at once (the others lost too, or still
    /// starting): waits up to `RESUME_WAIT` for one rather than fail.
    pub async fn reopen(&self, route: &Route) -> Option<(InFlight, Upstream)> {
        let deadline = Instant::now() + RESUME_WAIT;
        loop {
            match self.open(route, None).await {
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

    async fn whole_response(
        &self,
        mut req: Forward,
        flight: InFlight,
        upstream: Upstream,
    ) -> Response {
        let status = upstream.status();
        let body = match upstream.bytes().await {
            Ok(b) => b,
            Err(e) => {
                flight.replica().mark_down();
                return axum::response::IntoResponse::into_response(ApiError::bad_gateway(
                    format!(
                        "The replica failed while sending its response: {}",
                        describe(&e)
                    ),
                ));
            }
        };
        let usage = match (&req.keep, status.is_success()) {
            (Some(keep), true) => {
                let answer = serde_json::from_slice::<Value>(&body).ok();
                let usage = answer
                    .as_ref()
                    .and_then(|v| serde_json::from_value::<Usage>(v.get("usage")?.clone()).ok());
                if let Some(answer) = answer {
                    keep.save(answer).await;
                }
                usage
            }
            // Only the usage: no tree of the whole answer.
            _ => serde_json::from_slice::<UsageOnly>(&body)
                .ok()
                .and_then(|u| u.usage),
        };
        let elapsed = req.arrived.elapsed().as_secs_f64();
        self.metrics.latency.observe(elapsed);
        self.metrics.first_byte.observe(elapsed);
        let stored = req.keep.is_some();
        let row = usage_row(&mut req, &flight, status.as_u16(), usage, elapsed, elapsed);
        if stored {
            // Metered before the client has the stored answer.
            self.ledger.record_now(row, 0).await;
        } else {
            self.ledger.record(row);
        }
        json_response(status, body)
    }

    fn stream_response(&self, req: Forward, flight: InFlight, upstream: Upstream) -> Response {
        let status = upstream.status();
        let mut events = SseEvents::new(!req.include_usage);
        if req.keep.is_some() {
            events.transcript = Some(Transcript::default());
            events.hold_done = true;
        }
        let metered = Metered {
            inner: upstream.bytes_stream(),
            events,
            first_byte: None,
            counted: 0,
            done: false,
            proxy: self.clone(),
            resuming: None,
            moves: Moves::default(),
            saving: None,
            settled: false,
            flight,
            req,
        };
        let mut response = Response::new(Body::from_stream(metered));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

/// An answer's usage, the rest skipped unread.
#[derive(serde::Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Option<Usage>,
}

pub fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The body with `stream_options.include_usage` set, so the replica reports usage.
fn with_usage_requested(body: &Bytes) -> Bytes {
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return body.clone();
    };
    v["stream_options"] = serde_json::json!({"include_usage": true});
    Bytes::from(v.to_string())
}

pub fn usage_row(
    req: &mut Forward,
    flight: &InFlight,
    status: u16,
    usage: Option<Usage>,
    ttft: f64,
    latency: f64,
) -> UsageRecord {
    let usage = usage.unwrap_or_default();
    let cost_usd = req.charge.record(usage);
    let at_ms = strata_core::now_ms() - (latency * 1000.0) as i64;
    UsageRecord {
        request_id: req.request_id.clone(),
        tenant_id: req.route.principal.tenant.id.to_string(),
        key_id: req.route.principal.key.id.clone(),
        cost_usd,
        at_ms,
        model: req.route.model.clone(),
        replica: flight.replica().endpoint.id.clone(),
        status,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        ttft_ms: ttft * 1000.0,
        latency_ms: latency * 1000.0,
        stream: req.stream,
    }
}

/// Splits an SSE byte stream into whole events, picks out the usage chunk,
/// and drops it when the client did not ask for it. Keeps what a resumption
/// needs (the text so far) and, after one, makes the new replica's chunks
/// read as the first one's.
pub struct SseEvents {
    buf: BytesMut,
    strip_usage: bool,
    pub usage: Option<Usage>,
    /// Events with generated text so far (one token each from strata's
    /// engine).
    pub deltas: u64,
    /// The generated text so far.
    pub text: String,
    /// A choice has a finish reason: the answer is complete, even if the
    /// stream breaks before `[DONE]`.
    pub finished: bool,
    /// `data: [DONE]` has passed: the answer is whole, whatever happens to
    /// the connection after it.
    pub ended: bool,
    /// `[DONE]` is kept back (it is sent when the answer is stored).
    pub hold_done: bool,
    /// Assembles the answer from the chunks when it is to be stored.
    pub transcript: Option<Transcript>,
    /// The first replica's chunk id and creation time.
    id: Value,
    created: Value,
    /// Set once the answer moved to another replica: the deltas streamed
    /// before the latest move.
    resumed_after: Option<u32>,
}

/// What becomes of one event on its way to the client.
enum Verdict {
    Pass,
    Drop,
    Replace(String),
}

impl SseEvents {
    pub fn new(strip_usage: bool) -> Self {
        SseEvents {
            buf: BytesMut::new(),
            strip_usage,
            usage: None,
            deltas: 0,
            text: String::new(),
            finished: false,
            ended: false,
            hold_done: false,
            transcript: None,
            id: Value::Null,
            created: Value::Null,
            resumed_after: None,
        }
    }

    /// Bytes to send on now: every complete event in `chunk` and before it.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.buf.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = find_event_end(&self.buf) {
            let event = self.buf.split_to(end);
            match self.inspect(&event) {
                Verdict::Pass => out.extend_from_slice(&event),
                Verdict::Drop => {}
                Verdict::Replace(data) => {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(data.as_bytes());
                    out.extend_from_slice(b"\n\n");
                }
            }
        }
        out.freeze()
    }

    /// Whatever is left when the stream ends.
    pub fn finish(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    /// The answer goes on from another replica: a broken event of the
    /// failed one is dropped, and the new one's chunks are read as the
    /// continuation of this answer.
    pub fn resume(&mut self) {
        self.buf.clear();
        self.resumed_after = Some(self.deltas as u32);
    }

    fn inspect(&mut self, event: &[u8]) -> Verdict {
        let Some(data) = std::str::from_utf8(event)
            .ok()
            .and_then(|e| e.lines().find_map(|l| l.strip_prefix("data:")))
        else {
            return Verdict::Pass;
        };
        if data.trim() == "[DONE]" {
            self.ended = true;
            return if self.hold_done {
                Verdict::Drop
            } else {
                Verdict::Pass
            };
        }
        let Ok(mut v) = serde_json::from_str::<Value>(data.trim()) else {
            return Verdict::Pass;
        };
        let choice = &v["choices"][0];
        let text = choice["delta"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .filter(|t| !t.is_empty());
        let has_text = text.is_some();
        if let Some(t) = text {
            self.deltas += 1;
            self.text.push_str(t);
        }
        let finishes = !choice["finish_reason"].is_null();
        self.finished |= finishes;
        let is_usage = v["choices"].as_array().is_some_and(|c| c.is_empty());
        let mut usage = serde_json::from_value::<Usage>(v["usage"].clone()).ok();
        let verdict = match self.resumed_after {
            None => {
                if self.id.is_null() {
                    self.id = v["id"].clone();
                    self.created = v["created"].clone();
                }
                Verdict::Pass
            }
            // The new replica's opening chunk (the role, no text) was sent
            // already by the first.
            Some(_) if !has_text && !finishes && !is_usage => return Verdict::Drop,
            Some(before) => {
                usage = usage.map(|u| resumed_usage(u, before));
                v["id"] = self.id.clone();
                v["created"] = self.created.clone();
                if let Some(u) = usage {
                    v["usage"] = serde_json::to_value(u).expect("usage serialises");
                }
                Verdict::Replace(v.to_string())
            }
        };
        if usage.is_some() {
            self.usage = usage;
        }
        if let Some(t) = self.transcript.as_mut() {
            t.observe(&v);
        }
        if is_usage && self.strip_usage {
            return Verdict::Drop;
        }
        verdict
    }
}

/// The moves of one answer from a replica that failed mid-stream to
/// another: as long as it makes progress, up to `MAX_MOVES`.
#[derive(Debug, Default)]
pub struct Moves {
    pub count: u32,
    /// Moves in a row after which no new token came.
    stalled: u32,
    /// Tokens streamed at the latest move.
    at: u64,
}

impl Moves {
    /// Whether the answer, `deltas` tokens into it, may move again; counts
    /// the move if so.
    pub fn allow(&mut self, deltas: u64) -> bool {
        let stalled = if self.count > 0 && deltas == self.at {
            self.stalled + 1
        } else {
            0
        };
        if self.count >= MAX_MOVES || stalled >= MAX_STALLED_MOVES {
            return false;
        }
        (self.count, self.stalled, self.at) = (self.count + 1, stalled, deltas);
        true
    }

    /// What the client hears when the answer may not move again.
    pub fn exhausted(&self) -> ApiError {
        ApiError::bad_gateway(if self.count >= MAX_MOVES {
            format!("The replica failed mid-answer, and the answer had moved to another replica {MAX_MOVES} times already; it is not moved again.")
        } else {
            format!("The replica failed mid-answer, and the answer's last {MAX_STALLED_MOVES} moves to another replica brought no new token; it is not moved again.")
        })
    }
}

/// What the client hears when its replica failed mid-answer and no other
/// replica took the rest.
pub fn no_replica_for_the_rest() -> ApiError {
    ApiError::bad_gateway(format!(
        "The replica failed mid-answer, and no other replica took the rest within {} s.",
        RESUME_WAIT.as_secs()
    ))
}

/// An answer's usage as the replica that finished it reports it, counted
/// for the whole answer: that replica read the `before` tokens streamed by
/// the earlier ones as prompt, so they count as output again.
pub fn resumed_usage(u: Usage, before: u32) -> Usage {
    let prompt = u.prompt_tokens.saturating_sub(before);
    Usage::new(prompt, u.completion_tokens + before).with_cached(u.cached_tokens().min(prompt))
}

/// `request` (a chat or completion request as first sent) asking for the
/// rest of an answer of which `partial`, `generated` tokens, has streamed:
/// the chat continues it as an open assistant message
/// (`continue_final_message`), the completion as the end of its prompt,
/// with what is left of `max_tokens`.
pub fn continued(request: &Value, partial: &str, generated: u32) -> Value {
    let mut request = request.clone();
    if !partial.is_empty() {
        let continues = request["continue_final_message"] == Value::Bool(true);
        if let Some(messages) = request.get_mut("messages").and_then(Value::as_array_mut) {
            match messages.last_mut() {
                Some(last) if continues => match &mut last["content"] {
                    Value::String(s) => s.push_str(partial),
                    Value::Array(parts) => {
                        parts.push(serde_json::json!({"type": "text", "text": partial}))
                    }
                    other => *other = Value::from(partial),
                },
                _ => messages.push(serde_json::json!({"role": "assistant", "content": partial})),
            }
            request["continue_final_message"] = Value::Bool(true);
        } else {
            match request.get_mut("prompt") {
                Some(Value::String(s)) => s.push_str(partial),
                Some(Value::Array(a)) => {
                    if let Some(Value::String(s)) = a.first_mut() {
                        s.push_str(partial);
                    }
                }
                _ => {}
            }
        }
    }
    for field in ["max_tokens", "max_completion_tokens"] {
        if let Some(max) = request.get(field).and_then(Value::as_u64) {
            request[field] = Value::from(max.saturating_sub(generated.into()).max(1));
        }
    }
    request
}

/// End (exclusive) of the first complete event: after a blank line.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

const DONE: &[u8] = b"data: [DONE]\n\n";

type Reopening = Pin<Box<dyn Future<Output = Option<(InFlight, Upstream)>> + Send>>;

/// The client-facing stream: upstream bytes through `SseEvents`, metered
/// when it ends or the client goes away. When the replica fails mid-answer
/// the answer goes on from another one (see `Moves`): the client reads one
/// stream.
struct Metered {
    inner: ByteStream,
    events: SseEvents,
    first_byte: Option<f64>,
    /// Output tokens counted as served while streaming.
    counted: u64,
    done: bool,
    proxy: Proxy,
    /// Another replica being asked for the rest of the answer.
    resuming: Option<Reopening>,
    moves: Moves,
    /// A stored answer being written; `[DONE]` follows when it is.
    saving: Option<tokio::task::JoinHandle<()>>,
    /// The usage row is written (with the stored answer): not again on drop.
    settled: bool,
    flight: InFlight,
    req: Forward,
}

impl Metered {
    /// Asks another replica for the rest of the answer, or ends the stream
    /// with an in-band error when it may not move again.
    fn resume(&mut self) -> Option<Bytes> {
        let first: Value = match serde_json::from_slice(&self.req.route.body) {
            Ok(v) if self.moves.allow(self.events.deltas) => v,
            _ => return Some(self.fail(self.moves.exhausted())),
        };
        let rest = continued(&first, &self.events.text, self.events.deltas as u32);
        let mut route = self.req.route.clone();
        route.body = Bytes::from(rest.to_string());
        let proxy = self.proxy.clone();
        self.resuming = Some(Box::pin(async move { proxy.reopen(&route).await }));
        None
    }

    /// The answer is whole and `[DONE]` held back: a stored answer is
    /// written, with its usage row, before the client reads `[DONE]` (so a
    /// read sent then finds it). The write runs as its own task: a client
    /// that leaves now does not stop it. `None`: nothing to write.
    fn settle(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let finished = self
            .events
            .transcript
            .as_ref()
            .is_some_and(Transcript::finished);
        if !finished {
            return None;
        }
        let (keep, transcript) = (self.req.keep.take()?, self.events.transcript.take()?);
        let latency = self.req.arrived.elapsed().as_secs_f64();
        let row = usage_row(
            &mut self.req,
            &self.flight,
            200,
            self.events.usage,
            self.first_byte.unwrap_or(latency),
            latency,
        );
        self.settled = true;
        let (ledger, counted) = (self.proxy.ledger.clone(), self.counted);
        Some(tokio::spawn(async move {
            keep.save(transcript.into_completion()).await;
            ledger.record_now(row, counted).await;
        }))
    }

    /// The answer is whole and `[DONE]` was held back: writes a stored
    /// answer (`settle`). True when `[DONE]` is to follow the write; false
    /// when there is nothing to write and it is to be sent now.
    fn release_done(&mut self) -> bool {
        self.events.hold_done = false;
        self.saving = self.settle();
        self.saving.is_some()
    }

    /// Ends the stream with `error` as an in-band event.
    fn fail(&mut self, error: ApiError) -> Bytes {
        self.done = true;
        Bytes::from(format!("data: {}\n\n", error.to_json()))
    }
}

impl Stream for Metered {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(saving) = self.saving.as_mut() {
                return match Pin::new(saving).poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(_) => {
                        self.saving = None;
                        self.done = true;
                        Poll::Ready(Some(Ok(Bytes::from_static(DONE))))
                    }
                };
            }
            if let Some(reopening) = self.resuming.as_mut() {
                match reopening.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some((flight, upstream))) => {
                        tracing::info!(from = %self.flight.replica().endpoint.id, to = %flight.replica().endpoint.id, "stream resumed on another replica");
                        self.proxy.metrics.retries.inc();
                        self.resuming = None;
                        self.flight = flight;
                        self.inner = upstream.bytes_stream();
                        self.events.resume();
                        continue;
                    }
                    Poll::Ready(None) => {
                        self.resuming = None;
                        return Poll::Ready(Some(Ok(self.fail(no_replica_for_the_rest()))));
                    }
                }
            }
            match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    let mut out = self.events.push(&chunk);
                    for _ in self.counted..self.events.deltas {
                        self.proxy.ledger.streamed_token();
                    }
                    self.counted = self.events.deltas;
                    if self.events.hold_done && self.events.ended && !self.release_done() {
                        out = [&out[..], DONE].concat().into();
                    }
                    if out.is_empty() {
                        continue;
                    }
                    if self.first_byte.is_none() {
                        let t = self.req.arrived.elapsed().as_secs_f64();
                        self.proxy.metrics.first_byte.observe(t);
                        self.first_byte = Some(t);
                    }
                    return Poll::Ready(Some(Ok(out)));
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(replica = %self.flight.replica().endpoint.id, error = %describe(&e), "replica failed mid-stream");
                    self.flight.replica().mark_down();
                    if self.events.finished {
                        // Only the end (usage, `[DONE]`) was lost.
                        if self.events.hold_done && self.release_done() {
                            continue;
                        }
                        self.done = true;
                        return Poll::Ready(Some(Ok(Bytes::from_static(DONE))));
                    }
                    if let Some(error) = self.resume() {
                        return Poll::Ready(Some(Ok(error)));
                    }
                }
                // The replica ended the stream mid-answer (it was stopped).
                Poll::Ready(None) if !self.events.finished && !self.events.ended => {
                    tracing::warn!(replica = %self.flight.replica().endpoint.id, "replica ended the stream mid-answer");
                    if let Some(error) = self.resume() {
                        return Poll::Ready(Some(Ok(error)));
                    }
                }
                Poll::Ready(None) => {
                    self.done = true;
                    let rest = self.events.finish();
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(rest)));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let latency = self.req.arrived.elapsed().as_secs_f64();
        self.proxy.metrics.latency.observe(latency);
        if self.settled {
            return;
        }
        // 499: the client went away before the end, as nginx logs it. A
        // client that closes as soon as `[DONE]` arrives got it all.
        let status = if self.done || self.events.ended {
            200
        } else {
            499
        };
        let finished = self
            .events
            .transcript
            .as_ref()
            .is_some_and(Transcript::finished);
        let row = usage_row(
            &mut self.req,
            &self.flight,
            status,
            self.events.usage,
            self.first_byte.unwrap_or(latency),
            latency,
        );
        if let (true, Some(keep), Some(t)) = (
            finished,
            self.req.keep.take(),
            self.events.transcript.take(),
        ) {
            // The stream ended with a finished answer but no `[DONE]`.
            let (ledger, counted) = (self.proxy.ledger.clone(), self.counted);
            tokio::spawn(async move {
                keep.save(t.into_completion()).await;
                ledger.record_now(row, counted).await;
            });
        } else {
            self.proxy.ledger.record_streamed(row, self.counted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: &str = "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const TEXT: &str = "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"text\":\"hi\"}]}\n\n";

    #[test]
    fn usage_is_read_and_stripped_when_not_asked_for() {
        let mut s = SseEvents::new(true);
        let all = format!("{TEXT}{USAGE}data: [DONE]\n\n");
        let (a, b) = all.split_at(30);
        let mut out = s.push(a.as_bytes()).to_vec();
        out.extend_from_slice(&s.push(b.as_bytes()));
        out.extend_from_slice(&s.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{TEXT}data: [DONE]\n\n")
        );
        assert_eq!(s.usage, Some(Usage::new(3, 2)));
    }

    #[test]
    fn a_stream_is_whole_once_done_has_passed() {
        let mut s = SseEvents::new(true);
        s.push(TEXT.as_bytes());
        assert!(!s.ended);
        s.push(b"data: [DONE]\n\n");
        assert!(s.ended, "a client closing now got the whole answer");
    }

    #[test]
    fn usage_passes_through_when_asked_for() {
        let mut s = SseEvents::new(false);
        let out = s.push(format!("{USAGE}data: [DONE]\n\n").as_bytes());
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            format!("{USAGE}data: [DONE]\n\n")
        );
        assert_eq!(s.usage, Some(Usage::new(3, 2)));
    }

    /// A chat chunk of replica `a` (created at 10) or `b` (at 20).
    fn chunk(id: &str, delta: Value, finish: Value) -> String {
        let created = if id == "a" { 10 } else { 20 };
        let v = serde_json::json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {v}\n\n")
    }

    fn data(out: &[u8]) -> Vec<Value> {
        std::str::from_utf8(out)
            .unwrap()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn a_resumed_stream_reads_as_the_first_one() {
        let opening = |id| {
            chunk(
                id,
                serde_json::json!({"role": "assistant", "content": ""}),
                Value::Null,
            )
        };
        let says = |id, text| chunk(id, serde_json::json!({"content": text}), Value::Null);
        let mut s = SseEvents::new(false);
        let first = [opening("a"), says("a", "Once"), says("a", " upon")].concat();
        let out = s.push(format!("{first}data: {{\"id\":\"a\",\"cho").as_bytes());
        assert_eq!(data(&out).len(), 3);
        assert_eq!(
            (s.text.as_str(), s.deltas, s.finished),
            ("Once upon", 2, false)
        );

        // The replica died with half an event sent: the rest comes from
        // another, whose chunks carry their own id, a role opening and a
        // usage that counts the first two tokens as prompt.
        s.resume();
        let usage = "data: {\"id\":\"b\",\"created\":20,\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12}}\n\n";
        let second = [
            opening("b"),
            says("b", " a"),
            says("b", " time"),
            chunk("b", serde_json::json!({}), Value::from("stop")),
            usage.to_owned(),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat();
        let out = s.push(second.as_bytes());
        let events = data(&out);
        assert_eq!(events.len(), 4, "the second role opening is dropped");
        assert!(
            events.iter().all(|e| e["id"] == "a" && e["created"] == 10),
            "{events:?}"
        );
        assert_eq!(events[0]["choices"][0]["delta"]["content"], " a");
        assert_eq!(events[2]["choices"][0]["finish_reason"], "stop");
        // 2 + 2 tokens out, the prompt as it was (7).
        assert_eq!(events[3]["usage"]["prompt_tokens"], 7);
        assert_eq!(events[3]["usage"]["completion_tokens"], 5);
        assert_eq!(
            s.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((7, 5))
        );
        assert_eq!(s.text, "Once upon a time");
        assert!(s.finished && s.ended);
        assert!(out.ends_with(b"data: [DONE]\n\n"));
    }

    #[test]
    fn a_continued_chat_ends_in_the_partial_answer_and_a_completion_in_its_prompt() {
        let chat = serde_json::json!({"model": "m", "max_tokens": 10, "stream": true,
            "messages": [{"role": "user", "content": "Tell me"}]});
        let once = continued(&chat, "Once", 1);
        assert_eq!(
            once["messages"][1],
            serde_json::json!({"role": "assistant", "content": "Once"})
        );
        assert_eq!(once["continue_final_message"], true);
        assert_eq!(once["max_tokens"], 9);
        // A second move continues the same open message, from the request
        // as first sent or as the client's own continuation.
        let twice = continued(&once, " upon", 1);
        assert_eq!(twice["messages"].as_array().unwrap().len(), 2);
        assert_eq!(twice["messages"][1]["content"], "Once upon");
        assert_eq!(twice["max_tokens"], 8);
        // Nothing streamed yet: the request as it was, but for the tokens.
        let none = continued(&chat, "", 0);
        assert_eq!(none, chat);

        for prompt in [serde_json::json!("Hi"), serde_json::json!(["Hi"])] {
            let c = serde_json::json!({"model": "m", "prompt": prompt, "max_completion_tokens": 2});
            let next = continued(&c, " there", 5);
            let text = next["prompt"].as_str().or(next["prompt"][0].as_str());
            assert_eq!(text, Some("Hi there"));
            assert_eq!(
                next["max_completion_tokens"], 1,
                "at least one token is left to ask for"
            );
        }
    }

    #[test]
    fn an_answer_moves_while_it_makes_progress() {
        // Killed replica after replica, each after a few more tokens: it
        // moves up to MAX_MOVES times.
        let mut m = Moves::default();
        for i in 0..MAX_MOVES {
            assert!(m.allow(u64::from(i) * 3), "move {i}");
        }
        assert!(!m.allow(1000));
        assert!(m.exhausted().message.contains("8 times"));

        // A request whose replicas die before a new token (one that brings
        // them down itself): three moves without progress, then no more.
        let mut m = Moves::default();
        assert!(m.allow(5)); // the first replica made 5 tokens
        assert!(m.allow(5) && m.allow(5)); // the next two none
        assert!(!m.allow(5), "the fourth stalled move is refused");
        assert!(m.exhausted().message.contains("brought no new token"));
        // Progress resets the count of stalled moves.
        let mut m = Moves::default();
        assert!(m.allow(0) && m.allow(0) && m.allow(1) && m.allow(1) && m.allow(2));
    }

    #[test]
    fn an_incomplete_event_waits_for_its_end() {
        let mut s = SseEvents::new(true);
        assert!(s.push(b"data: {\"choices\":[{").is_empty());
        assert_eq!(&s.push(b"}]}\n\n")[..], b"data: {\"choices\":[{}]}\n\n");
    }
}
