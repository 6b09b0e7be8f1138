//! `deploy/compose-garage.yaml` and `deploy/compose-garage/`: two replicas over a single-node
//! Garage. `docker-compose config` validates the file and resolves its variables; the
//! services' cross-references (the S3 endpoint, region and bucket, the replica list, the
//! credentials both sides read) are resolved against `garage.toml` and `regmirror.toml`;
//! `init-garage.sh` runs under busybox (the shell of its image) against a real Garage node
//! started with `garage.toml`, whose bucket its key then reads and writes over S3; the
//! replicas' config is served by the real binary.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Map, Value};

use super::check_mount;
use super::{
    Served, at, closed_port, config_facts, credential_env, deploy_dir, dockerfile, read, replicated_config, str_at,
    tool, yaml, yaml_documents,
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
            check_mount(name, &source, &target, declared)?;
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
    ensure!(bind_source(init, script)? == read("compose-garage/init-garage.sh")?, "garage-init runs another script");

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
        let (host, container) = port.as_str().and_then(|p| p.split_once(':')).context("a port not HOST:CONTAINER")?;
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
        let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
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
        Command::new(&binary).arg("-c").arg(&config_path).args(["layout", "show"]).env("GARAGE_RPC_SECRET", rpc_secret),
    )?;
    ensure!(layout.contains("Current cluster layout version: 1"), "the layout moved on: {layout}");

    let replace = |name: &str, value: String| {
        let mut env = init_env.clone();
        env.retain(|(n, _)| n != name);
        env.push((name.to_owned(), value));
        env
    };
    let (ok, printed) = run_init(&replace("S3_SECRET_ACCESS_KEY", "f".repeat(64)))?;
    ensure!(!ok && printed.contains("another secret"), "a known key ID with another secret was accepted: {printed}");
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
    let served = Served::start_with_env("garage-compose-mirror", &args, &[("regmirror.toml", &config)], &env)?;
    served.expect_ok("/healthz")?;
    served.expect_ok("/readyz")?;
    served.expect_ok("/metrics")
}
