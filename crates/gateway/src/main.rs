//! The `marga` binary: `marga serve` starts the gateway.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use marga_gateway::app::App;
use marga_gateway::auth::MasterKey;
use marga_gateway::config::{Config, LogFormat, Overrides};

/// jemalloc: the request path allocates many small, short-lived buffers (glibc's malloc spent
/// ~15% of the gateway's CPU on them under load). It measured 0.87–0.90× mimalloc's CPU per
/// chat request (BENCHMARKS.md, stop 22); we take the cause to be that its thread caches hand
/// out a block without reading it, where mimalloc loads the next free block from the one it
/// hands out, a cache miss on nearly every allocation when requests are far apart. Its
/// background threads (the `background_threads` feature) return freed memory to the system
/// after a decay of about 10 s, also while the gateway is idle.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "marga", version, about = "Marga: a self-hosted, OpenAI-compatible AI gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway.
    Serve(ServeArgs),
    /// Check a config file and print the providers and models it enables.
    CheckConfig(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "MARGA_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory for the embedded database [default: ./marga-data]
    #[arg(long, env = "MARGA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file (adds to and overrides the bundled catalog)
    #[arg(long, env = "MARGA_CONFIG")]
    config: Option<PathBuf>,
    /// Postgres URL shared by several instances [default: embedded SQLite in --data-dir]
    #[arg(long, env = "MARGA_DATABASE_URL")]
    database_url: Option<String>,
}

impl ServeArgs {
    fn load(self) -> Result<Config, String> {
        let overrides = Overrides {
            listen: self.listen,
            data_dir: self.data_dir,
            config_file: self.config,
            database_url: self.database_url,
        };
        Config::load(overrides).map_err(|e| format!("invalid configuration: {e}"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::CheckConfig(args) => check_config(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("marga: {message}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(args: ServeArgs) -> Result<(), String> {
    let config = args.load()?;
    let providers: Vec<&str> = config.providers.keys().map(String::as_str).collect();
    eprintln!("config ok: {} providers ({}), {} models", providers.len(), providers.join(", "), config.models.len());
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), String> {
    no_transparent_huge_pages();
    let config = args.load()?;
    let _log = marga_gateway::telemetry::init_logging(config.log.format);
    // Before the runtime: the exporter's HTTP client runs on a thread of its own.
    let otlp = marga_gateway::telemetry::otlp::init(&config.telemetry).map_err(|e| e.to_string())?;
    // Requests are served by the serving threads (`serving.rs`, a runtime per core); this
    // runtime runs the background tasks (writers, refreshers, the batch worker), which are
    // waiting on IO or timers nearly all the time: one worker thread is enough.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let result = runtime.block_on(async move {
        let master_key = std::env::var("MARGA_MASTER_KEY").ok();
        let models = config.models.len();
        let text_logs = config.log.format == LogFormat::Text;
        let app = App::build(config, master_key).await.map_err(|e| e.to_string())?;
        announce(&app, models, text_logs);
        app.run_until_stopped(shutdown_signal()).await.map_err(|e| format!("server error: {e}"))
    });
    drop(runtime);
    // After the request log and the ledger are flushed: the last spans.
    if let Some(otlp) = otlp {
        otlp.shutdown();
    }
    result
}

/// Opts the process out of transparent huge pages. Where they are on for all memory (the
/// system's `always`, or an allocator that asks for them: mimalloc did), every 2 MiB range
/// holding a few live blocks stays resident whole (measured with mimalloc: 43 MiB idle after
/// start with them, 25 without, and ≈ 17 MiB more after load). The heap of a gateway is small and its allocations
/// short-lived, so huge pages buy it nothing measurable (BENCHMARKS.md). Where the kernel
/// refuses, nothing changes.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("marga: transparent huge pages stay on ({e})");
    }
}

/// Says where the gateway listens and, on first start, shows the generated master key once
/// (on stderr, outside the log; the plain "listening" line only with text logs, so that JSON
/// logs stay one object per line).
fn announce(app: &App, models: usize, text_logs: bool) {
    tracing::info!(addr = %app.local_addr(), models, "marga is listening");
    match app.master_key() {
        MasterKey::Generated(key) => {
            eprintln!("\n  Generated master key (shown once; only its hash is stored):\n\n    {key}\n");
            eprintln!("  Set MARGA_MASTER_KEY to choose your own.\n");
        }
        MasterKey::FromEnvironment => tracing::info!("master key from MARGA_MASTER_KEY"),
        MasterKey::Stored => tracing::info!("master key: using the one generated on first start"),
    }
    if text_logs {
        eprintln!("marga listening on http://{}", app.local_addr());
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
