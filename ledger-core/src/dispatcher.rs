//! The payout dispatcher: claims a batch of due payouts, calls the gateway for them with
//! bounded concurrency and no database transaction open, and records every verdict in
//! one transaction. The daemon runs it in a loop; an embedding service can run the same
//! [`run_round`] with its own [`PayoutGateway`].
//!
//! Why no two calls for one payout ever overlap, however many dispatchers run: a claim
//! takes a lease in the database (`next_attempt_at = now() + lease`) and this process
//! starts a call only while its own view of the lease, measured from *before* the claim
//! was sent, leaves room for the whole call (the gateway's timeout plus a margin). The
//! lease in the database therefore outlasts every call made under it; a second claim
//! can only come after, with a newer fencing token, and an answer recorded under an
//! old token is ignored (the newer claim looks the payout up first).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::db::Pool;
use crate::error::{InvalidInput, LedgerError};
use crate::payouts::{self, PayoutGateway, PayoutRequest, Recorded, RetryPolicy, Verdict};

/// Limits of one dispatcher. Every field is a bound; [`DispatchConfig::validate`]
/// checks them, and every round does too.
#[derive(Clone, Debug)]
pub struct DispatchConfig {
    /// Payouts claimed per round (one claim statement, one recording transaction):
    /// 1 to 1,000.
    pub batch: usize,
    /// Gateway calls in flight at once: 1 to 256.
    pub concurrency: usize,
    /// How long a claim reserves its payouts, in ms: at least three gateway timeouts
    /// plus [`LEASE_MARGIN_MS`], at most [`MAX_LEASE_MS`].
    pub lease_ms: u64,
    /// The longest one gateway call can take (its whole-call timeout), in ms; positive.
    /// The gateway must enforce it: the lease is sized by it.
    pub call_timeout_ms: u64,
    /// When an unknown outcome is tried again, and how many times before the payout
    /// is `failed` for an operator.
    pub retry: RetryPolicy,
}

/// Room kept between the end of the last possible call and the end of the lease, for
/// clock granularity and scheduling delays.
pub const LEASE_MARGIN_MS: u64 = 250;

/// The longest lease: a crashed dispatcher's payouts wait this long before another
/// claims them (and the database's interval arithmetic stays in range).
pub const MAX_LEASE_MS: u64 = 3_600_000;

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            batch: 64,
            concurrency: 16,
            lease_ms: 60_000,
            call_timeout_ms: 10_000,
            retry: RetryPolicy::PAYOUTS,
        }
    }
}

impl DispatchConfig {
    /// Checks the bounds of every field (see each). The lease must hold three whole
    /// calls, because a payout may need a lookup, a send and a confirming lookup under
    /// one claim. The error names the field (`batch`, `concurrency`, `lease_ms`,
    /// `call_timeout_ms`) and the bound it breaks.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        let bad = |field, reason: String| Err(InvalidInput::BadField { field, reason });
        if !(1..=1_000).contains(&self.batch) {
            return bad("batch", format!("must be 1..=1000, got {}", self.batch));
        }
        if !(1..=256).contains(&self.concurrency) {
            return bad("concurrency", format!("must be 1..=256, got {}", self.concurrency));
        }
        if self.lease_ms > MAX_LEASE_MS {
            return bad("lease_ms", format!("({}) must be at most {MAX_LEASE_MS} (an hour)", self.lease_ms));
        }
        if self.call_timeout_ms == 0 {
            return bad("call_timeout_ms", "the gateway call timeout must be positive".into());
        }
        // A payout may need three calls (lookup, send, confirming lookup) in one lease.
        let needed = self.call_timeout_ms.saturating_mul(3).saturating_add(LEASE_MARGIN_MS);
        if self.lease_ms < needed {
            let reason = format!(
                "({}) must be at least three gateway timeouts plus {LEASE_MARGIN_MS} ms ({needed})",
                self.lease_ms
            );
            return bad("lease_ms", reason);
        }
        Ok(())
    }

    fn call_budget(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms + LEASE_MARGIN_MS)
    }
}

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Payouts claimed (and resolved) in the round.
    pub claimed: usize,
    /// Paid: settled, their withdrawals completed.
    pub settled: usize,
    /// Refused: funds returned to the customers.
    pub returned: usize,
    /// Outcome unknown: due again after a backoff, a lookup first.
    pub retrying: usize,
    /// Set `failed` for an operator: retries exhausted, or a verdict that could not be
    /// recorded.
    pub failed: usize,
    /// Claims given back unsent (lease too short for another call, or shutting down).
    pub released: usize,
    /// Answers not recorded because the claim was no longer current (a newer claim or
    /// an operator owns the payout); a later claim looks them up.
    pub superseded: usize,
    /// The gateway refused our credentials: stop sending until they are fixed.
    pub unauthorized: Option<String>,
}

/// One round: claim up to `batch` due payouts, resolve each through the gateway (at most
/// `concurrency` calls at once; none once `stopping()` says so), record all verdicts in
/// one transaction. Returns an empty report when nothing was due.
pub fn run_round(
    pool: &Pool,
    gateway: &dyn PayoutGateway,
    config: &DispatchConfig,
    stopping: &(dyn Fn() -> bool + Sync),
) -> Result<RoundReport, LedgerError> {
    config.validate()?;
    let claim = {
        let mut conn = pool.get()?;
        payouts::claim_due(&mut conn, config.batch as i64, config.lease_ms)?
        // the connection goes back to the pool here, before any gateway call
    };
    run_claimed(pool, gateway, config, claim, stopping)
}

/// The rest of a round for payouts already claimed: by [`payouts::claim_due`], or by the
/// batch that queued them (`withdrawals::process_batch_fast_claiming_tx`, handed over
/// after its commit). Calls the gateway for each (none once the claim's lease no longer
/// leaves room for a whole call) and records every verdict in one transaction.
pub fn run_claimed(
    pool: &Pool,
    gateway: &dyn PayoutGateway,
    config: &DispatchConfig,
    claim: payouts::Claim,
    stopping: &(dyn Fn() -> bool + Sync),
) -> Result<RoundReport, LedgerError> {
    config.validate()?;
    if claim.requests.is_empty() {
        return Ok(RoundReport::default());
    }
    let budget = config.call_budget();
    let lease_until = claim.lease_until;
    let may_call = move || !stopping() && Instant::now() + budget <= lease_until;
    let verdicts = resolve_all(gateway, &claim.requests, config.concurrency, &may_call);
    let recorded = {
        let mut conn = pool.get()?;
        payouts::record_all(&mut conn, &verdicts, &config.retry)?
    };
    let mut report = RoundReport { claimed: verdicts.len(), ..RoundReport::default() };
    for ((_, verdict), recorded) in verdicts.iter().zip(&recorded) {
        if let Verdict::Unauthorized { error } = verdict {
            report.unauthorized.get_or_insert_with(|| error.clone());
        }
        match recorded {
            Recorded::Settled => report.settled += 1,
            Recorded::Returned { .. } => report.returned += 1,
            Recorded::Retrying => report.retrying += 1,
            Recorded::Failed => report.failed += 1,
            Recorded::Released => report.released += 1,
            Recorded::Superseded => report.superseded += 1,
            Recorded::Unrecordable { .. } => report.failed += 1,
        }
    }
    Ok(report)
}

/// Resolves every request with at most `concurrency` calls in flight. A gateway that
/// panics mid-call may have sent the money: that is an unknown outcome.
pub fn resolve_all(
    gateway: &dyn PayoutGateway,
    requests: &[PayoutRequest],
    concurrency: usize,
    may_call: &(dyn Fn() -> bool + Sync),
) -> Vec<(PayoutRequest, Verdict)> {
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<Verdict>>> = Mutex::new(vec![None; requests.len()]);
    // A refused credential stops further calls in this round: each would be refused too.
    let unauthorized = std::sync::atomic::AtomicBool::new(false);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(request) = requests.get(i) else { return };
        let allowed = || !unauthorized.load(Ordering::Relaxed) && may_call();
        let verdict = catch_unwind(AssertUnwindSafe(|| payouts::resolve(gateway, request, &allowed)))
            .unwrap_or_else(|_| Verdict::Unknown { error: "the gateway panicked during the call".into() });
        if matches!(verdict, Verdict::Unauthorized { .. }) {
            unauthorized.store(true, Ordering::Relaxed);
        }
        out.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(verdict);
    };
    let threads = concurrency.clamp(1, requests.len().max(1));
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(work);
            }
        });
    }
    let verdicts = out.into_inner().unwrap_or_else(|e| e.into_inner());
    requests.iter().cloned().zip(verdicts).map(|(r, v)| (r, v.expect("every request was resolved"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_broken_bound_names_its_field() {
        let ok = DispatchConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let cases: [(DispatchConfig, &str, &str); 5] = [
            (DispatchConfig { batch: 0, ..ok.clone() }, "batch", "must be 1..=1000, got 0"),
            (DispatchConfig { concurrency: 257, ..ok.clone() }, "concurrency", "must be 1..=256, got 257"),
            (DispatchConfig { lease_ms: MAX_LEASE_MS + 1, ..ok.clone() }, "lease_ms", "must be at most"),
            (DispatchConfig { call_timeout_ms: 0, ..ok.clone() }, "call_timeout_ms", "must be positive"),
            (
                DispatchConfig { lease_ms: 30_000, ..ok.clone() },
                "lease_ms",
                "three gateway timeouts plus 250 ms (30250)",
            ),
        ];
        for (config, want_field, want_reason) in cases {
            match config.validate() {
                Err(InvalidInput::BadField { field, reason }) => {
                    assert_eq!(field, want_field, "{reason}");
                    assert!(reason.contains(want_reason), "{field}: {reason}");
                }
                other => panic!("{want_field}: {other:?}"),
            }
        }
    }
}
