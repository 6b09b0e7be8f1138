//! `deploy/kubernetes-replicas/`: three replicas over an object store, without an API server.
//! Every document is parsed and its cross-references resolved (selectors, the headless Service behind
//! `replicas_dns`, the Secret keys behind the credentials, the probes' port); the ConfigMap's
//! config is served by the real binary.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::documents_in;
use super::{
    Served, at, closed_port, config_facts, credential_env, one_object, read, replicated_config, selects, str_at, yaml,
};

const DIR: &str = "kubernetes-replicas";

/// Every document of every YAML file in the directory, with its file name.
fn documents() -> Result<Vec<(String, Value)>> {
    documents_in(DIR)
}

/// The one document of `kind` (named `name`, if given).
fn object(kind: &str, name: Option<&str>) -> Result<Value> {
    one_object(documents()?, kind, name)
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
    ensure!(object("Namespace", None)?["metadata"]["name"] == namespace.as_str(), "the Namespace is not {namespace}");
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
    let mount_path = |volume: &str| mounts.iter().find(|m| m["name"] == volume).and_then(|m| m["mountPath"].as_str());
    let config_path = format!("{}/{key}", mount_path(config_volume).context("the ConfigMap is not mounted")?);
    let args = at(container, "/args")?;
    ensure!(*args == serde_json::json!(["serve", "--config", &config_path]), "args {args} do not read {config_path}");

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
    let position = |name: &str| env.iter().position(|e| e["name"] == name).with_context(|| format!("no env {name}"));
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
    let mut services = documents()?.into_iter().map(|(_, d)| d).filter(|d| d["kind"] == "Service").collect::<Vec<_>>();
    services.sort_by_key(|s| s["metadata"]["name"].as_str().map(str::to_owned));
    ensure!(services.len() == 2, "{} Services", services.len());
    for service in &services {
        selects(at(service, "/spec/selector")?, pod_labels(&statefulset)?)?;
        for service_port in at(service, "/spec/ports")?.as_array().context("ports")? {
            ensure!(container_port(container, &service_port["targetPort"])? == port, "targetPort is not `listen`'s");
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
        ensure!(ports.iter().any(|p| p["name"] == endpoint["port"]), "the monitor scrapes port {}", endpoint["port"]);
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
    let served = Served::start_with_env("replicas-mirror", &args, &[("regmirror.toml", &config)], &env)?;
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
