//! Hands a streamed upstream body over in batches: whatever the upstream sent together
//! reaches the stream decoder together, so the gateway writes it to its client in one piece.
//!
//! hyper's client gives a response body one HTTP chunk at a time: its connection task
//! decodes one chunk, hands it over and decodes the next only once that one was taken. An
//! upstream that sends a dozen SSE events in one TCP segment (a fast model, a burst after a
//! pause) thus reached the client as a dozen separate writes, because the server side writes
//! out what it holds whenever the body it relays has nothing ready — which is the case
//! between two chunks until the connection task has run again.
//!
//! [`coalesce`] moves the reading into a small task of its own on the same runtime. Having
//! taken a chunk, it lets the connection task run once and takes whatever that produced,
//! until a round produces nothing; then it hands the batch over. Events that arrive apart
//! (a model generating tokens) go out one by one as before, a scheduler round later. The
//! queue between the task and its reader holds one batch, so a slow client still slows the
//! upstream down (backpressure is kept), and a reader that goes away (a client that
//! disconnects) ends the task and drops the body, which closes the upstream connection.
//!
//! Reading the body in the relaying task itself, without this task, was measured and costs
//! more: each requeue then goes back out through the whole server connection and in again
//! (BENCHMARKS.md, stop 25).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, Stream};
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::sync::mpsc;

/// The body's data, in batches of what arrived together. Must be called within a Tokio
/// runtime (the reading task is spawned on it). A body error ends the stream after the data
/// received before it.
pub(crate) fn coalesce<B>(body: B) -> impl Stream<Item = Result<Bytes, B::Error>> + Send + 'static
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(1);
    tokio::spawn(pump(body, tx));
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Reads `body` until it ends, fails or nobody reads `tx` any more.
async fn pump<B>(mut body: B, tx: mpsc::Sender<Result<Bytes, B::Error>>)
where
    B: Body<Data = Bytes> + Unpin,
{
    loop {
        let frame = tokio::select! {
            biased;
            () = tx.closed() => return,
            frame = body.frame() => frame,
        };
        let mut batch = match frame {
            None => return,
            Some(Err(e)) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Some(Ok(frame)) => Batch::default().with(frame.into_data().ok()),
        };
        let end = gather(&mut body, &mut batch).await;
        if let Some(bytes) = batch.take() {
            if tx.send(Ok(bytes)).await.is_err() {
                return;
            }
        }
        if let Some(end) = end {
            if let Err(e) = end {
                let _ = tx.send(Err(e)).await;
            }
            return;
        }
    }
}

/// Adds to `batch` what the body yields within scheduler rounds, until a round yields
/// nothing. Returns `Some` when the body ended (`Ok`) or failed (`Err`) meanwhile.
async fn gather<B>(body: &mut B, batch: &mut Batch) -> Option<Result<(), B::Error>>
where
    B: Body<Data = Bytes> + Unpin,
{
    loop {
        Requeue::default().await;
        match body.frame().now_or_never() {
            None => return None,
            Some(None) => return Some(Ok(())),
            Some(Some(Err(e))) => return Some(Err(e)),
            Some(Some(Ok(frame))) => batch.add(frame.into_data().ok()),
        }
    }
}

/// Data chunks joined into one buffer; a single chunk is passed on without a copy.
#[derive(Default)]
struct Batch {
    first: Option<Bytes>,
    joined: Option<BytesMut>,
}

impl Batch {
    fn with(mut self, data: Option<Bytes>) -> Self {
        self.add(data);
        self
    }

    fn add(&mut self, data: Option<Bytes>) {
        let Some(data) = data.filter(|d| !d.is_empty()) else { return };
        match (&mut self.joined, self.first.take()) {
            (Some(joined), _) => joined.extend_from_slice(&data),
            (None, None) => self.first = Some(data),
            (None, Some(first)) => {
                let mut joined = BytesMut::with_capacity(first.len() + data.len() * 4);
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&data);
                self.joined = Some(joined);
            }
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        self.joined.take().map(BytesMut::freeze).or_else(|| self.first.take())
    }
}

/// Lets every task already scheduled on this runtime run once, then resumes. It wakes itself
/// at once (unlike `tokio::task::yield_now`, which waits for the next poll of the IO driver,
/// a system call): the connection task that was woken by the chunk just taken runs first.
#[derive(Default)]
struct Requeue {
    yielded: bool,
}

impl Future for Requeue {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use futures::StreamExt;
    use hyper::body::Frame;

    use super::*;

    /// A body fed like hyper's: a producer task (the connection task) hands chunks over a
    /// queue of one, so it can pass the next chunk only once the previous one was taken.
    struct Fed {
        rx: mpsc::Receiver<Bytes>,
        dropped: Arc<AtomicBool>,
    }

    impl Drop for Fed {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    impl Body for Fed {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.rx.poll_recv(cx).map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }

    /// A body whose producer sends `chunks`, waiting `gap` before each one after the first.
    fn fed(chunks: &[&'static str], gap: Duration) -> (Fed, Arc<AtomicBool>) {
        let (tx, rx) = mpsc::channel(1);
        let chunks: Vec<_> = chunks.to_vec();
        tokio::spawn(async move {
            for (i, chunk) in chunks.into_iter().enumerate() {
                if i > 0 && !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
                if tx.send(Bytes::from_static(chunk.as_bytes())).await.is_err() {
                    return;
                }
            }
        });
        let dropped = Arc::new(AtomicBool::new(false));
        (Fed { rx, dropped: dropped.clone() }, dropped)
    }

    async fn batches(body: Fed) -> Vec<String> {
        coalesce(body).map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap()).collect().await
    }

    #[tokio::test]
    async fn chunks_that_arrive_together_come_out_as_one_batch() {
        let (body, _) = fed(&["data: a\n\n", "data: b\n\n", "data: c\n\n"], Duration::ZERO);
        assert_eq!(batches(body).await, ["data: a\n\ndata: b\n\ndata: c\n\n"]);
    }

    #[tokio::test(start_paused = true)]
    async fn chunks_that_arrive_apart_come_out_one_by_one() {
        let (body, _) = fed(&["data: a\n\n", "data: b\n\n"], Duration::from_millis(20));
        assert_eq!(batches(body).await, ["data: a\n\n", "data: b\n\n"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_goes_away_ends_the_reading_and_drops_the_body() {
        let (body, dropped) = fed(&["data: a\n\n", "data: b\n\n"], Duration::from_secs(3600));
        let mut stream = Box::pin(coalesce(body));
        assert_eq!(stream.next().await.unwrap().unwrap(), "data: a\n\n");
        drop(stream);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(dropped.load(Ordering::SeqCst), "the body (the upstream connection) is dropped");
    }

    #[tokio::test]
    async fn a_body_error_comes_after_the_data_gathered_before_it_and_ends_the_stream() {
        let frames: Vec<Result<Frame<Bytes>, &'static str>> = vec![
            Ok(Frame::data(Bytes::from_static(b"data: a\n\n"))),
            Ok(Frame::data(Bytes::new())),
            Ok(Frame::data(Bytes::from_static(b"data: b\n\n"))),
            Err("connection reset"),
        ];
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let mut stream = Box::pin(coalesce(body));
        assert_eq!(stream.next().await.unwrap().unwrap(), "data: a\n\ndata: b\n\n");
        assert_eq!(stream.next().await.unwrap().unwrap_err(), "connection reset");
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn an_empty_body_is_an_empty_stream() {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![Ok(Frame::data(Bytes::new()))];
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        assert!(Box::pin(coalesce(body)).next().await.is_none());
    }
}
