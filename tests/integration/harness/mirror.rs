//! The mirror under test: this crate's `regmirror` binary, run as
//! `regmirror serve --listen 127.0.0.1:0 --cache-dir DIR --config FILE`.
//!
//! Each [`Mirror`] has its own cache dir and config file in a temp dir and
//! its own log file (stdout and stderr). The bound port is read from the
//! `listening addr=127.0.0.1:PORT` log line. When a mirror process goes away
//! it prints its log's path and tail; libtest shows that output only for
//! failing tests. [`Mirror::restart`] starts a new process on the same cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::http;
use super::metrics::Metrics;
use super::process::Process;
use super::wait;
use super::workdir::{self, Scratch};

/// How the mirror gets an upstream password.
#[derive(Clone, Debug)]
pub enum Secret {
    /// `password_env`: the variable is set in the mirror's environment only.
    Env { variable: String, value: String },
    /// `password_file`
    File(PathBuf),
}

/// One `[[upstreams]]` entry.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub name: String,
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Further settings of this upstream (`max_bandwidth`, ...), written as given.
    pub settings: Vec<(String, toml::Value)>,
}

/// The mirror's TOML config.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    pub tag_ttl: String,
    /// `max_cache_size`, when not the default.
    pub max_cache_size: Option<String>,
    /// Further top-level settings (TLS, access control, ...), written as given.
    pub settings: Vec<(String, toml::Value)>,
    pub upstreams: Vec<UpstreamConfig>,
    /// Extra environment variables of the mirror process (`REGMIRROR_LISTEN`, S3 keys...).
    pub env: Vec<(String, String)>,
}

impl MirrorConfig {
    /// `docker.io` (the default upstream) served from `url`, no credentials.
    pub fn docker_io(url: &str) -> MirrorConfig {
        MirrorConfig {
            tag_ttl: "5m".into(),
            max_cache_size: None,
            settings: Vec::new(),
            upstreams: vec![UpstreamConfig {
                name: "docker.io".into(),
                url: url.into(),
                username: None,
                password: None,
                settings: Vec::new(),
            }],
            env: Vec::new(),
        }
    }

    /// Adds a top-level setting, e.g. `("tls_cert", "/path".into())`.
    pub fn with_setting(mut self, key: &str, value: impl Into<toml::Value>) -> MirrorConfig {
        self.settings.push((key.into(), value.into()));
        self
    }

    /// Sets an environment variable of the mirror process.
    pub fn with_env(mut self, key: &str, value: &str) -> MirrorConfig {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Bounds the cache, e.g. `"8MiB"`.
    pub fn with_max_cache_size(mut self, size: &str) -> MirrorConfig {
        self.max_cache_size = Some(size.into());
        self
    }

    /// Adds credentials to the default upstream.
    pub fn with_credentials(mut self, username: &str, password: Secret) -> MirrorConfig {
        let default = &mut self.upstreams[0];
        default.username = Some(username.into());
        default.password = Some(password);
        self
    }

    pub fn to_toml(&self) -> Result<String> {
        let upstreams = self.upstreams.iter().map(|upstream| {
            let mut table = toml::Table::new();
            table.insert("name".into(), upstream.name.clone().into());
            table.insert("url".into(), upstream.url.clone().into());
            if let Some(username) = &upstream.username {
                table.insert("username".into(), username.clone().into());
            }
            match &upstream.password {
                Some(Secret::Env { variable, .. }) => {
                    table.insert("password_env".into(), variable.clone().into());
                }
                Some(Secret::File(path)) => {
                    let path = path.to_str().context("non-UTF-8 password file path")?;
                    table.insert("password_file".into(), path.into());
                }
                None => {}
            }
            for (key, value) in &upstream.settings {
                table.insert(key.clone(), value.clone());
            }
            Ok(toml::Value::Table(table))
        });
        let mut root = toml::Table::new();
        root.insert("tag_ttl".into(), self.tag_ttl.clone().into());
        if let Some(size) = &self.max_cache_size {
            root.insert("max_cache_size".into(), size.clone().into());
        }
        for (key, value) in &self.settings {
            root.insert(key.clone(), value.clone());
        }
        root.insert("upstreams".into(), toml::Value::Array(upstreams.collect::<Result<_>>()?));
        Ok(toml::to_string(&root)?)
    }

    fn environment(&self) -> impl Iterator<Item = (&str, &str)> {
        let secrets = self.upstreams.iter().filter_map(|upstream| match &upstream.password {
            Some(Secret::Env { variable, value }) => Some((variable.as_str(), value.as_str())),
            _ => None,
        });
        secrets.chain(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

/// A running mirror.
pub struct Mirror {
    name: String,
    config: MirrorConfig,
    dir: Scratch,
    /// `dir/cache`, or the directory given to [`Mirror::start_on_cache_dir`].
    cache_dir: PathBuf,
    instance: Instance,
}

/// One process of a mirror; a restart makes a new one.
struct Instance {
    process: Process,
    host: String,
    log: PathBuf,
}

impl Mirror {
    /// Starts a mirror named after the running test.
    pub fn start(config: MirrorConfig) -> Result<Mirror> {
        Mirror::start_named(&workdir::test_scoped("mirror"), config)
    }

    /// Starts a mirror whose files are named after `name`.
    pub fn start_named(name: &str, config: MirrorConfig) -> Result<Mirror> {
        let dir = Scratch::new(name)?;
        let cache_dir = dir.subdir("cache")?;
        Mirror::launch(name, config, dir, cache_dir)
    }

    /// Starts a mirror named after the running test on an existing cache directory (one
    /// filled by `regmirror import`, say) instead of a fresh one.
    pub fn start_on_cache_dir(config: MirrorConfig, cache_dir: &Path) -> Result<Mirror> {
        let name = workdir::test_scoped("mirror");
        let dir = Scratch::new(&name)?;
        Mirror::launch(&name, config, dir, cache_dir.to_owned())
    }

    fn launch(name: &str, config: MirrorConfig, dir: Scratch, cache_dir: PathBuf) -> Result<Mirror> {
        std::fs::write(dir.join("config.toml"), config.to_toml()?)?;
        let instance = Instance::launch(name, &config, &dir, &cache_dir)?;
        Ok(Mirror { name: name.into(), config, dir, cache_dir, instance })
    }

    /// Stops the mirror (SIGTERM) and starts it again on the same cache dir
    /// and config.
    pub fn restart(&mut self) -> Result<()> {
        self.instance.process.terminate(Duration::from_secs(10));
        self.instance = Instance::launch(&self.name, &self.config, &self.dir, &self.cache_dir)?;
        Ok(())
    }

    /// Kills the mirror with SIGKILL, as a crash or an OOM kill would, and starts it again on
    /// the same cache dir and config.
    pub fn crash_and_restart(&mut self) -> Result<()> {
        self.instance.process.kill();
        self.instance = Instance::launch(&self.name, &self.config, &self.dir, &self.cache_dir)?;
        Ok(())
    }

    /// The mirror's cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone()
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> &str {
        &self.instance.host
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// Its current log file.
    pub fn log_path(&self) -> &PathBuf {
        &self.instance.log
    }

    /// Everything the current process logged so far.
    pub fn log(&self) -> Result<String> {
        Ok(std::fs::read_to_string(&self.instance.log)?)
    }

    /// The raw `/metrics` text.
    pub fn metrics_text(&self) -> Result<String> {
        let response = http::get(&format!("{}/metrics", self.url()))?;
        if response.status != 200 {
            bail!("GET /metrics answered {}: {}", response.status, response.body);
        }
        Ok(response.body)
    }

    pub fn metrics(&self) -> Result<Metrics> {
        Metrics::parse(&self.metrics_text()?)
    }

    /// The sum of counter `name` over the samples matching `filter`.
    pub fn counter(&self, name: &str, filter: &[(&str, &str)]) -> Result<f64> {
        Ok(self.metrics()?.sum(name, filter))
    }
}

impl Instance {
    fn launch(name: &str, config: &MirrorConfig, dir: &Scratch, cache_dir: &Path) -> Result<Instance> {
        let log = workdir::log_file(name)?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_regmirror"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--cache-dir"])
            .arg(cache_dir)
            .arg("--config")
            .arg(dir.join("config.toml"))
            .envs(config.environment());
        let mut process = Process::spawn_logged(name, command, &log, &log)?;
        let line = wait::for_log_line(&mut process, &log, "listening addr=")
            .with_context(|| format!("mirror log: {}", log.display()))?;
        let host = listening_address(&line)
            .with_context(|| format!("no `addr=127.0.0.1:PORT` in the mirror's line `{line}`"))?;
        Ok(Instance { process, host, log })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        eprintln!(
            "--- mirror {} log: {} (last lines) ---\n{}\n---",
            self.process.name(),
            self.log.display(),
            wait::tail(&self.log, 40)
        );
    }
}

/// `127.0.0.1:PORT` from a `… listening addr=127.0.0.1:PORT …` line.
fn listening_address(line: &str) -> Option<String> {
    let after = line.split_once("addr=")?.1;
    let address: String =
        after.chars().skip_while(|c| *c == '"').take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
    address.contains(':').then_some(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_bound_address() {
        let line = "2026-11-26T00:00:00Z  INFO regmirror: listening addr=127.0.0.1:41234";
        assert_eq!(listening_address(line).as_deref(), Some("127.0.0.1:41234"));
        let quoted = "INFO listening addr=\"127.0.0.1:5\" x=1";
        assert_eq!(listening_address(quoted).as_deref(), Some("127.0.0.1:5"));
    }

    #[test]
    fn writes_toml_config() {
        let config = MirrorConfig::docker_io("http://127.0.0.1:5001")
            .with_credentials("pusher", Secret::Env { variable: "UPSTREAM_PASSWORD".into(), value: "hidden".into() });
        let parsed: toml::Table = config.to_toml().unwrap().parse().unwrap();
        assert_eq!(parsed["tag_ttl"].as_str(), Some("5m"));
        let upstream = &parsed["upstreams"][0];
        assert_eq!(upstream["name"].as_str(), Some("docker.io"));
        assert_eq!(upstream["url"].as_str(), Some("http://127.0.0.1:5001"));
        assert_eq!(upstream["username"].as_str(), Some("pusher"));
        assert_eq!(upstream["password_env"].as_str(), Some("UPSTREAM_PASSWORD"));
        assert!(!config.to_toml().unwrap().contains("hidden"));
    }
}
