//! `GET /v1/models` and `GET /v1/models/{id}` (and the `/stats` suffix, see `stats`): the catalog as one superset object per model,
//! OpenRouter's fields (`pricing` in USD per token, as strings) beside BharatRouter's
//! (`routes` with INR per million tokens, regions). Rendered once at start: the catalog does
//! not change while the gateway runs.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::AppState;
use crate::config::ModelType;
use crate::error::ApiError;
use crate::money::{Currency, Fx, Money};
use crate::registry::{Model, Registry, Route};

/// The rendered catalog.
pub struct ModelPages {
    list: Bytes,
    one: HashMap<String, Bytes>,
}

impl ModelPages {
    pub fn render(registry: &Registry) -> ModelPages {
        let objects: Vec<(String, Value)> =
            registry.models().iter().map(|m| (m.id.clone(), model_object(m, &registry.fx))).collect();
        let list = json!({ "object": "list", "data": objects.iter().map(|(_, v)| v).collect::<Vec<_>>() });
        let mut one = HashMap::new();
        for model in registry.models() {
            let body = Bytes::from(model_object(model, &registry.fx).to_string());
            for alias in &model.config.aliases {
                one.insert(alias.clone(), body.clone());
            }
            one.insert(model.id.clone(), body);
        }
        ModelPages { list: Bytes::from(list.to_string()), one }
    }
}

fn json_bytes(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

pub async fn list(State(state): State<AppState>) -> Response {
    json_bytes(state.model_pages.list.clone())
}

/// `GET /models/{id}`, and `GET /models/{id}/stats` (ids contain slashes, so one wildcard
/// route serves both; an id that is itself a model wins over the `/stats` suffix).
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if let Some(body) = state.model_pages.one.get(&id) {
        return Ok(json_bytes(body.clone()));
    }
    if let Some(model) = id.strip_suffix("/stats") {
        return super::stats::model(&state, model).await;
    }
    Err(ApiError::ModelNotFound { model: id })
}

/// Per-token USD price as OpenRouter writes it: a decimal string.
fn usd_per_token(fx: &Fx, per_mtok: Decimal, currency: Currency) -> String {
    let usd = fx.to_usd(Money { amount: per_mtok, currency }) / Decimal::from(1_000_000);
    usd.round_dp(12).normalize().to_string()
}

fn inr_per_mtok(fx: &Fx, per_mtok: Decimal, currency: Currency) -> String {
    fx.convert(Money { amount: per_mtok, currency }, Currency::Inr).amount.round_dp(4).normalize().to_string()
}

fn route_object(route: &Route, fx: &Fx) -> Value {
    let p = &route.price;
    json!({
        "provider": route.provider.id,
        "provider_name": route.provider.name(),
        "model": route.upstream_model,
        "region": route.provider.config.region,
        "zdr": route.provider.config.zdr,
        "input_per_mtok": p.input_per_mtok.normalize().to_string(),
        "output_per_mtok": p.output_per_mtok.normalize().to_string(),
        "currency": p.currency.code(),
        "inputINRPerMtok": inr_per_mtok(fx, p.input_per_mtok, p.currency),
        "outputINRPerMtok": inr_per_mtok(fx, p.output_per_mtok, p.currency),
    })
}

fn model_object(model: &Arc<Model>, fx: &Fx) -> Value {
    let c = &model.config;
    let inputs = if c.input_modalities.is_empty() { vec!["text".to_owned()] } else { c.input_modalities.clone() };
    let output = if c.kind == ModelType::Embedding { "embeddings" } else { "text" };
    let primary = model.routes.first();
    let pricing = primary.map(|r| {
        json!({
            "prompt": usd_per_token(fx, r.price.input_per_mtok, r.price.currency),
            "completion": usd_per_token(fx, r.price.output_per_mtok, r.price.currency),
            "input_cache_read": usd_per_token(fx, r.price.cached_input_per_mtok, r.price.currency),
        })
    });
    json!({
        "id": model.id,
        "canonical_slug": model.id,
        "object": "model",
        "created": 0,
        "owned_by": model.id.split('/').next().unwrap_or("marga"),
        "name": c.name.clone().unwrap_or_else(|| model.id.clone()),
        "description": c.description,
        "type": if c.kind == ModelType::Embedding { "embedding" } else { "chat" },
        "aliases": c.aliases,
        "context_length": c.context_length,
        "architecture": {
            "modality": format!("{}->{}", inputs.join("+"), output),
            "input_modalities": inputs,
            "output_modalities": [output],
            "tokenizer": "Other",
            "instruct_type": null,
        },
        "pricing": pricing,
        "top_provider": {
            "context_length": c.context_length,
            "max_completion_tokens": c.max_output_tokens,
            "is_moderated": false,
        },
        "per_request_limits": null,
        "supported_parameters": supported_parameters(&c.capabilities),
        "capabilities": c.capabilities,
        "routes": model.routes.iter().map(|r| route_object(r, fx)).collect::<Vec<_>>(),
        "fx": { "inr_per_usd": fx.inr_per_usd.normalize().to_string(), "as_of": fx.as_of },
    })
}

fn supported_parameters(capabilities: &[String]) -> Vec<&'static str> {
    let mut params = vec!["max_tokens", "temperature", "top_p", "stop", "seed"];
    let has = |c: &str| capabilities.iter().any(|x| x == c);
    if has("tools") {
        params.extend(["tools", "tool_choice"]);
    }
    if has("json_mode") || has("json_schema") {
        params.push("response_format");
    }
    if has("json_schema") {
        params.push("structured_outputs");
    }
    if has("reasoning") {
        params.push("reasoning");
    }
    params
}
