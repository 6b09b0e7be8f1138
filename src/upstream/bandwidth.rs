//! A per-upstream bandwidth cap: a token bucket shared by every fill from that upstream, so
//! a cold-pull storm cannot saturate a site's uplink. Up to one second of bytes may go out
//! at once; beyond that, fills wait for their share.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

pub struct Bandwidth {
    bytes_per_second: f64,
    /// A tokio Mutex: held across the wait, so fills take turns instead of all sleeping
    /// on the same debt and bursting together.
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bandwidth {
    pub fn new(bytes_per_second: u64) -> Self {
        let rate = bytes_per_second as f64;
        Bandwidth { bytes_per_second: rate, bucket: Mutex::new(Bucket { tokens: rate, refilled: Instant::now() }) }
    }

    /// Waits until `bytes` may be taken from the upstream.
    pub async fn take(&self, bytes: u64) {
        let mut bucket = self.bucket.lock().await;
        let now = Instant::now();
        let refill = now.duration_since(bucket.refilled).as_secs_f64() * self.bytes_per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.bytes_per_second);
        bucket.refilled = now;
        bucket.tokens -= bytes as f64;
        if bucket.tokens < 0.0 {
            let debt = Duration::from_secs_f64(-bucket.tokens / self.bytes_per_second);
            tokio::time::sleep(debt).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bytes_beyond_the_burst_wait_for_their_time() {
        let cap = Bandwidth::new(1000);
        let start = Instant::now();
        cap.take(1000).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "one second of burst");
        cap.take(2000).await;
        let waited = start.elapsed().as_secs_f64();
        assert!((1.9..2.1).contains(&waited), "{waited}");
    }
}
