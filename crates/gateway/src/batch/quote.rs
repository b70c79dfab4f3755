//! `POST /v1/quotes/model`: a free estimate from sample items, before anything is created or
//! reserved. Each sample item is planned exactly as it would run (guardrails, residency and
//! data policy, breakers); the first planned route of each model is the selected lane, the
//! other candidates are listed as standbys (failover order), and the routes the plan excluded
//! are rejected lanes with the reason. Costs are the item's prompt tokens (counted) and its
//! output cap (`max_tokens`, else [`ASSUMED_OUTPUT`]) at the lane's prices, in the caller's
//! currency.
//!
//! Only realtime lanes exist: Marga does not run provider-native batch APIs yet.

use std::collections::BTreeMap;

use marga_protocol::openai::{ChatCompletionRequest, EmbeddingRequest};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};

use super::native::{to_request, NativeItem};
use crate::accounts::Principal;
use crate::config::ModelType;
use crate::error::ApiError;
use crate::http::admit::take_extensions;
use crate::http::AppState;
use crate::money::{Currency, Fx, TokenCounts};
use crate::pipeline::plan::Plan;
use crate::pipeline::unix_now_ms;

/// Output tokens assumed for an item that does not cap them.
pub const ASSUMED_OUTPUT: u64 = 256;
/// Most sample items one quote looks at.
const MAX_SAMPLE: usize = 1000;
/// How long a quote is meant to hold.
const QUOTE_TTL_S: i64 = 600;

#[derive(Debug, Deserialize)]
pub struct QuoteRequest {
    pub items: Vec<Value>,
    /// How many items the real batch will have (default: the sample's size).
    #[serde(default)]
    pub estimated_items: Option<u64>,
}

/// One sample item, planned: its model, tokens and plan.
struct Planned {
    model: String,
    tokens: TokenCounts,
    plan: Plan,
}

fn plan_item(state: &AppState, principal: &Principal, index: usize, value: Value) -> Result<Planned, ApiError> {
    let at = |m: String| ApiError::Preflight { message: format!("item {index}: {m}"), problems: vec![json!({"item": index, "message": m})] };
    let item: NativeItem = serde_json::from_value(value).map_err(|e| at(format!("not an item: {e}")))?;
    let (endpoint, body) = to_request(&item).map_err(at)?;
    let (kind, tokens, ext) = if endpoint == "/v1/embeddings" {
        let mut r: EmbeddingRequest = serde_json::from_value(body).map_err(|e| at(e.to_string()))?;
        let ext = take_extensions(&mut r.extra).map_err(|e| at(e.to_string()))?;
        let prompt = r.input.texts().iter().map(|t| crate::tokens::count(t)).sum();
        (ModelType::Embedding, TokenCounts { prompt, completion: 0, cached: 0 }, ext)
    } else {
        let mut r: ChatCompletionRequest = serde_json::from_value(body).map_err(|e| at(e.to_string()))?;
        let ext = take_extensions(&mut r.extra).map_err(|e| at(e.to_string()))?;
        let completion = r.output_cap().map_or(ASSUMED_OUTPUT, u64::from);
        (ModelType::Chat, TokenCounts { prompt: crate::tokens::prompt_tokens(&r), completion, cached: 0 }, ext)
    };
    let admitted = crate::http::admit::admit(state, principal, &item.model, &ext, kind).map_err(|e| at(e.to_string()))?;
    Ok(Planned { model: admitted.model.id.clone(), tokens, plan: admitted.plan })
}

fn in_currency(fx: &Fx, money: crate::money::Money, to: Currency) -> Decimal {
    fx.convert(money, to).amount
}

/// Adds an item's lanes (its planned routes, and the routes its plan excluded) and returns
/// its cost on the selected lane.
fn add_lanes(lanes: &mut BTreeMap<(String, String), Value>, planned: &Planned, fx: &Fx, currency: Currency) -> Decimal {
    let mut primary = Decimal::ZERO;
    for (rank, candidate) in planned.plan.candidates.iter().enumerate() {
        let cost = in_currency(fx, candidate.route.price.cost(planned.tokens), currency);
        if rank == 0 {
            primary = cost;
        }
        let lane = lanes.entry((planned.model.clone(), candidate.route.label())).or_insert_with(|| {
            let price = &candidate.route.price;
            json!({
                "lane_id": format!("{}:{}", planned.model, candidate.route.label()),
                "kind": "realtime",
                "model": planned.model,
                "provider": candidate.route.provider.id,
                "region": candidate.route.provider.config.region,
                "price_per_mtok": {"input": price.input_per_mtok.to_string(), "output": price.output_per_mtok.to_string(), "currency": price.currency.code()},
                "selected": rank == 0,
                "role": if rank == 0 { "primary" } else { "failover" },
                "items": 0,
                "estimated_cost": "0",
            })
        });
        lane["items"] = json!(lane["items"].as_u64().unwrap_or(0) + 1);
        let so_far: Decimal = lane["estimated_cost"].as_str().and_then(|s| s.parse().ok()).unwrap_or_default();
        lane["estimated_cost"] = json!((so_far + cost).normalize().to_string());
    }
    for skipped in &planned.plan.skipped {
        lanes.entry((planned.model.clone(), skipped.route.clone())).or_insert_with(|| {
            json!({
                "lane_id": format!("{}:{}", planned.model, skipped.route),
                "kind": "realtime",
                "model": planned.model,
                "selected": false,
                "rejection": {"reason": skipped.reason},
            })
        });
    }
    primary
}

/// The quote.
pub fn quote(state: &AppState, principal: &Principal, request: QuoteRequest) -> Result<Value, ApiError> {
    if request.items.is_empty() || request.items.len() > MAX_SAMPLE {
        return Err(ApiError::invalid(format!("`items` must hold 1 to {MAX_SAMPLE} sample items"), Some("items".into())));
    }
    let sample = request.items.len() as u64;
    let fx = &state.registry.fx;
    let currency = principal.org.currency;
    let mut lanes: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut sample_cost = Decimal::ZERO;
    for (index, value) in request.items.into_iter().enumerate() {
        let planned = plan_item(state, principal, index, value)?;
        sample_cost += add_lanes(&mut lanes, &planned, fx, currency);
    }
    let per_item = sample_cost / Decimal::from(sample);
    let estimated_items = request.estimated_items.unwrap_or(sample);
    let now_s = unix_now_ms() / 1000;
    Ok(json!({
        "quote_id": format!("qlock_{}", uuid::Uuid::now_v7().simple()),
        "object": "quote",
        "created_at": now_s,
        "expires_at": now_s + QUOTE_TTL_S,
        "pricing_estimate": {
            "currency": currency.code(),
            "sample_items": sample,
            "sample_cost": sample_cost.normalize().to_string(),
            "per_item": per_item.round_dp(9).normalize().to_string(),
            "estimated_items": estimated_items,
            "estimated_total": (per_item * Decimal::from(estimated_items)).round_dp(9).normalize().to_string(),
            "assumed_output_tokens": ASSUMED_OUTPUT,
            "fx": {"inr_per_usd": fx.inr_per_usd.to_string(), "as_of": fx.as_of},
        },
        "quote_lanes": lanes.into_values().collect::<Vec<_>>(),
    }))
}
