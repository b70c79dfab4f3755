//! OpenAI's Batch API for the openai kind: the requests go up as one JSONL file
//! (`POST {base_url}/files`, multipart, `purpose=batch`), then `POST {base_url}/batches`
//! (`endpoint: /v1/chat/completions`, `completion_window: 24h`); `GET {base_url}/batches/{id}`
//! is polled (`validating` → `in_progress` → `finalizing` → `completed`), and the results are
//! the lines of its output and error files (`GET {base_url}/files/{id}/content`):
//! `{id, custom_id, response: {status_code, request_id, body}, error}`.
//! `POST {base_url}/batches/{id}/cancel` cancels one.

use marga_protocol::openai::{ChatCompletionResponse, Outbound};
use ::http::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::batch::{malformed, BatchItemError, BatchRequest, BatchResult, BatchState, NativeBatch};
use crate::http;
use crate::openai::OpenAiProvider;
use crate::{BoxFuture, ErrorKind, ProviderError};

const PROTOCOL: &str = "OpenAI";
const ENDPOINT: &str = "/v1/chat/completions";

#[derive(Deserialize)]
struct Created {
    id: String,
}

/// The batch object, as far as it is read.
#[derive(Deserialize)]
struct BatchObject {
    status: String,
    #[serde(default)]
    output_file_id: Option<String>,
    #[serde(default)]
    error_file_id: Option<String>,
}

fn encode_error(e: serde_json::Error) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidRequest, "could not encode the batch file").with_source(e)
}

/// The JSONL input file: one `{custom_id, method, url, body}` line per request.
fn input_file(requests: &[BatchRequest], upstream_model: &str) -> Result<Vec<u8>, ProviderError> {
    let mut file = Vec::new();
    for r in requests {
        let body = Outbound { model: upstream_model, stream: false, stream_options: None, body: &r.request };
        let line = json!({"custom_id": r.custom_id, "method": "POST", "url": ENDPOINT, "body": body});
        serde_json::to_writer(&mut file, &line).map_err(encode_error)?;
        file.push(b'\n');
    }
    Ok(file)
}

/// A `multipart/form-data` body with `purpose=batch` and the file; returns (content type, body).
fn multipart(file: &[u8]) -> (String, Vec<u8>) {
    let boundary = format!("marga-batch-{:016x}", hash_prefix(file));
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// A boundary that does not occur in the file: its SHA-256 prefix (a line of JSON never
/// contains `--marga-batch-` followed by its own hash).
fn hash_prefix(file: &[u8]) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(file);
    digest.iter().take(8).fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

impl OpenAiProvider {
    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ProviderError> {
        let response = http::send_checked(self.request(Method::GET, path)?).await?;
        http::read_json(response, PROTOCOL).await
    }

    async fn submit_file(&self, requests: &[BatchRequest], upstream_model: &str) -> Result<String, ProviderError> {
        let (content_type, body) = multipart(&input_file(requests, upstream_model)?);
        let content_type = ::http::HeaderValue::try_from(content_type)
            .map_err(|e| ProviderError::new(ErrorKind::InvalidRequest, "invalid multipart boundary").with_source(e))?;
        let upload = self.request(Method::POST, "/files")?.header(::http::header::CONTENT_TYPE, content_type);
        let file: Created = http::read_json(upload.send(body).await?, PROTOCOL).await?;
        let create = json!({"input_file_id": file.id, "endpoint": ENDPOINT, "completion_window": "24h"});
        let batch: Created = http::read_json(http::post_json(self.request(Method::POST, "/batches")?, &create).await?, PROTOCOL).await?;
        Ok(batch.id)
    }

    async fn file_results(&self, file_id: &str, into: &mut Vec<BatchResult>) -> Result<(), ProviderError> {
        let response = http::send_checked(self.request(Method::GET, &format!("/files/{file_id}/content"))?).await?;
        let bytes = http::read_bytes(response).await?;
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
            let value: Value = serde_json::from_slice(line).map_err(|e| ProviderError::malformed(PROTOCOL, e))?;
            into.push(result_line(value)?);
        }
        Ok(())
    }
}

/// One output or error file line.
fn result_line(line: Value) -> Result<BatchResult, ProviderError> {
    let custom_id = line["custom_id"].as_str().ok_or_else(|| malformed(PROTOCOL, "a result line without custom_id"))?.to_owned();
    let status = line.pointer("/response/status_code").and_then(Value::as_u64).and_then(|s| u16::try_from(s).ok());
    let outcome = match (status, line.pointer("/response/body")) {
        (Some(200..=299), Some(body)) => {
            let response: ChatCompletionResponse =
                serde_json::from_value(body.clone()).map_err(|e| ProviderError::malformed(PROTOCOL, e))?;
            Ok(response)
        }
        (status, body) => {
            let message = body
                .and_then(|b| b.pointer("/error/message"))
                .or_else(|| line.pointer("/error/message"))
                .and_then(Value::as_str)
                .unwrap_or("the item failed in the provider's batch");
            Err(BatchItemError { status: status.unwrap_or(500), message: message.to_owned() })
        }
    };
    Ok(BatchResult { custom_id, outcome })
}

impl NativeBatch for OpenAiProvider {
    fn submit<'a>(&'a self, requests: &'a [BatchRequest], upstream_model: &'a str) -> BoxFuture<'a, Result<String, ProviderError>> {
        Box::pin(self.submit_file(requests, upstream_model))
    }

    fn status<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<BatchState, ProviderError>> {
        Box::pin(async move {
            let batch: BatchObject = self.get_json(&format!("/batches/{id}")).await?;
            Ok(match batch.status.as_str() {
                "validating" | "in_progress" | "finalizing" => BatchState::Running,
                // An expired batch keeps the results of what finished.
                "completed" | "expired" => BatchState::Ended,
                other => BatchState::Failed(format!("the provider's batch is {other}")),
            })
        })
    }

    fn cancel<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            http::send_checked(self.request(Method::POST, &format!("/batches/{id}/cancel"))?).await.map(drop)
        })
    }

    fn results<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<BatchResult>, ProviderError>> {
        Box::pin(async move {
            let batch: BatchObject = self.get_json(&format!("/batches/{id}")).await?;
            let mut results = Vec::new();
            for file in batch.output_file_id.iter().chain(&batch.error_file_id) {
                self.file_results(file, &mut results).await?;
            }
            Ok(results)
        })
    }
}
