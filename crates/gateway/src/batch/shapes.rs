//! The OpenAI JSON of files, batches and lists, exactly as the official SDKs parse them
//! (`FileObject`, `Batch`, `BatchRequestCounts`, `SyncCursorPage`).

use marga_store::{BatchRecord, FileRecord};
use serde_json::{json, Value};

use super::secs;

pub fn file_json(f: &FileRecord) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": secs(f.created_at_ms),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "expires_at": null,
        "status_details": null,
    })
}

/// Marga's extension: the lane the batch runs on (`realtime`, or `native` with its route).
pub fn lane_json(b: &BatchRecord) -> Value {
    json!({"kind": b.lane, "route": b.lane_route})
}

pub fn batch_json(b: &BatchRecord) -> Value {
    let at = |ms: Option<i64>| ms.map(secs);
    let expired = b.status == "expired";
    let (completed_at, expired_at) = if expired { (None, at(b.completed_at_ms)) } else { (at(b.completed_at_ms), None) };
    let metadata = b.metadata.as_deref().and_then(|m| serde_json::from_str::<Value>(m).ok());
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": null,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": secs(b.created_at_ms),
        "in_progress_at": at(b.in_progress_at_ms),
        "expires_at": secs(b.expires_at_ms),
        "finalizing_at": at(b.finalizing_at_ms),
        "completed_at": completed_at,
        "failed_at": null,
        "expired_at": expired_at,
        "cancelling_at": at(b.cancelling_at_ms),
        "cancelled_at": at(b.cancelled_at_ms),
        "request_counts": { "total": b.total, "completed": b.completed, "failed": b.failed },
        "lane": lane_json(b),
        "metadata": metadata,
    })
}

/// A cursor page: `has_more` when the store returned one more than asked for.
pub fn page(mut data: Vec<Value>, limit: usize) -> Value {
    let has_more = data.len() > limit;
    data.truncate(limit);
    let id = |v: Option<&Value>| v.and_then(|v| v["id"].as_str().map(str::to_owned));
    json!({
        "object": "list",
        "first_id": id(data.first()),
        "last_id": id(data.last()),
        "has_more": has_more,
        "data": data,
    })
}

/// One line of an output or error file.
pub fn result_line(batch_id: &str, idx: i64, custom_id: &str, status: u16, request_id: &str, body: &Value) -> String {
    let suffix = batch_id.strip_prefix("batch_").unwrap_or(batch_id);
    json!({
        "id": format!("batch_req_{suffix}_{idx}"),
        "custom_id": custom_id,
        "response": { "status_code": status, "request_id": request_id, "body": body },
        "error": null,
    })
    .to_string()
}
