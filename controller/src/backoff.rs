//! How long the controller's watches wait after an error before they try again.
//!
//! kube-runtime backs off a `Controller`'s trigger watches as *one* stream, with client-go's
//! default (0.8 s doubling to 30 s, plus jitter): while the API server is down the delay grows to
//! its cap, and after it is back every watch that reports an error on its way back (a re-list, an
//! expired resource version) costs another full delay, in turn, for all of them. Measured on the
//! lab after a 30 s API outage: new objects were reconciled 25 s to more than 2 minutes later.
//! The controller is one process (not one per node, as agents are), so a short cap costs the
//! API server nothing worth mentioning while it is down, and the controller catches up within
//! seconds once it is back.

use std::time::{Duration, Instant};

use kube::runtime::utils::Backoff;

/// The first delay after an error.
const FIRST: Duration = Duration::from_millis(500);
/// The longest delay.
const CAP: Duration = Duration::from_secs(4);
/// A quiet spell this long (no error) starts again from [`FIRST`].
const RESET_AFTER: Duration = Duration::from_secs(60);

/// Doubling delays from [`FIRST`] up to [`CAP`], reset by a success or a quiet spell.
#[derive(Debug)]
pub struct WatchBackoff {
    next: Duration,
    last: Option<Instant>,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: FIRST, last: None }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.last.is_some_and(|at| at.elapsed() > RESET_AFTER) {
            self.next = FIRST;
        }
        self.last = Some(Instant::now());
        let delay = self.next;
        self.next = (self.next * 2).min(CAP);
        Some(delay)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut backoff = WatchBackoff::default();
        let delays: Vec<Duration> = backoff.by_ref().take(6).collect();
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 4000, 4000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(FIRST));
    }
}
