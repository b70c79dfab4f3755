//! `POST /v1/batches` in the OpenAI shape: `{input_file_id, endpoint, completion_window,
//! metadata}`. The input file is read line by line; every line must target the batch's
//! endpoint, have a unique `custom_id` and a body that parses as that endpoint's request for
//! a model the caller may use. The whole batch's maximum cost is reserved at creation, as a
//! credit lease of the batch's own in the database; each item is charged against it (once,
//! by its item id) and the lease is closed when the batch ends, returning what was not used.
//! The batch's lane (realtime, or a provider's native batch API) is chosen here and recorded
//! on the batch (see [`super::lanes`]).

use std::collections::HashSet;

use marga_protocol::openai::{ChatCompletionRequest, CompletionRequest, EmbeddingRequest};
use marga_store::{BatchRecord, NewItem, LANE_NATIVE, LANE_REALTIME};
use serde::Deserialize;

use super::files::read_batch_lines;
use super::lanes::{Sample, Tally};
use super::ENDPOINTS;
use crate::accounts::Principal;
use crate::config::ModelType;
use crate::error::ApiError;
use crate::http::AppState;
use crate::money::{Money, TokenCounts};
use crate::pipeline::unix_now_ms;

/// How long a batch may take (the only window OpenAI offers).
pub const COMPLETION_WINDOW: &str = "24h";
pub(crate) const WINDOW_MS: i64 = 24 * 3600 * 1000;
/// Most metadata pairs, and longest key and value (OpenAI's limits).
const MAX_METADATA: usize = 16;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Accepted and ignored (OpenAI's output expiry policy): files are kept until deleted.
    #[serde(default)]
    pub output_expires_after: Option<serde_json::Value>,
}

fn check_request(req: &CreateBatch) -> Result<(), ApiError> {
    if !ENDPOINTS.contains(&req.endpoint.as_str()) {
        let message = format!("`endpoint` must be one of {}", ENDPOINTS.join(", "));
        return Err(ApiError::invalid(message, Some("endpoint".into())));
    }
    if req.completion_window != COMPLETION_WINDOW {
        return Err(ApiError::invalid("`completion_window` must be \"24h\"", Some("completion_window".into())));
    }
    check_metadata(req.metadata.as_ref())
}

/// OpenAI's metadata rules: at most 16 string values, keys ≤ 64 and values ≤ 512 characters.
pub(crate) fn check_metadata(metadata: Option<&serde_json::Map<String, serde_json::Value>>) -> Result<(), ApiError> {
    let Some(meta) = metadata else { return Ok(()) };
    let bad = meta.len() > MAX_METADATA || meta.iter().any(|(k, v)| k.len() > 64 || v.as_str().is_none_or(|s| s.len() > 512));
    if bad {
        let message = "`metadata` holds at most 16 string values (keys ≤ 64, values ≤ 512 characters)";
        return Err(ApiError::invalid(message, Some("metadata".into())));
    }
    Ok(())
}

/// Checks the request and the file, checks the credit, and stores the batch and its items.
pub async fn create(state: &AppState, principal: &Principal, req: CreateBatch) -> Result<BatchRecord, ApiError> {
    check_request(&req)?;
    let batches = &state.batches;
    let file = batches.store.get_file(&principal.org.id, &req.input_file_id).await.map_err(store_error)?;
    let file = file.ok_or_else(|| ApiError::invalid(format!("no file `{}`", req.input_file_id), Some("input_file_id".into())))?;
    if file.purpose != "batch" {
        return Err(ApiError::invalid("the input file's purpose must be \"batch\"", Some("input_file_id".into())));
    }
    let (items, max_cost, lanes) = read_items(state, principal, &req.endpoint, &batches.path_of(&file.id)).await?;
    if items.is_empty() {
        return Err(ApiError::invalid("the input file holds no requests", Some("input_file_id".into())));
    }
    let choice = choose_lane(lanes.as_ref(), WINDOW_MS);
    let now = unix_now_ms();
    let id = format!("batch_{}", uuid::Uuid::now_v7().simple());
    // The whole batch's maximum cost is reserved now, as a lease its items are charged against.
    let lease = state.admission.reserve_batch(principal, max_cost, &id, now + WINDOW_MS + LEASE_MARGIN_MS).await?;
    let batch = BatchRecord {
        id,
        org_id: principal.org.id.clone(),
        key_id: principal.key.id.clone(),
        endpoint: req.endpoint,
        input_file_id: file.id,
        completion_window: req.completion_window,
        metadata: req.metadata.map(|m| serde_json::Value::Object(m).to_string()),
        status: "in_progress".to_owned(),
        total: items.len() as i64,
        created_at_ms: now,
        in_progress_at_ms: Some(now),
        expires_at_ms: now + WINDOW_MS,
        credit_lease_id: lease,
        lane: choice.lane,
        lane_route: choice.route,
        rejected_lanes: choice.rejected,
        ..BatchRecord::default()
    };
    store_batch(state, &batch, &items).await?;
    batches.wake.notify_waiters();
    Ok(batch)
}

/// The items of the input file (each line checked), their maximum cost and lane tally.
async fn read_items(
    state: &AppState,
    principal: &Principal,
    endpoint: &str,
    path: &std::path::Path,
) -> Result<(Vec<NewItem>, Money, Option<Tally>), ApiError> {
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    let mut max_cost = Money::zero(principal.org.currency);
    let max_items = state.batches.settings.max_items;
    let mut lanes = None;
    read_batch_lines(path, |number, line| {
        let at = |m: String| ApiError::invalid(format!("input file line {number}: {m}"), Some("input_file_id".into()));
        if line.url != endpoint {
            return Err(at(format!("`url` is {} but the batch's endpoint is {}", line.url, endpoint)));
        }
        if !seen.insert(line.custom_id.clone()) {
            return Err(at(format!("`custom_id` \"{}\" is used twice", line.custom_id)));
        }
        if items.len() >= max_items {
            return Err(at(format!("a batch holds at most {max_items} requests")));
        }
        let cost = item_max_cost(state, principal, endpoint, line.body.get(), &mut lanes).map_err(|e| at(e.to_string()))?;
        max_cost.amount += state.registry.fx.convert(cost, principal.org.currency).amount;
        items.push(NewItem { custom_id: line.custom_id, body: line.body.get().to_owned() });
        Ok(())
    })
    .await?;
    Ok((items, max_cost, lanes))
}

/// The most one item can cost: its body parsed as the endpoint's request, its model admitted
/// for the caller, priced on the dearest planned route. The item is also added to the batch's
/// lane tally (planned with its own routing preferences, as it would run).
pub(crate) fn item_max_cost(
    state: &AppState,
    principal: &Principal,
    endpoint: &str,
    body: &str,
    lanes: &mut Option<Tally>,
) -> Result<Money, ApiError> {
    let parse_error = |e: serde_json::Error| ApiError::invalid(format!("invalid `body`: {e}"), None);
    let (model, kind, output_cap, extra) = match endpoint {
        "/v1/embeddings" => {
            let r: EmbeddingRequest = serde_json::from_str(body).map_err(parse_error)?;
            (r.model, ModelType::Embedding, Some(0), r.extra)
        }
        "/v1/completions" => {
            let r: CompletionRequest = serde_json::from_str(body).map_err(parse_error)?;
            (r.model, ModelType::Chat, r.max_tokens, r.extra)
        }
        _ => {
            let r: ChatCompletionRequest = serde_json::from_str(body).map_err(parse_error)?;
            let cap = r.output_cap();
            (r.model, ModelType::Chat, cap, r.extra)
        }
    };
    let admitted = crate::http::admit::admit(state, principal, &model, &Default::default(), kind)?;
    let tokens = TokenCounts {
        prompt: body.len() as u64 / 4,
        completion: output_cap.map_or(super::quote::ASSUMED_OUTPUT, u64::from),
        cached: 0,
    };
    let chat = endpoint == "/v1/chat/completions";
    tally_item(state, principal, (&admitted, kind, extra), tokens, chat, lanes);
    Ok(crate::http::admit::max_cost(state, &admitted, body.len(), output_cap))
}

/// Adds an item to the lane tally, planned with its own routing preferences.
fn tally_item(
    state: &AppState,
    principal: &Principal,
    (admitted, kind, mut extra): (&crate::http::admit::Admitted, ModelType, marga_protocol::openai::Extra),
    tokens: TokenCounts,
    chat: bool,
    lanes: &mut Option<Tally>,
) {
    let ext = crate::http::admit::take_extensions(&mut extra).unwrap_or_default();
    let own = crate::http::admit::admit(state, principal, &admitted.model.id, &ext, kind);
    let plan = own.as_ref().map(|a| &a.plan).map_err(|_| "no_route");
    let tally = lanes.get_or_insert_with(|| Tally::new(&admitted.model));
    let sample = Sample { model: &admitted.model, plan, tokens, chat, byok: ext.upstream_key.is_some() };
    tally.add(&sample, &state.registry.fx);
}

/// The lane a batch runs on — the native lane when it is the cheaper one that meets
/// `window_ms`, else realtime — with the lanes it does not take and why.
pub(crate) fn choose_lane(lanes: Option<&Tally>, window_ms: i64) -> LaneChoice {
    let Some(tally) = lanes else {
        return LaneChoice { lane: LANE_REALTIME.to_owned(), route: None, rejected: None };
    };
    let decision = tally.decide(window_ms);
    let chosen = decision.native.as_ref().map(|r| r.label());
    let mut rejected: Vec<serde_json::Value> = decision
        .lanes
        .iter()
        .map(|l| (l.route.label(), l.rejection))
        .filter(|(route, _)| Some(route) != chosen.as_ref())
        .map(|(route, reason)| serde_json::json!({"kind": LANE_NATIVE, "route": route, "reason": reason.unwrap_or("not_cheapest")}))
        .collect();
    if chosen.is_some() {
        rejected.push(serde_json::json!({"kind": LANE_REALTIME, "reason": "not_cheaper"}));
    }
    let lane = if chosen.is_some() { LANE_NATIVE } else { LANE_REALTIME };
    LaneChoice { lane: lane.to_owned(), route: chosen, rejected: Some(serde_json::Value::Array(rejected).to_string()) }
}

/// The lane a batch runs on, its route (native lane), and the lanes it does not take with the
/// reason (JSON, for the billing receipt's `rejected_lanes`).
pub(crate) struct LaneChoice {
    pub lane: String,
    pub route: Option<String>,
    pub rejected: Option<String>,
}

/// A batch's credit lease outlives its window by this much (then expires by itself).
pub(crate) const LEASE_MARGIN_MS: i64 = 3600 * 1000;

/// Stores the batch and its items; on failure gives its credit lease back.
pub(crate) async fn store_batch(state: &AppState, batch: &BatchRecord, items: &[NewItem]) -> Result<(), ApiError> {
    let Err(e) = state.batches.store.create_batch(batch, items).await else { return Ok(()) };
    if let Some(lease) = &batch.credit_lease_id {
        let _ = state.admission.ledger.repo().close_lease(lease).await;
    }
    Err(store_error(e))
}

pub fn store_error(e: marga_store::StoreError) -> ApiError {
    ApiError::Unavailable { message: format!("the batch store is unavailable: {e}") }
}
