//! The charge journal: a local append-only file where each charge is written (one JSON line,
//! one `write` call) before the client is answered. The ledger writer then commits charges to
//! the database in batches and empties the journal once everything in it is committed; on
//! start, whatever the journal still holds is committed again (idempotent by reference).
//!
//! A charge is therefore durable against a crash of the process (`kill -9`: the page cache
//! keeps what was written) as soon as the client can see its answer, without the response
//! waiting for a database commit. Against a power loss of the host, at most the charges of the
//! last commit interval (milliseconds) can be lost; `fsync` per charge would close that gap at
//! the cost of the latency this journal exists to avoid.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use marga_store::{Charge, LedgerEntry};
use serde::{Deserialize, Serialize};

/// One charge as the journal keeps it: written from borrowed fields (`Line<&str>`, no copy
/// per charge), read back owned (`Line<String>`).
#[derive(Serialize, Deserialize)]
struct Line<S> {
    org_id: S,
    amount_nanos: i64,
    currency: S,
    kind: S,
    reference: S,
    key_id: Option<S>,
    workspace_id: Option<S>,
    created_at_ms: i64,
    lease_id: Option<S>,
}

impl<'a> Line<&'a str> {
    fn of(c: &'a Charge) -> Self {
        let e = &c.entry;
        Line {
            org_id: &e.org_id,
            amount_nanos: e.amount_nanos,
            currency: &e.currency,
            kind: &e.kind,
            reference: &e.reference,
            key_id: e.key_id.as_deref(),
            workspace_id: e.workspace_id.as_deref(),
            created_at_ms: e.created_at_ms,
            lease_id: c.lease_id.as_deref(),
        }
    }
}

impl Line<String> {
    fn into_charge(self) -> Charge {
        Charge {
            entry: LedgerEntry {
                org_id: self.org_id,
                amount_nanos: self.amount_nanos,
                currency: self.currency,
                kind: self.kind,
                reference: self.reference,
                key_id: self.key_id,
                workspace_id: self.workspace_id,
                created_at_ms: self.created_at_ms,
                ..LedgerEntry::default()
            },
            lease_id: self.lease_id,
        }
    }
}

struct State {
    file: File,
    /// Lines appended since the file was last emptied.
    appended: u64,
}

pub struct Journal {
    path: PathBuf,
    state: Mutex<State>,
}

impl Journal {
    /// Opens (creating) the journal at `path`; returns it with the charges it still holds.
    pub fn open(path: &Path) -> std::io::Result<(Journal, Vec<Charge>)> {
        let pending = match File::open(path) {
            Ok(file) => read_lines(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let appended = pending.len() as u64;
        Ok((Journal { path: path.to_owned(), state: Mutex::new(State { file, appended }) }, pending))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes one charge to the journal (one `write` call, no `fsync`).
    pub fn append(&self, charge: &Charge) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&Line::of(charge)).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut state = self.lock();
        state.file.write_all(&line)?;
        state.appended += 1;
        Ok(())
    }

    /// Empties the journal if every line in it has been committed (`committed` counts the
    /// lines committed since the last time it was emptied).
    pub fn truncate_if_committed(&self, committed: u64) -> std::io::Result<bool> {
        let mut state = self.lock();
        if state.appended != committed {
            return Ok(false);
        }
        state.file.set_len(0)?;
        state.appended = 0;
        Ok(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_lines(file: File) -> Vec<Charge> {
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Line<String>>(&l).ok())
        .map(Line::into_charge)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn charge(reference: &str) -> Charge {
        Charge {
            entry: LedgerEntry { org_id: "o".into(), amount_nanos: -5, reference: reference.into(), ..LedgerEntry::default() },
            lease_id: Some("l".into()),
        }
    }

    #[test]
    fn appended_charges_survive_a_reopen_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("charges.journal");
        let (journal, pending) = Journal::open(&path).unwrap();
        assert!(pending.is_empty());
        journal.append(&charge("a")).unwrap();
        journal.append(&charge("b")).unwrap();
        drop(journal);
        let (journal, pending) = Journal::open(&path).unwrap();
        assert_eq!(pending.iter().map(|c| c.entry.reference.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(pending[0].lease_id.as_deref(), Some("l"));
        assert!(!journal.truncate_if_committed(1).unwrap(), "one line is not committed yet");
        assert!(journal.truncate_if_committed(2).unwrap());
        drop(journal);
        assert!(Journal::open(&path).unwrap().1.is_empty());
    }
}
