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

/// What handlers share. Every field is an `Arc` or a cheap handle.
#[derive(Clone)]
pub struct AppState {
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

fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/chat/completions", post(chat::chat_completions))
        .route("/completions", post(chat::completions))
        .route("/embeddings", post(embeddings::embeddings))
        .route("/files", get(files::list).post(files::upload))
        .route("/files/{id}", get(files::get).delete(files::delete))
        .route("/files/{id}/content", get(files::content))
        .route("/batches", get(batches::list).post(batches::create))
        .route("/batches/{id}", get(batches::get))
        .route("/batches/{id}/cancel", post(batches::cancel))
        .route("/batches/{id}/results", get(batches::results))
        .route("/batches/{id}/artifact-url", get(batches::artifact_url))
        .route("/batches/{id}/artifact", get(batches::artifact))
        .route("/quotes/model", post(batches::quote))
        .route("/models", get(models::list))
        .route("/models/{*id}", get(models::get))
        .route("/route/explain", post(routing::explain))
        .route("/providers", get(routing::providers))
        .route("/keys", get(keys::list).post(keys::create))
        .route("/keys/{hash}", get(keys::get).patch(keys::update).delete(keys::delete))
        .route("/key", get(keys::current))
        .route("/credits", get(keys::credits))
        .route("/generation", get(usage::generation))
        .route("/activity", get(usage::openrouter_activity))
        .route("/rankings", get(stats::rankings))
        .route("/guardrails", get(guardrails::list).post(guardrails::create))
        .route("/guardrails/{id}", get(guardrails::get).patch(guardrails::update).delete(guardrails::delete))
        .route("/guardrails/assignments/keys", get(assignments::all_key_assignments))
        .route("/guardrails/assignments/members", get(assignments::all_member_assignments))
        .route("/guardrails/{id}/keys", post(assignments::assign_keys))
        .route("/guardrails/{id}/keys/remove", post(assignments::unassign_keys))
        .route("/guardrails/{id}/members", post(assignments::assign_members))
        .route("/guardrails/{id}/members/remove", post(assignments::unassign_members))
        .route(
            "/guardrails/{id}/assignments/keys",
            get(assignments::list_key_assignments).post(assignments::assign_keys),
        )
        .route("/guardrails/{id}/assignments/keys/remove", post(assignments::unassign_keys))
        .route(
            "/guardrails/{id}/assignments/members",
            get(assignments::list_member_assignments).post(assignments::assign_members),
        )
        .route("/guardrails/{id}/assignments/members/remove", post(assignments::unassign_members))
        .route("/auth/account", get(admin::account))
        .route("/auth/account/api-keys", post(admin::create_account_key))
        .route("/auth/account/delivery-webhook", axum::routing::put(batches::put_delivery_webhook))
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
    Router::new()
        .nest("/v1", api_routes())
        .nest("/api/v1", api_routes())
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
