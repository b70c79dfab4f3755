//! The request log: every request's [`GenerationRecord`] goes through a bounded queue to one
//! writer task that inserts them in batches, so a response never waits for the database.
//!
//! - **Hot path.** [`RequestLog::record`] is one `try_send`: it never waits. A full queue
//!   drops the record and counts it (`marga_request_log_dropped_total{reason="queue_full"}`).
//! - **Flush.** The writer wakes once per flush interval: at the first record it sleeps out the
//!   interval, then writes what has arrived (up to a batch of 1,000; when more wait, the next
//!   batch goes without sleeping), so a record is in the database (SQLite: committed to the WAL;
//!   Postgres: committed) at most one flush interval plus one write after its response.
//! - **Database down or slow.** A write that fails or takes longer than [`WRITE_TIMEOUT`]
//!   sends the batch to the spill file (`requests.spill` in the data directory, see
//!   [`spill`]) instead, and the database is left alone for a growing back-off; the writer
//!   keeps draining the queue meanwhile, so the queue does not fill. Once the database
//!   answers, the spill file is replayed into it a batch at a time (and at the next start).
//!   Without a spill file (`[log] spill_max_mb = 0`) a failed batch is retried until it is
//!   written, and records arriving meanwhile wait in the queue, then are dropped.
//! - **Shutdown.** When every [`RequestLog`] handle is dropped, the writer drains the queue,
//!   writes it (or spills it when the database is down) and ends.
//!
//! Metrics: queue depth (`marga_request_log_queue`, read at each scrape), records written,
//! spilled, replayed and dropped, write errors, and the duration of each database write.

pub mod spill;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use marga_store::{GenerationRecord, GenerationRepo};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::batch_window::BatchWindow;
use crate::config::LogConfig;
use spill::Spill;

const MAX_BATCH: usize = 1000;
/// A database write that takes longer is abandoned and its batch spilled (the store skips
/// ids it already has, so a write that did commit late is harmless).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Database tries for the last batch at shutdown when it cannot be spilled.
const SHUTDOWN_TRIES: u32 = 3;

/// A handle for recording requests; cheap to clone.
#[derive(Clone)]
pub struct RequestLog {
    tx: mpsc::Sender<GenerationRecord>,
    wake: Arc<Wake>,
}

/// Ends the writer's wait early: when the queue holds a batch's worth (or half its capacity),
/// and when the last handle is dropped (shutdown), so that neither a small queue overflows nor
/// a shutdown waits out a long flush interval.
struct Wake {
    window: Arc<BatchWindow>,
    /// Queued records at which the writer is woken early.
    at_depth: usize,
}

impl Drop for Wake {
    fn drop(&mut self) {
        self.window.close();
    }
}

impl RequestLog {
    /// Opens the spill file (when `spill_path` is given and spilling is on) and starts the
    /// writer task; returns the handle and the task to await at shutdown.
    pub fn start(
        repo: Arc<dyn GenerationRepo>,
        config: &LogConfig,
        spill_path: Option<&Path>,
    ) -> std::io::Result<(RequestLog, JoinHandle<()>)> {
        let spill = match spill_path {
            Some(path) if config.spill_max_bytes > 0 => Some(Spill::open(path, config.spill_max_bytes)?),
            _ => None,
        };
        let capacity = config.queue.max(1);
        metrics::gauge!("marga_request_log_queue_capacity").set(capacity as f64);
        let (tx, rx) = mpsc::channel(capacity);
        let at_depth = MAX_BATCH.min(capacity.div_ceil(2));
        let window = Arc::new(BatchWindow::new(config.flush_interval));
        let wake = Arc::new(Wake { window: Arc::clone(&window), at_depth });
        let writer = Writer { repo, spill, down_until: None, backoff: MIN_BACKOFF };
        let task = tokio::spawn(write_loop(writer, Inbox { rx, window, at_depth }));
        Ok((RequestLog { tx, wake }, task))
    }

    /// Queues a record without waiting.
    pub fn record(&self, record: GenerationRecord) {
        if self.tx.try_send(record).is_err() {
            metrics::counter!("marga_request_log_dropped_total", "reason" => "queue_full").increment(1);
        } else if self.depth() >= self.wake.at_depth {
            self.wake.window.batch_full();
        }
    }

    /// Records waiting in the queue.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity().saturating_sub(self.tx.capacity())
    }
}

/// The writer's end of the queue, and what ends its wait early.
struct Inbox {
    rx: mpsc::Receiver<GenerationRecord>,
    window: Arc<BatchWindow>,
    /// Queued records that end the wait (as [`Wake::at_depth`]).
    at_depth: usize,
}

async fn write_loop(mut writer: Writer, mut inbox: Inbox) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut behind = false;
    loop {
        let open = fill_batch(&mut inbox, &mut batch, !behind, writer.next_replay()).await;
        behind = batch.len() == MAX_BATCH && !inbox.rx.is_empty();
        metrics::gauge!("marga_request_log_queue").set(inbox.rx.len() as f64);
        if !batch.is_empty() && !writer.store(&batch, open).await {
            metrics::counter!("marga_request_log_dropped_total", "reason" => "unwritable").increment(batch.len() as u64);
            tracing::error!(rows = batch.len(), "request log rows lost: neither the database nor the spill file took them");
        }
        batch.clear();
        if !open {
            return;
        }
        writer.replay_some().await;
    }
}

/// Waits for the first record (no later than `wake_at`, when the spill file waits to be
/// replayed), then (when `wait`) sleeps out the flush interval so that the records of that
/// interval arrive (see [`BatchWindow`]), then takes what has arrived, up to a full batch.
/// Under load the writer costs a few system calls per batch, not per request. Returns false
/// once the channel is closed and drained.
async fn fill_batch(inbox: &mut Inbox, batch: &mut Vec<GenerationRecord>, wait: bool, wake_at: Option<Instant>) -> bool {
    let Inbox { rx, window, at_depth } = inbox;
    let first = match wake_at {
        None => rx.recv().await,
        Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
            Ok(first) => first,
            Err(_) => return true,
        },
    };
    let Some(first) = first else { return false };
    batch.push(first);
    if wait {
        window.wait(|| rx.is_closed() || rx.len() >= *at_depth).await;
    }
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(record) => batch.push(record),
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
    true
}

/// The writer's state: the database, the spill file, and the back-off while the database fails.
struct Writer {
    repo: Arc<dyn GenerationRepo>,
    spill: Option<Spill>,
    /// The database failed: not tried again before this instant.
    down_until: Option<Instant>,
    backoff: Duration,
}

impl Writer {
    fn database_usable(&self) -> bool {
        self.down_until.is_none_or(|at| Instant::now() >= at)
    }

    /// When the writer should wake up without new records to replay the spill file.
    fn next_replay(&self) -> Option<Instant> {
        let pending = self.spill.as_ref().is_some_and(Spill::pending);
        pending.then(|| self.down_until.unwrap_or_else(Instant::now))
    }

    /// One database write, bounded by [`WRITE_TIMEOUT`]; a failure starts or extends the
    /// back-off.
    async fn insert(&mut self, records: &[GenerationRecord]) -> bool {
        let started = Instant::now();
        let error = match tokio::time::timeout(WRITE_TIMEOUT, self.repo.insert_generations(records)).await {
            Ok(Ok(())) => {
                metrics::histogram!("marga_request_log_write_duration_seconds").record(started.elapsed().as_secs_f64());
                metrics::counter!("marga_request_log_written_total").increment(records.len() as u64);
                self.down_until = None;
                self.backoff = MIN_BACKOFF;
                return true;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timed out after {WRITE_TIMEOUT:?}"),
        };
        metrics::counter!("marga_request_log_write_errors_total").increment(1);
        tracing::warn!(error = %error, rows = records.len(), retry_in_ms = self.backoff.as_millis() as u64, "request log write failed");
        self.down_until = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        false
    }

    /// Stores a batch: in the database when it is usable, else (or when that fails) in the
    /// spill file. Without a spill file, retries (while `running`: until it succeeds; at
    /// shutdown: a few times). Returns false when the batch was stored nowhere.
    async fn store(&mut self, batch: &[GenerationRecord], running: bool) -> bool {
        for tries in 1.. {
            if self.database_usable() && self.insert(batch).await {
                return true;
            }
            if self.spill_batch(batch) {
                return true;
            }
            if !running && tries >= SHUTDOWN_TRIES {
                return false;
            }
            if let Some(at) = self.down_until {
                tokio::time::sleep_until(at).await;
            }
        }
        false
    }

    fn spill_batch(&mut self, batch: &[GenerationRecord]) -> bool {
        let Some(spill) = self.spill.as_mut() else { return false };
        match spill.append(batch) {
            Ok(()) => {
                metrics::counter!("marga_request_log_spilled_total").increment(batch.len() as u64);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, rows = batch.len(), "request log spill failed");
                false
            }
        }
    }

    /// Moves one batch from the spill file into the database, if it waits and the database
    /// is usable.
    async fn replay_some(&mut self) {
        let Some(spill) = self.spill.as_ref() else { return };
        if !spill.pending() || !self.database_usable() {
            return;
        }
        let (records, offset) = match spill.read_next(MAX_BATCH) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the request log spill file");
                self.down_until = Some(Instant::now() + MAX_BACKOFF);
                return;
            }
        };
        if !records.is_empty() && !self.insert(&records).await {
            return;
        }
        metrics::counter!("marga_request_log_replayed_total").increment(records.len() as u64);
        if let Some(Err(e)) = self.spill.as_mut().map(|s| s.mark_replayed(offset)) {
            tracing::error!(error = %e, "cannot empty the request log spill file");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use marga_store::{BoxFuture, StoreError};

    use super::*;

    /// A request log table in memory that fails while `down` is set.
    #[derive(Default)]
    struct FlakyRepo {
        down: AtomicBool,
        rows: Mutex<Vec<GenerationRecord>>,
        failures: AtomicUsize,
    }

    impl GenerationRepo for FlakyRepo {
        fn insert_generations<'a>(&'a self, records: &'a [GenerationRecord]) -> BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    self.failures.fetch_add(1, Ordering::SeqCst);
                    return Err(StoreError::Database(sqlx::Error::PoolTimedOut));
                }
                let mut rows = self.rows.lock().unwrap();
                for r in records {
                    if !rows.iter().any(|x| x.id == r.id) {
                        rows.push(r.clone());
                    }
                }
                Ok(())
            })
        }

        fn get_generation<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Option<GenerationRecord>, StoreError>> {
            Box::pin(async { Ok(None) })
        }

        fn count_generations(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
            Box::pin(async move { Ok(self.rows.lock().unwrap().len() as u64) })
        }
    }

    fn record(i: usize) -> GenerationRecord {
        GenerationRecord { id: format!("gen-{i}"), model: "m".to_owned(), ..GenerationRecord::default() }
    }

    fn config(queue: usize) -> LogConfig {
        LogConfig { flush_interval: Duration::from_millis(5), queue, ..LogConfig::default() }
    }

    async fn rows_reach(repo: &FlakyRepo, n: usize) -> usize {
        for _ in 0..400 {
            let len = repo.rows.lock().unwrap().len();
            if len >= n {
                return len;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        repo.rows.lock().unwrap().len()
    }

    #[tokio::test]
    async fn while_the_database_is_down_records_are_spilled_then_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("requests.spill");
        let repo = Arc::new(FlakyRepo::default());
        repo.down.store(true, Ordering::SeqCst);
        // A queue of 8: far fewer than the records sent while the database is down, so they
        // get through only because the writer keeps draining into the spill file.
        let (log, task) = RequestLog::start(repo.clone(), &config(8), Some(&spill)).unwrap();
        for i in 0..200 {
            log.record(record(i));
            tokio::task::yield_now().await;
            if i % 4 == 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(repo.failures.load(Ordering::SeqCst) >= 1);
        assert!(std::fs::metadata(&spill).unwrap().len() > 0, "the records wait in the spill file");
        assert_eq!(repo.rows.lock().unwrap().len(), 0);

        repo.down.store(false, Ordering::SeqCst);
        assert_eq!(rows_reach(&repo, 200).await, 200, "every record reaches the database once it is back");
        for _ in 0..100 {
            if std::fs::metadata(&spill).unwrap().len() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(std::fs::metadata(&spill).unwrap().len(), 0, "the spill file is emptied");
        drop(log);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn at_shutdown_with_the_database_down_the_last_batch_is_spilled_and_replayed_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("requests.spill");
        let repo = Arc::new(FlakyRepo::default());
        repo.down.store(true, Ordering::SeqCst);
        let slow = LogConfig { flush_interval: Duration::from_secs(60), ..LogConfig::default() };
        let (log, task) = RequestLog::start(repo.clone(), &slow, Some(&spill)).unwrap();
        for i in 0..10 {
            log.record(record(i));
        }
        drop(log);
        task.await.unwrap();
        assert_eq!(repo.rows.lock().unwrap().len(), 0);

        repo.down.store(false, Ordering::SeqCst);
        let (log, task) = RequestLog::start(repo.clone(), &slow, Some(&spill)).unwrap();
        assert_eq!(rows_reach(&repo, 10).await, 10, "the next start replays the spill file");
        drop(log);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn without_a_spill_file_a_failed_batch_is_retried_until_written() {
        let repo = Arc::new(FlakyRepo::default());
        repo.down.store(true, Ordering::SeqCst);
        let no_spill = LogConfig { spill_max_bytes: 0, ..config(100) };
        let (log, task) = RequestLog::start(repo.clone(), &no_spill, None).unwrap();
        for i in 0..5 {
            log.record(record(i));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(repo.failures.load(Ordering::SeqCst) >= 1);
        repo.down.store(false, Ordering::SeqCst);
        assert_eq!(rows_reach(&repo, 5).await, 5);
        assert_eq!(log.depth(), 0);
        drop(log);
        task.await.unwrap();
    }
}
