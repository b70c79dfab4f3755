//! Gemini (Generative Language API `v1beta`): `models/{model}:generateContent`,
//! `:streamGenerateContent?alt=sse` and `:batchEmbedContents`, translated to and from OpenAI
//! shapes by [`marga_protocol::gemini`].
//!
//! The key travels in the `x-goog-api-key` header, never in the URL (`?key=` ends up in access
//! logs and error messages). Gemini streams have no terminator event: when the upstream closes
//! the body cleanly the translator's `finish()` supplies the finish and usage chunks; a stream
//! that breaks ends with its error and no usage chunk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use marga_protocol::sse::Event;
use futures::StreamExt;
use marga_protocol::gemini::{self, BatchEmbedContentsResponse, GenerateContentResponse, StreamStep, StreamTranslator};
use marga_protocol::openai::{
    ChatCompletionRequest, ChatCompletionResponse, EmbeddingInput, EmbeddingRequest,
    EmbeddingResponse,
};
use marga_protocol::ConvertError;
use serde::Serialize;

use crate::http::{self, Reply};
use crate::translated::{translated, Step, Translate};
use ::http::header::{HeaderName, HeaderValue, ACCEPT};
use ::http::Method;
use marga_protocol::answer::ChatAnswer;

use crate::{BoxFuture, Call, ChunkStream, ErrorKind, Provider, ProviderError, ProviderKind, ProviderSettings};

const PROTOCOL: &str = "Gemini";
const API_KEY_HEADER: HeaderName = HeaderName::from_static("x-goog-api-key");

pub struct GeminiProvider {
    client: http::Client,
    base_url: String,
    api_key: Option<String>,
}

impl GeminiProvider {
    pub fn new(settings: ProviderSettings) -> Result<Self, ProviderError> {
        Ok(GeminiProvider {
            client: http::Client::new(&settings)?,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            api_key: settings.api_key,
        })
    }

    /// POSTs `body` to `models/{model}:{method}` (with the key in its header).
    async fn post(
        &self,
        model: &str,
        method: &str,
        api_key: Option<&str>,
        body: &impl Serialize,
    ) -> Result<Reply, ProviderError> {
        let model = model.strip_prefix("models/").unwrap_or(model);
        let mut builder = self.client.request_url(Method::POST, &format!("{}/models/{model}:{method}", self.base_url))?;
        if let Some(key) = api_key.or(self.api_key.as_deref()) {
            builder = builder.header(API_KEY_HEADER, http::secret_header(key)?);
        }
        if method.starts_with("streamGenerateContent") {
            builder = builder.header(ACCEPT, HeaderValue::from_static("text/event-stream"));
        }
        http::post_json(builder, body).await
    }

    async fn chat_once(&self, call: Call<'_, ChatCompletionRequest>) -> Result<ChatCompletionResponse, ProviderError> {
        let body = gemini::to_generate_content(call.request).map_err(convert_error)?;
        let response = self.post(call.upstream_model, "generateContent", call.api_key, &body).await?;
        let answer: GenerateContentResponse = http::read_json(response, PROTOCOL).await?;
        let id = completion_id(answer.response_id.as_deref());
        gemini::from_generate_content(answer, call.upstream_model, unix_now(), id).map_err(convert_error)
    }

    async fn open_stream(&self, call: Call<'_, ChatCompletionRequest>) -> Result<ChunkStream, ProviderError> {
        let body = gemini::to_generate_content(call.request).map_err(convert_error)?;
        let response = self.post(call.upstream_model, "streamGenerateContent?alt=sse", call.api_key, &body).await?;
        let translator = StreamTranslator::new(call.upstream_model, unix_now(), completion_id(None));
        Ok(translated(response, translator).boxed())
    }

    async fn embed(&self, call: Call<'_, EmbeddingRequest>) -> Result<EmbeddingResponse, ProviderError> {
        let request = call.request;
        if matches!(request.input, EmbeddingInput::Tokens(_) | EmbeddingInput::TokenLists(_)) {
            return Err(invalid_request("Gemini embeddings take text input, not token arrays"));
        }
        if request.input.is_empty() {
            return Err(invalid_request("`input` must not be empty"));
        }
        let body = gemini::to_batch_embed(request, call.upstream_model);
        let response = self.post(call.upstream_model, "batchEmbedContents", call.api_key, &body).await?;
        let answer: BatchEmbedContentsResponse = http::read_json(response, PROTOCOL).await?;
        Ok(gemini::from_batch_embed(answer, call.upstream_model, request.encoding_format.as_deref()))
    }
}

/// A Gemini stream's translator as [`translated`] drives it: when the events end cleanly its
/// `finish()` chunks follow, while an error (transport or in-band) is yielded last, with nothing
/// after it.
impl Translate for StreamTranslator {
    fn event(&mut self, event: &Event) -> Step {
        match self.push(&event.data) {
            StreamStep::Chunks(chunks) => Step::Chunks(chunks),
            StreamStep::Error { message, kind } if kind == "malformed" => {
                Step::Fail(ProviderError::new(ErrorKind::Malformed, message))
            }
            StreamStep::Error { .. } => Step::Fail(http::in_band_error(&event.data)),
        }
    }

    fn closed(&mut self) -> Step {
        Step::Last(self.finish())
    }
}

/// A conversion failure: the request cannot be expressed for Gemini (another route may take
/// it), is invalid, or Gemini's answer was not what it documents.
fn convert_error(error: ConvertError) -> ProviderError {
    let kind = match &error {
        ConvertError::Unsupported { .. } => ErrorKind::Unsupported,
        ConvertError::InvalidParam { .. } => ErrorKind::InvalidRequest,
        ConvertError::Malformed { .. } => ErrorKind::Malformed,
    };
    ProviderError::new(kind, error.to_string()).with_source(error)
}

fn invalid_request(message: &str) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidRequest, message)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `chatcmpl-<responseId>`, or, without one (streams: the id is needed before the first
/// event), `chatcmpl-<nanoseconds since the epoch><process-wide counter>` in hex.
fn completion_id(response_id: Option<&str>) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    match response_id.filter(|id| !id.is_empty()) {
        Some(id) => format!("chatcmpl-{id}"),
        None => {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff;
            format!("chatcmpl-{nanos:x}{n:04x}")
        }
    }
}

impl Provider for GeminiProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Gemini
    }

    fn chat<'a>(
        &'a self,
        call: Call<'a, ChatCompletionRequest>,
    ) -> BoxFuture<'a, Result<ChatAnswer, ProviderError>> {
        Box::pin(async move { self.chat_once(call).await.map(ChatAnswer::from) })
    }

    fn chat_stream<'a>(
        &'a self,
        call: Call<'a, ChatCompletionRequest>,
    ) -> BoxFuture<'a, Result<ChunkStream, ProviderError>> {
        Box::pin(self.open_stream(call))
    }

    fn embeddings<'a>(
        &'a self,
        call: Call<'a, EmbeddingRequest>,
    ) -> BoxFuture<'a, Result<EmbeddingResponse, ProviderError>> {
        Box::pin(self.embed(call))
    }
}
