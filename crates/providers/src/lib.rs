//! Upstream LLM providers behind one object-safe [`Provider`] trait.
//!
//! Some providers also have a native batch API ([`batch::NativeBatch`], reached with
//! [`Provider::native_batch`]).
//!
//! One module per upstream kind: [`openai`] (any OpenAI-compatible API), [`anthropic`]
//! (Messages API), [`gemini`] (generateContent) and [`sandbox`] (simulated, no network).
//! Each module owns its HTTP details (URL layout, auth header, SSE framing, error bodies) and
//! uses `marga-protocol` for the translation to and from OpenAI shapes.
//!
//! Architecture invariant: this crate knows nothing of Marga's keys, organisations, prices or
//! database. It takes a typed request and an upstream model name and returns typed responses,
//! streams or a classified [`ProviderError`].

pub mod anthropic;
mod anthropic_batch;
pub mod batch;
mod coalesce;
mod error;
pub mod gemini;
mod http;
pub mod openai;
mod openai_batch;
mod pool;
pub mod sandbox;
mod translated;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use marga_protocol::answer::ChatAnswer;
use marga_protocol::relayed::ChatChunk;
use marga_protocol::openai::{
    ChatCompletionRequest, CompletionRequest,
    CompletionResponse, EmbeddingRequest, EmbeddingResponse,
};

pub use batch::{BatchItemError, BatchRequest, BatchResult, BatchState, NativeBatch};
pub use error::{ErrorKind, ProviderError};
pub use http::with_traceparent;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// The chunks of a streamed chat completion, already in OpenAI shape.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, ProviderError>> + Send>>;
/// The chunks of a streamed legacy completion (`text_completion` objects).
pub type CompletionStream =
    Pin<Box<dyn Stream<Item = Result<CompletionResponse, ProviderError>> + Send>>;

/// The wire protocol an upstream speaks. The only `match` over it is [`build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Gemini,
    Sandbox,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Sandbox => "sandbox",
        }
    }

    /// Whether providers of this kind have a native batch API ([`Provider::native_batch`]).
    pub fn has_native_batch(self) -> bool {
        matches!(self, ProviderKind::Openai | ProviderKind::Anthropic)
    }
}

/// What it takes to reach one upstream.
#[derive(Clone, Debug)]
pub struct ProviderSettings {
    pub kind: ProviderKind,
    pub base_url: String,
    pub api_key: Option<String>,
    /// OpenAI kind: send the raw key in this header instead of `Authorization: Bearer`.
    pub auth_header: Option<String>,
    pub headers: Vec<(String, String)>,
    /// OpenAI kind: the upstream honours `stream_options.include_usage`.
    pub supports_stream_usage: bool,
    pub connect_timeout: Duration,
    /// Idle connections kept per upstream host, in each thread's pool (more are closed as
    /// their requests end).
    pub max_idle_connections: usize,
}

/// One call to an upstream: the client's request, borrowed, and where to send it.
#[derive(Debug)]
pub struct Call<'a, T> {
    pub request: &'a T,
    /// The model name the upstream knows.
    pub upstream_model: &'a str,
    /// A per-request key (BYOK) that replaces the configured one.
    pub api_key: Option<&'a str>,
}

// By hand: a derive would require `T: Copy`, but only references are copied.
impl<T> Clone for Call<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Call<'_, T> {}

/// An upstream LLM API.
///
/// Streams end after the upstream's last event; a stream that errors mid-way yields one
/// `Err` and ends. Dropping a future or stream cancels the upstream request.
pub trait Provider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// The provider's native batch API, when it has one (OpenAI and Anthropic kinds).
    fn native_batch(&self) -> Option<&dyn NativeBatch> {
        None
    }

    fn chat<'a>(
        &'a self,
        call: Call<'a, ChatCompletionRequest>,
    ) -> BoxFuture<'a, Result<ChatAnswer, ProviderError>>;

    /// Resolves once the upstream accepted the request (status and headers received);
    /// the stream then yields chunks as they arrive.
    fn chat_stream<'a>(
        &'a self,
        call: Call<'a, ChatCompletionRequest>,
    ) -> BoxFuture<'a, Result<ChunkStream, ProviderError>>;

    fn embeddings<'a>(
        &'a self,
        call: Call<'a, EmbeddingRequest>,
    ) -> BoxFuture<'a, Result<EmbeddingResponse, ProviderError>>;

    /// Legacy completions. By default the prompt becomes one user message of a chat call.
    fn completions<'a>(
        &'a self,
        call: Call<'a, CompletionRequest>,
    ) -> BoxFuture<'a, Result<CompletionResponse, ProviderError>> {
        Box::pin(async move {
            let chat = marga_protocol::legacy::completion_to_chat(call.request);
            let answer = self.chat(Call { request: &chat, upstream_model: call.upstream_model, api_key: call.api_key }).await?;
            let response = answer.into_parsed().map_err(|e| ProviderError::malformed("OpenAI", e))?;
            Ok(marga_protocol::legacy::chat_to_completion(response))
        })
    }

    /// Legacy completions, streamed. By default a chat stream, re-shaped chunk by chunk.
    fn completions_stream<'a>(
        &'a self,
        call: Call<'a, CompletionRequest>,
    ) -> BoxFuture<'a, Result<CompletionStream, ProviderError>> {
        Box::pin(async move {
            let chat = marga_protocol::legacy::completion_to_chat(call.request);
            let stream = self.chat_stream(Call { request: &chat, upstream_model: call.upstream_model, api_key: call.api_key }).await?;
            let mapped = futures::StreamExt::map(stream, |chunk| {
                let chunk = chunk?.into_parsed().map_err(|e| ProviderError::malformed("OpenAI", e))?;
                Ok(marga_protocol::legacy::chat_chunk_to_completion(chunk))
            });
            Ok(Box::pin(mapped) as CompletionStream)
        })
    }
}

/// Builds the provider for its settings: the one place that matches on [`ProviderKind`].
pub fn build(settings: ProviderSettings) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(match settings.kind {
        ProviderKind::Openai => Arc::new(openai::OpenAiProvider::new(settings)?),
        ProviderKind::Anthropic => Arc::new(anthropic::AnthropicProvider::new(settings)?),
        ProviderKind::Gemini => Arc::new(gemini::GeminiProvider::new(settings)?),
        ProviderKind::Sandbox => Arc::new(sandbox::SandboxProvider::new()),
    })
}
