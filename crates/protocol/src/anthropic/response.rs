//! Anthropic Messages response → OpenAI chat completion, and the stop reason and usage
//! mappings the stream translator shares.

use serde_json::Value;

use super::types::{ContentBlock, MessagesResponse, StopReason};
use crate::openai::{
    AssistantMessage, ChatChoice, ChatCompletionResponse, Extra, FinishReason, FunctionCall, PromptTokensDetails, Role,
    ToolCall, Usage,
};

/// The chat completion equivalent to `resp`. `created` is the unix time to stamp it with (this
/// crate has no clock). Text blocks are joined into `content`, `tool_use` blocks become
/// `tool_calls`, thinking blocks are joined into `message.reasoning`.
pub fn from_messages_response(resp: MessagesResponse, created: u64) -> ChatCompletionResponse {
    let message = assistant_message(resp.content);
    let usage = openai_usage(
        resp.usage.input_tokens,
        resp.usage.output_tokens,
        resp.usage.cache_creation_input_tokens.unwrap_or(0),
        resp.usage.cache_read_input_tokens.unwrap_or(0),
    );
    ChatCompletionResponse {
        id: resp.id,
        object: "chat.completion".to_owned(),
        created,
        model: resp.model,
        choices: vec![ChatChoice {
            index: 0,
            message,
            finish_reason: resp.stop_reason.as_ref().map(finish_reason),
            logprobs: None,
            extra: Extra::new(),
        }],
        usage: Some(usage),
        extra: Extra::new(),
    }
}

/// The content blocks as one assistant message.
fn assistant_message(content: Vec<ContentBlock>) -> AssistantMessage {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    let mut has_text = false;
    for block in content {
        match block {
            ContentBlock::Text { text: t } => {
                text.push_str(&t);
                has_text = true;
            }
            ContentBlock::ToolUse { id, name, input } => tool_calls.push(tool_call(id, name, &input)),
            ContentBlock::Thinking { thinking, .. } => reasoning.push_str(&thinking),
            _ => {}
        }
    }
    let mut extra = Extra::new();
    if !reasoning.is_empty() {
        extra.insert("reasoning".to_owned(), Value::String(reasoning));
    }
    AssistantMessage {
        role: Role::Assistant,
        // OpenAI sends `null` content beside tool calls, and "" for an empty answer.
        content: (has_text || tool_calls.is_empty()).then_some(text),
        tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
        refusal: None,
        extra,
    }
}

fn tool_call(id: String, name: String, input: &Value) -> ToolCall {
    let arguments = match input {
        Value::Null => "{}".to_owned(),
        other => other.to_string(),
    };
    ToolCall { id, kind: "function".to_owned(), function: FunctionCall { name, arguments } }
}

/// `end_turn`, `stop_sequence`, `pause_turn` → stop; `max_tokens` → length; `tool_use` →
/// tool_calls; `refusal` → content_filter; anything else is kept verbatim.
pub fn finish_reason(reason: &StopReason) -> FinishReason {
    match reason {
        StopReason::EndTurn | StopReason::StopSequence | StopReason::PauseTurn => FinishReason::Stop,
        StopReason::MaxTokens => FinishReason::Length,
        StopReason::ToolUse => FinishReason::ToolCalls,
        StopReason::Refusal => FinishReason::ContentFilter,
        StopReason::Other(other) => FinishReason::Other(other.clone()),
    }
}

/// OpenAI usage from Anthropic counts: Anthropic's `input_tokens` excludes cached tokens, so
/// `prompt_tokens` adds cache writes and cache reads back; `cached_tokens` is the cache reads.
pub fn openai_usage(input: u64, output: u64, cache_creation: u64, cache_read: u64) -> Usage {
    let prompt = input.saturating_add(cache_creation).saturating_add(cache_read);
    Usage {
        prompt_tokens: prompt,
        completion_tokens: output,
        // Saturating: upstream counts are untrusted and `Usage::new` would overflow.
        total_tokens: prompt.saturating_add(output),
        prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: Some(cache_read), extra: Extra::new() }),
        ..Usage::default()
    }
}
