//! Runs a batch on its provider's native batch API (`lane = native`, see [`super::lanes`]).
//!
//! One worker at a time drives a native-lane batch: it holds the batch's native lease in the
//! store (renewed at every poll; another instance, or the restarted one, takes over once it
//! lapses). The driver
//!
//! 1. submits every pending item once (each checked like a realtime item — a refused one gets
//!    its error line instead — and re-planned with its own routing preferences: if the native
//!    route is no longer in an item's plan — residency, say — nothing is submitted), and
//!    stores the provider's batch id before anything else. A driver that
//!    finds the id stored resumes polling: a restart never submits again. (A crash between
//!    the provider accepting the batch and the id being stored would submit again; the items
//!    would still be charged once, below.)
//! 2. polls the provider's batch every `[batch] native_poll_ms`;
//! 3. when it has ended, writes each item's result and charges it at the route's **batch
//!    price** through the same ledger path as a realtime item (credit from the batch's lease,
//!    keyed by the item's generation id `gen-<batch>-<index>`, so a result written twice is
//!    charged once), completing the item only while it is still pending.
//!
//! A submission the provider refuses, a provider batch that fails as a whole, and items
//! without a result all **fall back to the realtime lane**: the batch's lane becomes
//! `realtime` and the ordinary worker claims what is still pending. A native-lane batch that
//! ends cancelled or expired has its provider batch cancelled ([`cancel_provider_batch`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use marga_protocol::openai::{ChatCompletionRequest, ChatCompletionResponse, Usage};
use marga_providers::{BatchItemError, BatchRequest, BatchState, NativeBatch};
use marga_store::{BatchRecord, ClaimedItem, LANE_NATIVE};
use serde_json::{json, Value};

use super::exec::generation_id;
use super::shapes::result_line;
use crate::error::ApiError;
use crate::http::admit::take_extensions;
use crate::http::AppState;
use crate::pipeline::{record, settle_at, ClientInfo, Endpoint, Outcome};
use crate::registry::{Model, Route};
use crate::tokens;

/// Pending items read per page.
const PAGE: i64 = 1000;

/// What the driver does next.
enum Next {
    /// Poll again after `native_poll_ms`.
    Wait,
    /// Stop driving this batch (it ended, fell back, or is another worker's).
    Stop,
}

/// Drives one native-lane batch until it no longer needs this worker.
pub async fn drive(state: AppState, owner: String, batch_id: String, org_id: String) {
    let settings = &state.batches.settings;
    let poll = Duration::from_millis(settings.native_poll_ms.max(10));
    // The lease outlives a few polls, so that a live driver never loses it between two.
    let lease = Duration::from_secs(settings.item_lease_s.max(1)).max(poll * 3);
    loop {
        match step(&state, &owner, lease, &org_id, &batch_id).await {
            Ok(Next::Wait) => tokio::time::sleep(poll).await,
            Ok(Next::Stop) => return,
            Err(e) => {
                tracing::warn!(batch = %batch_id, error = %e, "native batch lane: will try again");
                tokio::time::sleep(poll).await;
            }
        }
    }
}

fn store_error(e: marga_store::StoreError) -> ApiError {
    super::create::store_error(e)
}

/// One pass: lease, submit if needed, poll, and take the results when the batch has ended.
async fn step(state: &AppState, owner: &str, lease: Duration, org_id: &str, id: &str) -> Result<Next, ApiError> {
    let store = &state.batches.store;
    let now = crate::pipeline::unix_now_ms();
    let until = now + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
    if !store.lease_native(id, owner, now, until).await.map_err(store_error)? {
        return Ok(Next::Stop);
    }
    let Some(batch) = store.get_batch(org_id, id).await.map_err(store_error)? else { return Ok(Next::Stop) };
    if batch.lane != LANE_NATIVE || batch.status != "in_progress" {
        return Ok(Next::Stop);
    }
    // Every item has its result: the worker finalizes the batch.
    let Some(first) = store.pending_items(id, -1, 1).await.map_err(store_error)?.pop() else { return Ok(Next::Stop) };
    let Some((model, route)) = native_route(state, &batch, &first) else {
        return fall_back(state, &batch, "its native route is no longer configured").await;
    };
    let Some(native) = route.provider.client.native_batch() else {
        return fall_back(state, &batch, "the provider has no native batch API").await;
    };
    let provider_batch = match &batch.native_batch_id {
        Some(provider_batch) => provider_batch.clone(),
        None => match submit(state, &batch, &pending(state, id).await?, (&model, &route), native).await {
            Ok(Some(provider_batch)) if store.set_native_batch_id(id, owner, &provider_batch).await.map_err(store_error)? => provider_batch,
            Ok(_) => return Ok(Next::Stop),
            Err(reason) => return fall_back(state, &batch, &reason).await,
        },
    };
    match native.status(&provider_batch).await {
        Ok(BatchState::Running) => Ok(Next::Wait),
        Ok(BatchState::Failed(reason)) => fall_back(state, &batch, &reason).await,
        Ok(BatchState::Ended) => {
            let items = pending(state, id).await?;
            take_results(state, &batch, &items, (&model, &route), native, &provider_batch).await
        }
        Err(e) if e.is_retryable() => Err(ApiError::Unavailable { message: format!("polling the provider's batch: {e}") }),
        Err(e) => fall_back(state, &batch, &e.to_string()).await,
    }
}

/// The batch's pending items, in order.
async fn pending(state: &AppState, id: &str) -> Result<Vec<ClaimedItem>, ApiError> {
    let mut items = Vec::new();
    let mut after = -1;
    loop {
        let page = state.batches.store.pending_items(id, after, PAGE).await.map_err(store_error)?;
        let Some(last) = page.last() else { break };
        after = last.idx;
        items.extend(page);
    }
    Ok(items)
}

/// An item's endpoint and chat request (native items are stored with their endpoint).
fn chat_request(batch: &BatchRecord, item: &ClaimedItem) -> Option<ChatCompletionRequest> {
    let body = match batch.endpoint.as_str() {
        super::native::NATIVE => {
            let (endpoint, body) = super::native::from_stored(&item.body)?;
            (endpoint == "/v1/chat/completions").then_some(body)?
        }
        "/v1/chat/completions" => item.body.clone(),
        _ => return None,
    };
    serde_json::from_str(&body).ok()
}

/// The model and the batch's native route (by the first item's model and the recorded label).
fn native_route(state: &AppState, batch: &BatchRecord, item: &ClaimedItem) -> Option<(Arc<Model>, Arc<Route>)> {
    let model = Arc::clone(state.registry.model(&chat_request(batch, item)?.model)?);
    let label = batch.lane_route.as_deref()?;
    let route = model.routes.iter().find(|r| r.label() == label && r.batch_price.is_some()).cloned()?;
    Some((model, route))
}

/// Moves the batch to the realtime lane; the worker then claims its pending items.
async fn fall_back(state: &AppState, batch: &BatchRecord, reason: &str) -> Result<Next, ApiError> {
    tracing::warn!(batch = %batch.id, %reason, "native batch lane: falling back to the realtime lane");
    state.batches.store.fall_back_to_realtime(&batch.id).await.map_err(store_error)?;
    state.batches.wake.notify_waiters();
    Ok(Next::Stop)
}

/// The provider-side id of item `idx`.
fn custom_id(idx: i64) -> String {
    format!("item-{idx}")
}

/// Why an item is not submitted.
enum Unfit {
    /// The item itself is refused, as the realtime lane would refuse it: an error line.
    Invalid(ApiError),
    /// The native route cannot take it (its plan no longer keeps the route): the whole batch
    /// goes to the realtime lane.
    NotKept(String),
}

/// The item's request as it goes to the provider: checked like a realtime item (body,
/// extensions, `stream`, ranges, guardrails) and planned with its own preferences, which must
/// still keep the native route (residency fails closed).
fn prepare(state: &AppState, principal: &crate::accounts::Principal, batch: &BatchRecord, item: &ClaimedItem, lane: (&Arc<Model>, &Arc<Route>)) -> Result<ChatCompletionRequest, Unfit> {
    let mut request = chat_request(batch, item).ok_or_else(|| Unfit::Invalid(ApiError::invalid("invalid request body", None)))?;
    let ext = take_extensions(&mut request.extra).map_err(Unfit::Invalid)?;
    if request.stream {
        return Err(Unfit::Invalid(ApiError::invalid("`stream` is not supported in a batch", Some("stream".into()))));
    }
    crate::http::chat::validate_chat(&request).map_err(Unfit::Invalid)?;
    let admitted = crate::http::admit::admit(state, principal, &request.model, &ext, crate::config::ModelType::Chat).map_err(Unfit::Invalid)?;
    let (model, route) = lane;
    let kept = admitted.plan.candidates.iter().any(|c| Arc::ptr_eq(&c.route, route) && Arc::ptr_eq(&c.model, model));
    if !kept || ext.upstream_key.is_some() {
        return Err(Unfit::NotKept(format!("item {}'s plan does not keep the native route", item.idx)));
    }
    Ok(request)
}

/// Completes a refused item with its error line (not charged).
async fn refuse(state: &AppState, batch: &BatchRecord, item: &ClaimedItem, e: &ApiError) -> Result<(), String> {
    let body = serde_json::to_value(e.envelope()).unwrap_or(Value::Null);
    let line = result_line(&batch.id, item.idx, &item.custom_id, e.status().as_u16(), &generation_id(&batch.id, item.idx), &body);
    state.batches.store.complete_native_item(&batch.id, item.idx, &line, true).await.map(drop).map_err(|e| e.to_string())
}

/// Submits every pending item that is fit (`Ok(None)`: none is). `Err` is why the native lane
/// cannot run the batch.
async fn submit(
    state: &AppState,
    batch: &BatchRecord,
    items: &[ClaimedItem],
    lane: (&Arc<Model>, &Arc<Route>),
    native: &dyn NativeBatch,
) -> Result<Option<String>, String> {
    let principal = state.admission.accounts.principal_of(&batch.org_id, &batch.key_id).ok_or("the batch's key is gone")?;
    let mut requests = Vec::with_capacity(items.len());
    for item in items {
        match prepare(state, &principal, batch, item, lane) {
            Ok(request) => requests.push(BatchRequest { custom_id: custom_id(item.idx), request }),
            Err(Unfit::Invalid(e)) => refuse(state, batch, item, &e).await?,
            Err(Unfit::NotKept(reason)) => return Err(reason),
        }
    }
    if requests.is_empty() {
        return Ok(None);
    }
    let submitted = native.submit(&requests, &lane.1.upstream_model).await;
    submitted.map(Some).map_err(|e| format!("the provider refused the batch: {e}"))
}

/// Writes and charges every result; what has none runs on the realtime lane.
async fn take_results(
    state: &AppState,
    batch: &BatchRecord,
    items: &[ClaimedItem],
    lane: (&Arc<Model>, &Arc<Route>),
    native: &dyn NativeBatch,
    provider_batch: &str,
) -> Result<Next, ApiError> {
    let results = match native.results(provider_batch).await {
        Ok(results) => results,
        Err(e) if e.is_retryable() => return Err(ApiError::Unavailable { message: format!("fetching the provider's results: {e}") }),
        Err(e) => return fall_back(state, batch, &e.to_string()).await,
    };
    let by_id: HashMap<String, &ClaimedItem> = items.iter().map(|i| (custom_id(i.idx), i)).collect();
    let mut done = 0;
    for result in results {
        let Some(item) = by_id.get(&result.custom_id) else { continue };
        let Some((line, is_error)) = item_line(state, batch, item, lane, result.outcome).await? else { continue };
        if state.batches.store.complete_native_item(&batch.id, item.idx, &line, is_error).await.map_err(store_error)? {
            done += 1;
        }
    }
    if done < items.len() {
        return fall_back(state, batch, "some items have no result from the provider").await;
    }
    state.batches.wake.notify_waiters();
    Ok(Next::Stop)
}

/// The OpenAI error envelope of an item the provider refused.
fn item_error(e: &BatchItemError) -> Value {
    let kind = if e.status < 500 { "invalid_request_error" } else { "upstream_error" };
    json!({"error": {"message": e.message, "type": kind, "code": "upstream_error", "param": null}})
}

/// The item's output line and whether it is an error; `None` when it was not answered (it
/// will run on the realtime lane). A success is charged at the batch price first.
async fn item_line(
    state: &AppState,
    batch: &BatchRecord,
    item: &ClaimedItem,
    lane: (&Arc<Model>, &Arc<Route>),
    outcome: Result<ChatCompletionResponse, BatchItemError>,
) -> Result<Option<(String, bool)>, ApiError> {
    let generation = generation_id(&batch.id, item.idx);
    let line = |status: u16, body: &Value, is_error: bool| {
        Some((result_line(&batch.id, item.idx, &item.custom_id, status, &generation, body), is_error))
    };
    let response = match outcome {
        Ok(response) => response,
        Err(e) => return Ok(line(e.status, &item_error(&e), true)),
    };
    let Some(request) = chat_request(batch, item) else { return Ok(None) };
    match charge(state, batch, item, &request, lane, response).await {
        Ok(body) => Ok(line(200, &body, false)),
        // The ledger or the store: the results are fetched again at the next poll.
        Err(e @ ApiError::Unavailable { .. }) => Err(e),
        Err(e) => Ok(line(e.status().as_u16(), &serde_json::to_value(e.envelope()).unwrap_or(Value::Null), true)),
    }
}

/// Admits the item as it would run (guardrails, spend caps, credit from the batch's lease),
/// charges its usage at the route's batch price, records it, and returns the response body.
async fn charge(
    state: &AppState,
    batch: &BatchRecord,
    item: &ClaimedItem,
    request: &ChatCompletionRequest,
    (model, route): (&Arc<Model>, &Arc<Route>),
    mut response: ChatCompletionResponse,
) -> Result<Value, ApiError> {
    let principal = state.admission.accounts.principal_of(&batch.org_id, &batch.key_id).ok_or(ApiError::InvalidApiKey)?;
    let mut request = request.clone();
    let ext = take_extensions(&mut request.extra)?;
    let shape = (Endpoint::Chat, false, item.body.len(), request.output_cap());
    let client = ClientInfo { user_agent: Some("marga-batch-native".to_owned()), ..ClientInfo::default() };
    let lease = batch.credit_lease_id.as_deref();
    let (mut ctx, _) = crate::http::chat::begin_for(state, principal, &request.model, &ext, shape, client, lease).await?;
    ctx.id = generation_id(&batch.id, item.idx);
    let estimated = response.usage.is_none();
    let mut usage = response.usage.take().unwrap_or_else(|| {
        let text: String = response.choices.iter().filter_map(|c| c.message.content.as_deref()).collect();
        Usage::new(tokens::prompt_tokens(&request), tokens::count(&text))
    });
    let price = route.batch_price.as_ref().unwrap_or(&route.price);
    let cost = settle_at(&mut ctx, price, &mut usage).await?;
    let finish = response.choices.first().and_then(|c| c.finish_reason.as_ref()).map(|reason| reason.as_str().to_owned());
    let outcome = Outcome {
        status: "success",
        http_status: 200,
        route: Some(route),
        usage: Some(&usage),
        usage_estimated: estimated,
        ttft_ms: None,
        finish_reason: finish,
        error: None,
        cost,
    };
    state.log.record(record(&ctx, &outcome));
    response.usage = Some(usage);
    response.id.clone_from(&ctx.id);
    response.model.clone_from(&model.id);
    serde_json::to_value(&response).map_err(|e| ApiError::Internal(e.into()))
}

/// Asks the provider to stop the batch's native batch (best effort: it is logged when it
/// fails). Called when a native-lane batch ends cancelled or expired.
pub async fn cancel_provider_batch(state: &AppState, batch: &BatchRecord) {
    let (Some(provider_batch), Some(label)) = (&batch.native_batch_id, &batch.lane_route) else { return };
    let route = state.registry.routes().map(|(_, r)| r).find(|r| &r.label() == label);
    let Some(native) = route.and_then(|r| r.provider.client.native_batch()) else { return };
    match native.cancel(provider_batch).await {
        Ok(()) => tracing::info!(batch = %batch.id, %provider_batch, "native batch lane: the provider's batch was cancelled"),
        Err(e) => tracing::warn!(batch = %batch.id, %provider_batch, error = %e, "native batch lane: could not cancel the provider's batch"),
    }
}
