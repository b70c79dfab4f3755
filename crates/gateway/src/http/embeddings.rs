//! `POST /v1/embeddings`; [`embeddings_whole`] is shared with batch items.

use axum::body::Body;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::Response;
use marga_protocol::openai::{EmbeddingRequest, EmbeddingResponse, EmbeddingVector, Usage};
use marga_providers::Call;

use super::admit::take_extensions;
use super::chat::{begin_request, settle_whole, Sender};
use super::extract::{parse_json, read_body};
use super::respond::{json_response, record_failure};
use super::AppState;
use crate::error::ApiError;
use crate::money::Money;
use crate::pipeline::attempt::{first_success, Served};
use crate::pipeline::plan::Plan;
use crate::pipeline::{Endpoint, RequestCtx};
use crate::tokens;

/// The most inputs one request may embed (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

pub(crate) fn validate(request: &EmbeddingRequest) -> Result<(), ApiError> {
    if request.input.is_empty() {
        return Err(ApiError::invalid("`input` must not be empty", Some("input".into())));
    }
    if request.input.texts().len() > MAX_INPUTS {
        return Err(ApiError::invalid(format!("`input` may hold at most {MAX_INPUTS} items"), Some("input".into())));
    }
    if let Some(format) = request.encoding_format.as_deref().filter(|f| !matches!(*f, "float" | "base64")) {
        let message = format!("`encoding_format` must be \"float\" or \"base64\", not \"{format}\"");
        return Err(ApiError::invalid(message, Some("encoding_format".into())));
    }
    Ok(())
}

pub async fn embeddings(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    let bytes = read_body(body, state.max_body).await?;
    let mut request: EmbeddingRequest = parse_json(&bytes)?;
    let ext = take_extensions(&mut request.extra)?;
    validate(&request)?;
    let shape = (Endpoint::Embeddings, false, bytes.len(), Some(0));
    let (mut ctx, plan) = begin_request(&state, Sender { principal, headers: &headers, peer }, &request.model, &ext, shape, request.user.as_deref()).await?;
    let key = ext.upstream_key.as_deref();
    let (served, cost) = embeddings_whole(&state, &mut ctx, &plan, &request, key).await?;
    Ok(json_response(serde_json::to_vec(&served.value), &ctx, &plan, &served.candidate, cost))
}

/// An embeddings answer: attempts with failover, estimated usage when the upstream reports
/// none, the requested encoding, settled and recorded. Shared with batch items.
pub(crate) async fn embeddings_whole(
    state: &AppState,
    ctx: &mut RequestCtx,
    plan: &Plan,
    request: &EmbeddingRequest,
    key: Option<&str>,
) -> Result<(Served<EmbeddingResponse>, Option<Money>), ApiError> {
    let mut served = first_success(ctx, &plan.candidates, &state.routing, |c| async move {
        let call = Call { request, upstream_model: &c.route.upstream_model, api_key: key };
        c.route.provider.client.embeddings(call).await
    })
    .await
    .map_err(|e| record_failure(state, ctx, e))?;
    let response = &mut served.value;
    let estimated = response.usage.is_none();
    if estimated {
        let prompt = request.input.texts().iter().map(|t| tokens::count(t)).sum();
        response.usage = Some(Usage { prompt_tokens: prompt, total_tokens: prompt, ..Usage::default() });
    }
    response.model.clone_from(&served.candidate.model.id);
    if request.encoding_format.as_deref() == Some("base64") {
        encode_floats_as_base64(&mut response.data);
    }
    let cost = settle_whole(state, ctx, &mut served, |r| &mut r.usage, estimated, None).await?;
    Ok((served, cost))
}

/// `encoding_format: "base64"` asks for each vector as base64 of little-endian `f32`s (what the
/// official SDKs request by default). A provider that answered with float arrays anyway (the
/// sandbox; OpenAI-compatible servers that ignore the field) is converted here, so the client
/// always gets what it asked for.
fn encode_floats_as_base64(data: &mut [marga_protocol::openai::Embedding]) {
    for item in data {
        if let Some(floats) = item.embedding.to_floats() {
            item.embedding = EmbeddingVector::base64_of_floats(&floats);
        }
    }
}

/// RFC 4648 base64 with padding.
#[cfg(test)]
mod base64_tests {
    use super::*;

    #[test]
    fn float_vectors_become_little_endian_f32_base64() {
        let embedding = |index, value| marga_protocol::openai::Embedding { object: "embedding".to_owned(), index, embedding: value };
        let mut data = vec![embedding(0, EmbeddingVector::floats(&[1.0, -2.0])), embedding(1, EmbeddingVector::base64("AACAPwAAAMA="))];
        encode_floats_as_base64(&mut data);
        assert_eq!(data[0].embedding.json(), "\"AACAPwAAAMA=\"");
        assert_eq!(data[1].embedding.json(), "\"AACAPwAAAMA=\"", "already base64: left alone");
    }
}
