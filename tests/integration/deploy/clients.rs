//! `deploy/clients/`: the README shows each file exactly, each parses as what its client
//! reads, and the ghcr.io parts take ctr, skopeo and podman to the ghcr.io upstream of a
//! shipped config. (The docker.io parts are what every real-client test pulls with; see
//! `harness::clients`.)

use std::path::Path;

use anyhow::{Context, Result, ensure};

use super::{Served, read, yaml_documents};
use crate::harness::clients::containerd::Ctr;
use crate::harness::clients::podman::Podman;
use crate::harness::clients::skopeo::Skopeo;
use crate::harness::clients::{MIRROR_PLACEHOLDER, PullClient, UNREACHABLE_REGISTRY, deploy_clients_dir};
use crate::harness::shared;

/// Every file under `deploy/clients/`, relative to it.
fn snippets() -> Result<Vec<String>> {
    fn walk(dir: &Path, base: &Path, found: &mut Vec<String>) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, base, found)?;
            } else {
                found.push(path.strip_prefix(base)?.to_str().context("non-UTF-8 path")?.to_owned());
            }
        }
        Ok(())
    }
    let base = deploy_clients_dir();
    let mut found = Vec::new();
    walk(&base, &base, &mut found)?;
    found.sort();
    Ok(found)
}

fn snippet(relative: &str) -> Result<String> {
    let path = deploy_clients_dir().join(relative);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

#[test]
fn readme_shows_every_client_snippet_verbatim() -> Result<()> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))?;
    let snippets = snippets()?;
    ensure!(snippets.len() >= 4, "deploy/clients/ holds only {snippets:?}");
    for relative in snippets {
        let text = snippet(&relative)?;
        let language = if relative.ends_with(".json") { "json" } else { "toml" };
        let block = format!("```{language}\n{text}```\n");
        ensure!(readme.contains(&block), "README.md does not show deploy/clients/{relative} as\n{block}");
    }
    Ok(())
}

#[test]
fn client_snippets_parse_and_name_the_placeholder() -> Result<()> {
    for relative in snippets()? {
        let text = snippet(&relative)?;
        ensure!(text.contains(MIRROR_PLACEHOLDER), "{relative} does not name {MIRROR_PLACEHOLDER}");
        if relative.ends_with(".json") {
            let parsed: serde_json::Value = serde_json::from_str(&text).with_context(|| relative.clone())?;
            let mirrors = &parsed["registry-mirrors"];
            ensure!(*mirrors == serde_json::json!([format!("http://{MIRROR_PLACEHOLDER}")]), "{relative}: {mirrors}");
        } else {
            text.parse::<toml::Table>().with_context(|| format!("parsing {relative}"))?;
        }
    }
    Ok(())
}

/// The shipped configs serve ghcr.io by path too, as the podman/skopeo snippet requires.
#[test]
fn shipped_configs_serve_ghcr_io_by_path() -> Result<()> {
    let configmap = yaml_documents(&read("kubernetes/configmap.yaml")?)?.remove(0);
    let shipped = [
        ("compose/regmirror.toml", read("compose/regmirror.toml")?),
        ("systemd/regmirror.toml", read("systemd/regmirror.toml")?),
        ("kubernetes/configmap.yaml", configmap["data"]["regmirror.toml"].as_str().context("no config")?.to_owned()),
    ];
    for (file, config) in shipped {
        let table: toml::Table = config.parse()?;
        let upstreams = table["upstreams"].as_array().with_context(|| format!("{file}: no upstreams"))?;
        let ghcr = upstreams.iter().find(|u| u["name"].as_str() == Some("ghcr.io"));
        let by_path = ghcr.and_then(|u| u.get("path_prefix")).and_then(toml::Value::as_bool);
        ensure!(by_path == Some(true), "{file}: the ghcr.io upstream needs path_prefix = true");
    }
    Ok(())
}

#[test]
fn ctr_pulls_ghcr_io_with_its_hosts_toml() -> Result<()> {
    pulls_from_ghcr_io(Ctr::new)
}

#[test]
fn skopeo_pulls_ghcr_io_with_registries_conf() -> Result<()> {
    pulls_from_ghcr_io(Skopeo::new)
}

#[test]
fn podman_pulls_ghcr_io_with_registries_conf() -> Result<()> {
    pulls_from_ghcr_io(Podman::new)
}

/// Serves `deploy/compose/regmirror.toml` as shipped but for its upstreams' URLs: docker.io
/// unreachable, ghcr.io the shared upstream holding the fixtures. A `ghcr.io/…` pull then
/// succeeds only if it reached the mirror's ghcr.io upstream, by `?ns=ghcr.io` (containerd)
/// or by the `/v2/ghcr.io/` path (podman, skopeo), with the client's snippet as shipped.
fn pulls_from_ghcr_io<C: PullClient>(client: impl FnOnce(&str) -> Result<C>) -> Result<()> {
    let shared = shared::plain()?;
    let mut config = read("compose/regmirror.toml")?;
    for (from, to) in [
        ("\"https://registry-1.docker.io\"", format!("\"http://{UNREACHABLE_REGISTRY}\"")),
        ("\"https://ghcr.io\"", format!("\"{}\"", shared.registry.upstream.url())),
    ] {
        ensure!(config.contains(from), "compose/regmirror.toml no longer names {from}");
        config = config.replace(from, &to);
    }
    let mirror =
        Served::start("ghcr-mirror", &["serve", "--config", "{dir}/regmirror.toml"], &[("regmirror.toml", &config)])?;
    let client = client(mirror.host())?;
    let image = &shared.fixtures.alpine;
    let reference = image.by_tag().replacen("docker.io/", "ghcr.io/", 1);
    let pulled = client.pull(&reference).with_context(|| format!("{} pulling {reference}", client.name()))?;
    pulled.check(image)
}
