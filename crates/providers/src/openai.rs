//! Any OpenAI-compatible API (OpenAI, Groq, Together, Fireworks, DeepSeek, Mistral, Krutrim,
//! Sarvam, OpenRouter, vLLM, Ollama, llama.cpp…). Bodies go out as the client sent them, with
//! the upstream's model name written in; unknown parameters pass through untouched.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::{Stream, StreamExt};
use marga_protocol::sse::Event;
use marga_protocol::answer::ChatAnswer;
use marga_protocol::relayed::ChatChunk;
use marga_protocol::openai::{
    ChatCompletionRequest, CompletionRequest,
    CompletionResponse, EmbeddingRequest, EmbeddingResponse, Outbound, StreamOptions,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::http::{self, Outgoing, Reply};
use ::http::header::{HeaderName, HeaderValue, ACCEPT, AUTHORIZATION};
use ::http::{Method, Uri};
use crate::{
    BoxFuture, Call, ChunkStream, CompletionStream, ErrorKind, Provider, ProviderError,
    ProviderKind, ProviderSettings,
};

const PROTOCOL: &str = "OpenAI";

pub struct OpenAiProvider {
    client: http::Client,
    base_url: String,
    api_key: Option<String>,
    auth_header: Option<HeaderName>,
    supports_stream_usage: bool,
    /// `(path, base_url + path)` for the endpoints every request uses, parsed once.
    urls: Vec<(&'static str, Uri)>,
}

impl OpenAiProvider {
    pub fn new(settings: ProviderSettings) -> Result<Self, ProviderError> {
        // Checked here: an invalid name would otherwise fail every call as a transport error.
        let auth_header = settings
            .auth_header
            .as_deref()
            .map(|name| {
                HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
                    ProviderError::new(ErrorKind::InvalidRequest, "invalid auth header name").with_source(e)
                })
            })
            .transpose()?;
        let base_url = settings.base_url.trim_end_matches('/').to_owned();
        let urls = ["/chat/completions", "/completions", "/embeddings"]
            .into_iter()
            .filter_map(|path| http::parse_uri(&format!("{base_url}{path}")).ok().map(|uri| (path, uri)))
            .collect();
        Ok(OpenAiProvider {
            client: http::Client::new(&settings)?,
            base_url,
            urls,
            api_key: settings.api_key,
            auth_header,
            supports_stream_usage: settings.supports_stream_usage,
        })
    }

    fn post(&self, path: &str, api_key: Option<&str>) -> Result<Outgoing<'_>, ProviderError> {
        // The three URLs are parsed once, at start; anything else is parsed per call.
        let builder = match self.urls.iter().find(|(p, _)| *p == path) {
            Some((_, uri)) => self.client.request(Method::POST, uri.clone()),
            None => self.client.request_url(Method::POST, &format!("{}{path}", self.base_url))?,
        };
        self.authorize(builder, api_key)
    }

    /// Adds the key (the call's own, else the configured one) in the configured header.
    fn authorize<'c>(&self, builder: Outgoing<'c>, api_key: Option<&str>) -> Result<Outgoing<'c>, ProviderError> {
        let Some(key) = api_key.or(self.api_key.as_deref()) else {
            return Ok(builder);
        };
        Ok(match &self.auth_header {
            Some(name) => builder.header(name.clone(), http::secret_header(key)?),
            None => builder.header(AUTHORIZATION, http::secret_header(&format!("Bearer {key}"))?),
        })
    }

    /// `method {base_url}{path}` with the configured key (the batch API's calls).
    pub(crate) fn request(&self, method: Method, path: &str) -> Result<Outgoing<'_>, ProviderError> {
        self.authorize(self.client.request_url(method, &format!("{}{path}", self.base_url))?, None)
    }

    async fn send<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        call: Call<'_, T>,
    ) -> Result<R, ProviderError> {
        let body = Outbound { model: call.upstream_model, stream: false, stream_options: None, body: call.request };
        let response = http::post_json(self.post(path, call.api_key)?, &body).await?;
        http::read_json(response, PROTOCOL).await
    }

    async fn open_stream<T: Serialize>(
        &self,
        path: &str,
        call: Call<'_, T>,
        client_options: Option<&StreamOptions>,
    ) -> Result<Reply, ProviderError> {
        let options = self.stream_options(client_options);
        let body = Outbound {
            model: call.upstream_model,
            stream: true,
            stream_options: options.as_ref(),
            body: call.request,
        };
        http::post_json(self.post(path, call.api_key)?.header(ACCEPT, HeaderValue::from_static("text/event-stream")), &body).await
    }

    /// The client's stream options with `include_usage` switched on where the upstream supports
    /// it, so that every stream ends with authoritative usage.
    fn stream_options(&self, client: Option<&StreamOptions>) -> Option<StreamOptions> {
        if !self.supports_stream_usage {
            return client.cloned();
        }
        let mut options = client.cloned().unwrap_or_default();
        options.include_usage = Some(true);
        Some(options)
    }
}

/// What one OpenAI SSE event gives: at most one chunk (so no `Vec` per event).
enum Decoded<T> {
    Chunk(T),
    /// An event with no data.
    Skip,
    /// `[DONE]`.
    Done,
    Fail(ProviderError),
}

/// Decodes one OpenAI SSE event into a chunk with `parse`.
fn decode_event<T>(event: Event, parse: fn(String) -> Result<T, serde_json::Error>) -> Decoded<T> {
    let data = event.data.trim();
    if data == "[DONE]" {
        return Decoded::Done;
    }
    if data.is_empty() {
        return Decoded::Skip;
    }
    if data.starts_with("{\"error\"") || event.event == "error" {
        return Decoded::Fail(http::in_band_error(data));
    }
    // One parse per event. Only an event that mentions `"error"` (as a key, or as a string
    // value) is first looked at as a JSON value.
    let text = if data.len() == event.data.len() { event.data } else { data.to_owned() };
    if text.contains("\"error\"") {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) {
            if value.get("error").is_some_and(|e| !e.is_null()) {
                return Decoded::Fail(http::in_band_error(&text));
            }
        }
    }
    parse(text).map_or_else(|e| Decoded::Fail(ProviderError::malformed(PROTOCOL, e)), Decoded::Chunk)
}

/// The decoded items of an OpenAI stream. It ends at `[DONE]`, after the first error, or when
/// the upstream closes. A close before `[DONE]` with no finish reason or usage seen yet (a 2xx
/// body that was not SSE at all, or a cut between events) is a `StreamInterrupted` error, not
/// a quiet, empty success; a close after the finish is accepted (some servers omit `[DONE]`).
fn decode_stream<T: Send + 'static>(
    response: Reply,
    parse: fn(String) -> Result<T, serde_json::Error>,
    finished: fn(&T) -> bool,
) -> impl Stream<Item = Result<T, ProviderError>> + Send + 'static {
    Decoding { events: Some(http::sse_events(response)), seen_finish: false, parse, finished }
}

/// The stream [`decode_stream`] returns; `events` is gone once the stream ended. Written by
/// hand rather than with `unfold`, which moves its state in and out of a future per event.
struct Decoding<T> {
    events: Option<http::SseEvents>,
    seen_finish: bool,
    parse: fn(String) -> Result<T, serde_json::Error>,
    finished: fn(&T) -> bool,
}

impl<T> Stream for Decoding<T> {
    type Item = Result<T, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let Some(events) = this.events.as_mut() else { return Poll::Ready(None) };
            let decoded = match ready!(events.poll_next_unpin(cx)) {
                Some(Ok(event)) => decode_event(event, this.parse),
                Some(Err(e)) => Decoded::Fail(e),
                None if this.seen_finish => Decoded::Done,
                None => Decoded::Fail(ProviderError::new(
                    ErrorKind::StreamInterrupted,
                    "the upstream closed the stream before it finished",
                )),
            };
            match decoded {
                Decoded::Skip => continue,
                Decoded::Chunk(chunk) => {
                    this.seen_finish |= (this.finished)(&chunk);
                    return Poll::Ready(Some(Ok(chunk)));
                }
                Decoded::Done => {
                    this.events = None;
                    return Poll::Ready(None);
                }
                Decoded::Fail(e) => {
                    this.events = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

fn chat_chunk_finished(chunk: &ChatChunk) -> bool {
    chunk.usage().is_some() || chunk.finish_reason().is_some()
}

fn parse_completion_chunk(json: String) -> Result<CompletionResponse, serde_json::Error> {
    serde_json::from_str(&json)
}

fn completion_chunk_finished(chunk: &CompletionResponse) -> bool {
    chunk.usage.is_some() || chunk.choices.iter().any(|c| c.finish_reason.is_some())
}

impl Provider for OpenAiProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Openai
    }

    fn native_batch(&self) -> Option<&dyn crate::NativeBatch> {
        Some(self)
    }

    fn chat<'a>(
        &'a self,
        call: Call<'a, ChatCompletionRequest>,
    ) -> BoxFuture<'a, Result<ChatAnswer, ProviderError>> {
        Box::pin(async move {
            let body = Outbound { model: call.upstream_model, stream: false, stream_options: None, body: call.request };
            let response = http::post_json(self.post("/chat/completions", call.api_key)?, &body).await?;
            let json = http::read_bytes(response).await?;
            ChatAnswer::from_upstream_json(json).map_err(|e| ProviderError::malformed(PROTOCOL, e))
        })
    }

    fn chat_stream<'a>(
        &'a self,
        call: Call<'a, ChatCompletionRequest>,
    ) -> BoxFuture<'a, Result<ChunkStream, ProviderError>> {
        Box::pin(async move {
            let options = call.request.stream_options.as_ref();
            let response = self.open_stream("/chat/completions", call, options).await?;
            let chunks = decode_stream(response, ChatChunk::from_upstream_json, chat_chunk_finished);
            Ok(chunks.boxed() as ChunkStream)
        })
    }

    fn embeddings<'a>(
        &'a self,
        call: Call<'a, EmbeddingRequest>,
    ) -> BoxFuture<'a, Result<EmbeddingResponse, ProviderError>> {
        Box::pin(self.send("/embeddings", call))
    }

    fn completions<'a>(
        &'a self,
        call: Call<'a, CompletionRequest>,
    ) -> BoxFuture<'a, Result<CompletionResponse, ProviderError>> {
        Box::pin(self.send("/completions", call))
    }

    fn completions_stream<'a>(
        &'a self,
        call: Call<'a, CompletionRequest>,
    ) -> BoxFuture<'a, Result<CompletionStream, ProviderError>> {
        Box::pin(async move {
            let options = call.request.stream_options.as_ref();
            let response = self.open_stream("/completions", call, options).await?;
            let chunks = decode_stream(response, parse_completion_chunk, completion_chunk_finished);
            Ok(chunks.boxed() as CompletionStream)
        })
    }
}
