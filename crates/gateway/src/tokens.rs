//! Token counting with a real tokenizer (`o200k_base`), for when an upstream reports no usage:
//! the prompt and streamed completion are counted so that every stream still ends with usage.
//!
//! The tokenizer takes about 50 MiB and is rarely needed (a client that leaves mid-stream, an
//! upstream without usage), so it is not kept for the life of the process: it lives on a
//! thread of its own, loaded on first use and dropped with its thread after [`IDLE`] without a
//! count. Callers hand it their texts and wait for the answer, as they waited for the count
//! before; a count after an idle period pays the load again (≈0.2 s of CPU).
//!
//! The allocator returns the tokenizer's memory to the OS in the background once it is freed
//! (jemalloc's decay: within about 10 s; see `main.rs`).

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use marga_protocol::openai::{ChatCompletionRequest, MessageContent};
use tiktoken_rs::CoreBPE;

/// How long the tokenizer stays loaded without being used.
const IDLE: Duration = Duration::from_secs(10);

/// One request to the tokenizer thread: texts to count, and where to send their total.
struct Job {
    texts: Arc<[String]>,
    reply: SyncSender<u64>,
}

/// The running tokenizer thread's number and inbox; `None` when no thread runs.
static SERVICE: Mutex<Option<(u64, Sender<Job>)>> = Mutex::new(None);

fn service() -> MutexGuard<'static, Option<(u64, Sender<Job>)>> {
    SERVICE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Tokens of a text.
pub fn count(text: &str) -> u64 {
    count_all(&[text])
}

/// Tokens of several texts, summed (one round trip to the tokenizer thread).
pub fn count_all(texts: &[&str]) -> u64 {
    count_owned(texts.iter().map(|t| (*t).to_owned()).collect())
}

fn count_owned(texts: Vec<String>) -> u64 {
    let texts: Arc<[String]> = texts.into();
    let (reply, answer) = mpsc::sync_channel(1);
    if send(Job { texts: Arc::clone(&texts), reply }) {
        if let Ok(n) = answer.recv() {
            return n;
        }
    }
    tracing::warn!("the tokenizer thread is unavailable; counting tokens as bytes / 4");
    estimate(&texts)
}

/// Sends `job` to the tokenizer thread, starting one if none runs. False if none can start.
fn send(job: Job) -> bool {
    let mut inbox = service();
    let job = match inbox.as_ref() {
        Some((_, tx)) => match tx.send(job) {
            Ok(()) => return true,
            // Its thread has ended: start another.
            Err(mpsc::SendError(job)) => job,
        },
        None => job,
    };
    let number = inbox.as_ref().map_or(0, |(n, _)| n.wrapping_add(1));
    let (tx, rx) = mpsc::channel();
    let started = std::thread::Builder::new().name("marga-tokenizer".into()).spawn(move || serve(rx, IDLE, number));
    if let Err(e) = started {
        tracing::error!(error = %e, "could not start the tokenizer thread");
        return false;
    }
    let sent = tx.send(job).is_ok();
    *inbox = Some((number, tx));
    sent
}

/// The tokenizer thread number `number`: loads the tokenizer, answers until `idle` passes
/// without a job, then stops taking jobs, answers those already queued, and drops the
/// tokenizer.
fn serve(jobs: Receiver<Job>, idle: Duration, number: u64) {
    let tokenizer = tiktoken_rs::o200k_base()
        .map_err(|e| tracing::error!(error = %e, "could not load the tokenizer; counting tokens as bytes / 4"))
        .ok();
    let answer = |job: Job| {
        let n = match &tokenizer {
            Some(bpe) => job.texts.iter().map(|t| tokens_of(bpe, t)).sum(),
            None => estimate(&job.texts),
        };
        // The caller may have given up; nothing to do then.
        let _ = job.reply.send(n);
    };
    loop {
        match jobs.recv_timeout(idle) {
            Ok(job) => answer(job),
            Err(RecvTimeoutError::Timeout) => {
                // Under the lock no caller can be sending: after it, callers start a new thread.
                let mut inbox = service();
                if inbox.as_ref().is_some_and(|(n, _)| *n == number) {
                    inbox.take();
                }
                drop(inbox);
                jobs.try_iter().for_each(answer);
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    drop(tokenizer);
}

fn tokens_of(bpe: &CoreBPE, text: &str) -> u64 {
    bpe.encode_with_special_tokens(text).len() as u64
}

/// What is counted when the tokenizer cannot be had: about four bytes per token.
fn estimate(texts: &[String]) -> u64 {
    texts.iter().map(|t| t.len().div_ceil(4) as u64).sum()
}

/// Estimated prompt tokens of a chat request (OpenAI's accounting: 3 per message + 3).
pub fn prompt_tokens(request: &ChatCompletionRequest) -> u64 {
    let mut texts: Vec<String> = Vec::new();
    for m in &request.messages {
        match &m.content {
            Some(MessageContent::Text(s)) => texts.push(s.clone()),
            Some(parts @ MessageContent::Parts(_)) => texts.push(parts.joined_text()),
            None => {}
        }
        for call in m.tool_calls.iter().flatten() {
            texts.push(call.function.name.clone());
            texts.push(call.function.arguments.clone());
        }
    }
    3 * request.messages.len() as u64 + count_owned(texts) + 3
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counts_with_a_real_tokenizer() {
        assert_eq!(count(""), 0);
        assert_eq!(count("hello world"), 2);
        assert!(count("The quick brown fox jumps over the lazy dog.") >= 9);
        assert_eq!(count_all(&["hello world", "hello world"]), 4);
    }

    #[test]
    fn counts_from_many_threads_at_once() {
        let counts: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| count("hello world"))).collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        assert_eq!(counts, vec![2; 8]);
    }

    #[test]
    fn the_tokenizer_thread_ends_once_idle_after_answering_what_was_queued() {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || serve(rx, Duration::from_millis(50), u64::MAX));
        let (reply, answer) = mpsc::sync_channel(1);
        let texts: Arc<[String]> = vec!["hello world".to_owned()].into();
        tx.send(Job { texts, reply }).unwrap();
        assert_eq!(answer.recv().unwrap(), 2);
        let started = std::time::Instant::now();
        thread.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "the thread ended after its idle time");
        let (reply, _answer) = mpsc::sync_channel(1);
        assert!(tx.send(Job { texts: vec![String::new()].into(), reply }).is_err(), "it takes no more jobs");
    }
}
