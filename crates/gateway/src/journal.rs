//! The charge journal: local append-only files where each charge is written (one JSON line,
//! one `write` call) before the client is answered. Each thread that charges writes to a lane
//! of its own (two files, appends alternating between them, see [`ROTATE_AFTER`]); the ledger
//! writer commits charges to the database in batches and empties each file once everything in
//! it is committed. On start, whatever the files still hold is committed again (idempotent by
//! reference).
//!
//! A charge is therefore durable against a crash of the process (`kill -9`: the page cache
//! keeps what was written) as soon as the client can see its answer, without the response
//! waiting for a database commit. Against a power loss of the host, at most the charges of the
//! last commit interval (milliseconds) can be lost; `fsync` per charge would close that gap at
//! the cost of the latency this journal exists to avoid.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Lines after which appends move to a lane's other file (≈ 3 MB), once that one is empty.
/// With two files, one can be emptied (all its lines committed) while charges keep going to
/// the other: a journal that had to be wholly committed at one instant to be emptied grew
/// without bound under a steady load, which never leaves the queue empty.
const ROTATE_AFTER: u64 = 10_000;

/// Where one charge was written: lane × 2 + file, an index into the counts that
/// [`Journal::appended`] returns and [`Journal::release`] takes.
pub type JournalSlot = usize;

/// One thread's pair of files.
struct Lane {
    files: [File; 2],
    /// Per file: lines appended since it was last emptied.
    appended: [u64; 2],
    /// The file appends go to.
    current: usize,
}

/// The journal: a lane per thread that charges, so that the serving threads never wait for
/// each other (a shared file had them meet on its lock, and on the kernel's lock of the file,
/// a few percent of requests each time). A thread keeps the lane it first wrote to; with more
/// threads than lanes some share one.
pub struct Journal {
    lanes: Box<[Mutex<Lane>]>,
    /// Files of an earlier run's lanes beyond this run's (it had more threads): read at open,
    /// removed by [`Journal::recovered`].
    orphans: Vec<PathBuf>,
}

impl Journal {
    /// Opens (creating) the journal at `path` with `lanes` lanes (at least one), and returns
    /// it with the charges its files still hold — those of any number of lanes, as an earlier
    /// run may have had more.
    pub fn open(path: &Path, lanes: usize) -> std::io::Result<(Journal, Vec<Charge>)> {
        let lanes = lanes.max(1);
        let mut pending = Vec::new();
        let mut opened = Vec::with_capacity(lanes);
        for lane in 0..lanes {
            let paths = lane_files(path, lane);
            let mut appended = [0; 2];
            for (count, path) in appended.iter_mut().zip(&paths) {
                let lines = read_file(path)?;
                *count = lines.len() as u64;
                pending.extend(lines);
            }
            let files = [open_append(&paths[0])?, open_append(&paths[1])?];
            opened.push(Mutex::new(Lane { files, appended, current: 0 }));
        }
        let orphans = orphan_files(path, lanes)?;
        for orphan in &orphans {
            pending.extend(read_file(orphan)?);
        }
        Ok((Journal { lanes: opened.into_boxed_slice(), orphans }, pending))
    }

    fn lock(&self, lane: usize) -> std::sync::MutexGuard<'_, Lane> {
        self.lanes[lane].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes one charge to this thread's lane (one `write` call, no `fsync`). Returns where
    /// it went, for [`Journal::release`]. A lane's appends move to its other file once this
    /// one holds [`ROTATE_AFTER`] lines and the other is empty.
    pub fn append(&self, charge: &Charge) -> std::io::Result<JournalSlot> {
        let mut line = serde_json::to_vec(&Line::of(charge)).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let lane = this_threads_lane(self.lanes.len());
        let mut state = self.lock(lane);
        let other = 1 - state.current;
        if state.appended[state.current] >= ROTATE_AFTER && state.appended[other] == 0 {
            state.current = other;
        }
        let current = state.current;
        state.files[current].write_all(&line)?;
        state.appended[current] += 1;
        Ok(lane * 2 + current)
    }

    /// Empties each file whose every line has been committed; `committed` counts, per
    /// [`JournalSlot`], the lines committed since its file was last emptied (and is reset for the
    /// files emptied).
    pub fn release(&self, committed: &mut [u64]) -> std::io::Result<()> {
        for (lane, committed) in committed.chunks_mut(2).enumerate().take(self.lanes.len()) {
            let mut state = self.lock(lane);
            let state = &mut *state;
            for ((file, appended), committed) in state.files.iter().zip(&mut state.appended).zip(committed) {
                if *appended > 0 && *appended == *committed {
                    file.set_len(0)?;
                    *appended = 0;
                    *committed = 0;
                }
            }
        }
        Ok(())
    }

    /// How many slots there are: [`JournalSlot`]s are below it.
    pub fn slots(&self) -> usize {
        self.lanes.len() * 2
    }

    /// Lines written since it was last emptied, per [`JournalSlot`].
    pub fn appended(&self) -> Vec<u64> {
        (0..self.lanes.len()).flat_map(|lane| self.lock(lane).appended).collect()
    }

    /// Says that everything [`Journal::open`] returned is committed: empties the lanes and
    /// removes an earlier run's extra lanes.
    pub fn recovered(&self) -> std::io::Result<()> {
        self.release(&mut self.appended())?;
        // The highest lane last: files left by a crash meanwhile are still found next time.
        for orphan in self.orphans.iter().rev() {
            std::fs::remove_file(orphan)?;
        }
        Ok(())
    }
}

/// The lane of the calling thread among `lanes` (at least one): threads take lanes in turn at their first
/// charge and keep them.
fn this_threads_lane(lanes: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static LANE: Cell<Option<usize>> = const { Cell::new(None) };
    }
    let n = LANE.with(|lane| {
        lane.get().unwrap_or_else(|| {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            lane.set(Some(n));
            n
        })
    });
    n % lanes
}

/// A lane's two files: lane 0 is `path` and `path.1` (the files of a journal without lanes),
/// lane `n` is `path.lane<n>` and `path.lane<n>.1`.
fn lane_files(path: &Path, lane: usize) -> [PathBuf; 2] {
    let first = if lane == 0 { path.to_owned() } else { with_suffix(path, &format!(".lane{lane}")) };
    let second = with_suffix(&first, ".1");
    [first, second]
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The files of lanes `lanes` and beyond that exist next to `path`.
fn orphan_files(path: &Path, lanes: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut orphans = Vec::new();
    for lane in lanes.. {
        let files: Vec<PathBuf> = lane_files(path, lane).into_iter().filter(|f| f.exists()).collect();
        if files.is_empty() {
            return Ok(orphans);
        }
        orphans.extend(files);
    }
    Ok(orphans)
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
        let (journal, pending) = Journal::open(&path, 1).unwrap();
        assert!(pending.is_empty());
        journal.append(&charge("a")).unwrap();
        journal.append(&charge("b")).unwrap();
        drop(journal);
        let (journal, pending) = Journal::open(&path, 1).unwrap();
        assert_eq!(pending.iter().map(|c| c.entry.reference.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(pending[0].lease_id.as_deref(), Some("l"));
        let mut committed = [1, 0];
        journal.release(&mut committed).unwrap();
        assert_eq!((journal.appended(), committed), (vec![2, 0], [1, 0]), "one line is not committed yet");
        committed[0] = 2;
        journal.release(&mut committed).unwrap();
        assert_eq!((journal.appended(), committed), (vec![0, 0], [0, 0]));
        drop(journal);
        assert!(Journal::open(&path, 1).unwrap().1.is_empty());
    }

    #[test]
    fn a_full_file_is_emptied_while_appends_go_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("charges.journal");
        let (journal, _) = Journal::open(&path, 1).unwrap();
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
        let (_, pending) = Journal::open(&path, 1).unwrap();
        assert_eq!(pending.iter().map(|c| c.entry.reference.as_str()).collect::<Vec<_>>(), vec!["b0", "b1"], "the second file is read back at start");
    }

    #[test]
    fn threads_write_to_lanes_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("charges.journal");
        let (journal, _) = Journal::open(&path, 2).unwrap();
        let slots: Vec<JournalSlot> = std::thread::scope(|scope| {
            let writers: Vec<_> = (0..2)
                .map(|t| {
                    let journal = &journal;
                    scope.spawn(move || (0..3).map(|i| journal.append(&charge(&format!("t{t}-{i}"))).unwrap()).collect::<Vec<_>>())
                })
                .collect();
            writers.into_iter().flat_map(|w| w.join().unwrap()).collect()
        });
        assert_eq!(slots[0..3], [slots[0]; 3], "a thread keeps its lane");
        assert_eq!(slots[3..6], [slots[3]; 3]);
        assert_ne!(slots[0], slots[3], "two threads, two lanes");
        let mut appended = journal.appended();
        appended.sort_unstable();
        assert_eq!(appended, [0, 0, 3, 3]);
        assert!(path.exists() && dir.path().join("charges.journal.lane1.1").exists());
    }

    #[test]
    fn an_earlier_run_with_more_lanes_is_read_then_its_extra_lanes_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("charges.journal");
        let (earlier, _) = Journal::open(&path, 3).unwrap();
        std::thread::scope(|scope| {
            for t in 0..3 {
                let earlier = &earlier;
                scope.spawn(move || earlier.append(&charge(&format!("t{t}"))).unwrap()).join().unwrap();
            }
        });
        drop(earlier);
        let (journal, pending) = Journal::open(&path, 1).unwrap();
        let mut references: Vec<_> = pending.iter().map(|c| c.entry.reference.clone()).collect();
        references.sort_unstable();
        assert_eq!(references, ["t0", "t1", "t2"], "every lane of the earlier run is read");
        journal.recovered().unwrap();
        let mut left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort_unstable();
        assert_eq!(left, ["charges.journal", "charges.journal.1"], "lane 0 stays, empty; the others are gone");
        drop(journal);
        assert!(Journal::open(&path, 2).unwrap().1.is_empty());
    }
}
