//! Route planning: the ordered candidates for one request, and why every other route was left
//! out.
//!
//! The chain of steps is the requested model, then the per-request `fallbacks` (or, without
//! them, the organisation's saved chain), then OpenRouter's `models`. Each step's routes are
//! filtered by the request's policy and ordered by the strategy within the step, so fallback
//! models stay fallbacks. `data_policy: "india_only"` applies to every step: residency fails
//! closed, however the chain is built.
//!
//! A route (provider + upstream model) is tried at most once: when a later step would add a
//! route already planned, it keeps its first position and the repeat is listed in `skipped` as
//! `duplicate`, with the step's model. A route that is tried is not also listed as skipped by a
//! later step's filter, and a route skipped for the same reason by several steps is listed once.
//! On an exploring turn (see [`crate::routing::explore`]) a cold route moves to the front of its
//! step before `provider.order` applies.

use std::fmt::Write as _;
use std::sync::Arc;

use marga_protocol::routing::{FallbackStep, ProviderPreference, ProviderPreferences, RoutingExtensions};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::config::ModelType;
use crate::error::ApiError;
use crate::money::{Fx, Money};
use crate::registry::{Model, Registry, Route};
use crate::routing::explore::{self, Exploration};
use crate::routing::{HealthView, Strategy};

/// One route to try, with the model it serves.
#[derive(Clone)]
pub struct Candidate {
    pub model: Arc<Model>,
    pub route: Arc<Route>,
}

/// A route left out of the plan, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub route: String,
    pub reason: &'static str,
    /// For a `duplicate`: the model of the step that named the route again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// The candidates in the order they will be tried.
pub struct Plan {
    pub strategy: Strategy,
    pub candidates: Vec<Candidate>,
    pub skipped: Vec<Skipped>,
    /// Routes moved to the front of their step by exploration.
    pub explored: Vec<String>,
}

/// What a request asks of routing, gathered once.
pub struct PlanRequest<'a> {
    pub model: &'a Arc<Model>,
    pub ext: &'a RoutingExtensions,
    pub kind: ModelType,
    /// A strategy named by a `:floor`/`:nitro` model suffix.
    pub suffix_strategy: Option<Strategy>,
    /// The organisation's saved chain for the model, if any.
    pub saved_chain: Option<&'a [FallbackStep]>,
    pub default_strategy: Strategy,
    /// Counts the request for exploration (`None`: planning only, e.g. explain).
    pub exploration: Option<&'a Exploration>,
}

/// The policy filters of a request, parsed once.
struct Policy<'a> {
    pinned: Option<&'a str>,
    preferences: Option<&'a ProviderPreferences>,
    india_only: bool,
    zdr: bool,
    no_training: bool,
    max_price: Option<MaxPrice>,
}

/// OpenRouter's `max_price`, in USD per million tokens.
struct MaxPrice {
    prompt: Option<Decimal>,
    completion: Option<Decimal>,
}

impl<'a> Policy<'a> {
    fn from(ext: &'a RoutingExtensions) -> Result<Self, ApiError> {
        let (pinned, preferences) = match &ext.provider {
            Some(ProviderPreference::Pin(id)) => (Some(id.as_str()), None),
            Some(ProviderPreference::Preferences(p)) => (None, Some(p.as_ref())),
            None => (None, None),
        };
        let policy = |name: &str| ext.data_policy.as_ref().is_some_and(|p| p.contains(name));
        let zdr = policy("zdr") || preferences.is_some_and(|p| p.zdr == Some(true));
        let no_training =
            policy("no_training") || preferences.is_some_and(|p| p.data_collection.as_deref() == Some("deny"));
        let max_price = preferences.and_then(|p| p.max_price.as_ref()).map(parse_max_price).transpose()?;
        Ok(Policy { pinned, preferences, india_only: policy("india_only"), zdr, no_training, max_price })
    }

    /// `Err(reason)` when the route may not serve this request.
    fn check(&self, route: &Route, step_provider: Option<&str>, fx: &Fx) -> Result<(), &'static str> {
        let provider = &route.provider;
        let id = provider.id.as_str();
        if self.india_only && provider.config.region != "IN" {
            return Err("residency");
        }
        if self.pinned.is_some_and(|p| p != id) || step_provider.is_some_and(|p| p != id) {
            return Err("not_pinned");
        }
        if let Some(prefs) = self.preferences {
            if prefs.only.as_ref().is_some_and(|only| !only.iter().any(|p| p == id)) {
                return Err("not_in_only");
            }
            if prefs.ignore.as_ref().is_some_and(|ignore| ignore.iter().any(|p| p == id)) {
                return Err("ignored");
            }
        }
        if self.zdr && !provider.config.zdr {
            return Err("zdr");
        }
        if self.no_training && provider.config.trains_on_data {
            return Err("trains_on_data");
        }
        if self.max_price.as_ref().is_some_and(|cap| cap.exceeded_by(route, fx)) {
            return Err("price_cap");
        }
        Ok(())
    }

    /// Routes named in `order` first, in that order; the rest keep the strategy's order.
    /// Deferred routes (open breaker, parked by a 429) still come after every healthy one.
    fn apply_order(&self, routes: &mut [(Arc<Route>, HealthView)]) {
        let Some(order) = self.preferences.and_then(|p| p.order.as_ref()) else { return };
        routes.sort_by_key(|(r, h)| (h.deferred, order.iter().position(|p| *p == r.provider.id).unwrap_or(usize::MAX)));
    }

    fn allow_fallbacks(&self) -> bool {
        self.preferences.and_then(|p| p.allow_fallbacks).unwrap_or(true)
    }

    fn strategy(&self, request: &PlanRequest<'_>) -> Result<Strategy, ApiError> {
        if let Some(strategy) = request.suffix_strategy {
            return Ok(strategy);
        }
        let sort = self.preferences.and_then(|p| p.sort.as_ref()).map(|s| match s {
            serde_json::Value::Object(o) => o.get("by").and_then(|b| b.as_str()).unwrap_or("").to_owned(),
            other => other.as_str().unwrap_or("").to_owned(),
        });
        let named = request.ext.optimize.as_deref().map(|s| ("optimize", s.to_owned())).or(sort.map(|s| ("provider.sort", s)));
        match named {
            None => Ok(request.default_strategy),
            Some((param, name)) => Strategy::parse(&name).ok_or_else(|| {
                let message = format!("unknown strategy `{name}` (expected price, latency, throughput, uptime or auto)");
                ApiError::invalid(message, Some(param.to_owned()))
            }),
        }
    }
}

impl MaxPrice {
    fn exceeded_by(&self, route: &Route, fx: &Fx) -> bool {
        let usd = |amount: Decimal| fx.to_usd(Money { amount, currency: route.price.currency });
        self.prompt.is_some_and(|cap| usd(route.price.input_per_mtok) > cap)
            || self.completion.is_some_and(|cap| usd(route.price.output_per_mtok) > cap)
    }
}

fn parse_max_price(value: &serde_json::Value) -> Result<MaxPrice, ApiError> {
    let field = |key: &str| -> Result<Option<Decimal>, ApiError> {
        let param = || Some(format!("provider.max_price.{key}"));
        match value.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => {
                let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                text.parse().map(Some).map_err(|_| ApiError::invalid(format!("`{text}` is not a price"), param()))
            }
        }
    };
    Ok(MaxPrice { prompt: field("prompt")?, completion: field("completion")? })
}

/// The plan for a request, or why there is no route at all.
pub fn plan(registry: &Registry, request: &PlanRequest<'_>) -> Result<Plan, ApiError> {
    let policy = Policy::from(request.ext)?;
    let strategy = policy.strategy(request)?;
    let turn = request.exploration.and_then(|e| e.turn(strategy));
    let mut built = Builder::default();
    for Step { model, provider: step_provider } in chain(registry, request)? {
        let mut routes: Vec<(Arc<Route>, HealthView)> = Vec::new();
        for route in &model.routes {
            match policy.check(route, step_provider.as_deref(), &registry.fx) {
                Ok(()) if built.has(route) || routes.iter().any(|(r, _)| same_route(r, route)) => {
                    built.note(route, "duplicate", Some(model.as_ref()));
                }
                Ok(()) => routes.push((route.clone(), route.health.view())),
                Err(reason) => built.skip(route, reason),
            }
        }
        strategy.order(&mut routes, |(r, h)| (r.as_ref(), h));
        if let Some(turn) = turn {
            if let Some(at) = explore::promote(strategy, turn, &mut routes, |(_, h)| h) {
                tracing::debug!(route = %routes[0].0.label(), from = at, "exploring a route without recent statistics");
                built.explored.push(routes[0].0.label());
            }
        }
        policy.apply_order(&mut routes);
        built.candidates.extend(routes.into_iter().map(|(route, _)| Candidate { model: model.clone(), route }));
    }
    let Builder { mut candidates, mut skipped, explored } = built;
    if !policy.allow_fallbacks() && candidates.len() > 1 {
        for extra in candidates.drain(1..) {
            skipped.push(Skipped { route: extra.route.label(), reason: "fallbacks_disabled", model: None });
        }
    }
    if candidates.is_empty() {
        return Err(no_route(&policy, request.model));
    }
    Ok(Plan { strategy, candidates, skipped, explored })
}

/// The plan as it is built, step by step.
#[derive(Default)]
struct Builder {
    candidates: Vec<Candidate>,
    skipped: Vec<Skipped>,
    explored: Vec<String>,
}

impl Builder {
    /// Whether an earlier step planned this route (same provider and upstream model).
    fn has(&self, route: &Route) -> bool {
        self.candidates.iter().any(|c| same_route(&c.route, route))
    }

    /// A route a filter left out: not listed when it is tried anyway.
    fn skip(&mut self, route: &Route, reason: &'static str) {
        if !self.has(route) {
            self.note(route, reason, None);
        }
    }

    /// Lists `route` as skipped for `reason`, once.
    fn note(&mut self, route: &Route, reason: &'static str, model: Option<&Model>) {
        let label = route.label();
        if !self.skipped.iter().any(|s| s.route == label && s.reason == reason) {
            self.skipped.push(Skipped { route: label, reason, model: model.map(|m| m.id.clone()) });
        }
    }
}

/// Two entries for one upstream route: same provider, same upstream model.
fn same_route(a: &Route, b: &Route) -> bool {
    a.provider.id == b.provider.id && a.upstream_model == b.upstream_model
}

/// One step of the chain: a model, and the provider the step is restricted to, if any.
struct Step {
    model: Arc<Model>,
    provider: Option<String>,
}

/// The steps: the requested model, then `fallbacks` (or the saved chain), then `models`.
fn chain(registry: &Registry, request: &PlanRequest<'_>) -> Result<Vec<Step>, ApiError> {
    let ext = request.ext;
    let mut named: Vec<(String, &str, Option<&str>)> = Vec::new();
    match (&ext.fallbacks, request.saved_chain) {
        (Some(steps), _) => named.extend(
            steps.iter().enumerate().map(|(i, s)| (format!("fallbacks[{i}].model"), s.model.as_str(), s.provider.as_deref())),
        ),
        (None, Some(saved)) => named.extend(saved.iter().map(|s| ("saved chain".to_owned(), s.model.as_str(), s.provider.as_deref()))),
        (None, None) => {}
    }
    named.extend(ext.models.iter().flatten().enumerate().map(|(i, m)| (format!("models[{i}]"), m.as_str(), None)));
    let mut chain = vec![Step { model: request.model.clone(), provider: None }];
    for (param, name, provider) in named {
        let model = registry
            .model(name)
            .ok_or_else(|| ApiError::ModelNotFoundAt { model: name.to_owned(), param: param.clone() })?;
        if model.kind() != request.kind {
            return Err(ApiError::invalid(format!("`{name}` cannot serve this endpoint"), Some(param)));
        }
        let step = Step { model: model.clone(), provider: provider.map(str::to_owned) };
        if !chain.iter().any(|s| Arc::ptr_eq(&s.model, &step.model) && s.provider == step.provider) {
            chain.push(step);
        }
    }
    Ok(chain)
}

fn no_route(policy: &Policy<'_>, model: &Model) -> ApiError {
    let message = match policy.pinned {
        Some(p) => format!("provider `{p}` does not serve `{}` (or is not configured)", model.id),
        None if policy.india_only => format!("no India-resident route serves `{}` (data_policy india_only)", model.id),
        None => format!("no route for `{}` satisfies the request's provider and data policy constraints", model.id),
    };
    ApiError::NoRoute { message }
}

impl Plan {
    /// The compact `x-br-route` header: strategy, the route that served, routes exploration
    /// moved forward, failed and skipped routes.
    pub fn header(&self, served: &Route, failed: &[(String, &'static str)]) -> String {
        // Written into one string (no piece formatted on its own first): every served request
        // builds it.
        let mut out = String::with_capacity(64);
        let _ = write!(out, "strategy={}; route={}/{}", self.strategy.as_str(), served.provider.id, served.upstream_model);
        write_list(&mut out, "explored", self.explored.iter().map(|route| (route.as_str(), None)));
        write_list(&mut out, "failed", failed.iter().map(|(route, why)| (route.as_str(), Some(*why))));
        write_list(&mut out, "skipped", self.skipped.iter().take(8).map(|s| (s.route.as_str(), Some(s.reason))));
        out
    }
}

/// Appends `; name=route[:why],…` unless `items` is empty.
fn write_list<'a>(out: &mut String, name: &str, items: impl Iterator<Item = (&'a str, Option<&'a str>)>) {
    for (i, (route, why)) in items.enumerate() {
        out.push_str(if i == 0 { "; " } else { "," });
        if i == 0 {
            out.push_str(name);
            out.push('=');
        }
        out.push_str(route);
        if let Some(why) = why {
            out.push(':');
            out.push_str(why);
        }
    }
}
