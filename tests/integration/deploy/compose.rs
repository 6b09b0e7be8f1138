//! `deploy/compose.yaml` and what it mounts: the Compose schema through `docker-compose
//! config`, the Prometheus config through `promtool check config`, the Grafana provisioning
//! against the mounts, and the mirror's config and command line served by the real binary.

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::check_mount;
use super::{Served, at, config_facts, deploy_dir, dockerfile, read, str_at, tool, yaml, yaml_documents};
use crate::harness::process::run;
use crate::harness::workdir::Scratch;

/// `compose.yaml`, parsed.
struct Compose(Value);

impl Compose {
    fn load() -> Result<Compose> {
        Ok(Compose(yaml("compose.yaml")?))
    }

    fn service(&self, name: &str) -> Result<&Value> {
        at(&self.0, &format!("/services/{name}"))
    }

    /// `(source, target)` of every volume of a service; sources of bind mounts start with `./`.
    fn mounts(&self, service: &str) -> Result<Vec<(String, String)>> {
        let volumes = at(self.service(service)?, "/volumes")?.as_array().context("volumes is not a list")?;
        volumes
            .iter()
            .map(|volume| {
                let volume = volume.as_str().context("a volume in long syntax")?;
                let mut parts = volume.split(':');
                let (Some(source), Some(target)) = (parts.next(), parts.next()) else {
                    anyhow::bail!("volume {volume:?} is not SOURCE:TARGET[:MODE]");
                };
                Ok((source.to_owned(), target.to_owned()))
            })
            .collect()
    }

    /// The source mounted at `target` in `service`.
    fn source_of(&self, service: &str, target: &str) -> Result<String> {
        let mounts = self.mounts(service)?;
        let found = mounts.into_iter().find(|(_, t)| t == target);
        found.map(|(source, _)| source).with_context(|| format!("{service} mounts nothing at {target}"))
    }

    /// The container side of a service's only published port.
    fn container_port(&self, service: &str) -> Result<u16> {
        let ports = at(self.service(service)?, "/ports")?.as_array().context("ports is not a list")?;
        ensure!(ports.len() == 1, "{service} publishes {} ports", ports.len());
        let port = ports[0].as_str().context("a port that is not \"HOST:CONTAINER\"")?;
        Ok(port.rsplit(':').next().unwrap_or(port).parse()?)
    }

    /// The text of a bind-mounted file, from its source under `deploy/`.
    fn bind_source(&self, service: &str, target: &str) -> Result<String> {
        let source = self.source_of(service, target)?;
        let relative = source.strip_prefix("./").with_context(|| format!("{target} is not a bind mount: {source}"))?;
        read(relative)
    }
}

#[test]
fn docker_compose_accepts_the_file() -> Result<()> {
    let compose = deploy_dir().join("compose.yaml");
    run(tool("docker-compose", "docker-compose")?.arg("--file").arg(compose).args(["config", "--quiet"]))?;
    Ok(())
}

/// Every bind mount's source exists, every named volume is declared, and every service
/// restarts by itself.
#[test]
fn compose_mounts_exist_and_services_restart() -> Result<()> {
    let compose = Compose::load()?;
    let services = at(&compose.0, "/services")?.as_object().context("services is not a map")?;
    let declared = at(&compose.0, "/volumes")?.as_object().context("volumes is not a map")?;
    for (name, service) in services {
        ensure!(
            matches!(service["restart"].as_str(), Some("unless-stopped" | "always" | "on-failure")),
            "{name} has no restart policy"
        );
        for (source, target) in compose.mounts(name)? {
            check_mount(name, &source, &target, declared)?;
        }
    }
    Ok(())
}

/// The mirror service: built from deploy/Dockerfile, its config mounted where its command
/// looks, its cache on a named volume, its healthcheck the image's; and that command line and
/// config, run by the real binary, serve.
#[test]
fn compose_mirror_serves_its_config_with_its_command() -> Result<()> {
    let compose = Compose::load()?;
    let mirror = compose.service("regmirror")?;
    let dockerfile = str_at(mirror, "/build/dockerfile")?;
    let context = deploy_dir().join(str_at(mirror, "/build/context")?);
    ensure!(context.join(dockerfile).is_file(), "build: {dockerfile} is not in the context {}", context.display());
    ensure!(mirror["read_only"] == true, "the mirror's root file system is writable");

    let command: Vec<&str> = at(mirror, "/command")?
        .as_array()
        .context("command is not a list")?
        .iter()
        .map(|arg| arg.as_str().context("a non-string argument"))
        .collect::<Result<_>>()?;
    let config_path = command.windows(2).find(|w| w[0] == "--config").map(|w| w[1]).context("no --config")?;
    let config = compose.bind_source("regmirror", config_path)?;
    let facts = config_facts(&config)?;
    let cache_volume = compose.source_of("regmirror", &facts.cache_dir)?;
    ensure!(!cache_volume.starts_with('.'), "the cache {} is a bind mount, not a named volume", facts.cache_dir);
    ensure!(compose.container_port("regmirror")? == facts.port, "the published port is not `listen`'s");

    let mut healthcheck = vec!["CMD".to_owned()];
    healthcheck.extend(dockerfile::image_healthcheck()?);
    ensure!(mirror["healthcheck"]["test"] == serde_json::json!(healthcheck), "the healthcheck is not the image's");

    let args: Vec<&str> =
        command.iter().map(|&arg| if arg == config_path { "{dir}/regmirror.toml" } else { arg }).collect();
    let served = Served::start("compose-mirror", &args, &[("regmirror.toml", &config)])?;
    served.expect_ok("/healthz")?;
    served.expect_ok("/readyz")
}

/// Prometheus gets a config `promtool` accepts, scraping the mirror service as the job the
/// alert rules expect, with the shipped rules mounted where the config names them.
#[test]
fn compose_prometheus_scrapes_the_mirror_with_the_shipped_rules() -> Result<()> {
    let compose = Compose::load()?;
    let prometheus = compose.service("prometheus")?;
    let flags = at(prometheus, "/command")?.as_array().context("command is not a list")?;
    let config_path = flags
        .iter()
        .find_map(|flag| flag.as_str()?.strip_prefix("--config.file="))
        .context("prometheus without --config.file")?;
    let config_text = compose.bind_source("prometheus", config_path)?;
    let config = yaml_documents(&config_text)?.remove(0);
    let config_dir = config_path.rsplit_once('/').map_or("", |(dir, _)| dir);

    let dir = Scratch::new("compose-prometheus")?;
    std::fs::write(dir.join("prometheus.yml"), &config_text)?;
    for rule_file in at(&config, "/rule_files")?.as_array().context("rule_files is not a list")? {
        let rule_file = rule_file.as_str().context("a rule file that is not a path")?;
        let rules = compose.bind_source("prometheus", &format!("{config_dir}/{rule_file}"))?;
        std::fs::write(dir.join(rule_file), rules)?;
    }
    run(tool("promtool", "prometheus")?.args(["check", "config"]).arg(dir.join("prometheus.yml")))?;

    // The same job as deploy/prometheus/prometheus.yml, aimed at the compose service.
    let example = yaml("prometheus/prometheus.yml")?;
    for pointer in ["/global", "/rule_files", "/scrape_configs/0/job_name", "/scrape_configs/0/metrics_path"] {
        ensure!(at(&config, pointer)? == at(&example, pointer)?, "{pointer} differs from prometheus/prometheus.yml");
    }
    let facts = config_facts(&compose.bind_source("regmirror", "/etc/regmirror/regmirror.toml")?)?;
    let targets = at(&config, "/scrape_configs/0/static_configs/0/targets")?;
    ensure!(*targets == serde_json::json!([format!("regmirror:{}", facts.port)]), "targets {targets}");
    Ok(())
}

/// Grafana's provisioning, as mounted: a Prometheus data source at the compose Prometheus, and
/// a dashboard provider reading the directory the dashboard is mounted into.
#[test]
fn compose_grafana_provisions_the_dashboard() -> Result<()> {
    let compose = Compose::load()?;
    ensure!(compose.source_of("grafana", "/etc/grafana/provisioning")? == "./grafana/provisioning");

    let datasources = yaml("grafana/provisioning/datasources/prometheus.yaml")?;
    let datasource = at(&datasources, "/datasources/0")?;
    ensure!(str_at(datasource, "/type")? == "prometheus");
    let url = str_at(datasource, "/url")?;
    let expected = format!("http://prometheus:{}", compose.container_port("prometheus")?);
    ensure!(url == expected, "the data source points at {url}, not {expected}");

    let (source, target) = compose
        .mounts("grafana")?
        .into_iter()
        .find(|(source, _)| source.ends_with(".json"))
        .context("grafana mounts no dashboard")?;
    ensure!(source == "./grafana/regmirror-dashboard.json", "grafana mounts {source}");
    let providers = yaml("grafana/provisioning/dashboards/regmirror.yaml")?;
    let path = str_at(&providers, "/providers/0/options/path")?;
    ensure!(target.rsplit_once('/').map(|(dir, _)| dir) == Some(path), "the provider reads {path}, not {target}");

    let dashboard: Value = serde_json::from_str(&read("grafana/regmirror-dashboard.json")?)?;
    let variables = at(&dashboard, "/templating/list")?.as_array().context("templating.list")?;
    ensure!(
        variables.iter().any(|v| v["type"] == "datasource" && v["name"] == "datasource" && v["query"] == "prometheus"),
        "the dashboard has no `datasource` variable, so the provisioned data source would not be picked"
    );
    Ok(())
}
