//! The wait of a batch writer (the request log, the ledger): after the first item arrives the
//! writer sleeps out a window so that a trickle of work shares one write — one wake-up per
//! batch rather than one per item. The wait ends early when a full batch waits or when the
//! producers are gone (shutdown), so that neither a queue overflows nor a stop sits out a long
//! window.

use std::time::Duration;

use tokio::sync::Notify;

/// Shared between the producers (who end the wait) and the one writer (who waits).
pub struct BatchWindow {
    wake: Notify,
    window: Duration,
}

impl BatchWindow {
    pub fn new(window: Duration) -> Self {
        BatchWindow { wake: Notify::new(), window }
    }

    /// A producer saw a full batch waiting: ends a wait in progress. Only one in progress — a
    /// stored wake-up would cut the next window short for nothing.
    pub fn batch_full(&self) {
        self.wake.notify_waiters();
    }

    /// The producers are going away: the writer stops waiting, now or at its next wait.
    pub fn close(&self) {
        self.wake.notify_one();
    }

    /// Sleeps out the window unless `full()` says a full batch (or a closed queue) already
    /// waits. The wake-up is registered before `full` is asked, so a batch that fills up in
    /// between still ends the wait.
    pub async fn wait(&self, full: impl FnOnce() -> bool) {
        if self.window.is_zero() {
            return;
        }
        let woken = self.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if !full() {
            let _ = tokio::time::timeout(self.window, woken).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::time::Instant;

    const WINDOW: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn without_a_wake_up_the_whole_window_is_slept() {
        let window = BatchWindow::new(WINDOW);
        let start = Instant::now();
        window.wait(|| false).await;
        assert_eq!(start.elapsed(), WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_already_waiting_skips_the_window() {
        let window = BatchWindow::new(WINDOW);
        let start = Instant::now();
        window.wait(|| true).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_filling_up_during_the_wait_ends_it() {
        let window = Arc::new(BatchWindow::new(WINDOW));
        let producer = Arc::clone(&window);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            producer.batch_full();
        });
        let start = Instant::now();
        window.wait(|| false).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_filling_up_between_registering_and_looking_still_ends_the_wait() {
        let window = BatchWindow::new(WINDOW);
        let start = Instant::now();
        // The batch fills up after the writer registered its wake-up but before it looked.
        window.wait(|| {
            window.batch_full();
            false
        }).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_with_nobody_waiting_does_not_cut_the_next_window_short() {
        let window = BatchWindow::new(WINDOW);
        window.batch_full();
        let start = Instant::now();
        window.wait(|| false).await;
        assert_eq!(start.elapsed(), WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_ends_the_next_wait_even_when_nobody_waits_yet() {
        let window = BatchWindow::new(WINDOW);
        window.close();
        let start = Instant::now();
        window.wait(|| false).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
