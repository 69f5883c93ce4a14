//! The Batch API's formats, pure: an input file's lines checked like the
//! requests they name, the batch object with OpenAI's statuses, and the
//! lines of the output and error files.

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::openai::{check_metadata, parse_body, ChatCompletionRequest, CompletionRequest};
use crate::responses::ResponsesRequest;

/// The endpoints a batch's lines may call.
pub const ENDPOINTS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/responses"];

/// The one completion window there is (OpenAI's).
pub const WINDOW: &str = "24h";
pub const WINDOW_MS: i64 = 24 * 3600 * 1000;

/// Most lines one input file may hold (OpenAI's figure).
pub const MAX_LINES: usize = 50_000;

/// One request of an input file, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub custom_id: String,
    pub url: String,
    pub model: String,
    /// The request body as given.
    pub body: Value,
}

/// What is wrong with one line (numbered from 1, as editors do).
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    custom_id: String,
    method: String,
    url: String,
    body: Value,
}

/// Checks one line like the endpoint it names checks a request.
fn check_line(text: &str) -> Result<Line, String> {
    let raw: RawLine =
        serde_json::from_str(text).map_err(|e| format!("not a batch request line: {e}"))?;
    if raw.custom_id.is_empty() || raw.custom_id.len() > 512 {
        return Err("`custom_id` must be 1 to 512 characters.".into());
    }
    if raw.method != "POST" {
        return Err(format!("`method` must be POST, not `{}`.", raw.method));
    }
    let bytes = serde_json::to_vec(&raw.body).expect("JSON values serialise");
    let why = |e: ApiError| e.message;
    let (model, stream) = match raw.url.as_str() {
        "/v1/chat/completions" => {
            let g = parse_body::<ChatCompletionRequest>(&bytes)
                .and_then(|r| r.validate())
                .map_err(why)?;
            (g.model, g.stream)
        }
        "/v1/completions" => {
            let g = parse_body::<CompletionRequest>(&bytes)
                .and_then(|r| r.validate())
                .map_err(why)?;
            (g.model, g.stream)
        }
        "/v1/responses" => {
            let t = parse_body::<ResponsesRequest>(&bytes)
                .and_then(|r| r.validate())
                .map_err(why)?;
            (t.model, t.stream)
        }
        other => {
            return Err(format!(
                "`url` must be one of {}, not `{other}`.",
                ENDPOINTS.join(", ")
            ))
        }
    };
    if stream {
        return Err("a batch request cannot stream (`stream` must be false).".into());
    }
    Ok(Line {
        custom_id: raw.custom_id,
        url: raw.url,
        model,
        body: raw.body,
    })
}

/// Reads an input file: every line checked, `custom_id`s unique. All the
/// errors (the first 100) when any line is wrong.
pub fn parse_input(bytes: &[u8]) -> Result<Vec<Line>, Vec<LineError>> {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            return Err(vec![LineError {
                line: 1 + bytes[..e.valid_up_to()]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count(),
                message: "the file is not UTF-8 text".into(),
            }])
        }
    };
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (i, text) in text.lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        match check_line(text) {
            Ok(l) if !seen.insert(l.custom_id.clone()) => errors.push(LineError {
                line: i + 1,
                message: format!("`custom_id` `{}` is used twice.", l.custom_id),
            }),
            Ok(l) => lines.push(l),
            Err(message) => errors.push(LineError {
                line: i + 1,
                message,
            }),
        }
        if errors.len() >= 100 {
            break;
        }
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push(LineError {
            line: 1,
            message: "the file holds no requests".into(),
        });
    }
    if lines.len() > MAX_LINES {
        errors.push(LineError {
            line: MAX_LINES + 1,
            message: format!("a batch file holds at most {MAX_LINES} requests"),
        });
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

/// The errors of a file as one 400, the first few spelled out.
pub fn input_error(errors: &[LineError]) -> ApiError {
    let shown: Vec<String> = errors
        .iter()
        .take(5)
        .map(|e| format!("line {}: {}", e.line, e.message))
        .collect();
    let more = errors.len().saturating_sub(5);
    let tail = if more > 0 {
        format!(" (and {more} more)")
    } else {
        String::new()
    };
    ApiError::invalid_request(
        Some("file"),
        format!(
            "The file is not a valid batch input: {}{tail}",
            shown.join("; ")
        ),
    )
}

/// What `POST /v1/batches` takes.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

impl CreateBatch {
    pub fn validate(&self) -> Result<(), ApiError> {
        if !ENDPOINTS.contains(&self.endpoint.as_str()) {
            return Err(ApiError::invalid_request(
                Some("endpoint"),
                format!("`endpoint` must be one of {}.", ENDPOINTS.join(", ")),
            ));
        }
        if self.completion_window != WINDOW {
            return Err(ApiError::invalid_request(
                Some("completion_window"),
                format!("`completion_window` must be `{WINDOW}`."),
            ));
        }
        if let Some(m) = &self.metadata {
            check_metadata(m)?;
        }
        Ok(())
    }

    /// The lines must all call this batch's endpoint and one model.
    pub fn check_lines(&self, lines: &[Line]) -> Result<(), ApiError> {
        if let Some(l) = lines.iter().find(|l| l.url != self.endpoint) {
            return Err(ApiError::invalid_request(
                Some("endpoint"),
                format!(
                    "The request `{}` calls `{}`, not the batch's endpoint `{}`.",
                    l.custom_id, l.url, self.endpoint
                ),
            ));
        }
        if let Some(l) = lines.iter().find(|l| l.model != lines[0].model) {
            return Err(ApiError::invalid_request(
                Some("input_file_id"),
                format!(
                    "Every request of a batch names the same model: `{}` names `{}`, the first `{}`.",
                    l.custom_id, l.model, lines[0].model
                ),
            ));
        }
        Ok(())
    }
}

/// A batch's status, as OpenAI names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::Validating,
            Status::InProgress,
            Status::Finalizing,
            Status::Completed,
            Status::Failed,
            Status::Expired,
            Status::Cancelling,
            Status::Cancelled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    /// Nothing more happens to the batch.
    pub fn ended(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Failed | Status::Expired | Status::Cancelled
        )
    }

    /// The batch object's timestamp field for entering this status.
    pub fn timestamp_field(self) -> &'static str {
        match self {
            Status::Validating => "created_at",
            Status::InProgress => "in_progress_at",
            Status::Finalizing => "finalizing_at",
            Status::Completed => "completed_at",
            Status::Failed => "failed_at",
            Status::Expired => "expired_at",
            Status::Cancelling => "cancelling_at",
            Status::Cancelled => "cancelled_at",
        }
    }
}

/// A new batch object (status `validating`).
pub fn batch_object(
    id: &str,
    req: &CreateBatch,
    model: &str,
    total: usize,
    created_at: i64,
) -> Value {
    json!({
        "id": id,
        "object": "batch",
        "endpoint": req.endpoint,
        "model": model,
        "errors": null,
        "input_file_id": req.input_file_id,
        "completion_window": req.completion_window,
        "status": Status::Validating.as_str(),
        "output_file_id": null,
        "error_file_id": null,
        "created_at": created_at,
        "in_progress_at": null,
        "expires_at": created_at + WINDOW_MS / 1000,
        "finalizing_at": null,
        "completed_at": null,
        "failed_at": null,
        "expired_at": null,
        "cancelling_at": null,
        "cancelled_at": null,
        "request_counts": {"total": total, "completed": 0, "failed": 0},
        "metadata": req.metadata.clone().unwrap_or_default(),
    })
}

/// `batch` moved to `status` at `at` (unix seconds).
pub fn set_status(batch: &mut Value, status: Status, at: i64) {
    batch["status"] = json!(status.as_str());
    batch[status.timestamp_field()] = json!(at);
}

/// An output-file line: the response a request got (`status` 2xx), or an
/// error-file line with the error response it got.
pub fn result_line(id: &str, custom_id: &str, status: u16, request_id: &str, body: Value) -> Value {
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": null,
    })
}

/// An error-file line for a request that got no response (expired,
/// cancelled before it ran).
pub fn failed_line(id: &str, custom_id: &str, code: &str, message: &str) -> Value {
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
}

/// How a running batch goes: what it has left and what its finished lines
/// cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    pub lines_left: u64,
    /// Lines finished in this run, and their tokens (prompt + output).
    pub finished: u64,
    pub finished_tokens: u64,
    /// When its window ends (Unix milliseconds).
    pub deadline_ms: i64,
    /// Tokens a second its batch token limit lets it use (`None`: no limit).
    pub cap_per_s: Option<f64>,
}

impl Pace {
    /// Tokens a second the batch needs from `now_ms` on to end within its
    /// window: its lines left at its finished lines' mean size, over the
    /// seconds left; never more than its limit lets it use (replicas
    /// beyond that would not make it faster). Zero until a line has
    /// finished (its size is not known) and once the window is over.
    pub fn needed_per_s(&self, now_ms: i64) -> f64 {
        let secs_left = (self.deadline_ms - now_ms) as f64 / 1000.0;
        if secs_left <= 0.0 {
            return 0.0;
        }
        let needed = self.backlog_tokens() / secs_left.max(1.0);
        self.cap_per_s.map_or(needed, |cap| needed.min(cap))
    }

    /// Tokens its lines left will take, at its finished lines' mean size;
    /// zero until a line has finished.
    pub fn backlog_tokens(&self) -> f64 {
        if self.finished == 0 {
            return 0.0;
        }
        self.lines_left as f64 * self.finished_tokens as f64 / self.finished as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(id: &str) -> String {
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}})
        .to_string()
    }

    #[test]
    fn a_good_file_reads_in_order() {
        let file = format!("{}\n{}\n\n", chat("a"), chat("b"));
        let lines = parse_input(file.as_bytes()).unwrap();
        let ids: Vec<_> = lines.iter().map(|l| l.custom_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(lines[0].model, "m");
    }

    #[test]
    fn each_bad_line_is_named_with_its_number() {
        let bad_body = json!({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                              "body": {"model": "m", "messages": []}})
        .to_string();
        let streams = json!({"custom_id": "d", "method": "POST", "url": "/v1/completions",
                             "body": {"model": "m", "prompt": "x", "stream": true}})
        .to_string();
        let file = [
            chat("a"),
            "not json".into(),
            chat("a"),
            bad_body,
            streams,
            json!({"custom_id": "e", "method": "GET", "url": "/v1/completions", "body": {}})
                .to_string(),
            json!({"custom_id": "f", "method": "POST", "url": "/v1/embeddings", "body": {}})
                .to_string(),
        ]
        .join("\n");
        let errors = parse_input(file.as_bytes()).unwrap_err();
        let lines: Vec<_> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7], "{errors:?}");
        assert!(errors[1].message.contains("used twice"));
        assert!(errors[3].message.contains("stream"));
        assert!(errors[5].message.contains("/v1/embeddings"));
        let e = input_error(&errors);
        assert_eq!(e.status, 400);
        assert!(e.message.contains("line 2:") && e.message.contains("(and 1 more)"));
    }

    #[test]
    fn an_empty_file_is_refused() {
        assert!(parse_input(b"\n\n").is_err());
        assert!(parse_input(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn a_batch_calls_one_endpoint_and_one_model() {
        let req = CreateBatch {
            input_file_id: "file_1".into(),
            endpoint: "/v1/completions".into(),
            completion_window: "24h".into(),
            metadata: None,
        };
        req.validate().unwrap();
        let lines = parse_input(format!("{}\n", chat("a")).as_bytes()).unwrap();
        assert_eq!(req.check_lines(&lines).unwrap_err().status, 400);
        let bad = CreateBatch {
            completion_window: "1h".into(),
            ..req.clone()
        };
        assert_eq!(
            bad.validate().unwrap_err().param.as_deref(),
            Some("completion_window")
        );
    }

    #[test]
    fn statuses_round_trip_and_end() {
        for s in [
            "validating",
            "in_progress",
            "finalizing",
            "completed",
            "failed",
            "expired",
            "cancelling",
            "cancelled",
        ] {
            assert_eq!(Status::parse(s).unwrap().as_str(), s);
        }
        assert!(Status::Cancelled.ended() && !Status::Cancelling.ended());
        let mut b = json!({});
        set_status(&mut b, Status::Completed, 7);
        assert_eq!(b["completed_at"], 7);
    }

    #[test]
    fn a_batch_needs_its_lines_left_over_the_time_left_at_most_its_limit() {
        let pace = Pace {
            lines_left: 1_000,
            finished: 10,
            finished_tokens: 2_000,
            deadline_ms: 100_000,
            cap_per_s: None,
        };
        // 1,000 lines of 200 tokens in 100 s: 2,000 tokens a second.
        assert_eq!(pace.backlog_tokens(), 200_000.0);
        assert_eq!(pace.needed_per_s(0), 2_000.0);
        // Half the time left: twice as fast.
        assert_eq!(pace.needed_per_s(50_000), 4_000.0);
        // Its own limit caps what more replicas could give it.
        let capped = Pace {
            cap_per_s: Some(500.0),
            ..pace
        };
        assert_eq!(capped.needed_per_s(0), 500.0);
        // Nothing known yet, nothing left, or too late: no need.
        for p in [
            Pace {
                finished: 0,
                ..pace
            },
            Pace {
                lines_left: 0,
                ..pace
            },
        ] {
            assert_eq!(p.needed_per_s(0), 0.0);
            assert_eq!(p.backlog_tokens(), 0.0);
        }
        assert_eq!(pace.needed_per_s(100_000), 0.0);
    }
}
