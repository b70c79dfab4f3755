//! Legacy completions (`/v1/completions`) expressed as chat, for upstreams that only speak
//! chat: the prompt becomes one user message, and the answer's text comes back as `text`.

use crate::openai::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage,
    CompletionChoice, CompletionRequest, CompletionResponse, Extra, Role,
};

/// The chat request that asks for the same completion.
pub fn completion_to_chat(request: &CompletionRequest) -> ChatCompletionRequest {
    ChatCompletionRequest {
        model: request.model.clone(),
        messages: vec![ChatMessage::text(Role::User, request.prompt.joined_text())],
        stream: request.stream,
        stream_options: request.stream_options.clone(),
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        stop: request.stop.clone(),
        user: request.user.clone(),
        ..ChatCompletionRequest::default()
    }
}

/// A chat answer re-shaped as a `text_completion`.
pub fn chat_to_completion(response: ChatCompletionResponse) -> CompletionResponse {
    CompletionResponse {
        id: response.id,
        object: "text_completion".to_owned(),
        created: response.created,
        model: response.model,
        choices: response
            .choices
            .into_iter()
            .map(|c| CompletionChoice {
                text: c.message.content.unwrap_or_default(),
                index: c.index,
                logprobs: None,
                finish_reason: c.finish_reason,
            })
            .collect(),
        usage: response.usage,
        extra: Extra::new(),
    }
}

/// A chat stream chunk re-shaped as a streamed `text_completion` chunk.
pub fn chat_chunk_to_completion(chunk: ChatCompletionChunk) -> CompletionResponse {
    CompletionResponse {
        id: chunk.id,
        object: "text_completion".to_owned(),
        created: chunk.created,
        model: chunk.model,
        choices: chunk
            .choices
            .into_iter()
            .map(|c| CompletionChoice {
                text: c.delta.content.unwrap_or_default(),
                index: c.index,
                logprobs: None,
                finish_reason: c.finish_reason,
            })
            .collect(),
        usage: chunk.usage,
        extra: Extra::new(),
    }
}
