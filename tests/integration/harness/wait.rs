//! Polling instead of sleeping.
//!
//! Daemons announce readiness in their logs and logs are written after the
//! fact, so tests wait by polling a condition with a short interval and a
//! generous limit. The limit only stops a hung test: no test asserts on how
//! long anything took.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::process::Process;

/// How long a daemon may take to report that it is ready.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

const INTERVAL: Duration = Duration::from_millis(20);

/// Calls `probe` until it returns `Some`, an error, or `timeout` passes.
pub fn poll<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(INTERVAL);
    }
}

/// Waits until a line containing `needle` appears in `log` and returns it,
/// failing early (with the log's tail) if `process` exits first.
pub fn for_log_line(process: &mut Process, log: &Path, needle: &str) -> Result<String> {
    let what = format!("`{needle}` in {}", log.display());
    poll(&what, STARTUP_TIMEOUT, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|line| line.contains(needle)) {
            return Ok(Some(line.to_owned()));
        }
        if let Some(status) = process.exit_status()? {
            bail!(
                "{} exited ({status}) before logging `{needle}`; its log {} ends with:\n{}",
                process.name(),
                log.display(),
                tail(log, 30),
            );
        }
        Ok(None)
    })
    .with_context(|| format!("starting {}", process.name()))
}

/// The last `lines` lines of a text file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
