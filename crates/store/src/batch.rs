//! Files and batches: records and the repository traits ([`FileRepo`], [`BatchRepo`]).
//!
//! A batch's items are claimed by workers with a lease: [`BatchRepo::claim_items`] marks up to
//! `limit` claimable items (pending, or running under a lease that expired) as running under
//! the caller's `owner` until `lease_until_ms`, atomically (Postgres `FOR UPDATE SKIP LOCKED`,
//! SQLite one `UPDATE … RETURNING`), so two workers never hold one item at once.
//! [`BatchRepo::complete_item`] writes the result, marks the item done and counts it in the
//! batch in one transaction, and only while the claim is still the caller's: an item is done
//! exactly once even when a worker died, or stalled past its lease, mid-item.

use crate::{BoxFuture, StoreError};

/// An uploaded file's metadata (its bytes are on disk, owned by the gateway).
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct FileRecord {
    pub id: String,
    pub org_id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    /// JSONL lines (0 when not validated as JSONL).
    pub lines: i64,
    pub created_at_ms: i64,
}

/// A batch: its request, status, counts and timestamps. The default is on the realtime lane.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct BatchRecord {
    pub id: String,
    pub org_id: String,
    /// The key that created it: the items run as that key.
    pub key_id: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    /// JSON object, as given.
    pub metadata: Option<String>,
    /// `in_progress`, `finalizing`, `completed`, `failed`, `cancelling`, `cancelled`, `expired`.
    pub status: String,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at_ms: i64,
    pub in_progress_at_ms: Option<i64>,
    pub finalizing_at_ms: Option<i64>,
    pub completed_at_ms: Option<i64>,
    pub cancelling_at_ms: Option<i64>,
    pub cancelled_at_ms: Option<i64>,
    pub expires_at_ms: i64,
    /// Native batches: the client's `Idempotency-Key` (unique per organisation)…
    pub idempotency_key: Option<String>,
    /// …and the fingerprint of the request it came with (keyed HMAC-SHA256; the plain SHA-256
    /// for batches created before fingerprints were keyed).
    pub request_hash: Option<String>,
    /// The batch's own delivery webhook, if it was given one.
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    /// The credit lease reserved for the batch at creation (charged by its items, closed when
    /// it ends); `None` when the payer is not limited.
    pub credit_lease_id: Option<String>,
    /// `realtime` (items claimed by the workers) or `native` (the provider's batch API).
    pub lane: String,
    /// The native lane's route, `provider/upstream-model`.
    pub lane_route: Option<String>,
    /// The provider's batch id once the native lane submitted the items.
    pub native_batch_id: Option<String>,
    /// The lanes not taken and why (JSON array of `{kind, route?, reason}`), decided at
    /// creation.
    pub rejected_lanes: Option<String>,
}

impl Default for BatchRecord {
    fn default() -> Self {
        BatchRecord {
            id: String::new(),
            org_id: String::new(),
            key_id: String::new(),
            endpoint: String::new(),
            input_file_id: String::new(),
            completion_window: String::new(),
            metadata: None,
            status: String::new(),
            total: 0,
            completed: 0,
            failed: 0,
            output_file_id: None,
            error_file_id: None,
            created_at_ms: 0,
            in_progress_at_ms: None,
            finalizing_at_ms: None,
            completed_at_ms: None,
            cancelling_at_ms: None,
            cancelled_at_ms: None,
            expires_at_ms: 0,
            idempotency_key: None,
            request_hash: None,
            webhook_url: None,
            webhook_secret: None,
            credit_lease_id: None,
            lane: LANE_REALTIME.to_owned(),
            lane_route: None,
            native_batch_id: None,
            rejected_lanes: None,
        }
    }
}

/// The lane of a batch whose items run one by one through the router.
pub const LANE_REALTIME: &str = "realtime";
/// The lane of a batch that runs on its provider's native batch API.
pub const LANE_NATIVE: &str = "native";

/// One request of a batch, as created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewItem {
    pub custom_id: String,
    /// The request body, JSON.
    pub body: String,
}

/// A claimed item, for a worker to run.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct ClaimedItem {
    pub batch_id: String,
    pub idx: i64,
    pub custom_id: String,
    pub body: String,
    /// How many times it has been claimed (1 the first time).
    pub attempts: i64,
}

/// A finished item's output line.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct ItemResult {
    pub idx: i64,
    pub result: String,
    pub is_error: bool,
}

/// A webhook event to deliver, and how its delivery is going.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct DeliveryRecord {
    /// The event id (`evt_…`).
    pub id: String,
    pub batch_id: String,
    pub url: String,
    pub secret: String,
    /// The signed body, exactly as sent.
    pub body: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub next_at_ms: i64,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
}

pub trait FileRepo: Send + Sync {
    fn create_file<'a>(&'a self, file: &'a FileRecord) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The organisation's file `id` (another organisation's id is `None`).
    fn get_file<'a>(&'a self, org_id: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<FileRecord>, StoreError>>;
    /// The organisation's files, newest first, optionally of one purpose, older than the file
    /// `after` (a cursor), at most `limit`.
    fn list_files<'a>(
        &'a self,
        org_id: &'a str,
        purpose: Option<&'a str>,
        after: Option<&'a str>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<FileRecord>, StoreError>>;
    /// Returns whether a file was deleted.
    fn delete_file<'a>(&'a self, org_id: &'a str, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
}

pub trait BatchRepo: Send + Sync {
    /// Inserts the batch and its items (numbered from 0 in order) in one transaction.
    fn create_batch<'a>(&'a self, batch: &'a BatchRecord, items: &'a [NewItem]) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The organisation's batch `id` (another organisation's id is `None`).
    fn get_batch<'a>(&'a self, org_id: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<BatchRecord>, StoreError>>;
    /// The organisation's batch created with `Idempotency-Key` `key`.
    fn find_batch_by_key<'a>(&'a self, org_id: &'a str, key: &'a str) -> BoxFuture<'a, Result<Option<BatchRecord>, StoreError>>;
    /// The organisation's batches, newest first, older than the batch `after`, at most `limit`.
    fn list_batches<'a>(
        &'a self,
        org_id: &'a str,
        after: Option<&'a str>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<BatchRecord>, StoreError>>;
    /// Batches in one of `statuses` (for the worker), oldest first, at most `limit`.
    fn batches_in<'a>(&'a self, statuses: &'a [&'a str], limit: i64) -> BoxFuture<'a, Result<Vec<BatchRecord>, StoreError>>;
    /// Claims up to `limit` items of in-progress batches still within their window that are
    /// pending or whose lease expired before `now_ms`, for `owner` until `lease_until_ms`.
    fn claim_items<'a>(
        &'a self,
        owner: &'a str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<ClaimedItem>, StoreError>>;
    /// Extends `owner`'s claims on the items to `lease_until_ms`.
    fn renew_items<'a>(
        &'a self,
        owner: &'a str,
        items: &'a [(String, i64)],
        lease_until_ms: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Writes the item's result, marks it done and counts it (completed or failed) in its
    /// batch, in one transaction — only if `owner` still holds it. Returns whether it did.
    fn complete_item<'a>(
        &'a self,
        batch_id: &'a str,
        idx: i64,
        owner: &'a str,
        result: &'a str,
        is_error: bool,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Moves a batch from one of `from` to `to`, stamping `at_column` (one of the batch's
    /// `*_at_ms` columns) with `now_ms`. Returns whether it moved.
    fn set_batch_status<'a>(
        &'a self,
        id: &'a str,
        from: &'a [&'a str],
        to: &'a str,
        at_column: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Marks the batch's pending items (and running ones whose lease expired before `now_ms`)
    /// cancelled; returns how many are still running.
    fn cancel_pending_items<'a>(&'a self, batch_id: &'a str, now_ms: i64) -> BoxFuture<'a, Result<i64, StoreError>>;
    /// How many of the batch's items are not done yet (pending or running).
    fn unfinished_items<'a>(&'a self, batch_id: &'a str) -> BoxFuture<'a, Result<i64, StoreError>>;
    /// Finished items' results with `idx > after_idx`, in order, at most `limit`.
    fn item_results<'a>(
        &'a self,
        batch_id: &'a str,
        after_idx: i64,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<ItemResult>, StoreError>>;
    /// Ends the batch: records its output and error files (each created as a [`FileRecord`]
    /// in the same transaction, skipped if it exists) and moves it from `finalizing` or
    /// `cancelling` to `status`. Returns whether it moved.
    /// Takes (or renews) the native lane of a `native`-lane batch for `owner` until
    /// `lease_until_ms`, unless another owner holds it past `now_ms`. Returns whether it did.
    fn lease_native<'a>(
        &'a self,
        id: &'a str,
        owner: &'a str,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Records the provider's batch id, once, while `owner` holds the native lane.
    fn set_native_batch_id<'a>(&'a self, id: &'a str, owner: &'a str, native_id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Moves a `native`-lane batch to the realtime lane (its pending items become claimable).
    fn fall_back_to_realtime<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Pending items with `idx > after_idx`, in order, at most `limit` (the native lane's input).
    fn pending_items<'a>(&'a self, batch_id: &'a str, after_idx: i64, limit: i64) -> BoxFuture<'a, Result<Vec<ClaimedItem>, StoreError>>;
    /// Completes a pending item of a `native`-lane batch with its result (like
    /// [`BatchRepo::complete_item`], in one transaction), only if it is still pending.
    fn complete_native_item<'a>(
        &'a self,
        batch_id: &'a str,
        idx: i64,
        result: &'a str,
        is_error: bool,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn finish_batch<'a>(
        &'a self,
        id: &'a str,
        status: &'a str,
        output: Option<&'a FileRecord>,
        errors: Option<&'a FileRecord>,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
}

/// Webhook deliveries, claimed with a lease like batch items.
pub trait DeliveryRepo: Send + Sync {
    fn enqueue_delivery<'a>(&'a self, delivery: &'a DeliveryRecord) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Claims up to `limit` pending deliveries due at `now_ms` (and not held by a live claim)
    /// for `owner` until `lease_until_ms`.
    fn claim_deliveries<'a>(
        &'a self,
        owner: &'a str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<DeliveryRecord>, StoreError>>;
    /// Records the outcome of `owner`'s attempt: the new state, attempts and next time.
    fn finish_delivery<'a>(
        &'a self,
        id: &'a str,
        owner: &'a str,
        state: &'a str,
        attempts: i64,
        next_at_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn get_delivery<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<DeliveryRecord>, StoreError>>;
}

pub(crate) const DELIVERY_COLUMNS: &str = "id, batch_id, url, secret, body, attempts, max_attempts, next_at_ms, state";

/// The `*_at_ms` columns [`BatchRepo::set_batch_status`] may stamp.
pub const BATCH_TIME_COLUMNS: [&str; 5] =
    ["in_progress_at_ms", "finalizing_at_ms", "completed_at_ms", "cancelling_at_ms", "cancelled_at_ms"];

pub(crate) const FILE_COLUMNS: &str = "id, org_id, purpose, filename, bytes, lines, created_at_ms";

pub(crate) const BATCH_COLUMNS: &str = "id, org_id, key_id, endpoint, input_file_id, completion_window, metadata, \
     status, total, completed, failed, output_file_id, error_file_id, created_at_ms, in_progress_at_ms, \
     finalizing_at_ms, completed_at_ms, cancelling_at_ms, cancelled_at_ms, expires_at_ms, idempotency_key, request_hash, webhook_url, webhook_secret, credit_lease_id, lane, lane_route, native_batch_id, rejected_lanes";
