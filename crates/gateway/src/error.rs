//! [`ApiError`]: the one error type at the HTTP edge. It owns the status mapping and renders
//! the OpenAI envelope `{"error": {"message", "type", "code", "param"}}`; every handler returns
//! it, so no other error shape can reach a client.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use marga_protocol::openai::{ErrorBody, ErrorEnvelope};
use marga_providers::{ErrorKind, ProviderError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApiError {
    /// The body is not valid JSON or a field has the wrong type or value.
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<String>, code: &'static str },
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("missing or invalid API key")]
    InvalidApiKey,
    /// The key may not do this (a management key calling a model, a guardrail's rule…).
    #[error("{message}")]
    Forbidden { message: String },
    /// The organisation's credit does not cover the request's maximum cost.
    #[error("insufficient credits: add credits to continue")]
    InsufficientCredits,
    /// A per-minute or per-day request limit.
    #[error("{message}")]
    RateLimited { code: &'static str, message: String, retry_after_s: u64 },
    /// A key, workspace or guardrail spend cap.
    #[error("{message}")]
    BudgetExceeded { message: String },
    /// The request conflicts with the current state (e.g. a duplicate key name).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// A dependency Marga needs (the ledger) is unavailable: fail closed.
    #[error("{message}")]
    Unavailable { message: String },
    #[error("the model `{model}` does not exist")]
    ModelNotFound { model: String },
    /// A fallback model that does not exist, named by the parameter that listed it.
    #[error("the model `{model}` does not exist")]
    ModelNotFoundAt { model: String, param: String },
    /// The request's constraints leave no route (e.g. a pinned provider that is not configured).
    #[error("{message}")]
    NoRoute { message: String },
    /// The upstream refused the request itself (a 4xx other than auth and rate limits).
    #[error("{}", .source.message)]
    UpstreamRejected { provider: String, source: ProviderError },
    /// Every route was rate limited.
    #[error("{}", .source.message)]
    UpstreamRateLimited { provider: String, source: ProviderError },
    /// Every route failed; carries the last upstream error.
    #[error("all routes failed; last error from {provider}: {}", .source.message)]
    AllRoutesFailed { provider: String, source: ProviderError },
    #[error("the request timed out after {0:?}")]
    Timeout(Duration),
    /// A batch refused before anything ran; `problems` become `error.details.preflight`.
    #[error("{message}")]
    Preflight { message: String, problems: Vec<serde_json::Value> },
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<String>) -> Self {
        ApiError::InvalidRequest { message: message.into(), param, code: "invalid_request" }
    }

    /// The same refusal with a more specific `code`.
    pub fn with_code(self, code: &'static str) -> Self {
        match self {
            ApiError::InvalidRequest { message, param, .. } => ApiError::InvalidRequest { message, param, code },
            other => other,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::NoRoute { .. } | ApiError::Preflight { .. } => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::InsufficientCredits => StatusCode::PAYMENT_REQUIRED,
            ApiError::RateLimited { .. } | ApiError::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Conflict { code, .. } if *code == "duplicate_key_name" => StatusCode::BAD_REQUEST,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::ModelNotFound { .. } | ApiError::ModelNotFoundAt { .. } | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UpstreamRejected { source, .. } => {
                source.status.and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ApiError::UpstreamRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::AllRoutesFailed { .. } => StatusCode::BAD_GATEWAY,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable `code`; also the metrics label.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { code, .. } | ApiError::RateLimited { code, .. } | ApiError::Conflict { code, .. } => code,
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::InsufficientCredits => "insufficient_credits",
            ApiError::BudgetExceeded { .. } => "budget_exceeded",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::BodyTooLarge { .. } => "request_too_large",
            ApiError::InvalidApiKey => "invalid_api_key",
            ApiError::ModelNotFound { .. } | ApiError::ModelNotFoundAt { .. } => "model_not_found",
            ApiError::NoRoute { .. } => "no_route",
            ApiError::Preflight { .. } => "preflight_failed",
            ApiError::UpstreamRejected { .. } => "upstream_rejected",
            ApiError::UpstreamRateLimited { .. } => "rate_limit_exceeded",
            ApiError::AllRoutesFailed { .. } => "all_routes_failed",
            ApiError::Timeout(_) => "timeout",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Internal(_) => "internal_error",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidApiKey => "authentication_error",
            ApiError::Forbidden { .. } => "permission_error",
            ApiError::InsufficientCredits => "insufficient_credits",
            ApiError::RateLimited { .. } | ApiError::BudgetExceeded { .. } => "rate_limit_error",
            ApiError::Unavailable { .. } => "server_error",
            ApiError::UpstreamRateLimited { .. } => "rate_limit_error",
            ApiError::AllRoutesFailed { .. } | ApiError::Timeout(_) => "upstream_error",
            ApiError::Internal(_) => "server_error",
            ApiError::ModelNotFound { .. } | ApiError::ModelNotFoundAt { .. } | ApiError::NotFound => "not_found_error",
            _ => "invalid_request_error",
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            ApiError::ModelNotFound { .. } => Some("model".to_owned()),
            ApiError::ModelNotFoundAt { param, .. } => Some(param.clone()),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::UpstreamRateLimited { source, .. } => Some(source.retry_after.unwrap_or(Duration::from_secs(1))),
            ApiError::RateLimited { retry_after_s, .. } => Some(Duration::from_secs(*retry_after_s)),
            ApiError::BudgetExceeded { .. } => Some(Duration::from_secs(60)),
            ApiError::AllRoutesFailed { source, .. } => source.retry_after,
            _ => None,
        }
    }

    /// The upstream's provider id and status, for `error.metadata` (OpenRouter's shape).
    fn metadata(&self) -> Option<serde_json::Value> {
        match self {
            ApiError::UpstreamRejected { provider, source }
            | ApiError::UpstreamRateLimited { provider, source }
            | ApiError::AllRoutesFailed { provider, source } => Some(serde_json::json!({
                "provider_name": provider,
                "upstream_status": source.status,
                "error_type": source.kind.as_str(),
            })),
            _ => None,
        }
    }

    /// The envelope, also used for the in-band error event of a broken stream.
    pub fn envelope(&self) -> ErrorEnvelope {
        ErrorEnvelope {
            error: ErrorBody {
                message: self.to_string(),
                kind: Some(self.kind().to_owned()),
                code: Some(serde_json::Value::String(self.code().to_owned())),
                param: self.param(),
                metadata: self.metadata(),
                details: match self {
                    ApiError::Preflight { problems, .. } => Some(serde_json::json!({ "preflight": problems })),
                    _ => None,
                },
            },
        }
    }

    /// Maps the last failure of the attempt loop to what the client sees.
    pub fn from_upstream(provider: &str, error: ProviderError) -> Self {
        let provider = provider.to_owned();
        match error.kind {
            ErrorKind::InvalidRequest => ApiError::UpstreamRejected { provider, source: error },
            ErrorKind::RateLimited => ApiError::UpstreamRateLimited { provider, source: error },
            _ => ApiError::AllRoutesFailed { provider, source: error },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = %e, "internal error");
        }
        let status = self.status();
        let retry_after = self.retry_after();
        metrics::counter!("marga_errors_total", "code" => self.code()).increment(1);
        let mut response = (status, axum::Json(self.envelope())).into_response();
        if let Some(after) = retry_after {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}
