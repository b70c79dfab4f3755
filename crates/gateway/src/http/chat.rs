//! `POST /v1/chat/completions` and `POST /v1/completions`: admit, then answer in one piece or
//! as a stream. The whole-answer paths ([`chat_whole`], [`completion_whole`]) are shared with
//! batch items.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::Response;
use marga_protocol::answer::ChatAnswer;
use marga_protocol::openai::{
    ChatCompletionRequest, CompletionRequest, CompletionResponse, FinishReason, Usage,
};
use marga_providers::Call;

use super::admit::{admit_to_serve, caller, reserve, take_extensions};
use super::extract::{client_info, parse_json, read_body};
use super::respond::{json_response, record_failure, sse_response};
use super::AppState;
use crate::config::ModelType;
use crate::error::ApiError;
use crate::money::Money;
use crate::pipeline::attempt::{first_success, Served};
use crate::pipeline::plan::Plan;
use crate::pipeline::stream::{open_until_content, relay, Opened, RelayParams, StreamChunk};
use crate::accounts::Principal;
use crate::pipeline::{record, settle, ClientInfo, Endpoint, Outcome, RequestCtx};
use crate::routing::Observation;
use crate::tokens;

/// Checks what serde cannot: ranges and required content.
pub(crate) fn validate_chat(request: &ChatCompletionRequest) -> Result<(), ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::invalid("`messages` must contain at least one message", Some("messages".into())));
    }
    validate_sampling(request.temperature, request.top_p, request.n)
}

pub(crate) fn validate_sampling(temperature: Option<f64>, top_p: Option<f64>, n: Option<u32>) -> Result<(), ApiError> {
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(ApiError::invalid("`temperature` must be between 0 and 2", Some("temperature".into())));
    }
    if top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return Err(ApiError::invalid("`top_p` must be between 0 and 1", Some("top_p".into())));
    }
    if n.is_some_and(|n| !(1..=128).contains(&n)) {
        return Err(ApiError::invalid("`n` must be between 1 and 128", Some("n".into())));
    }
    Ok(())
}

fn finish_reason_text(reason: Option<&FinishReason>) -> Option<String> {
    reason.map(|reason| reason.as_str().to_owned())
}

/// Settles a whole (non-streamed) answer — its charge is durable before anyone sees it —
/// records it, and writes its `usage` (with its `cost`) back. Returns the cost.
pub(crate) async fn settle_whole<T>(
    state: &AppState,
    ctx: &mut RequestCtx,
    served: &mut Served<T>,
    usage_of: impl Fn(&mut T) -> &mut Option<Usage>,
    estimated: bool,
    finish_reason: Option<String>,
) -> Result<Option<Money>, ApiError> {
    let route = served.candidate.route.clone();
    let mut usage = usage_of(&mut served.value).take().unwrap_or_default();
    route.health.record_success(Observation { latency: served.elapsed, ttft: None, completion_tokens: usage.completion_tokens });
    let cost = match settle(ctx, &route, &mut usage).await {
        Ok(cost) => cost,
        Err(e) => return Err(record_failure(state, ctx, e)),
    };
    let outcome = Outcome {
        status: "success",
        http_status: 200,
        route: Some(&route),
        usage: Some(&usage),
        usage_estimated: estimated,
        ttft_ms: None,
        finish_reason,
        error: None,
        cost,
    };
    state.log.record(record(ctx, &outcome));
    *usage_of(&mut served.value) = Some(usage);
    Ok(cost)
}

/// The SSE response for an opened stream.
fn stream_response<C: StreamChunk>(
    state: &AppState,
    ctx: RequestCtx,
    plan: &Plan,
    served: Served<Opened<C>>,
    estimate_prompt: Box<dyn Fn() -> u64 + Send>,
) -> Response {
    let headers = super::respond::served_headers(&ctx, plan, &served.candidate, None);
    let params = RelayParams {
        ctx,
        candidate: served.candidate,
        log: state.log.clone(),
        opened: served.value,
        estimate_prompt,
        idle_timeout: state.routing.settings.stream_idle_timeout,
        total_timeout: state.routing.settings.total_timeout,
    };
    sse_response(relay(params), headers)
}

/// Who sent a request: its principal (authenticated once, before the body was read), its
/// headers and its address.
pub(super) struct Sender<'a> {
    pub principal: Principal,
    pub headers: &'a HeaderMap,
    pub peer: SocketAddr,
}

/// Admits a parsed request of an authenticated sender: limits, plan, reserve, and the
/// request's context.
pub(super) async fn begin_request(
    state: &AppState,
    sender: Sender<'_>,
    model: &str,
    ext: &marga_protocol::routing::RoutingExtensions,
    shape: (Endpoint, bool, usize, Option<u32>),
    end_user: Option<&str>,
) -> Result<(RequestCtx, Plan), ApiError> {
    let (principal, quota) = caller(state, sender.principal, sender.peer).await?;
    let client = client_info(sender.headers, end_user);
    let (mut ctx, plan) = begin_for(state, principal, model, ext, shape, client, None).await?;
    ctx.quota = quota;
    Ok((ctx, plan))
}

/// Admits a parsed request of a known `principal` (already authenticated and counted):
/// guardrail, plan, credit reservation (from `batch_lease` for a batch item whose credit was
/// reserved with its batch), and the request's context.
pub(crate) async fn begin_for(
    state: &AppState,
    principal: Principal,
    model: &str,
    ext: &marga_protocol::routing::RoutingExtensions,
    shape: (Endpoint, bool, usize, Option<u32>),
    client: ClientInfo,
    batch_lease: Option<&str>,
) -> Result<(RequestCtx, Plan), ApiError> {
    let (endpoint, stream, prompt_bytes, output_cap) = shape;
    let kind = if endpoint == Endpoint::Embeddings { ModelType::Embedding } else { ModelType::Chat };
    let admitted = admit_to_serve(state, &principal, model, ext, kind)?;
    let billing = match batch_lease {
        Some(lease) => {
            let most = super::admit::max_cost(state, &admitted, prompt_bytes, output_cap);
            state.admission.reserve_batch_item(&principal, most, lease).await?
        }
        None => reserve(state, &principal, &admitted, prompt_bytes, output_cap).await?,
    };
    let mut ctx = RequestCtx::new(principal, endpoint, admitted.model, stream, client);
    ctx.byok = ext.upstream_key.is_some();
    ctx.billing = Some(billing);
    Ok((ctx, admitted.plan))
}

/// A whole (non-streamed) chat answer: attempts with failover, fills in estimated usage,
/// settles and records it. What `POST /v1/chat/completions` answers, and what a batch item
/// gets.
pub(crate) async fn chat_whole(
    state: &AppState,
    ctx: &mut RequestCtx,
    plan: &Plan,
    request: &ChatCompletionRequest,
    key: Option<&str>,
) -> Result<(Served<ChatAnswer>, Option<Money>), ApiError> {
    let mut served = first_success(ctx, &plan.candidates, &state.routing, |c| async move {
        let call = Call { request, upstream_model: &c.route.upstream_model, api_key: key };
        c.route.provider.client.chat(call).await
    })
    .await
    .map_err(|e| record_failure(state, ctx, e))?;
    let answer = &mut served.value;
    let estimated = answer.usage_mut().is_none();
    if estimated {
        let usage = Usage::new(tokens::prompt_tokens(request), tokens::count(&answer.text()));
        *answer.usage_mut() = Some(usage);
    }
    answer.set_identity(&ctx.id, &served.candidate.model.id);
    let finish = finish_reason_text(answer.finish_reason());
    let cost = settle_whole(state, ctx, &mut served, ChatAnswer::usage_mut, estimated, finish).await?;
    Ok((served, cost))
}

/// A whole legacy completion (see [`chat_whole`]).
pub(crate) async fn completion_whole(
    state: &AppState,
    ctx: &mut RequestCtx,
    plan: &Plan,
    request: &CompletionRequest,
    key: Option<&str>,
) -> Result<(Served<CompletionResponse>, Option<Money>), ApiError> {
    let mut served = first_success(ctx, &plan.candidates, &state.routing, |c| async move {
        let call = Call { request, upstream_model: &c.route.upstream_model, api_key: key };
        c.route.provider.client.completions(call).await
    })
    .await
    .map_err(|e| record_failure(state, ctx, e))?;
    let response = &mut served.value;
    let estimated = response.usage.is_none();
    if estimated {
        let text: String = response.choices.iter().map(|c| c.text.as_str()).collect();
        response.usage = Some(Usage::new(tokens::count(&request.prompt.joined_text()), tokens::count(&text)));
    }
    response.id.clone_from(&ctx.id);
    response.model.clone_from(&served.candidate.model.id);
    let finish = finish_reason_text(response.choices.first().and_then(|c| c.finish_reason.as_ref()));
    let cost = settle_whole(state, ctx, &mut served, |r| &mut r.usage, estimated, finish).await?;
    Ok((served, cost))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    let bytes = read_body(body, state.max_body).await?;
    let mut request: ChatCompletionRequest = parse_json(&bytes)?;
    let ext = take_extensions(&mut request.extra)?;
    validate_chat(&request)?;
    let shape = (Endpoint::Chat, request.stream, bytes.len(), request.output_cap());
    let (mut ctx, plan) = begin_request(&state, Sender { principal, headers: &headers, peer }, &request.model, &ext, shape, request.user.as_deref()).await?;
    let key = ext.upstream_key.as_deref();
    if request.stream {
        let served = first_success(&mut ctx, &plan.candidates, &state.routing, |c| {
            let request = &request;
            async move {
                let call = Call { request, upstream_model: &c.route.upstream_model, api_key: key };
                open_until_content(c.route.provider.client.chat_stream(call).await?).await
            }
        })
        .await
        .map_err(|e| record_failure(&state, &ctx, e))?;
        return Ok(stream_response(&state, ctx, &plan, served, Box::new(move || tokens::prompt_tokens(&request))));
    }
    let (served, cost) = chat_whole(&state, &mut ctx, &plan, &request, key).await?;
    Ok(json_response(served.value.to_json(), &ctx, &plan, &served.candidate, cost))
}

pub async fn completions(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    let bytes = read_body(body, state.max_body).await?;
    let mut request: CompletionRequest = parse_json(&bytes)?;
    let ext = take_extensions(&mut request.extra)?;
    validate_sampling(request.temperature, request.top_p, None)?;
    let shape = (Endpoint::Completions, request.stream, bytes.len(), request.max_tokens);
    let (mut ctx, plan) = begin_request(&state, Sender { principal, headers: &headers, peer }, &request.model, &ext, shape, request.user.as_deref()).await?;
    let key = ext.upstream_key.as_deref();
    if request.stream {
        let served = first_success(&mut ctx, &plan.candidates, &state.routing, |c| {
            let request = &request;
            async move {
                let call = Call { request, upstream_model: &c.route.upstream_model, api_key: key };
                open_until_content(c.route.provider.client.completions_stream(call).await?).await
            }
        })
        .await
        .map_err(|e| record_failure(&state, &ctx, e))?;
        let estimate = Box::new(move || tokens::count(&request.prompt.joined_text()));
        return Ok(stream_response(&state, ctx, &plan, served, estimate));
    }
    let (served, cost) = completion_whole(&state, &mut ctx, &plan, &request, key).await?;
    Ok(json_response(serde_json::to_vec(&served.value), &ctx, &plan, &served.candidate, cost))
}
