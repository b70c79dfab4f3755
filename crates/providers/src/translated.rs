//! The chunk stream of a provider whose upstream speaks another protocol (Anthropic, Gemini):
//! its SSE events go through the protocol's stream translator one at a time, and the OpenAI
//! chunks each gives are handed on in order.
//!
//! Written as a `Stream` by hand: the `scan`, `flatten` and `unfold` combinators it replaces
//! moved their state into a new future and out again, and collected each event's chunks into
//! a new `Vec`, for every event.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::{Stream, StreamExt};
use marga_protocol::openai::ChatCompletionChunk;
use marga_protocol::relayed::ChatChunk;
use marga_protocol::sse::Event;

use crate::http::{self, Reply, SseEvents};
use crate::ProviderError;

/// What one upstream event, or the upstream closing the body, means to the stream.
pub(crate) enum Step {
    /// Chunks to pass on; the stream goes on.
    Chunks(Vec<ChatCompletionChunk>),
    /// The last chunks of the stream: pass them on, then end.
    Last(Vec<ChatCompletionChunk>),
    /// A failure: pass it on, then end.
    Fail(ProviderError),
}

/// A protocol's stream translator, as the stream drives it.
pub(crate) trait Translate: Send + Unpin + 'static {
    /// One SSE event.
    fn event(&mut self, event: &Event) -> Step;
    /// The upstream closed the body before the translator ended the stream.
    fn closed(&mut self) -> Step;
}

/// The chunks of `response`'s SSE events through `translator`. The stream ends after a
/// [`Step::Last`]'s chunks or a failure (an in-band error, a transport error, an undecodable
/// stream), whichever comes first.
pub(crate) fn translated<T: Translate>(response: Reply, translator: T) -> Translated<T> {
    Translated { events: Some(http::sse_events(response)), translator, ready: Vec::new().into_iter(), failure: None }
}

/// The stream [`translated`] returns; `events` is gone once the stream has nothing more to
/// read, and a failure waits in `failure` until the chunks before it are handed on.
pub(crate) struct Translated<T> {
    events: Option<SseEvents>,
    translator: T,
    ready: std::vec::IntoIter<ChatCompletionChunk>,
    failure: Option<ProviderError>,
}

impl<T: Translate> Translated<T> {
    /// Takes in what one step says.
    fn take(&mut self, step: Step) {
        match step {
            Step::Chunks(chunks) => self.ready = chunks.into_iter(),
            Step::Last(chunks) => {
                self.ready = chunks.into_iter();
                self.events = None;
            }
            Step::Fail(error) => {
                self.failure = Some(error);
                self.events = None;
            }
        }
    }
}

impl<T: Translate> Stream for Translated<T> {
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(chunk) = this.ready.next() {
                return Poll::Ready(Some(Ok(ChatChunk::from(chunk))));
            }
            if let Some(error) = this.failure.take() {
                return Poll::Ready(Some(Err(error)));
            }
            let Some(events) = this.events.as_mut() else { return Poll::Ready(None) };
            let step = match ready!(events.poll_next_unpin(cx)) {
                Some(Ok(event)) => this.translator.event(&event),
                Some(Err(error)) => Step::Fail(error),
                None => {
                    this.events = None;
                    this.translator.closed()
                }
            };
            this.take(step);
        }
    }
}
