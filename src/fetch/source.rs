//! Where a fill reads a blob from, in order of preference: the shared tier (already verified
//! by another replica, no upstream cost), the replica that owns the blob (it downloads it
//! once for the whole cluster), and last the upstream itself.
//!
//! Each source can start at any offset, so a fill whose source breaks mid-blob goes on from
//! the next one with a range request instead of starting over: a replica killed mid-pull
//! costs its followers nothing but the rest of the download from the upstream.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::StatusCode;
use url::Url;

use super::FillError;
use crate::cluster::Cluster;
use crate::reference::{Digest, RepoName};
use crate::shared::SharedTier;
use crate::upstream::Upstream;

pub(super) type ByteStream = BoxStream<'static, io::Result<Bytes>>;

#[derive(Clone)]
pub(super) enum Source {
    Shared(Arc<SharedTier>),
    /// The owner replica, asked for the blob as `?ns=<upstream>`.
    Peer {
        cluster: Arc<Cluster>,
        replica: Url,
        upstream: String,
    },
    Upstream(Arc<Upstream>),
}

/// A source's answer: the blob's full size when known, and its bytes from the offset asked.
pub(super) struct Opened {
    pub size: Option<u64>,
    pub body: ByteStream,
}

impl Source {
    /// The `source` label of `regmirror_fills_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Source::Shared(_) => "shared",
            Source::Peer { .. } => "peer",
            Source::Upstream(_) => "upstream",
        }
    }

    pub fn is_upstream(&self) -> bool {
        matches!(self, Source::Upstream(_))
    }

    /// The blob from byte `offset` on. `Ok(None)`: this source does not have it, try the
    /// next. An upstream's refusal (404, 401...) is the fill's answer, so it is an error.
    pub async fn open(&self, repo: &RepoName, digest: &Digest, offset: u64) -> Result<Option<Opened>, FillError> {
        match self {
            Source::Shared(shared) => {
                let blob = shared.blob(digest, offset).await.map_err(|e| FillError::Source(e.to_string()))?;
                Ok(blob.map(|b| Opened { size: Some(b.size), body: b.body }))
            }
            Source::Peer { cluster, replica: peer, upstream } => {
                let response = cluster
                    .blob(peer, upstream, repo, digest, offset)
                    .await
                    .map_err(|e| FillError::Source(format!("replica {peer}: {e}")))?;
                let size = checked_start(&response, offset)
                    .ok_or_else(|| FillError::Source(format!("replica {peer} answered {}", response.status())))?;
                Ok(Some(Opened { size, body: body_of(response) }))
            }
            Source::Upstream(upstream) => {
                let response = upstream.check(upstream.blob(repo, digest, offset).await?)?;
                let size = checked_start(&response, offset)
                    .ok_or_else(|| FillError::Cut(format!("upstream cannot resume at byte {offset}")))?;
                Ok(Some(Opened { size, body: body_of(response) }))
            }
        }
    }
}

/// The blob's full size if `response` is the answer to a request starting at `offset`:
/// a 200 from the start, or a 206 whose range starts exactly there. `None` otherwise.
fn checked_start(response: &reqwest::Response, offset: u64) -> Option<Option<u64>> {
    match response.status() {
        StatusCode::OK if offset == 0 => Some(response.content_length()),
        StatusCode::PARTIAL_CONTENT => {
            let range = response.headers().get(http::header::CONTENT_RANGE)?.to_str().ok()?;
            let (start, total) = content_range(range)?;
            (start == offset).then_some(total)
        }
        _ => None,
    }
}

/// `bytes 100-199/1000` -> (100, Some(1000)); `bytes 100-199/*` -> (100, None).
fn content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = value.strip_prefix("bytes ")?.split_once('/')?;
    let start = range.split('-').next()?.trim().parse().ok()?;
    Some((start, total.trim().parse().ok()))
}

fn body_of(response: reqwest::Response) -> ByteStream {
    response.bytes_stream().map_err(io::Error::other).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(content_range("bytes 100-199/1000"), Some((100, Some(1000))));
        assert_eq!(content_range("bytes 0-0/*"), Some((0, None)));
        assert_eq!(content_range("items 1-2/3"), None);
    }
}
