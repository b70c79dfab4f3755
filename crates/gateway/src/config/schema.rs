//! The TOML schema: what each section of the config file may contain, with defaults and
//! per-field validation. Unknown keys are refused so that typos do not pass silently.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use marga_providers::ProviderKind;
use rust_decimal::Decimal;
use serde::Deserialize;

use super::{invalid, parse_price, ConfigError, RoutingSettings};
use crate::money::{Currency, Fx, TokenPrice};
use crate::routing::{BreakerSettings, Strategy};

/// The top level of the operator's file. `providers` and `models` are merged separately.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TopLevel {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `postgres://…` to share state between instances; absent = embedded SQLite.
    pub database_url: Option<String>,
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub log: super::observability::RawLog,
    #[serde(default)]
    pub telemetry: super::observability::RawTelemetry,
    #[serde(default)]
    pub billing: BillingSettings,
    #[serde(default)]
    pub limits: LimitSettings,
    #[serde(default)]
    pub batch: BatchSettings,
    #[serde(default)]
    pub security: SecuritySettings,
    #[serde(default)]
    pub routing: RawRouting,
    #[serde(default)]
    pub fx: RawFx,
    /// Merged separately (see `merge_providers`); declared so that the key is known.
    #[serde(default, rename = "providers")]
    _providers: Option<toml::Table>,
    /// Merged separately (see `merge_models`).
    #[serde(default, rename = "models")]
    _models: Option<toml::Table>,
}

/// The most serving threads `[server] threads` may ask for.
pub const MAX_SERVING_THREADS: usize = 1024;

/// The most idle connections per upstream host and serving thread `[server]
/// upstream_idle_connections` may ask for.
pub const MAX_UPSTREAM_IDLE_CONNECTIONS: usize = 65_536;

/// `[server]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Largest request body accepted, in bytes (larger → 413).
    pub max_body_bytes: usize,
    /// Older spelling of `[log] flush_interval_ms` (used when that is absent).
    pub log_flush_ms: u64,
    /// Older spelling of `[log] queue` (used when that is absent).
    pub log_queue: usize,
    /// Serving threads, each with a runtime and a listening socket of its own; 0 = one per
    /// CPU core.
    pub threads: usize,
    /// Idle connections kept open to each upstream host by each serving thread; a connection
    /// that comes back from a request when that many are idle is closed (nginx's `keepalive`).
    pub upstream_idle_connections: usize,
}

impl ServerSettings {
    /// How many serving threads to start: `threads`, or one per core when it is 0.
    pub fn serving_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_body_bytes: 8 * 1024 * 1024,
            log_flush_ms: 200,
            log_queue: 65_536,
            threads: 0,
            upstream_idle_connections: 256,
        }
    }
}

/// `[billing]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingSettings {
    /// Currency of the built-in default organisation (the master key's).
    pub default_org_currency: String,
    /// BharatRouter's free trial tier: new inference keys are trial keys (60 req/min,
    /// 200 req/day, no charge).
    pub trial_keys: bool,
    /// How long an instance's credit lease lives without renewal: the longest an instance
    /// that died keeps credit set aside.
    pub lease_ttl_s: u64,
    /// How long settled charges (already in the charge journal) wait for company before the
    /// ledger writer commits them to the database in one transaction.
    pub commit_interval_ms: u64,
}

/// The longest `[billing] commit_interval_ms`.
pub const MAX_COMMIT_INTERVAL_MS: u64 = 10_000;

/// The bounds of `[billing] lease_ttl_s` (the longest credit stays set aside by an instance
/// that died).
pub const LEASE_TTL_S: std::ops::RangeInclusive<u64> = 1..=3600;

impl Default for BillingSettings {
    fn default() -> Self {
        BillingSettings { default_org_currency: "USD".to_owned(), trial_keys: false, lease_ttl_s: 30, commit_interval_ms: 200 }
    }
}

/// `[limits]`: gateway-wide defaults (a key's own limits take precedence).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Requests per minute for keys without their own `rpm_limit` (0 = none).
    pub default_key_rpm: u32,
    /// Requests per minute per client IP (0 = none).
    pub ip_rpm: u32,
    pub trial_rpm: u32,
    pub trial_daily: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings { default_key_rpm: 600, ip_rpm: 0, trial_rpm: 60, trial_daily: 200 }
    }
}

/// `[batch]`: files and the batch worker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSettings {
    /// Largest file `POST /v1/files` accepts, in bytes (larger → 413).
    pub max_file_bytes: u64,
    /// Largest line of a JSONL file, in bytes.
    pub max_line_bytes: usize,
    /// Most requests in one batch.
    pub max_items: usize,
    /// Batch items run at once by this instance's worker, in all.
    pub concurrency: usize,
    /// Batch items run at once per provider (the first route of each item's plan).
    pub per_provider_concurrency: usize,
    /// How long a claimed item stays this worker's without renewal: after a crash, how long
    /// its items wait before another worker (or the restarted one) takes them.
    pub item_lease_s: u64,
    /// How often an idle worker looks for work, in milliseconds.
    pub poll_ms: u64,
    /// Run the batch worker on this instance.
    pub worker: bool,
    /// Delay before the first retry of a failed webhook delivery, in milliseconds; each retry
    /// doubles it (the default spreads 8 deliveries over about 24 hours).
    pub webhook_retry_base_ms: u64,
    /// Least time between two `batch.progress` events of one batch, in milliseconds.
    pub webhook_progress_ms: u64,
    /// How often a batch on a provider's native batch lane is polled, in milliseconds.
    pub native_poll_ms: u64,
}

/// `[security]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    /// Let webhooks target private, loopback and link-local addresses, and plain http (for
    /// receivers on the operator's own network). Off: https to public addresses only.
    pub allow_private_webhook_targets: bool,
    /// The key that seals stored secrets (`${VAR}` expanded; `MARGA_SECRETS_KEY` wins). Taken
    /// out at load into [`super::Config::secrets_key`]: always `None` here after.
    pub secrets_key: Option<String>,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_file_bytes: 200 * 1024 * 1024,
            max_line_bytes: 8 * 1024 * 1024,
            max_items: 50_000,
            concurrency: 64,
            per_provider_concurrency: 32,
            item_lease_s: 60,
            poll_ms: 200,
            worker: true,
            webhook_retry_base_ms: 675_000,
            webhook_progress_ms: 30_000,
            native_poll_ms: 60_000,
        }
    }
}

/// `[routing]`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRouting {
    connect_timeout_ms: u64,
    first_token_timeout_ms: u64,
    stream_idle_timeout_ms: u64,
    total_timeout_ms: u64,
    max_attempts: usize,
    default_strategy: Strategy,
    explore_every: u64,
    breaker_threshold: u32,
    breaker_cooldown_s: u64,
    retry_budget_percent: u64,
    retry_budget_min_per_s: u64,
}

impl Default for RawRouting {
    fn default() -> Self {
        RawRouting {
            connect_timeout_ms: 5_000,
            first_token_timeout_ms: 60_000,
            stream_idle_timeout_ms: 120_000,
            total_timeout_ms: 600_000,
            max_attempts: 5,
            default_strategy: Strategy::Balanced,
            explore_every: 20,
            breaker_threshold: 5,
            breaker_cooldown_s: 30,
            retry_budget_percent: 20,
            retry_budget_min_per_s: 3,
        }
    }
}

impl RawRouting {
    pub fn resolve(&self, file: &str) -> Result<RoutingSettings, ConfigError> {
        if self.max_attempts == 0 {
            return Err(invalid(file, "routing.max_attempts", "must be at least 1"));
        }
        if self.breaker_threshold == 0 {
            return Err(invalid(file, "routing.breaker_threshold", "must be at least 1"));
        }
        for (key, value) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("first_token_timeout_ms", self.first_token_timeout_ms),
            ("stream_idle_timeout_ms", self.stream_idle_timeout_ms),
            ("total_timeout_ms", self.total_timeout_ms),
            ("breaker_cooldown_s", self.breaker_cooldown_s),
        ] {
            if value == 0 {
                return Err(invalid(file, format!("routing.{key}"), "must be greater than 0"));
            }
        }
        Ok(RoutingSettings {
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            first_token_timeout: Duration::from_millis(self.first_token_timeout_ms),
            stream_idle_timeout: Duration::from_millis(self.stream_idle_timeout_ms),
            total_timeout: Duration::from_millis(self.total_timeout_ms),
            max_attempts: self.max_attempts,
            default_strategy: self.default_strategy,
            explore_every: self.explore_every,
            breaker: BreakerSettings {
                threshold: self.breaker_threshold,
                cooldown: Duration::from_secs(self.breaker_cooldown_s),
            },
            retry_budget_percent: self.retry_budget_percent,
            retry_budget_min_per_s: self.retry_budget_min_per_s,
        })
    }
}

/// `[fx]`: the dated USD↔INR rate used to show and compare prices across currencies.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawFx {
    inr_per_usd: String,
    as_of: String,
}

impl Default for RawFx {
    fn default() -> Self {
        RawFx { inr_per_usd: "88.50".to_owned(), as_of: "2026-11-01".to_owned() }
    }
}

impl RawFx {
    pub fn resolve(&self, file: &str) -> Result<Fx, ConfigError> {
        let rate = parse_price(&self.inr_per_usd).map_err(|m| invalid(file, "fx.inr_per_usd", m))?;
        if rate.is_zero() {
            return Err(invalid(file, "fx.inr_per_usd", "must be greater than 0"));
        }
        Ok(Fx { inr_per_usd: rate, as_of: self.as_of.clone() })
    }
}

/// `[providers.<id>]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    #[serde(default)]
    pub name: Option<String>,
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default)]
    pub auth_header: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// ISO 3166 alpha-2 country where the provider processes data, or `LOCAL`.
    pub region: String,
    #[serde(default)]
    pub zdr: bool,
    #[serde(default)]
    pub trains_on_data: bool,
    #[serde(default = "yes")]
    pub supports_stream_usage: bool,
    #[serde(default)]
    pub homepage: Option<String>,
    #[serde(default)]
    pub privacy_policy_url: Option<String>,
}

fn yes() -> bool {
    true
}

impl ProviderConfig {
    /// Checks the values serde cannot: on failure, the key and what is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let region_ok = self.region == "LOCAL"
            || (self.region.len() == 2 && self.region.chars().all(|c| c.is_ascii_uppercase()));
        if !region_ok {
            return Err(("region".into(), format!("`{}` is not an ISO 3166 alpha-2 code (or LOCAL)", self.region)));
        }
        let url_ok = self.base_url.starts_with("http://") || self.base_url.starts_with("https://");
        if self.kind != ProviderKind::Sandbox && !url_ok {
            return Err(("base_url".into(), format!("`{}` must start with http:// or https://", self.base_url)));
        }
        if self.auth_header.is_some() && self.kind != ProviderKind::Openai {
            return Err(("auth_header".into(), "only applies to kind = \"openai\"".into()));
        }
        Ok(())
    }

    pub fn display_name<'a>(&'a self, id: &'a str) -> &'a str {
        self.name.as_deref().unwrap_or(id)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    #[default]
    Chat,
    Embedding,
}

/// `[models."<public id>"]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default, rename = "type")]
    pub kind: ModelType,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub context_length: Option<u32>,
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    #[serde(default)]
    pub input_modalities: Vec<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub routes: Vec<RouteConfig>,
}

impl ModelConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.routes.is_empty() {
            return Err(("routes".into(), "must list at least one route".into()));
        }
        for (i, route) in self.routes.iter().enumerate() {
            route.price().map_err(|(key, m)| (format!("routes[{i}].{key}"), m))?;
            route.batch_price().map_err(|(key, m)| (format!("routes[{i}].{key}"), m))?;
        }
        Ok(())
    }
}

/// One upstream that can serve a model, with its price.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub provider: String,
    pub model: String,
    pub input_per_mtok: String,
    pub output_per_mtok: String,
    #[serde(default)]
    pub cached_input_per_mtok: Option<String>,
    pub currency: String,
    /// The provider's native batch API prices (same currency); both or neither.
    #[serde(default)]
    pub batch_input_per_mtok: Option<String>,
    #[serde(default)]
    pub batch_output_per_mtok: Option<String>,
}

impl RouteConfig {
    /// The route's price, exact; on failure the key and what is wrong.
    pub fn price(&self) -> Result<TokenPrice, (String, String)> {
        let field = |key: &str, v: &str| parse_price(v).map_err(|m| (key.to_owned(), m));
        let input: Decimal = field("input_per_mtok", &self.input_per_mtok)?;
        let output = field("output_per_mtok", &self.output_per_mtok)?;
        let cached = match &self.cached_input_per_mtok {
            Some(v) => field("cached_input_per_mtok", v)?,
            None => input,
        };
        let currency: Currency = self.currency.parse().map_err(|m| ("currency".to_owned(), m))?;
        Ok(TokenPrice { input_per_mtok: input, output_per_mtok: output, cached_input_per_mtok: cached, currency })
    }

    /// The route's native batch price, if it has one (cached input at the batch input price);
    /// on failure the key and what is wrong.
    pub fn batch_price(&self) -> Result<Option<TokenPrice>, (String, String)> {
        let field = |key: &str, v: &str| parse_price(v).map_err(|m| (key.to_owned(), m));
        let (input, output) = match (&self.batch_input_per_mtok, &self.batch_output_per_mtok) {
            (None, None) => return Ok(None),
            (Some(i), Some(o)) => (field("batch_input_per_mtok", i)?, field("batch_output_per_mtok", o)?),
            (Some(_), None) => return Err(("batch_output_per_mtok".into(), "is required with batch_input_per_mtok".into())),
            (None, Some(_)) => return Err(("batch_input_per_mtok".into(), "is required with batch_output_per_mtok".into())),
        };
        let currency: Currency = self.currency.parse().map_err(|m| ("currency".to_owned(), m))?;
        Ok(Some(TokenPrice { input_per_mtok: input, output_per_mtok: output, cached_input_per_mtok: input, currency }))
    }
}
