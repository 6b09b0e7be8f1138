//! The upstream registry: CNCF distribution (`docker-registry serve`) on an
//! ephemeral 127.0.0.1 port, optionally behind token auth, and its access log.
//!
//! The access log is how tests prove what the mirror fetched: distribution
//! writes one combined-log-format line per request to stdout
//! (`"GET /v2/library/alpine/blobs/sha256:… HTTP/1.1" 200 1049238`), and
//! [`Upstream::requests_since`] returns the requests logged after a
//! [`LogMark`]. A line is written only after its response is finished, so
//! both marking and reading first *sync* the log: they send a uniquely tagged
//! request and wait for its line, by which time the lines of requests that
//! completed before it have been written too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use super::http;
use super::process::{self, Process};
use super::wait;
use super::workdir::{self, Scratch};

/// The `auth: token` section of a registry's config.
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub root_cert_bundle: PathBuf,
}

/// A running `docker-registry serve`, killed on drop.
pub struct Upstream {
    host: String,
    access_log: PathBuf,
    syncs: AtomicUsize,
    process: Process,
    _storage: Scratch,
}

/// A position in an upstream's access log.
pub struct LogMark(u64);

/// One line of the access log.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub status: u16,
}

impl Upstream {
    /// Starts a registry whose logs are named after `name` (see
    /// [`workdir::log_file`]).
    pub fn start(name: &str, auth: Option<&TokenAuth>) -> Result<Upstream> {
        let storage = Scratch::new(name)?;
        let config = storage.join("config.yml");
        std::fs::write(&config, config_yaml(&storage.join("data"), auth))?;
        let access_log = workdir::log_file(&format!("{name}.access"))?;
        let app_log = workdir::log_file(name)?;

        let mut command = process::tool("docker-registry")?;
        command.arg("serve").arg(&config);
        let mut process = Process::spawn_logged(name, command, &access_log, &app_log)?;
        let line = wait::for_log_line(&mut process, &app_log, "listening on ")?;
        let host = listening_address(&line).with_context(|| format!("no address in `{line}`"))?.to_owned();
        Ok(Upstream { host, access_log, syncs: AtomicUsize::new(0), process, _storage: storage })
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.host)
    }

    /// Marks the current end of the access log.
    pub fn mark(&self) -> Result<LogMark> {
        self.sync_access_log()?;
        Ok(LogMark(std::fs::metadata(&self.access_log)?.len()))
    }

    /// Every request the registry served after `mark`.
    pub fn requests_since(&self, mark: &LogMark) -> Result<Vec<Request>> {
        self.sync_access_log()?;
        let log = std::fs::read(&self.access_log)?;
        let since = log.get(mark.0 as usize..).unwrap_or_default();
        Ok(String::from_utf8_lossy(since)
            .lines()
            .filter(|line| !line.contains(SYNC_PARAMETER))
            .filter_map(parse_access_line)
            .collect())
    }

    /// How many requests after `mark` had `method` and a path matching
    /// `pattern`, where `*` stands for any run of characters.
    pub fn count_since(&self, mark: &LogMark, method: &str, pattern: &str) -> Result<usize> {
        Ok(self
            .requests_since(mark)?
            .iter()
            .filter(|request| request.method == method && glob_match(pattern, &request.path))
            .count())
    }

    /// How many blob GETs for `repository` the registry served after `mark`.
    pub fn blob_fetches_since(&self, mark: &LogMark, repository: &str) -> Result<usize> {
        self.count_since(mark, "GET", &format!("/v2/{repository}/blobs/*"))
    }

    /// Stops the registry (its storage goes with it).
    pub fn stop(mut self) {
        self.process.terminate(Duration::from_secs(5));
    }

    /// Sends a tagged request and waits until the log shows it.
    fn sync_access_log(&self) -> Result<()> {
        let n = self.syncs.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{SYNC_PARAMETER}={n} ");
        // Token-auth registries answer 401, which is logged all the same.
        http::get(&format!("{}/v2/?{SYNC_PARAMETER}={n}", self.url()))?;
        wait::poll("the upstream to log a sync request", wait::STARTUP_TIMEOUT, || {
            let log = std::fs::read_to_string(&self.access_log)?;
            Ok(log.contains(&tag).then_some(()))
        })
    }
}

const SYNC_PARAMETER: &str = "regmirror-test-sync";

fn config_yaml(data: &Path, auth: Option<&TokenAuth>) -> String {
    let mut yaml = format!(
        "version: 0.1\n\
         log:\n  level: info\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:0\n  secret: regmirror-integration-tests\n",
        data.display()
    );
    if let Some(auth) = auth {
        yaml += &format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            auth.realm,
            auth.service,
            auth.issuer,
            auth.root_cert_bundle.display()
        );
    }
    yaml
}

/// `127.0.0.1:PORT` from `… msg="listening on 127.0.0.1:PORT" …`.
fn listening_address(line: &str) -> Option<&str> {
    let after = line.split_once("listening on ")?.1;
    after.split(['"', ' ']).next()
}

/// Parses `127.0.0.1 - - [date] "GET /v2/x?y HTTP/1.1" 200 123 "" "agent"`.
fn parse_access_line(line: &str) -> Option<Request> {
    let mut quoted = line.splitn(3, '"');
    let request_line = quoted.nth(1)?;
    let status = quoted.next()?.split_whitespace().next()?.parse().ok()?;
    let mut parts = request_line.split(' ');
    let method = parts.next()?.to_owned();
    let uri = parts.next()?;
    let path = uri.split('?').next()?.to_owned();
    Some(Request { method, path, status })
}

/// Matches `text` against `pattern`, where `*` matches any run of characters.
fn glob_match(pattern: &str, text: &str) -> bool {
    let mut pieces = pattern.split('*');
    let first = pieces.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let pieces: Vec<&str> = pieces.collect();
    let Some((last, middle)) = pieces.split_last() else {
        return rest.is_empty();
    };
    for piece in middle {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_log_lines() {
        let line = r#"127.0.0.1 - - [26/Nov/2026:00:03:50 +0000] "GET /v2/library/alpine/blobs/sha256:05?ns=docker.io HTTP/1.1" 200 1049238 "" "containerd/1.6.20~ds1""#;
        assert_eq!(
            parse_access_line(line),
            Some(Request { method: "GET".into(), path: "/v2/library/alpine/blobs/sha256:05".into(), status: 200 })
        );
    }

    #[test]
    fn finds_the_listening_address() {
        let line = r#"time="x" level=info msg="listening on 127.0.0.1:40491" go.version=go1.19.8"#;
        assert_eq!(listening_address(line), Some("127.0.0.1:40491"));
    }

    #[test]
    fn globs_match_paths() {
        assert!(glob_match("/v2/a/blobs/*", "/v2/a/blobs/sha256:1"));
        assert!(!glob_match("/v2/a/blobs/*", "/v2/b/blobs/sha256:1"));
        assert!(glob_match("/v2/*/manifests/*", "/v2/library/a/manifests/3.20"));
        assert!(glob_match("/v2/", "/v2/"));
        assert!(!glob_match("/v2/", "/v2/x"));
        assert!(glob_match("*x*x", "axbx"));
        assert!(!glob_match("*xx*x", "axx"));
    }
}
