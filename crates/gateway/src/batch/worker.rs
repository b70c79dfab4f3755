//! The durable batch worker, one per instance. It claims items from the store with a lease
//! (owner = this process, a fresh id each start; expiry = now + `[batch] item_lease_s`),
//! renews the leases of items it is running, and completes each item in one transaction that
//! checks the claim is still its own. A worker that dies (`kill -9`) leaves its items
//! claimed until their lease expires; then any worker (the restarted one, or another instance
//! on the same Postgres) claims them again. An item is therefore done exactly once; its
//! upstream call may be repeated after a crash, but its charge is keyed by the item
//! (see [`super::exec`]), so it is charged once.
//!
//! Concurrency is bounded in all (`[batch] concurrency`) and per provider (the first route
//! of each item's plan, `[batch] per_provider_concurrency`). Between claims the worker
//! finalizes batches whose items are all done (output and error files) and winds down
//! cancelled ones. Batches on a provider's native lane are driven by
//! [`super::native_lane`] (one task per batch, stopped with the worker).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marga_store::{BatchRecord, ClaimedItem, DeliveryRecord, FileRecord, LANE_NATIVE};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::exec::{self, generation_id, Item};
use super::files::Writing;
use super::shapes::result_line;
use super::webhook;
use crate::error::ApiError;
use crate::http::AppState;
use crate::pipeline::plan::Plan;
use crate::pipeline::unix_now_ms;

/// Results read per page when writing output files.
const PAGE: i64 = 1000;
/// Most items claimed in one statement.
const MAX_CLAIM: usize = 256;
/// Batches the worker looks after per pass.
const MAX_ACTIVE: i64 = 1000;
/// How long a claimed webhook delivery is this worker's (longer than a delivery may take).
const DELIVERY_LEASE_MS: i64 = 30_000;
/// While looks find nothing to do, the wait between them doubles this many times at most
/// (up to 8 poll intervals: a batch created here ends the wait at once; one created by another
/// instance, a retry falling due or a lease running out is seen within that).
const IDLE_DOUBLINGS: u32 = 3;

/// The wait after `idle_looks` looks in a row found no batch, delivery or item: the poll
/// interval, doubled from the second such look on, [`IDLE_DOUBLINGS`] times at most.
fn idle_wait(poll: Duration, idle_looks: u32) -> Duration {
    poll * (1 << idle_looks.saturating_sub(1).min(IDLE_DOUBLINGS))
}

/// Deliveries grouped by batch, each group in the order its events were made (when each
/// became due, then the event id, a UUIDv7 that grows with time).
fn by_batch_in_order(mut due: Vec<DeliveryRecord>) -> Vec<Vec<DeliveryRecord>> {
    due.sort_by(|a, b| (&a.batch_id, a.next_at_ms, &a.id).cmp(&(&b.batch_id, b.next_at_ms, &b.id)));
    let mut groups: Vec<Vec<DeliveryRecord>> = Vec::new();
    for delivery in due {
        match groups.last_mut() {
            Some(group) if group[0].batch_id == delivery.batch_id => group.push(delivery),
            _ => groups.push(vec![delivery]),
        }
    }
    groups
}

/// The native-lane drivers a worker runs, by batch id.
#[derive(Default)]
struct NativeDrivers {
    tasks: tokio::task::JoinSet<String>,
    running: HashSet<String>,
    /// Batches whose driver stopped, and when to look at them again.
    not_before: HashMap<String, std::time::Instant>,
}

/// One semaphore per provider, created on first use.
pub struct ProviderSlots {
    per_provider: usize,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl ProviderSlots {
    /// Waits for a slot of the plan's first provider.
    pub async fn acquire(&self, plan: &Plan) -> Option<OwnedSemaphorePermit> {
        let provider = plan.candidates.first()?.route.provider.id.clone();
        let semaphore = {
            let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(slots.entry(provider).or_insert_with(|| Arc::new(Semaphore::new(self.per_provider.max(1)))))
        };
        semaphore.acquire_owned().await.ok()
    }
}

pub struct Worker {
    state: AppState,
    owner: String,
    lease: Duration,
    slots: ProviderSlots,
    total: Arc<Semaphore>,
    /// Items this worker is running, whose leases it renews.
    running: Mutex<HashSet<(String, i64)>>,
    /// Active batches seen on the last pass.
    batches: Mutex<HashMap<String, Arc<BatchRecord>>>,
    /// Per batch: when its last progress event went out, and how many items were done then.
    progress: Mutex<HashMap<String, (i64, i64)>>,
}

impl Worker {
    /// Starts the worker (and its lease renewer) until the returned tasks are aborted.
    pub fn spawn(state: AppState) -> Vec<tokio::task::JoinHandle<()>> {
        let settings = &state.batches.settings;
        let worker = Arc::new(Worker {
            owner: format!("worker-{}", uuid::Uuid::new_v4().simple()),
            lease: Duration::from_secs(settings.item_lease_s.max(1)),
            slots: ProviderSlots { per_provider: settings.per_provider_concurrency, slots: Mutex::default() },
            total: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            running: Mutex::default(),
            batches: Mutex::default(),
            progress: Mutex::default(),
            state,
        });
        let renewer = Arc::clone(&worker);
        vec![tokio::spawn(worker.run()), tokio::spawn(renewer.renew_loop())]
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn run(self: Arc<Self>) {
        let poll = Duration::from_millis(self.state.batches.settings.poll_ms.max(10));
        // Deliveries are looked for at most once per poll interval, not on every claim.
        let mut last_delivery_check = std::time::Instant::now().checked_sub(poll).unwrap_or_else(std::time::Instant::now);
        // Native-lane drivers: owned by this loop, so that stopping the worker stops them.
        let mut native = NativeDrivers::default();
        let mut idle_looks: u32 = 0;
        loop {
            // Taken before looking, so that a batch created during the look still ends the wait.
            let wake = self.state.batches.wake.notified();
            let active = self.look_after_batches().await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "batch worker: could not look after batches");
                1
            });
            self.drive_native_lanes(&mut native);
            let mut delivering = 0;
            if last_delivery_check.elapsed() >= poll {
                last_delivery_check = std::time::Instant::now();
                delivering = self.deliver_due().await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "batch worker: could not read webhook deliveries");
                    1
                });
            }
            let claimed = self.claim().await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "batch worker: could not claim items");
                0
            });
            idle_looks = if active + delivering + claimed == 0 { idle_looks.saturating_add(1) } else { 0 };
            if claimed == 0 {
                let _ = tokio::time::timeout(idle_wait(poll, idle_looks), wake).await;
            }
        }
    }

    /// Starts a driver for each native-lane batch in progress that has none here yet (the
    /// store's native lease decides which instance actually drives it).
    fn drive_native_lanes(&self, drivers: &mut NativeDrivers) {
        let now = std::time::Instant::now();
        let pause = Duration::from_millis(self.state.batches.settings.native_poll_ms.max(10));
        while let Some(done) = drivers.tasks.try_join_next() {
            if let Ok(id) = done {
                drivers.running.remove(&id);
                // Stopped (ended, fell back, or another worker holds it): look again later.
                drivers.not_before.insert(id, now + pause);
            }
        }
        drivers.not_before.retain(|_, at| *at > now);
        let batches: Vec<Arc<BatchRecord>> = Self::lock(&self.batches).values().cloned().collect();
        for batch in batches.iter().filter(|b| b.lane == LANE_NATIVE && b.status == "in_progress") {
            if !drivers.not_before.contains_key(&batch.id) && drivers.running.insert(batch.id.clone()) {
                let (state, owner, id, org) = (self.state.clone(), self.owner.clone(), batch.id.clone(), batch.org_id.clone());
                drivers.tasks.spawn(async move {
                    super::native_lane::drive(state, owner, id.clone(), org).await;
                    id
                });
            }
        }
    }

    /// Claims as many items as there are free slots and starts them; returns how many.
    async fn claim(self: &Arc<Self>) -> Result<usize, marga_store::StoreError> {
        let free = self.total.available_permits().min(MAX_CLAIM);
        if free == 0 {
            // Wait for a running item to finish before looking again.
            if let Ok(permit) = Arc::clone(&self.total).acquire_owned().await {
                drop(permit);
            }
            return Ok(0);
        }
        let now = unix_now_ms();
        let until = now + self.lease.as_millis() as i64;
        let items = self.state.batches.store.claim_items(&self.owner, now, until, free as i64).await?;
        let n = items.len();
        for item in items {
            let Ok(permit) = Arc::clone(&self.total).acquire_owned().await else { break };
            Self::lock(&self.running).insert((item.batch_id.clone(), item.idx));
            let worker = Arc::clone(self);
            tokio::spawn(async move {
                worker.process(item).await;
                drop(permit);
            });
        }
        Ok(n)
    }

    /// Runs one item and completes it (unless its lease was lost meanwhile).
    async fn process(&self, item: ClaimedItem) {
        let key = (item.batch_id.clone(), item.idx);
        let line = match self.batch(&item.batch_id).await {
            Some(batch) => self.execute(&batch, &item).await,
            None => None,
        };
        if let Some((line, is_error)) = line {
            let store = &self.state.batches.store;
            match store.complete_item(&item.batch_id, item.idx, &self.owner, &line, is_error).await {
                Ok(true) => {}
                Ok(false) => tracing::info!(batch = %item.batch_id, idx = item.idx, "batch item was taken over; result dropped"),
                Err(e) => tracing::warn!(error = %e, batch = %item.batch_id, "could not complete a batch item; it will run again"),
            }
        }
        Self::lock(&self.running).remove(&key);
        self.state.batches.wake.notify_waiters();
    }

    /// The item's output line and whether it is an error.
    async fn execute(&self, batch: &BatchRecord, item: &ClaimedItem) -> Option<(String, bool)> {
        let generation = generation_id(&batch.id, item.idx);
        let principal = self.state.admission.accounts.principal_of(&batch.org_id, &batch.key_id);
        let result = match principal {
            Some(principal) => {
                let (endpoint, body) = match batch.endpoint.as_str() {
                    super::native::NATIVE => super::native::from_stored(&item.body).unwrap_or_default(),
                    endpoint => (endpoint.to_owned(), item.body.clone()),
                };
                let lease = batch.credit_lease_id.as_deref();
                let run = Item { principal, endpoint: &endpoint, body: &body, generation_id: generation.clone(), lease };
                exec::run(&self.state, &self.slots, run).await
            }
            None => Err(ApiError::InvalidApiKey),
        };
        let (status, body, is_error) = match result {
            Ok(body) => (200, body, false),
            // Unavailable (the ledger or store) is not the item's fault: leave it to run again.
            Err(ApiError::Unavailable { message }) => {
                tracing::warn!(batch = %batch.id, idx = item.idx, %message, "batch item deferred");
                return None;
            }
            Err(e) => (e.status().as_u16(), serde_json::to_value(e.envelope()).unwrap_or(Value::Null), true),
        };
        Some((result_line(&batch.id, item.idx, &item.custom_id, status, &generation, &body), is_error))
    }

    /// The batch from the last pass, or looked up again (it may be newer than the pass).
    async fn batch(&self, id: &str) -> Option<Arc<BatchRecord>> {
        if let Some(b) = Self::lock(&self.batches).get(id) {
            return Some(Arc::clone(b));
        }
        if let Err(e) = self.look_after_batches().await {
            tracing::warn!(error = %e, "batch worker: could not read batches");
        }
        Self::lock(&self.batches).get(id).cloned()
    }

    /// Refreshes the active batches; finalizes those whose items are all done and winds down
    /// cancelled ones.
    async fn look_after_batches(&self) -> Result<usize, marga_store::StoreError> {
        let store = &self.state.batches.store;
        let active = store.batches_in(&["in_progress", "finalizing", "cancelling"], MAX_ACTIVE).await?;
        let count = active.len();
        *Self::lock(&self.batches) = active.iter().map(|b| (b.id.clone(), Arc::new(b.clone()))).collect();
        for batch in active {
            self.advance(&batch).await?;
            if batch.status == "in_progress" {
                self.maybe_progress(&batch).await;
            }
        }
        Ok(count)
    }

    /// A `batch.progress` event when items finished since the last one and the last one is at
    /// least `[batch] webhook_progress_ms` old (the first one a full interval after start).
    async fn maybe_progress(&self, batch: &BatchRecord) {
        let now = unix_now_ms();
        let interval = i64::try_from(self.state.batches.settings.webhook_progress_ms).unwrap_or(i64::MAX);
        let done = batch.completed + batch.failed;
        let due = {
            let mut progress = Self::lock(&self.progress);
            let (last_ms, last_done) = *progress.entry(batch.id.clone()).or_insert((now, 0));
            let due = done > last_done && done < batch.total && now - last_ms >= interval;
            if due {
                progress.insert(batch.id.clone(), (now, done));
            }
            due
        };
        if due {
            self.notify(batch, webhook::event(batch, "progress", "in_progress", None, None), 1).await;
        }
    }

    /// Finalizes a batch whose items are all done; winds down a cancelled one.
    async fn advance(&self, batch: &BatchRecord) -> Result<(), marga_store::StoreError> {
        let store = &self.state.batches.store;
        let now = unix_now_ms();
        match batch.status.as_str() {
            // Past its window: pending items are dropped, running ones finish, then it ends
            // as `expired` with what finished.
            "in_progress" if now > batch.expires_at_ms => {
                let expired = store.cancel_pending_items(&batch.id, now).await? == 0
                    && store.set_batch_status(&batch.id, &["in_progress"], "finalizing", "finalizing_at_ms", now).await?;
                if expired {
                    self.finalize(batch, "expired").await;
                }
            }
            "in_progress" if batch.completed + batch.failed >= batch.total => {
                let finished = store.unfinished_items(&batch.id).await? == 0
                    && store.set_batch_status(&batch.id, &["in_progress"], "finalizing", "finalizing_at_ms", now).await?;
                if finished {
                    self.finalize(batch, "completed").await;
                }
            }
            // A finalization that did not finish within a lease (the instance died): done
            // again, idempotently (same file names, same content, one `finish_batch` wins).
            "finalizing" if now - batch.finalizing_at_ms.unwrap_or(0) > self.lease.as_millis() as i64 => {
                let status = if batch.completed + batch.failed < batch.total { "expired" } else { "completed" };
                self.finalize(batch, status).await;
            }
            "cancelling" if store.cancel_pending_items(&batch.id, now).await? == 0 => self.finalize(batch, "cancelled").await,
            _ => {}
        }
        Ok(())
    }

    /// Writes the output and error files and ends the batch.
    async fn finalize(&self, batch: &BatchRecord, status: &str) {
        match self.write_outputs(batch).await {
            Ok((output, errors)) => {
                let store = &self.state.batches.store;
                match store.finish_batch(&batch.id, status, output.as_ref(), errors.as_ref(), unix_now_ms()).await {
                    Ok(true) => {
                        self.release_credit(batch).await;
                        if status != "completed" && batch.lane == LANE_NATIVE {
                            super::native_lane::cancel_provider_batch(&self.state, batch).await;
                        }
                        let (out, err) = (output.as_ref().map(|f| f.id.as_str()), errors.as_ref().map(|f| f.id.as_str()));
                        Self::lock(&self.progress).remove(&batch.id);
                        self.notify(batch, webhook::event(batch, status, status, out, err), webhook::MAX_ATTEMPTS).await;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, batch = %batch.id, "could not finish a batch"),
                }
            }
            Err(e) => tracing::warn!(error = %e, batch = %batch.id, "could not write a batch's output files"),
        }
    }

    /// Closes the batch's credit lease: what its items did not use returns to the organisation.
    async fn release_credit(&self, batch: &BatchRecord) {
        let Some(lease) = &batch.credit_lease_id else { return };
        if let Err(e) = self.state.admission.ledger.repo().close_lease(lease).await {
            tracing::warn!(error = %e, batch = %batch.id, "could not close a batch's credit lease; it expires by itself");
        }
    }

    /// Queues an event for the batch's webhook, or its organisation's default one: delivered
    /// (and retried, up to `attempts` times) by [`Worker::deliver_due`] on any instance.
    async fn notify(&self, batch: &BatchRecord, event: serde_json::Value, attempts: u32) {
        let batches = &self.state.batches;
        let target = match (&batch.webhook_url, &batch.webhook_secret) {
            (Some(url), Some(secret)) => Some(webhook::Target { url: url.clone(), secret: secret.clone() }),
            _ => match batches.store.get_setting(&webhook::org_setting(&batch.org_id)).await {
                Ok(stored) => stored.and_then(|s| serde_json::from_str(&s).ok()),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the organisation's webhook");
                    None
                }
            },
        };
        let Some(target) = target else { return };
        let delivery = DeliveryRecord {
            id: event["id"].as_str().unwrap_or_default().to_owned(),
            batch_id: batch.id.clone(),
            url: target.url,
            secret: target.secret,
            body: event.to_string(),
            attempts: 0,
            max_attempts: i64::from(attempts),
            next_at_ms: unix_now_ms(),
            state: "pending".to_owned(),
        };
        if let Err(e) = batches.store.enqueue_delivery(&delivery).await {
            tracing::warn!(error = %e, batch = %batch.id, "could not queue a webhook event");
        }
    }

    /// Starts the webhook deliveries that are due; returns how many. One batch's events go
    /// out one after another in the order they were made (a batch's `batch.completed` never
    /// overtakes its last `batch.progress`); different batches' go out side by side.
    async fn deliver_due(self: &Arc<Self>) -> Result<usize, marga_store::StoreError> {
        let now = unix_now_ms();
        let until = now + DELIVERY_LEASE_MS;
        let due = self.state.batches.store.claim_deliveries(&self.owner, now, until, 16).await?;
        let count = due.len();
        for batch in by_batch_in_order(due) {
            let worker = Arc::clone(self);
            tokio::spawn(async move {
                for delivery in batch {
                    worker.deliver_one(delivery).await;
                }
            });
        }
        Ok(count)
    }

    /// One attempt; records delivered, failed (out of attempts) or when to try again.
    async fn deliver_one(&self, d: DeliveryRecord) {
        let batches = &self.state.batches;
        let result = match self.state.secrets.open(&d.secret) {
            Ok(secret) => webhook::post(&d.url, &d.body, &webhook::signature(&secret, d.body.as_bytes()), batches.allow_private_webhooks).await,
            Err(e) => Err(e.to_string()),
        };
        let attempts = d.attempts + 1;
        let now = unix_now_ms();
        let (state, next_at) = match result {
            Ok(()) => ("delivered", now),
            Err(reason) if attempts >= d.max_attempts => {
                tracing::warn!(batch = %d.batch_id, attempts, %reason, "webhook not delivered; giving up");
                ("failed", now)
            }
            Err(reason) => {
                tracing::info!(batch = %d.batch_id, attempts, %reason, "webhook delivery failed; will retry");
                let base = Duration::from_millis(batches.settings.webhook_retry_base_ms.max(1));
                let delay = webhook::retry_delay(base, u32::try_from(attempts).unwrap_or(u32::MAX));
                ("pending", now + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2))
            }
        };
        if let Err(e) = batches.store.finish_delivery(&d.id, &self.owner, state, attempts, next_at).await {
            tracing::warn!(error = %e, batch = %d.batch_id, "could not record a webhook delivery");
        }
    }

    /// The output and error files (each only when it has lines), in item order.
    async fn write_outputs(&self, batch: &BatchRecord) -> Result<(Option<FileRecord>, Option<FileRecord>), ApiError> {
        let batches = &self.state.batches;
        let names = [format!("file-{}-output", batch.id), format!("file-{}-errors", batch.id)];
        let mut writers = [
            Writing::create(batches.path_of(&names[0])).await?,
            Writing::create(batches.path_of(&names[1])).await?,
        ];
        let mut lines = [0i64; 2];
        let mut after = -1;
        loop {
            let page = batches.store.item_results(&batch.id, after, PAGE).await.map_err(super::create::store_error)?;
            let Some(last) = page.last() else { break };
            after = last.idx;
            for r in &page {
                let which = usize::from(r.is_error);
                writers[which].write(r.result.as_bytes()).await?;
                writers[which].write(b"\n").await?;
                lines[which] += 1;
            }
        }
        let mut files = [None, None];
        for (i, writer) in writers.into_iter().enumerate() {
            if lines[i] == 0 {
                writer.abandon().await;
                continue;
            }
            let bytes = writer.commit().await?;
            files[i] = Some(FileRecord {
                id: names[i].clone(),
                org_id: batch.org_id.clone(),
                purpose: "batch_output".to_owned(),
                filename: format!("{}_{}.jsonl", batch.id, if i == 0 { "output" } else { "errors" }),
                bytes: bytes as i64,
                lines: lines[i],
                created_at_ms: unix_now_ms(),
            });
        }
        let [output, errors] = files;
        Ok((output, errors))
    }

    /// Extends the leases of running items every third of the lease.
    async fn renew_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let items: Vec<(String, i64)> = Self::lock(&self.running).iter().cloned().collect();
            let until = unix_now_ms() + self.lease.as_millis() as i64;
            if let Err(e) = self.state.batches.store.renew_items(&self.owner, &items, until).await {
                tracing::warn!(error = %e, "batch worker: could not renew item leases");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use marga_store::DeliveryRecord;

    use super::{by_batch_in_order, idle_wait};

    #[test]
    fn an_idle_worker_looks_less_often_up_to_a_bound() {
        let poll = Duration::from_millis(200);
        let waits: Vec<u128> = [0, 1, 2, 3, 4, 5, 40, u32::MAX].iter().map(|&n| idle_wait(poll, n).as_millis()).collect();
        assert_eq!(waits, [200, 200, 400, 800, 1600, 1600, 1600, 1600]);
    }

    #[test]
    fn a_batchs_events_are_delivered_in_the_order_they_were_made() {
        let event = |batch: &str, id: &str, at: i64| DeliveryRecord { id: id.into(), batch_id: batch.into(), next_at_ms: at, ..DeliveryRecord::default() };
        // As a claim may return them: in no particular order.
        let claimed = vec![
            event("b1", "evt_03", 30),
            event("b2", "evt_02", 20),
            event("b1", "evt_01", 10),
            event("b1", "evt_04", 30),
        ];
        let groups: Vec<Vec<(String, String)>> = by_batch_in_order(claimed)
            .into_iter()
            .map(|g| g.into_iter().map(|d| (d.batch_id, d.id)).collect())
            .collect();
        let pair = |b: &str, e: &str| (b.to_owned(), e.to_owned());
        assert_eq!(groups, vec![vec![pair("b1", "evt_01"), pair("b1", "evt_03"), pair("b1", "evt_04")], vec![pair("b2", "evt_02")]]);
    }
}
