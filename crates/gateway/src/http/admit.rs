//! Admission shared by every inference endpoint: authenticate and count the caller, resolve
//! the model, apply the key's guardrail, plan the routes and reserve the maximum cost.

use std::net::SocketAddr;
use std::sync::Arc;

use marga_protocol::openai::Extra;
use marga_protocol::routing::{DataPolicy, RoutingExtensions};

use super::AppState;
use crate::accounts::Principal;
use crate::admission::{self, Billing};
use crate::config::ModelType;
use crate::error::ApiError;
use crate::limits::Quota;
use crate::money::Money;
use crate::pipeline::plan::{plan, Plan, PlanRequest};
use crate::registry::Model;
use crate::routing::explore::Exploration;
use crate::routing::Strategy;

/// Output tokens assumed for the reservation when neither the request nor the model caps them.
pub const DEFAULT_OUTPUT_CAP: u32 = 4096;

pub fn take_extensions(extra: &mut Extra) -> Result<RoutingExtensions, ApiError> {
    RoutingExtensions::take_from(extra).map_err(|e| ApiError::invalid(e.to_string(), Some(e.param)))
}

/// A request that passed admission: its model and its plan.
pub struct Admitted {
    pub model: Arc<Model>,
    pub plan: Plan,
}

/// Admits an authenticated caller to inference (an inference key, or the master key) and
/// counts the call against its rate limits.
pub async fn caller(state: &AppState, principal: Principal, peer: SocketAddr) -> Result<(Principal, Quota), ApiError> {
    principal.require_inference()?;
    let quota = state.admission.count(&principal, Some(peer.ip())).await?;
    Ok((principal, quota))
}

/// What the most expensive outcome of a request is: every prompt byte a token (an upper bound
/// for byte-level BPE tokenizers) and the output cap (the request's, else the model's, else
/// [`DEFAULT_OUTPUT_CAP`]) on the dearest planned route.
pub fn max_cost(state: &AppState, admitted: &Admitted, prompt_bytes: usize, output_cap: Option<u32>) -> Money {
    let output = output_cap.or(admitted.model.config.max_output_tokens).unwrap_or(DEFAULT_OUTPUT_CAP);
    let routes = admitted.plan.candidates.iter().map(|c| c.route.as_ref());
    admission::max_cost(routes, prompt_bytes as u64, u64::from(output), &state.registry.fx)
}

/// Reserves credit (and spend caps) for the request.
pub async fn reserve(
    state: &AppState,
    principal: &Principal,
    admitted: &Admitted,
    prompt_bytes: usize,
    output_cap: Option<u32>,
) -> Result<Billing, ApiError> {
    state.admission.reserve(principal, max_cost(state, admitted, prompt_bytes, output_cap)).await
}

/// Resolves the model (a `:floor`/`:nitro` suffix names a strategy), applies the guardrails
/// of the key and of its member, and plans the routes — for a look at the plan (explain, batch
/// checks and quotes): the request does not count towards exploration.
pub fn admit(
    state: &AppState,
    principal: &Principal,
    model_name: &str,
    ext: &RoutingExtensions,
    kind: ModelType,
) -> Result<Admitted, ApiError> {
    admit_with(state, principal, model_name, ext, (kind, None))
}

/// [`admit`] for a request that will be served: it counts towards exploration and may be the
/// one that measures a route without recent statistics.
pub fn admit_to_serve(
    state: &AppState,
    principal: &Principal,
    model_name: &str,
    ext: &RoutingExtensions,
    kind: ModelType,
) -> Result<Admitted, ApiError> {
    admit_with(state, principal, model_name, ext, (kind, Some(&state.routing.exploration)))
}

fn admit_with(
    state: &AppState,
    principal: &Principal,
    model_name: &str,
    ext: &RoutingExtensions,
    (kind, exploration): (ModelType, Option<&Exploration>),
) -> Result<Admitted, ApiError> {
    let (base, suffix_strategy) = Strategy::split_suffix(model_name);
    let model = state
        .registry
        .model(model_name)
        .or_else(|| state.registry.model(base))
        .ok_or_else(|| ApiError::ModelNotFound { model: model_name.to_owned() })?;
    if model.kind() != kind {
        let message = format!("`{model_name}` cannot serve this endpoint");
        return Err(ApiError::invalid(message, Some("model".into())));
    }
    let guardrails = state.admission.guardrails(principal);
    let mut zdr_ext = None;
    for g in &guardrails {
        admission::check_models(g, &model.id)?;
    }
    if guardrails.iter().any(|g| g.require_zdr) {
        let mut forced = ext.clone();
        forced.data_policy = Some(with_zdr(forced.data_policy.take()));
        zdr_ext = Some(forced);
    }
    let ext = zdr_ext.as_ref().unwrap_or(ext);
    let saved = state.routing.chains.get(&principal.org.id, &model.id);
    let request = PlanRequest {
        model,
        ext,
        kind,
        suffix_strategy,
        saved_chain: saved.as_deref().map(Vec::as_slice),
        default_strategy: state.routing.settings.default_strategy,
        exploration,
    };
    Ok(Admitted { model: model.clone(), plan: plan(&state.registry, &request)? })
}

fn with_zdr(policy: Option<DataPolicy>) -> DataPolicy {
    match policy {
        None => DataPolicy::One("zdr".to_owned()),
        Some(DataPolicy::One(p)) => DataPolicy::Many(vec![p, "zdr".to_owned()]),
        Some(DataPolicy::Many(mut ps)) => {
            ps.push("zdr".to_owned());
            DataPolicy::Many(ps)
        }
    }
}

