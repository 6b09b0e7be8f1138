//! A real Prometheus server (Debian's `prometheus`) scraping one mirror
//! every second, and `promtool`.
//!
//! The server gets an ephemeral port, a temp dir for its config and TSDB,
//! and a log file named after the test; it is killed when dropped. Queries
//! go through the HTTP API, the way Grafana asks.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::harness::http;
use crate::harness::process::Process;
use crate::harness::wait;
use crate::harness::workdir::{self, Scratch};

/// The scrape job's name, as `deploy/prometheus/prometheus.yml` and the
/// alert rules expect it.
pub const JOB: &str = "regmirror";

/// `promtool`, or an error telling how to install it. A missing tool fails
/// the test: a skipped check would read as a passing one.
pub fn promtool() -> Result<Command> {
    prometheus_tool("promtool")
}

/// A command for `name` (from Debian's `prometheus` package), or an install hint.
fn prometheus_tool(name: &str) -> Result<Command> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .map(Command::new)
        .with_context(|| format!("`{name}` is not on PATH: install it with `apt-get install -y prometheus`"))
}

/// A running Prometheus, killed on drop.
pub struct Prometheus {
    url: String,
    log: PathBuf,
    _process: Process,
    _dir: Scratch,
}

impl Prometheus {
    /// Starts a server that scrapes `/metrics` of the mirror at `target`
    /// (`127.0.0.1:PORT`) every second as job [`JOB`] and evaluates
    /// `rule_file` every second.
    pub fn start(target: &str, rule_file: &Path) -> Result<Prometheus> {
        let dir = Scratch::new("prometheus")?;
        std::fs::copy(rule_file, dir.join("alerts.yml")).with_context(|| format!("copying {}", rule_file.display()))?;
        std::fs::write(dir.join("prometheus.yml"), config(target))?;
        // Another process may take the port between our probe and
        // Prometheus' bind: try a few.
        let mut last_error = None;
        for _ in 0..3 {
            match Prometheus::launch(&dir) {
                Ok((url, log, process)) => return Ok(Prometheus { url, log, _process: process, _dir: dir }),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("three attempts were made"))
    }

    fn launch(dir: &Scratch) -> Result<(String, PathBuf, Process)> {
        let address = format!("127.0.0.1:{}", free_port()?);
        let name = workdir::test_scoped("prometheus");
        let log = workdir::log_file(&name)?;
        let mut command = prometheus_tool("prometheus")?;
        command
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.subdir("data")?.display()))
            .arg(format!("--web.listen-address={address}"));
        let mut process = Process::spawn_logged(&name, command, &log, &log)?;
        let url = format!("http://{address}");
        wait::poll("Prometheus to be ready", wait::STARTUP_TIMEOUT, || {
            if let Some(status) = process.exit_status()? {
                bail!("prometheus exited ({status}); its log {} ends with:\n{}", log.display(), wait::tail(&log, 20));
            }
            Ok(http::get(&format!("{url}/-/ready")).ok().filter(|r| r.status == 200).map(|_| ()))
        })?;
        Ok((url, log, process))
    }

    /// Its log, for error messages.
    pub fn log_tail(&self) -> String {
        format!("prometheus log {}:\n{}", self.log.display(), wait::tail(&self.log, 20))
    }

    /// The sample values of `expr` evaluated now (`/api/v1/query`); fails
    /// unless the status is `success`. A scalar result is one value.
    pub fn query(&self, expr: &str) -> Result<Vec<f64>> {
        let data = self.api(&format!("query?query={}", encode(expr)))?;
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .context("vector without result")?
                .iter()
                .map(|sample| value_of(&sample["value"]))
                .collect(),
            Some("scalar") => Ok(vec![value_of(&data["result"])?]),
            other => bail!("`{expr}` gave a {other:?} result, not a vector or scalar"),
        }
    }

    /// The value of a query that yields exactly one sample.
    pub fn query_one(&self, expr: &str) -> Result<f64> {
        let samples = self.query(expr)?;
        ensure!(samples.len() == 1, "`{expr}` gave {} samples instead of one: {samples:?}", samples.len());
        Ok(samples[0])
    }

    /// The values of `label` on series matching `selector`, as Grafana's
    /// `label_values(selector, label)` asks for them.
    pub fn label_values(&self, selector: &str, label: &str) -> Result<Vec<String>> {
        let data = self.api(&format!("label/{label}/values?match[]={}", encode(selector)))?;
        serde_json::from_value(data).context("label values are not strings")
    }

    /// The rule groups as `/api/v1/rules` reports them.
    pub fn rules(&self) -> Result<Value> {
        self.api("rules")
    }

    /// GETs `/api/v1/PATH` and returns `data`, failing unless `status` is `success`.
    fn api(&self, path: &str) -> Result<Value> {
        let url = format!("{}/api/v1/{path}", self.url);
        let response = http::get(&url)?;
        let body: Value = serde_json::from_str(&response.body)
            .with_context(|| format!("GET {url} answered {} with non-JSON: {}", response.status, response.body))?;
        ensure!(
            response.status == 200 && body["status"] == "success",
            "GET {url} answered {}: {} {}",
            response.status,
            body["errorType"],
            body["error"]
        );
        Ok(body["data"].clone())
    }
}

fn config(target: &str) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - alerts.yml\n\
         scrape_configs:\n  - job_name: {JOB}\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"{target}\"]\n"
    )
}

/// A port that was free a moment ago: bound on 127.0.0.1:0, then released.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("probing for a free port")?;
    Ok(listener.local_addr()?.port())
}

fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The number in a `[timestamp, "value"]` pair ("NaN" and "+Inf" included).
fn value_of(pair: &Value) -> Result<f64> {
    let text = pair[1].as_str().with_context(|| format!("no value in {pair}"))?;
    text.parse().with_context(|| format!("`{text}` is not a number"))
}

/// How long a scrape takes to show a change: a few scrape intervals, with
/// room for a loaded machine.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);
