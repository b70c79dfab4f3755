//! Reading request bodies: bounded reads (413 past the limit, without buffering the excess)
//! and JSON parsing whose errors name the offending field (`messages[0].role`).

use axum::body::Body;
use axum::http::HeaderMap;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::pipeline::ClientInfo;

/// The body, or 413 as soon as it passes `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if e.into_inner().downcast::<http_body_util::LengthLimitError>().is_ok() {
            ApiError::BodyTooLarge { limit }
        } else {
            ApiError::invalid("could not read the request body", None)
        }
    })
}

/// Parses JSON into `T`; on failure a 400 that names the field and what was expected.
///
/// The hot path parses once with plain `serde_json`; only a body that fails is parsed again
/// with `serde_path_to_error` to name the field (tracking the path costs on every value).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).or_else(|_| parse_json_naming_the_field(bytes))
}

/// The slow, exact parse of a body that failed: its error names the field.
fn parse_json_naming_the_field<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        // "." is the body itself; "?" a place serde could not name (a syntax error before
        // the first key): no field to point at.
        let path = if path == "?" { ".".to_owned() } else { path };
        let inner = e.into_inner();
        let message = match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("the request body is not valid JSON: {inner}")
            }
            _ if path == "." => format!("invalid request body: {inner}"),
            _ => format!("invalid value for `{path}`: {inner}"),
        };
        ApiError::invalid(message, (path != ".").then_some(path))
    })?;
    deserializer.end().map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    Ok(value)
}

/// User agent, referer and the OpenAI `user` field, for the request log; the caller's
/// `traceparent` and the request's span ids, when spans are exported.
pub fn client_info(headers: &HeaderMap, end_user: Option<&str>) -> ClientInfo {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(|s| s.chars().take(256).collect());
    ClientInfo {
        user_agent: header("user-agent"),
        referer: header("http-referer").or_else(|| header("referer")),
        end_user: end_user.map(|u| u.chars().take(256).collect()),
        span: crate::telemetry::otlp::request_span(headers),
    }
}
