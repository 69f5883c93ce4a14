//! Forwarding one request to a replica: retry on another replica while
//! nothing has reached the client, stream SSE through event by event, and
//! meter usage into the ledger.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

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

/// What the gateway learned about a request before forwarding it.
pub struct Forward {
    pub path: &'static str,
    /// Who asked: tenant and key for the ledger, and the replica pool.
    pub principal: Arc<Principal>,
    /// Limits, budget and fair-queue slot held for this request; settled
    /// with the metered usage when the request ends.
    pub charge: Charge,
    /// Where to keep the answer (`store: true`).
    pub keep: Option<Keep>,
    /// The session (conversation or response chain) a stateful turn
    /// continues; the replica keeps its cells under it.
    pub session: Option<String>,
    /// Block hashes of the prompt, for prefix-aware routing.
    pub prefix: Vec<u64>,
    pub body: Bytes,
    pub model: String,
    pub stream: bool,
    /// The client asked for the usage chunk; otherwise the gateway asks the
    /// replica for it anyway (to meter) and removes it from the stream.
    pub include_usage: bool,
    /// Prompt + output tokens the request may use, for load balancing.
    pub estimated_tokens: u64,
    pub request_id: String,
    pub arrived: Instant,
}

pub struct Proxy {
    pub client: reqwest::Client,
    pub replicas: Arc<ReplicaSet>,
    pub metrics: Arc<GatewayMetrics>,
    pub ledger: Ledger,
    /// With no replica taking requests (all starting or draining), wait
    /// this long for one instead of answering 503 (`hold_when_empty`).
    pub hold: Option<std::time::Duration>,
}

impl Proxy {
    pub async fn forward(&self, mut req: Forward) -> Result<Response, ApiError> {
        if req.stream && !req.include_usage {
            req.body = with_usage_requested(&req.body);
        }
        let (flight, upstream) = match self.open(&req, None).await {
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
        req: &Forward,
        prefer: Option<&str>,
    ) -> Result<(InFlight, reqwest::Response), Response> {
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
            let Some(url) = replica.url(req.path) else {
                tracing::warn!(replica = %replica.endpoint.id, url = %replica.endpoint.url, "replica URL does not parse; trying another");
                replica.mark_down();
                continue;
            };
            let mut post = self
                .client
                .post(url)
                .header(header::CONTENT_TYPE, "application/json")
                .header(CACHE_SCOPE_HEADER, req.principal.tenant.id.as_str());
            if let Some(session) = &req.session {
                post = post.header(SESSION_HEADER, session);
            }
            let sent = post.body(req.body.clone()).send().await;
            let upstream = match sent {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(replica = %replica.endpoint.id, error = %e, "replica unreachable; trying another");
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

    async fn whole_response(
        &self,
        mut req: Forward,
        flight: InFlight,
        upstream: reqwest::Response,
    ) -> Response {
        let status = upstream.status();
        let body = match upstream.bytes().await {
            Ok(b) => b,
            Err(e) => {
                flight.replica().mark_down();
                return axum::response::IntoResponse::into_response(ApiError::bad_gateway(
                    format!("The replica failed while sending its response: {e}"),
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
        self.ledger.record(usage_row(
            &mut req,
            &flight,
            status.as_u16(),
            usage,
            elapsed,
            elapsed,
        ));
        json_response(status, body)
    }

    fn stream_response(
        &self,
        req: Forward,
        flight: InFlight,
        upstream: reqwest::Response,
    ) -> Response {
        let status = upstream.status();
        let mut events = SseEvents::new(!req.include_usage);
        if req.keep.is_some() {
            events.transcript = Some(Transcript::default());
        }
        let metered = Metered {
            inner: Box::pin(upstream.bytes_stream()),
            events,
            first_byte: None,
            counted: 0,
            done: false,
            ledger: self.ledger.clone(),
            metrics: self.metrics.clone(),
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
        tenant_id: req.principal.tenant.id.to_string(),
        key_id: req.principal.key.id.clone(),
        cost_usd,
        at_ms,
        model: req.model.clone(),
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
/// and drops it when the client did not ask for it.
pub struct SseEvents {
    buf: BytesMut,
    strip_usage: bool,
    pub usage: Option<Usage>,
    /// Events with generated text so far (one token each from strata's
    /// engine).
    pub deltas: u64,
    /// `data: [DONE]` has passed: the answer is whole, whatever happens to
    /// the connection after it.
    pub ended: bool,
    /// Assembles the answer from the chunks when it is to be stored.
    pub transcript: Option<Transcript>,
}

impl SseEvents {
    pub fn new(strip_usage: bool) -> Self {
        SseEvents {
            buf: BytesMut::new(),
            strip_usage,
            usage: None,
            deltas: 0,
            ended: false,
            transcript: None,
        }
    }

    /// Bytes to send on now: every complete event in `chunk` and before it.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.buf.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = find_event_end(&self.buf) {
            let event = self.buf.split_to(end);
            if self.is_usage_event(&event) && self.strip_usage {
                continue;
            }
            out.extend_from_slice(&event);
        }
        out.freeze()
    }

    /// Whatever is left when the stream ends.
    pub fn finish(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    fn is_usage_event(&mut self, event: &[u8]) -> bool {
        let Some(data) = std::str::from_utf8(event)
            .ok()
            .and_then(|e| e.lines().find_map(|l| l.strip_prefix("data:")))
        else {
            return false;
        };
        if data.trim() == "[DONE]" {
            self.ended = true;
            return false;
        }
        let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
            return false;
        };
        if let Some(t) = self.transcript.as_mut() {
            t.observe(&v);
        }
        let choice = &v["choices"][0];
        let text = choice["delta"]["content"]
            .as_str()
            .or(choice["text"].as_str());
        if text.is_some_and(|t| !t.is_empty()) {
            self.deltas += 1;
        }
        let is_usage = v["choices"].as_array().is_some_and(|c| c.is_empty());
        if let Ok(u) = serde_json::from_value::<Usage>(v["usage"].clone()) {
            self.usage = Some(u);
        }
        is_usage
    }
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

/// The client-facing stream: upstream bytes through `SseEvents`, metered
/// when it ends or the client goes away.
struct Metered {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    events: SseEvents,
    first_byte: Option<f64>,
    /// Output tokens counted as served while streaming.
    counted: u64,
    done: bool,
    ledger: Ledger,
    metrics: Arc<GatewayMetrics>,
    flight: InFlight,
    req: Forward,
}

impl Stream for Metered {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    let out = self.events.push(&chunk);
                    for _ in self.counted..self.events.deltas {
                        self.ledger.streamed_token();
                    }
                    self.counted = self.events.deltas;
                    if out.is_empty() {
                        continue;
                    }
                    if self.first_byte.is_none() {
                        let t = self.req.arrived.elapsed().as_secs_f64();
                        self.metrics.first_byte.observe(t);
                        self.first_byte = Some(t);
                    }
                    return Poll::Ready(Some(Ok(out)));
                }
                Poll::Ready(Some(Err(e))) => {
                    // The replica died mid-stream: tell the client in-band and end.
                    tracing::warn!(replica = %self.flight.replica().endpoint.id, error = %e, "replica failed mid-stream");
                    self.flight.replica().mark_down();
                    self.done = true;
                    let err = ApiError::bad_gateway("The replica failed during the stream.");
                    return Poll::Ready(Some(Ok(Bytes::from(format!(
                        "data: {}\n\n",
                        err.to_json()
                    )))));
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
        self.metrics.latency.observe(latency);
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
        if let (true, Some(keep), Some(t)) = (
            finished,
            self.req.keep.take(),
            self.events.transcript.take(),
        ) {
            // Written after the stream ends, so a read sent the moment
            // `[DONE]` arrives may find it missing for a few milliseconds.
            tokio::spawn(async move { keep.save(t.into_completion()).await });
        }
        let row = usage_row(
            &mut self.req,
            &self.flight,
            status,
            self.events.usage,
            self.first_byte.unwrap_or(latency),
            latency,
        );
        self.ledger.record_streamed(row, self.counted);
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

    #[test]
    fn an_incomplete_event_waits_for_its_end() {
        let mut s = SseEvents::new(true);
        assert!(s.push(b"data: {\"choices\":[{").is_empty());
        assert_eq!(&s.push(b"}]}\n\n")[..], b"data: {\"choices\":[{}]}\n\n");
    }
}
