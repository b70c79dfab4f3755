//! Gemini `generateContent` response → OpenAI chat completion, plus the pieces the stream
//! translator shares: splitting parts, finish reasons and usage.
//!
//! * One choice per candidate. Text parts are joined into `content`; reasoning parts
//!   (`thought: true`) into `message.reasoning` (an extra field, as OpenRouter and vLLM spell it);
//!   `functionCall` parts become `tool_calls` with the part's id or `call_<n>` (n counting the
//!   candidate's calls from 0).
//! * Finish reasons: `STOP` → `stop` (`tool_calls` when the candidate called functions),
//!   `MAX_TOKENS` → `length`, the safety family → `content_filter`, anything else → itself in
//!   lower case.
//! * Usage: completion tokens include reasoning (`thoughtsTokenCount`), as OpenAI counts them.
//! * A prompt refused outright (no candidates, `promptFeedback.blockReason`) becomes one empty
//!   choice finished by `content_filter`.

use serde_json::Value;

use super::types::{Candidate, GenerateContentResponse, Part, PromptFeedback, UsageMetadata};
use super::PROTOCOL;
use crate::error::ConvertError;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatCompletionResponse, CompletionTokensDetails, Extra, FinishReason, FunctionCall,
    PromptTokensDetails, Role, ToolCall, Usage,
};

/// The OpenAI chat completion for a Gemini answer. `id` and `created` are the caller's (Gemini
/// sends neither in a usable form); `model` is the name to report.
pub fn from_generate_content(
    resp: GenerateContentResponse,
    model: &str,
    created: u64,
    id: String,
) -> Result<ChatCompletionResponse, ConvertError> {
    let mut choices: Vec<ChatChoice> =
        resp.candidates.into_iter().enumerate().map(|(position, c)| choice(c, position)).collect();
    if choices.is_empty() {
        if !is_blocked(resp.prompt_feedback.as_ref()) {
            let source = <serde_json::Error as serde::de::Error>::custom("response has no candidates");
            return Err(ConvertError::Malformed { protocol: PROTOCOL, source });
        }
        choices.push(blocked_choice());
    }
    Ok(ChatCompletionResponse {
        id,
        object: "chat.completion".to_owned(),
        created,
        model: model.to_owned(),
        choices,
        usage: resp.usage_metadata.as_ref().map(usage),
        extra: Extra::new(),
    })
}

fn choice(candidate: Candidate, position: usize) -> ChatChoice {
    let index = candidate.index.unwrap_or(u32::try_from(position).unwrap_or(u32::MAX));
    let pieces = Pieces::split(candidate.content.map(|c| c.parts).unwrap_or_default(), 0);
    let has_calls = !pieces.tool_calls.is_empty();
    let mut extra = Extra::new();
    if !pieces.reasoning.is_empty() {
        extra.insert("reasoning".to_owned(), Value::String(pieces.reasoning));
    }
    let message = AssistantMessage {
        role: Role::Assistant,
        content: (!pieces.text.is_empty() || !has_calls).then_some(pieces.text),
        tool_calls: has_calls.then_some(pieces.tool_calls),
        refusal: None,
        extra,
    };
    let finish_reason = match candidate.finish_reason.as_deref() {
        Some(reason) => Some(finish_reason(reason, has_calls)),
        None => has_calls.then_some(FinishReason::ToolCalls),
    };
    ChatChoice { index, message, finish_reason, logprobs: None, extra: Extra::new() }
}

/// True when Gemini refused the prompt itself.
pub(super) fn is_blocked(feedback: Option<&PromptFeedback>) -> bool {
    feedback.is_some_and(|f| f.block_reason.is_some())
}

fn blocked_choice() -> ChatChoice {
    ChatChoice {
        index: 0,
        message: AssistantMessage { content: Some(String::new()), ..AssistantMessage::default() },
        finish_reason: Some(FinishReason::ContentFilter),
        logprobs: None,
        extra: Extra::new(),
    }
}

/// What a candidate's parts say, sorted by kind.
#[derive(Debug, Default)]
pub(super) struct Pieces {
    pub text: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
}

impl Pieces {
    /// Splits `parts`; generated call ids count on from `first_call` (`call_<n>`).
    pub(super) fn split(parts: Vec<Part>, first_call: u32) -> Pieces {
        let mut pieces = Pieces::default();
        for part in parts {
            if let Some(call) = part.function_call {
                let n = first_call.saturating_add(u32::try_from(pieces.tool_calls.len()).unwrap_or(u32::MAX));
                let arguments = call.args.as_ref().map_or_else(|| "{}".to_owned(), Value::to_string);
                pieces.tool_calls.push(ToolCall {
                    id: call.id.unwrap_or_else(|| format!("call_{n}")),
                    kind: "function".to_owned(),
                    function: FunctionCall { name: call.name, arguments },
                });
            } else if let Some(text) = part.text {
                let target = if part.thought == Some(true) { &mut pieces.reasoning } else { &mut pieces.text };
                target.push_str(&text);
            }
        }
        pieces
    }
}

/// A Gemini finish reason in OpenAI terms; `STOP` after function calls is `tool_calls`.
pub(super) fn finish_reason(reason: &str, has_calls: bool) -> FinishReason {
    match reason {
        "STOP" if has_calls => FinishReason::ToolCalls,
        "STOP" => FinishReason::Stop,
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_ascii_lowercase()),
    }
}

/// Gemini usage in OpenAI terms: reasoning tokens count as completion tokens.
pub(super) fn usage(meta: &UsageMetadata) -> Usage {
    let prompt = meta.prompt_token_count.unwrap_or(0);
    let thoughts = meta.thoughts_token_count;
    let completion = meta.candidates_token_count.unwrap_or(0).saturating_add(thoughts.unwrap_or(0));
    let mut usage = Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt.saturating_add(completion),
        ..Usage::default()
    };
    if let Some(cached) = meta.cached_content_token_count {
        usage.prompt_tokens_details = Some(PromptTokensDetails { cached_tokens: Some(cached), extra: Extra::new() });
    }
    if let Some(reasoning) = thoughts {
        usage.completion_tokens_details =
            Some(CompletionTokensDetails { reasoning_tokens: Some(reasoning), extra: Extra::new() });
    }
    usage
}
