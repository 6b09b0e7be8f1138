//! The mirror as a LAN service: HTTPS with a site CA that real clients trust, an allow-list
//! of client networks, Basic auth for clients, and robustness against slow-header clients
//! and request bodies.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::harness::clients::PullClient;
use crate::harness::clients::containerd::containerd;
use crate::harness::clients::skopeo::Skopeo;
use crate::harness::images::ARCHITECTURE;
use crate::harness::mirror::{Mirror, MirrorConfig};
use crate::harness::process::{self, run, run_stdout};
use crate::harness::shared;
use crate::harness::workdir::Scratch;

/// A throwaway CA and a server certificate for 127.0.0.1 signed by it (openssl CLI).
struct TestCa {
    dir: Scratch,
}

impl TestCa {
    fn new() -> Result<TestCa> {
        let dir = Scratch::new("test-ca")?;
        let openssl = |args: &[&str]| -> Result<()> {
            run(process::tool("openssl")?.current_dir(dir.path()).args(args))?;
            Ok(())
        };
        // `req -x509` needs a subject and lifetime; spelled out so it never prompts.
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=regmirror test CA",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ])?;
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ])?;
        Ok(TestCa { dir })
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

fn tls_mirror(ca: &TestCa) -> Result<Mirror> {
    let upstream = &shared::plain()?.registry.upstream;
    let config = MirrorConfig::docker_io(&upstream.url())
        .with_setting("tls_cert", ca.path("server.crt"))
        .with_setting("tls_key", ca.path("server.key"));
    Mirror::start(config)
}

/// skopeo through a registries.conf mirror entry that is *not* marked insecure, trusting
/// the test CA through a cert dir.
fn skopeo_pull_over_tls(mirror_host: &str, ca: &Path, reference: &str) -> Result<String> {
    let dir = Scratch::new("skopeo-tls")?;
    let certs = dir.subdir("certs")?;
    std::fs::copy(ca, certs.join("ca.crt"))?;
    std::fs::write(
        dir.join("registries.conf"),
        format!(
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"{}\"\n[[registry.mirror]]\nlocation = \"{mirror_host}\"\n",
            crate::harness::clients::UNREACHABLE_REGISTRY
        ),
    )?;
    let out = dir.join("image");
    run(process::tool("skopeo")?
        .arg("--registries-conf")
        .arg(dir.join("registries.conf"))
        .args([
            "--override-os",
            "linux",
            "--override-arch",
            ARCHITECTURE,
            "--insecure-policy",
            "copy",
            "--src-cert-dir",
        ])
        .arg(&certs)
        .arg(format!("docker://{reference}"))
        .arg(format!("dir:{}", out.display())))?;
    let manifest = std::fs::read(out.join("manifest.json"))?;
    Ok(crate::harness::images::digest_of(&manifest))
}

/// ctr with a hosts.toml whose mirror is `https://` and trusts the test CA.
fn ctr_pull_over_tls(mirror_host: &str, ca: &Path, reference: &str) -> Result<()> {
    let hosts = Scratch::new("ctr-tls-hosts")?;
    std::fs::write(
        hosts.subdir("docker.io")?.join("hosts.toml"),
        format!(
            "server = \"https://{}\"\n[host.\"https://{mirror_host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            crate::harness::clients::UNREACHABLE_REGISTRY,
            ca.display()
        ),
    )?;
    let namespace = format!("tls-{}", std::process::id());
    let output = run_stdout(
        containerd()?
            .ctr(&namespace)?
            .args(["images", "pull", "--hosts-dir"])
            .arg(hosts.path())
            .args(["--snapshotter", "native", "--platform"])
            .arg(format!("linux/{ARCHITECTURE}"))
            .arg(reference),
    )?;
    ensure!(output.contains("unpacking"), "ctr did not unpack:\n{output}");
    Ok(())
}

#[test]
fn tls_pulls_with_skopeo_and_containerd_trusting_a_site_ca() -> Result<()> {
    let ca = TestCa::new()?;
    let mirror = tls_mirror(&ca)?;
    let image = &shared::plain()?.fixtures.alpine;
    let digest = skopeo_pull_over_tls(mirror.host(), &ca.ca(), &image.by_tag()).context("skopeo over TLS")?;
    ensure!(digest == image.digest, "skopeo got {digest}, the upstream has {}", image.digest);
    ctr_pull_over_tls(mirror.host(), &ca.ca(), &image.by_tag()).context("ctr over TLS")?;
    // Plain HTTP on the TLS port is not served.
    ensure!(raw_request(mirror.host(), "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").map_or(true, |a| !a.contains(" 200 ")));
    Ok(())
}

#[test]
fn clients_outside_the_allowed_networks_are_refused() -> Result<()> {
    let upstream = &shared::plain()?.registry.upstream;
    let config = MirrorConfig::docker_io(&upstream.url()).with_setting("allow_cidrs", vec!["10.0.0.0/8".to_owned()]);
    let mirror = Mirror::start(config)?;
    for path in ["/v2/", "/v2/library/alpine/manifests/3.20", "/metrics"] {
        let answer =
            raw_request(mirror.host(), &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))?;
        ensure!(answer.starts_with("HTTP/1.1 403"), "{path}: {answer}");
        ensure!(answer.contains("\"DENIED\""), "{path}: {answer}");
    }
    let allowed = MirrorConfig::docker_io(&upstream.url()).with_setting("allow_cidrs", vec!["127.0.0.0/8".to_owned()]);
    let allowed = Mirror::start(allowed)?;
    let answer = raw_request(allowed.host(), "GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    ensure!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    Ok(())
}

#[test]
fn basic_auth_lets_in_only_known_clients() -> Result<()> {
    let dir = Scratch::new("htpasswd")?;
    let htpasswd = dir.join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{}\n", bcrypt::hash("wonderland", 4)?))?;
    let upstream = &shared::plain()?.registry.upstream;
    let config = MirrorConfig::docker_io(&upstream.url()).with_setting("htpasswd_file", htpasswd.display().to_string());
    let mirror = Mirror::start(config)?;

    let challenge = raw_request(mirror.host(), "GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    ensure!(challenge.starts_with("HTTP/1.1 401"), "{challenge}");
    ensure!(challenge.to_ascii_lowercase().contains("www-authenticate: basic realm=\"regmirror\""), "{challenge}");
    // Probes and metrics stay open.
    let health = raw_request(mirror.host(), "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    ensure!(health.starts_with("HTTP/1.1 200"), "{health}");

    let image = &shared::plain()?.fixtures.alpine;
    let pull = |creds: &str| -> Result<()> {
        let out = Scratch::new("skopeo-creds")?;
        run(process::tool("skopeo")?
            .args(["--override-os", "linux", "--override-arch", ARCHITECTURE, "--insecure-policy", "copy"])
            .args(["--src-tls-verify=false", "--src-creds", creds])
            .arg(format!("docker://{}/{}:{}", mirror.host(), image.repository, image.tag))
            .arg(format!("dir:{}", out.join("image").display())))?;
        Ok(())
    };
    pull("alice:wonderland").context("the right password")?;
    ensure!(pull("alice:looking-glass").is_err(), "a wrong password pulled");
    ensure!(pull("mallory:wonderland").is_err(), "an unknown user pulled");
    ensure!(!mirror.log()?.contains("wonderland"), "the password reached the log");
    Ok(())
}

#[test]
fn slow_header_clients_do_not_stop_a_real_pull() -> Result<()> {
    let upstream = &shared::plain()?.registry.upstream;
    let mirror = Mirror::start(MirrorConfig::docker_io(&upstream.url()))?;
    // Two hundred connections that send half a request line and then dawdle.
    let slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut stream = TcpStream::connect(mirror.host())?;
            stream.write_all(b"GET /v2/ HTTP/1.1\r\nHost: slow\r\nX-Slow: ")?;
            Ok(stream)
        })
        .collect::<Result<_>>()?;
    let image = &shared::plain()?.fixtures.busybox;
    Skopeo::new(mirror.host())?.pull(&image.by_tag())?.check(image).context("a pull beside slow clients")?;
    drop(slow);
    Ok(())
}

#[test]
fn request_bodies_are_refused() -> Result<()> {
    let upstream = &shared::plain()?.registry.upstream;
    let mirror = Mirror::start(MirrorConfig::docker_io(&upstream.url()))?;
    let answer = raw_request(
        mirror.host(),
        "GET /v2/library/alpine/manifests/3.20 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )?;
    ensure!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    ensure!(answer.contains("SIZE_INVALID"), "{answer}");
    Ok(())
}

/// Sends `request` as written and returns the whole answer (the server closes the connection).
fn raw_request(host: &str, request: &str) -> Result<String> {
    let mut stream = TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
