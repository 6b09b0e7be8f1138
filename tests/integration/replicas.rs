//! Several mirror replicas sharing a real Garage cluster as their shared tier: they must act
//! as one cache. The upstream's access log proves how often it was asked; the replicas'
//! `regmirror_fills_total{source}` say where each blob came from.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest as _, Sha256};

use crate::harness::clients::PullClient;
use crate::harness::clients::skopeo::Skopeo;
use crate::harness::garage::{Bucket, GarageCluster};
use crate::harness::http;
use crate::harness::images::{ARCHITECTURE, Fixture, PushedImage, digest_of};
use crate::harness::mirror::{Mirror, MirrorConfig};
use crate::harness::shared;
use crate::harness::wait;

/// Polls `condition` until it holds.
fn until(what: &str, timeout: Duration, mut condition: impl FnMut() -> Result<bool>) -> Result<()> {
    wait::poll(what, timeout, || Ok(condition()?.then_some(())))
}

/// A free loopback port for a replica that must know its address before it starts.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The `[storage]` table for `bucket` on `garage`, through node `node`.
fn storage(garage: &GarageCluster, bucket: &Bucket, node: usize, extra: &[(&str, toml::Value)]) -> toml::Value {
    let mut table = toml::Table::new();
    table.insert("backend".into(), "s3".into());
    table.insert("endpoint".into(), garage.endpoint(node).into());
    table.insert("bucket".into(), bucket.name.clone().into());
    table.insert("region".into(), garage.region().into());
    table.insert("access_key_id_env".into(), "TEST_S3_KEY_ID".into());
    table.insert("secret_access_key_env".into(), "TEST_S3_SECRET".into());
    for (key, value) in extra {
        table.insert((*key).into(), value.clone());
    }
    toml::Value::Table(table)
}

/// A replica of a cluster whose members listen on `ports`; this one is `ports[me]`.
fn replica_config(upstream: &str, storage: toml::Value, bucket: &Bucket, ports: &[u16], me: usize) -> MirrorConfig {
    let urls: Vec<toml::Value> = ports.iter().map(|p| format!("http://127.0.0.1:{p}").into()).collect();
    let mut cluster = toml::Table::new();
    cluster.insert("advertise".into(), urls[me].clone());
    cluster.insert("replicas".into(), toml::Value::Array(urls));
    with_keys(MirrorConfig::docker_io(upstream), bucket)
        .with_setting("storage", storage)
        .with_setting("cluster", toml::Value::Table(cluster))
        .with_env("REGMIRROR_LISTEN", &format!("127.0.0.1:{}", ports[me]))
}

fn with_keys(config: MirrorConfig, bucket: &Bucket) -> MirrorConfig {
    config.with_env("TEST_S3_KEY_ID", &bucket.access_key_id).with_env("TEST_S3_SECRET", &bucket.secret_access_key)
}

fn start_replicas(upstream: &str, garage: &GarageCluster, bucket: &Bucket, count: usize) -> Result<Vec<Mirror>> {
    let ports = (0..count).map(|_| free_port()).collect::<Result<Vec<_>>>()?;
    let replicas = (0..count)
        .map(|me| {
            let storage = storage(garage, bucket, me % garage.node_count(), &[]);
            Mirror::start_named(
                &crate::harness::workdir::test_scoped(&format!("replica{me}")),
                replica_config(upstream, storage, bucket, &ports, me),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    wait_until_they_see_each_other(&replicas)?;
    Ok(replicas)
}

/// Replicas probe each other every 2 s; until then one started before the others counts
/// them as down and would fill alone.
fn wait_until_they_see_each_other(replicas: &[Mirror]) -> Result<()> {
    until("the replicas to see each other", Duration::from_secs(20), || {
        for replica in replicas {
            if replica.counter("regmirror_replicas_live", &[])? < replicas.len() as f64 {
                return Ok(false);
            }
        }
        Ok(true)
    })
}

fn fills(mirror: &Mirror, source: &str) -> Result<f64> {
    mirror.counter("regmirror_fills_total", &[("source", source)])
}

fn bucket_name(test: &str) -> String {
    format!("t-{test}-{}", std::process::id())
}

/// Waits until the shared tier holds every blob of `image` (uploads run after the pull).
fn wait_for_uploads(garage: &GarageCluster, bucket: &Bucket, image: &PushedImage) -> Result<()> {
    let store = s3(garage, bucket, 0)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for blob in &image.platform(ARCHITECTURE)?.blobs {
        let key = object_store::path::Path::from(format!("blobs/sha256/{}", blob.digest.trim_start_matches("sha256:")));
        until("the upload", Duration::from_secs(30), || Ok(runtime.block_on(store.head(&key)).is_ok()))
            .with_context(|| format!("blob {} never reached the shared tier", blob.digest))?;
    }
    Ok(())
}

fn s3(garage: &GarageCluster, bucket: &Bucket, node: usize) -> Result<object_store::aws::AmazonS3> {
    Ok(object_store::aws::AmazonS3Builder::new()
        .with_endpoint(garage.endpoint(node))
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_bucket_name(&bucket.name)
        .with_region(garage.region())
        .with_access_key_id(&bucket.access_key_id)
        .with_secret_access_key(&bucket.secret_access_key)
        .build()?)
}

#[test]
fn replicas_download_each_blob_once_and_share_it() -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let garage = GarageCluster::shared();
    let bucket = garage.create_bucket(&bucket_name("once"))?;
    let repository = "replicas/alpine";
    let image = shared.registry.push(Fixture::Alpine, repository)?;
    let replicas = start_replicas(&upstream.url(), garage, &bucket, 3)?;
    let blobs = &image.platform(ARCHITECTURE)?.blobs;

    // Cold pulls through all three replicas at once, two clients each.
    let mark = upstream.mark()?;
    let clients = replicas.iter().chain(&replicas).map(|r| Skopeo::new(r.host())).collect::<Result<Vec<_>>>()?;
    let reference = image.by_tag();
    std::thread::scope(|scope| {
        let pulls: Vec<_> = clients
            .iter()
            .map(|client| scope.spawn(|| client.pull(&reference).and_then(|pulled| pulled.check(&image))))
            .collect();
        pulls.into_iter().try_for_each(|p| p.join().expect("a pull thread panicked"))
    })?;
    let fetches = upstream.blob_fetches_since(&mark, repository)?;
    ensure!(fetches == blobs.len(), "6 clients on 3 replicas: {fetches} upstream blob GETs for {} blobs", blobs.len());
    // The tag's owner asked the upstream for everyone (a pull that counts on Docker Hub).
    let manifest_gets = upstream.count_since(&mark, "GET", &format!("/v2/{repository}/manifests/*"))?;
    ensure!(manifest_gets == 1, "6 clients on 3 replicas: {manifest_gets} upstream manifest GETs");
    let mut by_source = [0.0; 3];
    for replica in &replicas {
        for (i, source) in ["upstream", "peer", "shared"].iter().enumerate() {
            by_source[i] += fills(replica, source)?;
        }
    }
    ensure!(by_source[0] == blobs.len() as f64, "fills from the upstream: {by_source:?}");
    ensure!(by_source[1] + by_source[2] == 2.0 * blobs.len() as f64, "fills from peers or shared: {by_source:?}");

    // A new replica (another site's, say) with an empty disk: everything comes from the
    // shared tier, the tag record included, and the upstream is not asked at all.
    wait_for_uploads(garage, &bucket, &image)?;
    let newcomer = Mirror::start_named(
        &crate::harness::workdir::test_scoped("newcomer"),
        with_keys(MirrorConfig::docker_io(&upstream.url()), &bucket)
            .with_setting("storage", storage(garage, &bucket, 1, &[])),
    )?;
    let mark = upstream.mark()?;
    Skopeo::new(newcomer.host())?.pull(&reference)?.check(&image)?;
    let asked = upstream.requests_since(&mark)?;
    ensure!(
        !asked.iter().any(|r| r.path.contains(repository)),
        "the upstream was asked {:?}",
        asked.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    ensure!(fills(&newcomer, "shared")? == blobs.len() as f64, "the newcomer filled from the shared tier");
    Ok(())
}

#[test]
fn a_replica_killed_mid_fill_costs_its_peers_nothing() -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let garage = GarageCluster::shared();
    let bucket = garage.create_bucket(&bucket_name("kill"))?;
    let repository = "replicas/killed";
    let image = shared.registry.push(Fixture::Alpine, repository)?;
    let layer = image.platform(ARCHITECTURE)?.blobs.iter().max_by_key(|b| b.size).expect("layers").clone();

    // Slow fills (the 3 MiB layer takes ~6 s) leave time to kill the owner mid-blob.
    let ports = [free_port()?, free_port()?];
    let start = |me: usize| {
        let mut config = replica_config(&upstream.url(), storage(garage, &bucket, me, &[]), &bucket, &ports, me);
        config.upstreams[0].settings.push(("max_bandwidth".into(), "512KiB".into()));
        config
    };
    let (owner, other) = if owner_of(&ports, &layer.digest) == 0 { (0, 1) } else { (1, 0) };
    let mut replicas: Vec<Option<Mirror>> = vec![None, None];
    for me in [owner, other] {
        let name = crate::harness::workdir::test_scoped(&format!("replica{me}"));
        replicas[me] = Some(Mirror::start_named(&name, start(me))?);
    }
    let started: Vec<&Mirror> = replicas.iter().flatten().collect();
    until("the replicas to see each other", Duration::from_secs(20), || {
        Ok(started.iter().all(|r| r.counter("regmirror_replicas_live", &[]).unwrap_or(0.0) == 2.0))
    })?;
    let other_url = replicas[other].as_ref().expect("started").url();

    let mark = upstream.mark()?;
    let url = format!("{other_url}/v2/{repository}/blobs/{}", layer.digest);
    let download = std::thread::spawn(move || http::get_bytes(&url));
    let owner_mirror = replicas[owner].take().expect("started");
    until("the owner's fill", Duration::from_secs(20), || {
        Ok(owner_mirror.counter("regmirror_inflight_fetches", &[])? > 0.0
            && owner_mirror.counter("regmirror_upstream_bytes_total", &[])? > 256.0 * 1024.0)
    })
    .context("the owner never started filling the layer")?;
    drop(owner_mirror); // SIGKILL, mid-fill

    let bytes = download.join().expect("download thread panicked").context("the surviving replica's download")?;
    ensure!(digest_of(&bytes) == layer.digest, "the surviving replica served the wrong bytes");
    let other = replicas[other].as_ref().expect("started");
    ensure!(fills(other, "upstream")? == 1.0, "the survivor finished the fill from the upstream");
    let gets = upstream.count_since(&mark, "GET", &format!("/v2/{repository}/blobs/{}", layer.digest))?;
    ensure!(gets == 2, "{gets} upstream GETs: the owner's, and the survivor's resume");
    // The shared tier got the whole, verified blob from the survivor, and nothing partial
    // from the owner.
    let store = s3(garage, &bucket, 0)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let key = object_store::path::Path::from(format!("blobs/sha256/{}", layer.digest.trim_start_matches("sha256:")));
    until("the survivor's upload", Duration::from_secs(30), || Ok(runtime.block_on(store.head(&key)).is_ok()))?;
    check_every_shared_blob(&store, &runtime)
}

/// Every blob object in the shared tier hashes to the digest in its key.
fn check_every_shared_blob(store: &object_store::aws::AmazonS3, runtime: &tokio::runtime::Runtime) -> Result<()> {
    use futures_util::TryStreamExt;
    let objects: Vec<_> = runtime.block_on(store.list(Some(&"blobs".into())).try_collect::<Vec<_>>())?;
    ensure!(!objects.is_empty(), "no blob in the shared tier");
    for object in objects {
        let bytes = runtime.block_on(async { store.get(&object.location).await?.bytes().await })?;
        let name = object.location.filename().unwrap_or_default().to_owned();
        ensure!(digest_of(&bytes) == format!("sha256:{name}"), "shared object {} holds other bytes", object.location);
    }
    Ok(())
}

/// Which of the replicas on `ports` owns `digest` (the mirror's rendezvous hash).
fn owner_of(ports: &[u16], digest: &str) -> usize {
    let score = |port: &u16| {
        let mut hasher = Sha256::new();
        hasher.update(format!("http://127.0.0.1:{port}/").as_bytes());
        hasher.update([0]);
        hasher.update(digest.as_bytes());
        u64::from_be_bytes(hasher.finalize()[..8].try_into().expect("32 bytes"))
    };
    (0..ports.len()).max_by_key(|i| score(&ports[*i])).expect("replicas")
}

#[test]
fn a_corrupt_shared_object_is_never_served_and_gets_replaced() -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let garage = GarageCluster::shared();
    let bucket = garage.create_bucket(&bucket_name("corrupt"))?;
    let repository = "replicas/corrupt";
    let image = shared.registry.push(Fixture::Busybox, repository)?;
    let layer = image.platform(ARCHITECTURE)?.blobs.iter().max_by_key(|b| b.size).expect("layers").clone();
    let key = object_store::path::Path::from(format!("blobs/sha256/{}", layer.digest.trim_start_matches("sha256:")));
    let store = s3(garage, &bucket, 0)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(store.put(&key, vec![0u8; layer.size as usize].into()))?;

    let mirror = Mirror::start(
        with_keys(MirrorConfig::docker_io(&upstream.url()), &bucket)
            .with_setting("storage", storage(garage, &bucket, 0, &[])),
    )?;
    let url = format!("{}/v2/{repository}/blobs/{}", mirror.url(), layer.digest);
    ensure!(http::get_bytes(&url).is_err(), "the wrong bytes were served as a complete blob");
    ensure!(mirror.counter("regmirror_digest_mismatches_total", &[])? == 1.0, "the mismatch is counted");
    let bytes = http::get_bytes(&url).context("the second pull, from the upstream")?;
    ensure!(digest_of(&bytes) == layer.digest, "wrong bytes on the second pull");
    until("the right bytes", Duration::from_secs(30), || {
        let stored = runtime.block_on(async { store.get(&key).await?.bytes().await });
        Ok(stored.is_ok_and(|b| digest_of(&b) == layer.digest))
    })
    .context("the shared tier never got the right bytes")?;
    Ok(())
}

#[test]
fn an_unreachable_object_store_leaves_the_local_tier_serving() -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let closed = free_port()?;
    let bucket = Bucket { name: "none".into(), access_key_id: "GKnone".into(), secret_access_key: "none".into() };
    let mut table = toml::Table::new();
    for (key, value) in [
        ("backend", "s3".to_owned()),
        ("endpoint", format!("http://127.0.0.1:{closed}")),
        ("bucket", "none".to_owned()),
        ("access_key_id_env", "TEST_S3_KEY_ID".to_owned()),
        ("secret_access_key_env", "TEST_S3_SECRET".to_owned()),
    ] {
        table.insert(key.into(), value.into());
    }
    let mirror = Mirror::start(
        with_keys(MirrorConfig::docker_io(&upstream.url()), &bucket).with_setting("storage", toml::Value::Table(table)),
    )?;
    let image = &shared.fixtures.busybox;
    Skopeo::new(mirror.host())?.pull(&image.by_tag())?.check(image)?;
    Skopeo::new(mirror.host())?.pull(&image.by_digest())?.check(image)?;
    let ready = http::get(&format!("{}/readyz", mirror.url()))?;
    ensure!(ready.status == 200, "/readyz answered {}: {}", ready.status, ready.body);
    ensure!(ready.body.contains("shared storage") && ready.body.contains("down"), "/readyz says: {}", ready.body);
    ensure!(mirror.counter("regmirror_shared_up", &[])? == 0.0, "regmirror_shared_up is 0");
    ensure!(!mirror.log()?.contains("none\""), "no secret in the log");
    Ok(())
}

#[test]
fn the_shared_tier_stays_under_its_bound() -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let garage = GarageCluster::shared();
    let bucket = garage.create_bucket(&bucket_name("bound"))?;
    let bound: u64 = 4 << 20;
    let extra = [("shared_max_size", "4MiB".into()), ("maintenance_interval", "1s".into())];
    let mirror = Mirror::start(
        with_keys(MirrorConfig::docker_io(&upstream.url()), &bucket)
            .with_setting("storage", storage(garage, &bucket, 2, &extra)),
    )?;
    // 6 MiB of alpine then 2 MiB of busybox: the oldest objects must go.
    for image in [&shared.fixtures.alpine, &shared.fixtures.busybox] {
        Skopeo::new(mirror.host())?.pull(&image.by_tag())?.check(image)?;
        std::thread::sleep(Duration::from_millis(50)); // distinct access times
    }
    wait_for_uploads(garage, &bucket, &shared.fixtures.busybox)?;
    let store = s3(garage, &bucket, 0)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let stored = || -> Result<u64> {
        use futures_util::TryStreamExt;
        let mut total = 0;
        for prefix in ["blobs", "manifests"] {
            let listing: Vec<_> = runtime.block_on(store.list(Some(&prefix.into())).try_collect::<Vec<_>>())?;
            total += listing.iter().map(|o| o.size).sum::<u64>();
        }
        Ok(total)
    };
    until("the bound", Duration::from_secs(30), || Ok(stored()? <= bound))
        .context("the shared tier never fit its bound")?;
    ensure!(mirror.counter("regmirror_shared_evictions_total", &[])? > 0.0, "evictions are counted");
    // The most recent image survived: busybox's blobs are all still there.
    for blob in &shared.fixtures.busybox.platform(ARCHITECTURE)?.blobs {
        let key = object_store::path::Path::from(format!("blobs/sha256/{}", blob.digest.trim_start_matches("sha256:")));
        ensure!(runtime.block_on(store.head(&key)).is_ok(), "recent blob {} was evicted", blob.digest);
    }
    Ok(())
}

#[test]
fn the_local_tier_stays_bounded_and_refills_from_the_shared_tier() -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let garage = GarageCluster::shared();
    let bucket = garage.create_bucket(&bucket_name("local"))?;
    let repository = "replicas/local-bound";
    let image = shared.registry.push(Fixture::Alpine, repository)?;
    let bound = 4u64 << 20;
    let mirror = Mirror::start(
        with_keys(MirrorConfig::docker_io(&upstream.url()), &bucket)
            .with_setting("storage", storage(garage, &bucket, 1, &[]))
            .with_max_cache_size("4MiB"),
    )?;
    Skopeo::new(mirror.host())?.pull(&image.by_tag())?.check(&image)?;
    ensure!(mirror.counter("regmirror_cache_size_bytes", &[])? <= bound as f64, "the local tier exceeds its bound");
    ensure!(mirror.counter("regmirror_evictions_total", &[])? > 0.0, "the 6 MiB image evicted something locally");
    wait_for_uploads(garage, &bucket, &image)?;

    // What the local tier evicted comes back from the shared tier, not the upstream.
    let mark = upstream.mark()?;
    Skopeo::new(mirror.host())?.pull(&image.by_tag())?.check(&image)?;
    ensure!(upstream.blob_fetches_since(&mark, repository)? == 0, "evicted blobs came from the upstream");
    ensure!(fills(&mirror, "shared")? >= 1.0, "evicted blobs came back from the shared tier");
    ensure!(mirror.counter("regmirror_cache_size_bytes", &[])? <= bound as f64, "the local tier exceeds its bound");
    Ok(())
}

/// `seed` fills through the same path as a pull, so what it fetches reaches the shared tier
/// before it exits, and every replica then has it without asking the upstream.
#[test]
fn seeding_one_replica_seeds_them_all() -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let garage = GarageCluster::shared();
    let bucket = garage.create_bucket(&bucket_name("seed"))?;
    let repository = "replicas/seeded";
    let image = shared.registry.push(Fixture::Busybox, repository)?;
    let config = with_keys(MirrorConfig::docker_io(&upstream.url()), &bucket)
        .with_setting("storage", storage(garage, &bucket, 0, &[]));
    let dir = crate::harness::workdir::Scratch::new("seed-shared")?;
    std::fs::write(dir.join("seed.toml"), config.to_toml()?)?;
    let mut seed = std::process::Command::new(env!("CARGO_BIN_EXE_regmirror"));
    seed.args(["seed", "--config"])
        .arg(dir.join("seed.toml"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg(format!("{repository}:{}", image.tag))
        .envs(config.env.iter().map(|(k, v)| (k, v)));
    crate::harness::process::run(&mut seed)?;

    let store = s3(garage, &bucket, 0)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for blob in &image.platform(ARCHITECTURE)?.blobs {
        let key = object_store::path::Path::from(format!("blobs/sha256/{}", blob.digest.trim_start_matches("sha256:")));
        ensure!(runtime.block_on(store.head(&key)).is_ok(), "seed exited before uploading {}", blob.digest);
    }
    let replica = Mirror::start(config)?;
    let mark = upstream.mark()?;
    Skopeo::new(replica.host())?.pull(&image.by_tag())?.check(&image)?;
    ensure!(upstream.blob_fetches_since(&mark, repository)? == 0, "the replica asked the upstream for blobs");
    Ok(())
}

#[test]
fn a_stopped_garage_node_does_not_stop_the_replicas() -> Result<()> {
    let shared = shared::plain()?;
    let upstream = &shared.registry.upstream;
    let garage = GarageCluster::start(3)?;
    let bucket = garage.create_bucket("node-down")?;
    let repository = "replicas/node-down";
    let image = shared.registry.push(Fixture::Busybox, repository)?;
    garage.stop_node(2)?;

    let first = Mirror::start_named(
        &crate::harness::workdir::test_scoped("first"),
        with_keys(MirrorConfig::docker_io(&upstream.url()), &bucket)
            .with_setting("storage", storage(&garage, &bucket, 0, &[])),
    )?;
    Skopeo::new(first.host())?.pull(&image.by_tag())?.check(&image)?;
    wait_for_uploads(&garage, &bucket, &image)?;

    let second = Mirror::start_named(
        &crate::harness::workdir::test_scoped("second"),
        with_keys(MirrorConfig::docker_io(&upstream.url()), &bucket)
            .with_setting("storage", storage(&garage, &bucket, 1, &[])),
    )?;
    let mark = upstream.mark()?;
    Skopeo::new(second.host())?.pull(&image.by_tag())?.check(&image)?;
    ensure!(upstream.blob_fetches_since(&mark, repository)? == 0, "the second replica asked the upstream");
    ensure!(fills(&second, "shared")? >= 1.0, "the second replica read the shared tier");
    garage.start_node(2)?;
    Ok(())
}
