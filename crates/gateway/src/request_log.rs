//! The request log: every request's [`GenerationRecord`] goes through a bounded queue to one
//! writer task that inserts them in batches, so a response never waits for the database.
//!
//! The writer flushes whenever a batch fills or the flush interval passes. If the database
//! fails, the batch is kept and retried; if the queue is full, the record is dropped and
//! counted in `marga_request_log_dropped_total`. Shutdown: when every [`RequestLog`] handle is
//! dropped the writer drains the queue, writes it and ends.

use std::sync::Arc;
use std::time::Duration;

use marga_store::{GenerationRecord, GenerationRepo};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const MAX_BATCH: usize = 1000;

/// A handle for recording requests; cheap to clone.
#[derive(Clone)]
pub struct RequestLog {
    tx: mpsc::Sender<GenerationRecord>,
}

impl RequestLog {
    /// Starts the writer task; returns the handle and the task to await at shutdown.
    pub fn start(
        repo: Arc<dyn GenerationRepo>,
        capacity: usize,
        flush_every: Duration,
    ) -> (RequestLog, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let task = tokio::spawn(write_loop(repo, rx, flush_every));
        (RequestLog { tx }, task)
    }

    /// Queues a record without waiting.
    pub fn record(&self, record: GenerationRecord) {
        if self.tx.try_send(record).is_err() {
            metrics::counter!("marga_request_log_dropped_total").increment(1);
        }
    }
}

async fn write_loop(repo: Arc<dyn GenerationRepo>, mut rx: mpsc::Receiver<GenerationRecord>, flush_every: Duration) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let open = fill_batch(&mut rx, &mut batch, flush_every).await;
        metrics::gauge!("marga_request_log_queue").set(rx.len() as f64);
        if !batch.is_empty() {
            write_with_retry(repo.as_ref(), &batch, open).await;
            batch.clear();
        }
        if !open {
            return;
        }
    }
}

/// Waits for the first record, then gathers more until the batch is full or the interval
/// ends. Returns false once the channel is closed and drained.
async fn fill_batch(
    rx: &mut mpsc::Receiver<GenerationRecord>,
    batch: &mut Vec<GenerationRecord>,
    flush_every: Duration,
) -> bool {
    let Some(first) = rx.recv().await else { return false };
    batch.push(first);
    let deadline = tokio::time::Instant::now() + flush_every;
    while batch.len() < MAX_BATCH {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(record)) => batch.push(record),
            Ok(None) => return false,
            Err(_) => break,
        }
    }
    true
}

/// Retries with backoff while the gateway runs; at shutdown gives up after a few tries.
async fn write_with_retry(repo: &dyn GenerationRepo, batch: &[GenerationRecord], running: bool) {
    let mut delay = Duration::from_millis(50);
    for attempt in 1.. {
        match repo.insert_generations(batch).await {
            Ok(()) => {
                metrics::counter!("marga_request_log_written_total").increment(batch.len() as u64);
                return;
            }
            Err(e) => {
                metrics::counter!("marga_request_log_write_errors_total").increment(1);
                tracing::warn!(error = %e, attempt, rows = batch.len(), "request log write failed; retrying");
                if !running && attempt >= 5 {
                    tracing::error!(rows = batch.len(), "request log rows lost at shutdown");
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
