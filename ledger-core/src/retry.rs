//! One retry policy for everything that retries: a transaction after a transient error
//! ([`crate::TxOptions`]), a payout after an unknown answer, a withdrawal job after an
//! infrastructure error (the same formula, evaluated in SQL next to the row's attempt
//! count), and the daemon's reconnects. Exponential, capped, jittered.

use std::time::Duration;

/// Where in `[0, ceiling]` a delay falls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// Anywhere in `[0, ceiling]`: spreads out transactions that collided, so they do
    /// not collide again.
    Full,
    /// In `[ceiling / 2, ceiling]`: a retry waits at least half its ceiling.
    Half,
}

/// The wait before retry `n` (0 for the first retry): jittered under the ceiling
/// `min(cap_ms, base_ms * 2^n)`, itself at least 1 ms (a full-jitter wait can be 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of retry 0, in ms; each later retry doubles it.
    pub base_ms: u64,
    /// The largest ceiling, in ms, however many retries came before.
    pub cap_ms: u64,
    /// Where under the ceiling a wait falls.
    pub jitter: Jitter,
}

impl Backoff {
    /// A backoff from `base_ms` doubling up to `cap_ms`.
    pub const fn new(base_ms: u64, cap_ms: u64, jitter: Jitter) -> Backoff {
        Backoff { base_ms, cap_ms, jitter }
    }

    /// The longest wait before retry `n`.
    pub fn ceiling_ms(&self, n: u32) -> u64 {
        self.base_ms.saturating_mul(1_u64 << n.min(30)).min(self.cap_ms).max(1)
    }

    /// The shortest wait before any retry, as a fraction of its ceiling (0 or 0.5).
    pub fn floor_fraction(&self) -> f64 {
        match self.jitter {
            Jitter::Full => 0.0,
            Jitter::Half => 0.5,
        }
    }

    /// A random wait before retry `n`.
    pub fn delay(&self, n: u32) -> Duration {
        let ceiling = self.ceiling_ms(n);
        let floor = match self.jitter {
            Jitter::Full => 0,
            Jitter::Half => ceiling / 2,
        };
        Duration::from_millis(fastrand::u64(floor..=ceiling))
    }
}

/// How many attempts in all, and how long to wait between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. 1 disables retries.
    pub max_attempts: u32,
    /// The wait before each retry.
    pub backoff: Backoff,
}

impl RetryPolicy {
    /// Payouts after an unknown answer: 12 attempts, ceilings from 200 ms doubling to a
    /// minute. A payout's `n` is its attempts so far, the claim included, so its first
    /// retry waits up to 400 ms.
    pub const PAYOUTS: RetryPolicy = RetryPolicy { max_attempts: 12, backoff: Backoff::new(200, 60_000, Jitter::Half) };
    /// Withdrawal jobs after an infrastructure error: 10 attempts, ceilings from 50 ms
    /// (the first retry) doubling to 30 s.
    pub const JOBS: RetryPolicy = RetryPolicy { max_attempts: 10, backoff: Backoff::new(50, 30_000, Jitter::Half) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_their_capped_ceiling_and_above_their_floor() {
        let half = Backoff::new(20, 2_000, Jitter::Half);
        assert_eq!(
            (0..12).map(|n| half.ceiling_ms(n)).collect::<Vec<_>>()[..8],
            [20, 40, 80, 160, 320, 640, 1280, 2000]
        );
        assert_eq!(half.ceiling_ms(u32::MAX), 2_000, "no overflow");
        for n in 0..40 {
            let d = half.delay(n).as_millis() as u64;
            assert!((half.ceiling_ms(n) / 2..=half.ceiling_ms(n)).contains(&d), "{n}: {d}");
            let full = Backoff { jitter: Jitter::Full, ..half };
            assert!(full.delay(n).as_millis() as u64 <= full.ceiling_ms(n));
        }
        assert_eq!(Backoff::new(0, 0, Jitter::Full).ceiling_ms(3), 1, "at least 1 ms");
    }
}
