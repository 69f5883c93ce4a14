//! The SSE codec: a replica's byte stream cut into whole events, each read
//! once into a `Chunk` that keeps its bytes (to pass on unchanged) beside
//! what it means (text, a finish reason, usage, an error, the end).

use bytes::{Bytes, BytesMut};
use serde_json::value::RawValue;
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

/// An in-stream error's message when the replica gave none.
const UNNAMED_ERROR: &str = "generation failed";

/// A JSON chunk of a chat or completion stream, and what it says: read
/// once, into only what the gateway uses (the whole JSON tree is built
/// only where one is needed: a stored answer's transcript, a chunk
/// rewritten after a move).
#[derive(Debug, Clone, PartialEq)]
pub struct Data {
    /// The `data:` payload.
    json: Bytes,
    /// Text the chunk adds to the answer (the first choice's delta or
    /// text), when not empty.
    text: Option<String>,
    finish_reason: Option<String>,
    /// The first choice has a finish reason (of any JSON type but null).
    pub finishes: bool,
    pub usage: Option<Usage>,
    /// The usage chunk (no choices), which a client that did not ask for
    /// usage does not get.
    pub usage_only: bool,
    /// The message of an error the replica sent in the stream.
    error: Option<String>,
}

impl Data {
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }

    pub fn has_text(&self) -> bool {
        self.text.is_some()
    }

    pub fn finish_reason(&self) -> Option<&str> {
        self.finish_reason.as_deref()
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// The chunk as a JSON tree; `None` for the rare chunk a tree cannot
    /// hold though it reads (a number beyond `f64` in a field the gateway
    /// does not use).
    pub fn value(&self) -> Option<Value> {
        serde_json::from_slice(&self.json).ok()
    }

    /// The `data:` payload.
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// As `read`, always through a JSON tree: what the fast reading must
    /// agree with wherever a tree can hold the chunk (the tests and the
    /// fuzz target check it does).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn read_as_tree(json: Bytes) -> Option<Data> {
        let value = serde_json::from_slice::<Value>(&json).ok()?;
        Some(Data::from_value(&value, json))
    }

    /// Reads one `data:` payload; `None` if it is not JSON.
    pub fn read(json: Bytes) -> Option<Data> {
        // The usual shape, read without building a tree; anything else
        // (a field of another type than OpenAI's; not an object, which
        // serde would also read a struct from) through one.
        let object = json.first() == Some(&b'{');
        match object.then(|| serde_json::from_slice::<Wire>(&json)) {
            Some(Ok(wire)) => Some(Data::from_wire(&wire, json.clone())),
            _ => {
                let value = serde_json::from_slice::<Value>(&json).ok()?;
                Some(Data::from_value(&value, json))
            }
        }
    }

    fn from_wire(w: &Wire, json: Bytes) -> Data {
        let choice = w.choices.as_ref().and_then(|c| c.first());
        let string =
            |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str::<String>(r.get()).ok());
        let text = choice
            .and_then(|c| {
                let content = c.delta.as_ref().and_then(|d| d.content);
                string(content).or_else(|| string(c.text))
            })
            .filter(|t| !t.is_empty());
        Data {
            json,
            text,
            finish_reason: string(choice.and_then(|c| c.finish_reason)),
            finishes: choice.is_some_and(|c| c.finish_reason.is_some()),
            // Through a tree, as `from_value` reads it (a key given twice
            // counts once, the last), and once per stream.
            usage: w.usage.and_then(|u| {
                serde_json::from_str::<Value>(u.get())
                    .ok()
                    .and_then(|v| serde_json::from_value::<Usage>(v).ok())
            }),
            usage_only: w.choices.as_ref().is_some_and(Vec::is_empty),
            error: w.error.map(|e| {
                serde_json::from_str::<Value>(e.get())
                    .ok()
                    .and_then(|v| v["message"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| UNNAMED_ERROR.into())
            }),
        }
    }

    fn from_value(v: &Value, json: Bytes) -> Data {
        let choice = &v["choices"][0];
        Data {
            json,
            text: choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str())
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
            finish_reason: choice["finish_reason"].as_str().map(str::to_owned),
            finishes: !choice["finish_reason"].is_null(),
            usage: serde_json::from_value::<Usage>(v["usage"].clone()).ok(),
            usage_only: v["choices"].as_array().is_some_and(|c| c.is_empty()),
            error: v
                .get("error")
                .map(|e| e["message"].as_str().unwrap_or(UNNAMED_ERROR).to_owned()),
        }
    }

    /// The chunk made of `value`, and its bytes as an event.
    pub fn rewritten(value: &Value) -> (Data, Bytes) {
        let json = Bytes::from(value.to_string());
        let mut wire = BytesMut::from(&b"data: "[..]);
        wire.extend_from_slice(&json);
        wire.extend_from_slice(b"\n\n");
        (Data::from_value(value, json), wire.freeze())
    }
}

/// A chunk as OpenAI streams one, only the parts the gateway reads; the
/// values whose type varies stay raw JSON.
#[derive(serde::Deserialize)]
struct Wire<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<WireChoice<'a>>>,
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
    /// Present even when `null`.
    #[serde(default, borrow, deserialize_with = "present")]
    error: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct WireChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<WireDelta<'a>>,
    #[serde(default, borrow)]
    text: Option<&'a RawValue>,
    #[serde(default, borrow)]
    finish_reason: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct WireDelta<'a> {
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
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
            Some(data) => {
                // The payload as a slice of the event, not a copy.
                let start = data.as_ptr() as usize - wire.as_ptr() as usize;
                let json = wire.slice(start..start + data.len());
                Data::read(json).map_or(Kind::Other, Kind::Data)
            }
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
        assert!(d.has_text() && d.finishes && !d.usage_only && d.usage.is_none());
        let u = Chunk::read(Bytes::from_static(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n"));
        let d = u.data().unwrap();
        assert!(d.usage_only && !d.has_text());
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

    #[test]
    fn a_chunk_no_tree_can_hold_is_still_read() {
        let json = Bytes::from_static(
            br#"{"x":1e999,"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}"#,
        );
        let d = Data::read(json.clone()).unwrap();
        assert_eq!((d.text(), d.value()), (Some("hi"), None));
        assert_eq!(Data::read_as_tree(json), None);
    }

    #[test]
    fn chunks_of_any_shape_mean_what_their_json_tree_says() {
        for json in [
            r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi \u00e9\n"},"finish_reason":null}]}"#,
            r#"{"choices":[{"text":"a","finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,"prompt_tokens_details":{"cached_tokens":1}}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":3,"total_tokens":4}}"#,
            r#"{"choices":[{"delta":{"content":["not","text"]},"finish_reason":7}]}"#,
            r#"{"choices":[{"delta":"odd","text":""}]}"#,
            r#"{"choices":{"0":{}},"usage":null}"#,
            r#"{"error":null}"#,
            r#"{"error":{"code":1}}"#,
            r#"{"choices":[{"finish_reason":"stop"}],"choices":[]}"#,
            r#"[1,2]"#,
            r#"[[]]"#,
            r#""text""#,
        ] {
            let json = Bytes::from(json);
            assert_eq!(
                Data::read(json.clone()),
                Data::read_as_tree(json.clone()),
                "{json:?}"
            );
        }
    }
}
