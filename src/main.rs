//! The `regmirror` command: parse flags, set up logging, run the chosen command. Errors end
//! the process with one line on stderr and a non-zero exit code.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use regmirror::access::Access;
use regmirror::archive;
use regmirror::archive::import::{ImportError, TagOutcome};
use regmirror::config::{
    CacheArgs, Cli, Command, CommonArgs, Config, ExportArgs, ImportArgs, LogFormat, SeedArgs, ServeArgs,
};
use regmirror::image_ref::ImageRef;
use regmirror::maintenance;
use regmirror::metrics::Metrics;
use regmirror::mirror::Mirror;
use regmirror::progress::Progress;
use regmirror::seed::{self, PlatformSpec, Platforms, SeedOptions, Seeded};
use regmirror::server::ServeOptions;
use regmirror::store::Store;
use regmirror::tls::Tls;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands an operator watches print their own progress: logs only for trouble.
    let quiet = matches!(cli.command, Command::Seed(_) | Command::Export(_) | Command::Import(_));
    init_logging(cli.log_format, if quiet { "warn" } else { "info" });
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
            Command::Seed(args) => seed(args).await,
            Command::Export(args) => export(args).await,
            Command::Import(args) => import(args).await,
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

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
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
    let options = serve_options(&config)?;
    let scheme = if options.tls.is_some() { "https" } else { "http" };
    let mirror = Mirror::open(config)?;
    mirror.spawn_background();
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(cache_dir = %cache_dir.display(), upstreams = ?upstreams, "cache ready");
    tracing::info!(%addr, scheme, "listening");
    regmirror::server::run(listener, mirror.clone(), options, shutdown_signal()).await;
    mirror.finish_uploads(std::time::Duration::from_secs(30)).await;
    Ok(())
}

/// TLS, access control and limits for the listener.
fn serve_options(config: &Config) -> anyhow::Result<ServeOptions> {
    let tls = match &config.tls {
        Some(t) => Some(Tls::load(&t.cert, &t.key)?),
        None => None,
    };
    let access = Access::new(config.allow_cidrs.clone(), config.htpasswd_file.clone())
        .with_context(|| "cannot read htpasswd_file")?;
    Ok(ServeOptions { tls, access: Arc::new(access), max_connections: config.max_connections })
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
    let pinned = config.pinned.clone();
    let report = tokio::task::spawn_blocking(move || maintenance::gc(&dir, max, &pinned)).await??;
    println!(
        "evicted {} files ({}); cache holds {} of {}",
        report.evicted_files,
        maintenance::human_size(report.evicted_bytes),
        maintenance::human_size(report.remaining_bytes),
        maintenance::human_size(max)
    );
    Ok(())
}

async fn seed(args: SeedArgs) -> anyhow::Result<()> {
    let config = Config::for_offline(&args.common)?;
    let default_registry = config.upstreams[0].name.clone();
    let mut images =
        args.images.iter().map(|arg| ImageRef::parse(arg, &default_registry)).collect::<Result<Vec<_>, _>>()?;
    let platforms = if args.all_platforms {
        Platforms::All
    } else if args.platforms.is_empty() {
        Platforms::Host
    } else {
        Platforms::Only(args.platforms.iter().map(|p| PlatformSpec::parse(p)).collect::<Result<_, _>>()?)
    };
    let progress = Progress::new(std::io::stderr().is_terminal());
    let mut bad_lines = 0;
    if let Some(list) = &args.file {
        let text = if list.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("cannot read the image list from stdin")?
        } else {
            std::fs::read_to_string(list).with_context(|| format!("cannot read image list {}", list.display()))?
        };
        for line in seed::parse_list(&text, &default_registry) {
            match line.image {
                Ok(image) => images.push(image),
                Err(error) => {
                    bad_lines += 1;
                    progress.failed(&format!("failed {} line {}: {error}", list.display(), line.line));
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    images.retain(|image| seen.insert(image.clone()));
    if images.is_empty() && bad_lines == 0 {
        anyhow::bail!("no images to seed");
    }

    let upstream_names: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
    let mirror = Mirror::open_shared(config)?;
    let options = SeedOptions { platforms, jobs: usize::from(args.jobs) };
    let outcomes = seed::seed_all(&mirror, images, &options, &progress).await;
    mirror.finish_uploads(std::time::Duration::from_secs(600)).await;
    let seeded: Vec<&Seeded> = outcomes.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    let failed = outcomes.len() - seeded.len();
    let downloaded: u64 =
        upstream_names.iter().map(|name| mirror.metrics().upstream_bytes.with_label_values(&[name]).get()).sum();
    println!(
        "seeded {} of {} images: {} blobs, {}; {} downloaded",
        seeded.len(),
        outcomes.len(),
        seeded.iter().map(|s| s.blobs).sum::<usize>(),
        maintenance::human_size(seeded.iter().map(|s| s.bytes).sum()),
        maintenance::human_size(downloaded),
    );
    match (failed, bad_lines) {
        (0, 0) => Ok(()),
        (failed, 0) => anyhow::bail!("{failed} of {} images failed to seed (reasons above)", outcomes.len()),
        (failed, bad) => anyhow::bail!(
            "{} in the image list, and {failed} of {} images failed to seed (reasons above)",
            count(bad, "invalid line"),
            outcomes.len()
        ),
    }
}

/// Opens a cache for `export` and `import`: unbounded (they must not evict what they read
/// or add) and leaving `tmp/` alone, since a mirror may be running on it.
fn open_cache_shared(config: &Config) -> anyhow::Result<Store> {
    Store::open_shared(&config.cache_dir, u64::MAX, Arc::new(Metrics::new()))
        .with_context(|| format!("cannot open cache {}", config.cache_dir.display()))
}

async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let config = Config::for_cache(&args.cache)?;
    let default_registry = &config.upstreams[0].name;
    let images = args.images.iter().map(|arg| ImageRef::parse(arg, default_registry)).collect::<Result<Vec<_>, _>>()?;
    let store = open_cache_shared(&config)?;
    let report = archive::export::export(&store, &images, &args.output)
        .await
        .with_context(|| format!("nothing written to {}", args.output.display()))?;
    for (name, digest) in &report.images {
        println!("exported {name} {digest}");
    }
    for (image, digest, platform) in &report.left_out {
        eprintln!("note: {image}: {platform} ({digest}) is not cached and was left out");
    }
    println!(
        "wrote {} ({}): {}, {}, {}",
        args.output.display(),
        maintenance::human_size(report.archive_bytes),
        count(report.images.len(), "image"),
        count(report.manifests, "manifest"),
        count(report.blobs, "blob")
    );
    Ok(())
}

async fn import(args: ImportArgs) -> anyhow::Result<()> {
    let config = Config::for_cache(&args.cache)?;
    let store = open_cache_shared(&config)?;
    let report = match archive::import::import(&store, &args.archive).await {
        Ok(report) => report,
        Err(error @ ImportError::Commit(_)) => {
            return Err(anyhow::Error::new(error).context(format!(
                "import of {} failed while committing (verified content may have been added; import again)",
                args.archive.display()
            )));
        }
        Err(error) => {
            return Err(anyhow::Error::new(error)
                .context(format!("nothing imported from {}: the cache is unchanged", args.archive.display())));
        }
    };
    for image in &report.images {
        println!("{}", image.line());
        if let Some(name) = &image.name
            && image.tag != TagOutcome::None
            && !config.upstreams.iter().any(|u| name.starts_with(&format!("{}/", u.name)))
        {
            eprintln!("note: {name}: no upstream of that name is configured here: add one to serve this tag");
        }
    }
    if report.children_absent > 0 {
        println!("{} platform manifests listed by indexes are not in the archive", report.children_absent);
    }
    if report.ignored_entries > 0 {
        println!("{} archive entries are not part of any image and were ignored", report.ignored_entries);
    }
    println!(
        "added {} and {} ({}); {} and {} were already cached",
        count(report.blobs_added, "blob"),
        count(report.manifests_added, "manifest"),
        maintenance::human_size(report.bytes_added),
        count(report.blobs_present, "blob"),
        count(report.manifests_present, "manifest")
    );
    if store.size() > config.max_cache_size {
        eprintln!(
            "note: the cache holds {}, over its max_cache_size of {}: a mirror on it evicts the least recently used",
            maintenance::human_size(store.size()),
            maintenance::human_size(config.max_cache_size)
        );
    }
    Ok(())
}

/// `1 blob`, `2 blobs`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
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
