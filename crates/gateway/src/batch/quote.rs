//! `POST /v1/quotes/model`: a free estimate from sample items, before anything is created or
//! reserved. Each sample item is planned exactly as it would run (guardrails, residency and
//! data policy, breakers); the first planned route of each model is the selected lane, the
//! other candidates are listed as standbys (failover order), and the routes the plan excluded
//! are rejected lanes with the reason. Costs are the item's prompt tokens (counted) and its
//! output cap (`max_tokens`, else [`ASSUMED_OUTPUT`]) at the lane's prices, in the caller's
//! currency.
//!
//! Each model's routes also appear as **native** lanes (the provider's own batch API at the
//! route's batch price, done within 24 h), selected when cheaper and the quote's
//! `completion_window` (default `24h`) allows, else rejected with the reason (see
//! [`super::lanes`]). When a native lane is selected, the realtime lanes stay as its fallback.

use std::collections::BTreeMap;
use std::sync::Arc;

use marga_protocol::openai::{ChatCompletionRequest, EmbeddingRequest};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};

use super::lanes::{parse_window, realtime_expected_s, NativeLane, Sample, Tally, NATIVE_COMPLETION_MS};
use super::native::{to_request, NativeItem};
use crate::accounts::Principal;
use crate::config::ModelType;
use crate::error::ApiError;
use crate::http::admit::take_extensions;
use crate::http::AppState;
use crate::money::{Currency, Fx, TokenCounts};
use crate::pipeline::plan::Plan;
use crate::registry::{Model, Route};
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
    /// The batch's completion window (`<n>h` or `<n>m`, default `24h`).
    #[serde(default)]
    pub completion_window: Option<String>,
}

/// One sample item, planned: its model, tokens and plan.
struct Planned {
    model: Arc<Model>,
    tokens: TokenCounts,
    plan: Plan,
    chat: bool,
    byok: bool,
}

/// Per model: its lane tally, its samples' tokens and their realtime cost.
type PerModel = BTreeMap<String, (Tally, Vec<TokenCounts>, Decimal)>;

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
    let (chat, byok) = (kind == ModelType::Chat, ext.upstream_key.is_some());
    Ok(Planned { model: admitted.model, tokens, plan: admitted.plan, chat, byok })
}

fn in_currency(fx: &Fx, money: crate::money::Money, to: Currency) -> Decimal {
    fx.convert(money, to).amount
}

/// Adds an item's lanes (its planned routes, and the routes its plan excluded) and returns
/// its cost on the selected lane.
fn add_lanes(lanes: &mut BTreeMap<(String, String), Value>, planned: &Planned, fx: &Fx, currency: Currency) -> Decimal {
    let mut primary = Decimal::ZERO;
    let model = &planned.model.id;
    for (rank, candidate) in planned.plan.candidates.iter().enumerate() {
        let cost = in_currency(fx, candidate.route.price.cost(planned.tokens), currency);
        if rank == 0 {
            primary = cost;
        }
        let lane = lanes.entry((model.clone(), candidate.route.label())).or_insert_with(|| {
            let price = &candidate.route.price;
            json!({
                "lane_id": format!("{}:{}", model, candidate.route.label()),
                "kind": "realtime",
                "model": model,
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
        lanes.entry((model.clone(), skipped.route.clone())).or_insert_with(|| {
            json!({
                "lane_id": format!("{}:{}", model, skipped.route),
                "kind": "realtime",
                "model": model,
                "selected": false,
                "rejection": {"reason": skipped.reason},
            })
        });
    }
    primary
}

/// What the samples cost at `route`'s batch price, in `currency`.
fn native_cost(route: &Route, tokens: &[TokenCounts], fx: &Fx, currency: Currency) -> Decimal {
    let Some(price) = &route.batch_price else { return Decimal::ZERO };
    tokens.iter().map(|t| in_currency(fx, price.cost(*t), currency)).sum()
}

/// A native lane of the quote: selected, or rejected with the reason.
fn native_lane_json(model: &str, lane: &NativeLane, selected: bool, tokens: &[TokenCounts], fx: &Fx, currency: Currency) -> Value {
    let route = &lane.route;
    let mut out = json!({
        "lane_id": format!("{model}:{}:batch", route.label()),
        "kind": "native_batch",
        "model": model,
        "provider": route.provider.id,
        "region": route.provider.config.region,
        "expected_completion_s": NATIVE_COMPLETION_MS / 1000,
        "selected": selected,
    });
    if let Some(price) = &route.batch_price {
        out["price_per_mtok"] = json!({"input": price.input_per_mtok.to_string(), "output": price.output_per_mtok.to_string(), "currency": price.currency.code()});
    }
    match lane.rejection {
        Some(reason) => out["rejection"] = json!({"reason": reason}),
        None => {
            out["role"] = json!(if selected { "primary" } else { "alternative" });
            out["items"] = json!(tokens.len());
            out["estimated_cost"] = json!(native_cost(route, tokens, fx, currency).normalize().to_string());
        }
    }
    out
}

/// Decides each model's lane: marks the realtime lanes as the fallback where a native lane is
/// selected; returns the samples' cost on the selected lanes and the native lanes.
fn choose_lanes(
    lanes: &mut BTreeMap<(String, String), Value>,
    models: &PerModel,
    window_ms: i64,
    fx: &Fx,
    currency: Currency,
) -> (Decimal, Vec<Value>) {
    let mut sample_cost = Decimal::ZERO;
    let mut native_lanes = Vec::new();
    for (model, (tally, tokens, realtime)) in models {
        let decision = tally.decide(window_ms);
        let chosen = decision.native.as_ref().map(|r| r.label());
        sample_cost += match &decision.native {
            Some(route) => {
                for lane in lanes.iter_mut().filter(|((m, _), l)| m == model && l["selected"] == json!(true)).map(|(_, l)| l) {
                    lane["selected"] = json!(false);
                    lane["role"] = json!("fallback");
                }
                native_cost(route, tokens, fx, currency)
            }
            None => *realtime,
        };
        for lane in &decision.lanes {
            let selected = chosen.as_deref() == Some(lane.route.label().as_str());
            native_lanes.push(native_lane_json(model, lane, selected, tokens, fx, currency));
        }
    }
    (sample_cost, native_lanes)
}

/// The quote.
pub fn quote(state: &AppState, principal: &Principal, request: QuoteRequest) -> Result<Value, ApiError> {
    if request.items.is_empty() || request.items.len() > MAX_SAMPLE {
        return Err(ApiError::invalid(format!("`items` must hold 1 to {MAX_SAMPLE} sample items"), Some("items".into())));
    }
    let window_ms = parse_window(request.completion_window.as_deref().unwrap_or(super::create::COMPLETION_WINDOW))?;
    let sample = request.items.len() as u64;
    let fx = &state.registry.fx;
    let currency = principal.org.currency;
    let mut lanes: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut models: PerModel = BTreeMap::new();
    for (index, value) in request.items.into_iter().enumerate() {
        let planned = plan_item(state, principal, index, value)?;
        let realtime = add_lanes(&mut lanes, &planned, fx, currency);
        let entry = models.entry(planned.model.id.clone()).or_insert_with(|| (Tally::new(&planned.model), Vec::new(), Decimal::ZERO));
        let sample = Sample { model: &planned.model, plan: Ok(&planned.plan), tokens: planned.tokens, chat: planned.chat, byok: planned.byok };
        entry.0.add(&sample, fx);
        entry.1.push(planned.tokens);
        entry.2 += realtime;
    }
    let expected_realtime = realtime_expected_s(request.estimated_items.unwrap_or(sample), state.batches.settings.per_provider_concurrency);
    for lane in lanes.values_mut().filter(|l| l["rejection"].is_null()) {
        lane["expected_completion_s"] = json!(expected_realtime);
    }
    let (sample_cost, native_lanes) = choose_lanes(&mut lanes, &models, window_ms, fx, currency);
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
        "completion_window_s": window_ms / 1000,
        "quote_lanes": lanes.into_values().chain(native_lanes).collect::<Vec<_>>(),
    }))
}
