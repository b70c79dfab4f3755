//! The request log's spill file: where the writer puts records the database cannot take
//! (unreachable, failing, or slower than the write timeout), one JSON line per record, to
//! replay them into the database once it answers again, and on the next start.
//!
//! Like the charge journal, a line is written with one `write` call and no `fsync`: it
//! survives a crash of the process (the page cache keeps it), not a power loss of the host.
//! Lines are replayed in order from an offset; the file is emptied once every line has been
//! replayed. Replays are idempotent (a record whose id exists is skipped by the store), so a
//! replay cut short by a crash only repeats work.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use marga_store::GenerationRecord;

pub struct Spill {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    len: u64,
    /// Bytes from the start already replayed into the database.
    replayed: u64,
    /// Largest size the file may reach.
    max_bytes: u64,
}

impl Spill {
    /// Opens (creating) the spill file; what it still holds is pending.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<Spill> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        let spill = Spill { path: path.to_owned(), file, len, replayed: 0, max_bytes };
        spill.report();
        Ok(spill)
    }

    /// Whether some lines wait to be replayed.
    pub fn pending(&self) -> bool {
        self.replayed < self.len
    }

    /// Appends `records` (one `write` call); refuses when the file would pass its maximum.
    pub fn append(&mut self, records: &[GenerationRecord]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(records.len() * 512);
        for record in records {
            serde_json::to_writer(&mut buf, record).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        let size = buf.len() as u64;
        if self.len.saturating_add(size) > self.max_bytes {
            return Err(std::io::Error::other(format!("the spill file would pass its maximum of {} bytes", self.max_bytes)));
        }
        if let Err(e) = self.file.write_all(&buf) {
            // A partial write (disk full) would glue a torn line to the next one: cut it off.
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += size;
        self.report();
        Ok(())
    }

    /// Up to `max` records from the first line not yet replayed, and the offset after them.
    /// A line that does not parse (cut by a power loss) is skipped and counted.
    pub fn read_next(&self, max: usize) -> std::io::Result<(Vec<GenerationRecord>, u64)> {
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.replayed))?;
        let mut reader = BufReader::new(file.take(self.len - self.replayed));
        let mut records = Vec::new();
        let mut offset = self.replayed;
        let mut line = Vec::new();
        while records.len() < max {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            offset += n as u64;
            match serde_json::from_slice::<GenerationRecord>(&line) {
                Ok(record) => records.push(record),
                Err(_) => metrics::counter!("marga_request_log_spill_corrupt_lines_total").increment(1),
            }
        }
        Ok((records, offset))
    }

    /// Marks everything before `offset` as replayed; empties the file once all of it is.
    pub fn mark_replayed(&mut self, offset: u64) -> std::io::Result<()> {
        self.replayed = offset.min(self.len);
        if self.replayed == self.len {
            self.file.set_len(0)?;
            self.len = 0;
            self.replayed = 0;
        }
        self.report();
        Ok(())
    }

    fn report(&self) {
        metrics::gauge!("marga_request_log_spill_bytes").set((self.len - self.replayed) as f64);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(id: &str) -> GenerationRecord {
        GenerationRecord { id: id.to_owned(), model: "m".to_owned(), ..GenerationRecord::default() }
    }

    #[test]
    fn spilled_records_are_replayed_in_order_then_the_file_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.spill");
        let mut spill = Spill::open(&path, 1 << 20).unwrap();
        assert!(!spill.pending());
        spill.append(&[record("a"), record("b"), record("c")]).unwrap();
        drop(spill);
        // A reopen (a restart) finds them pending, and a torn last line is skipped.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"id\":\"to").unwrap();
        let mut spill = Spill::open(&path, 1 << 20).unwrap();
        let (first, offset) = spill.read_next(2).unwrap();
        assert_eq!(first, vec![record("a"), record("b")]);
        spill.mark_replayed(offset).unwrap();
        assert!(spill.pending());
        let (rest, offset) = spill.read_next(10).unwrap();
        assert_eq!(rest, vec![record("c")]);
        spill.mark_replayed(offset).unwrap();
        assert!(!spill.pending());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_full_spill_file_refuses_more() {
        let dir = tempfile::tempdir().unwrap();
        let line = serde_json::to_vec(&record("a")).unwrap().len() as u64 + 1;
        let mut spill = Spill::open(&dir.path().join("s"), line * 2).unwrap();
        spill.append(&[record("a")]).unwrap();
        assert!(spill.append(&[record("b"), record("c"), record("d")]).is_err());
        let (records, _) = spill.read_next(10).unwrap();
        assert_eq!(records, vec![record("a")]);
    }
}
