//! File bodies on disk: written chunk by chunk as they arrive (never held whole in memory)
//! to `<id>.<random>.part`, synced and renamed into place; JSONL checked line by line on the way, with
//! errors that name the line. Batch input lines must be
//! `{"custom_id": "…", "method": "POST", "url": "/v1/…", "body": {…}}` (OpenAI) or
//! `{"customer_item_id", "operation", "model", "input"}` (BatchRouter).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::error::ApiError;

/// Longest `custom_id` accepted.
pub const MAX_CUSTOM_ID: usize = 512;

/// One line of a batch input file.
#[derive(Debug, Deserialize)]
pub struct BatchLine {
    pub custom_id: String,
    pub method: String,
    pub url: String,
    pub body: Box<serde_json::value::RawValue>,
}

impl BatchLine {
    /// Parses and checks one line; the error says what is wrong (without the line number).
    pub fn parse(line: &[u8]) -> Result<BatchLine, String> {
        let parsed: BatchLine = serde_json::from_slice(line).map_err(|e| format!("not a batch request line: {e}"))?;
        if parsed.custom_id.is_empty() || parsed.custom_id.len() > MAX_CUSTOM_ID {
            return Err(format!("`custom_id` must be 1 to {MAX_CUSTOM_ID} bytes"));
        }
        if !parsed.method.eq_ignore_ascii_case("POST") {
            return Err("`method` must be \"POST\"".to_owned());
        }
        if !parsed.body.get().trim_start().starts_with('{') {
            return Err("`body` must be a JSON object".to_owned());
        }
        Ok(parsed)
    }
}

/// Checks a file's lines as they stream past: each non-blank line must be a batch request
/// line. The first problem is kept (the file is refused only if its purpose is `batch`).
pub struct LineChecker {
    partial: Vec<u8>,
    line: u64,
    lines: u64,
    max_line: usize,
    pub first_error: Option<String>,
}

impl LineChecker {
    pub fn new(max_line: usize) -> Self {
        LineChecker { partial: Vec::new(), line: 0, lines: 0, max_line, first_error: None }
    }

    pub fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(pos) = chunk.iter().position(|b| *b == b'\n') {
            let (head, rest) = chunk.split_at(pos);
            self.push_partial(head);
            let line = std::mem::take(&mut self.partial);
            self.check_line(&line);
            chunk = rest.get(1..).unwrap_or_default();
        }
        self.push_partial(chunk);
    }

    /// Checks the last line (without a final newline); returns the count of non-blank lines.
    pub fn finish(&mut self) -> u64 {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.check_line(&line);
        }
        self.lines
    }

    fn push_partial(&mut self, bytes: &[u8]) {
        if self.partial.len() + bytes.len() > self.max_line {
            self.note(self.line + 1, format!("longer than {} bytes", self.max_line));
            return;
        }
        self.partial.extend_from_slice(bytes);
    }

    fn check_line(&mut self, line: &[u8]) {
        self.line += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.lines += 1;
        if self.first_error.is_none() {
            if let Err(message) = BatchLine::parse(line) {
                // A BatchRouter native item line is a batch input line too.
                if serde_json::from_slice::<super::native::NativeItem>(line).is_err() {
                    self.note(self.line, message);
                }
            }
        }
    }

    fn note(&mut self, line: u64, message: String) {
        if self.first_error.is_none() {
            self.first_error = Some(format!("line {line}: {message}"));
        }
    }
}

/// A file being written: `<final>.part` until [`Writing::commit`].
pub struct Writing {
    file: tokio::fs::File,
    part: PathBuf,
    target: PathBuf,
    pub bytes: u64,
}

impl Writing {
    pub async fn create(target: PathBuf) -> Result<Writing, ApiError> {
        // A name of its own: two instances finalizing one batch never write the same file.
        let part = target.with_extension(format!("{}.part", uuid::Uuid::new_v4().simple()));
        let file = tokio::fs::File::create(&part).await.map_err(io_error)?;
        Ok(Writing { file, part, target, bytes: 0 })
    }

    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        self.bytes += chunk.len() as u64;
        self.file.write_all(chunk).await.map_err(io_error)
    }

    /// Syncs and moves the file into place.
    pub async fn commit(mut self) -> Result<u64, ApiError> {
        self.file.flush().await.map_err(io_error)?;
        self.file.sync_all().await.map_err(io_error)?;
        tokio::fs::rename(&self.part, &self.target).await.map_err(io_error)?;
        Ok(self.bytes)
    }

    /// Removes the partial file.
    pub async fn abandon(self) {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.part).await;
    }
}

pub fn io_error(e: std::io::Error) -> ApiError {
    ApiError::Internal(anyhow::anyhow!("file storage: {e}"))
}

/// Reads a batch input file's request lines in order, with their line numbers.
pub async fn read_batch_lines(path: &Path, mut each: impl FnMut(u64, BatchLine) -> Result<(), ApiError>) -> Result<(), ApiError> {
    let file = tokio::fs::File::open(path).await.map_err(io_error)?;
    let mut lines = BufReader::new(file).lines();
    let mut number = 0u64;
    while let Some(line) = lines.next_line().await.map_err(io_error)? {
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = BatchLine::parse(line.as_bytes())
            .map_err(|m| ApiError::invalid(format!("input file line {number}: {m}"), Some("input_file_id".into())))?;
        each(number, parsed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(chunks: &[&str]) -> (u64, Option<String>) {
        let mut checker = LineChecker::new(200);
        for c in chunks {
            checker.feed(c.as_bytes());
        }
        (checker.finish(), checker.first_error)
    }

    const OK: &str = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#;

    #[test]
    fn lines_split_across_chunks_are_checked_whole() {
        let (head, tail) = OK.split_at(20);
        assert_eq!(check(&[head, tail, "\n", OK, "\n\n"]), (2, None));
        assert_eq!(check(&[OK]), (1, None), "no final newline");
    }

    #[test]
    fn errors_name_the_line() {
        let (_, error) = check(&[OK, "\n\n{not json}\n", OK]);
        assert!(error.as_deref().unwrap_or_default().starts_with("line 3: not a batch request line"), "{error:?}");
        let get = OK.replace("POST", "GET");
        assert_eq!(check(&[OK, "\n", &get]).1.as_deref(), Some("line 2: `method` must be \"POST\""));
        let array = OK.replace(r#"{"model":"m"}"#, "[1]");
        assert_eq!(check(&[&array]).1.as_deref(), Some("line 1: `body` must be a JSON object"));
    }

    #[test]
    fn an_overlong_line_is_refused() {
        let long = format!("{}\n", "x".repeat(300));
        assert_eq!(check(&[&long]).1.as_deref(), Some("line 1: longer than 200 bytes"));
    }
}
