//! The SSE codec: a replica's byte stream cut into whole events, each read
//! once into a `Chunk` that keeps its bytes (to pass on unchanged) beside
//! what it means (text, a finish reason, usage, an error, the end).

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use strata_core::openai::Usage;

/// The event that ends an OpenAI stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Bytes of a stream, handed out one whole event at a time.
#[derive(Debug, Default)]
pub struct Events {
    buf: BytesMut,
}

impl Events {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole event (with its blank line), if one has arrived.
    pub fn next_event(&mut self) -> Option<Bytes> {
        let end = find_event_end(&self.buf)?;
        Some(self.buf.split_to(end).freeze())
    }

    /// What is left when the stream ends: the start of an event that never
    /// finished.
    pub fn rest(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    /// Forgets a broken event (the replica that sent it failed).
    pub fn clear(&mut self) {
        self.buf.clear();
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

/// One event of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The event as the client gets it.
    pub wire: Bytes,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `data: [DONE]`: the stream is whole.
    Done,
    /// A JSON chunk.
    Data(Data),
    /// Anything else (a comment, a line that is not JSON): passed on as is.
    Other,
}

/// A JSON chunk of a chat or completion stream, and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct Data {
    pub value: Value,
    /// It adds text to the answer (the first choice's delta or text).
    pub has_text: bool,
    /// The first choice has a finish reason.
    pub finishes: bool,
    pub usage: Option<Usage>,
    /// The usage chunk (no choices), which a client that did not ask for
    /// usage does not get.
    pub usage_only: bool,
}

impl Data {
    /// Text the chunk adds to the answer.
    pub fn text(&self) -> Option<&str> {
        text_of(&self.value)
    }

    pub fn finish_reason(&self) -> Option<&str> {
        self.value["choices"][0]["finish_reason"].as_str()
    }

    /// The message of an error the replica sent in the stream.
    pub fn error(&self) -> Option<&str> {
        let e = self.value.get("error")?;
        Some(e["message"].as_str().unwrap_or("generation failed"))
    }
}

/// A chat chunk's delta or a completion chunk's text, when not empty.
fn text_of(v: &Value) -> Option<&str> {
    let choice = &v["choices"][0];
    choice["delta"]["content"]
        .as_str()
        .or(choice["text"].as_str())
        .filter(|t| !t.is_empty())
}

impl Chunk {
    /// Reads one whole event.
    pub fn read(wire: Bytes) -> Chunk {
        let data = std::str::from_utf8(&wire)
            .ok()
            .and_then(|e| e.lines().find_map(|l| l.strip_prefix("data:")))
            .map(str::trim);
        let kind = match data {
            Some("[DONE]") => Kind::Done,
            Some(data) => match serde_json::from_str::<Value>(data) {
                Ok(value) => Kind::Data(Data::of(value)),
                Err(_) => Kind::Other,
            },
            None => Kind::Other,
        };
        Chunk { wire, kind }
    }

    pub fn data(&self) -> Option<&Data> {
        match &self.kind {
            Kind::Data(d) => Some(d),
            _ => None,
        }
    }

    /// Text the event adds to the answer.
    pub fn text(&self) -> Option<&str> {
        self.data().and_then(Data::text)
    }
}

impl Data {
    pub fn of(value: Value) -> Data {
        let choice = &value["choices"][0];
        Data {
            has_text: text_of(&value).is_some(),
            finishes: !choice["finish_reason"].is_null(),
            usage: serde_json::from_value::<Usage>(value["usage"].clone()).ok(),
            usage_only: value["choices"].as_array().is_some_and(|c| c.is_empty()),
            value,
        }
    }

    /// The chunk's bytes after `value` was changed.
    pub fn wire(&self) -> Bytes {
        let mut out = BytesMut::from(&b"data: "[..]);
        out.extend_from_slice(self.value.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_wait_for_their_blank_line_either_way_it_is_written() {
        let mut e = Events::default();
        e.push(b"data: {\"choices\":[{");
        assert_eq!(e.next_event(), None);
        e.push(b"}]}\n\ndata: x\r\n\r\n: ping");
        assert_eq!(
            e.next_event().as_deref(),
            Some(&b"data: {\"choices\":[{}]}\n\n"[..])
        );
        assert_eq!(e.next_event().as_deref(), Some(&b"data: x\r\n\r\n"[..]));
        assert_eq!(e.next_event(), None);
        assert_eq!(&e.rest()[..], b": ping");
    }

    #[test]
    fn an_event_is_read_once_into_what_it_says() {
        let c = Chunk::read(Bytes::from_static(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\n",
        ));
        let d = c.data().unwrap();
        assert_eq!((d.text(), d.finish_reason()), (Some("Hi"), Some("stop")));
        assert!(d.has_text && d.finishes && !d.usage_only && d.usage.is_none());
        let u = Chunk::read(Bytes::from_static(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n"));
        let d = u.data().unwrap();
        assert!(d.usage_only && !d.has_text);
        assert_eq!(d.usage, Some(Usage::new(3, 2)));
        assert_eq!(Chunk::read(Bytes::from_static(DONE)).kind, Kind::Done);
        assert_eq!(
            Chunk::read(Bytes::from_static(b": keep-alive\n\n")).kind,
            Kind::Other
        );
        assert_eq!(
            Chunk::read(Bytes::from_static(b"data: {oops\n\n")).kind,
            Kind::Other
        );
        let e = Chunk::read(Bytes::from_static(
            b"data: {\"error\":{\"message\":\"out of memory\"}}\n\n",
        ));
        assert_eq!(e.data().unwrap().error(), Some("out of memory"));
    }
}
