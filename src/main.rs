//! The `regmirror` command: parse flags, set up logging, run the chosen command. Errors end
//! the process with one line on stderr and a non-zero exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use regmirror::config::{CacheArgs, Cli, Command, CommonArgs, Config, LogFormat, ServeArgs};
use regmirror::maintenance;
use regmirror::mirror::Mirror;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return fail(anyhow::Error::new(error).context("cannot start the async runtime")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Ls(args) => ls(args).await,
            Command::Verify(args) => verify(args).await,
            Command::Gc(args) => gc(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(error),
    }
}

fn fail(error: anyhow::Error) -> ExitCode {
    eprintln!("regmirror: {error:#}");
    ExitCode::FAILURE
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::for_serve(&args)?;
    let listen = config.listen;
    let upstreams: Vec<String> = config.upstreams.iter().map(|u| format!("{}={}", u.name, u.url)).collect();
    let cache_dir = config.cache_dir.clone();
    let mirror = Mirror::open(config)?;
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(cache_dir = %cache_dir.display(), upstreams = ?upstreams, "cache ready");
    tracing::info!(%addr, "listening");
    regmirror::server::run(listener, mirror, shutdown_signal()).await;
    Ok(())
}

async fn ls(args: CacheArgs) -> anyhow::Result<()> {
    let config = Config::for_cache(&args)?;
    let store = maintenance::open_unbounded(&config.cache_dir)
        .with_context(|| format!("cannot open cache {}", config.cache_dir.display()))?;
    print!("{}", maintenance::render_list(&maintenance::list(&store).await?));
    Ok(())
}

async fn verify(args: CacheArgs) -> anyhow::Result<()> {
    let config = Config::for_cache(&args)?;
    let store = maintenance::open_unbounded(&config.cache_dir)
        .with_context(|| format!("cannot open cache {}", config.cache_dir.display()))?;
    let report = tokio::task::spawn_blocking(move || maintenance::verify(&store)).await??;
    println!(
        "verified {} files ({}): {} bad",
        report.checked,
        maintenance::human_size(report.bytes),
        report.quarantined.len()
    );
    for (key, path) in &report.quarantined {
        println!("quarantined {key:?} -> {}", path.display());
    }
    if !report.quarantined.is_empty() {
        anyhow::bail!("{} corrupt files moved to quarantine", report.quarantined.len());
    }
    Ok(())
}

async fn gc(args: CommonArgs) -> anyhow::Result<()> {
    let config = Config::for_offline(&args)?;
    let (dir, max) = (config.cache_dir.clone(), config.max_cache_size);
    let report = tokio::task::spawn_blocking(move || maintenance::gc(&dir, max)).await??;
    println!(
        "evicted {} files ({}); cache holds {} of {}",
        report.evicted_files,
        maintenance::human_size(report.evicted_bytes),
        maintenance::human_size(report.remaining_bytes),
        maintenance::human_size(max)
    );
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate.recv() => {},
    }
}
