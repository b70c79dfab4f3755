//! `/v1/files`: upload (multipart, streamed to disk, JSONL checked line by line when the
//! purpose is `batch`), list, get, content and delete. Files belong to the caller's
//! organisation: another organisation's id is 404.

use axum::body::Body;
use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use marga_store::FileRecord;
use serde::Deserialize;
use serde_json::{json, Value};

use super::AppState;
use crate::accounts::Principal;
use crate::batch::create::store_error;
use crate::batch::files::{LineChecker, Writing};
use crate::batch::shapes::{file_json, page};
use crate::error::ApiError;
use crate::pipeline::unix_now_ms;

/// The purposes OpenAI accepts for uploads.
const PURPOSES: [&str; 6] = ["batch", "assistants", "fine-tune", "vision", "user_data", "evals"];
const MAX_FILENAME: usize = 255;

fn caller(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let principal = state.admission.accounts.authenticate(headers)?;
    principal.require_inference()?;
    Ok(principal)
}

/// What the upload's `file` part became on disk.
struct Stored {
    writing: Writing,
    filename: String,
    checker: LineChecker,
}

pub async fn upload(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    let mut multipart = multipart.map_err(|e| ApiError::invalid(format!("expected a multipart/form-data body: {e}"), None))?;
    let id = format!("file-{}", uuid::Uuid::now_v7().simple());
    let mut purpose = None;
    let mut stored: Option<Stored> = None;
    let result = async {
        while let Some(field) = multipart.next_field().await.map_err(bad_multipart)? {
            match field.name() {
                Some("purpose") => purpose = Some(field.text().await.map_err(bad_multipart)?.chars().take(64).collect::<String>()),
                Some("file") if stored.is_none() => stored = Some(store_field(&state, &id, field).await?),
                _ => {}
            }
        }
        Ok::<(), ApiError>(())
    }
    .await;
    let finish = finish_upload(&state, &principal, id, purpose, stored.take(), result).await?;
    Ok(Json(file_json(&finish)))
}

async fn finish_upload(
    state: &AppState,
    principal: &Principal,
    id: String,
    purpose: Option<String>,
    stored: Option<Stored>,
    result: Result<(), ApiError>,
) -> Result<FileRecord, ApiError> {
    let Some(mut stored) = stored else {
        result?;
        return Err(ApiError::invalid("the `file` part is missing", Some("file".into())));
    };
    let purpose = purpose.unwrap_or_default();
    let lines = stored.checker.finish();
    let refusal = result.err().or_else(|| match () {
        _ if !PURPOSES.contains(&purpose.as_str()) => {
            Some(ApiError::invalid(format!("`purpose` must be one of {}", PURPOSES.join(", ")), Some("purpose".into())))
        }
        _ if purpose == "batch" => stored
            .checker
            .first_error
            .take()
            .or_else(|| (lines == 0).then(|| "the file holds no lines".to_owned()))
            .map(|e| ApiError::invalid(format!("invalid batch file: {e}"), Some("file".into()))),
        _ => None,
    });
    if let Some(refusal) = refusal {
        stored.writing.abandon().await;
        return Err(refusal);
    }
    let bytes = stored.writing.commit().await?;
    let record = FileRecord {
        id,
        org_id: principal.org.id.clone(),
        purpose,
        filename: stored.filename,
        bytes: bytes as i64,
        lines: lines as i64,
        created_at_ms: unix_now_ms(),
    };
    if let Err(e) = state.batches.store.create_file(&record).await {
        let _ = tokio::fs::remove_file(state.batches.path_of(&record.id)).await;
        return Err(store_error(e));
    }
    Ok(record)
}

/// Streams the `file` part to disk, checking lines on the way, refusing past the size limit.
async fn store_field(state: &AppState, id: &str, mut field: Field<'_>) -> Result<Stored, ApiError> {
    let filename: String = field.file_name().unwrap_or("upload.jsonl").chars().take(MAX_FILENAME).collect();
    let settings = &state.batches.settings;
    let limit = settings.max_file_bytes;
    let mut writing = Writing::create(state.batches.path_of(id)).await?;
    let mut checker = LineChecker::new(settings.max_line_bytes);
    loop {
        let chunk = match field.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                writing.abandon().await;
                return Err(bad_multipart(e));
            }
        };
        if writing.bytes + chunk.len() as u64 > limit {
            writing.abandon().await;
            return Err(ApiError::BodyTooLarge { limit: usize::try_from(limit).unwrap_or(usize::MAX) });
        }
        checker.feed(&chunk);
        if let Err(e) = writing.write(&chunk).await {
            writing.abandon().await;
            return Err(e);
        }
    }
    Ok(Stored { writing, filename, checker })
}

fn bad_multipart(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::invalid(format!("could not read the multipart body: {}", e.body_text()), None)
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<i64>,
    purpose: Option<String>,
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap, Query(q): Query<ListQuery>) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let files = state
        .batches
        .store
        .list_files(&principal.org.id, q.purpose.as_deref(), q.after.as_deref(), limit + 1)
        .await
        .map_err(store_error)?;
    Ok(Json(page(files.iter().map(file_json).collect(), limit as usize)))
}

async fn own_file(state: &AppState, principal: &Principal, id: &str) -> Result<FileRecord, ApiError> {
    state.batches.store.get_file(&principal.org.id, id).await.map_err(store_error)?.ok_or(ApiError::NotFound)
}

pub async fn get(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    Ok(Json(file_json(&own_file(&state, &principal, &id).await?)))
}

/// The file's bytes, streamed from disk.
pub async fn content(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let principal = caller(&state, &headers)?;
    let file = own_file(&state, &principal, &id).await?;
    let opened = tokio::fs::File::open(state.batches.path_of(&file.id)).await.map_err(crate::batch::files::io_error)?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(opened));
    let mut response = body.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(length) = HeaderValue::from_str(&file.bytes.to_string()) {
        response.headers_mut().insert(header::CONTENT_LENGTH, length);
    }
    Ok(response)
}

pub async fn delete(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    if !state.batches.store.delete_file(&principal.org.id, &id).await.map_err(store_error)? {
        return Err(ApiError::NotFound);
    }
    let _ = tokio::fs::remove_file(state.batches.path_of(&id)).await;
    Ok(Json(json!({ "id": id, "object": "file", "deleted": true })))
}
