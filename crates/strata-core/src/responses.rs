//! The Responses and Conversations APIs' wire shapes, kept pure: request
//! parsing and validation, message items, the response object, and the
//! events of a streamed response. The gateway does the I/O.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::openai::{check_metadata, Usage};
use crate::store::Order;
use crate::ApiError;

/// `POST /v1/responses`. Fields strata does not implement (tools) are
/// refused rather than ignored.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResponsesRequest {
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub model: String,
    pub input: Input,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub conversation: Option<ConversationRef>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default, deserialize_with = "crate::whole::opt")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4294967295_i64))]
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 2))]
    pub temperature: Option<f64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0, maximum = 1))]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub stream: bool,
    /// Not supported: absent or empty.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 0))]
    pub tools: Option<Vec<Value>>,
    /// Runs the response server-side, whatever happens to the client's
    /// connection: polled, cancelled, and its stream resumed from any
    /// gateway. Stored (`store` cannot be false).
    #[serde(default)]
    pub background: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Input {
    Text(String),
    #[cfg_attr(feature = "openapi", schema(value_type = InputItems))]
    Items(Vec<Value>),
}

/// A list of at least one item; for the OpenAPI document only.
#[cfg(feature = "openapi")]
#[derive(utoipa::ToSchema)]
#[schema(min_items = 1)]
#[allow(dead_code)]
pub struct InputItems(Vec<InputItem>);

/// The one item shape strata takes (a message); for the OpenAPI document
/// only: `parse_items` reads items from JSON values with the same rules.
#[cfg(feature = "openapi")]
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct InputItem {
    #[serde(rename = "type")]
    #[schema(nullable = false)]
    kind: Option<InputItemType>,
    role: ItemRole,
    content: InputContent,
}

#[cfg(feature = "openapi")]
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum InputItemType {
    Message,
}

#[cfg(feature = "openapi")]
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum InputContent {
    Text(String),
    Parts(Vec<InputPart>),
}

#[cfg(feature = "openapi")]
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
struct InputPart {
    #[serde(rename = "type")]
    kind: InputPartType,
    text: String,
}

#[cfg(feature = "openapi")]
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum InputPartType {
    InputText,
    OutputText,
    Text,
}

/// `conversation`: an id, or an object holding one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ConversationRef {
    Id(String),
    Object { id: String },
}

impl ConversationRef {
    pub fn id(&self) -> &str {
        match self {
            ConversationRef::Id(id) | ConversationRef::Object { id } => id,
        }
    }
}

/// The request after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnRequest {
    pub model: String,
    pub input: Vec<Item>,
    pub instructions: Option<String>,
    pub previous_response_id: Option<String>,
    pub conversation: Option<String>,
    pub store: bool,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub metadata: BTreeMap<String, String>,
    pub stream: bool,
    pub background: bool,
}

impl ResponsesRequest {
    pub fn validate(self) -> Result<TurnRequest, ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid_request(
                Some("tools"),
                "Tools are not supported by this server.",
            ));
        }
        if self.previous_response_id.is_some() && self.conversation.is_some() {
            return Err(ApiError::invalid_request(
                Some("previous_response_id"),
                "Give `previous_response_id` or `conversation`, not both.",
            ));
        }
        let store = self.store.unwrap_or(true);
        let background = self.background.unwrap_or(false);
        if background && !store {
            return Err(ApiError::invalid_request(
                Some("store"),
                "A background response is stored; `store` cannot be false.",
            ));
        }
        if self.conversation.is_some() && !store {
            return Err(ApiError::invalid_request(
                Some("store"),
                "A response in a conversation is stored; `store` cannot be false.",
            ));
        }
        let input = match self.input {
            Input::Text(text) => vec![Item::new(ItemRole::User, text)],
            Input::Items(values) => parse_items(&values, "input")?,
        };
        if input.is_empty() {
            return Err(ApiError::invalid_request(
                Some("input"),
                "`input` must hold at least one item.",
            ));
        }
        let max_output_tokens = match self.max_output_tokens {
            None => None,
            Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => Some(n as u32),
            Some(_) => {
                return Err(ApiError::invalid_request(
                    Some("max_output_tokens"),
                    "`max_output_tokens` must be a positive integer.",
                ))
            }
        };
        let metadata = self.metadata.unwrap_or_default();
        check_metadata(&metadata)?;
        Ok(TurnRequest {
            model: self.model,
            input,
            instructions: self.instructions,
            previous_response_id: self.previous_response_id,
            conversation: self.conversation.map(|c| c.id().to_owned()),
            store,
            max_output_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            metadata,
            stream: self.stream,
            background,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ItemRole {
    User,
    Assistant,
    System,
    Developer,
}

impl ItemRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemRole::User => "user",
            ItemRole::Assistant => "assistant",
            ItemRole::System => "system",
            ItemRole::Developer => "developer",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "user" => ItemRole::User,
            "assistant" => ItemRole::Assistant,
            "system" => ItemRole::System,
            "developer" => ItemRole::Developer,
            _ => return None,
        })
    }
}

/// A message item: the one item type strata takes and keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub role: ItemRole,
    pub text: String,
    /// `incomplete` for an answer cut at `max_output_tokens`.
    pub status: &'static str,
}

impl Item {
    /// A new item with a fresh `msg_` id.
    pub fn new(role: ItemRole, text: String) -> Self {
        Item {
            id: new_id("msg"),
            role,
            text,
            status: "completed",
        }
    }

    /// As the API shows it: assistant text is `output_text`, the rest `input_text`.
    pub fn to_json(&self) -> Value {
        let part = match self.role {
            ItemRole::Assistant => {
                json!({"type": "output_text", "text": self.text, "annotations": [], "logprobs": []})
            }
            _ => json!({"type": "input_text", "text": self.text}),
        };
        json!({
            "id": self.id, "type": "message", "status": self.status,
            "role": self.role.as_str(), "content": [part],
        })
    }

    /// Reads back what `to_json` wrote (ids kept).
    pub fn from_json(v: &Value) -> Option<Item> {
        let mut item = parse_item(v, "item").ok()?;
        item.id = v["id"].as_str()?.to_owned();
        if v["status"] == "incomplete" {
            item.status = "incomplete";
        }
        Some(item)
    }

    /// The chat message the engine reads for this item.
    pub fn to_chat(&self) -> Value {
        let role = match self.role {
            ItemRole::Developer => "system",
            r => r.as_str(),
        };
        json!({"role": role, "content": self.text})
    }
}

/// New items from a request (`input`, or a conversation's `items`); each
/// gets a fresh id, whatever the client sent.
pub fn parse_items(values: &[Value], param: &str) -> Result<Vec<Item>, ApiError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| parse_item(v, &format!("{param}[{i}]")))
        .collect()
}

fn parse_item(v: &Value, param: &str) -> Result<Item, ApiError> {
    let bad = |field: &str, message: &str| {
        ApiError::invalid_request(Some(&format!("{param}{field}")), message.to_owned())
    };
    let obj = v
        .as_object()
        .ok_or_else(|| bad("", "An item must be an object."))?;
    match obj.get("type").map(|t| t.as_str()) {
        None | Some(Some("message")) => {}
        Some(_) => {
            return Err(bad(
                ".type",
                "Only items of type `message` are supported by this server.",
            ))
        }
    }
    let role = obj
        .get("role")
        .and_then(Value::as_str)
        .and_then(ItemRole::parse)
        .ok_or_else(|| {
            bad(
                ".role",
                "`role` must be one of user, assistant, system, developer.",
            )
        })?;
    let text =
        match obj.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    let kind = part["type"].as_str();
                    match (kind, part["text"].as_str()) {
                        (Some("input_text" | "output_text" | "text"), Some(t)) => text.push_str(t),
                        _ => return Err(bad(
                            &format!(".content[{j}]"),
                            "Only text content parts (`input_text`, `output_text`) are supported.",
                        )),
                    }
                }
                text
            }
            _ => {
                return Err(bad(
                    ".content",
                    "`content` must be a string or a list of text parts.",
                ))
            }
        };
    Ok(Item::new(role, text))
}

/// The chat messages for a turn: instructions first (as a system message),
/// then the context and the new input, in order.
pub fn chat_messages(instructions: Option<&str>, items: &[Item]) -> Vec<Value> {
    instructions
        .map(|i| json!({"role": "system", "content": i}))
        .into_iter()
        .chain(items.iter().map(Item::to_chat))
        .collect()
}

/// `resp_…`, `msg_…`, `conv_…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Everything about a response that is known before generation starts.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseMeta {
    pub id: String,
    pub created_at: i64,
    pub model: String,
    pub instructions: Option<String>,
    pub previous_response_id: Option<String>,
    pub conversation: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub metadata: BTreeMap<String, String>,
    pub store: bool,
    pub background: bool,
}

impl ResponseMeta {
    /// What `response_object` wrote of it, read back (a gateway taking
    /// over a background response reads it from the stored object).
    pub fn from_object(v: &Value) -> Option<ResponseMeta> {
        let text = |k: &str| v[k].as_str().map(str::to_owned);
        Some(ResponseMeta {
            id: text("id")?,
            created_at: v["created_at"].as_i64()?,
            model: text("model")?,
            instructions: text("instructions"),
            previous_response_id: text("previous_response_id"),
            conversation: v["conversation"]["id"].as_str().map(str::to_owned),
            max_output_tokens: v["max_output_tokens"]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok()),
            temperature: v["temperature"].as_f64(),
            top_p: v["top_p"].as_f64(),
            metadata: serde_json::from_value(v["metadata"].clone()).unwrap_or_default(),
            store: v["store"].as_bool().unwrap_or(true),
            background: v["background"].as_bool().unwrap_or(false),
        })
    }
}

/// Where a response stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A background response not yet sent to a replica.
    Queued,
    InProgress,
    Completed,
    /// Cut at `max_output_tokens`.
    Incomplete,
    /// A background response stopped by `POST /v1/responses/{id}/cancel`.
    Cancelled,
    Failed(ApiError),
}

impl Outcome {
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Queued => "queued",
            Outcome::InProgress => "in_progress",
            Outcome::Completed => "completed",
            Outcome::Incomplete => "incomplete",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// The response object as the API returns it.
pub fn response_object(
    meta: &ResponseMeta,
    outcome: &Outcome,
    output: &[Item],
    usage: Option<Usage>,
) -> Value {
    json!({
        "id": meta.id,
        "object": "response",
        "created_at": meta.created_at,
        "status": outcome.status(),
        "error": match outcome {
            Outcome::Failed(e) => json!({"code": e.code.unwrap_or(e.kind), "message": e.message}),
            _ => Value::Null,
        },
        "incomplete_details": match outcome {
            Outcome::Incomplete => json!({"reason": "max_output_tokens"}),
            _ => Value::Null,
        },
        "instructions": meta.instructions,
        "max_output_tokens": meta.max_output_tokens,
        "model": meta.model,
        "output": output.iter().map(Item::to_json).collect::<Vec<_>>(),
        "parallel_tool_calls": false,
        "previous_response_id": meta.previous_response_id,
        "conversation": meta.conversation.as_ref().map(|id| json!({"id": id})),
        "store": meta.store,
        "background": meta.background,
        "temperature": meta.temperature,
        "top_p": meta.top_p,
        "text": {"format": {"type": "text"}},
        "tool_choice": "none",
        "tools": [],
        "truncation": "disabled",
        "usage": usage.map(response_usage),
        "metadata": meta.metadata,
    })
}

fn response_usage(u: Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens()},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    })
}

/// Numbers the events of one streamed response and frames them as SSE.
#[derive(Debug, Default)]
pub struct EventWriter {
    next: u64,
}

impl EventWriter {
    /// The sequence number the next event gets.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Numbers the next event `n` or later: the events before it were
    /// sent already (by a gateway whose response this one took over).
    pub fn skip_to(&mut self, n: u64) {
        self.next = self.next.max(n);
    }

    /// `event: <kind>` and its data: `fields` plus `type` and `sequence_number`.
    pub fn event(&mut self, kind: &str, mut fields: Value) -> String {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.next);
        self.next += 1;
        format!("event: {kind}\ndata: {fields}\n\n")
    }
}

/// A page of a list, with OpenAI's cursor fields.
pub fn list_page(data: Vec<Value>, has_more: bool) -> Value {
    json!({
        "object": "list",
        "first_id": data.first().map(|v| v["id"].clone()),
        "last_id": data.last().map(|v| v["id"].clone()),
        "has_more": has_more,
        "data": data,
    })
}

/// A page of rows read one past `limit` (so that `has_more` is known
/// without another query): the first `limit` of them.
pub fn page_of(mut data: Vec<Value>, limit: u32) -> Value {
    let has_more = data.len() > limit as usize;
    data.truncate(limit as usize);
    list_page(data, has_more)
}

/// `after`, `limit` and `order` of a list route.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PageQuery {
    pub after: Option<String>,
    pub limit: Option<String>,
    pub order: Option<String>,
}

/// A checked page request: 1..=100 items (20 unless asked), newest first
/// unless `order=asc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub after: Option<String>,
    pub limit: u32,
    pub order: Order,
}

/// A list route's `limit`: 1 to 100, 20 when not given.
pub fn page_limit(limit: Option<&str>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(20),
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=100).contains(l))
            .ok_or_else(|| {
                ApiError::invalid_request(
                    Some("limit"),
                    "`limit` must be an integer from 1 to 100.",
                )
            }),
    }
}

impl PageQuery {
    pub fn validate(self) -> Result<PageRequest, ApiError> {
        let limit = page_limit(self.limit.as_deref())?;
        let order = match self.order.as_deref() {
            None | Some("desc") => Order::Desc,
            Some("asc") => Order::Asc,
            Some(_) => {
                return Err(ApiError::invalid_request(
                    Some("order"),
                    "`order` must be `asc` or `desc`.",
                ))
            }
        };
        Ok(PageRequest {
            after: self.after,
            limit,
            order,
        })
    }
}

impl PageRequest {
    /// This page of `all` (oldest first), and whether more follow.
    pub fn slice<T: Clone>(&self, all: &[T], id: impl Fn(&T) -> &str) -> (Vec<T>, bool) {
        let mut ordered: Vec<&T> = all.iter().collect();
        if self.order == Order::Desc {
            ordered.reverse();
        }
        let start = match &self.after {
            Some(after) => ordered
                .iter()
                .position(|t| id(t) == after)
                .map_or(ordered.len(), |i| i + 1),
            None => 0,
        };
        let rest = &ordered[start..];
        let page = rest
            .iter()
            .take(self.limit as usize)
            .map(|t| (*t).clone())
            .collect();
        (page, rest.len() > self.limit as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::parse_body;

    fn turn(body: &str) -> Result<TurnRequest, ApiError> {
        parse_body::<ResponsesRequest>(body.as_bytes())?.validate()
    }

    #[test]
    fn a_string_input_is_one_user_message_and_store_defaults_to_true() {
        let t = turn(r#"{"model":"m","input":"hi"}"#).unwrap();
        assert_eq!(t.input.len(), 1);
        assert_eq!(
            (t.input[0].role, t.input[0].text.as_str()),
            (ItemRole::User, "hi")
        );
        assert!(t.store && !t.stream);
        assert!(t.input[0].id.starts_with("msg_"));
    }

    #[test]
    fn items_take_text_parts_and_easy_messages() {
        let t = turn(
            r#"{"model":"m","input":[
                {"role":"developer","content":"be brief"},
                {"type":"message","role":"user","content":[{"type":"input_text","text":"a"},{"type":"input_text","text":"b"}]}],
                "conversation":{"id":"conv_1"}}"#,
        )
        .unwrap();
        assert_eq!(t.input[1].text, "ab");
        assert_eq!(t.conversation.as_deref(), Some("conv_1"));
        let chat = chat_messages(Some("sys"), &t.input);
        assert_eq!(chat[0], json!({"role": "system", "content": "sys"}));
        assert_eq!(chat[1], json!({"role": "system", "content": "be brief"}));
        assert_eq!(chat[2], json!({"role": "user", "content": "ab"}));
    }

    #[test]
    fn bad_requests_name_their_field() {
        let cases = [
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_image","image_url":"x"}]}]}"#,
                "input[0].content[0]",
            ),
            (
                r#"{"model":"m","input":[{"type":"function_call","name":"f"}]}"#,
                "input[0].type",
            ),
            (
                r#"{"model":"m","input":[{"role":"robot","content":"x"}]}"#,
                "input[0].role",
            ),
            (r#"{"model":"m","input":[]}"#, "input"),
            (
                r#"{"model":"m","input":"x","max_output_tokens":0}"#,
                "max_output_tokens",
            ),
            (
                r#"{"model":"m","input":"x","tools":[{"type":"web_search"}]}"#,
                "tools",
            ),
            (
                r#"{"model":"m","input":"x","conversation":"c","previous_response_id":"r"}"#,
                "previous_response_id",
            ),
            (
                r#"{"model":"m","input":"x","conversation":"c","store":false}"#,
                "store",
            ),
            (
                r#"{"model":"m","input":"x","background":true,"store":false}"#,
                "store",
            ),
        ];
        for (body, param) in cases {
            let e = turn(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn items_round_trip_through_their_json() {
        let item = Item::new(ItemRole::Assistant, "answer".into());
        let v = item.to_json();
        assert_eq!(v["content"][0]["type"], "output_text");
        assert_eq!(Item::from_json(&v), Some(item));
    }

    #[test]
    fn a_response_object_carries_usage_and_incomplete_details() {
        let meta = ResponseMeta {
            id: "resp_1".into(),
            created_at: 7,
            model: "m".into(),
            instructions: None,
            previous_response_id: None,
            conversation: Some("conv_1".into()),
            max_output_tokens: Some(4),
            temperature: None,
            top_p: None,
            metadata: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
            store: true,
            background: true,
        };
        let out = [Item::new(ItemRole::Assistant, "cut".into())];
        let v = response_object(
            &meta,
            &Outcome::Incomplete,
            &out,
            Some(Usage::new(10, 4).with_cached(6)),
        );
        assert_eq!(v["status"], "incomplete");
        assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 6);
        assert_eq!(v["usage"]["total_tokens"], 14);
        assert_eq!(v["conversation"]["id"], "conv_1");
        assert_eq!(v["background"], true);
        // A gateway taking the response over reads the same meta back.
        assert_eq!(ResponseMeta::from_object(&v), Some(meta.clone()));
        let queued = response_object(&meta, &Outcome::Queued, &[], None);
        assert_eq!(queued["status"], "queued");
        assert_eq!(
            response_object(&meta, &Outcome::Cancelled, &[], None)["status"],
            "cancelled"
        );
    }

    #[test]
    fn events_are_numbered_in_order() {
        let mut w = EventWriter::default();
        let a = w.event("response.created", json!({}));
        let b = w.event("response.output_text.delta", json!({"delta": "x"}));
        assert!(a.starts_with("event: response.created\ndata: "));
        assert!(a.contains("\"sequence_number\":0") && b.contains("\"sequence_number\":1"));
    }

    #[test]
    fn pages_follow_the_cursor_in_either_order() {
        let all = ["a", "b", "c", "d"];
        let q = |after: Option<&str>, limit, ascending: bool| PageRequest {
            after: after.map(str::to_owned),
            limit,
            order: if ascending { Order::Asc } else { Order::Desc },
        };
        assert_eq!(q(None, 2, false).slice(&all, |s| s), (vec!["d", "c"], true));
        assert_eq!(
            q(Some("c"), 2, false).slice(&all, |s| s),
            (vec!["b", "a"], false)
        );
        assert_eq!(
            q(Some("b"), 5, true).slice(&all, |s| s),
            (vec!["c", "d"], false)
        );
        assert_eq!(q(Some("zz"), 5, true).slice(&all, |s| s), (vec![], false));
        let e = PageQuery {
            order: Some("up".into()),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("order"));
    }
}
