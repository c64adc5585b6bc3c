//! The claimer: wakes on NOTIFY, walks due withdrawals from a cursor (and sweeps for
//! stragglers), and queues their ids on the lanes.

use ledger_core::AccountId;

use super::*;

/// The claimer: claims due jobs into the channel while it has room; when caught up,
/// waits for a NOTIFY on `ledger_withdrawals` (checked every 2 ms) or the poll interval.
pub(super) fn claim_loop(shared: Arc<Shared>, senders: Vec<Sender<i64>>) {
    let config = &shared.config;
    let mut conn: Option<PgConnection> = None;
    let mut failures = 0_u32;
    let mut cursor: i64 = 0;
    let mut last_sweep = Instant::now();
    let max_claim = (config.batch_size * config.threads).max(1);
    let per_lane = lane_capacity(config);
    let min_claim = config.batch_size.min(per_lane * senders.len() / 2).max(1);
    while !shared.stopping() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(&shared, &mut failures) {
                Some(c) => conn.insert(c),
                None => continue,
            },
        };
        let room = senders.iter().map(|s| per_lane.saturating_sub(s.len())).sum::<usize>().min(max_claim);
        // Claim in chunks worth a round trip: with the queue nearly full, let the
        // workers drain it a little instead of claiming a handful of ids at a time.
        if room < min_claim {
            doing("waiting for room in the queue");
            thread::sleep(Duration::from_micros(500));
            continue;
        }
        doing("claiming jobs (database)");
        match claim_round(&shared, c, cursor, room, &mut last_sweep) {
            Ok(ids) => {
                failures = 0;
                let claimed = queue_claimed(&shared, &senders, ids, &mut cursor);
                if claimed < room {
                    if let Err(e) = wait_caught_up(&shared, c, claimed) {
                        warn!(error = %e, "lost the LISTEN connection; reconnecting");
                        conn = None;
                    }
                } else {
                    shared.idle.store(false, Ordering::SeqCst);
                }
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, "claiming failed; retrying");
                if e.is_transient() || failures > 3 {
                    conn = None;
                }
                doing("backing off (claimer)");
                shared.shutdown.sleep(backoff(failures));
            }
        }
    }
    debug!("claimer stopped");
}

/// A fresh LISTEN connection; `None` after a failed try and its backoff.
fn connect(shared: &Shared, failures: &mut u32) -> Option<PgConnection> {
    doing("connecting to the database (claimer)");
    match listen(&shared.url, &shared.config.application_name) {
        Ok(c) => {
            if *failures > 0 {
                info!("claimer reconnected");
            }
            *failures = 0;
            Some(c)
        }
        Err(e) => {
            *failures += 1;
            warn!(error = %e, "claimer cannot connect; retrying");
            doing("backing off (claimer)");
            shared.shutdown.sleep(backoff(*failures));
            None
        }
    }
}

/// At most `room` due jobs. Fast path: the next jobs after the cursor. When that comes
/// up short (caught up), sweep for due jobs the cursor passed over, excluding what is
/// queued here.
fn claim_round(
    shared: &Shared,
    c: &mut PgConnection,
    cursor: i64,
    room: usize,
    last_sweep: &mut Instant,
) -> Result<Vec<(WithdrawalId, AccountId)>, LedgerError> {
    let mut ids = withdrawals::claim_after(c, cursor, room as i64)?;
    // The sweep is for stragglers and retries, which can wait a few ms: at a steady
    // trickle it would otherwise run on every wake-up.
    if ids.len() < room && (ids.is_empty() || last_sweep.elapsed() >= SWEEP_EVERY) {
        *last_sweep = Instant::now();
        let mut exclude: Vec<i64> = shared.inflight().iter().copied().collect();
        exclude.extend(ids.iter().map(|(w, _)| w.get()));
        ids.extend(withdrawals::claim_due(c, (room - ids.len()) as i64, &exclude)?);
    }
    Ok(ids)
}

/// Puts each claimed job in flight and on its account's lane (taken out of flight
/// again if shutdown stops the send); moves the cursor past them. Returns how many.
fn queue_claimed(
    shared: &Shared,
    senders: &[Sender<i64>],
    ids: Vec<(WithdrawalId, AccountId)>,
    cursor: &mut i64,
) -> usize {
    let claimed = ids.len();
    let lanes = lanes_for_round(claimed, shared.config.batch_size, senders.len());
    for (id, account) in ids {
        *cursor = (*cursor).max(id.get());
        shared.inflight().insert(id.get());
        let lane = &senders[lane_of(account.get(), lanes)];
        doing("queueing jobs");
        if !send_unless_stopping(shared, lane, id.get()) {
            shared.inflight().remove(&id.get());
        }
    }
    shared.metrics.claimed.fetch_add(claimed as u64, Ordering::Relaxed);
    claimed
}

/// How many lanes a claimed round of `claimed` jobs is spread over: one per
/// `batch_size / 4` jobs (at least one lane, at most all). A trickle goes to one worker
/// in one batch, instead of a few jobs to each of them: on a machine with few cores,
/// concurrent small batches cost more CPU per job and wait for each other's CPU, and
/// that is the latency a user sees. A backlog still uses every lane. An account's jobs
/// from rounds of different sizes can then sit in two lanes at once: the second batch
/// waits for the first one's account lock (taken in id order, so never a deadlock).
pub(super) fn lanes_for_round(claimed: usize, batch_size: usize, lanes: usize) -> usize {
    let per_lane = (batch_size / 4).max(1);
    claimed.div_ceil(per_lane).clamp(1, lanes.max(1))
}

/// Caught up. Idle when nothing is pending and nothing is in flight (checked only when
/// this round found nothing at all); then waits for a NOTIFY or the poll interval. An
/// `Err` means the LISTEN connection is lost.
fn wait_caught_up(shared: &Shared, c: &mut PgConnection, claimed: usize) -> Result<(), LedgerError> {
    doing("checking for work (database)");
    let idle = claimed == 0
        && shared.inflight().is_empty()
        && withdrawals::pending_count(c).map(|n| n == 0).unwrap_or(false)
        && (!shared.dispatching || payouts::pending_count(c).map(|n| n == 0).unwrap_or(false));
    shared.idle.store(idle, Ordering::SeqCst);
    doing("waiting for a NOTIFY (database)");
    wait_for_work(shared, c)
}

/// How often the claimer sweeps for due jobs its cursor passed over while it has work.
pub(super) const SWEEP_EVERY: Duration = Duration::from_millis(50);

pub(super) fn listen(url: &str, application_name: &str) -> Result<PgConnection, LedgerError> {
    let session = SessionConfig {
        lock_timeout_ms: Some(1_000),
        statement_timeout_ms: Some(30_000),
        application_name: Some(format!("{application_name}:claimer")),
    };
    let mut conn = db::connect(url, &session)?;
    diesel::sql_query("LISTEN ledger_withdrawals").execute(&mut conn)?;
    Ok(conn)
}

pub(super) fn wait_for_work(shared: &Shared, conn: &mut PgConnection) -> Result<(), LedgerError> {
    let deadline = Instant::now() + Duration::from_millis(shared.config.poll_interval_ms);
    loop {
        let mut woke = false;
        for n in conn.notifications_iter() {
            n?;
            woke = true;
        }
        if woke || Instant::now() >= deadline || shared.stopping() {
            return Ok(());
        }
        // Diesel does not expose the socket to wait on; checking for a NOTIFY costs one
        // non-blocking read, so a 1 ms check adds at most ~1 ms to a job's latency.
        thread::sleep(Duration::from_millis(1));
    }
}

pub(super) fn send_unless_stopping(shared: &Shared, sender: &Sender<i64>, id: i64) -> bool {
    loop {
        match sender.send_timeout(id, Duration::from_millis(50)) {
            Ok(()) => return true,
            Err(SendTimeoutError::Disconnected(_)) => return false,
            Err(SendTimeoutError::Timeout(_)) if shared.stopping() => return false,
            Err(SendTimeoutError::Timeout(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lanes_for_round;

    #[test]
    fn a_trickle_goes_to_one_lane_and_a_backlog_to_all() {
        // (claimed, batch size, lanes) -> lanes used
        let table = [
            ((0, 1_000, 4), 1),
            ((1, 1_000, 4), 1),
            ((250, 1_000, 4), 1),
            ((251, 1_000, 4), 2),
            ((700, 1_000, 4), 3),
            ((4_000, 1_000, 4), 4),
            ((64, 256, 4), 1),
            ((65, 256, 4), 2),
            ((1_000, 256, 4), 4),
            ((5, 1, 4), 4),
            ((5, 3, 1), 1),
        ];
        for ((claimed, batch, lanes), used) in table {
            assert_eq!(lanes_for_round(claimed, batch, lanes), used, "{claimed} claimed, batch {batch}, {lanes} lanes");
        }
    }
}
