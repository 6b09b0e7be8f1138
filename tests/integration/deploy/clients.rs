//! `deploy/clients/`: the README shows each file exactly, each parses as what its client
//! reads, and containerd's ghcr.io snippet routes ghcr.io pulls to the mirror's ghcr.io
//! upstream. (The docker.io snippets are what every real-client test pulls with; see
//! `harness::clients`.)

use std::path::Path;

use anyhow::{Context, Result, ensure};

use crate::harness::clients::containerd::Ctr;
use crate::harness::clients::{MIRROR_PLACEHOLDER, PullClient, UNREACHABLE_REGISTRY, deploy_clients_dir};
use crate::harness::mirror::{Mirror, MirrorConfig, UpstreamConfig};
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

/// A mirror whose docker.io upstream is unreachable and whose ghcr.io upstream holds the
/// fixtures: a `ghcr.io/…` pull with the hosts.toml files succeeds only if containerd sent
/// `?ns=ghcr.io` and the mirror routed by it.
#[test]
fn ctr_pulls_ghcr_io_with_its_hosts_toml() -> Result<()> {
    let shared = shared::plain()?;
    let upstream = |name: &str, url: String| UpstreamConfig { name: name.into(), url, username: None, password: None };
    let config = MirrorConfig {
        upstreams: vec![
            upstream("docker.io", format!("http://{UNREACHABLE_REGISTRY}")),
            upstream("ghcr.io", shared.registry.upstream.url()),
        ],
        ..MirrorConfig::docker_io("http://unused")
    };
    let mirror = Mirror::start(config)?;
    let image = &shared.fixtures.alpine;
    let reference = image.by_tag().replacen("docker.io/", "ghcr.io/", 1);
    let pulled = Ctr::new(mirror.host())?.pull(&reference).with_context(|| format!("ctr pulling {reference}"))?;
    pulled.check(image)
}
