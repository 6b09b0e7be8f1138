//! `deploy/Dockerfile`, checked without a Docker engine: its structure, and its `CMD` and
//! `HEALTHCHECK` run on the host against the real binary.

use anyhow::{Context, Result, bail, ensure};

use super::{Served, kubernetes, read, tool};
use crate::harness::process::{run, run_unchecked};

/// Where the image keeps its cache, and the port it exposes.
const CACHE_DIR: &str = "/var/lib/regmirror";
const PORT: &str = "5000";

/// One instruction: continuation lines joined, comments left out.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    arguments: String,
}

/// The instructions of a Dockerfile, in order.
fn instructions(text: &str) -> Vec<Instruction> {
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || (line.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(line);
        let (keyword, arguments) = pending.split_once(char::is_whitespace).unwrap_or((&pending, ""));
        instructions
            .push(Instruction { keyword: keyword.to_ascii_uppercase(), arguments: arguments.trim().to_owned() });
        pending.clear();
    }
    instructions
}

/// The build stages: each `FROM` and the instructions after it.
fn stages(instructions: &[Instruction]) -> Vec<&[Instruction]> {
    let starts: Vec<usize> =
        instructions.iter().enumerate().filter(|(_, i)| i.keyword == "FROM").map(|(index, _)| index).collect();
    starts
        .iter()
        .enumerate()
        .map(|(n, &start)| &instructions[start..*starts.get(n + 1).unwrap_or(&instructions.len())])
        .collect()
}

/// The last instruction `keyword` of a stage.
fn last<'a>(stage: &'a [Instruction], keyword: &str) -> Result<&'a str> {
    stage
        .iter()
        .rev()
        .find(|i| i.keyword == keyword)
        .map(|i| i.arguments.as_str())
        .with_context(|| format!("the runtime stage has no {keyword}"))
}

/// An exec-form argument list, `["a", "b"]`.
fn exec_form(arguments: &str) -> Result<Vec<String>> {
    serde_json::from_str(arguments).with_context(|| format!("{arguments:?} is not in exec form"))
}

/// The final stage, which is the image.
fn runtime_stage(instructions: &[Instruction]) -> Result<&[Instruction]> {
    stages(instructions).last().copied().context("deploy/Dockerfile has no FROM")
}

/// The exec-form command of the `HEALTHCHECK`.
fn healthcheck(stage: &[Instruction]) -> Result<Vec<String>> {
    let healthcheck = last(stage, "HEALTHCHECK")?;
    let (_, command) = healthcheck.split_once("CMD ").context("HEALTHCHECK without CMD")?;
    exec_form(command)
}

/// The exec-form command of the image's `HEALTHCHECK`.
pub fn image_healthcheck() -> Result<Vec<String>> {
    healthcheck(runtime_stage(&instructions(&read("Dockerfile")?))?)
}

/// The `uid:gid` the image runs as.
pub fn user() -> Result<(u32, u32)> {
    let instructions = instructions(&read("Dockerfile")?);
    let user = last(runtime_stage(&instructions)?, "USER")?;
    let (uid, gid) = user.split_once(':').with_context(|| format!("USER {user} has no numeric group"))?;
    Ok((uid.parse().context("USER is not numeric")?, gid.parse().context("USER's group is not numeric")?))
}

#[test]
fn dockerfile_builds_a_small_non_root_image_in_two_stages() -> Result<()> {
    let text = read("Dockerfile")?;
    ensure!(text.starts_with("# syntax=docker/dockerfile:1"), "RUN --mount needs the dockerfile:1 syntax line first");
    let instructions = instructions(&text);
    let stages = stages(&instructions);
    ensure!(stages.len() >= 2, "one stage only: the runtime image would carry the Rust toolchain");

    let mut codenames = Vec::new();
    for stage in &stages {
        let from = &stage[0].arguments;
        let image = from.split_whitespace().next().context("FROM without an image")?;
        let (_, tag) = image.rsplit_once(':').with_context(|| format!("FROM {image} has no tag"))?;
        ensure!(tag != "latest" && !tag.is_empty(), "FROM {image}: pin a release, not latest");
        codenames.push(tag.rsplit('-').find(|part| ["bookworm", "trixie"].contains(part)).unwrap_or(tag));
    }
    let (builder, runtime) = (stages[0], *stages.last().unwrap());
    ensure!(builder[0].arguments.starts_with("rust:"), "the first stage should build with the rust image");
    ensure!(builder[0].arguments.ends_with(" AS builder"), "the build stage is not named builder");
    let runtime_image = &runtime[0].arguments;
    ensure!(
        (runtime_image.starts_with("debian:") && runtime_image.contains("-slim"))
            || runtime_image.starts_with("gcr.io/distroless/cc"),
        "runtime image {runtime_image} is not a small one"
    );
    // The binary links glibc dynamically: build and run on the same Debian release.
    ensure!(codenames.windows(2).all(|pair| pair[0] == pair[1]), "stages on different Debian releases: {codenames:?}");

    let build = builder.iter().filter(|i| i.keyword == "RUN").map(|i| i.arguments.as_str()).collect::<String>();
    ensure!(build.contains("cargo build --release --locked"), "the build is not a locked release build");
    let copied = last(runtime, "COPY")?;
    ensure!(copied == "--from=builder /out/regmirror /usr/local/bin/regmirror", "COPY {copied}");
    ensure!(build.contains("/out/regmirror"), "the builder does not install the binary where COPY takes it");

    let (uid, _) = user()?;
    ensure!(uid != 0, "the image runs as root");
    let setup = runtime.iter().filter(|i| i.keyword == "RUN").map(|i| i.arguments.as_str()).collect::<String>();
    ensure!(setup.contains(&format!("--uid {uid}")), "the runtime stage creates no user with uid {uid}");
    ensure!(
        setup.contains(&format!("-o regmirror -g regmirror -m 0750 {CACHE_DIR}")),
        "{CACHE_DIR} is not created for the image's user, so a fresh volume would not be writable"
    );
    ensure!(last(runtime, "VOLUME")? == CACHE_DIR, "VOLUME is not {CACHE_DIR}");
    ensure!(last(runtime, "EXPOSE")? == PORT, "EXPOSE is not {PORT}");
    ensure!(exec_form(last(runtime, "ENTRYPOINT")?)? == ["regmirror"], "ENTRYPOINT is not [\"regmirror\"]");
    let cmd = exec_form(last(runtime, "CMD")?)?;
    let listen = format!("0.0.0.0:{PORT}");
    ensure!(cmd == ["serve", "--listen", listen.as_str(), "--cache-dir", CACHE_DIR], "CMD {cmd:?}");
    let probe = healthcheck(runtime)?;
    ensure!(probe.last().is_some_and(|url| url == &format!("http://127.0.0.1:{PORT}/healthz")), "{probe:?}");
    Ok(())
}

/// The build context is the repository root; the Dockerfile's own ignore file must let the
/// crate's sources through, and nothing else is needed.
#[test]
fn dockerignore_sends_the_crate_sources() -> Result<()> {
    let text = read("Dockerfile.dockerignore")?;
    let patterns: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    ensure!(patterns.first() == Some(&"*"), "the ignore file should start by excluding everything");
    for needed in ["!Cargo.toml", "!Cargo.lock", "!src/"] {
        ensure!(patterns.contains(&needed), "{needed} is missing from deploy/Dockerfile.dockerignore");
    }
    Ok(())
}

/// The image's `USER` is the uid Kubernetes is told to run as.
#[test]
fn image_user_matches_the_kubernetes_security_context() -> Result<()> {
    let (uid, gid) = user()?;
    let pod = kubernetes::pod_security_context()?;
    ensure!(pod.run_as_user == uid && pod.run_as_group == gid && pod.fs_group == gid, "{pod:?} vs USER {uid}:{gid}");
    Ok(())
}

/// The image's `CMD`, run by the real binary (listen address and cache dir overridden through
/// the environment), serves; its `HEALTHCHECK` command, run on the host with the port changed
/// to the test's, passes against it and fails against a closed port.
#[test]
fn cmd_serves_and_healthcheck_probes_it() -> Result<()> {
    let instructions = instructions(&read("Dockerfile")?);
    let runtime = runtime_stage(&instructions)?;
    let cmd = exec_form(last(runtime, "CMD")?)?;
    let served = Served::start("dockerfile-cmd", &cmd.iter().map(String::as_str).collect::<Vec<_>>(), &[])?;
    served.expect_ok("/readyz")?;

    let probe = healthcheck(runtime)?;
    let (program, arguments) = probe.split_first().context("empty HEALTHCHECK")?;
    ensure!(program == "busybox", "HEALTHCHECK runs {program}, which this test cannot run on the host");
    let port_in =
        |host: &str| arguments.iter().map(|a| a.replace(&format!("127.0.0.1:{PORT}"), host)).collect::<Vec<_>>();
    run(tool("busybox", "busybox")?.args(port_in(served.host())))?;

    // Nothing listens on port 1: the check must be able to fail.
    let refused = run_unchecked(tool("busybox", "busybox")?.args(port_in("127.0.0.1:1")))?;
    if refused.status.success() {
        bail!("the HEALTHCHECK command passed with nothing listening");
    }
    Ok(())
}

#[test]
fn parses_instructions() {
    let text = "# syntax=x\nFROM a:1 AS b\n\nRUN one \\\n    # a comment inside\n    two\nCMD [\"x\"]\n";
    let parsed = instructions(text);
    let keywords: Vec<&str> = parsed.iter().map(|i| i.keyword.as_str()).collect();
    assert_eq!(keywords, ["FROM", "RUN", "CMD"]);
    assert_eq!(parsed[1].arguments, "one two");
    assert_eq!(stages(&parsed).len(), 1);
}
