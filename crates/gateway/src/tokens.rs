//! Token counting with a real tokenizer (`o200k_base`), for when an upstream reports no usage:
//! the prompt and streamed completion are counted so that every stream still ends with usage.

use marga_protocol::openai::{ChatCompletionRequest, MessageContent};

/// Tokens of a text.
pub fn count(text: &str) -> u64 {
    tiktoken_rs::o200k_base_singleton().encode_with_special_tokens(text).len() as u64
}

/// Estimated prompt tokens of a chat request (OpenAI's accounting: 3 per message + 3).
pub fn prompt_tokens(request: &ChatCompletionRequest) -> u64 {
    let per_message: u64 = request
        .messages
        .iter()
        .map(|m| {
            let text = match &m.content {
                Some(MessageContent::Text(s)) => count(s),
                Some(parts @ MessageContent::Parts(_)) => count(&parts.joined_text()),
                None => 0,
            };
            let calls = m.tool_calls.as_ref().map_or(0, |calls| {
                calls.iter().map(|c| count(&c.function.name) + count(&c.function.arguments)).sum()
            });
            3 + text + calls
        })
        .sum();
    per_message + 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_a_real_tokenizer() {
        assert_eq!(count(""), 0);
        assert_eq!(count("hello world"), 2);
        assert!(count("The quick brown fox jumps over the lazy dog.") >= 9);
    }
}
