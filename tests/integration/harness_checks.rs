//! The harness against the real registries directly, with no mirror
//! involved: clients use the upstream itself as docker.io's mirror.
//!
//! These pass whatever state the mirror is in. They show that the fixtures
//! are what the other tests assume, that every client's pull really fetches
//! every blob (so "zero upstream blob GETs" on a warm pull through the
//! mirror means something), that the access-log counts are exact, that
//! the token issuer enforces its policy, and that the Garage cluster is one
//! store that survives losing a node.

use anyhow::{Context, Result, ensure};
use object_store::ObjectStoreExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};

use crate::harness::clients::PullClient;
use crate::harness::clients::containerd::Ctr;
use crate::harness::clients::podman::Podman;
use crate::harness::clients::skopeo::Skopeo;
use crate::harness::garage::{Bucket, GarageCluster};
use crate::harness::http;
use crate::harness::images::{ARCHITECTURE, Fixture};
use crate::harness::process::{self, run_unchecked};
use crate::harness::shared;
use crate::harness::token::PRIVATE_NAMESPACE;

#[test]
fn fixtures_have_the_intended_shapes() -> Result<()> {
    let fixtures = &shared::plain()?.fixtures;
    let alpine = fixtures.alpine.platform(ARCHITECTURE)?;
    ensure!(fixtures.alpine.platforms.len() == 1 && alpine.blobs.len() == 4);
    ensure!(alpine.manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json");
    let busybox = fixtures.busybox.platform(ARCHITECTURE)?;
    ensure!(
        busybox.manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json",
        "busybox is not schema2: {}",
        busybox.manifest
    );
    let architectures: Vec<&str> =
        fixtures.multi.platforms.iter().map(|platform| platform.architecture.as_str()).collect();
    ensure!(architectures == ["amd64", "arm64"], "multi has {architectures:?}");
    ensure!(fixtures.multi.digest != fixtures.multi.platforms[0].digest);
    Ok(())
}

#[test]
fn access_log_counts_exactly_the_requests_since_a_mark() -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let image = shared.registry.push(Fixture::Busybox, "check-log/busybox")?;
    let mark = upstream.mark()?;
    let blob = &image.platform(ARCHITECTURE)?.blobs[0].digest;
    for _ in 0..3 {
        let url = format!("{}/v2/{}/blobs/{blob}", upstream.url(), image.repository);
        ensure!(http::get(&url)?.status == 200);
    }
    ensure!(upstream.blob_fetches_since(&mark, &image.repository)? == 3);
    ensure!(upstream.count_since(&mark, "GET", "/v2/check-log/*")? == 3);
    ensure!(upstream.count_since(&mark, "HEAD", "/v2/check-log/*")? == 0);
    ensure!(upstream.blob_fetches_since(&upstream.mark()?, &image.repository)? == 0);
    Ok(())
}

#[test]
fn skopeo_pulls_straight_from_the_upstream() -> Result<()> {
    pulls_straight_from_the_upstream(Skopeo::new)
}

#[test]
fn ctr_pulls_straight_from_the_upstream() -> Result<()> {
    pulls_straight_from_the_upstream(Ctr::new)
}

#[test]
fn podman_pulls_straight_from_the_upstream() -> Result<()> {
    pulls_straight_from_the_upstream(Podman::new)
}

/// The client gets every fixture by tag and by digest, and each pull of an
/// image fetches each of its blobs exactly once: client stores are fresh.
fn pulls_straight_from_the_upstream<C: PullClient>(client: impl FnOnce(&str) -> Result<C>) -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let client = client(upstream.host())?;
    for image in shared.fixtures.all() {
        for reference in [image.by_tag(), image.by_digest()] {
            client.pull(&reference)?.check(image)?;
        }
    }
    let own = shared.registry.push(Fixture::Alpine, &format!("check-{}/alpine", client.name()))?;
    let blobs = own.platform(ARCHITECTURE)?.blobs.len();
    for attempt in ["first", "second"] {
        let mark = upstream.mark()?;
        client.pull(&own.by_tag())?.check(&own)?;
        let fetched = upstream.blob_fetches_since(&mark, &own.repository)?;
        ensure!(
            fetched == blobs,
            "{} fetched {fetched} blobs on its {attempt} pull of a {blobs}-blob image",
            client.name()
        );
    }
    Ok(())
}

#[test]
fn token_issuer_grants_pull_to_anyone_and_everything_to_its_user() -> Result<()> {
    let shared = shared::token_auth()?;
    let registry = &shared.registry;
    let issuer = registry.issuer()?;
    let user = issuer.user();
    let private = registry.push(Fixture::Alpine, &format!("{PRIVATE_NAMESPACE}check"))?;
    let public = &shared.fixtures.alpine;
    let inspect = |image: &str, credentials: Option<String>| -> Result<bool> {
        let mut skopeo = process::tool("skopeo")?;
        skopeo.args(["inspect", "--raw", "--tls-verify=false"]);
        if let Some(credentials) = credentials {
            skopeo.args(["--creds", &credentials]);
        }
        let reference = format!("docker://{}/{image}", registry.upstream.host());
        Ok(run_unchecked(skopeo.arg(reference))?.status.success())
    };
    let mark = issuer.mark();
    let public_ref = format!("{}:{}", public.repository, public.tag);
    let private_ref = format!("{}:{}", private.repository, private.tag);
    ensure!(inspect(&public_ref, None)?, "anonymous pull of {public_ref} refused");
    ensure!(!inspect(&private_ref, None)?, "anonymous pull of {private_ref} allowed");
    ensure!(inspect(&private_ref, Some(user.colon_joined()))?, "{} refused", user.username);
    let wrong = format!("{}:wrong", user.username);
    ensure!(!inspect(&public_ref, Some(wrong))?, "a wrong password was accepted");
    let requests = issuer.requests_since(&mark);
    let authenticated = requests
        .iter()
        .find(|request| request.user.as_deref() == Some(&user.username))
        .context("no authenticated token request recorded")?;
    ensure!(authenticated.concerns(&private.repository) && authenticated.status == 200);
    ensure!(requests.iter().any(|request| request.status == 401));
    Ok(())
}

/// An object put through node 0 of the shared Garage cluster reads back
/// through node 2: the nodes share one store, as mirror replicas will.
#[test]
fn garage_nodes_serve_one_store() -> Result<()> {
    let cluster = GarageCluster::shared();
    let bucket = cluster.create_bucket("check-one-store")?;
    let location = object_store::path::Path::from("check/one-store");
    let body = b"put through node 0, read through node 2".to_vec();
    runtime()?.block_on(async {
        s3_client(cluster, 0, &bucket)?.put(&location, body.clone().into()).await?;
        let read = s3_client(cluster, 2, &bucket)?.get(&location).await?.bytes().await?;
        ensure!(read == body, "node 2 returned {read:?}");
        Ok(())
    })
}

/// With one of three nodes killed, puts and gets still succeed through the
/// others (replication factor 3, write quorum 2), and the node rejoins with
/// its data.
#[test]
fn garage_survives_one_node_down() -> Result<()> {
    let cluster = GarageCluster::start(3)?;
    let bucket = cluster.create_bucket("check-node-down")?;
    let (before, during) = (object_store::path::Path::from("before"), object_store::path::Path::from("during"));
    let runtime = runtime()?;
    runtime.block_on(s3_client(&cluster, 1, &bucket)?.put(&before, "written by three".into()))?;
    cluster.stop_node(1)?;
    runtime.block_on(async {
        s3_client(&cluster, 0, &bucket)?.put(&during, "written by two".into()).await?;
        let read = s3_client(&cluster, 2, &bucket)?.get(&during).await?.bytes().await?;
        ensure!(read.as_ref() == b"written by two", "node 2 returned {read:?}");
        let read = s3_client(&cluster, 2, &bucket)?.get(&before).await?.bytes().await?;
        ensure!(read.as_ref() == b"written by three", "node 2 returned {read:?}");
        Ok(())
    })?;
    cluster.start_node(1)?;
    let read =
        runtime.block_on(async { anyhow::Ok(s3_client(&cluster, 1, &bucket)?.get(&during).await?.bytes().await?) })?;
    ensure!(read.as_ref() == b"written by two", "the restarted node returned {read:?}");
    Ok(())
}

/// An S3 client for `bucket` through node `node`'s endpoint, path-style.
fn s3_client(cluster: &GarageCluster, node: usize, bucket: &Bucket) -> Result<AmazonS3> {
    Ok(AmazonS3Builder::new()
        .with_endpoint(cluster.endpoint(node))
        .with_bucket_name(&bucket.name)
        .with_region(cluster.region())
        .with_access_key_id(&bucket.access_key_id)
        .with_secret_access_key(&bucket.secret_access_key)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .build()?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}
