//! Provider-native batch APIs (OpenAI's Batch API, Anthropic's Message Batches): an optional
//! capability of a [`Provider`](crate::Provider), reached with
//! [`Provider::native_batch`](crate::Provider::native_batch). A caller submits a set of chat
//! requests once, polls the provider's batch until it has ended, then fetches every item's
//! result, already translated to an OpenAI chat completion; or cancels it.
//!
//! Item ids are the caller's (`custom_id`); Anthropic accepts only `[A-Za-z0-9_-]{1,64}`, so
//! callers should use ids of that form. Like the rest of this crate, nothing here knows of
//! keys, organisations or prices.

use marga_protocol::openai::{ChatCompletionRequest, ChatCompletionResponse};

use crate::{BoxFuture, ProviderError};

/// One request of a native batch.
#[derive(Clone, Debug)]
pub struct BatchRequest {
    /// The caller's id for the item, echoed on its result.
    pub custom_id: String,
    pub request: ChatCompletionRequest,
}

/// Where a provider's batch is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchState {
    /// Accepted, validating or running: poll again later.
    Running,
    /// Every item has a result (succeeded or not): fetch them.
    Ended,
    /// The provider gave up on the batch as a whole (failed, expired, cancelled).
    Failed(String),
}

/// One item's outcome.
#[derive(Clone, Debug)]
pub struct BatchResult {
    pub custom_id: String,
    pub outcome: Result<ChatCompletionResponse, BatchItemError>,
}

/// Why one item of a batch has no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchItemError {
    /// The HTTP status the request got (or would have got) from the provider.
    pub status: u16,
    pub message: String,
}

/// A provider's native batch API. Object-safe, like [`Provider`](crate::Provider).
pub trait NativeBatch: Send + Sync {
    /// Submits the requests, every one for `upstream_model`; returns the provider's batch id.
    fn submit<'a>(
        &'a self,
        requests: &'a [BatchRequest],
        upstream_model: &'a str,
    ) -> BoxFuture<'a, Result<String, ProviderError>>;

    /// Where batch `id` is.
    fn status<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<BatchState, ProviderError>>;

    /// Every result of an ended batch `id`, in no particular order.
    fn results<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<BatchResult>, ProviderError>>;

    /// Asks the provider to stop batch `id` (what already finished is still billed by it).
    fn cancel<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>>;
}

/// A result line's body that is not the expected shape.
pub(crate) fn malformed(protocol: &'static str, what: &str) -> ProviderError {
    ProviderError::new(crate::ErrorKind::Malformed, format!("{protocol} batch: {what}"))
}
