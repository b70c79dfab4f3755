//! The HTTP surface: the axum router, its shared state, and one module per endpoint family.
//! Every endpoint of `/v1` is also served under `/api/v1` (OpenRouter's base path).

mod admin;
pub(crate) mod admit;
mod assignments;
mod batches;
pub(crate) mod chat;
pub(crate) mod embeddings;
mod extract;
mod files;
mod guardrails;
mod keys;
mod members;
mod models;
mod money_json;
mod ops;
mod respond;
mod routing;
mod stats;
mod usage;
mod usage_report;
mod workspaces;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::catch_panic::CatchPanicLayer;

use crate::admission::Admission;
use crate::batch::Batches;
use crate::error::ApiError;
use crate::registry::Registry;
use crate::request_log::RequestLog;
use crate::routing::Routing;

pub use models::ModelPages;
pub use usage::UsageState;

/// What handlers share: one `Arc`, so that handing it to a request (axum clones the state
/// for every extraction) is one reference count, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The handlers' shared state, behind [`AppState`]. Every field is an `Arc` or a cheap handle
/// (tasks that outlive a request clone the one they need).
pub struct Shared {
    pub registry: Arc<Registry>,
    pub admission: Arc<Admission>,
    pub log: RequestLog,
    pub routing: Arc<Routing>,
    pub model_pages: Arc<ModelPages>,
    /// Usage analytics: the store's queries and the public statistics cache.
    pub usage: Arc<UsageState>,
    pub prometheus: Option<PrometheusHandle>,
    pub max_body: usize,
    pub batches: Arc<Batches>,
    /// Seals secrets before they are stored, opens them where they are used.
    pub secrets: Arc<crate::secrets::Secrets>,
}

/// The OpenAI-compatible API under `prefix` (`/v1` and `/api/v1`). Routes are registered
/// with their full paths rather than nested: a nested router rebuilds the request's URI on
/// every request to strip its prefix.
fn api_routes(router: Router<AppState>, prefix: &str) -> Router<AppState> {
    let at = |path: &str| format!("{prefix}{path}");
    router
        .route(&at("/chat/completions"), post(chat::chat_completions))
        .route(&at("/completions"), post(chat::completions))
        .route(&at("/embeddings"), post(embeddings::embeddings))
        .route(&at("/files"), get(files::list).post(files::upload))
        .route(&at("/files/{id}"), get(files::get).delete(files::delete))
        .route(&at("/files/{id}/content"), get(files::content))
        .route(&at("/batches"), get(batches::list).post(batches::create))
        .route(&at("/batches/{id}"), get(batches::get))
        .route(&at("/batches/{id}/cancel"), post(batches::cancel))
        .route(&at("/batches/{id}/results"), get(batches::results))
        .route(&at("/batches/{id}/artifact-url"), get(batches::artifact_url))
        .route(&at("/batches/{id}/artifact"), get(batches::artifact))
        .route(&at("/quotes/model"), post(batches::quote))
        .route(&at("/models"), get(models::list))
        .route(&at("/models/{*id}"), get(models::get))
        .route(&at("/route/explain"), post(routing::explain))
        .route(&at("/providers"), get(routing::providers))
        .route(&at("/keys"), get(keys::list).post(keys::create))
        .route(&at("/keys/{hash}"), get(keys::get).patch(keys::update).delete(keys::delete))
        .route(&at("/key"), get(keys::current))
        .route(&at("/credits"), get(keys::credits))
        .route(&at("/generation"), get(usage::generation))
        .route(&at("/activity"), get(usage::openrouter_activity))
        .route(&at("/rankings"), get(stats::rankings))
        .route(&at("/guardrails"), get(guardrails::list).post(guardrails::create))
        .route(&at("/guardrails/{id}"), get(guardrails::get).patch(guardrails::update).delete(guardrails::delete))
        .route(&at("/guardrails/assignments/keys"), get(assignments::all_key_assignments))
        .route(&at("/guardrails/assignments/members"), get(assignments::all_member_assignments))
        .route(&at("/guardrails/{id}/keys"), post(assignments::assign_keys))
        .route(&at("/guardrails/{id}/keys/remove"), post(assignments::unassign_keys))
        .route(&at("/guardrails/{id}/members"), post(assignments::assign_members))
        .route(&at("/guardrails/{id}/members/remove"), post(assignments::unassign_members))
        .route(
            &at("/guardrails/{id}/assignments/keys"),
            get(assignments::list_key_assignments).post(assignments::assign_keys),
        )
        .route(&at("/guardrails/{id}/assignments/keys/remove"), post(assignments::unassign_keys))
        .route(
            &at("/guardrails/{id}/assignments/members"),
            get(assignments::list_member_assignments).post(assignments::assign_members),
        )
        .route(&at("/guardrails/{id}/assignments/members/remove"), post(assignments::unassign_members))
        .route(&at("/auth/account"), get(admin::account))
        .route(&at("/auth/account/api-keys"), post(admin::create_account_key))
        .route(&at("/auth/account/delivery-webhook"), axum::routing::put(batches::put_delivery_webhook))
}

/// The operator's and the dashboard's endpoints (not under `/v1`).
fn management_routes() -> Router<AppState> {
    Router::new()
        .route("/admin/orgs", get(admin::list_orgs).post(admin::create_org))
        .route("/admin/orgs/{id}", get(admin::get_org))
        .route("/admin/orgs/{id}/credits", post(admin::grant_credits))
        .route("/me/keys", get(keys::list).post(admin::create_account_key))
        .route("/me/keys/{id}", get(keys::get).patch(keys::update).delete(keys::delete))
        .route("/me/members", get(members::list).post(members::add))
        .route("/me/members/{id}", axum::routing::patch(members::update).delete(members::remove))
        .route("/me/workspaces", get(workspaces::list).post(workspaces::create))
        .route("/me/usage", get(usage::me_usage))
        .route("/me/usage/daily", get(usage::me_usage_daily))
        .route("/me/activity", get(usage::me_activity))
        .route("/me/activity/events", get(usage::me_events))
        .route("/me/workspaces/{id}", axum::routing::patch(workspaces::update).delete(workspaces::delete))
}

/// The whole router. Layers, outermost first: catch-panic (a panic becomes a 500 envelope,
/// never a dropped connection), then axum's default body limit switched off in favour of the
/// handlers' own bounded reads (which answer 413 in the OpenAI envelope).
pub fn router(state: AppState) -> Router {
    api_routes(api_routes(Router::new(), "/v1"), "/api/v1")
        .merge(management_routes())
        .route("/me/routing/{*model}", get(routing::get_chain).put(routing::put_chain).delete(routing::delete_chain))
        .route("/health", get(ops::health))
        .route("/metrics", get(ops::metrics))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::disable())
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::Internal(anyhow::anyhow!("handler panicked")))
        }))
        .with_state(state)
}
