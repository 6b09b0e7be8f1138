//! Replicas acting as one cache: which replica downloads a blob, and how the others get it.
//!
//! Every blob digest has one *owner* among the live replicas, chosen by rendezvous (highest
//! random weight) hashing: each replica scores `sha256(replica URL, digest)` and the highest
//! score wins. Every replica computes the same owner from the same member list, without any
//! coordination, and when a replica leaves only the blobs it owned move. The owner fills the
//! blob from its upstream (once, with its single-flight fill) and uploads it to the shared
//! tier; the others stream it from the owner while it fills, or from the shared tier once it
//! is there. A request a replica forwards carries [`PEER_HEADER`], and the receiver never
//! forwards such a request again, so two replicas with different views of the membership
//! cannot bounce a request between them.
//!
//! Object stores offer no reliable lock to build on (Garage ignores `If-None-Match: *` on
//! PUT), and none is needed: the owner is a pure function of the member list, and a replica
//! that cannot reach the owner fills the blob itself. The worst case, while views differ, is
//! one extra upstream download, never a wrong byte (every fill verifies its digest).
//!
//! Membership is the configured list, or the addresses behind a DNS name (a Kubernetes
//! headless Service), re-resolved every few seconds. Peers are probed on `/healthz`; one
//! that does not answer is skipped until it does.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use url::Url;

use crate::config::{ClusterConfig, Credentials};
use crate::metrics::Metrics;
use crate::reference::{Digest, RepoName};
use crate::upstream::health::Health;

/// Marks a request forwarded by another replica: answer it yourself, never forward it.
pub const PEER_HEADER: &str = "x-regmirror-peer";
/// On a forwarded manifest answer by tag: when the owner last confirmed the tag upstream
/// (Unix seconds), so `tag_ttl` counts from there on every replica.
pub const CHECKED_AT_HEADER: &str = "x-regmirror-checked-at";

const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Generous: a replica busy serving must not be taken for a dead one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longer than an upstream's default silence timeout: a peer may be waiting on its upstream.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Cluster {
    me: Url,
    dns: Option<String>,
    /// A std RwLock: read on every owner lookup, written only by the membership refresh.
    members: RwLock<Vec<Arc<Member>>>,
    client: reqwest::Client,
    credentials: Option<Credentials>,
    metrics: Arc<Metrics>,
}

struct Member {
    url: Url,
    /// Down after one failed contact: another replica is skipped at once, not after timeouts.
    health: Health,
}

impl Member {
    fn new(url: Url) -> Arc<Member> {
        Arc::new(Member { url, health: Health::with_threshold(1) })
    }
}

impl Cluster {
    pub fn new(config: &ClusterConfig, metrics: Arc<Metrics>) -> Result<Cluster, reqwest::Error> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()?;
        let mut urls = config.replicas.clone();
        if !urls.contains(&config.advertise) {
            urls.push(config.advertise.clone());
        }
        let members = urls.into_iter().map(Member::new).collect::<Vec<_>>();
        metrics.replicas_live.set(members.len() as i64);
        Ok(Cluster {
            me: config.advertise.clone(),
            dns: config.replicas_dns.clone(),
            members: members.into(),
            client,
            credentials: config.credentials.clone(),
            metrics,
        })
    }

    /// This replica's own URL, as the others know it.
    pub fn me(&self) -> &Url {
        &self.me
    }

    /// The replica that owns `key` among the live ones; `None` when it is this one.
    pub fn owner(&self, key: &[u8]) -> Option<Url> {
        let members = self.members.read().expect("members poisoned");
        let owner = members
            .iter()
            .filter(|m| m.url == self.me || m.health.down_for().is_none())
            .max_by_key(|m| score(&m.url, key))?;
        (owner.url != self.me).then(|| owner.url.clone())
    }

    /// The owner of a blob (see [`Self::owner`]).
    pub fn blob_owner(&self, digest: &Digest) -> Option<Url> {
        self.owner(digest.to_string().as_bytes())
    }

    /// Whether this replica is the one that keeps the shared tier's size bound now.
    pub fn keeps_shared_bound(&self) -> bool {
        self.owner(b"shared-tier-bound").is_none()
    }

    /// GETs a blob from `peer` from byte `offset`, as a forwarded request.
    pub async fn blob(
        &self,
        peer: &Url,
        upstream: &str,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut url = peer.join(&format!("v2/{repo}/blobs/{digest}")).expect("a repository and digest form a path");
        url.query_pairs_mut().append_pair("ns", upstream);
        let mut request = self.peer_get(url);
        if offset > 0 {
            request = request.header(http::header::RANGE, format!("bytes={offset}-"));
        }
        let result = request.send().await;
        let ok = result.as_ref().is_ok_and(|r| !r.status().is_server_error());
        self.record(peer, ok);
        result
    }

    /// GETs a manifest from `peer`, as a forwarded request.
    pub async fn manifest(
        &self,
        peer: &Url,
        upstream: &str,
        repo: &RepoName,
        reference: &str,
        accept: &str,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut url =
            peer.join(&format!("v2/{repo}/manifests/{reference}")).expect("a repository and reference form a path");
        url.query_pairs_mut().append_pair("ns", upstream);
        let result = self.peer_get(url).header(http::header::ACCEPT, accept).send().await;
        let ok = result.as_ref().is_ok_and(|r| !r.status().is_server_error());
        self.record(peer, ok);
        result
    }

    /// A forwarded GET, with Basic auth when configured (a password that cannot be read is
    /// logged, and the request goes without it).
    fn peer_get(&self, url: Url) -> reqwest::RequestBuilder {
        let request = self.client.get(url).header(PEER_HEADER, "1");
        match &self.credentials {
            Some(credentials) => match credentials.password() {
                Ok(password) => request.basic_auth(&credentials.username, Some(password)),
                Err(error) => {
                    tracing::warn!(%error, "cannot read the password for the other replicas");
                    request
                }
            },
            None => request,
        }
    }

    /// Records a contact with `peer`: a failure skips it until a probe succeeds.
    pub fn record(&self, peer: &Url, ok: bool) {
        let members = self.members.read().expect("members poisoned");
        if let Some(member) = members.iter().find(|m| m.url == *peer)
            && member.health.record(ok)
        {
            tracing::warn!(replica = %peer, "replica unreachable: skipped until it answers again");
        }
    }

    /// Refreshes membership and probes the peers, forever. Run it once per process.
    pub async fn run(self: Arc<Self>) {
        let mut interval = tokio::time::interval(PROBE_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Some(dns) = &self.dns {
                self.resolve(dns).await;
            }
            let peers: Vec<_> = {
                let members = self.members.read().expect("members poisoned");
                members.iter().filter(|m| m.url != self.me).cloned().collect()
            };
            let client = &self.client;
            let probes = peers.iter().map(|peer| async move {
                let url = peer.url.join("healthz").expect("a constant path");
                let answer = client.get(url).timeout(PROBE_TIMEOUT).send().await;
                let ok = answer.is_ok_and(|r| r.status().is_success());
                let was_down = peer.health.down_for().is_some();
                peer.health.record(ok);
                if ok && was_down {
                    tracing::info!(replica = %peer.url, "replica answers again");
                }
                ok
            });
            let live = futures_util::future::join_all(probes).await.into_iter().filter(|ok| *ok).count();
            self.metrics.replicas_live.set(live as i64 + 1);
        }
    }

    /// Replaces the members with the addresses `dns` resolves to, keeping the health of
    /// those that stay. A failed lookup keeps the current members.
    async fn resolve(&self, dns: &str) {
        let addresses = match tokio::net::lookup_host(dns).await {
            Ok(addresses) => addresses,
            Err(error) => {
                tracing::warn!(%dns, %error, "cannot resolve the replicas: keeping the current list");
                return;
            }
        };
        let mut urls: Vec<Url> = addresses
            .filter_map(|a| Url::parse(&format!("{}://{a}", self.me.scheme())).ok())
            .chain(std::iter::once(self.me.clone()))
            .collect();
        urls.sort();
        urls.dedup();
        let mut members = self.members.write().expect("members poisoned");
        let current: Vec<_> = members.iter().map(|m| m.url.clone()).collect();
        if current == urls {
            return;
        }
        tracing::info!(replicas = ?urls.iter().map(Url::as_str).collect::<Vec<_>>(), "replica list changed");
        *members = urls
            .into_iter()
            .map(|url| members.iter().find(|m| m.url == url).cloned().unwrap_or_else(|| Member::new(url)))
            .collect();
    }
}

/// A replica's rendezvous weight for `key`.
fn score(replica: &Url, key: &[u8]) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(replica.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(key);
    let hash = hasher.finalize();
    u64::from_be_bytes(hash[..8].try_into().expect("sha256 is 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(me: &str, replicas: &[&str]) -> Cluster {
        let config = ClusterConfig {
            advertise: me.parse().unwrap(),
            replicas: replicas.iter().map(|r| r.parse().unwrap()).collect(),
            replicas_dns: None,
            credentials: None,
        };
        Cluster::new(&config, Arc::new(Metrics::new())).unwrap()
    }

    #[test]
    fn every_replica_agrees_on_the_owner() {
        let replicas = ["http://a:5000", "http://b:5000", "http://c:5000"];
        let views: Vec<_> = replicas.iter().map(|me| cluster(me, &replicas)).collect();
        let mut owned = [0; 3];
        for i in 0..300u32 {
            let key = i.to_be_bytes();
            let owners: Vec<Url> = views.iter().map(|v| v.owner(&key).unwrap_or_else(|| v.me().clone())).collect();
            assert!(owners.windows(2).all(|w| w[0] == w[1]), "views disagree on key {i}");
            owned[replicas.iter().position(|r| owners[0].as_str().starts_with(r)).unwrap()] += 1;
        }
        assert!(owned.iter().all(|n| *n > 60), "keys spread over the replicas: {owned:?}");
    }

    #[tokio::test]
    async fn replicas_come_from_dns_with_this_one_kept() {
        let config = ClusterConfig {
            advertise: "http://127.0.0.1:5999".parse().unwrap(),
            replicas: Vec::new(),
            replicas_dns: Some("localhost:5999".into()),
            credentials: None,
        };
        let cluster = Cluster::new(&config, Arc::new(Metrics::new())).unwrap();
        cluster.resolve("localhost:5999").await;
        let members: Vec<String> = cluster.members.read().unwrap().iter().map(|m| m.url.to_string()).collect();
        assert!(members.contains(&"http://127.0.0.1:5999/".to_owned()), "{members:?}");
        assert!(members.iter().all(|m| m.ends_with(":5999/")), "{members:?}");
    }

    #[test]
    fn a_dead_owner_moves_only_its_keys() {
        let replicas = ["http://a:5000", "http://b:5000", "http://c:5000"];
        let view = cluster("http://a:5000", &replicas);
        let before: Vec<_> = (0..200u32).map(|i| view.owner(&i.to_be_bytes())).collect();
        let c: Url = "http://c:5000".parse().unwrap();
        view.record(&c, false);
        for (i, owner) in before.iter().enumerate() {
            let now = view.owner(&(i as u32).to_be_bytes());
            if owner.as_ref() == Some(&c) {
                assert_ne!(now.as_ref(), Some(&c), "c is down");
            } else {
                assert_eq!(&now, owner, "keys of live replicas stay put");
            }
        }
    }
}
