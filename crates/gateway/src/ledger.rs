//! Credit: reservations at admission, charges at settlement, without a database round trip
//! per admission.
//!
//! - Each instance **leases** credit from an organisation's balance in chunks (a database
//!   transaction that refuses a lease the balance does not cover). Admission reserves a
//!   request's maximum cost from the lease in memory; no lease covering it and no credit left
//!   for a new one → 402 `insufficient_credits`.
//! - Settlement **charges** the actual cost as a ledger line and returns the rest of the
//!   reservation to the lease. The charge is first appended to the local [`Journal`] (one
//!   `write`, durable against a crash of the process) — only then is the client answered — and
//!   one writer task commits the charges to the database in batches (every
//!   `[billing] commit_interval_ms`, 200 ms by default, or as soon as a full batch waits),
//!   emptying each journal file (two per lane, a lane per thread) once everything in it is
//!   committed. At start the journal's leftovers are committed again (idempotent by
//!   reference). Without a journal the client waits for the commit itself.
//! - Leases expire unless renewed, so the credit set aside by an instance that dies comes back
//!   by itself; charges made under it are already in the ledger.
//!
//! The balance can therefore not go below zero through reservations; it can only be overshot
//! by a request whose actual cost exceeds its reservation (a prompt estimate that was low), by
//! at most that difference. The master key's default organisation is metered but not limited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marga_store::{Charge, LeaseRecord, LedgerEntry, LedgerRepo, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::batch_window::BatchWindow;
use crate::journal::{Journal, JournalSlot};
use crate::pipeline::unix_now_ms;

/// A new lease takes this fraction of what is available (at least what is needed).
const LEASE_FRACTION: i64 = 4;
/// Charges committed in one transaction at most.
const MAX_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient credits")]
    Insufficient,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the ledger writer has stopped")]
    WriterGone,
    #[error("could not commit the charge: {0}")]
    Commit(String),
}

/// One lease, as this instance tracks it.
#[derive(Debug)]
struct Slot {
    id: String,
    /// Lease amount minus charges minus live reservations.
    remaining: i64,
    in_flight: u32,
    last_used_ms: i64,
}

#[derive(Default)]
struct OrgCredit {
    slots: Vec<Slot>,
}

/// Credit set aside for one admitted request. Dropped without being settled (the request
/// failed), it goes back to its lease whole.
pub struct Reservation {
    ledger: Arc<Ledger>,
    pub org_id: String,
    lease_id: Option<String>,
    pub amount_nanos: i64,
    settled: bool,
}

/// How a queued charge is kept safe until its commit.
enum Durability {
    /// In the journal, at this slot (lane and file).
    Journaled(JournalSlot),
    /// Nowhere yet: the caller waits for the commit.
    Waiting(oneshot::Sender<Result<(), String>>),
}

pub struct Ledger {
    repo: Arc<dyn LedgerRepo>,
    holder: String,
    lease_ttl: Duration,
    orgs: Mutex<HashMap<String, OrgCredit>>,
    /// Per organisation: held while this instance opens a lease for it.
    opening: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    journal: Option<Arc<Journal>>,
    writer: mpsc::Sender<(Charge, Durability)>,
    /// The writer's commit window, ended early once a full batch waits.
    window: Arc<BatchWindow>,
}

impl Ledger {
    /// Starts the ledger; with `journal_path`, first commits what an earlier run left in the
    /// journal.
    pub async fn start(
        repo: Arc<dyn LedgerRepo>,
        lease_ttl: Duration,
        journal: Option<(&std::path::Path, usize)>,
        commit_window: Duration,
    ) -> Result<(Arc<Ledger>, tokio::task::JoinHandle<()>), LedgerError> {
        let journal = match journal {
            Some((path, lanes)) => Some(Arc::new(recover(repo.as_ref(), path, lanes).await?)),
            None => None,
        };
        let (tx, rx) = mpsc::channel(8192);
        let holder = format!("marga-{}", uuid::Uuid::new_v4().simple());
        let window = Arc::new(BatchWindow::new(commit_window));
        let inbox = Inbox { rx, window: Arc::clone(&window) };
        let task = tokio::spawn(write_loop(Arc::clone(&repo), inbox, journal.clone()));
        let orgs = Mutex::new(HashMap::new());
        let opening = Mutex::new(HashMap::new());
        let ledger = Ledger { repo, holder, lease_ttl, orgs, opening, journal, writer: tx, window };
        Ok((Arc::new(ledger), task))
    }

    /// Charges waiting for the charge writer (for `/metrics`).
    pub fn queue_depth(&self) -> usize {
        self.writer.max_capacity().saturating_sub(self.writer.capacity())
    }

    pub fn repo(&self) -> &dyn LedgerRepo {
        self.repo.as_ref()
    }

    fn orgs(&self) -> std::sync::MutexGuard<'_, HashMap<String, OrgCredit>> {
        self.orgs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reserves `amount_nanos` of `org_id`'s credit: from a live lease in memory, or from a new
    /// lease when none covers it.
    pub async fn reserve(self: &Arc<Self>, org_id: &str, amount_nanos: i64) -> Result<Reservation, LedgerError> {
        let amount = amount_nanos.max(0);
        if let Some(reservation) = self.reserve_local(org_id, amount) {
            return Ok(reservation);
        }
        // One lease opening per organisation at a time on this instance: requests arriving
        // together wait for the first one's lease and reserve from it, rather than each
        // opening a lease of its own from the same stale look at the balance (which leased
        // the whole balance to this instance in several leases, and refused with 402 those
        // that looked again before the winners' leases were in memory).
        let gate = self.opening_gate(org_id);
        let _opening = gate.lock().await;
        for _ in 0..3 {
            if let Some(reservation) = self.reserve_local(org_id, amount) {
                return Ok(reservation);
            }
            if !self.open_lease(org_id, amount).await? {
                return Err(LedgerError::Insufficient);
            }
        }
        self.reserve_local(org_id, amount).ok_or(LedgerError::Insufficient)
    }

    fn opening_gate(&self, org_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.opening.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(gates.entry(org_id.to_owned()).or_default())
    }

    fn reserve_local(self: &Arc<Self>, org_id: &str, amount: i64) -> Option<Reservation> {
        let now = unix_now_ms();
        let mut orgs = self.orgs();
        let credit = orgs.get_mut(org_id)?;
        let slot = credit.slots.iter_mut().rev().find(|s| s.remaining >= amount)?;
        slot.remaining -= amount;
        slot.in_flight += 1;
        slot.last_used_ms = now;
        Some(Reservation {
            ledger: Arc::clone(self),
            org_id: org_id.to_owned(),
            lease_id: Some(slot.id.clone()),
            amount_nanos: amount,
            settled: false,
        })
    }

    /// Opens a lease of a quarter of what is available (at least `needed`); false when the
    /// balance cannot cover `needed`.
    async fn open_lease(&self, org_id: &str, needed: i64) -> Result<bool, LedgerError> {
        let now = unix_now_ms();
        let available = self.repo.available(org_id, now).await?;
        if available < needed || available <= 0 {
            return Ok(false);
        }
        let amount = (available / LEASE_FRACTION).max(needed).min(available);
        let lease = LeaseRecord {
            id: format!("lease-{}", uuid::Uuid::now_v7().simple()),
            org_id: org_id.to_owned(),
            amount_nanos: amount,
            used_nanos: 0,
            holder: self.holder.clone(),
            expires_at_ms: now + self.lease_ttl.as_millis() as i64,
            closed: false,
            created_at_ms: now,
        };
        if !self.repo.open_lease(&lease).await? {
            // Another instance took it first; the caller tries again with a fresh look.
            return Ok(true);
        }
        let slot = Slot { id: lease.id, remaining: amount, in_flight: 0, last_used_ms: now };
        self.orgs().entry(org_id.to_owned()).or_default().slots.push(slot);
        Ok(true)
    }

    /// Charges `cost_nanos` (durably: returns once the line is committed) and returns the rest
    /// of the reservation to its lease.
    pub async fn settle(&self, mut reservation: Reservation, entry: LedgerEntry) -> Result<(), LedgerError> {
        reservation.settled = true;
        let cost = -entry.amount_nanos;
        self.give_back(&reservation, reservation.amount_nanos - cost.max(0));
        let charge = Charge { entry, lease_id: reservation.lease_id.clone() };
        self.commit(charge).await
    }

    /// Reserves `amount_nanos` of `org_id`'s credit for a batch: a lease of its own, in the
    /// database (so every instance charges against it, and it survives restarts), live until
    /// `expires_at_ms` or until the batch ends and closes it. Insufficient when not covered.
    pub async fn open_batch_lease(&self, org_id: &str, amount_nanos: i64, batch_id: &str, expires_at_ms: i64) -> Result<String, LedgerError> {
        let now = unix_now_ms();
        let lease = LeaseRecord {
            id: format!("lease-{}", uuid::Uuid::now_v7().simple()),
            org_id: org_id.to_owned(),
            amount_nanos: amount_nanos.max(0),
            used_nanos: 0,
            holder: format!("batch:{batch_id}"),
            expires_at_ms,
            closed: false,
            created_at_ms: now,
        };
        if !self.repo.open_lease(&lease).await? {
            return Err(LedgerError::Insufficient);
        }
        Ok(lease.id)
    }

    /// Charges against a batch's lease (durably, like [`Ledger::settle`]).
    pub async fn charge_lease(&self, lease_id: &str, entry: LedgerEntry) -> Result<(), LedgerError> {
        self.commit(Charge { entry, lease_id: Some(lease_id.to_owned()) }).await
    }

    /// Charges an organisation that is metered but not limited (no reservation).
    pub async fn charge_unreserved(&self, entry: LedgerEntry) -> Result<(), LedgerError> {
        self.commit(Charge { entry, lease_id: None }).await
    }

    async fn commit(&self, charge: Charge) -> Result<(), LedgerError> {
        if charge.entry.amount_nanos == 0 {
            return Ok(());
        }
        if let Some(journal) = &self.journal {
            match journal.append(&charge) {
                Ok(file) => {
                    let queued = (charge, Durability::Journaled(file));
                    self.writer.send(queued).await.map_err(|_| LedgerError::WriterGone)?;
                    if self.queue_depth() >= MAX_BATCH {
                        self.window.batch_full();
                    }
                    return Ok(());
                }
                Err(e) => tracing::error!(error = %e, "charge journal unwritable; waiting for the database commit"),
            }
        }
        let (done, wait) = oneshot::channel();
        self.writer.send((charge, Durability::Waiting(done))).await.map_err(|_| LedgerError::WriterGone)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(LedgerError::Commit(message)),
            Err(_) => Err(LedgerError::WriterGone),
        }
    }

    /// Returns `unused` to the reservation's lease and ends the reservation.
    fn give_back(&self, reservation: &Reservation, unused: i64) {
        let Some(lease_id) = &reservation.lease_id else { return };
        let mut orgs = self.orgs();
        let Some(credit) = orgs.get_mut(&reservation.org_id) else { return };
        if let Some(slot) = credit.slots.iter_mut().find(|s| &s.id == lease_id) {
            slot.remaining += unused;
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
    }

    /// Keeps leases in use alive and forgets those that idled past their expiry.
    pub fn spawn_renewer(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let ledger = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ledger.lease_ttl / 3);
            loop {
                tick.tick().await;
                ledger.renew().await;
            }
        })
    }

    async fn renew(&self) {
        let now = unix_now_ms();
        let ttl = self.lease_ttl.as_millis() as i64;
        let (keep, drop): (Vec<String>, Vec<String>) = {
            let mut orgs = self.orgs();
            let mut keep = Vec::new();
            let mut drop = Vec::new();
            for credit in orgs.values_mut() {
                credit.slots.retain(|s| {
                    let busy = s.in_flight > 0 || now - s.last_used_ms < ttl / 2;
                    if busy { keep.push(s.id.clone()) } else { drop.push(s.id.clone()) }
                    busy
                });
            }
            (keep, drop)
        };
        for id in keep {
            if let Err(e) = self.repo.renew_lease(&id, now + ttl).await {
                tracing::warn!(error = %e, lease = %id, "could not renew a credit lease");
            }
        }
        for id in drop {
            if let Err(e) = self.repo.close_lease(&id).await {
                tracing::warn!(error = %e, lease = %id, "could not close an idle credit lease");
            }
        }
    }
}

/// The last handle gone (shutdown): the writer commits what waits without sitting out its window.
impl Drop for Ledger {
    fn drop(&mut self) {
        self.window.close();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.ledger.give_back(self, self.amount_nanos);
        }
    }
}

/// Commits what an earlier run left in the journal, then returns the journal, empty.
async fn recover(repo: &dyn LedgerRepo, path: &std::path::Path, lanes: usize) -> Result<Journal, LedgerError> {
    let (journal, pending) = Journal::open(path, lanes).map_err(|e| LedgerError::Commit(format!("charge journal: {e}")))?;
    if !pending.is_empty() {
        let inserted = repo.charge(&pending).await?;
        tracing::info!(pending = pending.len(), inserted, "committed charges left in the journal by the last run");
    }
    journal.recovered().map_err(|e| LedgerError::Commit(format!("charge journal: {e}")))?;
    Ok(journal)
}

/// The writer's end of the charge queue.
struct Inbox {
    rx: mpsc::Receiver<(Charge, Durability)>,
    window: Arc<BatchWindow>,
}

/// Commits every waiting charge in one transaction, answers each waiter, and empties each
/// journal file once everything written to it is committed.
async fn write_loop(repo: Arc<dyn LedgerRepo>, inbox: Inbox, journal: Option<Arc<Journal>>) {
    let Inbox { mut rx, window } = inbox;
    // Per journal slot (lane and file): lines committed since its file was last emptied.
    let slots = journal.as_ref().map_or(0, |j| j.slots());
    let mut committed = vec![0u64; slots];
    // Charges were left waiting by a full batch: commit them without another window.
    let mut behind = false;
    while let Some(first) = rx.recv().await {
        // A journaled charge is already durable: let more arrive for the commit window so that
        // a steady trickle of requests shares commits. Sleeping through the window (rather than
        // waking for each charge) costs one wake-up per commit; a full batch ends it early. A
        // waiter (no journal) is committed at once.
        if matches!(first.1, Durability::Journaled(_)) && !behind {
            window.wait(|| rx.is_closed() || rx.len() >= MAX_BATCH).await;
        }
        let (mut charges, mut waiters, mut journaled) = (Vec::with_capacity(64), Vec::new(), vec![0u64; slots]);
        let mut next = Some(first);
        while let Some((charge, durability)) = next.take() {
            charges.push(charge);
            match durability {
                Durability::Journaled(file) => journaled[file] += 1,
                Durability::Waiting(done) => waiters.push(done),
            }
            if charges.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        behind = !rx.is_empty();
        let result = commit_with_retry(repo.as_ref(), &charges, waiters.len() < charges.len()).await;
        if result.is_ok() {
            committed.iter_mut().zip(&journaled).for_each(|(committed, journaled)| *committed += journaled);
        }
        for done in waiters {
            let _ = done.send(result.clone());
        }
        if let Some(journal) = &journal {
            if let Err(e) = journal.release(&mut committed) {
                tracing::warn!(error = %e, "could not empty the charge journal");
            }
        }
    }
}

/// Retries a failing commit; journaled charges are retried until they are committed (they are
/// safe in the journal meanwhile), others give up after a few tries.
async fn commit_with_retry(repo: &dyn LedgerRepo, charges: &[Charge], journaled: bool) -> Result<(), String> {
    let mut delay = Duration::from_millis(10);
    for attempt in 1u32.. {
        match repo.charge(charges).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt >= 5 && !journaled => return Err(e.to_string()),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "ledger commit failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    Err("ledger commit failed".to_owned())
}
