//! The built-in `sandbox` provider: SIMULATED answers generated locally, so that a fresh
//! install answers `curl` with no keys and no network. No language model is involved: the
//! reply restates the last user message, tokens are counted as whitespace-separated words, and
//! embeddings are a deterministic hash of the text.

use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use marga_protocol::openai::{
    AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatMessage, ChunkChoice, ChunkDelta, Embedding, EmbeddingRequest,
    EmbeddingResponse, EmbeddingVector, Extra, FinishReason, FunctionCall, Role, ToolCall, ToolChoice, Usage,
};
use sha2::{Digest, Sha256};

use marga_protocol::answer::ChatAnswer;
use marga_protocol::relayed::ChatChunk;

use crate::{BoxFuture, Call, ChunkStream, Provider, ProviderError, ProviderKind};

/// Default embedding width of `sandbox/embed`.
const EMBEDDING_DIMENSIONS: usize = 256;

#[derive(Default)]
pub struct SandboxProvider;

impl SandboxProvider {
    pub fn new() -> Self {
        SandboxProvider
    }
}

/// What the sandbox answers to a conversation.
struct Answer {
    text: Option<String>,
    tool_call: Option<ToolCall>,
    usage: Usage,
}

fn answer(request: &ChatCompletionRequest) -> Answer {
    let prompt_tokens = request.messages.iter().map(|m| words(&m.text_content()) + 1).sum::<u64>();
    let last = request.messages.last();
    let tool = chosen_tool(request).filter(|_| last.is_some_and(|m| m.role == Role::User));
    if let Some(name) = tool {
        let call = ToolCall {
            id: "call_sandbox_1".to_owned(),
            kind: "function".to_owned(),
            function: FunctionCall { name, arguments: "{}".to_owned() },
        };
        return Answer { text: None, tool_call: Some(call), usage: Usage::new(prompt_tokens, 5) };
    }
    let text = reply_text(request, last);
    let completion = words(&text);
    Answer { text: Some(text), tool_call: None, usage: Usage::new(prompt_tokens, completion) }
}

/// The tool the sandbox calls: the one `tool_choice` names, else the first declared one, none
/// when no tools are declared or `tool_choice` is `"none"`.
fn chosen_tool(request: &ChatCompletionRequest) -> Option<String> {
    let first = request.tools.as_ref()?.first()?;
    match &request.tool_choice {
        Some(ToolChoice::Mode(mode)) if mode == "none" => None,
        Some(ToolChoice::Named(named)) => Some(named.function.name.clone()),
        _ => Some(first.function.name.clone()),
    }
}

fn reply_text(request: &ChatCompletionRequest, last: Option<&ChatMessage>) -> String {
    let said: String = last.map(ChatMessage::text_content).unwrap_or_default().chars().take(200).collect();
    let json = request.response_format.as_ref().is_some_and(|f| f.kind != "text");
    if json {
        serde_json::json!({ "sandbox": true, "echo": said }).to_string()
    } else {
        format!("[sandbox: simulated reply, no model was called] You said: {said}")
    }
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn response(request: &ChatCompletionRequest, model: &str) -> ChatCompletionResponse {
    let answer = answer(request);
    let finish = if answer.tool_call.is_some() { FinishReason::ToolCalls } else { FinishReason::Stop };
    let message = AssistantMessage {
        role: Role::Assistant,
        content: answer.text,
        tool_calls: answer.tool_call.map(|c| vec![c]),
        refusal: None,
        extra: Extra::new(),
    };
    ChatCompletionResponse {
        id: format!("chatcmpl-sandbox-{}", now()),
        object: "chat.completion".to_owned(),
        created: now(),
        model: model.to_owned(),
        choices: vec![ChatChoice { index: 0, message, finish_reason: Some(finish), logprobs: None, extra: Extra::new() }],
        usage: Some(answer.usage),
        extra: Extra::new(),
    }
}

fn chunk(model: &str, delta: ChunkDelta, finish: Option<FinishReason>, usage: Option<Usage>) -> ChatCompletionChunk {
    let choices = if usage.is_some() {
        Vec::new()
    } else {
        vec![ChunkChoice { index: 0, delta, finish_reason: finish, logprobs: None, extra: Extra::new() }]
    };
    ChatCompletionChunk {
        id: "chatcmpl-sandbox".to_owned(),
        object: "chat.completion.chunk".to_owned(),
        created: now(),
        model: model.to_owned(),
        choices,
        usage,
        extra: Extra::new(),
    }
}

/// The stream of a sandbox answer: role prelude, one chunk per word, finish, usage.
fn stream_chunks(request: &ChatCompletionRequest, model: &str) -> Vec<ChatCompletionChunk> {
    let full = response(request, model);
    let Some(choice) = full.choices.into_iter().next() else { return Vec::new() };
    let role = ChunkDelta { role: Some(Role::Assistant), content: Some(String::new()), ..ChunkDelta::default() };
    let mut chunks = vec![chunk(model, role, None, None)];
    let text = choice.message.content.unwrap_or_default();
    for (i, word) in text.split(' ').enumerate() {
        let piece = if i == 0 { word.to_owned() } else { format!(" {word}") };
        chunks.push(chunk(model, ChunkDelta { content: Some(piece), ..ChunkDelta::default() }, None, None));
    }
    if let Some(calls) = choice.message.tool_calls {
        let deltas = calls
            .into_iter()
            .enumerate()
            .map(|(i, c)| marga_protocol::openai::ToolCallDelta {
                index: i as u32,
                id: Some(c.id),
                kind: Some(c.kind),
                function: Some(marga_protocol::openai::FunctionCallDelta {
                    name: Some(c.function.name),
                    arguments: Some(c.function.arguments),
                }),
            })
            .collect();
        chunks.push(chunk(model, ChunkDelta { tool_calls: Some(deltas), ..ChunkDelta::default() }, None, None));
    }
    chunks.push(chunk(model, ChunkDelta::default(), choice.finish_reason, None));
    chunks.push(chunk(model, ChunkDelta::default(), None, full.usage));
    chunks
}

/// A unit vector derived from the text's hash: equal texts, equal vectors.
fn embed(text: &str, dimensions: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(dimensions);
    let mut block = Sha256::digest(text.as_bytes());
    while values.len() < dimensions {
        for pair in block.chunks(2) {
            let raw = u16::from_le_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
            values.push(f32::from(raw) / 32768.0 - 1.0);
        }
        block = Sha256::digest(block);
    }
    values.truncate(dimensions);
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt().max(f32::EPSILON);
    values.iter().map(|v| v / norm).collect()
}

fn embeddings(request: &EmbeddingRequest, model: &str) -> EmbeddingResponse {
    let dimensions = request.dimensions.map_or(EMBEDDING_DIMENSIONS, |d| d as usize).clamp(1, 4096);
    let texts = request.input.texts();
    let tokens = texts.iter().map(|t| words(t).max(1)).sum::<u64>();
    let data = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Embedding { object: "embedding".to_owned(), index: i as u32, embedding: EmbeddingVector::floats(&embed(t, dimensions)) })
        .collect();
    let usage = Usage { prompt_tokens: tokens, total_tokens: tokens, ..Usage::default() };
    EmbeddingResponse { object: "list".to_owned(), data, model: model.to_owned(), usage: Some(usage), extra: Extra::new() }
}

impl Provider for SandboxProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Sandbox
    }

    fn chat<'a>(
        &'a self,
        call: Call<'a, ChatCompletionRequest>,
    ) -> BoxFuture<'a, Result<ChatAnswer, ProviderError>> {
        Box::pin(async move { Ok(response(call.request, call.upstream_model).into()) })
    }

    fn chat_stream<'a>(
        &'a self,
        call: Call<'a, ChatCompletionRequest>,
    ) -> BoxFuture<'a, Result<ChunkStream, ProviderError>> {
        Box::pin(async move {
            let chunks = stream_chunks(call.request, call.upstream_model);
            Ok(futures::stream::iter(chunks.into_iter().map(|c| Ok(ChatChunk::from(c)))).boxed() as ChunkStream)
        })
    }

    fn embeddings<'a>(
        &'a self,
        call: Call<'a, EmbeddingRequest>,
    ) -> BoxFuture<'a, Result<EmbeddingResponse, ProviderError>> {
        Box::pin(async move { Ok(embeddings(call.request, call.upstream_model)) })
    }
}
