//! Whether an upstream is worth asking. After a few consecutive failures (no answer, or a
//! 5xx) it is marked down for a backoff period that doubles while it stays down. Meanwhile
//! requests fail at once instead of each waiting for a timeout, so cached tags and digests
//! are served stale without delay. When the period ends, the next request is the probe: a
//! success brings the upstream back. The same tracker watches the shared object store and
//! the other replicas of a cluster.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Consecutive failures that mark an upstream down.
const FAILURES_TO_DOWN: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(120);

pub struct Health {
    /// A std Mutex: nothing awaits while it is held.
    state: Mutex<State>,
    failures_to_down: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health::with_threshold(FAILURES_TO_DOWN)
    }
}

#[derive(Default)]
struct State {
    consecutive_failures: u32,
    down_until: Option<Instant>,
    backoff: Option<Duration>,
}

impl Health {
    /// Marks down after `failures` consecutive failures (at least one).
    pub fn with_threshold(failures: u32) -> Self {
        Health { state: Mutex::default(), failures_to_down: failures.max(1) }
    }

    /// `Some(remaining)` while the upstream is marked down.
    pub fn down_for(&self) -> Option<Duration> {
        let state = self.state.lock().expect("health poisoned");
        let until = state.down_until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    /// Records an answer (any status below 500, or a 429) or its absence.
    /// Returns true when this failure marked the upstream down.
    pub fn record(&self, ok: bool) -> bool {
        let mut state = self.state.lock().expect("health poisoned");
        if ok {
            *state = State::default();
            return false;
        }
        state.consecutive_failures += 1;
        if state.consecutive_failures < self.failures_to_down {
            return false;
        }
        let backoff = state.backoff.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
        state.backoff = Some(backoff);
        state.down_until = Some(Instant::now() + backoff);
        // The probe after this period gets one chance before the next, longer, period.
        state.consecutive_failures = self.failures_to_down - 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn three_failures_mark_down_and_backoff_doubles() {
        let health = Health::default();
        assert!(!health.record(false));
        assert!(!health.record(false));
        assert!(health.record(false));
        assert_eq!(health.down_for(), Some(FIRST_BACKOFF));
        tokio::time::advance(FIRST_BACKOFF).await;
        assert_eq!(health.down_for(), None, "the probe may go");
        assert!(health.record(false), "a failed probe marks it down again");
        assert_eq!(health.down_for(), Some(FIRST_BACKOFF * 2));
        tokio::time::advance(FIRST_BACKOFF * 2).await;
        health.record(true);
        assert_eq!(health.down_for(), None);
        assert!(!health.record(false), "a success starts the count afresh");
    }
}
