//! OpenAI wire types for completions and chat completions, the JSON body
//! parser that names the offending field, and request validation.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::sampling::SamplingParams;
use crate::ApiError;

/// Parses a request body: UTF-8 first, then JSON into `T`. A type error names
/// the field path (`messages[0].content`) in `param`.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid_request(None, format!("Request body is not valid UTF-8: {e}"))
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid_request(
            None,
            "Request body is empty; expected a JSON object.",
        ));
    }
    // serde would take `[…]` for a struct, field by field in order.
    if !text.trim_start().starts_with('{') {
        return Err(ApiError::invalid_request(
            None,
            "Request body must be a JSON object.",
        ));
    }
    // Most bodies are good: parse without tracking the path, and go over a
    // bad one again only to name the field at fault. serde_json calls a
    // value of the wrong kind for an enum (a number where a name belongs)
    // a syntax error: JSON that parses is never reported as invalid JSON.
    let valid_json = || serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
    match serde_json::from_str::<T>(text) {
        Ok(value) => return Ok(value),
        Err(e) if (e.is_syntax() || e.is_eof()) && !valid_json() => {
            return Err(ApiError::invalid_request(
                None,
                format!("Request body is not valid JSON: {e}"),
            ))
        }
        Err(_) => {}
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if (inner.is_syntax() || inner.is_eof()) && !valid_json() {
            ApiError::invalid_request(None, format!("Request body is not valid JSON: {inner}"))
        } else {
            // serde reports a missing field at the parent's path; name the field itself.
            let param = missing_field(&inner.to_string())
                .map(|f| join_path(&path, &f))
                .unwrap_or(path);
            let param = (param != ".").then_some(param);
            ApiError::invalid_request(param.as_deref(), format!("Invalid request: {inner}"))
        }
    })?;
    de.end().map_err(|e| {
        ApiError::invalid_request(None, format!("Request body is not valid JSON: {e}"))
    })?;
    Ok(value)
}

fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_string())
}

fn join_path(parent: &str, field: &str) -> String {
    if parent == "." {
        field.to_string()
    } else {
        format!("{parent}.{field}")
    }
}

/// `stop`: one string or a list of up to four. Its OpenAPI schema is
/// `schemas::stop`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `prompt` of a completion: a string, or a list holding one string.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
}

/// Sampling fields shared by both request kinds.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SamplingFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 2))]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0, maximum = 1))]
    pub top_p: Option<f64>,
    /// Not in OpenAI's schema; accepted as llama.cpp and vLLM servers do.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 2147483647))]
    pub top_k: Option<i64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Only 1 is supported.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1))]
    pub n: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompletionRequest {
    #[cfg_attr(feature = "openapi", schema(min_length = 1, pattern = "\\S"))]
    pub model: String,
    #[cfg_attr(feature = "openapi", schema(schema_with = schemas::prompt))]
    pub prompt: Prompt,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4294967295_i64))]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChatCompletionRequest {
    #[cfg_attr(feature = "openapi", schema(min_length = 1, pattern = "\\S"))]
    pub model: String,
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub messages: Vec<ChatMessage>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4294967295_i64))]
    pub max_tokens: Option<i64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4294967295_i64))]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Keep the request and answer, readable later through
    /// `/v1/chat/completions/{id}` (sealed with the tenant's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Continue the last (assistant) message instead of answering it, as
    /// vLLM's extension of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continue_final_message: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// OpenAI's bounds on `metadata`: pairs, key length, value length.
pub const MAX_METADATA_PAIRS: usize = 16;
pub const MAX_METADATA_KEY: usize = 64;
pub const MAX_METADATA_VALUE: usize = 512;

/// Checks `metadata` against OpenAI's bounds.
pub fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if metadata.len() > MAX_METADATA_PAIRS {
        return Err(ApiError::invalid_request(
            Some("metadata"),
            format!("`metadata` may hold at most {MAX_METADATA_PAIRS} pairs."),
        ));
    }
    for (k, v) in metadata {
        if k.chars().count() > MAX_METADATA_KEY || v.chars().count() > MAX_METADATA_VALUE {
            return Err(ApiError::invalid_request(
                Some("metadata"),
                format!(
                    "`metadata` keys may be at most {MAX_METADATA_KEY} and values {MAX_METADATA_VALUE} characters."
                ),
            ));
        }
    }
    Ok(())
}

/// Its OpenAPI schema is `schemas::message`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ContentPart {
    #[serde(rename = "type")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^text$"))]
    pub kind: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true, nullable = false))]
    pub text: Option<String>,
}

/// A chat turn after validation: a known role and plain text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// What a validated request asks the engine to do.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Chat(Vec<Turn>),
    /// A chat whose last turn, the model's, is continued rather than
    /// answered (`continue_final_message`; how a stream resumes elsewhere).
    Continue(Vec<Turn>),
}

/// A request after validation, in the engine's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub model: String,
    pub input: PromptInput,
    pub sampling: SamplingParams,
    /// `max_tokens` as given; `None` lets the server pick its default.
    pub max_tokens: Option<u32>,
    pub stream: bool,
    pub include_usage: bool,
    /// Chat only: keep the request and answer (`store: true`).
    pub store: bool,
    pub metadata: BTreeMap<String, String>,
}

/// How many tokens a completion without `max_tokens` generates at most
/// (OpenAI's default for `/v1/completions`).
pub const COMPLETION_DEFAULT_MAX_TOKENS: u32 = 16;

impl Generation {
    /// The most tokens this request may generate: `max_tokens` as given,
    /// else 16 for a completion and `chat_default` (`engine.default_max_tokens`)
    /// for a chat. The engine generates no more (it may stop sooner where
    /// the context ends), and the gateway reserves limits and budget for
    /// this many: one rule for both.
    pub fn max_output_tokens(&self, chat_default: u32) -> u32 {
        match (self.max_tokens, &self.input) {
            (Some(m), _) => m,
            (None, PromptInput::Text(_)) => COMPLETION_DEFAULT_MAX_TOKENS,
            (None, _) => chat_default,
        }
    }
}

/// Most stop strings a request may give, as OpenAI allows.
pub const MAX_STOP_STRINGS: usize = 4;

impl CompletionRequest {
    pub fn validate(self) -> Result<Generation, ApiError> {
        check_model(&self.model)?;
        let text = match self.prompt {
            Prompt::Text(t) => t,
            Prompt::Texts(mut v) if v.len() == 1 => v.remove(0),
            Prompt::Texts(_) => {
                return Err(ApiError::invalid_request(
                    Some("prompt"),
                    "`prompt` must be a string or a list of exactly one string.",
                ))
            }
        };
        if text.is_empty() {
            return Err(ApiError::invalid_request(
                Some("prompt"),
                "`prompt` must not be empty.",
            ));
        }
        Ok(Generation {
            model: self.model,
            input: PromptInput::Text(text),
            sampling: self.sampling.validate()?,
            max_tokens: check_max_tokens("max_tokens", self.max_tokens)?,
            include_usage: include_usage(self.stream, self.stream_options.as_ref())?,
            stream: self.stream,
            store: false,
            metadata: BTreeMap::new(),
        })
    }
}

impl ChatCompletionRequest {
    pub fn validate(self) -> Result<Generation, ApiError> {
        check_model(&self.model)?;
        if self.messages.is_empty() {
            return Err(ApiError::invalid_request(
                Some("messages"),
                "`messages` must hold at least one message.",
            ));
        }
        let mut turns = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            turns.push(m.into_turn(i)?);
        }
        if !turns.iter().any(|t| t.role == Role::User) {
            return Err(ApiError::invalid_request(
                Some("messages"),
                "`messages` must hold at least one message with role `user`.",
            ));
        }
        let (field, max_tokens) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let metadata = self.metadata.unwrap_or_default();
        check_metadata(&metadata)?;
        let input = if self.continue_final_message == Some(true) {
            if turns.last().map(|t| t.role) != Some(Role::Assistant) {
                return Err(ApiError::invalid_request(
                    Some("continue_final_message"),
                    "`continue_final_message` needs an assistant message last.",
                ));
            }
            PromptInput::Continue(turns)
        } else {
            PromptInput::Chat(turns)
        };
        Ok(Generation {
            model: self.model,
            input,
            sampling: self.sampling.validate()?,
            max_tokens: check_max_tokens(field, max_tokens)?,
            include_usage: include_usage(self.stream, self.stream_options.as_ref())?,
            stream: self.stream,
            store: self.store.unwrap_or(false),
            metadata,
        })
    }
}

impl ChatMessage {
    fn into_turn(self, index: usize) -> Result<Turn, ApiError> {
        let role = match self.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid_request(
                    Some(&format!("messages[{index}].role")),
                    format!(
                        "Unsupported role `{other}`; expected system, developer, user or assistant."
                    ),
                ))
            }
        };
        let param = format!("messages[{index}].content");
        let text = match self.content {
            Some(MessageContent::Text(t)) => t,
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        _ => return Err(ApiError::invalid_request(
                            Some(&format!("{param}[{j}]")),
                            "Only content parts of type `text` with a `text` field are supported.",
                        )),
                    }
                }
                text
            }
            None if role == Role::Assistant => String::new(),
            None => {
                return Err(ApiError::invalid_request(
                    Some(&param),
                    "`content` is required for this role.",
                ))
            }
        };
        Ok(Turn { role, text })
    }
}

impl SamplingFields {
    fn validate(self) -> Result<SamplingParams, ApiError> {
        let mut p = SamplingParams::default();
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid_request(
                    Some("temperature"),
                    "`temperature` must be between 0 and 2.",
                ));
            }
            p.temperature = t as f32;
        }
        if let Some(v) = self.top_p {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ApiError::invalid_request(
                    Some("top_p"),
                    "`top_p` must be greater than 0 and at most 1.",
                ));
            }
            p.top_p = v as f32;
        }
        if let Some(k) = self.top_k {
            if !(0..=i64::from(i32::MAX)).contains(&k) {
                return Err(ApiError::invalid_request(
                    Some("top_k"),
                    "`top_k` must be 0 (off) or a positive integer.",
                ));
            }
            p.top_k = k as u32;
        }
        if let Some(seed) = self.seed {
            // llama.cpp seeds are 32-bit; fold larger seeds so every i64 is accepted.
            p.seed = Some((seed as u64 ^ (seed as u64 >> 32)) as u32);
        }
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid_request(
                    Some("n"),
                    "Only `n` = 1 is supported.",
                ));
            }
        }
        p.stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if p.stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid_request(
                Some("stop"),
                format!("`stop` may hold at most {MAX_STOP_STRINGS} strings."),
            ));
        }
        if p.stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_request(
                Some("stop"),
                "`stop` strings must not be empty.",
            ));
        }
        Ok(p)
    }
}

fn check_model(model: &str) -> Result<(), ApiError> {
    if model.trim().is_empty() {
        return Err(ApiError::invalid_request(
            Some("model"),
            "`model` must not be empty.",
        ));
    }
    Ok(())
}

fn check_max_tokens(field: &str, value: Option<i64>) -> Result<Option<u32>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if v >= 1 && v <= i64::from(u32::MAX) => Ok(Some(v as u32)),
        Some(_) => Err(ApiError::invalid_request(
            Some(field),
            format!("`{field}` must be at least 1."),
        )),
    }
}

fn include_usage(stream: bool, options: Option<&StreamOptions>) -> Result<bool, ApiError> {
    match options {
        Some(_) if !stream => Err(ApiError::invalid_request(
            Some("stream_options"),
            "`stream_options` is only allowed when `stream` is true.",
        )),
        Some(o) => Ok(o.include_usage),
        None => Ok(false),
    }
}

// ---- responses -------------------------------------------------------------

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// How many prompt tokens came from the engine's prefix cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }

    /// The same usage, reporting `cached_tokens` of the prompt as reused.
    pub fn with_cached(mut self, cached_tokens: u32) -> Self {
        self.prompt_tokens_details = Some(PromptTokensDetails { cached_tokens });
        self
    }

    pub fn cached_tokens(&self) -> u32 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<serde_json::Value>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChatChoice {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<AssistantMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<Delta>,
    pub logprobs: Option<serde_json::Value>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

impl ModelList {
    pub fn of(ids: impl IntoIterator<Item = String>, created: u64) -> Self {
        ModelList {
            object: "list".into(),
            data: ids
                .into_iter()
                .map(|id| ModelCard {
                    id,
                    object: "model".into(),
                    created,
                    owned_by: "strata".into(),
                })
                .collect(),
        }
    }
}

/// A new response id with OpenAI's prefix (`cmpl-`, `chatcmpl-`).
pub fn response_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A generation request's id, `req-…`: ordered by time (UUIDv7), so the
/// ledger's rows, keyed by it, go to the end of its index instead of onto
/// pages all over it (at thousands of rows a second, random keys made
/// each batch rewrite most of the index's leaf pages).
///
/// Made here rather than by `Uuid::now_v7`, which reads the OS random
/// source (a system call) for every id: a per-thread counter, started at
/// a random value each millisecond (so ids sort within one, and say nothing
/// of how many requests came before), and 32 random bits from a per-thread
/// generator. Ids are not secrets: every object is looked up within its
/// tenant.
pub fn request_id() -> String {
    use std::cell::Cell;
    thread_local! {
        /// The millisecond of this thread's last id and its counter.
        static LAST: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    let now = u64::try_from(crate::now_ms()).unwrap_or(0);
    let (ms, counter) = LAST.with(|last| {
        let (prev_ms, prev) = last.get();
        // 41 random bits leave room for 2^41 more ids in the same millisecond
        // of the 42-bit counter; a clock that steps back keeps the last one.
        let next = if now > prev_ms {
            (now, fastrand::u64(..1 << 41))
        } else {
            (prev_ms, prev + 1)
        };
        last.set(next);
        next
    });
    // UUIDv7: 48-bit milliseconds, version 7, 12 counter bits, variant 0b10,
    // the other 30 counter bits, 32 random bits.
    let bits = (u128::from(ms & ((1 << 48) - 1)) << 80)
        | (0x7 << 76)
        | (u128::from(counter >> 30) << 64)
        | (0b10 << 62)
        | (u128::from(counter & ((1 << 30) - 1)) << 32)
        | u128::from(fastrand::u32(..));
    format!("req-{}", uuid::Uuid::from_u128(bits).simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Generation, ApiError> {
        parse_body::<ChatCompletionRequest>(body.as_bytes())?.validate()
    }

    #[test]
    fn a_request_generates_at_most_its_max_tokens_or_the_default_for_its_kind() {
        let c = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert_eq!(c.max_output_tokens(512), 512);
        let c = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":7}"#)
            .unwrap();
        assert_eq!(c.max_output_tokens(512), 7);
        let t = serde_json::from_str::<CompletionRequest>(r#"{"model":"m","prompt":"x"}"#)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(t.max_output_tokens(512), COMPLETION_DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn request_ids_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..1000).map(|_| request_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order");
        assert!(ids
            .iter()
            .all(|id| id.starts_with("req-") && id.len() == 36));
        for id in &ids {
            let uuid = uuid::Uuid::parse_str(&id[4..]).unwrap();
            assert_eq!(uuid.get_version_num(), 7, "{id}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
    }

    #[test]
    fn request_ids_of_many_threads_never_repeat() {
        let threads: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(|| (0..20_000).map(|_| request_id()).collect::<Vec<_>>()))
            .collect();
        let mut all = std::collections::HashSet::new();
        for t in threads {
            for id in t.join().unwrap() {
                assert!(all.insert(id.clone()), "{id} made twice");
            }
        }
        assert_eq!(all.len(), 160_000);
    }

    #[test]
    fn request_ids_of_one_millisecond_do_not_count_from_zero() {
        // The counter starts at a random value each millisecond: an id does
        // not tell a tenant how many requests others made before it.
        let starts: std::collections::HashSet<u128> = (0..50)
            .map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(2));
                let u = uuid::Uuid::parse_str(&request_id()[4..]).unwrap().as_u128();
                (u >> 64) & 0xfff
            })
            .collect();
        assert!(starts.len() > 10, "counters started at {starts:?}");
    }

    #[test]
    fn continuing_needs_an_assistant_message_last() {
        let g = chat(r#"{"model":"m","messages":[{"role":"user","content":"Count"},{"role":"assistant","content":"one, "}],"continue_final_message":true}"#).unwrap();
        assert!(matches!(g.input, PromptInput::Continue(ref t) if t.len() == 2));
        let e = chat(r#"{"model":"m","messages":[{"role":"user","content":"Count"}],"continue_final_message":true}"#).unwrap_err();
        assert_eq!(
            (e.status, e.param.as_deref()),
            (400, Some("continue_final_message"))
        );
    }

    fn completion(body: &str) -> Result<Generation, ApiError> {
        parse_body::<CompletionRequest>(body.as_bytes())?.validate()
    }

    #[test]
    fn a_plain_chat_request_validates() {
        let g = chat(r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":5,"temperature":0,"stop":"\n"}"#).unwrap();
        assert_eq!(g.max_tokens, Some(5));
        assert_eq!(g.sampling.temperature, 0.0);
        assert_eq!(g.sampling.stop, vec!["\n".to_string()]);
        let PromptInput::Chat(turns) = g.input else {
            panic!("chat input")
        };
        assert_eq!(
            turns[1],
            Turn {
                role: Role::User,
                text: "hi".into()
            }
        );
    }

    #[test]
    fn errors_name_the_offending_field() {
        let cases = [
            (r#"{"model":"m","messages":[]}"#, Some("messages")),
            (r#"{"model":"m","messages":"hi"}"#, Some("messages")),
            (r#"{"model":"m"}"#, Some("messages")),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-3}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":0}"#,
                Some("max_completion_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                Some("temperature"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":0}"#,
                Some("top_p"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#,
                Some("n"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
                Some("stop"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                Some("messages[0].content[0]"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"assistant","content":"x"}]}"#,
                Some("messages"),
            ),
            (
                r#"{"model":"","messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
                Some("stream_options"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}"#,
                None,
            ),
            (r#"[1,2]"#, None),
        ];
        for (body, param) in cases {
            let e = chat(body).expect_err(body);
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), param, "{body}: {}", e.message);
        }
    }

    #[test]
    fn invalid_utf8_and_empty_bodies_are_400() {
        let e = parse_body::<ChatCompletionRequest>(b"{\"model\":\"\xff\"}").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("UTF-8"));
        let e = parse_body::<ChatCompletionRequest>(b"  ").unwrap_err();
        assert!(e.message.contains("empty"));
        let e = parse_body::<ChatCompletionRequest>(b"{} trailing").unwrap_err();
        assert_eq!(e.status, 400);
        // serde alone would fill the struct's fields from an array, in order.
        let e = parse_body::<ChatCompletionRequest>(br#"["m", [{"role":"user","content":"x"}]]"#)
            .unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "Request body must be a JSON object.")
        );
    }

    #[test]
    fn a_number_where_an_enum_name_belongs_names_the_field_not_invalid_json() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Body {
            priority: crate::tenant::Priority,
        }
        let e = parse_body::<Body>(br#"{"priority": 1}"#).unwrap_err();
        assert_eq!(
            (e.status, e.param.as_deref()),
            (400, Some("priority")),
            "{}",
            e.message
        );
        assert!(!e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_body::<Body>(br#"{"priority": 1"#).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
    }

    #[test]
    fn completion_prompt_forms() {
        assert!(completion(r#"{"model":"m","prompt":"once"}"#).is_ok());
        assert!(completion(r#"{"model":"m","prompt":["once"]}"#).is_ok());
        assert_eq!(
            completion(r#"{"model":"m","prompt":["a","b"]}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("prompt")
        );
        assert_eq!(
            completion(r#"{"model":"m","prompt":""}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("prompt")
        );
        assert_eq!(
            completion(r#"{"model":"m","prompt":7}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("prompt")
        );
        let g = completion(r#"{"model":"m","prompt":"x","stream":true,"stream_options":{"include_usage":true},"seed":-1}"#).unwrap();
        assert!(g.include_usage && g.stream);
        assert!(g.sampling.seed.is_some());
    }
}

/// Schemas the derive cannot say: the rules `validate` applies to a
/// prompt and to a message, for the OpenAPI document.
#[cfg(feature = "openapi")]
mod schemas {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    use utoipa::openapi::{RefOr, Schema};
    use utoipa::{PartialSchema, ToSchema};

    fn text() -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
    }

    /// A non-empty string, or a list of exactly one.
    pub fn prompt() -> Schema {
        OneOfBuilder::new()
            .item(text())
            .item(
                ArrayBuilder::new()
                    .items(text())
                    .min_items(Some(1))
                    .max_items(Some(1)),
            )
            .into()
    }

    /// Non-empty strings: one, or a list of at most `MAX_STOP_STRINGS`.
    fn stop() -> Schema {
        OneOfBuilder::new()
            .item(text())
            .item(
                ArrayBuilder::new()
                    .items(text())
                    .max_items(Some(super::MAX_STOP_STRINGS)),
            )
            .description(Some("`stop`: one string or a list of up to four."))
            .into()
    }

    impl PartialSchema for super::Stop {
        fn schema() -> RefOr<Schema> {
            stop().into()
        }
    }

    impl ToSchema for super::Stop {}

    /// A message of a known role; `content` may be left out only by the
    /// assistant.
    fn message() -> Schema {
        let content: RefOr<Schema> = super::MessageContent::schema();
        let of = |roles: &[&str], required: bool| {
            let role = ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(roles.iter().copied()));
            let mut o = ObjectBuilder::new()
                .property("role", role)
                .required("role")
                .property("content", content.clone());
            if required {
                o = o.required("content");
            }
            o
        };
        OneOfBuilder::new()
            .item(of(&["system", "developer", "user"], true))
            .item(of(&["assistant"], false))
            .into()
    }

    impl PartialSchema for super::ChatMessage {
        fn schema() -> RefOr<Schema> {
            message().into()
        }
    }

    impl ToSchema for super::ChatMessage {
        fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
            schemas.push((
                super::ContentPart::name().into_owned(),
                super::ContentPart::schema(),
            ));
            <super::MessageContent as ToSchema>::schemas(schemas);
        }
    }
}
