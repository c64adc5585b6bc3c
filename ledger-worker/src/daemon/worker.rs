//! Batch workers: one per lane (lanes by account, so batches rarely wait on each
//! other's locks); each batch is one transaction, its payouts claimed and handed to a
//! dispatcher after commit.

use super::*;

/// The lane of an account's jobs among `lanes`: within one claimed round, an account's
/// jobs share a lane, so concurrent batches mostly lock disjoint sets of accounts, and
/// a hot account's jobs are batched under one lock by one worker. (Rounds of different
/// sizes use different numbers of lanes, see `claimer::lanes_for_round`.)
pub(super) fn lane_of(key: i64, lanes: usize) -> usize {
    (key.unsigned_abs() % lanes as u64) as usize
}

pub(super) fn lane_capacity(config: &WorkerConfig) -> usize {
    (config.channel_capacity / config.threads).max(config.batch_size).max(1)
}

/// Keeps one worker per lane alive: a worker that panicked is replaced, until shutdown.
pub(super) fn supervise(shared: Arc<Shared>, receivers: Vec<Receiver<i64>>) {
    let (s, r) = (shared.clone(), receivers.clone());
    resilient(&shared, "supervisor", move || supervise_workers(s.clone(), r.clone()));
}

pub(super) fn supervise_workers(shared: Arc<Shared>, receivers: Vec<Receiver<i64>>) {
    doing("supervising the workers");
    let spawn = |lane: usize, generation: usize| {
        let (for_worker, receiver) = (shared.clone(), receivers[lane].clone());
        spawn_tracked(&shared.tracker, format!("worker-{lane}.{generation}"), move || {
            worker_loop(&for_worker, &receiver)
        })
    };
    let mut workers: Vec<Option<JoinHandle<WorkerExit>>> = (0..receivers.len()).map(|_| None).collect();
    let mut generation = 0;
    loop {
        let stopping = shared.stopping();
        for (lane, slot) in workers.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|h| h.is_finished()) {
                let exit = slot.take().expect("checked").join().unwrap_or(WorkerExit::Panicked);
                if exit == WorkerExit::Panicked && !stopping {
                    shared.metrics.workers_replaced.fetch_add(1, Ordering::Relaxed);
                    warn!(lane, "replacing a worker thread after a panic");
                } else if !stopping {
                    error!(lane, ?exit, "a worker thread ended unexpectedly; replacing it");
                }
            }
            // Start (or restart) the lane's worker.
            if slot.is_none() && !stopping {
                generation += 1;
                match spawn(lane, generation) {
                    Ok(h) => *slot = Some(h),
                    Err(e) => error!(lane, error = %e, "could not start a worker thread; retrying"),
                }
            }
        }
        // Shutdown waits for the workers through the tracker, with its deadline; a
        // worker still running is not waited for here (its handle is dropped: detached).
        if stopping {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum WorkerExit {
    Done,
    Panicked,
}

pub(super) fn worker_loop(shared: &Shared, receiver: &Receiver<i64>) -> WorkerExit {
    let batch_size = shared.config.batch_size;
    loop {
        doing("waiting for jobs");
        let first = match receiver.recv_timeout(Duration::from_millis(50)) {
            Ok(id) => id,
            Err(RecvTimeoutError::Disconnected) => return WorkerExit::Done,
            Err(RecvTimeoutError::Timeout) => {
                if shared.stopping() && receiver.is_empty() {
                    return WorkerExit::Done;
                }
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < batch_size {
            match receiver.try_recv() {
                Ok(id) => batch.push(id),
                Err(_) => break,
            }
        }
        if shared.shutdown.leave_queue() {
            // Out of grace, or the database failed during shutdown: leave these pending
            // (the next run claims them).
            let mut inflight = shared.inflight();
            batch.iter().for_each(|id| {
                inflight.remove(id);
            });
            continue;
        }
        let ids: Vec<WithdrawalId> = batch.iter().filter_map(|id| WithdrawalId::new(*id).ok()).collect();
        doing("in a batch transaction (database)");
        let outcome = catch_unwind(AssertUnwindSafe(|| process_batch(shared, &ids)));
        if let Err(panic) = outcome {
            shared.metrics.panics.fetch_add(1, Ordering::Relaxed);
            error!(batch = ?batch, panic = panic_message(&panic), "worker panicked; isolating the job");
            isolate_panicking_jobs(shared, &ids);
            release(shared, &ids);
            return WorkerExit::Panicked;
        }
        release(shared, &ids);
    }
}

pub(super) fn release(shared: &Shared, ids: &[WithdrawalId]) {
    let mut inflight = shared.inflight();
    for id in ids {
        inflight.remove(&id.get());
    }
}

/// After a batch panicked (and rolled back), runs its jobs one at a time: the one that
/// panics again is failed at once with the panic message; the others are processed.
pub(super) fn isolate_panicking_jobs(shared: &Shared, ids: &[WithdrawalId]) {
    for id in ids {
        if shared.stopping() {
            // The next run isolates them again; each stays pending until then.
            return;
        }
        let single = [*id];
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| process_batch(shared, &single))) {
            let reason = format!("worker panicked: {}", panic_message(&panic));
            let recorded = checkout(shared).and_then(|mut conn| withdrawals::fail_now(&mut conn, *id, &reason));
            match recorded {
                Ok(true) => {
                    shared.metrics.failed.fetch_add(1, Ordering::Relaxed);
                    error!(withdrawal = id.get(), %reason, "withdrawal failed");
                }
                Ok(false) => {}
                Err(e) => {
                    error!(withdrawal = id.get(), error = %e, "could not record the failure; the job stays pending")
                }
            }
        }
    }
}

pub(super) fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// One batch: one transaction (retried in-process on transient errors, on a fresh
/// connection if the old one died), then bookkeeping of each job's outcome.
///
/// During shutdown nothing is tried twice: a batch that fails then is left pending as
/// a whole, with no attempt recorded (the next run does it).
pub(super) fn process_batch(shared: &Shared, ids: &[WithdrawalId]) {
    shared.metrics.batches.fetch_add(1, Ordering::Relaxed);
    let (result, claimed, attempts) = run_batch(shared, ids);
    shared.metrics.retried.fetch_add(attempts.saturating_sub(1), Ordering::Relaxed);
    let committed_at = now_us();
    if let Ok(items) = &result {
        hand_off_payouts(shared, items, claimed);
    }
    match result {
        Ok(items) => items.into_iter().for_each(|item| book_outcome(shared, item, committed_at)),
        Err(e) if shared.stopping() => {
            if connection_trouble(&e) {
                shared.shutdown.abandon_queue();
            }
            warn!(error = %e, jobs = ids.len(), "batch not done during shutdown; its jobs stay pending");
        }
        Err(e) => {
            warn!(error = %e, jobs = ids.len(), "batch failed after retries; recording an attempt per job");
            for id in ids {
                // Once the database is unreachable (or shutdown began), the remaining
                // jobs stay pending as they are: each would only wait for it in turn.
                if shared.stopping() || !record_attempt(shared, *id, &e.to_string()) {
                    break;
                }
            }
        }
    }
}

/// The batch's transaction: the fast path, claiming its payouts when a dispatcher here
/// can take them; after a non-transient failure (not during shutdown), the careful
/// path in a new transaction. Returns the result, the claim the committed attempt
/// made (none if nothing is known to have committed), and the attempts made in all.
fn run_batch(
    shared: &Shared,
    ids: &[WithdrawalId],
) -> (Result<Vec<BatchItem>, LedgerError>, Option<payouts::Claim>, u64) {
    let opts = TxOptions { max_attempts: shared.config.tx_attempts, ..TxOptions::default() };
    let mut attempts = 0_u64;
    // Claim the payouts as they are queued when a dispatcher here can take them (the
    // claim's lease, as this process sees it, ends before the database's).
    let lease_ms = shared.config.payout_lease_ms;
    let claim_here = shared.dispatching && !shared.gateway_refused.load(Ordering::SeqCst) && !shared.stopping();
    let mut claimed: Option<payouts::Claim> = None;
    let mut result = ledger_core::tx::transaction_pooled_until(&shared.pool, &opts, shared, |tx| {
        attempts += 1;
        claimed = None; // only the attempt that commits counts
        if claim_here {
            let (items, claim) = shared.processor.process_claiming(tx, ids, lease_ms)?;
            claimed = claim;
            Ok(items)
        } else {
            shared.processor.process(tx, ids)
        }
    });
    if result.is_err() {
        claimed = None; // not committed (or not known to be): the leases run out
    }
    if !shared.stopping()
        && matches!(&result, Err(e) if !e.is_transient() && !matches!(e, LedgerError::RetriesExhausted { .. }))
    {
        warn!(error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(), "batch failed; redoing it job by job");
        result = ledger_core::tx::transaction_pooled_until(&shared.pool, &opts, shared, |tx| {
            attempts += 1;
            shared.processor.process_careful(tx, ids)
        });
    }
    (result, claimed, attempts)
}

/// After commit: the claimed payouts to a dispatcher; a wake-up for payouts queued
/// unclaimed (the careful path), which are due now.
fn hand_off_payouts(shared: &Shared, items: &[BatchItem], claimed: Option<payouts::Claim>) {
    let debited = items.iter().filter(|i| matches!(i.outcome, JobOutcome::Debited { .. })).count();
    let handed = claimed.as_ref().map_or(0, |c| c.requests.len());
    if let Some(claim) = claimed.filter(|c| !c.requests.is_empty()) {
        hand_off(shared, claim);
    }
    if debited > handed {
        let _ = shared.payout_wake.0.try_send(());
    }
}

/// One job's outcome in the metrics and the log; an errored job's attempt recorded
/// (unless shutting down: then it just stays pending).
fn book_outcome(shared: &Shared, item: BatchItem, committed_at_us: i64) {
    match item.outcome {
        JobOutcome::Debited { .. } => {
            shared.metrics.debited.fetch_add(1, Ordering::Relaxed);
            observe_latency(shared, item.enqueued_at_us, committed_at_us);
            debug!(withdrawal = item.id.get(), "debited");
        }
        JobOutcome::Rejected { code, .. } => {
            shared.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            observe_latency(shared, item.enqueued_at_us, committed_at_us);
            debug!(withdrawal = item.id.get(), code, "rejected");
        }
        JobOutcome::Skipped | JobOutcome::AlreadyFinal(_) => {
            shared.metrics.skipped.fetch_add(1, Ordering::Relaxed);
        }
        // Its savepoint was rolled back: during shutdown it just stays pending.
        JobOutcome::Errored { .. } if shared.stopping() => {}
        JobOutcome::Errored { error, .. } => {
            record_attempt(shared, item.id, &error);
        }
    }
}

/// Enqueue to commit, for a job that knows when it was enqueued.
fn observe_latency(shared: &Shared, enqueued_at_us: Option<i64>, committed_at_us: i64) {
    if let Some(t) = enqueued_at_us {
        let us = u64::try_from(committed_at_us - t).unwrap_or(0);
        shared.metrics.observe_latency(Duration::from_micros(us));
    }
}

/// Records a failed attempt of one job; false when the database could not be reached.
pub(super) fn record_attempt(shared: &Shared, id: WithdrawalId, error: &str) -> bool {
    let opts = TxOptions { max_attempts: shared.config.tx_attempts, ..TxOptions::default() };
    let result = ledger_core::tx::transaction_pooled_until(&shared.pool, &opts, shared, |tx| {
        withdrawals::record_failed_attempt(tx.conn(), id, error, &shared.config.job_retry)
    });
    match result {
        Ok(Some(WithdrawalStatus::Failed)) => {
            shared.metrics.failed.fetch_add(1, Ordering::Relaxed);
            error!(withdrawal = id.get(), error, "withdrawal failed after its last attempt");
        }
        Ok(Some(_)) => {
            shared.metrics.deferred.fetch_add(1, Ordering::Relaxed);
            warn!(withdrawal = id.get(), error, "attempt failed; will retry");
        }
        Ok(None) => {}
        // The database is unreachable: the job stays pending and is claimed again later.
        Err(e) => {
            warn!(withdrawal = id.get(), error = %e, "could not record a failed attempt");
            return !connection_trouble(&e);
        }
    }
    true
}
