//! Command-line flags, the TOML file and `REGMIRROR_*` environment variables, merged into one
//! validated [`Config`].
//!
//! Precedence follows the contract: the file is the base, flags override it and the
//! environment overrides both (so a container's env can adjust a baked-in command line).
//! Everything is checked here, once; the rest of the crate trusts a `Config`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod cluster;

pub use cluster::{ClusterConfig, S3Config};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use url::Url;

/// A pull-through caching mirror for container registries.
#[derive(Debug, Parser)]
#[command(name = "regmirror", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the mirror over HTTP.
    Serve(ServeArgs),
    /// List what the cache holds: repositories, tags, digests, sizes, last use.
    Ls(CacheArgs),
    /// Re-hash every cached blob and manifest; move bad ones to quarantine/ (exit 1 if any).
    Verify(CacheArgs),
    /// Evict least recently used content until the cache fits its bound (offline).
    Gc(CommonArgs),
    /// Pull images into the cache ahead of time, through the same verified fill as a pull.
    Seed(SeedArgs),
    /// Write cached images to an OCI image layout tar (for `import` on another mirror).
    Export(ExportArgs),
    /// Add the images of an OCI image layout tar to the cache, all or nothing.
    Import(ImportArgs),
}

/// Where the cache is: the config file's `cache_dir`, or a directory given directly.
#[derive(Debug, Clone, Default, Args)]
pub struct CacheArgs {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory holding the cache.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// The cache and its bound.
#[derive(Debug, Clone, Default, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Upper bound of the cache, e.g. 50GiB.
    #[arg(long, value_name = "SIZE")]
    pub max_cache_size: Option<String>,
}

#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address to listen on, e.g. 0.0.0.0:5000.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// URL of the default upstream registry (replaces the first configured upstream's URL).
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
}

/// `regmirror seed`. Safe to run against the cache directory of a running mirror.
#[derive(Debug, Clone, Default, Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Seed this platform of multi-platform images, e.g. linux/arm64 or linux/arm/v7
    /// (repeatable; default: linux on this machine's architecture).
    #[arg(long = "platform", value_name = "OS/ARCH")]
    pub platforms: Vec<String>,
    /// Seed every platform of multi-platform images.
    #[arg(long, conflicts_with = "platforms")]
    pub all_platforms: bool,
    /// Read references from LIST, one per line (`#` comments and blank lines allowed; `-`
    /// for stdin).
    #[arg(long, value_name = "LIST")]
    pub file: Option<PathBuf>,
    /// How many blobs to download at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Images: alpine, alpine:3.20, ghcr.io/org/tool:v1, docker.io/library/alpine@sha256:...
    #[arg(value_name = "IMAGE", required_unless_present = "file")]
    pub images: Vec<String>,
}

/// `regmirror export`.
#[derive(Debug, Clone, Default, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub cache: CacheArgs,
    /// The tar file to write (replaced if it exists).
    #[arg(long, short = 'o', value_name = "FILE.tar")]
    pub output: PathBuf,
    /// Cached images to export (export never fetches: seed them first). Each is named in the
    /// archive by its full reference, e.g. docker.io/library/alpine:3.20, the NAME of skopeo's
    /// oci-archive:FILE.tar:NAME.
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<String>,
}

/// `regmirror import`. Safe to run against the cache directory of a running mirror.
#[derive(Debug, Clone, Default, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub cache: CacheArgs,
    /// An OCI image layout tar, as `regmirror export` writes.
    #[arg(value_name = "FILE.tar")]
    pub archive: PathBuf,
}

/// A config problem, reported in one line before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid { key: key.to_owned(), message: message.to_string() }
}

/// The config file as written: every field optional, unknown keys refused (a typo in a key
/// would otherwise silently do nothing).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    cache_dir: Option<PathBuf>,
    max_cache_size: Option<String>,
    tag_ttl: Option<String>,
    negative_ttl: Option<String>,
    offline: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    allow_cidrs: Vec<String>,
    htpasswd_file: Option<PathBuf>,
    max_connections: Option<usize>,
    #[serde(default)]
    pinned: Vec<String>,
    #[serde(default)]
    upstreams: Vec<FileUpstream>,
    storage: Option<cluster::FileStorage>,
    cluster: Option<cluster::FileCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    name: String,
    url: String,
    username: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    /// Refused with a clear message: secrets never live inline in the file.
    password: Option<toml::Value>,
    /// Added in front of every repository name sent upstream.
    repository_prefix: Option<String>,
    max_concurrent_fetches: Option<usize>,
    timeout: Option<String>,
    /// Bytes per second, e.g. "50MiB".
    max_bandwidth: Option<String>,
    /// A PEM file of extra CA certificates (private registries).
    ca_file: Option<PathBuf>,
    /// Skip TLS certificate verification (a last resort for lab registries).
    insecure: Option<bool>,
    /// Also serve this upstream under `/v2/<name>/...` for clients that cannot send `?ns=`.
    path_prefix: Option<bool>,
    /// Sent upstream as `?ns=` (for an upstream that is itself a mirror, e.g. regmirror).
    upstream_ns: Option<String>,
    /// This upstream's own `tag_ttl`.
    tag_ttl: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub cache_dir: PathBuf,
    pub max_cache_size: u64,
    pub tag_ttl: Duration,
    /// How long an upstream's "no such tag" is remembered, so a typo in a CI loop does not
    /// hammer the upstream.
    pub negative_ttl: Duration,
    /// Serve only from the cache; contact no upstream (air-gapped sites).
    pub offline: bool,
    /// Serve HTTPS with this certificate chain and key (PEM), reloaded when they change.
    pub tls: Option<TlsConfig>,
    /// Client networks allowed to use the mirror; empty: everyone.
    pub allow_cidrs: Vec<crate::access::Cidr>,
    /// Require HTTP Basic auth against this htpasswd file (bcrypt hashes).
    pub htpasswd_file: Option<PathBuf>,
    pub max_connections: usize,
    /// Images never evicted, e.g. `docker.io/library/alpine:3.20`.
    pub pinned: Vec<crate::image_ref::ImageRef>,
    /// Never empty; the first is the default for requests that name none.
    pub upstreams: Vec<UpstreamConfig>,
    /// The object store replicas share (`[storage] backend = "s3"`); `None`: local disk only.
    pub storage: Option<S3Config>,
    /// The replicas acting as one cache; `None`: a single mirror.
    pub cluster: Option<ClusterConfig>,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The registry host clients name, e.g. `docker.io`; containerd sends it as `?ns=`.
    pub name: String,
    pub url: Url,
    pub credentials: Option<Credentials>,
    pub repository_prefix: Option<String>,
    /// How many blob downloads may run against this upstream at once.
    pub max_concurrent_fetches: usize,
    /// How long an upstream may stay silent (connect, or between body chunks).
    pub timeout: Duration,
    /// A cap on blob bytes per second fetched from this upstream, shared by all fills.
    pub max_bandwidth: Option<u64>,
    pub ca_file: Option<PathBuf>,
    pub insecure: bool,
    pub path_prefix: bool,
    pub upstream_ns: Option<String>,
    /// Overrides the global `tag_ttl` for this upstream (e.g. shorter for a private registry
    /// whose tags move, longer for Docker Hub's pull limit).
    pub tag_ttl: Option<Duration>,
}

impl UpstreamConfig {
    /// Docker Hub keeps official images under `library/`; clients may omit it.
    pub fn is_docker_hub(&self) -> bool {
        self.name == "docker.io"
    }
}

/// Upstream credentials. The password is never held in the config: it is read from its source
/// each time it is needed, so a rotated `password_file` takes effect without a restart.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: PasswordSource,
}

#[derive(Debug, Clone)]
pub enum PasswordSource {
    Env(String),
    File(PathBuf),
}

impl Credentials {
    pub fn password(&self) -> std::io::Result<String> {
        self.password.read()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &self.password).finish()
    }
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
pub const DEFAULT_MAX_CACHE_SIZE: &str = "50GiB";
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(300);
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
const DEFAULT_MAX_CONCURRENT_FETCHES: usize = 64;
const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);

impl Config {
    /// Builds the config for `serve`.
    pub fn for_serve(args: &ServeArgs) -> Result<Config, ConfigError> {
        Self::build(&args.common, args.listen.as_deref(), args.upstream.as_deref(), &env_lookup)
    }

    /// Builds the config for an offline command, which has no listener or upstream flags.
    pub fn for_offline(args: &CommonArgs) -> Result<Config, ConfigError> {
        Self::build(args, None, None, &env_lookup)
    }

    /// Builds the config for a command that only needs to find the cache.
    pub fn for_cache(args: &CacheArgs) -> Result<Config, ConfigError> {
        Self::for_offline(&CommonArgs { cache: args.clone(), max_cache_size: None })
    }

    fn build(
        args: &CommonArgs,
        listen: Option<&str>,
        upstream: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = match &args.cache.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        // file < flag < environment
        let pick = |key: &str, file: Option<String>, flag: Option<String>| {
            env(&format!("REGMIRROR_{}", key.to_ascii_uppercase())).or(flag).or(file)
        };

        let listen =
            pick("listen", file.listen, listen.map(str::to_owned)).unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen.parse().map_err(|e| invalid("listen", format!("{listen:?}: {e}")))?;

        let cache_dir = pick(
            "cache_dir",
            file.cache_dir.map(|p| p.display().to_string()),
            args.cache.cache_dir.as_ref().map(|p| p.display().to_string()),
        )
        .map(PathBuf::from)
        .unwrap_or_else(default_cache_dir);

        let max_cache_size = pick("max_cache_size", file.max_cache_size, args.max_cache_size.clone())
            .unwrap_or_else(|| DEFAULT_MAX_CACHE_SIZE.to_owned());
        let max_cache_size = parse_size(&max_cache_size).map_err(|e| invalid("max_cache_size", e))?;

        let tag_ttl = match pick("tag_ttl", file.tag_ttl, None) {
            Some(s) => parse_duration(&s).map_err(|e| invalid("tag_ttl", e))?,
            None => DEFAULT_TAG_TTL,
        };

        let negative_ttl = match pick("negative_ttl", file.negative_ttl, None) {
            Some(s) => parse_duration(&s).map_err(|e| invalid("negative_ttl", e))?,
            None => DEFAULT_NEGATIVE_TTL,
        };
        let offline = match pick("offline", file.offline.map(|b| b.to_string()), None) {
            Some(s) => s.parse().map_err(|_| invalid("offline", format!("{s:?}: expected true or false")))?,
            None => false,
        };

        let tls_cert = pick("tls_cert", file.tls_cert.map(|p| p.display().to_string()), None);
        let tls_key = pick("tls_key", file.tls_key.map(|p| p.display().to_string()), None);
        let tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig { cert: cert.into(), key: key.into() }),
            (None, None) => None,
            _ => return Err(invalid("tls_cert", "tls_cert and tls_key go together")),
        };
        let allow_cidrs = match env("REGMIRROR_ALLOW_CIDRS") {
            Some(list) => list.split(',').map(str::to_owned).collect(),
            None => file.allow_cidrs,
        };
        let allow_cidrs = allow_cidrs
            .iter()
            .map(|c| c.trim().parse().map_err(|e| invalid("allow_cidrs", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let htpasswd_file =
            pick("htpasswd_file", file.htpasswd_file.map(|p| p.display().to_string()), None).map(PathBuf::from);
        let max_connections = match pick("max_connections", file.max_connections.map(|n| n.to_string()), None) {
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| invalid("max_connections", "expected a positive number"))?,
            None => DEFAULT_MAX_CONNECTIONS,
        };

        let mut upstreams = file.upstreams.into_iter().map(UpstreamConfig::from_file).collect::<Result<Vec<_>, _>>()?;
        if upstreams.is_empty() {
            upstreams.push(UpstreamConfig::docker_hub());
        }
        if let Some(url) = pick("upstream", None, upstream.map(str::to_owned)) {
            upstreams[0].url = parse_upstream_url("upstream", &url)?;
        }
        for (i, u) in upstreams.iter().enumerate() {
            if upstreams[..i].iter().any(|other| other.name == u.name) {
                return Err(invalid("upstreams", format!("name {:?} is configured twice", u.name)));
            }
        }

        let pinned = file
            .pinned
            .iter()
            .map(|image| crate::image_ref::ImageRef::parse(image, &upstreams[0].name).map_err(|e| invalid("pinned", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let storage = cluster::storage(file.storage, env)?;
        let cluster = cluster::cluster(file.cluster, env)?;
        Ok(Config {
            listen,
            cache_dir,
            max_cache_size,
            tag_ttl,
            negative_ttl,
            offline,
            tls,
            allow_cidrs,
            htpasswd_file,
            max_connections,
            pinned,
            upstreams,
            storage,
            cluster,
        })
    }
}

impl UpstreamConfig {
    fn docker_hub() -> Self {
        Self::new("docker.io", Url::parse("https://registry-1.docker.io").expect("constant URL"))
    }

    /// An upstream with default settings (no credentials, no caps).
    pub fn new(name: &str, url: Url) -> Self {
        UpstreamConfig {
            name: name.to_owned(),
            url,
            credentials: None,
            repository_prefix: None,
            max_concurrent_fetches: DEFAULT_MAX_CONCURRENT_FETCHES,
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
            max_bandwidth: None,
            ca_file: None,
            insecure: false,
            path_prefix: false,
            upstream_ns: None,
            tag_ttl: None,
        }
    }

    fn from_file(u: FileUpstream) -> Result<Self, ConfigError> {
        let key = format!("upstreams.{}", u.name);
        if !is_valid_upstream_name(&u.name) {
            return Err(invalid(&key, "name must be a registry host such as docker.io or localhost:5000"));
        }
        if u.password.is_some() {
            return Err(invalid(&key, "inline passwords are refused: use password_env or password_file"));
        }
        let password = match (u.password_env, u.password_file) {
            (Some(var), None) => Some(PasswordSource::Env(var)),
            (None, Some(path)) => Some(PasswordSource::File(path)),
            (None, None) => None,
            (Some(_), Some(_)) => return Err(invalid(&key, "set password_env or password_file, not both")),
        };
        let credentials = match (u.username, password) {
            (Some(username), Some(password)) => Some(Credentials { username, password }),
            (None, None) => None,
            _ => return Err(invalid(&key, "username needs a password_env or password_file, and vice versa")),
        };
        if let Some(prefix) = &u.repository_prefix {
            crate::reference::RepoName::parse(prefix).map_err(|e| invalid(&key, e))?;
        }
        let timeout = match u.timeout {
            Some(t) => parse_duration(&t).map_err(|e| invalid(&key, e))?,
            None => DEFAULT_UPSTREAM_TIMEOUT,
        };
        let max_bandwidth = match u.max_bandwidth {
            Some(b) => Some(parse_size(&b).map_err(|e| invalid(&key, e))?.max(1)),
            None => None,
        };
        if u.upstream_ns.as_deref().is_some_and(|ns| !is_valid_upstream_name(ns)) {
            return Err(invalid(&key, "upstream_ns must be a registry host"));
        }
        Ok(UpstreamConfig {
            url: parse_upstream_url(&key, &u.url)?,
            name: u.name,
            credentials,
            repository_prefix: u.repository_prefix,
            max_concurrent_fetches: u.max_concurrent_fetches.unwrap_or(DEFAULT_MAX_CONCURRENT_FETCHES).max(1),
            timeout,
            max_bandwidth,
            ca_file: u.ca_file,
            insecure: u.insecure.unwrap_or(false),
            path_prefix: u.path_prefix.unwrap_or(false),
            upstream_ns: u.upstream_ns,
            tag_ttl: u.tag_ttl.map(|t| parse_duration(&t)).transpose().map_err(|e| invalid(&key, e))?,
        })
    }
}

/// A registry host, optionally with a port: it becomes a directory name in the cache.
fn is_valid_upstream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && !name.contains("..")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:_".contains(&b))
}

fn parse_upstream_url(key: &str, s: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(s).map_err(|e| invalid(key, format!("{s:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(key, format!("{s:?}: must be an http:// or https:// URL")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(key, "credentials in the URL are refused: use username + password_env"));
    }
    Ok(url)
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.message().to_owned() })
}

fn env_lookup(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// `/var/lib/regmirror` for root (a system service), else the user's cache directory, so
/// `regmirror serve` works out of the box for anyone.
fn default_cache_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/regmirror");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("regmirror")
}

/// Parses `50GiB`, `512 MiB`, `10GB`, `1024`: binary units (KiB..TiB) and decimal ones (KB..TB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
    };
    let value: f64 = number.parse().map_err(|_| format!("{s:?}: not a size"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?}: out of range"));
    }
    Ok(bytes as u64)
}

/// Parses `5m`, `30s`, `1h 30m` (humantime's syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        assert_eq!(parse_size("50GiB"), Ok(50 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("-1GiB").is_err());
    }

    fn build(toml: &str, args: ServeArgs, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let mut common = args.common.clone();
        common.cache.config = Some(path);
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::build(&common, args.listen.as_deref(), args.upstream.as_deref(), &|k| env.get(k).cloned())
    }

    #[test]
    fn defaults_without_any_config() {
        let c = build("", ServeArgs::default(), &[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(c.max_cache_size, 50 << 30);
        assert_eq!(c.tag_ttl, Duration::from_secs(300));
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].name, "docker.io");
        assert_eq!(c.upstreams[0].url.as_str(), "https://registry-1.docker.io/");
    }

    #[test]
    fn file_then_flags_then_environment() {
        let toml = r#"
            listen = "127.0.0.1:1"
            max_cache_size = "1GiB"
            tag_ttl = "1m"
            [[upstreams]]
            name = "docker.io"
            url = "http://127.0.0.1:5001"
            [[upstreams]]
            name = "ghcr.io"
            url = "https://ghcr.io"
        "#;
        let c = build(toml, ServeArgs::default(), &[]).unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.tag_ttl, Duration::from_secs(60));
        assert_eq!(c.upstreams[1].name, "ghcr.io");

        let flags = ServeArgs {
            listen: Some("127.0.0.1:2".into()),
            upstream: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        };
        let c = build(toml, flags.clone(), &[]).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.upstreams[0].url.port(), Some(9));
        assert_eq!(c.upstreams[0].name, "docker.io");

        let c =
            build(toml, flags, &[("REGMIRROR_LISTEN", "127.0.0.1:3"), ("REGMIRROR_MAX_CACHE_SIZE", "2GiB")]).unwrap();
        assert_eq!(c.listen.port(), 3);
        assert_eq!(c.max_cache_size, 2 << 30);
    }

    #[test]
    fn secrets_are_never_inline() {
        let toml = r#"
            [[upstreams]]
            name = "docker.io"
            url = "https://registry-1.docker.io"
            username = "me"
            password = "hunter2"
        "#;
        let err = build(toml, ServeArgs::default(), &[]).unwrap_err().to_string();
        assert!(err.contains("inline passwords are refused"), "{err}");
        assert!(!err.contains("hunter2"));
    }

    #[test]
    fn bad_values_are_reported_with_their_key() {
        let cases = [
            ("tag_ttl = \"soon\"", "tag_ttl"),
            ("max_cache_size = \"lots\"", "max_cache_size"),
            ("listen = \"nowhere\"", "listen"),
            ("[[upstreams]]\nname = \"a/b\"\nurl = \"http://x\"", "upstreams.a/b"),
            ("[[upstreams]]\nname = \"x\"\nurl = \"ftp://x\"", "upstreams.x"),
            ("[[upstreams]]\nname = \"x\"\nurl = \"http://u:p@x\"", "upstreams.x"),
            ("unknown_key = 1", "unknown field"),
        ];
        for (toml, expected) in cases {
            let err = build(toml, ServeArgs::default(), &[]).unwrap_err().to_string();
            assert!(err.contains(expected), "{toml}: {err}");
        }
    }

    #[test]
    fn credentials_come_from_env_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("pw");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let toml = format!(
            "[[upstreams]]\nname = \"docker.io\"\nurl = \"https://r\"\nusername = \"me\"\npassword_file = {:?}\n",
            secret.display().to_string()
        );
        let c = build(&toml, ServeArgs::default(), &[]).unwrap();
        let creds = c.upstreams[0].credentials.as_ref().unwrap();
        assert_eq!(creds.password().unwrap(), "s3cret");
        std::fs::write(&secret, "rotated").unwrap();
        assert_eq!(creds.password().unwrap(), "rotated");
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
