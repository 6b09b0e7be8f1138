//! Micro-benchmarks of the work regmirror does on every request or every fill batch:
//! routing a request line, parsing a digest, hashing a fill batch, and the cache index's
//! bookkeeping with a realistically full index.
//!
//! `cargo bench --bench hot_paths` (add `-- route` to run the benchmarks whose name matches).
//! The end-to-end suite against the peers is `benches/run.sh`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http::Method;
use sha2::{Digest as _, Sha256};

use regmirror::index::{Index, Key};
use regmirror::metrics::Metrics;
use regmirror::reference::Digest;
use regmirror::routes;

const HEX: &str = "4abcf20661432fb2d719aaf90656f55c287f8ca915dc1c92ec14ff61e67fbaf8";

fn route_parse(c: &mut Criterion) {
    let blob = format!("/v2/library/alpine/blobs/sha256:{HEX}");
    let manifest_by_digest = format!("/v2/library/alpine/manifests/sha256:{HEX}");
    let paths = [
        ("blob", blob.as_str()),
        ("manifest_tag", "/v2/library/alpine/manifests/3.20"),
        ("manifest_digest", manifest_by_digest.as_str()),
        ("nested_name_tag", "/v2/org/team/project/tool/manifests/v1.2.3-rc_1"),
        ("api_base", "/v2/"),
    ];
    let mut group = c.benchmark_group("routes::parse");
    for (name, path) in paths {
        group.bench_function(name, |b| b.iter(|| routes::parse(black_box(&Method::GET), black_box(path))));
    }
    group.finish();
}

fn digest_parse(c: &mut Criterion) {
    let digest = format!("sha256:{HEX}");
    c.bench_function("Digest::parse", |b| b.iter(|| Digest::parse(black_box(&digest))));
}

/// A fill hashes what it writes in batches of up to 1 MiB (`MAX_WRITE_BATCH` in `fetch`):
/// this is the ceiling sha256 puts on a cold pull's throughput, per core.
fn sha256_batch(c: &mut Criterion) {
    let batch = vec![0x5a_u8; 1 << 20];
    let mut group = c.benchmark_group("sha256");
    group.throughput(Throughput::Bytes(batch.len() as u64));
    group.bench_function("1MiB_update", |b| {
        b.iter_batched_ref(Sha256::new, |hasher| hasher.update(black_box(&batch)), BatchSize::SmallInput)
    });
    group.bench_function("1MiB_digest", |b| b.iter(|| Sha256::digest(black_box(&batch))));
    group.finish();
}

const ENTRIES: u32 = 100_000;
const KIB: u64 = 1024;

fn key(n: u32) -> Key {
    Key::Blob(Digest::of(&n.to_le_bytes()))
}

/// An index holding `ENTRIES` blobs of 1 KiB, bounded at exactly that much.
fn full_index() -> Index {
    let index = Index::new(u64::from(ENTRIES) * KIB, Arc::new(Metrics::new()), Box::new(|_| {}));
    for n in 0..ENTRIES {
        index.insert(key(n), KIB);
    }
    index.enforce();
    index
}

fn index(c: &mut Criterion) {
    let keys: Vec<Key> = (0..ENTRIES).map(key).collect();
    let index = full_index();
    let mut group = c.benchmark_group("index_100k");

    // What every cached blob or manifest request does: record a use of a known entry.
    let mut n = 0;
    group.bench_function("touch_hit", |b| {
        b.iter(|| {
            n = (n + 7919) % keys.len();
            index.touch(black_box(&keys[n]))
        })
    });
    let absent = key(ENTRIES + 1);
    group.bench_function("touch_miss", |b| b.iter(|| index.touch(black_box(&absent))));

    // What a fill's commit does: a new entry, and the eviction of the least recently used
    // one to stay under the bound.
    let mut next = ENTRIES * 2;
    group.bench_function("insert_enforce_evict", |b| {
        b.iter_batched(
            || {
                next += 1;
                key(next)
            },
            |new| {
                index.insert(new, KIB);
                index.enforce();
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// What startup does after listing the cache: every file into an empty index, oldest first,
/// then one `enforce`. Compare with the startup time `benches/run.sh` measures.
fn index_replay(c: &mut Criterion) {
    let keys: Vec<Key> = (0..ENTRIES).map(key).collect();
    let mut group = c.benchmark_group("index_100k");
    group.sample_size(10);
    group.bench_function("startup_replay", |b| {
        b.iter(|| {
            let index = Index::new(50 << 30, Arc::new(Metrics::new()), Box::new(|_| {}));
            for key in &keys {
                index.insert(*key, KIB);
            }
            index.enforce();
            index
        })
    });
    group.finish();
}

criterion_group!(hot_paths, route_parse, digest_parse, sha256_batch, index, index_replay);
criterion_main!(hot_paths);
