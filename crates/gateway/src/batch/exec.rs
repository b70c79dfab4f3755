//! One batch item through the same pipeline as the HTTP endpoints: parse the body as the
//! endpoint's request, admit it for the batch's key (guardrail, plan, credit reservation —
//! not the per-minute limits, which are for interactive traffic), wait for a slot of the
//! first planned provider, then `chat_whole` / `completion_whole` / `embeddings_whole`
//! (first_success with failover → settle → record).
//!
//! The generation id is the item's own (`gen-<batch id>-<index>`): the ledger charge and the
//! request log record are keyed by it, so an item run twice (its worker died after the charge
//! but before the item was marked done) is charged and recorded once.

use marga_protocol::openai::{ChatCompletionRequest, CompletionRequest, EmbeddingRequest};
use marga_protocol::routing::RoutingExtensions;
use serde_json::Value;

use super::worker::ProviderSlots;
use crate::accounts::Principal;
use crate::error::ApiError;
use crate::http::admit::take_extensions;
use crate::http::chat::{begin_for, chat_whole, completion_whole, validate_chat, validate_sampling};
use crate::http::embeddings::{embeddings_whole, validate};
use crate::http::AppState;
use crate::pipeline::plan::Plan;
use crate::pipeline::{ClientInfo, Endpoint, RequestCtx};

/// The generation id of item `idx` of `batch_id`.
pub fn generation_id(batch_id: &str, idx: i64) -> String {
    format!("gen-{batch_id}-{idx}")
}

/// What an item needs to run.
pub struct Item<'a> {
    pub principal: Principal,
    pub endpoint: &'a str,
    pub body: &'a str,
    pub generation_id: String,
    /// The batch's credit lease, if its payer is limited.
    pub lease: Option<&'a str>,
}

fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, ApiError> {
    serde_json::from_str(body).map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
}

fn no_stream(stream: bool) -> Result<(), ApiError> {
    if stream {
        return Err(ApiError::invalid("`stream` is not supported in a batch", Some("stream".into())));
    }
    Ok(())
}

/// Runs the item; `Ok` is the response body.
pub async fn run(state: &AppState, slots: &ProviderSlots, item: Item<'_>) -> Result<Value, ApiError> {
    let to_value = |v: Result<Value, serde_json::Error>| v.map_err(|e| ApiError::Internal(e.into()));
    match item.endpoint {
        "/v1/embeddings" => {
            let mut request: EmbeddingRequest = parse(item.body)?;
            let ext = take_extensions(&mut request.extra)?;
            validate(&request)?;
            let shape = (Endpoint::Embeddings, false, item.body.len(), Some(0));
            let (mut ctx, plan) = begin(state, &item, &request.model, &ext, shape).await?;
            let _slot = slots.acquire(&plan).await;
            let (served, _) = embeddings_whole(state, &mut ctx, &plan, &request, ext.upstream_key.as_deref()).await?;
            to_value(serde_json::to_value(&served.value))
        }
        "/v1/completions" => {
            let mut request: CompletionRequest = parse(item.body)?;
            let ext = take_extensions(&mut request.extra)?;
            no_stream(request.stream)?;
            validate_sampling(request.temperature, request.top_p, None)?;
            let shape = (Endpoint::Completions, false, item.body.len(), request.max_tokens);
            let (mut ctx, plan) = begin(state, &item, &request.model, &ext, shape).await?;
            let _slot = slots.acquire(&plan).await;
            let (served, _) = completion_whole(state, &mut ctx, &plan, &request, ext.upstream_key.as_deref()).await?;
            to_value(serde_json::to_value(&served.value))
        }
        _ => {
            let mut request: ChatCompletionRequest = parse(item.body)?;
            let ext = take_extensions(&mut request.extra)?;
            no_stream(request.stream)?;
            validate_chat(&request)?;
            let shape = (Endpoint::Chat, false, item.body.len(), request.output_cap());
            let (mut ctx, plan) = begin(state, &item, &request.model, &ext, shape).await?;
            let _slot = slots.acquire(&plan).await;
            let (served, _) = chat_whole(state, &mut ctx, &plan, &request, ext.upstream_key.as_deref()).await?;
            to_value(served.value.to_json().and_then(|json| serde_json::from_slice(&json)))
        }
    }
}

async fn begin(
    state: &AppState,
    item: &Item<'_>,
    model: &str,
    ext: &RoutingExtensions,
    shape: (Endpoint, bool, usize, Option<u32>),
) -> Result<(RequestCtx, Plan), ApiError> {
    let client = ClientInfo { user_agent: Some("marga-batch".to_owned()), ..ClientInfo::default() };
    let (mut ctx, plan) = begin_for(state, item.principal.clone(), model, ext, shape, client, item.lease).await?;
    ctx.id.clone_from(&item.generation_id);
    Ok((ctx, plan))
}
