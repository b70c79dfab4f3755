//! Anthropic's Message Batches API for the anthropic kind:
//! `POST {base_url}/messages/batches` with `requests: [{custom_id, params}]` (each `params` a
//! Messages request, translated from the OpenAI chat request), `GET
//! {base_url}/messages/batches/{id}` polled until `processing_status` is `ended`, then the
//! JSONL at its `results_url`: `{custom_id, result: {type: succeeded, message} | {type:
//! errored, error} | {type: canceled | expired}}`. Messages are translated back to OpenAI chat
//! completions with the same conversion as the realtime path.
//! `POST {base_url}/messages/batches/{id}/cancel` cancels one.

use marga_protocol::anthropic::{from_messages_response, to_messages_request, MessagesRequest, MessagesResponse};
use ::http::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::anthropic::{convert_error, unix_now, AnthropicProvider, DEFAULT_MAX_TOKENS};
use crate::batch::{malformed, BatchItemError, BatchRequest, BatchResult, BatchState, NativeBatch};
use crate::http;
use crate::{BoxFuture, ProviderError};

const PROTOCOL: &str = "Anthropic";

#[derive(Serialize)]
struct Entry<'a> {
    custom_id: &'a str,
    params: MessagesRequest,
}

#[derive(Serialize)]
struct Create<'a> {
    requests: Vec<Entry<'a>>,
}

/// The message batch object, as far as it is read.
#[derive(Deserialize)]
struct MessageBatch {
    id: String,
    processing_status: String,
    #[serde(default)]
    results_url: Option<String>,
}

impl AnthropicProvider {
    async fn batch(&self, id: &str) -> Result<MessageBatch, ProviderError> {
        let response = http::send_checked(self.request(Method::GET, &format!("/messages/batches/{id}"))?).await?;
        http::read_json(response, PROTOCOL).await
    }

    async fn create(&self, requests: &[BatchRequest], upstream_model: &str) -> Result<String, ProviderError> {
        let mut entries = Vec::with_capacity(requests.len());
        for r in requests {
            let params = to_messages_request(&r.request, upstream_model, DEFAULT_MAX_TOKENS).map_err(convert_error)?;
            entries.push(Entry { custom_id: &r.custom_id, params });
        }
        let request = self.request(Method::POST, "/messages/batches")?;
        let created: MessageBatch = http::read_json(http::post_json(request, &Create { requests: entries }).await?, PROTOCOL).await?;
        Ok(created.id)
    }

    async fn fetch(&self, id: &str) -> Result<Vec<BatchResult>, ProviderError> {
        let batch = self.batch(id).await?;
        let url = batch.results_url.ok_or_else(|| malformed(PROTOCOL, "an ended batch without results_url"))?;
        let bytes = http::read_bytes(http::send_checked(self.request_url(Method::GET, &url)?).await?).await?;
        let created = unix_now();
        let mut results = Vec::new();
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
            let value: Value = serde_json::from_slice(line).map_err(|e| ProviderError::malformed(PROTOCOL, e))?;
            results.push(result_line(value, created)?);
        }
        Ok(results)
    }
}

/// One results line.
fn result_line(line: Value, created: u64) -> Result<BatchResult, ProviderError> {
    let custom_id = line["custom_id"].as_str().ok_or_else(|| malformed(PROTOCOL, "a result line without custom_id"))?.to_owned();
    let result = &line["result"];
    let outcome = match result["type"].as_str() {
        Some("succeeded") => {
            let message: MessagesResponse =
                serde_json::from_value(result["message"].clone()).map_err(|e| ProviderError::malformed(PROTOCOL, e))?;
            Ok(from_messages_response(message, created))
        }
        Some("errored") => {
            let error = result.pointer("/error/error").unwrap_or(&result["error"]);
            let status = match error["type"].as_str() {
                Some("invalid_request_error") => 400,
                Some("authentication_error") => 401,
                Some("permission_error") => 403,
                Some("not_found_error") => 404,
                Some("rate_limit_error") => 429,
                Some("overloaded_error") => 529,
                _ => 500,
            };
            let message = error["message"].as_str().unwrap_or("the item failed in the provider's batch").to_owned();
            Err(BatchItemError { status, message })
        }
        other => Err(BatchItemError { status: 500, message: format!("the item was {}", other.unwrap_or("not processed")) }),
    };
    Ok(BatchResult { custom_id, outcome })
}

impl NativeBatch for AnthropicProvider {
    fn submit<'a>(&'a self, requests: &'a [BatchRequest], upstream_model: &'a str) -> BoxFuture<'a, Result<String, ProviderError>> {
        Box::pin(self.create(requests, upstream_model))
    }

    fn status<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<BatchState, ProviderError>> {
        Box::pin(async move {
            let batch = self.batch(id).await?;
            Ok(match batch.processing_status.as_str() {
                "ended" => BatchState::Ended,
                "in_progress" => BatchState::Running,
                other => BatchState::Failed(format!("the provider's batch {} is {other}", batch.id)),
            })
        })
    }

    fn results<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<BatchResult>, ProviderError>> {
        Box::pin(self.fetch(id))
    }

    fn cancel<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            http::send_checked(self.request(Method::POST, &format!("/messages/batches/{id}/cancel"))?).await.map(drop)
        })
    }
}
