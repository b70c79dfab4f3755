//! The serving threads: one single-threaded Tokio runtime per core, each accepting on its own
//! listening socket, all bound to the same address with `SO_REUSEPORT` so that the kernel
//! spreads connections among them (nginx's model: a worker per core).
//!
//! A connection stays on the thread that accepted it, and so does everything its requests do:
//! the handler, the upstream call (providers keep a connection pool per thread, see
//! `marga_providers`) and the answer. Nothing on the request path wakes another thread, which
//! on a work-stealing runtime happened several times per request and cost more CPU than the
//! request itself at moderate rates. The background tasks (writers, refreshers) run on the
//! main runtime and are reached through channels they drain on their own schedule.
//!
//! Stopping is in two steps: [`Serving::drain`] stops accepting and waits for open
//! connections to finish; [`Serving::end`] then ends the runtimes. In between, the caller
//! flushes the writers: the runtimes still run what requests left behind (a settlement
//! spawned for a cancelled stream) and keep the database connections they opened usable.

use std::net::SocketAddr;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// How many connections may wait to be accepted, per socket.
const BACKLOG: i32 = 1024;

/// Listening sockets bound to one address, one per serving thread.
pub struct Listeners {
    sockets: Vec<std::net::TcpListener>,
    addr: SocketAddr,
}

impl Listeners {
    /// Binds `count` sockets (at least one) to `addr`; port 0 picks a free port, which all of
    /// them share. A port another process listens on is refused (`AddrInUse`), even if that
    /// process is another Marga whose sockets would accept company. Without `SO_REUSEPORT`
    /// (not Unix) there is one socket, hence one serving thread.
    pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Listeners> {
        #[cfg(not(unix))]
        let count = 1;
        if addr.port() != 0 {
            ensure_unused(addr)?;
        }
        let first = bind_one(addr)?;
        let addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..count.max(1) {
            sockets.push(bind_one(addr)?);
        }
        Ok(Listeners { sockets, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Fails if something listens on `addr`: a socket without `SO_REUSEPORT` cannot bind where any
/// listener is, so this one is bound and dropped (never listening, it leaves nothing behind).
fn ensure_unused(addr: SocketAddr) -> std::io::Result<()> {
    let probe = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())
}

fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// The serving threads, running.
pub struct Serving {
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: watch::Sender<bool>,
    release: watch::Sender<bool>,
    finished: mpsc::Receiver<std::io::Result<()>>,
}

impl Serving {
    /// Starts one thread per listener, each serving `router` on a runtime of its own, with a
    /// timer anchor of period `timer_anchor` ([`timer_anchor_period`]).
    pub fn start(listeners: Listeners, router: axum::Router, timer_anchor: Duration) -> std::io::Result<Serving> {
        let (stop, stop_rx) = watch::channel(false);
        let (release, release_rx) = watch::channel(false);
        let (finished_tx, finished) = mpsc::channel(listeners.sockets.len());
        let mut threads = Vec::with_capacity(listeners.sockets.len());
        for (number, socket) in listeners.sockets.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (router, stop, release, finished) =
                (router.clone(), stop_rx.clone(), release_rx.clone(), finished_tx.clone());
            let thread = std::thread::Builder::new().name(format!("marga-http-{number}")).spawn(move || {
                runtime.block_on(async move {
                    // Ends with the runtime, after the connections.
                    tokio::spawn(anchor_timers(timer_anchor));
                    let result = serve(socket, router, stop).await;
                    let _ = finished.send(result).await;
                    signalled(release).await;
                });
            })?;
            threads.push(thread);
        }
        Ok(Serving { threads, stop, release, finished })
    }

    /// Waits until `shutdown` resolves or a serving thread stops on its own (an error), then
    /// stops accepting everywhere and waits for open connections to finish.
    pub async fn drain(&mut self, shutdown: impl std::future::Future<Output = ()>) -> std::io::Result<()> {
        let mut outcome = Ok(());
        let mut finished = 0;
        tokio::select! {
            () = shutdown => {}
            result = self.finished.recv() => if let Some(result) = result {
                finished += 1;
                outcome = result;
            },
        }
        let _ = self.stop.send(true);
        while finished < self.threads.len() {
            let Some(result) = self.finished.recv().await else { break };
            finished += 1;
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome
    }

    /// Ends the runtimes (after [`Serving::drain`] and the writers' flush) and joins the threads.
    pub async fn end(self) {
        let _ = self.release.send(true);
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::error!("a serving thread panicked");
                }
            }
        });
        if joined.await.is_err() {
            tracing::error!("could not join the serving threads");
        }
    }
}

/// Serves `router` on `socket` until `stop` is signalled, then lets open connections finish.
async fn serve(socket: std::net::TcpListener, router: axum::Router, stop: watch::Receiver<bool>) -> std::io::Result<()> {
    let listener = TcpListener::from_std(socket)?.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service).with_graceful_shutdown(signalled(stop)).await
}

/// The period of a serving thread's timer anchor: at most half the first-token timeout (the
/// timer every request sets), between 1 and 30 s. Rarer, shorter timers (a new upstream
/// connection's connect timeout) may still interrupt the sleep: two system calls, no more.
pub fn timer_anchor_period(first_token_timeout: Duration) -> Duration {
    (first_token_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Keeps a timer due within `period` on this thread's timer wheel, for as long as the runtime
/// runs. Tokio's timer interrupts its own sleep (an eventfd `write`, then one more
/// `epoll_wait`) whenever a timer is set earlier than the earliest one it is sleeping towards,
/// or when it sleeps with none: on a thread whose previous requests are done, that was every
/// request's first-token timeout, two system calls per request more than the work needs.
/// With a timer always due sooner than any request's first-token timeout, setting it never
/// interrupts the sleep; the anchor costs about three wake-ups per period (the timer wheel moving it down
/// its levels, and the firing).
async fn anchor_timers(period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Resolves once `flag` is true (or its sender is gone).
async fn signalled(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timer_anchor_is_due_before_any_first_token_timeout_within_bounds() {
        let anchor = |ms| timer_anchor_period(Duration::from_millis(ms));
        assert_eq!(anchor(60_000), Duration::from_secs(30));
        assert_eq!(anchor(600_000), Duration::from_secs(30));
        assert_eq!(anchor(10_000), Duration::from_secs(5));
        // Below 2 s the anchor would wake the thread too often; a request's timers may then
        // interrupt the sleep again, which costs two system calls, not correctness.
        assert_eq!(anchor(500), Duration::from_secs(1));
    }
}
