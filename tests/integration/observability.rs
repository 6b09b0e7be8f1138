//! The monitoring that ships in `deploy/`: Prometheus alert rules and their
//! unit tests, an example Prometheus config, and a Grafana dashboard.
//!
//! A misspelt metric, a label that is not there or a broken PromQL
//! expression never raises an error in production: the panel just says
//! "No data" and the alert never fires. So these tests
//!
//! - run `promtool check rules`, `promtool test rules` and
//!   `promtool check config` on the files as shipped, and check that the
//!   rule unit tests have a firing and a silent case for every alert;
//! - check that the dashboard and the rules only name metrics of the
//!   contract (`CONTRACT.md`), and that every panel uses the dashboard's
//!   datasource variable;
//! - start a real Prometheus that scrapes a real mirror (the `regmirror`
//!   binary) every second while skopeo pulls an image through it, from the
//!   shared upstream registry behind a proxy that adds Docker Hub's
//!   `ratelimit-remaining` header. Prometheus must then show the hits,
//!   misses and bytes that the pulls imply, every dashboard query (with
//!   Grafana's variables substituted) must return data, the dashboard's
//!   variables must list the mirror, and every alert rule must evaluate
//!   without error.

mod dashboard;
mod prometheus_server;
mod rate_limited_upstream;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::harness::clients::PullClient;
use crate::harness::clients::skopeo::Skopeo;
use crate::harness::http;
use crate::harness::images::ARCHITECTURE;
use crate::harness::metrics::Metrics;
use crate::harness::mirror::{Mirror, MirrorConfig};
use crate::harness::process::run;
use crate::harness::shared;
use crate::harness::wait;
use crate::harness::workdir::Scratch;

use dashboard::Dashboard;
use prometheus_server::{JOB, Prometheus, SCRAPE_TIMEOUT, promtool};
use rate_limited_upstream::{BROKEN_REPOSITORY, RateLimitedUpstream};

/// The metric names of the contract; histograms also expose `_bucket`,
/// `_sum` and `_count`.
const CONTRACT_METRICS: &[&str] = &[
    "regmirror_cache_hits_total",
    "regmirror_cache_misses_total",
    "regmirror_bytes_served_total",
    "regmirror_upstream_requests_total",
    "regmirror_upstream_bytes_total",
    "regmirror_cache_size_bytes",
    "regmirror_cache_max_size_bytes",
    "regmirror_cache_blobs",
    "regmirror_evictions_total",
    "regmirror_evicted_bytes_total",
    "regmirror_inflight_fetches",
    "regmirror_digest_mismatches_total",
    "regmirror_upstream_ratelimit_remaining",
    "regmirror_http_requests_total",
];
const CONTRACT_HISTOGRAMS: &[&str] =
    &["regmirror_upstream_request_duration_seconds", "regmirror_http_request_duration_seconds"];

/// The pulls the proxy's rate limit starts with.
const RATE_LIMIT: i64 = 100;

fn deploy_prometheus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus")
}

#[test]
fn promtool_checks_the_alert_rules_and_runs_their_unit_tests() -> Result<()> {
    let dir = deploy_prometheus();
    run(promtool()?.args(["check", "rules"]).arg(dir.join("alerts.yml")))?;
    run(promtool()?.args(["test", "rules"]).arg(dir.join("alerts.test.yml")))?;
    Ok(())
}

#[test]
fn every_alert_has_a_firing_and_a_silent_unit_test() -> Result<()> {
    let dir = deploy_prometheus();
    let rules = std::fs::read_to_string(dir.join("alerts.yml"))?;
    let tests = std::fs::read_to_string(dir.join("alerts.test.yml"))?;
    let alerts: Vec<&str> = rules.lines().filter_map(|line| line.trim().strip_prefix("- alert: ")).collect();
    ensure!(!alerts.is_empty(), "no `- alert:` lines in alerts.yml");
    let cases = unit_test_cases(&tests);
    let mut missing = Vec::new();
    for alert in &alerts {
        for (firing, what) in [(true, "firing"), (false, "silent")] {
            if !cases.contains(&(*alert, firing)) {
                missing.push(format!("{alert}: no {what} case"));
            }
        }
    }
    ensure!(missing.is_empty(), "alerts.test.yml lacks cases:\n{}", missing.join("\n"));
    Ok(())
}

/// `(alertname, fires)` of every `alert_rule_test` entry: `exp_alerts: []`
/// expects silence, a list expects alerts.
fn unit_test_cases(tests: &str) -> Vec<(&str, bool)> {
    let lines: Vec<&str> = tests.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
    lines
        .windows(2)
        .filter_map(|pair| {
            let alert = pair[0].strip_prefix("alertname: ")?;
            match pair[1] {
                "exp_alerts: []" => Some((alert, false)),
                "exp_alerts:" => Some((alert, true)),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn promtool_checks_the_example_prometheus_config() -> Result<()> {
    // The config names alerts.yml relative to itself: the two files must
    // work as a pair wherever they are copied.
    let copy = Scratch::new("prometheus-config")?;
    for file in ["prometheus.yml", "alerts.yml"] {
        std::fs::copy(deploy_prometheus().join(file), copy.join(file))?;
    }
    let output = run(promtool()?.args(["check", "config"]).arg(copy.join("prometheus.yml")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(stdout.contains("1 rule files found"), "prometheus.yml loads no rule file:\n{stdout}");
    let config = std::fs::read_to_string(copy.join("prometheus.yml"))?;
    ensure!(config.contains(&format!("job_name: {JOB}")), "alerts.yml expects a scrape job named {JOB}");
    ensure!(config.contains(":5000"), "the example does not scrape the mirror's default port 5000");
    Ok(())
}

#[test]
fn dashboard_and_alerts_name_only_contract_metrics() -> Result<()> {
    let dashboard = Dashboard::load()?;
    let rules = std::fs::read_to_string(deploy_prometheus().join("alerts.yml"))?;
    let mut unknown: Vec<String> = dashboard
        .queries()?
        .iter()
        .flat_map(|query| {
            dashboard::regmirror_metric_names(&query.expr)
                .into_iter()
                .filter(|name| !is_contract_metric(name))
                .map(|name| format!("{name} in panel {}", query.name))
                .collect::<Vec<_>>()
        })
        .collect();
    unknown.extend(
        dashboard::regmirror_metric_names(&rules)
            .into_iter()
            .filter(|name| !is_contract_metric(name))
            .map(|name| format!("{name} in alerts.yml")),
    );
    ensure!(unknown.is_empty(), "metrics outside the contract:\n{}", unknown.join("\n"));
    Ok(())
}

fn is_contract_metric(name: &str) -> bool {
    CONTRACT_METRICS.contains(&name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(|base| CONTRACT_HISTOGRAMS.contains(&base)))
}

#[test]
fn dashboard_is_importable_and_templated() -> Result<()> {
    let dashboard = Dashboard::load()?;
    let json = &dashboard.json;
    let schema = json["schemaVersion"].as_u64().context("no schemaVersion")?;
    ensure!((36..=41).contains(&schema), "schemaVersion {schema} is not one of Grafana 9-11's");
    ensure!(json["uid"].is_string() && json["title"].is_string(), "the dashboard needs a uid and a title");

    let datasource = dashboard.variable("datasource").context("no `datasource` variable")?;
    ensure!(datasource["type"] == "datasource" && datasource["query"] == "prometheus");
    let instance = dashboard.variable("instance").context("no `instance` variable")?;
    ensure!(instance["type"] == "query" && instance["includeAll"] == true && instance["multi"] == true);

    let panels = dashboard.panels();
    let mut ids: Vec<u64> = panels.iter().filter_map(|panel| panel["id"].as_u64()).collect();
    ids.sort_unstable();
    ids.dedup();
    ensure!(ids.len() == panels.len(), "panel ids are missing or not unique");
    for panel in panels.iter().filter(|panel| panel["type"] != "row") {
        let title = &panel["title"];
        ensure!(panel["gridPos"]["w"].as_u64().is_some_and(|w| w <= 24), "panel {title} has a bad gridPos");
        ensure!(panel["targets"].as_array().is_some_and(|t| !t.is_empty()), "panel {title} has no query");
    }
    let expected = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    for query in dashboard.queries()? {
        ensure!(query.datasource == expected, "{} queries {} instead of {expected}", query.name, query.datasource);
        dashboard::substitute(&query.expr, &grafana_variables("127.0.0.1:5000"))?;
    }
    Ok(())
}

/// What Grafana would put in for the dashboard's variables, with the one
/// mirror selected.
fn grafana_variables(instance: &str) -> [(&str, &str); 5] {
    [("__rate_interval", "1m"), ("__interval", "15s"), ("__range", "1h"), ("job", JOB), ("instance", instance)]
}

#[test]
fn prometheus_scraping_a_mirror_sees_the_pulls_and_feeds_every_panel_and_rule() -> Result<()> {
    let shared = shared::plain()?;
    let image = &shared.fixtures.alpine;
    let upstream = RateLimitedUpstream::start(&shared.registry.upstream.url(), RATE_LIMIT)?;
    let mirror = Mirror::start(MirrorConfig::docker_io(upstream.url()))?;
    let prometheus = Prometheus::start(mirror.host(), &deploy_prometheus().join("alerts.yml"))?;
    let instance = mirror.host();
    let up = Resolved { query: format!(r#"up{{instance="{instance}", job="{JOB}"}}"#), value: 1.0 };
    wait_for_values(&prometheus, &[up]).context("Prometheus never scraped the mirror")?;

    // A cold pull, a warm pull, and a repository the upstream fails.
    let skopeo = Skopeo::new(mirror.host())?;
    for _ in 0..2 {
        skopeo.pull(&image.by_tag())?.check(image)?;
    }
    let broken = http::get(&format!("{}/v2/{BROKEN_REPOSITORY}/manifests/latest", mirror.url()))?;
    ensure!(broken.status >= 500, "a failing upstream gave the client {} instead of a 5xx", broken.status);

    let pulled = image.platform(ARCHITECTURE)?;
    let blobs = pulled.blobs.len() as f64;
    // Each pull sends the manifest once and every blob once.
    let bytes = (pulled.total_size() + pulled.manifest_size) as f64;
    let expected = [
        // Every blob and the manifest came from upstream once and from the
        // cache once.
        Expected::exactly("regmirror_cache_misses_total", r#"kind="blob""#, blobs),
        Expected::exactly("regmirror_cache_hits_total", r#"kind="blob""#, blobs),
        Expected::exactly("regmirror_bytes_served_total", r#"source="upstream""#, bytes),
        Expected::exactly("regmirror_bytes_served_total", r#"source="cache""#, bytes),
        // skopeo GETs the manifest by tag once per pull: a miss, then a hit
        // (within tag_ttl). The broken repository is one more miss.
        Expected::exactly("regmirror_cache_misses_total", r#"kind="manifest""#, 2.0),
        Expected::exactly("regmirror_cache_hits_total", r#"kind="manifest""#, 1.0),
        Expected::exactly("regmirror_cache_blobs", "", blobs),
        Expected::exactly("regmirror_inflight_fetches", "", 0.0),
        Expected::exactly(
            "regmirror_upstream_ratelimit_remaining",
            r#"upstream="docker.io""#,
            upstream.remaining() as f64,
        ),
        Expected::as_exposed("regmirror_upstream_requests_total", ""),
        Expected::as_exposed("regmirror_upstream_bytes_total", ""),
        Expected::as_exposed("regmirror_cache_size_bytes", ""),
    ];
    // The mirror is idle now: one look at its /metrics is enough.
    let exposed = mirror.metrics()?;
    let expected: Vec<Resolved> = expected.iter().map(|e| e.resolve(instance, &exposed)).collect();
    wait_for_values(&prometheus, &expected)?;
    ensure!(upstream.remaining() < RATE_LIMIT, "the mirror never fetched a manifest upstream");
    let cached = prometheus.query_one(&format!(r#"regmirror_cache_size_bytes{{instance="{instance}"}}"#))?;
    ensure!(cached >= bytes, "the cache holds {bytes} bytes of blobs, regmirror_cache_size_bytes says {cached}");
    let failed = format!(r#"sum(regmirror_upstream_requests_total{{instance="{instance}", status=~"5.."}})"#);
    ensure!(prometheus.query_one(&failed)? >= 1.0, "the upstream's 503 was not counted");

    every_panel_has_data(&prometheus, instance)?;
    variables_list_the_mirror(&prometheus, instance)?;
    every_rule_evaluates(&prometheus)
}

/// A series whose value Prometheus must show: `sum(name{instance, labels})`.
struct Expected {
    name: &'static str,
    labels: &'static str,
    /// `None`: whatever the mirror's `/metrics` says.
    value: Option<f64>,
}

/// A query and the value it must give.
struct Resolved {
    query: String,
    value: f64,
}

impl Expected {
    fn exactly(name: &'static str, labels: &'static str, value: f64) -> Expected {
        Expected { name, labels, value: Some(value) }
    }

    fn as_exposed(name: &'static str, labels: &'static str) -> Expected {
        Expected { name, labels, value: None }
    }

    /// The query for the mirror at `instance`, and the value from `exposed`
    /// (a scrape of the mirror's `/metrics`) where none was given.
    fn resolve(&self, instance: &str, exposed: &Metrics) -> Resolved {
        let filter: Vec<(&str, &str)> = self
            .labels
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(key, value)| (key.trim(), value.trim().trim_matches('"')))
            .collect();
        let value = self.value.unwrap_or_else(|| exposed.sum(self.name, &filter));
        let separator = if self.labels.is_empty() { "" } else { ", " };
        let query = format!(r#"sum({}{{instance="{instance}", {}{separator}job="{JOB}"}})"#, self.name, self.labels);
        Resolved { query, value }
    }
}

/// Polls Prometheus until every query gives its value: scrapes lag the
/// mirror by up to a scrape interval.
fn wait_for_values(prometheus: &Prometheus, expected: &[Resolved]) -> Result<()> {
    let seen = || -> Result<Vec<Option<f64>>> {
        expected.iter().map(|e| Ok(prometheus.query(&e.query)?.first().copied())).collect()
    };
    let settled = wait::poll("Prometheus to show the mirror's values", SCRAPE_TIMEOUT, || {
        Ok(seen()?.iter().zip(expected).all(|(seen, e)| *seen == Some(e.value)).then_some(()))
    });
    if settled.is_err() {
        let report: Vec<String> = seen()?
            .iter()
            .zip(expected)
            .map(|(seen, e)| format!("{}: Prometheus {seen:?}, expected {}", e.query, e.value))
            .collect();
        bail!("Prometheus does not show what the mirror did:\n{}\n{}", report.join("\n"), prometheus.log_tail());
    }
    Ok(())
}

/// Every dashboard query, with Grafana's variables substituted, returns
/// data. Polls, since a fresh series needs two scrapes before `rate` sees it.
fn every_panel_has_data(prometheus: &Prometheus, instance: &str) -> Result<()> {
    let variables = grafana_variables(instance);
    let queries = Dashboard::load()?
        .queries()?
        .into_iter()
        .map(|query| Ok((dashboard::substitute(&query.expr, &variables)?, query.name)))
        .collect::<Result<Vec<_>>>()?;
    let without_data = || -> Result<Vec<String>> {
        let mut empty = Vec::new();
        for (expr, panel) in &queries {
            let samples = prometheus.query(expr).with_context(|| format!("panel {panel}: {expr}"))?;
            if samples.is_empty() {
                empty.push(format!("{panel}: {expr}"));
            }
        }
        Ok(empty)
    };
    let all_have_data =
        wait::poll("data for every panel", SCRAPE_TIMEOUT, || Ok(without_data()?.is_empty().then_some(())));
    if all_have_data.is_err() {
        bail!("dashboard queries without data:\n{}", without_data()?.join("\n"));
    }
    Ok(())
}

/// The dashboard's `label_values(...)` variables offer the scraped mirror.
fn variables_list_the_mirror(prometheus: &Prometheus, instance: &str) -> Result<()> {
    let dashboard = Dashboard::load()?;
    for variable in dashboard.query_variables()? {
        let definition = dashboard::substitute(&variable.definition, &grafana_variables(instance))?;
        let (selector, label) = dashboard::parse_label_values(&definition)?;
        let values = prometheus.label_values(selector, label)?;
        let want = match label {
            "instance" => instance,
            "job" => JOB,
            other => bail!("variable {} lists `{other}`, which this test does not know", variable.name),
        };
        ensure!(values.iter().any(|value| value == want), "variable {} offers {values:?}, not {want}", variable.name);
    }
    Ok(())
}

/// Prometheus loaded every rule of alerts.yml and evaluates each without
/// error against the mirror's real series.
fn every_rule_evaluates(prometheus: &Prometheus) -> Result<()> {
    let expected = std::fs::read_to_string(deploy_prometheus().join("alerts.yml"))?
        .lines()
        .filter(|line| line.trim().starts_with("- alert: "))
        .count();
    wait::poll("every alert rule to be evaluated", SCRAPE_TIMEOUT, || {
        let groups = prometheus.rules()?;
        let rules: Vec<&Value> = groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array())
            .flatten()
            .collect();
        if let Some(failed) = rules.iter().find(|rule| rule["health"] == "err") {
            bail!("rule {} fails: {}", failed["name"], failed["lastError"]);
        }
        let evaluated = rules.iter().filter(|rule| rule["health"] == "ok").count();
        ensure!(rules.len() == expected, "Prometheus loaded {} rules, alerts.yml has {expected}", rules.len());
        Ok((evaluated == expected).then_some(()))
    })
}
