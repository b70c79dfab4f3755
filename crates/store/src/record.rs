//! The rows the repositories read and write, as plain structs.

/// One request, as the request log keeps it. Serializable so that the gateway can spill
/// records to a local file while the database is unreachable (missing fields read as default).
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GenerationRecord {
    /// The response `id` the client saw (also `x-generation-id`).
    pub id: String,
    pub created_at_ms: i64,
    pub org_id: Option<String>,
    pub key_id: Option<String>,
    /// `chat`, `completions` or `embeddings`.
    pub endpoint: String,
    /// The public model the client asked for.
    pub model: String,
    /// The provider id that served (or last failed).
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub streamed: bool,
    /// `success`, `error`, `error_midstream` or `cancelled`.
    pub status: String,
    pub http_status: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub reasoning_tokens: i64,
    /// True when the tokens were counted by Marga, not reported by the upstream.
    pub usage_estimated: bool,
    /// Exact decimal, as text.
    pub cost: String,
    pub currency: String,
    pub latency_ms: i64,
    pub ttft_ms: Option<i64>,
    pub finish_reason: Option<String>,
    /// JSON array of `{provider, model, outcome, status, latency_ms, started_ms}` (`started_ms`:
    /// when the attempt began, after the request arrived).
    pub attempts: String,
    pub error: Option<String>,
    pub user_agent: Option<String>,
    pub referer: Option<String>,
    pub end_user: Option<String>,
    /// `cost` in nanos (what the ledger was charged), summed exactly by the usage queries.
    pub cost_nanos: i64,
    /// From the start of the attempt that served to the end of the answer.
    pub generation_time_ms: Option<i64>,
    /// The client went away before the answer ended (`status` is `cancelled`).
    pub cancelled: bool,
    /// The request brought its own upstream key.
    pub byok: bool,
    /// The organisation's local day of the request: days since 1970-01-01 in its time zone
    /// (as it was when the request was made).
    pub local_day: i64,
}

/// A saved fallback chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct ChainRecord {
    pub org_id: String,
    pub model: String,
    /// JSON array of `{model, provider?}`.
    pub steps: String,
    pub updated_at_ms: i64,
}
