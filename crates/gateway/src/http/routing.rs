//! Routing endpoints: `POST /v1/route/explain` (the plan for a body, without calling any
//! provider), `GET /v1/providers` (configuration and live health), and the saved fallback
//! chains at `/me/routing/{model}`.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use marga_protocol::routing::FallbackStep;
use serde::Deserialize;
use serde_json::{json, Value};

use super::admit::{admit, take_extensions};
use super::extract::{parse_json, read_body};
use super::AppState;
use crate::error::ApiError;
use crate::money::Fx;
use crate::registry::{ProviderEntry, Route};
use crate::routing::chains::MAX_STEPS;
use crate::routing::{explore, Strategy};

/// What explain needs of a body: the model and the routing extensions (the rest is ignored).
#[derive(Deserialize)]
struct ExplainBody {
    model: String,
    #[serde(flatten)]
    extra: marga_protocol::openai::Extra,
}

/// A planned route as explain shows it; `cold`: the strategy has no recent numbers for it,
/// so a share of requests explores it (see `routing::explore`).
fn route_view(route: &Route, fx: &Fx, strategy: Strategy) -> Value {
    let health = route.health.view();
    json!({
        "route": route.label(),
        "provider": route.provider.id,
        "upstream_model": route.upstream_model,
        "region": route.provider.config.region,
        "price": {
            "input_per_mtok": route.price.input_per_mtok.normalize().to_string(),
            "output_per_mtok": route.price.output_per_mtok.normalize().to_string(),
            "currency": route.price.currency.code(),
            "combined_usd_per_mtok": route.price.combined_per_mtok(fx).round_dp(6).normalize().to_string(),
        },
        "health": health,
        "cold": explore::is_cold(strategy, &health),
    })
}

pub async fn explain(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    let bytes = read_body(body, state.max_body).await?;
    let mut body: ExplainBody = parse_json(&bytes)?;
    let ext = take_extensions(&mut body.extra)?;
    let kind = state
        .registry
        .model(Strategy::split_suffix(&body.model).0)
        .or_else(|| state.registry.model(&body.model))
        .map_or(crate::config::ModelType::Chat, |m| m.kind());
    let admitted = admit(&state, &principal, &body.model, &ext, kind)?;
    let fx = &state.registry.fx;
    let candidates: Vec<Value> = admitted
        .plan
        .candidates
        .iter()
        .map(|c| {
            let mut view = route_view(&c.route, fx, admitted.plan.strategy);
            view["model"] = json!(c.model.id);
            view
        })
        .collect();
    Ok(Json(json!({
        "model": admitted.model.id,
        "strategy": admitted.plan.strategy.as_str(),
        "candidates": candidates,
        "skipped": admitted.plan.skipped,
    }))
    .into_response())
}

fn provider_view(state: &AppState, provider: &ProviderEntry) -> Value {
    let routes: Vec<Value> = state
        .registry
        .routes()
        .filter(|(_, r)| r.provider.id == provider.id)
        .map(|(m, r)| json!({ "model": m.id, "upstream_model": r.upstream_model, "health": r.health.view() }))
        .collect();
    json!({
        "id": provider.id,
        "slug": provider.id,
        "name": provider.name(),
        "kind": provider.kind().as_str(),
        "region": provider.config.region,
        "zdr": provider.config.zdr,
        "trains_on_data": provider.config.trains_on_data,
        "homepage": provider.config.homepage,
        "privacy_policy_url": provider.config.privacy_policy_url,
        "routes": routes,
    })
}

pub async fn providers(State(state): State<AppState>) -> Response {
    let data: Vec<Value> = state.registry.providers().map(|p| provider_view(&state, p)).collect();
    Json(json!({ "data": data })).into_response()
}

/// `PUT` accepts `[steps]`, `{"steps": [...]}` or `{"fallbacks": [...]}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ChainBody {
    Steps(Vec<FallbackStep>),
    Named {
        #[serde(alias = "fallbacks")]
        steps: Vec<FallbackStep>,
    },
}

fn chain_json(model: &str, steps: &[FallbackStep]) -> Value {
    json!({ "model": model, "steps": steps })
}

pub async fn get_chain(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    let steps = state.routing.chains.get(&principal.org.id, &model).ok_or(ApiError::NotFound)?;
    Ok(Json(chain_json(&model, &steps)).into_response())
}

pub async fn put_chain(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(model): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    principal.require(crate::accounts::Action::ManageRouting)?;
    let bytes = read_body(body, state.max_body).await?;
    let steps = match parse_json::<ChainBody>(&bytes)? {
        ChainBody::Steps(steps) | ChainBody::Named { steps } => steps,
    };
    validate_chain(&state, &model, &steps)?;
    state
        .routing
        .chains
        .put(&principal.org.id, &model, steps.clone())
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok(Json(chain_json(&model, &steps)).into_response())
}

fn validate_chain(state: &AppState, model: &str, steps: &[FallbackStep]) -> Result<(), ApiError> {
    let owner = state.registry.model(model).ok_or_else(|| ApiError::ModelNotFound { model: model.to_owned() })?;
    if steps.is_empty() || steps.len() > MAX_STEPS {
        return Err(ApiError::invalid(format!("a chain has 1 to {MAX_STEPS} steps"), Some("steps".into())));
    }
    for (i, step) in steps.iter().enumerate() {
        let found = state.registry.model(&step.model).ok_or_else(|| ApiError::ModelNotFoundAt {
            model: step.model.clone(),
            param: format!("steps[{i}].model"),
        })?;
        if found.kind() != owner.kind() {
            return Err(ApiError::invalid(format!("`{}` is not a {:?} model", step.model, owner.kind()), Some(format!("steps[{i}].model"))));
        }
        if let Some(provider) = &step.provider {
            if !found.routes.iter().any(|r| &r.provider.id == provider) {
                let message = format!("provider `{provider}` does not serve `{}`", step.model);
                return Err(ApiError::invalid(message, Some(format!("steps[{i}].provider"))));
            }
        }
    }
    Ok(())
}

pub async fn delete_chain(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    principal.require(crate::accounts::Action::ManageRouting)?;
    let deleted = state.routing.chains.delete(&principal.org.id, &model).await.map_err(|e| ApiError::Internal(e.into()))?;
    if deleted {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NotFound)
    }
}
