//! The built-in Gemma chat template, used when a GGUF carries none (the
//! Gemma 3 270M base model does not). Gemma has no system role: system text
//! is folded into the first user turn, as Google's own template does.

use crate::openai::{Role, Turn};

/// Renders a conversation for Gemma and opens the model's turn. The BOS token
/// is not included: the tokenizer adds it.
pub fn render_gemma(turns: &[Turn]) -> String {
    let mut system = String::new();
    for t in turns.iter().filter(|t| t.role == Role::System) {
        if !system.is_empty() {
            system.push_str("\n\n");
        }
        system.push_str(&t.text);
    }
    let mut out = String::new();
    let mut system_pending = !system.is_empty();
    for t in turns.iter().filter(|t| t.role != Role::System) {
        let speaker = match t.role {
            Role::Assistant => "model",
            _ => "user",
        };
        out.push_str("<start_of_turn>");
        out.push_str(speaker);
        out.push('\n');
        if system_pending && t.role == Role::User {
            out.push_str(&system);
            out.push_str("\n\n");
            system_pending = false;
        }
        out.push_str(t.text.trim());
        out.push_str("<end_of_turn>\n");
    }
    out.push_str("<start_of_turn>model\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: Role, text: &str) -> Turn {
        Turn {
            role,
            text: text.into(),
        }
    }

    #[test]
    fn one_user_turn_opens_the_model_turn() {
        assert_eq!(
            render_gemma(&[turn(Role::User, "Hello")]),
            "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn system_text_folds_into_the_first_user_turn_and_assistant_is_model() {
        let text = render_gemma(&[
            turn(Role::System, "Be brief."),
            turn(Role::User, "Hi"),
            turn(Role::Assistant, "Hello!"),
            turn(Role::User, " And? "),
        ]);
        assert_eq!(
            text,
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
             <start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nAnd?<end_of_turn>\n\
             <start_of_turn>model\n"
        );
    }
}
