//! Streaming: hold an upstream stream until its first content, then relay it to the client
//! as server-sent events, chunk by chunk with no buffering.
//!
//! Rules (after TensorZero's `peek_first_chunk` and pingora's failover guide):
//! - Until the first content chunk, nothing is sent: a failure before it fails over.
//! - After it, there is no silent switch: a failure sends one `data: {"error": …}` event and
//!   closes without `[DONE]`, and the request is recorded as `error_midstream`.
//! - The total timeout, counted from the request's arrival, bounds the relay too: past it the
//!   stream ends the same way, with a `timeout` error event.
//! - Every stream ends with a usage chunk before `[DONE]`: the upstream's, or one counted with
//!   the tokenizer and flagged as estimated.
//! - Dropping the body (client gone) drops the upstream stream, which cancels the upstream
//!   request at once; the request is recorded as `cancelled` with what was generated.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use tokio::time::Instant;
use marga_protocol::openai::{
    ChatCompletionChunk, CompletionResponse, ErrorBody, ErrorEnvelope, Extra, FinishReason, Usage,
};
use marga_protocol::relayed::{ChatChunk, Identity};
use marga_providers::ProviderError;
use serde::Serialize;

use super::{record, Candidate, Outcome, RequestCtx};
use crate::money::Money;
use crate::routing::Observation;
use crate::request_log::RequestLog;

/// The event that ends a stream.
const DONE: &[u8] = b"data: [DONE]\n\n";
/// Bytes reserved per event (a typical chunk's event is 150–250 bytes).
const FRAME_CAPACITY: usize = 256;
/// Bytes reserved for the generated text kept for counting (grown as needed).
const TEXT_CAPACITY: usize = 512;

pub type UpstreamStream<C> = Pin<Box<dyn Stream<Item = Result<C, ProviderError>> + Send>>;

/// What the relay needs to know about a chunk type (chat chunks, legacy completion chunks).
pub trait StreamChunk: Send + 'static {
    fn has_content(&self) -> bool;
    fn usage(&self) -> Option<&Usage>;
    /// Generated text in this chunk, for counting tokens when the upstream reports none.
    fn text(&self) -> Option<&str>;
    fn finish_reason(&self) -> Option<&FinishReason>;
    /// Writes the chunk's JSON with the stream's `id` and `model`.
    fn write_json(self, identity: &Identity, out: &mut Vec<u8>) -> Result<(), serde_json::Error>;
    fn set_usage(&mut self, usage: Usage);
    fn usage_chunk(identity: &Identity, created: u64, usage: Usage) -> Self;
    /// A usage-only chunk (no choices), which the relay holds back until the cost is known.
    fn is_usage_only(&self) -> bool;
}

impl StreamChunk for ChatChunk {
    fn has_content(&self) -> bool {
        ChatChunk::has_content(self)
    }
    fn usage(&self) -> Option<&Usage> {
        ChatChunk::usage(self)
    }
    fn text(&self) -> Option<&str> {
        ChatChunk::text(self)
    }
    fn finish_reason(&self) -> Option<&FinishReason> {
        ChatChunk::finish_reason(self)
    }
    fn write_json(self, identity: &Identity, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        ChatChunk::write_json(self, identity, out)
    }
    fn set_usage(&mut self, usage: Usage) {
        match self {
            ChatChunk::Parsed(chunk) => chunk.usage = Some(usage),
            // Never held for its cost (only a parsed chunk carries usage); parsed should it be.
            ChatChunk::Relayed(_) => {
                if let Ok(mut parsed) = self.clone().into_parsed() {
                    parsed.usage = Some(usage);
                    *self = ChatChunk::Parsed(parsed);
                }
            }
        }
    }
    fn is_usage_only(&self) -> bool {
        matches!(self, ChatChunk::Parsed(chunk) if chunk.usage.is_some() && chunk.choices.is_empty())
    }
    fn usage_chunk(identity: &Identity, created: u64, usage: Usage) -> Self {
        ChatChunk::Parsed(chat_usage_chunk(identity, created, usage))
    }
}

fn chat_usage_chunk(identity: &Identity, created: u64, usage: Usage) -> ChatCompletionChunk {
    ChatCompletionChunk {
        id: identity.id().to_owned(),
        object: "chat.completion.chunk".to_owned(),
        created,
        model: identity.model().to_owned(),
        choices: Vec::new(),
        usage: Some(usage),
        extra: Extra::new(),
    }
}

impl StreamChunk for CompletionResponse {
    fn has_content(&self) -> bool {
        self.choices.iter().any(|c| !c.text.is_empty())
    }
    fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }
    fn text(&self) -> Option<&str> {
        self.choices.first().map(|c| c.text.as_str())
    }
    fn finish_reason(&self) -> Option<&FinishReason> {
        self.choices.iter().find_map(|c| c.finish_reason.as_ref())
    }
    fn write_json(mut self, identity: &Identity, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        identity.id().clone_into(&mut self.id);
        identity.model().clone_into(&mut self.model);
        serde_json::to_writer(out, &self)
    }
    fn set_usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
    }
    fn is_usage_only(&self) -> bool {
        self.usage.is_some() && self.choices.is_empty()
    }
    fn usage_chunk(identity: &Identity, created: u64, usage: Usage) -> Self {
        CompletionResponse {
            id: identity.id().to_owned(),
            object: "text_completion".to_owned(),
            created,
            model: identity.model().to_owned(),
            choices: Vec::new(),
            usage: Some(usage),
            extra: Extra::new(),
        }
    }
}

/// An upstream stream whose first content chunk has arrived (or which ended without any).
pub struct Opened<C> {
    pub head: Vec<C>,
    pub rest: UpstreamStream<C>,
}

/// Reads the upstream until its first content chunk, keeping the prelude (role chunks,
/// keep-alives). An error before content is returned, so that the caller can fail over.
pub async fn open_until_content<C: StreamChunk>(mut upstream: UpstreamStream<C>) -> Result<Opened<C>, ProviderError> {
    let mut head = Vec::new();
    while let Some(item) = upstream.next().await {
        let chunk = item?;
        let content = chunk.has_content();
        head.push(chunk);
        if content {
            break;
        }
    }
    Ok(Opened { head, rest: upstream })
}

enum Frame<C> {
    Chunk(C),
    Done,
}

/// The state of one relayed stream. Dropping it before the end records a cancellation.
struct Relay<C> {
    ctx: RequestCtx,
    candidate: Candidate,
    /// The `id` and `model` every chunk is written with.
    identity: Identity,
    log: RequestLog,
    pending: VecDeque<Frame<C>>,
    upstream: UpstreamStream<C>,
    /// The upstream's usage-only chunk, held until the cost can be written into it.
    usage_chunk: Option<C>,
    usage: Option<Usage>,
    text: String,
    finish: Option<String>,
    ttft_ms: u64,
    idle_timeout: Duration,
    /// When the request's total timeout runs out, and its length (for the message).
    deadline: Instant,
    total_timeout: Duration,
    estimate_prompt: Box<dyn Fn() -> u64 + Send>,
    finished: bool,
    /// What the upstream gave when it was polled only to see whether more was ready (an error
    /// or its end), handled by the next [`Relay::next_frame`].
    lookahead: Option<Option<Result<C, ProviderError>>>,
}

/// Parameters of [`relay`].
pub struct RelayParams<C> {
    pub ctx: RequestCtx,
    /// The route that answered, and the model it served.
    pub candidate: Candidate,
    pub log: RequestLog,
    pub opened: Opened<C>,
    /// Counts the prompt's tokens; called only if the upstream reports no usage.
    pub estimate_prompt: Box<dyn Fn() -> u64 + Send>,
    /// Longest wait for the next chunk before the stream counts as broken.
    pub idle_timeout: Duration,
    /// The request's total timeout, counted from its arrival.
    pub total_timeout: Duration,
}

/// Why a stream that had sent content ended early.
enum Cut {
    /// The upstream failed (an error, a cut, silence past the idle timeout).
    Upstream(ProviderError),
    /// The request's total timeout ran out.
    TotalTimeout,
}

/// The SSE body for an opened stream.
pub fn relay<C: StreamChunk>(params: RelayParams<C>) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    let ttft_ms = params.ctx.elapsed_ms();
    let deadline = Instant::now() + params.total_timeout.saturating_sub(params.ctx.started.elapsed());
    let identity = Identity::new(&params.ctx.id, &params.candidate.model.id);
    let mut relay = Relay {
        identity,
        ctx: params.ctx,
        candidate: params.candidate,
        log: params.log,
        pending: VecDeque::new(),
        upstream: params.opened.rest,
        usage_chunk: None,
        usage: None,
        // Room for a short answer's text without growing it chunk by chunk.
        text: String::with_capacity(TEXT_CAPACITY),
        finish: None,
        ttft_ms,
        idle_timeout: params.idle_timeout,
        deadline,
        total_timeout: params.total_timeout,
        estimate_prompt: params.estimate_prompt,
        finished: false,
        lookahead: None,
    };
    for chunk in params.opened.head {
        relay.accept(chunk);
    }
    // Boxed: `unfold` moves its state into each event's future and back out, so a bare
    // `Relay` (the request's whole context) was copied twice per event.
    futures::stream::unfold(Box::new(relay), |mut relay| async move {
        let frame = relay.next_frame().await?;
        Some((Ok(relay.with_ready_frames(frame)), relay))
    })
}

impl<C: StreamChunk> Relay<C> {
    fn observe(&mut self, chunk: &C) {
        if let Some(usage) = chunk.usage() {
            self.usage = Some(usage.clone());
        }
        if let Some(text) = chunk.text() {
            self.text.push_str(text);
        }
        if let Some(reason) = chunk.finish_reason() {
            self.finish = Some(reason.as_str().to_owned());
        }
    }

    /// Queues a chunk for the client (a usage-only chunk is held back for its cost).
    fn accept(&mut self, chunk: C) {
        self.observe(&chunk);
        if chunk.is_usage_only() {
            self.usage_chunk = Some(chunk);
        } else {
            self.pending.push_back(Frame::Chunk(chunk));
        }
    }

    /// `first` followed by the frames of every chunk the upstream has ready now, in one piece:
    /// one write to the client instead of one per event when events arrive together. It never
    /// waits: what is not ready yet goes in a later piece.
    fn with_ready_frames(&mut self, first: Bytes) -> Bytes {
        let mut batch: Option<Vec<u8>> = None;
        loop {
            if let Some(frame) = self.pending.pop_front() {
                let batch = batch.get_or_insert_with(|| {
                    // Room for this frame and the rest of a burst without growing.
                    let mut batch = Vec::with_capacity(first.len() + FRAME_CAPACITY * (self.pending.len() + 4));
                    batch.extend_from_slice(&first);
                    batch
                });
                self.encode_into(frame, batch);
                continue;
            }
            if self.finished || self.lookahead.is_some() {
                break;
            }
            match self.upstream.next().now_or_never() {
                Some(Some(Ok(chunk))) => self.accept(chunk),
                Some(other) => self.lookahead = Some(other),
                None => break,
            }
        }
        batch.map_or(first, Bytes::from)
    }

    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(self.encode(frame));
            }
            if self.finished {
                return None;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Some(self.fail(Cut::TotalTimeout).await);
            }
            let next = match self.lookahead.take() {
                Some(next) => Ok(next),
                None => tokio::time::timeout(self.idle_timeout.min(left), self.upstream.next()).await,
            };
            let next = match next {
                Ok(next) => next,
                Err(_) if left < self.idle_timeout => return Some(self.fail(Cut::TotalTimeout).await),
                Err(_) => {
                    let message = format!("no chunk for {:?}", self.idle_timeout);
                    Some(Err(ProviderError::new(marga_providers::ErrorKind::Timeout, message)))
                }
            };
            match next {
                Some(Ok(chunk)) => self.accept(chunk),
                Some(Err(error)) => return Some(self.fail(Cut::Upstream(error)).await),
                None => {
                    if let Some(error) = self.complete().await {
                        return Some(error);
                    }
                }
            }
        }
    }

    fn encode(&self, frame: Frame<C>) -> Bytes {
        match frame {
            Frame::Done => Bytes::from_static(DONE),
            Frame::Chunk(_) => {
                let mut out = Vec::with_capacity(FRAME_CAPACITY);
                self.encode_into(frame, &mut out);
                Bytes::from(out)
            }
        }
    }

    /// Appends `frame`'s SSE event to `out`.
    fn encode_into(&self, frame: Frame<C>, out: &mut Vec<u8>) {
        match frame {
            Frame::Done => out.extend_from_slice(DONE),
            Frame::Chunk(chunk) => {
                let start = out.len();
                out.extend_from_slice(b"data: ");
                if chunk.write_json(&self.identity, out).is_err() {
                    out.truncate(start + b"data: ".len());
                    out.extend_from_slice(b"{}");
                }
                out.extend_from_slice(b"\n\n");
            }
        }
    }

    /// The upstream ended cleanly: settle (durably), then the usage chunk (the upstream's or
    /// counted) with its cost, then `[DONE]`. If the charge cannot be recorded the stream ends
    /// with an error event instead: never served unbilled.
    async fn complete(&mut self) -> Option<Bytes> {
        let estimated = self.usage.is_none();
        let mut usage = self.usage.take().unwrap_or_else(|| self.counted_usage());
        self.record_health_success(usage.completion_tokens);
        let route = self.candidate.route.clone();
        let cost = match super::settle(&mut self.ctx, &route, &mut usage).await {
            Ok(cost) => cost,
            Err(e) => {
                self.usage = Some(usage);
                self.finish("error", estimated, Some(e.to_string()), None);
                return Some(sse_data(&e.envelope()));
            }
        };
        let chunk = match self.usage_chunk.take() {
            Some(mut chunk) => {
                chunk.set_usage(usage.clone());
                chunk
            }
            None => C::usage_chunk(&self.identity, self.ctx.created, usage.clone()),
        };
        self.pending.push_back(Frame::Chunk(chunk));
        self.pending.push_back(Frame::Done);
        self.usage = Some(usage);
        self.finish("success", estimated, None, cost);
        None
    }


    /// The stream ended early after content was sent: what was generated is billed, the route
    /// is charged a fault, then one error event, no `[DONE]`.
    async fn fail(&mut self, cut: Cut) -> Bytes {
        let provider = self.candidate.route.provider.id.clone();
        let (message, kind, code, error_type) = match &cut {
            Cut::Upstream(error) => {
                let message = format!("the stream from {provider} was interrupted: {error}");
                (message, "upstream_error", "stream_interrupted", error.kind.as_str())
            }
            Cut::TotalTimeout => {
                let message = format!("the request timed out after {:?} while streaming from {provider}", self.total_timeout);
                (message, "timeout_error", "timeout", "timeout")
            }
        };
        let envelope = ErrorEnvelope {
            error: ErrorBody {
                message: message.clone(),
                kind: Some(kind.to_owned()),
                code: Some(serde_json::Value::String(code.to_owned())),
                param: None,
                metadata: Some(serde_json::json!({ "provider_name": provider, "error_type": error_type })),
                details: None,
            },
        };
        let estimated = self.usage.is_none();
        let mut usage = self.usage.take().unwrap_or_else(|| self.counted_usage());
        self.candidate.route.health.record_fault();
        let route = self.candidate.route.clone();
        let cost = super::settle(&mut self.ctx, &route, &mut usage).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, generation = %self.ctx.id, "could not bill a broken stream");
            None
        });
        self.usage = Some(usage);
        self.finish("error_midstream", estimated, Some(message), cost);
        sse_data(&envelope)
    }

    fn record_health_success(&self, completion_tokens: u64) {
        self.candidate.route.health.record_success(Observation {
            latency: self.ctx.started.elapsed(),
            ttft: Some(Duration::from_millis(self.ttft_ms)),
            completion_tokens,
        });
    }

    fn finish(&mut self, status: &'static str, usage_estimated: bool, error: Option<String>, cost: Option<Money>) {
        self.finished = true;
        let outcome = Outcome {
            status,
            http_status: 200,
            route: Some(&self.candidate.route),
            usage: self.usage.as_ref(),
            usage_estimated,
            ttft_ms: Some(self.ttft_ms),
            finish_reason: self.finish.clone(),
            error,
            cost,
        };
        self.log.record(record(&self.ctx, &outcome));
    }
}

impl<C> Relay<C> {
    /// Usage counted with the tokenizer, when the upstream reported none.
    fn counted_usage(&self) -> Usage {
        Usage::new((self.estimate_prompt)(), crate::tokens::count(&self.text))
    }
}

impl<C> Drop for Relay<C> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The client went away; the upstream was answering, so this is no fault of the route.
        // Bill what was generated so far (counted).
        self.candidate.route.health.record_success(Observation {
            latency: self.ctx.started.elapsed(),
            ttft: Some(Duration::from_millis(self.ttft_ms)),
            completion_tokens: 0,
        });
        let mut usage = self.usage.take().unwrap_or_else(|| self.counted_usage());
        let cost = self.ctx.billing.take().map(|billing| {
            let cost = if billing.is_free() {
                Money::zero(billing.currency())
            } else {
                billing.cost(&self.candidate.route, super::token_counts(&usage))
            };
            let reference = self.ctx.id.clone();
            tokio::spawn(async move {
                if let Err(e) = billing.settle(&reference, cost).await {
                    tracing::error!(error = %e, generation = %reference, "could not bill a cancelled stream");
                }
            });
            cost
        });
        usage.cost = cost.and_then(|c| marga_protocol::openai::ExactNumber::new(c.amount.to_string()));
        let outcome = Outcome {
            status: "cancelled",
            http_status: 200,
            route: Some(&self.candidate.route),
            usage: Some(&usage),
            usage_estimated: true,
            ttft_ms: Some(self.ttft_ms),
            finish_reason: None,
            error: Some("client disconnected".to_owned()),
            cost,
        };
        self.log.record(record(&self.ctx, &outcome));
    }
}

/// One SSE `data:` event.
pub fn sse_data(value: &impl Serialize) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    if serde_json::to_writer(&mut out, value).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
