//! The Prometheus metrics of the contract, registered once and handed around as one struct.
//!
//! Labels are bounded by construction: upstream names come from the config, kinds, routes and
//! sources are fixed words, statuses are HTTP status codes. No repository, tag or digest is
//! ever a label value.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// What a cache lookup or upstream request was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Manifest,
    Tags,
    Referrers,
    Token,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Manifest => "manifest",
            Kind::Tags => "tags",
            Kind::Referrers => "referrers",
            Kind::Token => "token",
        }
    }
}

/// Where served bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Upstream,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Upstream => "upstream",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub cache_hits: IntCounterVec,
    pub cache_misses: IntCounterVec,
    pub bytes_served: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_request_duration: HistogramVec,
    pub upstream_bytes: IntCounterVec,
    pub cache_size_bytes: IntGauge,
    pub cache_max_size_bytes: IntGauge,
    pub cache_blobs: IntGauge,
    pub evictions: IntCounter,
    pub evicted_bytes: IntCounter,
    pub inflight_fetches: IntGauge,
    pub digest_mismatches: IntCounterVec,
    pub upstream_ratelimit_remaining: IntGaugeVec,
    pub upstream_up: IntGaugeVec,
    pub cache_store_failures: IntCounter,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub fills: IntCounterVec,
    pub shared_requests: IntCounterVec,
    pub shared_up: IntGauge,
    pub shared_evictions: IntCounter,
    pub shared_evicted_bytes: IntCounter,
    pub replicas_live: IntGauge,
}

/// Registry round trips: a cached answer takes well under a millisecond, a cold layer minutes.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let ratelimit = IntGaugeVec::new(
            Opts::new(
                "regmirror_upstream_ratelimit_remaining",
                "Pulls left in the upstream's rate-limit window, from its ratelimit-remaining header.",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        registry.register(Box::new(ratelimit.clone())).expect("unique metric");
        let upstream_up = IntGaugeVec::new(
            Opts::new(
                "regmirror_upstream_up",
                "1 while the upstream is asked, 0 while it is marked down after repeated failures.",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        registry.register(Box::new(upstream_up.clone())).expect("unique metric");

        let metrics = Metrics {
            cache_hits: counter_vec("regmirror_cache_hits_total", "Requests answered from the cache.", &["kind"]),
            cache_misses: counter_vec(
                "regmirror_cache_misses_total",
                "Requests that had to go to the upstream.",
                &["kind"],
            ),
            bytes_served: counter_vec(
                "regmirror_bytes_served_total",
                "Body bytes sent to clients, by where they came from.",
                &["source"],
            ),
            upstream_requests: counter_vec(
                "regmirror_upstream_requests_total",
                "Requests sent to upstream registries, by response status (\"error\" when none came).",
                &["upstream", "kind", "status"],
            ),
            upstream_request_duration: histogram_vec(
                "regmirror_upstream_request_duration_seconds",
                "Time to the upstream's response headers.",
                &["upstream", "kind"],
            ),
            upstream_bytes: counter_vec(
                "regmirror_upstream_bytes_total",
                "Body bytes received from upstream registries.",
                &["upstream"],
            ),
            cache_size_bytes: gauge("regmirror_cache_size_bytes", "Bytes held in the cache."),
            cache_max_size_bytes: gauge("regmirror_cache_max_size_bytes", "The configured cache bound."),
            cache_blobs: gauge("regmirror_cache_blobs", "Blobs held in the cache."),
            evictions: counter("regmirror_evictions_total", "Blobs evicted to stay under the bound."),
            evicted_bytes: counter("regmirror_evicted_bytes_total", "Bytes evicted to stay under the bound."),
            inflight_fetches: gauge(
                "regmirror_inflight_fetches",
                "Blob fills in progress (from an upstream, or in a cluster from the shared tier or a replica).",
            ),
            digest_mismatches: counter_vec(
                "regmirror_digest_mismatches_total",
                "Upstream answers whose content did not match their digest (never cached).",
                &["upstream"],
            ),
            upstream_ratelimit_remaining: ratelimit,
            upstream_up,
            cache_store_failures: counter(
                "regmirror_cache_store_failures_total",
                "Fills whose bytes could not be written to the cache (e.g. disk full).",
            ),
            http_requests: counter_vec(
                "regmirror_http_requests_total",
                "Requests from clients, by method, route and status.",
                &["method", "route", "status"],
            ),
            http_request_duration: histogram_vec(
                "regmirror_http_request_duration_seconds",
                "Time to the response headers of client requests.",
                &["route"],
            ),
            fills: counter_vec(
                "regmirror_fills_total",
                "Blob downloads into this replica's cache, by where the bytes came from \
                 (upstream, shared object store, or the replica that owns the blob).",
                &["source"],
            ),
            shared_requests: counter_vec(
                "regmirror_shared_requests_total",
                "Requests to the shared object store, by operation and result (ok, not_found, error).",
                &["op", "result"],
            ),
            shared_up: gauge(
                "regmirror_shared_up",
                "1 while the shared object store answers, 0 while it is marked down (the local tier still serves).",
            ),
            shared_evictions: counter(
                "regmirror_shared_evictions_total",
                "Objects this replica deleted from the shared tier to keep it under shared_max_size.",
            ),
            shared_evicted_bytes: counter(
                "regmirror_shared_evicted_bytes_total",
                "Bytes this replica deleted from the shared tier to keep it under shared_max_size.",
            ),
            replicas_live: gauge(
                "regmirror_replicas_live",
                "Replicas of the cluster this replica sees as up, itself included.",
            ),
            registry,
        };
        metrics.pre_create_label_sets();
        metrics
    }

    /// Creates the fixed label sets with value 0, so dashboards and `rate()` see every series
    /// from the first scrape instead of a gap until the first event.
    fn pre_create_label_sets(&self) {
        for kind in ["blob", "manifest"] {
            self.cache_hits.with_label_values(&[kind]);
            self.cache_misses.with_label_values(&[kind]);
        }
        for source in ["cache", "upstream"] {
            self.bytes_served.with_label_values(&[source]);
        }
        for source in ["upstream", "shared", "peer"] {
            self.fills.with_label_values(&[source]);
        }
    }

    /// Creates the per-upstream series with value 0 (see [`Self::pre_create_label_sets`]).
    pub fn register_upstream(&self, name: &str) {
        self.upstream_bytes.with_label_values(&[name]);
        self.digest_mismatches.with_label_values(&[name]);
    }

    pub fn hit(&self, kind: Kind) {
        self.cache_hits.with_label_values(&[kind.as_str()]).inc();
    }

    pub fn miss(&self, kind: Kind) {
        self.cache_misses.with_label_values(&[kind.as_str()]).inc();
    }

    pub fn served(&self, source: Source, bytes: u64) {
        self.bytes_served.with_label_values(&[source.as_str()]).inc_by(bytes);
    }

    pub fn upstream_duration(&self, upstream: &str, kind: Kind) -> Histogram {
        self.upstream_request_duration.with_label_values(&[upstream, kind.as_str()])
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("encoding to a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_exposed() {
        let m = Metrics::new();
        m.register_upstream("docker.io");
        m.upstream_ratelimit_remaining.with_label_values(&["docker.io"]).set(99);
        m.upstream_requests.with_label_values(&["docker.io", "blob", "200"]).inc();
        m.upstream_duration("docker.io", Kind::Blob).observe(0.1);
        m.http_requests.with_label_values(&["GET", "blob", "200"]).inc();
        m.http_request_duration.with_label_values(&["blob"]).observe(0.1);
        let text = String::from_utf8(m.encode()).unwrap();
        for name in [
            "regmirror_cache_hits_total{kind=\"blob\"}",
            "regmirror_cache_misses_total{kind=\"manifest\"}",
            "regmirror_bytes_served_total{source=\"cache\"}",
            "regmirror_upstream_requests_total{",
            "regmirror_upstream_request_duration_seconds_bucket{",
            "regmirror_upstream_bytes_total{upstream=\"docker.io\"}",
            "regmirror_cache_size_bytes",
            "regmirror_cache_max_size_bytes",
            "regmirror_cache_blobs",
            "regmirror_evictions_total",
            "regmirror_evicted_bytes_total",
            "regmirror_inflight_fetches",
            "regmirror_digest_mismatches_total{upstream=\"docker.io\"}",
            "regmirror_upstream_ratelimit_remaining{upstream=\"docker.io\"}",
            "regmirror_http_requests_total{",
            "regmirror_http_request_duration_seconds_bucket{",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
