//! Chat completions and completions relayed as the replica answers them:
//! a whole answer's body as it came (its usage read, a stored one kept), a
//! streamed answer's events as they come (`Answer`: moved to another
//! replica when one fails mid-answer), the usage chunk removed when the
//! client did not ask for it, and `[DONE]` held back until a stored answer
//! is written. Each request's usage row is written when it ends, or when
//! its client goes away.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use serde_json::Value;
use strata_core::openai::Usage;
use strata_core::ApiError;

use crate::fleet::client::{describe, Upstream};
use crate::fleet::replicas::InFlight;
use crate::http::error::{event_stream, json_response};
use crate::relay::answer::{Answer, Piece};
use crate::relay::capture::{Keep, Transcript};
use crate::relay::forward::{Exchange, Relay, ReplicaRequest};
use crate::relay::ledger::TokenMeter;
use crate::relay::sse::{Chunk, Kind, DONE};

/// Sends `request` to a replica and relays its answer. With `include_usage`
/// unset, a stream's usage is still asked of the replica (to meter it) and
/// removed on the way out; with `keep`, the answer is stored.
pub async fn relay(
    relay: &Relay,
    mut request: ReplicaRequest,
    exchange: Exchange,
    include_usage: bool,
    keep: Option<Keep>,
) -> Response {
    if exchange.stream && !include_usage {
        request.body = with_usage_requested(&request.body);
    }
    let (flight, upstream) = match relay.send(&request, None).await {
        Ok(sent) => sent,
        Err(refusal) => return refusal,
    };
    if exchange.stream && upstream.status().is_success() {
        let meter = relay.ledger.meter(&request.model);
        let answer = Answer::new(relay.clone(), request, flight, upstream);
        let mut output = Output::new(!include_usage);
        if keep.is_some() {
            output.transcript = Some(Transcript::default());
            output.hold_done = true;
        }
        let stream = Passthrough {
            meter,
            answer,
            output,
            relay: relay.clone(),
            exchange,
            keep,
            first_byte: None,
            done: false,
            saving: None,
            settled: false,
        };
        event_stream(axum::http::StatusCode::OK, Body::from_stream(stream))
    } else {
        whole(relay, &request, exchange, keep, flight, upstream).await
    }
}

/// The body with `stream_options.include_usage` set, so the replica reports usage.
fn with_usage_requested(body: &Bytes) -> Bytes {
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return body.clone();
    };
    v["stream_options"] = serde_json::json!({"include_usage": true});
    Bytes::from(v.to_string())
}

/// An answer's usage, the rest skipped unread.
#[derive(serde::Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Option<Usage>,
}

/// A whole (not streamed) answer, or a replica's refusal: relayed as it came.
async fn whole(
    relay: &Relay,
    request: &ReplicaRequest,
    mut exchange: Exchange,
    keep: Option<Keep>,
    flight: InFlight,
    upstream: Upstream,
) -> Response {
    let status = upstream.status();
    let body = match upstream.bytes().await {
        Ok(b) => b,
        Err(e) => {
            flight.replica().mark_down();
            return axum::response::IntoResponse::into_response(ApiError::bad_gateway(format!(
                "The replica failed while sending its response: {}",
                describe(&e)
            )));
        }
    };
    let usage = match (&keep, status.is_success()) {
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
    let elapsed = exchange.elapsed();
    relay.metrics.latency.observe(elapsed);
    relay.metrics.first_byte.observe(elapsed);
    let row = exchange.usage_row(
        request,
        flight.replica(),
        status.as_u16(),
        usage,
        elapsed,
        elapsed,
    );
    if keep.is_some() || exchange.charge.meter_before_answering() {
        // Metered before the client has the stored answer.
        relay.ledger.record_now(row, 0).await;
    } else {
        relay.ledger.record(row);
    }
    json_response(status, body)
}

/// What of an answer's chunks the client gets: every event as it came, but
/// the usage chunk when it did not ask for it and `[DONE]` while a stored
/// answer is being written; a stored answer's text is gathered on the way.
#[derive(Debug, Default)]
pub struct Output {
    strip_usage: bool,
    /// `[DONE]` is kept back (it is sent when the answer is stored).
    pub hold_done: bool,
    /// Assembles the answer from the chunks when it is to be stored.
    pub transcript: Option<Transcript>,
}

impl Output {
    pub fn new(strip_usage: bool) -> Output {
        Output {
            strip_usage,
            ..Output::default()
        }
    }

    /// Adds what of `chunk` the client gets to `out`.
    pub fn take(&mut self, chunk: &Chunk, out: &mut BytesMut) {
        let pass = match &chunk.kind {
            Kind::Done => !self.hold_done,
            Kind::Other => true,
            Kind::Data(data) => {
                if let (Some(t), Some(v)) = (self.transcript.as_mut(), data.value()) {
                    t.observe(&v);
                }
                !(data.usage_only && self.strip_usage)
            }
        };
        if pass {
            out.extend_from_slice(&chunk.wire);
        }
    }
}

/// The client-facing stream of a streamed answer, metered when it ends or
/// the client goes away.
struct Passthrough {
    /// The model's demand counters, each streamed token counted there.
    meter: TokenMeter,
    answer: Answer,
    output: Output,
    relay: Relay,
    exchange: Exchange,
    /// Where to keep the answer (`store: true`).
    keep: Option<Keep>,
    first_byte: Option<f64>,
    /// Nothing more is sent.
    done: bool,
    /// A stored answer being written; `[DONE]` follows when it is.
    saving: Option<tokio::task::JoinHandle<()>>,
    /// The usage row is written (with the stored answer): not again on drop.
    settled: bool,
}

impl Passthrough {
    /// Output tokens counted as served while streaming.
    fn counted(&self) -> u64 {
        self.answer.reader().deltas
    }

    fn take(&mut self, chunk: &Chunk, out: &mut BytesMut) {
        if chunk.text().is_some() {
            self.relay.ledger.streamed_token(&self.meter);
        }
        self.output.take(chunk, out);
    }

    /// The answer is whole and `[DONE]` held back: a stored answer is
    /// written, with its usage row, before the client reads `[DONE]` (so a
    /// read sent then finds it). The write runs as its own task: a client
    /// that leaves now does not stop it. `None`: nothing to write.
    fn settle(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let finished = self
            .output
            .transcript
            .as_ref()
            .is_some_and(Transcript::finished);
        if !finished {
            return None;
        }
        let (keep, transcript) = (self.keep.take()?, self.output.transcript.take()?);
        let latency = self.exchange.elapsed();
        let row = self.exchange.usage_row(
            self.answer.request(),
            self.answer.replica(),
            200,
            self.exchange.stream_usage(
                self.answer.replica(),
                self.answer.reader().usage,
                self.answer.reader().deltas,
            ),
            self.first_byte.unwrap_or(latency),
            latency,
        );
        self.settled = true;
        let (ledger, counted) = (self.relay.ledger.clone(), self.counted());
        Some(tokio::spawn(async move {
            keep.save(transcript.into_completion()).await;
            ledger.record_now(row, counted).await;
        }))
    }

    /// The answer is whole and `[DONE]` was held back: writes a stored
    /// answer (`settle`). True when `[DONE]` is to follow the write; false
    /// when there is nothing to write and it is to be sent now.
    fn release_done(&mut self) -> bool {
        self.output.hold_done = false;
        self.saving = self.settle();
        self.saving.is_some()
    }
}

impl Stream for Passthrough {
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
            match Pin::new(&mut self.answer).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Piece::Chunk(chunk))) => {
                    // Every event that came with this one goes out with it.
                    let mut out = BytesMut::new();
                    self.take(&chunk, &mut out);
                    while let Some(chunk) = self.answer.buffered() {
                        self.take(&chunk, &mut out);
                    }
                    if self.output.hold_done && self.answer.reader().ended && !self.release_done() {
                        out.extend_from_slice(DONE);
                    }
                    if out.is_empty() {
                        continue;
                    }
                    if self.first_byte.is_none() {
                        let t = self.exchange.elapsed();
                        self.relay.metrics.first_byte.observe(t);
                        self.first_byte = Some(t);
                    }
                    return Poll::Ready(Some(Ok(out.freeze())));
                }
                Poll::Ready(Some(Piece::Failed(error))) => {
                    // Ends the stream with the error as an in-band event.
                    self.done = true;
                    let event = format!("data: {}\n\n", error.to_json());
                    return Poll::Ready(Some(Ok(Bytes::from(event))));
                }
                Poll::Ready(None) if self.answer.lost_end() => {
                    // Only the end (usage, `[DONE]`) was lost.
                    if self.output.hold_done && self.release_done() {
                        continue;
                    }
                    self.done = true;
                    return Poll::Ready(Some(Ok(Bytes::from_static(DONE))));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    let rest = self.answer.rest();
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(rest)));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        let latency = self.exchange.elapsed();
        self.relay.metrics.latency.observe(latency);
        if self.settled {
            return;
        }
        // 499: the client went away before the end, as nginx logs it. A
        // client that closes as soon as `[DONE]` arrives got it all.
        let status = if self.done || self.answer.reader().ended {
            200
        } else {
            499
        };
        let finished = self
            .output
            .transcript
            .as_ref()
            .is_some_and(Transcript::finished);
        let row = self.exchange.usage_row(
            self.answer.request(),
            self.answer.replica(),
            status,
            self.exchange.stream_usage(
                self.answer.replica(),
                self.answer.reader().usage,
                self.answer.reader().deltas,
            ),
            self.first_byte.unwrap_or(latency),
            latency,
        );
        let counted = self.counted();
        if let (true, Some(keep), Some(t)) =
            (finished, self.keep.take(), self.output.transcript.take())
        {
            // The stream ended with a finished answer but no `[DONE]`.
            let ledger = self.relay.ledger.clone();
            tokio::spawn(async move {
                keep.save(t.into_completion()).await;
                ledger.record_now(row, counted).await;
            });
        } else {
            self.relay.ledger.record_streamed(row, counted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::answer::Reader;

    const USAGE: &str = "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const TEXT: &str = "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"text\":\"hi\"}]}\n\n";

    /// `parts` through a reader and `output`, as the stream relays them.
    fn relayed(output: &mut Output, parts: &[&str]) -> (String, Reader) {
        let mut reader = Reader::default();
        let mut out = BytesMut::new();
        for part in parts {
            reader.push(part.as_bytes());
            while let Some(chunk) = reader.next_chunk() {
                output.take(&chunk, &mut out);
            }
        }
        out.extend_from_slice(&reader.rest());
        (String::from_utf8(out.to_vec()).unwrap(), reader)
    }

    #[test]
    fn usage_is_read_and_stripped_when_not_asked_for() {
        let all = format!("{TEXT}{USAGE}data: [DONE]\n\n");
        let (a, b) = all.split_at(30);
        let (out, reader) = relayed(&mut Output::new(true), &[a, b]);
        assert_eq!(out, format!("{TEXT}data: [DONE]\n\n"));
        assert_eq!(reader.usage, Some(Usage::new(3, 2)));
    }

    #[test]
    fn usage_passes_through_when_asked_for() {
        let all = format!("{USAGE}data: [DONE]\n\n");
        let (out, reader) = relayed(&mut Output::new(false), &[&all]);
        assert_eq!(out, all);
        assert_eq!(reader.usage, Some(Usage::new(3, 2)));
    }

    #[test]
    fn done_waits_while_a_stored_answer_is_written_and_the_answer_is_gathered() {
        let mut output = Output::new(true);
        output.hold_done = true;
        output.transcript = Some(Transcript::default());
        let finish = "data: {\"id\":\"x\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
        let chat = "data: {\"id\":\"x\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
        let (out, reader) = relayed(&mut output, &[chat, finish, USAGE, "data: [DONE]\n\n"]);
        assert_eq!(out, format!("{chat}{finish}"));
        assert!(reader.ended);
        let t = output.transcript.unwrap();
        assert!(t.finished());
        let c = t.into_completion();
        assert_eq!(c["choices"][0]["message"]["content"], "hi");
        assert_eq!(c["usage"]["completion_tokens"], 2);
    }

    #[test]
    fn an_incomplete_event_waits_for_its_end() {
        let mut output = Output::new(true);
        let (out, _) = relayed(&mut output, &["data: {\"choices\":[{"]);
        assert_eq!(
            out, "data: {\"choices\":[{",
            "the start is what is left at the end"
        );
        let (out, _) = relayed(&mut output, &["data: {\"choices\":[{", "}]}\n\n"]);
        assert_eq!(out, "data: {\"choices\":[{}]}\n\n");
    }
}
