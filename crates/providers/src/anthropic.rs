//! Anthropic Messages API (`POST {base_url}/messages`, version `2023-06-01`). Requests and
//! responses are translated to and from OpenAI shapes by `marga_protocol::anthropic`; streams
//! go through a [`StreamTranslator`], one per stream.
//!
//! Upstream error bodies (`{"type":"error","error":{"type","message"}}`) and statuses (529
//! overloaded → Server) are classified by the shared HTTP plumbing. Legacy completions use the
//! trait's chat-based defaults; embeddings are unsupported.

use std::time::{SystemTime, UNIX_EPOCH};

use marga_protocol::sse::Event;
use futures::StreamExt;
use marga_protocol::anthropic::{
    from_messages_response, to_messages_request, MessagesRequest, MessagesResponse, StreamStep, StreamTranslator,
    API_VERSION,
};
use marga_protocol::openai::{
    ChatCompletionRequest, EmbeddingRequest, EmbeddingResponse,
};
use marga_protocol::ConvertError;

use crate::http::{self, Outgoing, Reply};
use crate::translated::{translated, Step, Translate};
use ::http::header::{HeaderName, HeaderValue, ACCEPT};
use ::http::{Method, Uri};
use marga_protocol::answer::ChatAnswer;

use crate::{BoxFuture, Call, ChunkStream, ErrorKind, Provider, ProviderError, ProviderKind, ProviderSettings};

const PROTOCOL: &str = "Anthropic";
/// The output cap sent when the client set none (Anthropic requires one).
pub(crate) const DEFAULT_MAX_TOKENS: u32 = 4096;

const VERSION_HEADER: HeaderName = HeaderName::from_static("anthropic-version");
const VERSION: HeaderValue = HeaderValue::from_static(API_VERSION);
const KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");

pub struct AnthropicProvider {
    client: http::Client,
    base_url: String,
    /// `{base_url}/messages`, parsed once.
    messages_uri: Uri,
    api_key: Option<String>,
}

impl AnthropicProvider {
    pub fn new(settings: ProviderSettings) -> Result<Self, ProviderError> {
        let base_url = settings.base_url.trim_end_matches('/').to_owned();
        Ok(AnthropicProvider {
            client: http::Client::new(&settings)?,
            messages_uri: http::parse_uri(&format!("{base_url}/messages"))?,
            base_url,
            api_key: settings.api_key,
        })
    }

    /// `POST {base_url}/messages` with the version header and, when there is one, the key.
    fn post(&self, api_key: Option<&str>) -> Result<Outgoing<'_>, ProviderError> {
        let builder = self.client.request(Method::POST, self.messages_uri.clone()).header(VERSION_HEADER, VERSION.clone());
        match api_key.or(self.api_key.as_deref()) {
            Some(key) => Ok(builder.header(KEY_HEADER, http::secret_header(key)?)),
            None => Ok(builder),
        }
    }

    /// `method {base_url}{path}` with the version header and the configured key (the
    /// Message Batches API's calls).
    pub(crate) fn request(&self, method: Method, path: &str) -> Result<Outgoing<'_>, ProviderError> {
        self.request_url(method, &format!("{}{path}", self.base_url))
    }

    /// Like [`Self::request`], for a whole URL the API gave (`results_url`).
    pub(crate) fn request_url(&self, method: Method, url: &str) -> Result<Outgoing<'_>, ProviderError> {
        let builder = self.client.request_url(method, url)?.header(VERSION_HEADER, VERSION.clone());
        match self.api_key.as_deref() {
            Some(key) => Ok(builder.header(KEY_HEADER, http::secret_header(key)?)),
            None => Ok(builder),
        }
    }

    /// Translates the call and sends it; the response is 2xx.
    async fn send(
        &self,
        call: Call<'_, ChatCompletionRequest>,
        stream: bool,
    ) -> Result<Reply, ProviderError> {
        let mut body: MessagesRequest =
            to_messages_request(call.request, call.upstream_model, DEFAULT_MAX_TOKENS).map_err(convert_error)?;
        body.stream = stream;
        let mut request = self.post(call.api_key)?;
        if stream {
            request = request.header(ACCEPT, HeaderValue::from_static("text/event-stream"));
        }
        http::post_json(request, &body).await
    }
}

/// A request Anthropic cannot take: invalid (not retryable) or unsupported here (another route
/// may serve it).
pub(crate) fn convert_error(err: ConvertError) -> ProviderError {
    let kind = match err {
        ConvertError::Unsupported { .. } => ErrorKind::Unsupported,
        _ => ErrorKind::InvalidRequest,
    };
    ProviderError::new(kind, err.to_string()).with_source(err)
}

/// Seconds since the epoch, for the `created` field Anthropic does not send.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An Anthropic stream's translator as [`translated`] drives it: the stream ends right after
/// the usage chunk that `message_stop` gives, and an upstream that closes before
/// `message_stop` ends it with a `StreamInterrupted` error.
impl Translate for StreamTranslator {
    fn event(&mut self, event: &Event) -> Step {
        match self.push(&event.event, &event.data) {
            StreamStep::Chunks(chunks) if self.is_done() => Step::Last(chunks),
            StreamStep::Chunks(chunks) => Step::Chunks(chunks),
            StreamStep::Done => Step::Last(Vec::new()),
            StreamStep::Error { kind, message } if kind == "malformed" => {
                Step::Fail(ProviderError::new(ErrorKind::Malformed, message))
            }
            StreamStep::Error { .. } => Step::Fail(http::in_band_error(&event.data)),
        }
    }

    fn closed(&mut self) -> Step {
        Step::Fail(ProviderError::new(ErrorKind::StreamInterrupted, "the upstream closed the stream before message_stop"))
    }
}

impl Provider for AnthropicProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    fn native_batch(&self) -> Option<&dyn crate::NativeBatch> {
        Some(self)
    }

    fn chat<'a>(
        &'a self,
        call: Call<'a, ChatCompletionRequest>,
    ) -> BoxFuture<'a, Result<ChatAnswer, ProviderError>> {
        Box::pin(async move {
            let response = self.send(call, false).await?;
            let message: MessagesResponse = http::read_json(response, PROTOCOL).await?;
            Ok(from_messages_response(message, unix_now()).into())
        })
    }

    fn chat_stream<'a>(
        &'a self,
        call: Call<'a, ChatCompletionRequest>,
    ) -> BoxFuture<'a, Result<ChunkStream, ProviderError>> {
        Box::pin(async move {
            let response = self.send(call, true).await?;
            Ok(translated(response, StreamTranslator::new(unix_now())).boxed() as ChunkStream)
        })
    }

    fn embeddings<'a>(
        &'a self,
        _call: Call<'a, EmbeddingRequest>,
    ) -> BoxFuture<'a, Result<EmbeddingResponse, ProviderError>> {
        Box::pin(async { Err(ProviderError::unsupported("embeddings")) })
    }
}
