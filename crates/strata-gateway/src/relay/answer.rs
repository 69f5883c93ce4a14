//! One streamed answer from the replicas, however many it takes: the
//! replica's SSE read event by event (`Reader`, pure), and when that
//! replica fails before the answer is finished, the rest asked of another
//! (`Answer`, the stream; see `resume`). Whoever reads it gets one answer's
//! chunks in order: the chat route passes their bytes on, the Responses
//! route turns them into its own events.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use serde_json::Value;
use strata_core::openai::Usage;
use strata_core::ApiError;

use crate::fleet::client::{describe, ByteStream, Upstream};
use crate::fleet::replicas::{InFlight, Replica};
use crate::relay::forward::{Relay, ReplicaRequest};
use crate::relay::resume::{
    cannot_continue, continued, no_replica_for_the_rest, resumed_usage, Moves,
};
use crate::relay::sse::{Chunk, Data, Events, Kind};

/// An answer read from one or more replicas' event streams: what it says
/// so far, and after a move to another replica, that replica's chunks made
/// to read as the continuation of the first one's.
#[derive(Debug, Default)]
pub struct Reader {
    events: Events,
    /// The generated text so far.
    pub text: String,
    /// Events with generated text so far (one token each from strata's
    /// engine).
    pub deltas: u64,
    /// A choice has a finish reason: the answer is complete, even if the
    /// stream breaks before `[DONE]`.
    pub finished: bool,
    /// `data: [DONE]` has passed: the answer is whole, whatever happens to
    /// the connection after it.
    pub ended: bool,
    /// The usage of the whole answer, once reported.
    pub usage: Option<Usage>,
    /// The first replica's chunk id and creation time.
    id: Value,
    created: Value,
    /// Set once the answer moved to another replica: the deltas streamed
    /// before the latest move.
    resumed_after: Option<u32>,
}

impl Reader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.events.push(bytes);
    }

    /// The next chunk of the answer among the bytes pushed so far. A moved
    /// answer's new replica opens again with the role, which was sent
    /// already: that chunk is skipped.
    pub fn next_chunk(&mut self) -> Option<Chunk> {
        loop {
            let chunk = Chunk::read(self.events.next_event()?);
            if let Some(chunk) = self.take(chunk) {
                return Some(chunk);
            }
        }
    }

    /// Whatever is left when the stream ends (an event never finished).
    pub fn rest(&mut self) -> Bytes {
        self.events.rest()
    }

    /// The answer goes on from another replica: a broken event of the
    /// failed one is dropped, and the new one's chunks are read as the
    /// continuation of this answer.
    pub fn resume(&mut self) {
        self.events.clear();
        self.resumed_after = Some(self.deltas as u32);
    }

    fn take(&mut self, mut chunk: Chunk) -> Option<Chunk> {
        let data = match &mut chunk.kind {
            Kind::Done => {
                self.ended = true;
                return Some(chunk);
            }
            Kind::Other => return Some(chunk),
            Kind::Data(data) => data,
        };
        if let Some(t) = data.text() {
            self.deltas += 1;
            self.text.push_str(t);
        }
        self.finished |= data.finishes;
        match self.resumed_after {
            None => {
                if let (true, Some(v)) = (self.id.is_null(), data.value()) {
                    self.id = v["id"].clone();
                    self.created = v["created"].clone();
                }
            }
            Some(_) if !data.has_text() && !data.finishes && !data.usage_only => return None,
            Some(before) => {
                // Read as the first replica's: its id, its creation time,
                // and the usage of the whole answer. (A chunk no tree can
                // hold goes on as it came, its usage still counted whole.)
                data.usage = data.usage.map(|u| resumed_usage(u, before));
                if let Some(mut v) = data.value() {
                    v["id"] = self.id.clone();
                    v["created"] = self.created.clone();
                    if let Some(u) = data.usage {
                        v["usage"] = serde_json::to_value(u).expect("usage serialises");
                    }
                    let (rewritten, wire) = Data::rewritten(&v);
                    *data = rewritten;
                    chunk.wire = wire;
                }
            }
        }
        if data.usage.is_some() {
            self.usage = data.usage;
        }
        Some(chunk)
    }
}

/// What an `Answer` yields.
#[derive(Debug)]
pub enum Piece {
    Chunk(Chunk),
    /// The answer cannot go on (it may not move again, or no replica took
    /// the rest); nothing follows.
    Failed(ApiError),
}

type Resending = Pin<Box<dyn Future<Output = Option<(InFlight, Upstream)>> + Send>>;

/// A streamed answer: the chunks of `Reader` from the replica that took the
/// request, and from each replica that took the rest after one failed.
pub struct Answer {
    relay: Relay,
    /// The request as first sent (what a move continues).
    request: ReplicaRequest,
    flight: InFlight,
    body: ByteStream,
    reader: Reader,
    moves: Moves,
    resending: Option<Resending>,
    over: bool,
    /// The replica failed after the answer was finished: only its end
    /// (usage, `[DONE]`) was lost.
    lost_end: bool,
}

impl Answer {
    /// The answer `upstream` (a success) starts, of `request` sent to
    /// `flight`'s replica.
    pub fn new(
        relay: Relay,
        request: ReplicaRequest,
        flight: InFlight,
        upstream: Upstream,
    ) -> Self {
        Answer {
            relay,
            request,
            flight,
            body: upstream.bytes_stream(),
            reader: Reader::default(),
            moves: Moves::default(),
            resending: None,
            over: false,
            lost_end: false,
        }
    }

    /// The answer of `request` taken over after `text` (`deltas` events)
    /// had streamed: `upstream` answers the request continued after it
    /// (`resume::continued`) and reads as the rest of it (usage counted
    /// for the whole answer; a later move continues after all of it).
    pub fn continuing(
        relay: Relay,
        request: ReplicaRequest,
        flight: InFlight,
        upstream: Upstream,
        text: String,
        deltas: u64,
    ) -> Self {
        let mut answer = Answer::new(relay, request, flight, upstream);
        if deltas > 0 {
            answer.reader.text = text;
            answer.reader.deltas = deltas;
            answer.reader.resume();
        }
        answer
    }

    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    /// The request as first sent.
    pub fn request(&self) -> &ReplicaRequest {
        &self.request
    }

    /// The replica serving the answer now.
    pub fn replica(&self) -> &Arc<Replica> {
        self.flight.replica()
    }

    /// How many times it moved to another replica.
    pub fn moves(&self) -> u32 {
        self.moves.count
    }

    /// The next chunk already received, without waiting for more.
    pub fn buffered(&mut self) -> Option<Chunk> {
        self.reader.next_chunk()
    }

    /// After the stream ended: the replica failed once the answer was
    /// finished, so its end (usage, `[DONE]`) never came.
    pub fn lost_end(&self) -> bool {
        self.lost_end
    }

    /// After the stream ended: the start of an event that never finished.
    pub fn rest(&mut self) -> Bytes {
        self.reader.rest()
    }

    /// Asks another replica for the rest of the answer, or says why it may
    /// not move again.
    fn resume(&mut self) -> Result<(), ApiError> {
        let external = &self.flight.replica().endpoint.external;
        if external.as_ref().is_some_and(|x| !x.continues) {
            return Err(cannot_continue());
        }
        let first: Value = match serde_json::from_slice(&self.request.body) {
            Ok(v) if self.moves.allow(self.reader.deltas) => v,
            _ => return Err(self.moves.exhausted()),
        };
        let rest = continued(&first, &self.reader.text, self.reader.deltas as u32);
        let mut request = self.request.clone();
        request.body = Bytes::from(rest.to_string());
        let relay = self.relay.clone();
        self.resending = Some(Box::pin(async move { relay.resend(&request).await }));
        Ok(())
    }

    fn fail(&mut self, error: ApiError) -> Poll<Option<Piece>> {
        self.over = true;
        Poll::Ready(Some(Piece::Failed(error)))
    }
}

impl Stream for Answer {
    type Item = Piece;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Piece>> {
        loop {
            if let Some(chunk) = self.reader.next_chunk() {
                return Poll::Ready(Some(Piece::Chunk(chunk)));
            }
            if self.over {
                return Poll::Ready(None);
            }
            if let Some(resending) = self.resending.as_mut() {
                match resending.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some((flight, upstream))) => {
                        tracing::info!(from = %self.flight.replica().endpoint.id, to = %flight.replica().endpoint.id, "answer resumed on another replica");
                        self.relay.metrics.retries.inc();
                        self.resending = None;
                        self.flight = flight;
                        self.body = upstream.bytes_stream();
                        self.reader.resume();
                        continue;
                    }
                    Poll::Ready(None) => {
                        self.resending = None;
                        return self.fail(no_replica_for_the_rest());
                    }
                }
            }
            match self.body.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(bytes))) => self.reader.push(&bytes),
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(replica = %self.flight.replica().endpoint.id, error = %describe(&e), "replica failed mid-answer");
                    self.flight.replica().mark_down();
                    if self.reader.finished {
                        self.lost_end = true;
                        self.over = true;
                    } else if let Err(e) = self.resume() {
                        return self.fail(e);
                    }
                }
                // The replica ended the stream mid-answer (it was stopped).
                Poll::Ready(None) if !self.reader.finished && !self.reader.ended => {
                    tracing::warn!(replica = %self.flight.replica().endpoint.id, "replica ended the stream mid-answer");
                    if let Err(e) = self.resume() {
                        return self.fail(e);
                    }
                }
                Poll::Ready(None) => self.over = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chat chunk of replica `a` (created at 10) or `b` (at 20).
    fn chunk(id: &str, delta: Value, finish: Value) -> String {
        let created = if id == "a" { 10 } else { 20 };
        let v = serde_json::json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {v}\n\n")
    }

    fn read_all(r: &mut Reader, bytes: &str) -> Vec<Chunk> {
        r.push(bytes.as_bytes());
        std::iter::from_fn(|| r.next_chunk()).collect()
    }

    fn values(chunks: &[Chunk]) -> Vec<Value> {
        chunks
            .iter()
            .filter_map(|c| c.data().and_then(Data::value))
            .collect()
    }

    #[test]
    fn a_stream_is_whole_once_done_has_passed() {
        let mut r = Reader::default();
        read_all(
            &mut r,
            &chunk("a", serde_json::json!({"content": "hi"}), Value::Null),
        );
        assert!(!r.ended && !r.finished);
        let end = read_all(&mut r, "data: [DONE]\n\n");
        assert_eq!(end[0].kind, Kind::Done);
        assert!(r.ended, "a client closing now got the whole answer");
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
        let mut r = Reader::default();
        let first = [opening("a"), says("a", "Once"), says("a", " upon")].concat();
        let out = read_all(&mut r, &format!("{first}data: {{\"id\":\"a\",\"cho"));
        assert_eq!(out.len(), 3);
        assert_eq!(
            (r.text.as_str(), r.deltas, r.finished),
            ("Once upon", 2, false)
        );

        // The replica died with half an event sent: the rest comes from
        // another, whose chunks carry their own id, a role opening and a
        // usage that counts the first two tokens as prompt.
        r.resume();
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
        let out = read_all(&mut r, &second);
        let events = values(&out);
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
            r.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((7, 5))
        );
        // The bytes passed on say the same as the values read.
        let wire: Value = serde_json::from_slice(
            out[3]
                .wire
                .strip_prefix(b"data: ")
                .unwrap()
                .strip_suffix(b"\n\n")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(wire, events[3]);
        assert_eq!(r.text, "Once upon a time");
        assert!(r.finished && r.ended);
        assert_eq!(out.last().unwrap().kind, Kind::Done);
    }
}
