//! Payout dispatchers: take claims handed over by the batches (or claim due payouts from
//! the table), call the gateway with bounded concurrency and no transaction open, and
//! record every verdict in one transaction.

use super::*;

/// How many handed-over claims may wait per dispatcher thread. Bounded: when the
/// dispatchers fall behind, the batch workers wait for them (backpressure).
pub(super) const HANDOFF_PER_DISPATCHER: usize = 2;

/// The longest a batch worker waits for a dispatcher to take its claimed payouts
/// before it gives the claims back itself.
pub(super) const HANDOFF_WAIT: Duration = Duration::from_secs(2);

/// Gives a batch's claimed payouts to a dispatcher. If none takes them in time (all
/// busy, stopped, or shutting down), the claims are released so the payouts are due at
/// once instead of after the lease.
pub(super) fn hand_off(shared: &Shared, claim: payouts::Claim) {
    let claim = match shared.payout_handoff.0.send_timeout(claim, HANDOFF_WAIT) {
        Ok(()) => return,
        Err(SendTimeoutError::Timeout(c) | SendTimeoutError::Disconnected(c)) => c,
    };
    release_claim(shared, claim);
}

/// Gives back claims no call was made under (their payouts are due again at once).
pub(super) fn release_claim(shared: &Shared, claim: payouts::Claim) {
    let verdicts: Vec<(PayoutRequest, Verdict)> = claim.requests.into_iter().map(|r| (r, Verdict::NotSent)).collect();
    if !verdicts.is_empty() {
        debug!(payouts = verdicts.len(), "handing claimed payouts back unsent");
        record_payouts(shared, &verdicts);
    }
}

/// Waits for a handed-over claim or a batch that debited something (or `poll` to pass,
/// or shutdown). Returns a handed-over claim if one came.
pub(super) fn wait_for_payouts(shared: &Shared, poll: Duration) -> Option<payouts::Claim> {
    let until = Instant::now() + poll;
    while !shared.stopping() {
        let now = Instant::now();
        if now >= until {
            return None;
        }
        let slice = (until - now).min(Duration::from_millis(10));
        crossbeam_channel::select! {
            recv(shared.payout_handoff.1) -> claim => return claim.ok(),
            recv(shared.payout_wake.1) -> _ => return None,
            default(slice) => {}
        }
    }
    None
}

/// A payout dispatcher: claims due payouts under a lease (a short transaction of its
/// own), calls the gateway with no connection checked out and so no transaction open,
/// then records each answer in a new transaction.
///
/// Once stopping it starts no new gateway call: the call in flight is finished and
/// recorded (the gateway's timeouts bound it), the leases of the others are handed back.
/// A call still in flight when shutdown stops waiting is simply abandoned: its payout
/// stays pending and is due again when its lease runs out.
pub(super) fn dispatch_loop(shared: &Shared, gateway: &dyn PayoutGateway) {
    let poll = Duration::from_millis(shared.config.payout_poll_ms);
    let mut failures = 0_u32;
    let mut last_poll = Instant::now() - poll;
    let mut waiting: Option<payouts::Claim> = None;
    let mut last_was_table = false;
    while !shared.stopping() {
        if shared.gateway_refused.load(Ordering::SeqCst) {
            pause_refused(shared, &mut waiting);
            continue;
        }
        // A claim handed over by a batch first; the table (retries, other daemons'
        // expired leases, payouts queued unclaimed) at least every poll interval. Fair
        // between the two: after a table round, handed claims get the next round, so
        // neither source can starve the other.
        let table_turn = last_poll.elapsed() >= poll && !last_was_table;
        let handed = waiting.take().or_else(|| if table_turn { None } else { shared.payout_handoff.1.try_recv().ok() });
        last_was_table = handed.is_none();
        let requests = match handed {
            Some(claim) => with_claims_handed_since(shared, claim),
            None => {
                last_poll = Instant::now();
                match claim_from_table(shared, &mut failures) {
                    Some(claim) => claim,
                    None => continue,
                }
            }
        };
        if requests.requests.is_empty() {
            doing("waiting for payouts");
            match wait_for_payouts(shared, poll) {
                // Taken next round, whenever the table was last looked at.
                Some(claim) => waiting = Some(claim),
                // Woken by a debit queued unclaimed, or the poll passed: look at the table.
                None => last_poll = Instant::now() - poll,
            }
            continue;
        }
        call_and_record(shared, gateway, &requests);
    }
    // Claims handed over but not started: give them back, so they are due at once
    // (if the database is gone, their leases simply run out).
    doing("handing back unsent payouts");
    for claim in waiting.into_iter().chain(shared.payout_handoff.1.try_iter()) {
        release_claim(shared, claim);
    }
    debug!("payout dispatcher stopped");
}

/// The gateway refused our credentials: hand back a claim that would otherwise wait,
/// and sleep a little (until shutdown; nothing is sent again by this daemon).
fn pause_refused(shared: &Shared, waiting: &mut Option<payouts::Claim>) {
    doing("stopped: the gateway refused our credentials");
    if let Some(claim) = waiting.take().or_else(|| shared.payout_handoff.1.try_recv().ok()) {
        release_claim(shared, claim);
    }
    shared.shutdown.sleep(Duration::from_millis(200));
}

/// Batches that committed meanwhile are sent and recorded in the same round: one
/// recording transaction for all of them (up to `payout_batch` payouts). The round's
/// lease is the earliest of theirs.
fn with_claims_handed_since(shared: &Shared, mut claim: payouts::Claim) -> payouts::Claim {
    while claim.requests.len() < shared.config.payout_batch {
        let Ok(more) = shared.payout_handoff.1.try_recv() else { break };
        claim.lease_until = claim.lease_until.min(more.lease_until);
        claim.requests.extend(more.requests);
    }
    claim
}

/// Due payouts claimed from the table under a lease; `None` after a failure and its
/// backoff.
fn claim_from_table(shared: &Shared, failures: &mut u32) -> Option<payouts::Claim> {
    let config = &shared.config;
    doing("claiming payouts (database)");
    // The connection goes back to the pool here, before any gateway call.
    let claimed = checkout(shared)
        .and_then(|mut conn| payouts::claim_due(&mut conn, config.payout_batch as i64, config.payout_lease_ms));
    match claimed {
        Ok(r) => {
            *failures = 0;
            Some(r)
        }
        Err(e) => {
            *failures += 1;
            if !shared.stopping() {
                warn!(error = %e, "claiming payouts failed; retrying");
            }
            doing("backing off (payouts)");
            shared.shutdown.sleep(backoff(*failures));
            None
        }
    }
}

/// Calls with bounded concurrency and no transaction open; none once stopping, and
/// none that could outlast the claim's lease. Then every verdict in one transaction,
/// each under its claim's fencing token.
fn call_and_record(shared: &Shared, gateway: &dyn PayoutGateway, requests: &payouts::Claim) {
    let config = &shared.config;
    doing("calling the payout gateway");
    let budget = Duration::from_millis(config.payout_call_budget_ms());
    let lease_until = requests.lease_until;
    let may_call = || {
        !shared.stopping() && !shared.gateway_refused.load(Ordering::SeqCst) && Instant::now() + budget <= lease_until
    };
    let verdicts =
        ledger_core::dispatcher::resolve_all(gateway, &requests.requests, config.payout_concurrency, &may_call);
    shared.metrics.gateway_calls.fetch_add(verdicts.len() as u64, Ordering::Relaxed);
    doing("recording payouts (database)");
    record_payouts(shared, &verdicts);
}

pub(super) fn record_payouts(shared: &Shared, verdicts: &[(PayoutRequest, Verdict)]) {
    let opts = TxOptions { max_attempts: shared.config.tx_attempts.max(3), ..TxOptions::default() };
    let result = payouts::record_all_with(
        verdicts,
        &mut |batch| {
            ledger_core::tx::transaction_pooled_until(&shared.pool, &opts, &UntilDeadline(shared), |tx| {
                payouts::record_all_tx(tx, batch, &shared.config.payout_retry)
            })
        },
        &mut |request, error| {
            ledger_core::tx::transaction_pooled_until(&shared.pool, &opts, &UntilDeadline(shared), |tx| {
                payouts::mark_unrecordable(tx, request, error)
            })
        },
    );
    let recorded = match result {
        Ok(r) => r,
        // The answers are lost with the database; the leases run out and the payouts
        // are looked up at the gateway before anything else is done with them.
        Err(e) => {
            error!(payouts = verdicts.len(), error = %e, "could not record the gateway's answers; the payouts are looked up after their lease");
            return;
        }
    };
    for ((request, verdict), recorded) in verdicts.iter().zip(recorded) {
        let payout = request.payout.get();
        if let Verdict::Unauthorized { error } = verdict {
            if !shared.gateway_refused.swap(true, Ordering::SeqCst) {
                error!(
                    payout,
                    error = %error,
                    "the payout gateway refused our credentials: payout dispatching stopped until the daemon is \
                     restarted with working LEDGER_PAYOUT_WEBHOOK_TOKEN/SECRET; nothing was paid or refunded"
                );
            }
        }
        match recorded {
            Recorded::Settled => {
                shared.metrics.payouts_settled.fetch_add(1, Ordering::Relaxed);
                debug!(payout, "payout settled");
            }
            Recorded::Returned { .. } => {
                shared.metrics.payouts_returned.fetch_add(1, Ordering::Relaxed);
                warn!(payout, ?verdict, "payout refused; funds returned to the customer");
            }
            Recorded::Retrying => {
                shared.metrics.payouts_retrying.fetch_add(1, Ordering::Relaxed);
                debug!(payout, ?verdict, "payout outcome unknown; it is looked up and retried later");
            }
            Recorded::Failed => {
                shared.metrics.payouts_failed.fetch_add(1, Ordering::Relaxed);
                error!(payout, ?verdict, "payout failed after its last attempt; an operator must retry or return it");
            }
            Recorded::Released => debug!(payout, "payout not sent; claim given back"),
            Recorded::Superseded => debug!(payout, "payout claim superseded; not recorded"),
            Recorded::Unrecordable { error } => {
                shared.metrics.payouts_failed.fetch_add(1, Ordering::Relaxed);
                error!(payout, error = %error, "payout answer could not be recorded; payout set failed for an operator");
            }
        }
    }
}
