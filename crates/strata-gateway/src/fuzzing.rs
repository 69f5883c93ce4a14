//! Entry points for the fuzz targets in `fuzz/` and for the tests that
//! replay what they found: each runs, on bytes from outside, the same
//! parsing a route runs before it touches the store or a replica, and
//! panics when a promise about the answer breaks (not only on a crash).

use bytes::Bytes;
use serde_json::Value;
use strata_core::config::Config;
use strata_core::openai::{parse_body, ChatCompletionRequest, CompletionRequest, Usage};
use strata_core::responses::ResponsesRequest;
use strata_core::snapshot::{frame, frames, Snapshot};
use strata_core::ApiError;

use crate::ops::admin::{parse_admin, AdminBody};
use crate::relay::answer::Reader;
use crate::relay::capture::Transcript;
use crate::relay::passthrough::Output;
use crate::relay::sse::Data;

/// One fuzz target: a parser strata runs on bytes it did not make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Chat,
    Completions,
    Responses,
    /// The four Conversations-API and stored-completion bodies; the
    /// first byte picks one.
    Conversations,
    /// The four admin bodies; the first byte picks one.
    Admin,
    /// The SSE codec; the first byte says how many of the next are chunk
    /// lengths.
    Sse,
    Config,
    Snapshot,
}

impl Target {
    pub const ALL: [Target; 8] = [
        Target::Chat,
        Target::Completions,
        Target::Responses,
        Target::Conversations,
        Target::Admin,
        Target::Sse,
        Target::Config,
        Target::Snapshot,
    ];

    /// The name of its `fuzz/fuzz_targets/*.rs` file and its corpus folders.
    pub fn name(self) -> &'static str {
        match self {
            Target::Chat => "chat",
            Target::Completions => "completions",
            Target::Responses => "responses",
            Target::Conversations => "conversations",
            Target::Admin => "admin",
            Target::Sse => "sse",
            Target::Config => "config",
            Target::Snapshot => "snapshot",
        }
    }

    /// Runs one input; panics on a crash or a broken promise.
    pub fn run(self, data: &[u8]) {
        let pick = |of: &[Body]| {
            let (first, rest) = data.split_first().unwrap_or((&0, &[]));
            (of[usize::from(*first) % of.len()], rest)
        };
        match self {
            Target::Chat => Body::Chat.check(data),
            Target::Completions => Body::Completions.check(data),
            Target::Responses => Body::Responses.check(data),
            Target::Conversations => {
                let (body, rest) = pick(&[
                    Body::NewConversation,
                    Body::ConversationUpdate,
                    Body::ConversationItems,
                    Body::CompletionUpdate,
                ]);
                body.check(rest)
            }
            Target::Admin => {
                let (body, rest) = pick(&[
                    Body::NewTenant,
                    Body::TenantUpdate,
                    Body::NewKey,
                    Body::Preempt,
                ]);
                body.check(rest)
            }
            Target::Sse => {
                let n = data.first().map_or(0, |&n| usize::from(n % 8));
                let cuts = data.get(1..1 + n).unwrap_or_default();
                sse(cuts, data.get(1 + n..).unwrap_or_default())
            }
            Target::Config => config(data),
            Target::Snapshot => snapshot(data),
        }
    }
}

/// A config file: parses or names the key at fault; a parsed one's checks
/// run to the end.
fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(config) => {
            for issue in config.check() {
                assert!(!issue.message.is_empty(), "{}: no message", issue.key);
            }
        }
        Err(issue) => assert!(!issue.message.is_empty(), "{}: no message", issue.key),
    }
}

/// Snapshot bytes as an engine import and a gateway drain read them: what
/// decodes has the ids the header peek finds and encodes back to itself;
/// an export body's frames lie inside it.
fn snapshot(data: &[u8]) {
    const FINGERPRINT: &str = "fuzz";
    if let Ok(s) = Snapshot::decode(data, FINGERPRINT) {
        assert_eq!(
            Snapshot::ids(data),
            Ok((s.scope.clone(), s.session.clone()))
        );
        let again = s.encode(FINGERPRINT);
        assert_eq!(Snapshot::decode(&again, FINGERPRINT).as_ref(), Ok(&s));
    }
    let parts = frames(data);
    let framed: usize = parts.iter().map(|p| 8 + p.len()).sum();
    assert!(framed <= data.len());
    let mut body = Vec::new();
    for part in &parts {
        frame(&mut body, part);
        let _ = Snapshot::ids(part);
    }
    assert_eq!(body, data[..framed], "frames are not read back as written");
}

/// A request body one route takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    Chat,
    Completions,
    Responses,
    NewConversation,
    ConversationUpdate,
    ConversationItems,
    CompletionUpdate,
    NewTenant,
    TenantUpdate,
    NewKey,
    Preempt,
}

impl Body {
    pub const ALL: [Body; 11] = [
        Body::Chat,
        Body::Completions,
        Body::Responses,
        Body::NewConversation,
        Body::ConversationUpdate,
        Body::ConversationItems,
        Body::CompletionUpdate,
        Body::NewTenant,
        Body::TenantUpdate,
        Body::NewKey,
        Body::Preempt,
    ];

    /// The route's own parse and checks of `bytes`.
    pub fn parse(self, bytes: &[u8]) -> Result<(), ApiError> {
        match self {
            Body::Chat => parse_body::<ChatCompletionRequest>(bytes)?
                .validate()
                .map(drop),
            Body::Completions => parse_body::<CompletionRequest>(bytes)?.validate().map(drop),
            Body::Responses => {
                let turn = parse_body::<ResponsesRequest>(bytes)?.validate()?;
                crate::api::responses::chat_request(&turn, &turn.input).map(drop)
            }
            Body::NewConversation => crate::api::conversations::parse_new(bytes).map(drop),
            Body::ConversationUpdate | Body::CompletionUpdate => {
                crate::api::objects::parse_update(bytes).map(drop)
            }
            Body::ConversationItems => crate::api::conversations::parse_new_items(bytes).map(drop),
            Body::NewTenant => admin::<crate::ops::admin::CreateTenant>(bytes),
            Body::TenantUpdate => admin::<crate::ops::admin::UpdateTenant>(bytes),
            Body::NewKey => admin::<crate::ops::admin::CreateKey>(bytes),
            Body::Preempt => admin::<crate::ops::admin::Preempt>(bytes),
        }
    }

    /// Parses `bytes` and panics unless the answer is a success or an
    /// OpenAI-shaped 4xx naming what is wrong: bad input is the caller's
    /// error, never the server's.
    pub fn check(self, bytes: &[u8]) {
        let parsed = self.parse(bytes);
        if parsed.is_ok() && matches!(self, Body::Chat | Body::Completions) {
            // What a stream's answer becomes when it moves to another
            // replica is a request the route takes too.
            let v: Value = serde_json::from_slice(bytes).expect("it parsed");
            let rest = crate::relay::resume::continued(&v, " and so", 2).to_string();
            if let Err(e) = self.parse(rest.as_bytes()) {
                panic!("{self:?}: the continued request is refused: {e}\n{rest}");
            }
        }
        if let Err(e) = parsed {
            assert!(
                (400..500).contains(&e.status),
                "{self:?}: {} for bad input: {e}",
                e.status
            );
            let json: Value = serde_json::from_str(&e.to_json()).expect("errors render as JSON");
            assert!(
                json["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{self:?}: an error without a message: {json}"
            );
        }
    }
}

fn admin<T: AdminBody>(bytes: &[u8]) -> Result<(), ApiError> {
    parse_admin::<T>(bytes).map(drop)
}

/// Runs a replica's SSE answer through the gateway's stream codec in the
/// chunks `cuts` gives (chunk lengths, cycled), as the chat relay and the
/// Responses route read it, and panics unless chunking changes nothing:
/// the same bytes come out as when it arrives whole, a client that asked
/// for usage gets every byte back, and the metered usage and token count
/// agree.
pub fn sse(cuts: &[u8], stream: &[u8]) {
    let whole = relay(stream, &[], false);
    let chunked = relay(stream, cuts, false);
    assert_eq!(whole, chunked, "chunking changed the relayed stream");
    assert_eq!(whole.bytes, stream, "a client asking for usage lost bytes");
    let stripped = relay(stream, cuts, true);
    assert_eq!(
        stripped.usage, whole.usage,
        "stripping usage changed what is metered"
    );
    assert!(stripped.bytes.len() <= stream.len());
    // The same stream from a second replica after the first broke off
    // somewhere: the text goes on from where it was, however it is cut.
    let at = cuts
        .first()
        .map_or(0, |&c| usize::from(c) * stream.len() / 256);
    let (first, _) = stream.split_at(at);
    let moved = |cuts: &[u8]| {
        let mut reader = Reader::default();
        relay_into(&mut reader, &mut Output::new(false), first, &[]);
        reader.resume();
        relay_into(&mut reader, &mut Output::new(false), stream, cuts);
        reader.text
    };
    let expected = relay(first, &[], false).text + &whole.text;
    assert_eq!(moved(&[]), expected, "a moved answer's text");
    assert_eq!(moved(cuts), expected, "chunking changed a moved answer");
}

#[derive(Debug, PartialEq)]
struct Relayed {
    bytes: Vec<u8>,
    usage: Option<Usage>,
    deltas: u64,
    text: String,
    transcript: Value,
}

/// `stream` through `reader` and `output` in chunks cut by `cuts`: the
/// bytes passed on.
fn relay_into(reader: &mut Reader, output: &mut Output, stream: &[u8], cuts: &[u8]) -> Vec<u8> {
    let mut bytes = bytes::BytesMut::new();
    let mut rest = stream;
    let mut sizes = cuts.iter().map(|&c| usize::from(c) + 1).cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        reader.push(&Bytes::copy_from_slice(chunk));
        while let Some(chunk) = reader.next_chunk() {
            // Read fast, a chunk means what its tree says, where a tree
            // can hold it.
            if let Some(data) = chunk.data() {
                if let Some(tree) = Data::read_as_tree(data.json().clone()) {
                    assert_eq!(data, &tree, "read fast, a chunk means something else");
                }
            }
            output.take(&chunk, &mut bytes);
        }
        rest = tail;
    }
    bytes.extend_from_slice(&reader.rest());
    bytes.to_vec()
}

fn relay(stream: &[u8], cuts: &[u8], strip_usage: bool) -> Relayed {
    let mut reader = Reader::default();
    let mut output = Output::new(strip_usage);
    output.transcript = Some(Transcript::default());
    let bytes = relay_into(&mut reader, &mut output, stream, cuts);
    Relayed {
        bytes,
        usage: reader.usage,
        deltas: reader.deltas,
        text: std::mem::take(&mut reader.text),
        transcript: output
            .transcript
            .take()
            .map(Transcript::into_completion)
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_bodies_pass_and_bad_ones_are_4xx() {
        let good: [(Body, &str); 6] = [
            (
                Body::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            ),
            (Body::Completions, r#"{"model":"m","prompt":"hi"}"#),
            (Body::Responses, r#"{"model":"m","input":"hi"}"#),
            (Body::NewConversation, r#"{"metadata":{"a":"b"}}"#),
            (Body::NewTenant, r#"{"name":"acme"}"#),
            (Body::Preempt, ""),
        ];
        for (body, bytes) in good {
            assert!(body.parse(bytes.as_bytes()).is_ok(), "{body:?} {bytes}");
        }
        for body in Body::ALL {
            for bad in [&b"\xff"[..], b"[]", b"{\"model\":", b"{\"name\":\"\"}"] {
                assert!(body.parse(bad).is_err(), "{body:?} {bad:?}");
                body.check(bad);
            }
        }
    }

    #[test]
    fn the_codec_relays_a_real_stream_in_any_chunks() {
        let stream = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n",
            "data: [DONE]\n\n"
        );
        for cuts in [&[0u8][..], &[1, 6], &[200], &[]] {
            sse(cuts, stream.as_bytes());
        }
        let r = relay(stream.as_bytes(), &[2], true);
        assert_eq!(r.deltas, 1);
        assert!(r.usage.is_some());
        assert!(!String::from_utf8(r.bytes).unwrap().contains("usage"));
        assert_eq!(r.transcript["choices"][0]["message"]["content"], "Hi");
    }
}
