//! `deploy/kubernetes/`, without an API server or a schema validator (kubeconform is not
//! packaged for Debian): every document is parsed and its required fields checked, the
//! references between documents resolved (selectors, ports, volumes, the ConfigMap key the
//! command reads), and the ConfigMap's config served by the real binary with the probes' and
//! the ServiceMonitor's paths requested from it.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::documents_in;
use super::{Served, at, config_facts, one_object, selects, str_at};

/// Every document of every YAML file in `deploy/kubernetes/`, with its file name.
fn documents() -> Result<Vec<(String, Value)>> {
    documents_in("kubernetes")
}

/// The one document of `kind`.
fn object(kind: &str) -> Result<Value> {
    one_object(documents()?, kind, None)
}

/// The pod's security context, for the Dockerfile's check of its `USER`.
#[derive(Debug)]
pub struct PodSecurity {
    pub run_as_user: u32,
    pub run_as_group: u32,
    pub fs_group: u32,
}

pub fn pod_security_context() -> Result<PodSecurity> {
    let statefulset = object("StatefulSet")?;
    let context = at(&statefulset, "/spec/template/spec/securityContext")?;
    let id = |key: &str| -> Result<u32> {
        Ok(at(context, &format!("/{key}"))?.as_u64().with_context(|| format!("{key} is not a number"))?.try_into()?)
    };
    Ok(PodSecurity { run_as_user: id("runAsUser")?, run_as_group: id("runAsGroup")?, fs_group: id("fsGroup")? })
}

/// `50Gi`, `512Mi`, `1G`: a Kubernetes quantity in bytes (the suffixes a size uses).
fn quantity(text: &str) -> Result<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => bail!("unsupported quantity {text:?}"),
    };
    Ok(number.parse::<u64>()? * multiplier)
}

#[test]
fn every_document_is_a_named_kubernetes_object() -> Result<()> {
    let documents = documents()?;
    let mut kinds = BTreeSet::new();
    for (file, document) in &documents {
        let api_version = str_at(document, "/apiVersion").with_context(|| format!("in {file}"))?;
        let kind = str_at(document, "/kind").with_context(|| format!("in {file}"))?;
        kinds.insert(kind);
        if kind == "Kustomization" {
            ensure!(api_version.starts_with("kustomize.config.k8s.io/"), "{file}: {api_version}");
            continue;
        }
        let name = str_at(document, "/metadata/name").with_context(|| format!("{kind} in {file}"))?;
        ensure!(!name.is_empty(), "{kind} in {file} has an empty name");
        let expected_api = match kind {
            "ConfigMap" | "Service" => "v1",
            "StatefulSet" => "apps/v1",
            "ServiceMonitor" | "PodMonitor" => "monitoring.coreos.com/v1",
            other => bail!("{file}: unexpected kind {other}"),
        };
        ensure!(api_version == expected_api, "{kind} {name}: apiVersion {api_version}, not {expected_api}");
    }
    let expected: BTreeSet<&str> = ["ConfigMap", "Kustomization", "Service", "ServiceMonitor", "StatefulSet"].into();
    ensure!(kinds == expected, "kinds {kinds:?}");
    Ok(())
}

/// `kubectl apply -k` applies exactly the other files.
#[test]
fn kustomization_lists_every_manifest() -> Result<()> {
    let kustomization = object("Kustomization")?;
    let listed: BTreeSet<String> = at(&kustomization, "/resources")?
        .as_array()
        .context("resources is not a list")?
        .iter()
        .map(|r| r.as_str().map(str::to_owned).context("a resource that is not a path"))
        .collect::<Result<_>>()?;
    let files: BTreeSet<String> =
        documents()?.into_iter().map(|(file, _)| file).filter(|file| file != "kustomization.yaml").collect();
    ensure!(listed == files, "kustomization.yaml lists {listed:?}, the directory holds {files:?}");
    Ok(())
}

/// The StatefulSet: one replica, its selector matching its pods, non-root with a read-only
/// root file system, bounded resources, probes on the contract's paths through a named
/// container port, the cache on the claim template at the config's `cache_dir`, and the
/// config read from the ConfigMap key it mounts.
#[test]
fn statefulset_runs_one_locked_down_mirror() -> Result<()> {
    let statefulset = object("StatefulSet")?;
    let configmap = object("ConfigMap")?;
    let service = object("Service")?;
    let spec = at(&statefulset, "/spec")?;
    ensure!(spec["replicas"] == 1, "replicas would not share one cache");
    ensure!(spec["serviceName"] == service["metadata"]["name"], "serviceName is not the Service");
    let labels = at(spec, "/template/metadata/labels")?;
    selects(at(spec, "/selector/matchLabels")?, labels)?;

    let pod = at(spec, "/template/spec")?;
    ensure!(pod["securityContext"]["runAsNonRoot"] == true, "runAsNonRoot is not set");
    let containers = at(pod, "/containers")?.as_array().context("containers")?;
    let [container] = &containers[..] else { bail!("{} containers", containers.len()) };
    let security = at(container, "/securityContext")?;
    ensure!(security["readOnlyRootFilesystem"] == true, "the root file system is writable");
    ensure!(security["allowPrivilegeEscalation"] == false, "privilege escalation is allowed");
    ensure!(security["capabilities"]["drop"] == serde_json::json!(["ALL"]), "capabilities are not all dropped");
    for pointer in ["/resources/requests/cpu", "/resources/requests/memory", "/resources/limits/memory"] {
        at(container, pointer)?;
    }

    let ports = at(container, "/ports")?.as_array().context("ports")?;
    let port_named = |name: &str| ports.iter().find(|p| p["name"] == name).and_then(|p| p["containerPort"].as_u64());
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = at(container, &format!("/{probe}/httpGet"))?;
        ensure!(get["path"] == path, "{probe} requests {}, not {path}", get["path"]);
        let port = str_at(get, "/port")?;
        ensure!(port_named(port).is_some(), "{probe} uses port {port}, which the container does not name");
    }

    let config_name = str_at(&configmap, "/metadata/name")?;
    let config_key = configmap["data"].as_object().context("ConfigMap without data")?;
    let [(key, config)] = &config_key.iter().collect::<Vec<_>>()[..] else { bail!("the ConfigMap holds one file") };
    let facts = config_facts(config.as_str().context("ConfigMap data that is not text")?)?;
    ensure!(port_named("http") == Some(facts.port.into()), "containerPort http is not `listen`'s port");

    let volumes = at(pod, "/volumes")?.as_array().context("volumes")?;
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == config_name)
        .and_then(|v| v["name"].as_str())
        .context("no volume from the ConfigMap")?;
    let mounts = at(container, "/volumeMounts")?.as_array().context("volumeMounts")?;
    let mount_path = |volume: &str| mounts.iter().find(|m| m["name"] == volume).and_then(|m| m["mountPath"].as_str());
    let config_dir = mount_path(config_volume).context("the ConfigMap is not mounted")?;
    let args = at(container, "/args")?;
    let config_path = format!("{config_dir}/{key}");
    ensure!(
        *args == serde_json::json!(["serve", "--config", &config_path]),
        "args {args} do not read the mounted {config_path}"
    );

    let claim = at(spec, "/volumeClaimTemplates/0")?;
    let claim_name = str_at(claim, "/metadata/name")?;
    ensure!(mount_path(claim_name) == Some(facts.cache_dir.as_str()), "the claim is not mounted at cache_dir");
    let storage = quantity(str_at(claim, "/spec/resources/requests/storage")?)?;
    ensure!(
        facts.max_cache_size < storage,
        "max_cache_size {} does not fit the {storage}-byte claim",
        facts.max_cache_size
    );
    Ok(())
}

/// The Service selects the pods and reaches their named port; the ServiceMonitor selects the
/// Service and scrapes one of its ports.
#[test]
fn service_and_monitor_reach_the_pods() -> Result<()> {
    let statefulset = object("StatefulSet")?;
    let service = object("Service")?;
    let monitor = object("ServiceMonitor")?;
    selects(at(&service, "/spec/selector")?, at(&statefulset, "/spec/template/metadata/labels")?)?;
    let container_ports = at(&statefulset, "/spec/template/spec/containers/0/ports")?.as_array().context("ports")?;
    let service_ports = at(&service, "/spec/ports")?.as_array().context("ports")?;
    for port in service_ports {
        let target = &port["targetPort"];
        ensure!(
            container_ports.iter().any(|p| p["name"] == *target || p["containerPort"] == *target),
            "targetPort {target} is no container port"
        );
    }
    ensure!(service_ports.iter().any(|p| p["port"] == 5000), "the Service does not listen on 5000");

    selects(at(&monitor, "/spec/selector/matchLabels")?, at(&service, "/metadata/labels")?)?;
    for endpoint in at(&monitor, "/spec/endpoints")?.as_array().context("endpoints")? {
        let port = &endpoint["port"];
        ensure!(service_ports.iter().any(|p| p["name"] == *port), "the ServiceMonitor scrapes port {port}");
        ensure!(endpoint["path"] == "/metrics", "the ServiceMonitor scrapes {}", endpoint["path"]);
    }
    Ok(())
}

/// The ConfigMap's config, run with the container's arguments by the real binary, serves the
/// paths the probes and the ServiceMonitor request.
#[test]
fn configmap_config_serves_the_probed_paths() -> Result<()> {
    let statefulset = object("StatefulSet")?;
    let configmap = object("ConfigMap")?;
    let config = str_at(&configmap, "/data/regmirror.toml")?;
    let container = at(&statefulset, "/spec/template/spec/containers/0")?;
    let args: Vec<&str> = at(container, "/args")?
        .as_array()
        .context("args")?
        .iter()
        .map(|a| a.as_str().context("a non-string argument"))
        .collect::<Result<_>>()?;
    let args: Vec<&str> =
        args.iter().map(|&a| if a.ends_with("/regmirror.toml") { "{dir}/regmirror.toml" } else { a }).collect();
    let served = Served::start("kubernetes-mirror", &args, &[("regmirror.toml", config)])?;
    let monitor = object("ServiceMonitor")?;
    let probed = [
        str_at(container, "/livenessProbe/httpGet/path")?,
        str_at(container, "/readinessProbe/httpGet/path")?,
        str_at(&monitor, "/spec/endpoints/0/path")?,
    ];
    for path in probed {
        served.expect_ok(path)?;
    }
    Ok(())
}

#[test]
fn parses_quantities() -> Result<()> {
    ensure!(quantity("50Gi")? == 50 << 30);
    ensure!(quantity("1G")? == 1_000_000_000);
    ensure!(quantity("7")? == 7);
    ensure!(quantity("1.5Gi").is_err());
    Ok(())
}
