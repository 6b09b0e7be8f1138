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
mod dockerfile;
mod kubernetes;
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
        let dir = Scratch::new(name)?;
        for (file, contents) in files {
            std::fs::write(dir.join(file), contents)?;
        }
        let base = dir.path().to_str().context("non-UTF-8 temp dir")?;
        let log = workdir::log_file(&workdir::test_scoped(name))?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_regmirror"));
        command
            .args(args.iter().map(|arg| arg.replace("{dir}", base)))
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

/// `Served::start` with more environment: what a deployment sets for the process (a pod's
/// `env`, a compose service's `environment`) and its config relies on, such as
/// `REGMIRROR_CLUSTER_ADVERTISE` or the object store's credentials.
fn serve_with_env(name: &str, args: &[&str], files: &[(&str, &str)], env: &[(&str, String)]) -> Result<Served> {
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

/// `deploy/kubernetes-replicas/`: three replicas over an object store, without an API server.
/// `kubectl kustomize` renders the kustomization (the real kustomize, offline); every document
/// is parsed and its cross-references resolved (selectors, the headless Service behind
/// `replicas_dns`, the Secret keys behind the credentials, the probes' port); the ConfigMap's
/// config is served by the real binary.
mod kubernetes_replicas {
    use std::collections::BTreeSet;

    use anyhow::{Context, Result, bail, ensure};
    use serde_json::Value;

    use super::{
        at, closed_port, config_facts, credential_env, deploy_dir, read, replicated_config, serve_with_env, str_at,
        yaml, yaml_documents,
    };

    const DIR: &str = "kubernetes-replicas";

    /// Every document of every YAML file in the directory, with its file name.
    fn documents() -> Result<Vec<(String, Value)>> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(deploy_dir().join(DIR))? {
            let name = entry?.file_name().into_string().map_err(|name| anyhow::anyhow!("file name {name:?}"))?;
            if name.ends_with(".yaml") || name.ends_with(".yml") {
                let text = read(&format!("{DIR}/{name}"))?;
                let documents = yaml_documents(&text).with_context(|| format!("parsing {DIR}/{name}"))?;
                all.extend(documents.into_iter().map(|document| (name.clone(), document)));
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    /// The one document of `kind` (named `name`, if given).
    fn object(kind: &str, name: Option<&str>) -> Result<Value> {
        let mut found: Vec<Value> = documents()?
            .into_iter()
            .map(|(_, document)| document)
            .filter(|document| document["kind"] == kind && name.is_none_or(|name| document["metadata"]["name"] == name))
            .collect();
        ensure!(found.len() == 1, "{} documents of kind {kind} named {name:?}", found.len());
        Ok(found.remove(0))
    }

    /// Every `key: value` of the selector is among `labels`.
    fn selects(selector: &Value, labels: &Value) -> Result<()> {
        let selector = selector.as_object().context("a selector that is not a map")?;
        ensure!(!selector.is_empty(), "an empty selector selects everything");
        for (key, value) in selector {
            ensure!(labels.get(key) == Some(value), "selector {key}={value} does not match labels {labels}");
        }
        Ok(())
    }

    /// `20Gi`: a Kubernetes quantity in bytes (binary suffixes, as claims use).
    fn quantity(text: &str) -> Result<u64> {
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        let shift = match suffix {
            "" => 0,
            "Ki" => 10,
            "Mi" => 20,
            "Gi" => 30,
            "Ti" => 40,
            _ => bail!("unsupported quantity {text:?}"),
        };
        Ok(number.parse::<u64>()? << shift)
    }

    fn statefulset() -> Result<Value> {
        object("StatefulSet", None)
    }

    fn pod_labels(statefulset: &Value) -> Result<&Value> {
        at(statefulset, "/spec/template/metadata/labels")
    }

    fn container(statefulset: &Value) -> Result<&Value> {
        let containers = at(statefulset, "/spec/template/spec/containers")?.as_array().context("containers")?;
        let [container] = &containers[..] else { bail!("{} containers", containers.len()) };
        Ok(container)
    }

    /// The `containerPort` of the container port named or numbered `port`.
    fn container_port(container: &Value, port: &Value) -> Result<u64> {
        let ports = at(container, "/ports")?.as_array().context("ports")?;
        ports
            .iter()
            .find(|p| p["name"] == *port || p["containerPort"] == *port)
            .and_then(|p| p["containerPort"].as_u64())
            .with_context(|| format!("the container has no port {port}"))
    }

    /// The ConfigMap's `regmirror.toml`.
    fn config_text() -> Result<String> {
        Ok(str_at(&object("ConfigMap", None)?, "/data/regmirror.toml")?.to_owned())
    }

    /// The namespace kustomize puts everything in.
    fn namespace() -> Result<String> {
        Ok(str_at(&object("Kustomization", None)?, "/namespace")?.to_owned())
    }

    #[test]
    fn replicas_every_document_is_a_named_kubernetes_object() -> Result<()> {
        let mut kinds = BTreeSet::new();
        for (file, document) in &documents()? {
            let api_version = str_at(document, "/apiVersion").with_context(|| format!("in {file}"))?;
            let kind = str_at(document, "/kind").with_context(|| format!("in {file}"))?;
            kinds.insert(kind.to_owned());
            if kind == "Kustomization" {
                ensure!(api_version.starts_with("kustomize.config.k8s.io/"), "{file}: {api_version}");
                continue;
            }
            let name = str_at(document, "/metadata/name").with_context(|| format!("{kind} in {file}"))?;
            ensure!(!name.is_empty(), "{kind} in {file} has an empty name");
            let expected_api = match kind {
                "Namespace" | "ConfigMap" | "Service" | "Secret" => "v1",
                "StatefulSet" => "apps/v1",
                "PodDisruptionBudget" => "policy/v1",
                "ServiceMonitor" => "monitoring.coreos.com/v1",
                other => bail!("{file}: unexpected kind {other}"),
            };
            ensure!(api_version == expected_api, "{kind} {name}: apiVersion {api_version}, not {expected_api}");
        }
        let expected = [
            "ConfigMap",
            "Kustomization",
            "Namespace",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "ServiceMonitor",
            "StatefulSet",
        ];
        ensure!(kinds == expected.map(str::to_owned).into(), "kinds {kinds:?}");
        Ok(())
    }

    /// `kubectl apply -k` applies every file but the example Secret (credentials are never
    /// applied from the repository), in the namespace the Namespace object creates.
    #[test]
    fn replicas_kustomization_lists_every_manifest_but_the_secret() -> Result<()> {
        let kustomization = object("Kustomization", None)?;
        let listed: BTreeSet<String> = at(&kustomization, "/resources")?
            .as_array()
            .context("resources is not a list")?
            .iter()
            .map(|r| r.as_str().map(str::to_owned).context("a resource that is not a path"))
            .collect::<Result<_>>()?;
        let files: BTreeSet<String> = documents()?
            .into_iter()
            .map(|(file, _)| file)
            .filter(|file| file != "kustomization.yaml" && file != "secret.example.yaml")
            .collect();
        ensure!(listed == files, "kustomization.yaml lists {listed:?}, the directory holds {files:?}");
        let namespace = namespace()?;
        ensure!(
            object("Namespace", None)?["metadata"]["name"] == namespace.as_str(),
            "the Namespace is not {namespace}"
        );
        let secret = object("Secret", None)?;
        ensure!(secret["metadata"]["namespace"] == namespace.as_str(), "secret.example.yaml is not in {namespace}");
        Ok(())
    }

    /// Three replicas, each as locked down as the single mirror of `deploy/kubernetes/`, spread
    /// over nodes, reading the config from the ConfigMap key they mount, with their local tier
    /// on the claim template at `cache_dir`, below the claim's size.
    #[test]
    fn replicas_statefulset_runs_three_locked_down_replicas() -> Result<()> {
        let statefulset = statefulset()?;
        let spec = at(&statefulset, "/spec")?;
        ensure!(spec["replicas"] == 3, "replicas: {}", spec["replicas"]);
        let labels = pod_labels(&statefulset)?;
        selects(at(spec, "/selector/matchLabels")?, labels)?;
        let headless = object("Service", Some("regmirror-peers"))?;
        ensure!(spec["serviceName"] == headless["metadata"]["name"], "serviceName is not the headless Service");

        let single = yaml("kubernetes/statefulset.yaml")?;
        let pod = at(spec, "/template/spec")?;
        for pointer in ["/securityContext", "/automountServiceAccountToken", "/terminationGracePeriodSeconds"] {
            ensure!(
                at(pod, pointer)? == at(&single, &format!("/spec/template/spec{pointer}"))?,
                "pod {pointer} differs from deploy/kubernetes/statefulset.yaml"
            );
        }
        let container = container(&statefulset)?;
        for pointer in ["/securityContext", "/resources", "/image"] {
            ensure!(
                at(container, pointer)? == at(&single, &format!("/spec/template/spec/containers/0{pointer}"))?,
                "container {pointer} differs from deploy/kubernetes/statefulset.yaml"
            );
        }
        for constraint in at(pod, "/topologySpreadConstraints")?.as_array().context("topologySpreadConstraints")? {
            selects(at(constraint, "/labelSelector/matchLabels")?, labels)?;
        }

        let configmap = object("ConfigMap", None)?;
        let data = configmap["data"].as_object().context("ConfigMap without data")?;
        let [(key, config)] = &data.iter().collect::<Vec<_>>()[..] else { bail!("the ConfigMap holds one file") };
        let facts = config_facts(config.as_str().context("ConfigMap data that is not text")?)?;
        let volumes = at(pod, "/volumes")?.as_array().context("volumes")?;
        let config_volume = volumes
            .iter()
            .find(|v| v["configMap"]["name"] == configmap["metadata"]["name"])
            .and_then(|v| v["name"].as_str())
            .context("no volume from the ConfigMap")?;
        let mounts = at(container, "/volumeMounts")?.as_array().context("volumeMounts")?;
        let mount_path =
            |volume: &str| mounts.iter().find(|m| m["name"] == volume).and_then(|m| m["mountPath"].as_str());
        let config_path = format!("{}/{key}", mount_path(config_volume).context("the ConfigMap is not mounted")?);
        let args = at(container, "/args")?;
        ensure!(
            *args == serde_json::json!(["serve", "--config", &config_path]),
            "args {args} do not read {config_path}"
        );

        let claim = at(spec, "/volumeClaimTemplates/0")?;
        let claim_name = str_at(claim, "/metadata/name")?;
        ensure!(mount_path(claim_name) == Some(facts.cache_dir.as_str()), "the claim is not mounted at cache_dir");
        let storage = quantity(str_at(claim, "/spec/resources/requests/storage")?)?;
        ensure!(facts.max_cache_size < storage, "max_cache_size {} does not fit the claim", facts.max_cache_size);
        Ok(())
    }

    /// Each replica advertises its own pod IP on the port it listens on (`POD_IP` from the
    /// downward API, defined before its use), and reads the object store's credentials from
    /// the variables the config names, which come from keys the example Secret has.
    #[test]
    fn replicas_advertise_their_pod_ip_and_read_credentials_from_the_secret() -> Result<()> {
        let statefulset = statefulset()?;
        let container = container(&statefulset)?;
        let env = at(container, "/env")?.as_array().context("env is not a list")?;
        let position =
            |name: &str| env.iter().position(|e| e["name"] == name).with_context(|| format!("no env {name}"));
        let pod_ip = &env[position("POD_IP")?];
        ensure!(at(pod_ip, "/valueFrom/fieldRef/fieldPath")? == "status.podIP", "POD_IP is not the pod's IP");
        ensure!(position("POD_IP")? < position("REGMIRROR_CLUSTER_ADVERTISE")?, "$(POD_IP) is used before it is set");
        let config = config_text()?;
        let port = config_facts(&config)?.port;
        ensure!(container_port(container, &"http".into())? == u64::from(port), "containerPort http is not `listen`'s");
        let advertise = str_at(&env[position("REGMIRROR_CLUSTER_ADVERTISE")?], "/value")?;
        ensure!(advertise == format!("http://$(POD_IP):{port}"), "advertise {advertise}");

        let secret = object("Secret", None)?;
        let secret_keys = secret["stringData"].as_object().or(secret["data"].as_object()).context("an empty Secret")?;
        let (storage, _) = replicated_config(&config)?;
        for key in ["access_key_id", "secret_access_key"] {
            let name = credential_env(&storage, key)?;
            let variable = &env[position(&name)?];
            ensure!(variable.get("value").is_none(), "{name} is written in the manifest");
            let reference = at(variable, "/valueFrom/secretKeyRef")?;
            ensure!(reference["name"] == secret["metadata"]["name"], "{name} reads Secret {}", reference["name"]);
            let secret_key = str_at(reference, "/key")?;
            ensure!(secret_keys.contains_key(secret_key), "{name} reads key {secret_key}, not in secret.example.yaml");
        }
        Ok(())
    }

    /// Liveness on `/healthz`, readiness on `/readyz`, both on the port the config listens on.
    #[test]
    fn replicas_probe_healthz_and_readyz_on_the_listening_port() -> Result<()> {
        let statefulset = statefulset()?;
        let container = container(&statefulset)?;
        let port = config_facts(&config_text()?)?.port;
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = at(container, &format!("/{probe}/httpGet"))?;
            ensure!(get["path"] == path, "{probe} requests {}, not {path}", get["path"]);
            ensure!(container_port(container, &get["port"])? == u64::from(port), "{probe} is not on `listen`'s port");
        }
        Ok(())
    }

    /// Both Services select the pods and reach the listening port; the peers Service is
    /// headless and lists pods that are not ready, and `replicas_dns` is its name in the
    /// kustomization's namespace with the port the pods listen on (its A records are pod IPs,
    /// so no Service port translates).
    #[test]
    fn replicas_services_select_the_pods_and_replicas_dns_names_the_headless_one() -> Result<()> {
        let statefulset = statefulset()?;
        let container = container(&statefulset)?;
        let port = u64::from(config_facts(&config_text()?)?.port);
        let mut services =
            documents()?.into_iter().map(|(_, d)| d).filter(|d| d["kind"] == "Service").collect::<Vec<_>>();
        services.sort_by_key(|s| s["metadata"]["name"].as_str().map(str::to_owned));
        ensure!(services.len() == 2, "{} Services", services.len());
        for service in &services {
            selects(at(service, "/spec/selector")?, pod_labels(&statefulset)?)?;
            for service_port in at(service, "/spec/ports")?.as_array().context("ports")? {
                ensure!(
                    container_port(container, &service_port["targetPort"])? == port,
                    "targetPort is not `listen`'s"
                );
            }
        }
        let headless = object("Service", Some("regmirror-peers"))?;
        ensure!(headless["spec"]["clusterIP"] == "None", "regmirror-peers is not headless");
        ensure!(headless["spec"]["publishNotReadyAddresses"] == true, "regmirror-peers hides replicas not ready");
        let client = object("Service", Some("regmirror"))?;
        ensure!(client["spec"]["clusterIP"] != "None", "the client Service is headless");

        let (_, cluster) = replicated_config(&config_text()?)?;
        let dns = cluster.get("replicas_dns").and_then(toml::Value::as_str).context("no cluster.replicas_dns")?;
        let (host, dns_port) = dns.rsplit_once(':').with_context(|| format!("replicas_dns {dns} has no port"))?;
        let expected = format!("{}.{}.svc.cluster.local", str_at(&headless, "/metadata/name")?, namespace()?);
        ensure!(host == expected, "replicas_dns names {host}, not the headless Service {expected}");
        ensure!(dns_port.parse::<u64>()? == port, "replicas_dns port {dns_port} is not the pods' {port}");
        Ok(())
    }

    /// The budget lets one replica go at a time; the ServiceMonitor scrapes each replica once
    /// (through the headless Service only, ready or not), as the job the alert rules expect.
    #[test]
    fn replicas_disruption_budget_and_monitor_cover_every_replica() -> Result<()> {
        let statefulset = statefulset()?;
        let budget = object("PodDisruptionBudget", None)?;
        selects(at(&budget, "/spec/selector/matchLabels")?, pod_labels(&statefulset)?)?;
        let replicas = statefulset["spec"]["replicas"].as_u64().context("replicas")?;
        let unavailable = match (budget["spec"]["maxUnavailable"].as_u64(), budget["spec"]["minAvailable"].as_u64()) {
            (Some(max), None) => max,
            (None, Some(min)) => replicas.saturating_sub(min),
            _ => bail!("set one of maxUnavailable and minAvailable, as a number"),
        };
        ensure!((1..replicas).contains(&unavailable), "the budget allows {unavailable} of {replicas} down");

        let monitor = object("ServiceMonitor", None)?;
        let selector = at(&monitor, "/spec/selector/matchLabels")?;
        let services = documents()?.into_iter().map(|(_, d)| d).filter(|d| d["kind"] == "Service").collect::<Vec<_>>();
        let scraped: Vec<&Value> =
            services.iter().filter(|s| selects(selector, &s["metadata"]["labels"]).is_ok()).collect();
        let [scraped] = &scraped[..] else { bail!("the ServiceMonitor selects {} Services, not one", scraped.len()) };
        ensure!(scraped["spec"]["publishNotReadyAddresses"] == true, "the monitor misses replicas not ready");
        let job = match monitor["spec"]["jobLabel"].as_str() {
            Some(label) => &scraped["metadata"]["labels"][label],
            None => &scraped["metadata"]["name"],
        };
        let expected_job = yaml("prometheus/prometheus.yml")?["scrape_configs"][0]["job_name"].clone();
        ensure!(*job == expected_job, "the job is {job}, the alert rules expect {expected_job}");
        let ports = at(scraped, "/spec/ports")?.as_array().context("ports")?;
        for endpoint in at(&monitor, "/spec/endpoints")?.as_array().context("endpoints")? {
            ensure!(
                ports.iter().any(|p| p["name"] == endpoint["port"]),
                "the monitor scrapes port {}",
                endpoint["port"]
            );
            ensure!(endpoint["path"] == "/metrics", "the monitor scrapes {}", endpoint["path"]);
        }
        Ok(())
    }

    /// The bucket rule the README tells to set: abort incomplete multipart uploads after a
    /// day, and expire nothing (the replicas evict by last use).
    #[test]
    fn replicas_lifecycle_rule_aborts_incomplete_uploads_after_a_day() -> Result<()> {
        let lifecycle: Value = serde_json::from_str(&read(&format!("{DIR}/lifecycle.json"))?)?;
        let rules = at(&lifecycle, "/Rules")?.as_array().context("Rules")?;
        let [rule] = &rules[..] else { bail!("{} rules", rules.len()) };
        ensure!(rule["Status"] == "Enabled", "the rule is not enabled");
        ensure!(at(rule, "/AbortIncompleteMultipartUpload/DaysAfterInitiation")? == 1, "not after one day");
        ensure!(rule.get("Expiration").is_none(), "an Expiration rule deletes hot blobs too");
        ensure!(rule["Filter"]["Prefix"].as_str().is_some_and(str::is_empty), "the rule covers part of the bucket");
        let readme = read(&format!("{DIR}/README.md"))?;
        for needed in [
            "s3api put-bucket-lifecycle-configuration",
            "--lifecycle-configuration file://deploy/kubernetes-replicas/lifecycle.json",
            "shared_max_size",
            "AbortIncompleteMultipartUpload",
            "Garage",
        ] {
            ensure!(readme.contains(needed), "README.md does not mention {needed}");
        }
        Ok(())
    }

    /// The ConfigMap's config, with the container's arguments and the pod's environment
    /// (advertise, credentials from the example Secret), started by the real binary: it serves
    /// the probes' and the monitor's paths while its object store and peers are unreachable
    /// (they are pointed at a closed loopback port, instead of cluster names).
    #[test]
    fn replicas_configmap_config_serves_the_probed_paths() -> Result<()> {
        let statefulset = statefulset()?;
        let container = container(&statefulset)?;
        let config = config_text()?;
        let args: Vec<&str> = at(container, "/args")?
            .as_array()
            .context("args")?
            .iter()
            .map(|a| a.as_str().context("a non-string argument"))
            .collect::<Result<_>>()?;
        let args: Vec<&str> =
            args.iter().map(|&a| if a.ends_with("/regmirror.toml") { "{dir}/regmirror.toml" } else { a }).collect();

        let secret = object("Secret", None)?;
        let (storage, _) = replicated_config(&config)?;
        let pod_env = at(container, "/env")?.as_array().context("env")?;
        let mut credentials = Vec::new();
        for key in ["access_key_id", "secret_access_key"] {
            let name = credential_env(&storage, key)?;
            let variable = pod_env.iter().find(|e| e["name"] == name.as_str()).context("no credential variable")?;
            let secret_key = str_at(variable, "/valueFrom/secretKeyRef/key")?;
            credentials.push((name, str_at(&secret, &format!("/stringData/{secret_key}"))?.to_owned()));
        }
        let nowhere = format!("127.0.0.1:{}", closed_port()?);
        let mut env: Vec<(&str, String)> = credentials.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        env.push(("REGMIRROR_CLUSTER_ADVERTISE", format!("http://127.0.0.1:{}", closed_port()?)));
        env.push(("REGMIRROR_CLUSTER_REPLICAS_DNS", nowhere.clone()));
        env.push(("REGMIRROR_STORAGE_ENDPOINT", format!("http://{nowhere}")));
        let served = serve_with_env("replicas-mirror", &args, &[("regmirror.toml", &config)], &env)?;
        let monitor = object("ServiceMonitor", None)?;
        for path in [
            str_at(container, "/livenessProbe/httpGet/path")?,
            str_at(container, "/readinessProbe/httpGet/path")?,
            str_at(&monitor, "/spec/endpoints/0/path")?,
        ] {
            served.expect_ok(path)?;
        }
        Ok(())
    }

    #[test]
    fn replicas_parse_quantities() -> Result<()> {
        ensure!(quantity("20Gi")? == 20 << 30);
        ensure!(quantity("7")? == 7);
        ensure!(quantity("1.5Gi").is_err());
        Ok(())
    }
}

/// `deploy/compose-garage.yaml` and `deploy/compose-garage/`: two replicas over a single-node
/// Garage. `docker-compose config` validates the file and resolves its variables; the
/// services' cross-references (the S3 endpoint, region and bucket, the replica list, the
/// credentials both sides read) are resolved against `garage.toml` and `regmirror.toml`;
/// `init-garage.sh` runs under busybox (the shell of its image) against a real Garage node
/// started with `garage.toml`, whose bucket its key then reads and writes over S3; the
/// replicas' config is served by the real binary.
mod compose_garage {
    use std::collections::BTreeSet;
    use std::process::Command;

    use anyhow::{Context, Result, bail, ensure};
    use serde_json::{Map, Value};

    use super::{
        at, closed_port, config_facts, credential_env, deploy_dir, dockerfile, read, replicated_config, serve_with_env,
        str_at, tool, yaml, yaml_documents,
    };
    use crate::harness::process::{Process, run, run_stdout, run_unchecked};
    use crate::harness::workdir::{self, Scratch};

    const FILE: &str = "compose-garage.yaml";
    const REPLICAS: [&str; 2] = ["regmirror-1", "regmirror-2"];

    fn compose() -> Result<Value> {
        yaml(FILE)
    }

    fn service<'a>(compose: &'a Value, name: &str) -> Result<&'a Value> {
        at(compose, &format!("/services/{name}"))
    }

    /// `(source, target, mode)` of every volume of a service; sources of bind mounts start
    /// with `./`.
    fn mounts(service: &Value) -> Result<Vec<(String, String, String)>> {
        let volumes = at(service, "/volumes")?.as_array().context("volumes is not a list")?;
        volumes
            .iter()
            .map(|volume| {
                let volume = volume.as_str().context("a volume in long syntax")?;
                let parts: Vec<&str> = volume.split(':').collect();
                match parts[..] {
                    [source, target] => Ok((source.to_owned(), target.to_owned(), "rw".to_owned())),
                    [source, target, mode] => Ok((source.to_owned(), target.to_owned(), mode.to_owned())),
                    _ => bail!("volume {volume:?} is not SOURCE:TARGET[:MODE]"),
                }
            })
            .collect()
    }

    /// The source mounted at `target`, and whether read-only.
    fn source_of(service: &Value, target: &str) -> Result<(String, bool)> {
        let found = mounts(service)?.into_iter().find(|(_, t, _)| t == target);
        let (source, _, mode) = found.with_context(|| format!("nothing is mounted at {target}"))?;
        Ok((source, mode == "ro"))
    }

    /// The text of the file bind-mounted at `target`, from its source under `deploy/`.
    fn bind_source(service: &Value, target: &str) -> Result<String> {
        let (source, _) = source_of(service, target)?;
        read(source.strip_prefix("./").with_context(|| format!("{target} is not a bind mount: {source}"))?)
    }

    fn environment(service: &Value) -> Result<&Map<String, Value>> {
        at(service, "/environment")?.as_object().context("environment is not a map")
    }

    fn env<'a>(service: &'a Value, name: &str) -> Result<&'a str> {
        environment(service)?.get(name).and_then(Value::as_str).with_context(|| format!("no environment {name}"))
    }

    /// `NAME` and `default` of a compose `${NAME:-default}`.
    fn variable(value: &str) -> Option<(&str, &str)> {
        value.strip_prefix("${")?.strip_suffix('}')?.split_once(":-")
    }

    /// A list of strings (`command`, `entrypoint`).
    fn strings<'a>(service: &'a Value, key: &str) -> Result<Vec<&'a str>> {
        at(service, &format!("/{key}"))?
            .as_array()
            .with_context(|| format!("{key} is not a list"))?
            .iter()
            .map(|arg| arg.as_str().context("a non-string argument"))
            .collect()
    }

    /// The `[section]` of a TOML text.
    fn section(text: &str, name: &str) -> Result<toml::Table> {
        let table: toml::Table = text.parse()?;
        table.get(name).and_then(toml::Value::as_table).cloned().with_context(|| format!("no [{name}]"))
    }

    fn port_of(address: &str) -> Result<u16> {
        Ok(address.rsplit_once(':').with_context(|| format!("{address} has no port"))?.1.parse()?)
    }

    /// The replicas' config, which both mount.
    fn replica_config(compose: &Value) -> Result<String> {
        let replica = service(compose, REPLICAS[0])?;
        let command = strings(replica, "command")?;
        let path = command.windows(2).find(|w| w[0] == "--config").map(|w| w[1]).context("no --config")?;
        bind_source(replica, path)
    }

    #[test]
    fn garage_compose_docker_compose_accepts_the_file() -> Result<()> {
        let file = deploy_dir().join(FILE);
        let mut command = tool("docker-compose", "docker-compose")?;
        for variable in ["S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "GARAGE_RPC_SECRET"] {
            command.env_remove(variable);
        }
        run(command.arg("--file").arg(&file).args(["config", "--quiet"]))?;
        Ok(())
    }

    /// The variables set when starting reach every service that reads them, as the same value:
    /// the key garage-init imports is the key the replicas sign with.
    #[test]
    fn garage_compose_hands_the_same_secrets_to_every_service() -> Result<()> {
        let values = [
            ("S3_ACCESS_KEY_ID", "GK0123456789abcdef01234567"),
            ("S3_SECRET_ACCESS_KEY", "5e"),
            ("GARAGE_RPC_SECRET", "4a"),
        ];
        let mut command = tool("docker-compose", "docker-compose")?;
        command.envs(values).arg("--file").arg(deploy_dir().join(FILE)).arg("config");
        let resolved = yaml_documents(&run_stdout(&mut command)?)?.remove(0);
        let expect = |service_name: &str, name: &str, value: &str| -> Result<()> {
            let got = env(service(&resolved, service_name)?, name)?;
            ensure!(got == value, "{service_name}: {name} is {got:?}, not {value:?}");
            Ok(())
        };
        let [(_, key_id), (_, secret), (_, rpc_secret)] = values;
        expect("garage", "GARAGE_RPC_SECRET", rpc_secret)?;
        expect("garage-init", "GARAGE_RPC_SECRET", rpc_secret)?;
        expect("garage-init", "S3_ACCESS_KEY_ID", key_id)?;
        expect("garage-init", "S3_SECRET_ACCESS_KEY", secret)?;
        let (storage, _) = replicated_config(&replica_config(&compose()?)?)?;
        for replica in REPLICAS {
            expect(replica, &credential_env(&storage, "access_key_id")?, key_id)?;
            expect(replica, &credential_env(&storage, "secret_access_key")?, secret)?;
        }

        // In the file itself, every secret is such a variable, with a placeholder default.
        let compose = compose()?;
        for (name, service) in at(&compose, "/services")?.as_object().context("services")? {
            for (key, value) in environment(service).cloned().unwrap_or_default() {
                if key.contains("SECRET") || key.contains("KEY_ID") {
                    let value = value.as_str().unwrap_or_default();
                    ensure!(variable(value).is_some(), "{name}: {key} is not a ${{VAR:-placeholder}}: {value}");
                }
            }
        }
        Ok(())
    }

    /// Every bind mount's source exists, every named volume is declared, the long-running
    /// services restart by themselves and the one-shot garage-init does not.
    #[test]
    fn garage_compose_mounts_exist_and_services_restart() -> Result<()> {
        let compose = compose()?;
        let services = at(&compose, "/services")?.as_object().context("services is not a map")?;
        let declared = at(&compose, "/volumes")?.as_object().context("volumes is not a map")?;
        for (name, service) in services {
            let restart = service["restart"].as_str();
            if name == "garage-init" {
                ensure!(restart == Some("no"), "the one-shot garage-init restarts: {restart:?}");
            } else {
                ensure!(matches!(restart, Some("unless-stopped" | "always")), "{name} has restart {restart:?}");
            }
            for (source, target, _) in mounts(service)? {
                match source.strip_prefix("./") {
                    Some(relative) => {
                        ensure!(deploy_dir().join(relative).exists(), "{name} mounts {source}, which does not exist")
                    }
                    None => ensure!(declared.contains_key(&source), "{name} mounts volume {source}, not declared"),
                }
                ensure!(target.starts_with('/'), "{name} mounts at relative path {target}");
            }
        }
        Ok(())
    }

    /// One Garage node (`dxflrs/garage:v2.5.0`, one copy of each object), its RPC secret from
    /// the environment; garage-init runs the mounted script with the same image's CLI, the same
    /// `garage.toml` and the node's metadata (read-only), once the node is healthy.
    #[test]
    fn garage_compose_runs_one_garage_node_and_initialises_it() -> Result<()> {
        let compose = compose()?;
        let garage = service(&compose, "garage")?;
        let image = str_at(garage, "/image")?;
        ensure!(image == "dxflrs/garage:v2.5.0", "garage runs {image}");
        let garage_toml = bind_source(garage, "/etc/garage.toml")?;
        let config: toml::Table = garage_toml.parse().context("parsing garage.toml")?;
        ensure!(config.get("replication_factor").and_then(toml::Value::as_integer) == Some(1), "replication_factor");
        ensure!(!config.contains_key("rpc_secret"), "garage.toml holds the RPC secret");
        ensure!(variable(env(garage, "GARAGE_RPC_SECRET")?).is_some(), "GARAGE_RPC_SECRET is not a variable");
        ensure!(strings(garage, "command")? == ["/garage", "server"], "garage does not run the server");
        let text = |key: &str| config.get(key).and_then(toml::Value::as_str).with_context(|| format!("no {key}"));
        let (meta_volume, _) = source_of(garage, text("metadata_dir")?)?;
        let (data_volume, _) = source_of(garage, text("data_dir")?)?;
        ensure!(!meta_volume.starts_with('.') && !data_volume.starts_with('.'), "Garage's state is in bind mounts");
        let (rpc_host, rpc_port) = text("rpc_public_addr")?.rsplit_once(':').context("rpc_public_addr")?;
        ensure!(rpc_host == "garage", "rpc_public_addr {rpc_host} is not the garage service");
        ensure!(rpc_port.parse::<u16>()? == port_of(text("rpc_bind_addr")?)?, "rpc ports differ");
        ensure!(at(garage, "/healthcheck/test")? == &serde_json::json!(["CMD", "/garage", "status"]), "healthcheck");

        let init = service(&compose, "garage-init")?;
        ensure!(env(init, "GARAGE_RPC_SECRET")? == env(garage, "GARAGE_RPC_SECRET")?, "RPC secrets differ");
        ensure!(bind_source(init, "/etc/garage.toml")? == garage_toml, "garage-init reads another garage.toml");
        let (init_meta, read_only) = source_of(init, text("metadata_dir")?)?;
        ensure!(init_meta == meta_volume && read_only, "garage-init does not read the node's metadata, read-only");
        ensure!(at(init, "/depends_on/garage/condition")? == "service_healthy", "garage-init does not wait");
        let entrypoint = strings(init, "entrypoint")?;
        let [shell, script] = entrypoint[..] else { bail!("entrypoint {entrypoint:?}") };
        ensure!(shell == "sh", "garage-init runs {shell}");
        ensure!(
            bind_source(init, script)? == read("compose-garage/init-garage.sh")?,
            "garage-init runs another script"
        );

        // Its image: the garage binary of the garage service's image, beside busybox's shell.
        let build = at(init, "/build")?;
        ensure!(at(build, "/args/GARAGE_IMAGE")? == image, "garage-init's CLI is not from {image}");
        let dockerfile_path = format!("{}/{}", str_at(build, "/context")?, str_at(build, "/dockerfile")?);
        let dockerfile = read(dockerfile_path.trim_start_matches("./"))?;
        ensure!(dockerfile.contains(&format!("ARG GARAGE_IMAGE={image}")), "the Dockerfile's default is not {image}");
        ensure!(dockerfile.contains("FROM ${GARAGE_IMAGE} AS garage"), "the Dockerfile does not start from Garage");
        ensure!(dockerfile.contains("COPY --from=garage /garage /usr/local/bin/garage"), "no garage on PATH");
        ensure!(dockerfile.contains("FROM busybox:"), "no shell in garage-init's image");
        Ok(())
    }

    /// The two replicas: built like compose.yaml's mirror, each publishing its own host port
    /// and keeping its own local tier; sharing one config whose `[storage]` is the garage
    /// service's bucket (endpoint, region, bucket, credentials as garage-init sets them up) and
    /// whose `[cluster]` lists exactly the addresses they advertise; started after garage-init.
    #[test]
    fn garage_compose_replicas_share_the_bucket_and_list_each_other() -> Result<()> {
        let compose = compose()?;
        let mirror = yaml("compose.yaml")?;
        let mirror = service(&mirror, "regmirror")?;
        let config = replica_config(&compose)?;
        let facts = config_facts(&config)?;
        let (storage, cluster) = replicated_config(&config)?;
        let mut healthcheck = vec!["CMD".to_owned()];
        healthcheck.extend(dockerfile::image_healthcheck()?);

        let mut host_ports = BTreeSet::new();
        let mut caches = BTreeSet::new();
        let mut advertised = BTreeSet::new();
        for name in REPLICAS {
            let replica = service(&compose, name)?;
            for pointer in ["/build", "/image", "/command", "/read_only", "/cap_drop", "/security_opt", "/tmpfs"] {
                ensure!(at(replica, pointer)? == at(mirror, pointer)?, "{name}: {pointer} differs from compose.yaml's");
            }
            ensure!(replica["healthcheck"]["test"] == serde_json::json!(healthcheck), "{name}: not the image's check");
            ensure!(bind_source(replica, "/etc/regmirror/regmirror.toml")? == config, "{name} reads another config");
            let (cache, _) = source_of(replica, &facts.cache_dir)?;
            ensure!(!cache.starts_with('.'), "{name}'s local tier is a bind mount");
            caches.insert(cache);
            let ports = at(replica, "/ports")?.as_array().context("ports")?;
            let [port] = &ports[..] else { bail!("{name} publishes {} ports", ports.len()) };
            let (host, container) =
                port.as_str().and_then(|p| p.split_once(':')).context("a port not HOST:CONTAINER")?;
            ensure!(container.parse::<u16>()? == facts.port, "{name} publishes another port than `listen`'s");
            host_ports.insert(host.parse::<u16>()?);
            let advertise = env(replica, "REGMIRROR_CLUSTER_ADVERTISE")?;
            ensure!(advertise == format!("http://{name}:{}", facts.port), "{name} advertises {advertise}");
            advertised.insert(advertise.to_owned());
            ensure!(at(replica, "/depends_on/garage-init/condition")? == "service_completed_successfully", "{name}");
        }
        ensure!(host_ports == [5001, 5002].into(), "host ports {host_ports:?}");
        ensure!(caches.len() == REPLICAS.len(), "the replicas share a local tier");
        let replicas: BTreeSet<String> = cluster
            .get("replicas")
            .and_then(toml::Value::as_array)
            .context("no cluster.replicas")?
            .iter()
            .map(|r| r.as_str().map(str::to_owned).context("a replica that is not a string"))
            .collect::<Result<_>>()?;
        ensure!(replicas == advertised, "cluster.replicas {replicas:?}, advertised {advertised:?}");

        let garage_toml = bind_source(service(&compose, "garage")?, "/etc/garage.toml")?;
        let s3_api = section(&garage_toml, "s3_api")?;
        let s3_text = |key: &str| s3_api.get(key).and_then(toml::Value::as_str).with_context(|| format!("no {key}"));
        let text = |key: &str| storage.get(key).and_then(toml::Value::as_str).with_context(|| format!("no {key}"));
        let endpoint = url::Url::parse(text("endpoint")?)?;
        ensure!(endpoint.host_str() == Some("garage"), "the endpoint {endpoint} is not the garage service");
        ensure!(endpoint.port() == Some(port_of(s3_text("api_bind_addr")?)?), "the endpoint is not the S3 API's port");
        ensure!(text("region")? == s3_text("s3_region")?, "region is not garage.toml's s3_region");
        ensure!(storage.get("path_style").and_then(toml::Value::as_bool) != Some(false), "Garage wants path_style");
        let init = service(&compose, "garage-init")?;
        ensure!(text("bucket")? == env(init, "GARAGE_BUCKET")?, "garage-init creates another bucket");
        Ok(())
    }

    /// The garage binary: on PATH, or where `cargo install` puts it (.ci/run installs it there).
    fn garage_binary() -> Result<std::path::PathBuf> {
        let cargo_bin = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".cargo")))
            .map(|cargo_home| cargo_home.join("bin"));
        let path = std::env::var_os("PATH");
        path.iter()
            .flat_map(std::env::split_paths)
            .chain(cargo_bin)
            .map(|dir| dir.join("garage"))
            .find(|candidate| candidate.is_file())
            .context(
                "garage not found: install it with `cargo install garage --version 2.5.0 --locked \
                 --no-default-features --features bundled-libs,sqlite` (see .ci/run)",
            )
    }

    /// `init-garage.sh`, as garage-init runs it (busybox's shell, garage-init's environment with
    /// its placeholders), against a real Garage node started with `garage.toml` as shipped but
    /// for its directories and addresses: the node gets its role, the bucket and the key, and
    /// the key then writes and reads the bucket over S3 as the replicas would (their config's
    /// region and bucket, path-style). A second run changes nothing; a known key ID with another
    /// secret, and a key ID of a shape Garage cannot import, are refused. The secret is never
    /// printed.
    #[test]
    fn garage_init_script_prepares_a_real_garage_node() -> Result<()> {
        let compose = compose()?;
        let garage = service(&compose, "garage")?;
        let init = service(&compose, "garage-init")?;
        let mut init_env = Vec::new();
        for (name, value) in environment(init)? {
            let value = value.as_str().context("a non-string environment value")?;
            init_env.push((name.clone(), variable(value).map_or(value, |(_, default)| default).to_owned()));
        }
        let get = |name: &str| {
            init_env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).with_context(|| format!("no {name}"))
        };
        let (key_id, secret) = (get("S3_ACCESS_KEY_ID")?, get("S3_SECRET_ACCESS_KEY")?);

        // garage.toml, moved to a temp dir and loopback ports; everything else as shipped.
        let dir = Scratch::new("compose-garage-node")?;
        let (rpc, s3) = (format!("127.0.0.1:{}", closed_port()?), format!("127.0.0.1:{}", closed_port()?));
        let mut config: toml::Table = bind_source(garage, "/etc/garage.toml")?.parse()?;
        config.insert("metadata_dir".into(), dir.join("meta").display().to_string().into());
        config.insert("data_dir".into(), dir.join("data").display().to_string().into());
        config.insert("rpc_bind_addr".into(), rpc.clone().into());
        config.insert("rpc_public_addr".into(), rpc.into());
        let s3_api = config.get_mut("s3_api").and_then(toml::Value::as_table_mut).context("no [s3_api]")?;
        s3_api.insert("api_bind_addr".into(), s3.clone().into());
        let config_path = dir.join("garage.toml");
        std::fs::write(&config_path, config.to_string())?;

        let binary = garage_binary()?;
        let rpc_secret = variable(env(garage, "GARAGE_RPC_SECRET")?).context("GARAGE_RPC_SECRET is no variable")?.1;
        let log = workdir::log_file(&workdir::test_scoped("compose-garage-node"))?;
        let mut server = Command::new(&binary);
        server.arg("-c").arg(&config_path).arg("server").env("RUST_LOG", "garage=info");
        server.env("GARAGE_RPC_SECRET", rpc_secret);
        let _server = Process::spawn_logged("garage", server, &log, &log)?;

        let cli = format!("{} -c {}", binary.display(), config_path.display());
        let script = deploy_dir().join("compose-garage/init-garage.sh");
        let run_init = |env: &[(String, String)]| -> Result<(bool, String)> {
            let mut command = tool("busybox", "busybox")?;
            command.arg("sh").arg(&script).env("GARAGE", &cli).envs(env.iter().map(|(k, v)| (k, v)));
            let output = run_unchecked(&mut command)?;
            let printed =
                format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
            ensure!(!printed.contains(&secret), "init-garage.sh printed the secret: {printed}");
            Ok((output.status.success(), printed))
        };
        let (ok, printed) = run_init(&init_env)?;
        ensure!(ok, "init-garage.sh failed: {printed}\nGarage's log: {}", log.display());
        for step in ["assigning node", "creating bucket", "importing key"] {
            ensure!(printed.contains(step), "the first run did no {step}: {printed}");
        }

        // The replicas' view: their region and bucket, path-style, signed with the key.
        let (storage, _) = replicated_config(&replica_config(&compose)?)?;
        let text = |key: &str| storage.get(key).and_then(toml::Value::as_str).with_context(|| format!("no {key}"));
        let url = format!("http://{s3}/{}/init-garage-check", text("bucket")?);
        let curl = |extra: &[&str]| -> Result<String> {
            let mut command = tool("curl", "curl")?;
            command
                .args(["-sS", "--fail-with-body", "--aws-sigv4"])
                .arg(format!("aws:amz:{}:s3", text("region")?))
                .arg("--user")
                .arg(format!("{key_id}:{secret}"))
                .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
                .args(extra)
                .arg(&url);
            run_stdout(&mut command)
        };
        curl(&["-X", "PUT", "--data-binary", "written by the key garage-init imported"])?;
        let read_back = curl(&[])?;
        ensure!(read_back == "written by the key garage-init imported", "read back {read_back:?}");

        let (ok, printed) = run_init(&init_env)?;
        ensure!(ok, "the second run failed: {printed}");
        for step in ["assigning", "creating", "importing"] {
            ensure!(!printed.contains(step), "the second run did some {step}: {printed}");
        }
        let layout = run_stdout(
            Command::new(&binary)
                .arg("-c")
                .arg(&config_path)
                .args(["layout", "show"])
                .env("GARAGE_RPC_SECRET", rpc_secret),
        )?;
        ensure!(layout.contains("Current cluster layout version: 1"), "the layout moved on: {layout}");

        let replace = |name: &str, value: String| {
            let mut env = init_env.clone();
            env.retain(|(n, _)| n != name);
            env.push((name.to_owned(), value));
            env
        };
        let (ok, printed) = run_init(&replace("S3_SECRET_ACCESS_KEY", "f".repeat(64)))?;
        ensure!(
            !ok && printed.contains("another secret"),
            "a known key ID with another secret was accepted: {printed}"
        );
        let (ok, printed) = run_init(&replace("S3_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE".to_owned()))?;
        ensure!(!ok && printed.contains("must be GK"), "a key ID Garage cannot import was accepted: {printed}");
        Ok(())
    }

    /// The replicas' config, with regmirror-1's command line and environment (its own address
    /// and the placeholder credentials), started by the real binary: it serves its health
    /// paths while Garage and the other replica are unreachable (pointed at a closed loopback
    /// port instead of the compose service names).
    #[test]
    fn garage_compose_replica_config_serves_its_health_paths() -> Result<()> {
        let compose = compose()?;
        let replica = service(&compose, REPLICAS[0])?;
        let config = replica_config(&compose)?;
        let command = strings(replica, "command")?;
        let args: Vec<&str> =
            command.iter().map(|&a| if a.ends_with("/regmirror.toml") { "{dir}/regmirror.toml" } else { a }).collect();
        let mut env: Vec<(&str, String)> = Vec::new();
        for (name, value) in environment(replica)? {
            let value = value.as_str().context("a non-string environment value")?;
            if name != "REGMIRROR_CLUSTER_ADVERTISE" {
                env.push((name.as_str(), variable(value).map_or(value, |(_, default)| default).to_owned()));
            }
        }
        let advertise = format!("http://127.0.0.1:{}", closed_port()?);
        let peer = format!("http://127.0.0.1:{}", closed_port()?);
        env.push(("REGMIRROR_CLUSTER_ADVERTISE", advertise.clone()));
        env.push(("REGMIRROR_CLUSTER_REPLICAS", format!("{advertise},{peer}")));
        env.push(("REGMIRROR_STORAGE_ENDPOINT", format!("http://127.0.0.1:{}", closed_port()?)));
        let served = serve_with_env("garage-compose-mirror", &args, &[("regmirror.toml", &config)], &env)?;
        served.expect_ok("/healthz")?;
        served.expect_ok("/readyz")?;
        served.expect_ok("/metrics")
    }
}
