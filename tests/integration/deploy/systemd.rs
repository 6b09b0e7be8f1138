//! `deploy/systemd/`: the unit through `systemd-analyze verify` and `systemd-analyze security`,
//! its sandbox settings, and its `ExecStart` command line run with the example config.
//!
//! `verify` checks that `ExecStart`'s binary exists, so it runs on a copy of the unit whose
//! binary is this build's `regmirror`; nothing else in the copy changes.

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};

use super::{Served, config_facts, read, tool};
use crate::harness::process::{run, run_stdout, run_unchecked};
use crate::harness::workdir::Scratch;

const UNIT: &str = "systemd/regmirror.service";
/// Where the unit's header says to install the binary and the config.
const INSTALLED_BINARY: &str = "/usr/local/bin/regmirror";
const INSTALLED_CONFIG: &str = "/etc/regmirror/regmirror.toml";
/// `systemd-analyze security` rates 0 (locked down) to 10 (exposed); up to 2 is "OK".
const MAX_EXPOSURE: f64 = 2.0;

/// `(section, key, value)` of every setting in a unit file.
fn settings(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with(['#', ';']) || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, value)) = line.split_once('=') {
            settings.push((section.clone(), key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    settings
}

/// The values of `key` in `[Service]`, in order.
fn service_values<'a>(settings: &'a [(String, String, String)], key: &str) -> Vec<&'a str> {
    settings.iter().filter(|(s, k, _)| s == "Service" && k == key).map(|(_, _, v)| v.as_str()).collect()
}

/// A copy of the unit, named `regmirror.service`, with `ExecStart`'s binary replaced.
fn unit_copy(dir: &Scratch, binary: &str) -> Result<PathBuf> {
    let text = read(UNIT)?;
    ensure!(text.contains(&format!("ExecStart={INSTALLED_BINARY} ")), "ExecStart does not run {INSTALLED_BINARY}");
    let path = dir.join("regmirror.service");
    std::fs::write(&path, text.replace(&format!("ExecStart={INSTALLED_BINARY} "), &format!("ExecStart={binary} ")))?;
    Ok(path)
}

#[test]
fn systemd_analyze_verifies_the_unit() -> Result<()> {
    let dir = Scratch::new("systemd-verify")?;
    let unit = unit_copy(&dir, env!("CARGO_BIN_EXE_regmirror"))?;
    let output = run(tool("systemd-analyze", "systemd")?.arg("verify").arg(&unit))?;
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ensure!(!said.contains("regmirror"), "systemd-analyze verify complains about the unit:\n{said}");

    // The check can fail here: a unit whose binary is missing is refused.
    let broken = unit_copy(&Scratch::new("systemd-verify-broken")?, "/nonexistent/regmirror")?;
    if run_unchecked(tool("systemd-analyze", "systemd")?.arg("verify").arg(&broken))?.status.success() {
        bail!("systemd-analyze verify accepted a unit whose binary does not exist: it checks nothing here");
    }
    Ok(())
}

#[test]
fn systemd_analyze_rates_the_sandbox_ok() -> Result<()> {
    let dir = Scratch::new("systemd-security")?;
    let unit = unit_copy(&dir, env!("CARGO_BIN_EXE_regmirror"))?;
    let report = run_stdout(tool("systemd-analyze", "systemd")?.args(["security", "--offline=yes"]).arg(&unit))?;
    let overall = report.lines().find(|line| line.contains("Overall exposure level")).context(report.clone())?;
    let score: f64 = overall
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .with_context(|| format!("no score in {overall:?}"))?;
    ensure!(score <= MAX_EXPOSURE, "exposure {score} > {MAX_EXPOSURE}:\n{report}");
    Ok(())
}

/// The settings the sandbox relies on, spelled out (a later edit that drops one fails here
/// with its name, rather than as a changed score).
#[test]
fn unit_sandboxes_the_service() -> Result<()> {
    let settings = settings(&read(UNIT)?);
    let one = |key: &str| -> Result<&str> {
        match service_values(&settings, key)[..] {
            [value] => Ok(value),
            ref values => bail!("[Service] {key}= is set {} times", values.len()),
        }
    };
    let dedicated_user = one("DynamicUser").is_ok_and(|v| v == "yes") || one("User").is_ok_and(|u| u != "root");
    ensure!(dedicated_user, "the service runs as root");
    for (key, expected) in [
        ("StateDirectory", "regmirror"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("Restart", "on-failure"),
    ] {
        ensure!(one(key)? == expected, "{key}={} instead of {expected}", one(key)?);
    }
    let families: Vec<&str> = one("RestrictAddressFamilies")?.split_whitespace().collect();
    ensure!(families.contains(&"AF_INET") && families.contains(&"AF_INET6"), "the service cannot use IP");
    ensure!(service_values(&settings, "SystemCallFilter").first() == Some(&"@system-service"));
    ensure!(one("LimitNOFILE")?.parse::<u64>()? >= 65536, "LimitNOFILE is too low for many clients");
    Ok(())
}

/// `ExecStart`'s command line, run by the real binary with the example config in place of
/// the installed one, serves; and the config keeps the cache in the unit's state directory.
#[test]
fn exec_start_serves_the_example_config() -> Result<()> {
    let unit = read(UNIT)?;
    let settings = settings(&unit);
    let exec_start = service_values(&settings, "ExecStart");
    let [exec_start] = exec_start[..] else { bail!("ExecStart= is set {} times", exec_start.len()) };
    let config = read("systemd/regmirror.toml")?;
    ensure!(
        unit.contains(&format!("deploy/systemd/regmirror.toml {INSTALLED_CONFIG}")),
        "the unit's install notes do not put the example config at {INSTALLED_CONFIG}"
    );
    let state = service_values(&settings, "StateDirectory");
    let cache_dir = config_facts(&config)?.cache_dir;
    ensure!(state.iter().any(|dir| cache_dir == format!("/var/lib/{dir}")), "cache_dir {cache_dir} is not writable");

    let mut words = exec_start.split_whitespace();
    ensure!(words.next() == Some(INSTALLED_BINARY));
    let args: Vec<&str> = words.map(|w| if w == INSTALLED_CONFIG { "{dir}/regmirror.toml" } else { w }).collect();
    ensure!(args.contains(&"{dir}/regmirror.toml"), "ExecStart does not read {INSTALLED_CONFIG}");
    let served = Served::start("systemd-exec-start", &args, &[("regmirror.toml", &config)])?;
    served.expect_ok("/readyz")
}

#[test]
fn parses_unit_settings() {
    let parsed = settings("# c\n[Unit]\nA=1\n[Service]\nB = x y\nB=z\nC=\n");
    assert_eq!(service_values(&parsed, "B"), ["x y", "z"]);
    assert_eq!(service_values(&parsed, "C"), [""]);
    assert!(service_values(&parsed, "A").is_empty());
}
