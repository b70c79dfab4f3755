//! `mock-upstream` binary: serves the fake OpenAI / Anthropic / Gemini
//! upstreams out of process (benchmarks, SDK tests).
//!
//! Prints exactly one line, `listening on http://ADDR`, to stdout (flushed)
//! once the port is bound, then serves until Ctrl-C / SIGTERM. Steer it at
//! runtime with `POST /__mock/scenario`, `POST /__mock/reset` and
//! `GET /__mock/stats`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use mock_upstream::{MockUpstream, Scenario};

/// Fake OpenAI, Anthropic and Gemini upstreams with failure injection.
#[derive(Debug, Parser)]
#[command(name = "mock-upstream", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Default delay before response headers, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Default delay between stream events, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Tokio worker threads (1 = single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = if args.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .enable_all()
            .build()
    };
    let result = runtime.and_then(|rt| rt.block_on(run(&args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mock-upstream: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> std::io::Result<()> {
    let defaults = Scenario {
        delay_ms: args.latency_ms,
        chunk_delay_ms: args.chunk_delay_ms,
        ..Scenario::default()
    };
    let mock = MockUpstream::start_with(args.listen, defaults).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", mock.base_url())?;
        out.flush()?;
    }
    shutdown_signal().await;
    drop(mock);
    Ok(())
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
