//! The deployment files in `deploy/`, each read by the real tool that reads it in production
//! wherever one runs offline here, and every configuration in them started with the real
//! binary.
//!
//! A deployment file is read by nothing else in `cargo test`, and its mistakes (a key the
//! binary refuses, a probe on a path that answers 404, a selector that matches no pod, a mount
//! that hides the config) show only once deployed. No Docker engine, Kubernetes API server or
//! systemd PID 1 runs here, so:
//!
//! - [`dockerfile`]: hadolint is not packaged for Debian, so the Dockerfile's structure is
//!   checked (stages, base tags, non-root `USER`, `VOLUME`, `EXPOSE`, `HEALTHCHECK`), its `CMD`
//!   is run with the real binary and its `HEALTHCHECK` command against it.
//! - [`compose`]: `docker-compose config` validates `compose.yaml` against the Compose schema,
//!   `promtool check config` the Prometheus config it mounts; mounts, ports and service names
//!   are cross-checked, and the mirror's config is served.
//! - [`systemd`]: `systemd-analyze verify` and `systemd-analyze security` on the unit; its
//!   `ExecStart` command line is run with the example config.
//! - [`kubernetes`]: kubeconform is not packaged either, so every document is parsed, its
//!   required fields and cross-references (selectors, ports, volumes, the uid of the image)
//!   checked, and the ConfigMap's config served with the probes' paths requested.
//! - [`clients`]: the README shows `deploy/clients/` verbatim; the real-client tests pull with
//!   those files (see `harness::clients`), here also through containerd's ghcr.io snippet.
//! - [`kubernetes_replicas`]: the three-replica example's documents are cross-checked (the headless Service behind `replicas_dns`, the Secret keys
//!   behind the S3 credentials, `POD_IP` behind the advertised address) and its config served.
//! - [`compose_garage`]: `docker-compose config` on the two-replica Garage example, its
//!   services cross-checked against `garage.toml` and the replicas' config, `init-garage.sh`
//!   run against a real Garage node, and the replicas' config served.

mod clients;
mod compose;
mod compose_garage;
mod dockerfile;
mod kubernetes;
mod kubernetes_replicas;
mod systemd;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::harness::http;
use crate::harness::process::Process;
use crate::harness::wait;
use crate::harness::workdir::{self, Scratch};

/// `deploy/`
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// A file under `deploy/`.
fn read(relative: &str) -> Result<String> {
    let path = deploy_dir().join(relative);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Every document of a YAML text, as JSON values (YAML's keys here are all strings).
fn yaml_documents(text: &str) -> Result<Vec<Value>> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| Ok(serde::Deserialize::deserialize(document)?))
        .filter(|document: &Result<Value>| !matches!(document, Ok(Value::Null)))
        .collect()
}

/// The single YAML document in `deploy/<relative>`.
fn yaml(relative: &str) -> Result<Value> {
    let mut documents = yaml_documents(&read(relative)?).with_context(|| format!("parsing deploy/{relative}"))?;
    ensure!(documents.len() == 1, "deploy/{relative} holds {} YAML documents, not one", documents.len());
    Ok(documents.remove(0))
}

/// The value at a JSON pointer (`/spec/template/metadata/labels`), or an error naming it.
fn at<'a>(value: &'a Value, pointer: &str) -> Result<&'a Value> {
    value.pointer(pointer).with_context(|| format!("no {pointer} in {}", abbreviated(value)))
}

/// The string at a JSON pointer.
fn str_at<'a>(value: &'a Value, pointer: &str) -> Result<&'a str> {
    at(value, pointer)?.as_str().with_context(|| format!("{pointer} is not a string"))
}

fn abbreviated(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// A command for an external tool, or an error naming the Debian package to install: a
/// missing tool fails the test, since a skipped check would read as a passing one.
fn tool(name: &str, package: &str) -> Result<Command> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .map(Command::new)
        .with_context(|| format!("`{name}` is not on PATH: install it with `apt-get install -y {package}`"))
}

/// The real binary run with a command line from a deployment file.
///
/// `REGMIRROR_LISTEN` and `REGMIRROR_CACHE_DIR` override whatever the command line and config
/// say (the environment wins over both), so the arguments are used as shipped while the test
/// listens on an ephemeral loopback port and caches in a temp dir. A config the binary refuses
/// (an unknown key, a bad size) makes it exit before it logs that it listens.
struct Served {
    host: String,
    _process: Process,
    _dir: Scratch,
}

impl Served {
    /// Starts `regmirror ARGS…`; `files` are written into its temp dir first, and each
    /// `{dir}` in `args` becomes that dir's path.
    fn start(name: &str, args: &[&str], files: &[(&str, &str)]) -> Result<Served> {
        Served::start_with_env(name, args, files, &[])
    }

    /// [`Served::start`] with more environment: what a deployment sets for the process (a
    /// pod's `env`, a compose service's `environment`) and its config relies on, such as
    /// `REGMIRROR_CLUSTER_ADVERTISE` or the object store's credentials.
    fn start_with_env(name: &str, args: &[&str], files: &[(&str, &str)], env: &[(&str, String)]) -> Result<Served> {
        let dir = Scratch::new(name)?;
        for (file, contents) in files {
            std::fs::write(dir.join(file), contents)?;
        }
        let base = dir.path().to_str().context("non-UTF-8 temp dir")?;
        let log = workdir::log_file(&workdir::test_scoped(name))?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_regmirror"));
        command
            .args(args.iter().map(|arg| arg.replace("{dir}", base)))
            .envs(env.iter().map(|(key, value)| (key, value)))
            .env("REGMIRROR_LISTEN", "127.0.0.1:0")
            .env("REGMIRROR_CACHE_DIR", dir.join("cache"));
        let mut process = Process::spawn_logged(name, command, &log, &log)?;
        let line = wait::for_log_line(&mut process, &log, "listening addr=")
            .with_context(|| format!("regmirror {} did not start; log: {}", args.join(" "), log.display()))?;
        let host = listening_address(&line).with_context(|| format!("no address in `{line}`"))?;
        Ok(Served { host, _process: process, _dir: dir })
    }

    /// `127.0.0.1:PORT`
    fn host(&self) -> &str {
        &self.host
    }

    /// Fails unless `GET path` answers 200.
    fn expect_ok(&self, path: &str) -> Result<()> {
        let response = http::get(&format!("http://{}{path}", self.host))?;
        ensure!(response.status == 200, "GET {path} answered {}: {}", response.status, response.body);
        Ok(())
    }
}

/// `127.0.0.1:PORT` from a `… listening addr=127.0.0.1:PORT` log line.
fn listening_address(line: &str) -> Option<String> {
    let after = line.split_once("addr=")?.1.trim_start_matches('"');
    let address: String = after.chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
    address.contains(':').then_some(address)
}

/// The `listen` port and `cache_dir` of a regmirror config.
struct ConfigFacts {
    port: u16,
    cache_dir: String,
    max_cache_size: u64,
}

fn config_facts(toml_text: &str) -> Result<ConfigFacts> {
    let table: toml::Table = toml_text.parse().context("parsing a regmirror config")?;
    let text =
        |key: &str| table.get(key).and_then(toml::Value::as_str).with_context(|| format!("config without {key}"));
    let listen: std::net::SocketAddr = text("listen")?.parse()?;
    let max_cache_size = regmirror::config::parse_size(text("max_cache_size")?).map_err(anyhow::Error::msg)?;
    Ok(ConfigFacts { port: listen.port(), cache_dir: text("cache_dir")?.to_owned(), max_cache_size })
}

#[test]
fn reads_the_bound_address() {
    let line = "2026-11-26T00:00:00Z  INFO regmirror: listening addr=127.0.0.1:41234";
    assert_eq!(listening_address(line).as_deref(), Some("127.0.0.1:41234"));
}

#[test]
fn yaml_documents_skip_empty_ones() -> Result<()> {
    let documents = yaml_documents("---\na: 1\n---\n# only a comment\n---\nb: [x]\n")?;
    ensure!(documents == [serde_json::json!({"a": 1}), serde_json::json!({"b": ["x"]})], "{documents:?}");
    Ok(())
}

/// Every document of every YAML file in `deploy/<dir>/`, with its file name, by file name.
fn documents_in(dir: &str) -> Result<Vec<(String, Value)>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(deploy_dir().join(dir))? {
        let name = entry?.file_name().into_string().map_err(|name| anyhow::anyhow!("file name {name:?}"))?;
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            let text = read(&format!("{dir}/{name}"))?;
            let documents = yaml_documents(&text).with_context(|| format!("parsing {dir}/{name}"))?;
            all.extend(documents.into_iter().map(|document| (name.clone(), document)));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(all)
}

/// A compose service's mount is sound: a bind source (`./…`) exists under deploy/, a named
/// volume is declared, and the target is absolute.
fn check_mount(service: &str, source: &str, target: &str, declared: &serde_json::Map<String, Value>) -> Result<()> {
    match source.strip_prefix("./") {
        Some(relative) => {
            ensure!(deploy_dir().join(relative).exists(), "{service} mounts {source}, which does not exist")
        }
        None => ensure!(declared.contains_key(source), "{service} mounts volume {source}, not declared"),
    }
    ensure!(target.starts_with('/'), "{service} mounts at relative path {target}");
    Ok(())
}

/// The one document of `kind` among `documents` (named `name`, if given).
fn one_object(documents: Vec<(String, Value)>, kind: &str, name: Option<&str>) -> Result<Value> {
    let mut found: Vec<Value> = documents
        .into_iter()
        .map(|(_, document)| document)
        .filter(|document| document["kind"] == kind && name.is_none_or(|name| document["metadata"]["name"] == name))
        .collect();
    ensure!(found.len() == 1, "{} documents of kind {kind} named {name:?}", found.len());
    Ok(found.remove(0))
}

/// Every `key: value` of the selector `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> Result<()> {
    let selector = selector.as_object().context("a selector that is not a map")?;
    ensure!(!selector.is_empty(), "an empty selector selects everything");
    for (key, value) in selector {
        ensure!(labels.get(key) == Some(value), "selector {key}={value} does not match labels {labels}");
    }
    Ok(())
}

/// A loopback port nothing listens on (bound, then released): where a served replicated
/// config's object store and peers point, so that the test reaches nothing off this machine
/// and resolves no name.
fn closed_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The `[storage]` and `[cluster]` tables of a replicated regmirror config, checked for what
/// every such config needs: the S3 backend with an endpoint URL, a bucket and a valid
/// `shared_max_size`, and a cluster section that leaves `advertise` to each replica's
/// environment (one file serves every replica).
fn replicated_config(toml_text: &str) -> Result<(toml::Table, toml::Table)> {
    let table: toml::Table = toml_text.parse().context("parsing a regmirror config")?;
    let section = |name: &str| -> Result<toml::Table> {
        table.get(name).and_then(toml::Value::as_table).cloned().with_context(|| format!("no [{name}] section"))
    };
    let (storage, cluster) = (section("storage")?, section("cluster")?);
    let text = |key: &str| storage.get(key).and_then(toml::Value::as_str).with_context(|| format!("no storage.{key}"));
    ensure!(text("backend")? == "s3", "storage.backend is {:?}, not \"s3\"", text("backend")?);
    let endpoint = url::Url::parse(text("endpoint")?)?;
    ensure!(matches!(endpoint.scheme(), "http" | "https"), "storage.endpoint {endpoint}");
    ensure!(!text("bucket")?.is_empty(), "an empty storage.bucket");
    regmirror::config::parse_size(text("shared_max_size")?).map_err(anyhow::Error::msg)?;
    ensure!(!cluster.contains_key("advertise"), "cluster.advertise is per replica: set REGMIRROR_CLUSTER_ADVERTISE");
    Ok((storage, cluster))
}

/// The environment variable a `[storage]` credential is read from (`access_key_id` or
/// `secret_access_key`), with the binary's default.
fn credential_env(storage: &toml::Table, key: &str) -> Result<String> {
    ensure!(!storage.contains_key(&format!("{key}_file")), "storage.{key}_file: these deployments use _env");
    let default = if key == "access_key_id" { "AWS_ACCESS_KEY_ID" } else { "AWS_SECRET_ACCESS_KEY" };
    Ok(storage.get(&format!("{key}_env")).and_then(toml::Value::as_str).unwrap_or(default).to_owned())
}
