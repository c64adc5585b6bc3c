//! The hold expiry loop: every `hold_expiry_interval_ms` it voids the pending holds
//! whose timeout has passed (`ledger_core::holds::expire_due`), at most
//! `hold_expiry_batch` per transaction, and goes again at once after a full batch.
//!
//! The decisions are ledger-core's: the due holds are taken `FOR UPDATE SKIP LOCKED`,
//! so a post in progress is never waited for (and wins); a post waiting for a hold this
//! loop holds finds it expired. Several daemons may run it at once. It has a connection
//! of its own (not the pool's: a loop that runs every second should not wait behind a
//! backlog of batches), retries nothing inside a round (the next round is the retry),
//! and stops with the daemon's one [`Shutdown`] signal.

use super::*;

/// Starts the expiry thread, restarted in place after a panic.
pub(super) fn spawn_hold_expiry(shared: &Arc<Shared>) -> Result<JoinHandle<()>, LedgerError> {
    let shared = shared.clone();
    spawn_tracked(&shared.tracker.clone(), "hold-expiry".into(), move || {
        resilient(&shared, "hold expiry", || expiry_loop(&shared))
    })
    .map_err(|e| LedgerError::Pool(format!("spawning the hold expiry: {e}")))
}

fn expiry_loop(shared: &Shared) {
    let config = &shared.config;
    let session = SessionConfig {
        lock_timeout_ms: Some(config.lock_timeout_ms),
        statement_timeout_ms: None,
        application_name: Some(format!("{} hold expiry", config.application_name)),
    };
    // One attempt per round: a transient failure waits for the next round, so a
    // shutdown is never held up by retries.
    let once = TxOptions { max_attempts: 1, ..TxOptions::default() };
    let interval = Duration::from_millis(config.hold_expiry_interval_ms);
    let mut conn: Option<PgConnection> = None;
    let mut failures = 0_u32;
    while !shared.stopping() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                doing("connecting to the database (hold expiry)");
                match db::connect(&shared.url, &session) {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        failures += 1;
                        warn!(error = %e, "hold expiry cannot connect; retrying");
                        doing("backing off (hold expiry)");
                        shared.shutdown.sleep(backoff(failures));
                        continue;
                    }
                }
            }
        };
        doing("expiring due holds (database)");
        match ledger_core::holds::expire_due_with(c, &once, config.hold_expiry_batch) {
            Ok(expired) => {
                failures = 0;
                if !expired.is_empty() {
                    info!(expired = expired.len(), "expired holds: their amounts are back with their payers");
                }
                if expired.len() == config.hold_expiry_batch {
                    continue; // more may be due: no wait
                }
            }
            Err(e) => {
                failures += 1;
                if connection_trouble(&e) {
                    conn = None;
                }
                warn!(error = %e, failures, "hold expiry round failed; trying again");
                doing("backing off (hold expiry)");
                shared.shutdown.sleep(backoff(failures).max(interval));
                continue;
            }
        }
        doing("waiting for due holds");
        shared.shutdown.sleep(interval);
    }
}
