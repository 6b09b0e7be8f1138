//! The mirror in front of the shared token-auth upstream: it follows the
//! bearer-token challenge, caches tokens per scope, authenticates with
//! configured credentials where anonymous pulls are refused, and never
//! writes a password or a token to its log or its metrics.

use anyhow::{Result, ensure};

use crate::harness::clients::PullClient;
use crate::harness::clients::skopeo::Skopeo;
use crate::harness::images::{ARCHITECTURE, Fixture, PushedImage};
use crate::harness::mirror::{Mirror, MirrorConfig, Secret};
use crate::harness::shared;
use crate::harness::token::PRIVATE_NAMESPACE;
use crate::harness::workdir::Scratch;

#[test]
fn mirror_pulls_from_token_upstream_and_reuses_tokens() -> Result<()> {
    let shared = shared::token_auth()?;
    let (upstream, issuer) = (&shared.registry.upstream, shared.registry.issuer()?);
    let image = &shared.fixtures.alpine;
    let mirror = Mirror::start(MirrorConfig::docker_io(&upstream.url()))?;

    let (log_mark, token_mark) = (upstream.mark()?, issuer.mark());
    pull(&mirror, image)?;
    let blob_path = format!("/v2/{}/blobs/", image.repository);
    let blobs_fetched = upstream
        .requests_since(&log_mark)?
        .iter()
        .filter(|request| request.method == "GET" && request.status == 200)
        .filter(|request| request.path.starts_with(&blob_path))
        .count();
    let token_requests =
        issuer.requests_since(&token_mark).iter().filter(|request| request.concerns(&image.repository)).count();

    let blobs = image.platform(ARCHITECTURE)?.blobs.len();
    ensure!(blobs_fetched >= blobs, "the mirror fetched {blobs_fetched} blobs upstream for a {blobs}-blob image");
    ensure!(
        (1..=blobs_fetched / 2).contains(&token_requests),
        "{token_requests} token requests for {blobs_fetched} blob fetches: expected one per scope, reused"
    );
    Ok(())
}

#[test]
fn mirror_pulls_private_image_with_password_from_env() -> Result<()> {
    let password = shared::token_auth()?.registry.issuer()?.user().password.clone();
    let password = Secret::Env { variable: "REGMIRROR_TEST_UPSTREAM_PASSWORD".into(), value: password };
    pulls_private_image_with(password, &format!("{PRIVATE_NAMESPACE}env"))
}

#[test]
fn mirror_pulls_private_image_with_password_from_file() -> Result<()> {
    let password = shared::token_auth()?.registry.issuer()?.user().password.clone();
    let dir = Scratch::new("password")?;
    let file = dir.join("password");
    std::fs::write(&file, format!("{password}\n"))?;
    pulls_private_image_with(Secret::File(file), &format!("{PRIVATE_NAMESPACE}file"))
}

/// Anonymous pulls of the private `repository` fail, a mirror configured
/// with the issuer's user and `password` succeeds, and neither the password
/// nor any token shows up in that mirror's log or metrics.
fn pulls_private_image_with(password: Secret, repository: &str) -> Result<()> {
    let shared = shared::token_auth()?;
    let (registry, issuer) = (&shared.registry, shared.registry.issuer()?);
    let user = issuer.user();
    let image = registry.push(Fixture::Alpine, repository)?;
    let anonymous = MirrorConfig::docker_io(&registry.upstream.url());

    let refused = pull(&Mirror::start(anonymous.clone())?, &image);
    ensure!(refused.is_err(), "a mirror without credentials pulled {}", image.by_tag());

    let token_mark = issuer.mark();
    let mirror = Mirror::start(anonymous.with_credentials(&user.username, password))?;
    pull(&mirror, &image)?;
    let authenticated = issuer
        .requests_since(&token_mark)
        .into_iter()
        .any(|request| request.user.as_ref() == Some(&user.username) && request.concerns(&image.repository));
    ensure!(authenticated, "the mirror never asked for a token as {}", user.username);

    let (log, metrics) = (mirror.log()?, mirror.metrics_text()?);
    let tokens = issuer.tokens_issued();
    // A JWT's signature is unique to it; the header is shared by all tokens.
    let signatures = tokens.iter().filter_map(|token| token.rsplit('.').next());
    let secrets = [user.password.clone(), user.basic_encoded()];
    for secret in secrets.iter().map(String::as_str).chain(signatures) {
        ensure!(!log.contains(secret), "the mirror's log contains a secret: {secret}");
        ensure!(!metrics.contains(secret), "the mirror's metrics contain a secret: {secret}");
    }
    Ok(())
}

fn pull(mirror: &Mirror, image: &PushedImage) -> Result<()> {
    Skopeo::new(mirror.host())?.pull(&image.by_tag())?.check(image)
}
