//! When a replica fails in the middle of an answer, the rest of it is asked
//! of another: how (`continued`: the text so far as an open assistant
//! message or the end of the prompt), how often (`Moves`: while it makes
//! progress), and how the finished answer's usage is counted.

use std::time::Duration;

use serde_json::Value;
use strata_core::openai::Usage;
use strata_core::ApiError;

/// Moves an answer may make to another replica after the one serving it
/// fails mid-stream, however well it goes.
pub const MAX_MOVES: u32 = 8;
/// Moves in a row that brought no new token, after which the answer is not
/// moved again: a request that itself brings replicas down stops there.
pub const MAX_STALLED_MOVES: u32 = 3;
/// How long a resumption waits for a replica to take the rest of an answer.
pub const RESUME_WAIT: Duration = Duration::from_secs(30);

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

/// What the client hears when its replica failed mid-answer and its
/// engine cannot continue an answer (no `continue_final_message`).
pub fn cannot_continue() -> ApiError {
    ApiError::bad_gateway(
        "The replica failed mid-answer, and this model's engine cannot continue an answer on another replica; ask again.",
    )
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
