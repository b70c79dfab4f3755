//! The charge journal: local append-only files where each charge is written (one JSON line,
//! one `write` call) before the client is answered. The ledger writer then commits charges to
//! the database in batches and empties each of the journal's two files once everything in it
//! is committed (appends alternate between them, see [`ROTATE_AFTER`]); on start, whatever
//! they still hold is committed again (idempotent by reference).
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

/// Lines after which appends move to the journal's other file (≈ 3 MB), once that one is
/// empty. With two files, one can be emptied (all its lines committed) while charges keep
/// going to the other: a journal that had to be wholly committed at one instant to be emptied
/// grew without bound under a steady load, which never leaves the queue empty.
const ROTATE_AFTER: u64 = 10_000;

struct State {
    files: [File; 2],
    /// Per file: lines appended since it was last emptied.
    appended: [u64; 2],
    /// The file appends go to.
    current: usize,
}

pub struct Journal {
    state: Mutex<State>,
}

impl Journal {
    /// Opens (creating) the journal at `path` and its second file (`path` with `.1` added);
    /// returns it with the charges they still hold.
    pub fn open(path: &Path) -> std::io::Result<(Journal, Vec<Charge>)> {
        let paths = [path.to_owned(), second_file(path)];
        let mut pending = Vec::new();
        let mut appended = [0; 2];
        for (i, path) in paths.iter().enumerate() {
            let lines = read_file(path)?;
            appended[i] = lines.len() as u64;
            pending.extend(lines);
        }
        let files = [open_append(&paths[0])?, open_append(&paths[1])?];
        let state = State { files, appended, current: 0 };
        Ok((Journal { state: Mutex::new(state) }, pending))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes one charge to the journal (one `write` call, no `fsync`). Returns the file it went
    /// to, for [`Journal::release`]. Appends move to the other file once this one holds
    /// [`ROTATE_AFTER`] lines and the other is empty.
    pub fn append(&self, charge: &Charge) -> std::io::Result<usize> {
        let mut line = serde_json::to_vec(&Line::of(charge)).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut state = self.lock();
        let other = 1 - state.current;
        if state.appended[state.current] >= ROTATE_AFTER && state.appended[other] == 0 {
            state.current = other;
        }
        let current = state.current;
        state.files[current].write_all(&line)?;
        state.appended[current] += 1;
        Ok(current)
    }

    /// Empties each file whose every line has been committed; `committed` counts, per file,
    /// the lines committed since it was last emptied (and is reset for the files emptied).
    pub fn release(&self, committed: &mut [u64; 2]) -> std::io::Result<()> {
        let mut state = self.lock();
        let state = &mut *state;
        for ((file, appended), committed) in state.files.iter().zip(&mut state.appended).zip(committed) {
            if *appended > 0 && *appended == *committed {
                file.set_len(0)?;
                *appended = 0;
                *committed = 0;
            }
        }
        Ok(())
    }

    /// Lines written to each file since it was last emptied.
    pub fn appended(&self) -> [u64; 2] {
        self.lock().appended
    }
}

/// The journal's second file: `path` with `.1` added.
fn second_file(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The charges in one journal file (none if it does not exist).
fn read_file(path: &Path) -> std::io::Result<Vec<Charge>> {
    match File::open(path) {
        Ok(file) => Ok(read_lines(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
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
        let mut committed = [1, 0];
        journal.release(&mut committed).unwrap();
        assert_eq!((journal.appended(), committed), ([2, 0], [1, 0]), "one line is not committed yet");
        committed[0] = 2;
        journal.release(&mut committed).unwrap();
        assert_eq!((journal.appended(), committed), ([0, 0], [0, 0]));
        drop(journal);
        assert!(Journal::open(&path).unwrap().1.is_empty());
    }

    #[test]
    fn a_full_file_is_emptied_while_appends_go_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("charges.journal");
        let (journal, _) = Journal::open(&path).unwrap();
        let mut committed = [0; 2];
        for i in 0..ROTATE_AFTER {
            assert_eq!(journal.append(&charge(&format!("a{i}"))).unwrap(), 0);
        }
        committed[0] = ROTATE_AFTER - 1;
        assert_eq!(journal.append(&charge("b0")).unwrap(), 1, "the first file is full: the second one takes appends");
        assert_eq!(journal.append(&charge("b1")).unwrap(), 1);
        journal.release(&mut committed).unwrap();
        assert_eq!(journal.appended(), [ROTATE_AFTER, 2], "the first file still holds an uncommitted line");
        committed[0] += 1;
        journal.release(&mut committed).unwrap();
        assert_eq!(journal.appended(), [0, 2], "emptied while the second file holds uncommitted lines");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        drop(journal);
        let (_, pending) = Journal::open(&path).unwrap();
        assert_eq!(pending.iter().map(|c| c.entry.reference.as_str()).collect::<Vec<_>>(), vec!["b0", "b1"], "the second file is read back at start");
    }
}
