//! The runtime catalog: providers built once from config as `Arc<dyn Provider>`, and models
//! with their priced routes, looked up by id or alias without locks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use marga_providers::{Provider, ProviderKind, ProviderSettings};
use metrics::{Counter, Histogram};
use rust_decimal::prelude::ToPrimitive;

use crate::config::{Config, ModelConfig, ModelType, ProviderConfig};
use crate::money::{Currency, Fx, TokenPrice};
use crate::routing::RouteHealth;

/// One configured upstream.
pub struct ProviderEntry {
    pub id: String,
    pub config: ProviderConfig,
    pub client: Arc<dyn Provider>,
}

impl ProviderEntry {
    pub fn name(&self) -> &str {
        self.config.display_name(&self.id)
    }

    pub fn kind(&self) -> ProviderKind {
        self.config.kind
    }
}

/// One way to serve a model: a provider, its name for the model, and the price.
pub struct Route {
    pub provider: Arc<ProviderEntry>,
    pub upstream_model: String,
    pub price: TokenPrice,
    /// The provider's native batch API price, when the route has one (`batch_*_per_mtok`).
    pub batch_price: Option<TokenPrice>,
    /// Input + output price in USD per million tokens, for ranking only (money is never
    /// computed with it).
    pub rank_price: f64,
    /// Breaker and statistics, updated by every attempt.
    pub health: RouteHealth,
    /// Metric handles registered once, so recording a request does no label lookup.
    pub metrics: RouteMetrics,
}

/// The per-route metric handles. Labels are the operator's model, provider and route names
/// (from the config, so their number is bounded), never anything a client sent.
pub struct RouteMetrics {
    success: Counter,
    error: Counter,
    error_midstream: Counter,
    cancelled: Counter,
    pub duration: Histogram,
    pub ttft: Histogram,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    /// What callers were charged, in nanos of each currency.
    cost_usd: Counter,
    cost_inr: Counter,
    /// `marga_upstream_attempts_total{outcome="success"}` of this route's provider.
    pub attempt_success: Counter,
}

impl RouteMetrics {
    fn new(model: &str, provider: &str, upstream_model: &str) -> Self {
        let (m, p, r) = (model.to_owned(), provider.to_owned(), format!("{provider}/{upstream_model}"));
        let requests = |status: &'static str| {
            metrics::counter!("marga_requests_total", "model" => m.clone(), "provider" => p.clone(), "route" => r.clone(), "status" => status)
        };
        let tokens = |direction: &'static str| {
            metrics::counter!("marga_tokens_total", "model" => m.clone(), "provider" => p.clone(), "route" => r.clone(), "direction" => direction)
        };
        let cost = |currency: Currency| {
            metrics::counter!("marga_cost_nanos_total", "model" => m.clone(), "provider" => p.clone(), "route" => r.clone(), "currency" => currency.code())
        };
        RouteMetrics {
            success: requests("success"),
            error: requests("error"),
            error_midstream: requests("error_midstream"),
            cancelled: requests("cancelled"),
            duration: metrics::histogram!("marga_request_duration_seconds", "model" => m.clone(), "provider" => p.clone(), "route" => r.clone()),
            ttft: metrics::histogram!("marga_time_to_first_token_seconds", "model" => m.clone(), "provider" => p.clone(), "route" => r.clone()),
            prompt_tokens: tokens("prompt"),
            completion_tokens: tokens("completion"),
            cost_usd: cost(Currency::Usd),
            cost_inr: cost(Currency::Inr),
            attempt_success: metrics::counter!("marga_upstream_attempts_total", "provider" => p.clone(), "outcome" => "success"),
        }
    }

    /// The cost counter of `currency`.
    pub fn cost(&self, currency: Currency) -> &Counter {
        match currency {
            Currency::Usd => &self.cost_usd,
            Currency::Inr => &self.cost_inr,
        }
    }

    pub fn requests(&self, status: &str) -> &Counter {
        match status {
            "success" => &self.success,
            "error_midstream" => &self.error_midstream,
            "cancelled" => &self.cancelled,
            _ => &self.error,
        }
    }
}

impl Route {
    /// `provider/upstream-model`, the route's name in headers, logs and metrics.
    pub fn label(&self) -> String {
        format!("{}/{}", self.provider.id, self.upstream_model)
    }
}

/// A public model and the routes that can serve it, in the operator's order.
pub struct Model {
    pub id: String,
    pub config: ModelConfig,
    pub routes: Vec<Arc<Route>>,
}

impl Model {
    pub fn kind(&self) -> ModelType {
        self.config.kind
    }
}

#[derive(Debug, thiserror::Error)]
#[error("provider `{id}`: {source}")]
pub struct RegistryError {
    id: String,
    #[source]
    source: marga_providers::ProviderError,
}

pub struct Registry {
    providers: BTreeMap<String, Arc<ProviderEntry>>,
    /// Public ids in catalog order.
    models: Vec<Arc<Model>>,
    /// Ids and aliases → model.
    by_name: HashMap<String, Arc<Model>>,
    pub fx: Fx,
}

impl Registry {
    pub fn build(config: &Config) -> Result<Registry, RegistryError> {
        let mut providers = BTreeMap::new();
        for (id, provider) in &config.providers {
            let settings = ProviderSettings {
                kind: provider.kind,
                base_url: provider.base_url.clone(),
                api_key: provider.api_key.clone(),
                auth_header: provider.auth_header.clone(),
                headers: provider.headers.clone().into_iter().collect(),
                supports_stream_usage: provider.supports_stream_usage,
                connect_timeout: config.routing.connect_timeout,
                max_idle_connections: config.server.upstream_idle_connections,
            };
            let client = marga_providers::build(settings).map_err(|source| RegistryError { id: id.clone(), source })?;
            let entry = ProviderEntry { id: id.clone(), config: provider.clone(), client };
            providers.insert(id.clone(), Arc::new(entry));
        }
        let mut models = Vec::new();
        let mut by_name = HashMap::new();
        for (id, model) in &config.models {
            let routes = model
                .routes
                .iter()
                .filter_map(|r| {
                    let provider = providers.get(&r.provider)?.clone();
                    let price = r.price().ok()?;
                    let batch_price = r.batch_price().ok().flatten();
                    let health = RouteHealth::new(config.routing.breaker);
                    let rank_price = price.combined_per_mtok(&config.fx).to_f64().unwrap_or(f64::MAX);
                    let metrics = RouteMetrics::new(id, &provider.id, &r.model);
                    Some(Arc::new(Route { provider, upstream_model: r.model.clone(), price, batch_price, rank_price, health, metrics }))
                })
                .collect();
            let model = Arc::new(Model { id: id.clone(), config: model.clone(), routes });
            for alias in &model.config.aliases {
                by_name.insert(alias.clone(), model.clone());
            }
            by_name.insert(id.clone(), model.clone());
            models.push(model);
        }
        Ok(Registry { providers, models, by_name, fx: config.fx.clone() })
    }

    /// The model a client named, by id or alias.
    pub fn model(&self, name: &str) -> Option<&Arc<Model>> {
        self.by_name.get(name)
    }

    /// Every route of every model.
    pub fn routes(&self) -> impl Iterator<Item = (&Arc<Model>, &Arc<Route>)> {
        self.models.iter().flat_map(|m| m.routes.iter().map(move |r| (m, r)))
    }

    pub fn models(&self) -> &[Arc<Model>] {
        &self.models
    }

    pub fn providers(&self) -> impl Iterator<Item = &Arc<ProviderEntry>> {
        self.providers.values()
    }

    pub fn provider(&self, id: &str) -> Option<&Arc<ProviderEntry>> {
        self.providers.get(id)
    }
}
