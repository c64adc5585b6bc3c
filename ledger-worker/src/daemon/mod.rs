//! The worker pool: a claimer finds due withdrawals and hands their ids to a bounded
//! crossbeam channel; N worker threads take batches off the channel and process each
//! batch in one transaction on a pooled r2d2 connection, each job in its own savepoint.
//!
//! Exactly once: a job is only ever changed inside a transaction that holds its row
//! lock and re-checks that it is still pending, so a job handed to two workers (or two
//! daemons) is processed by one and skipped by the other; a crash rolls back whatever
//! was not committed, and the job is claimed again.
//!
//! The pool can also be fed in-process: an embedding service inserts withdrawal rows in
//! its own transaction, commits, and calls [`WorkerPool::submit`].
//!
//! Shutdown is bounded, whatever the database or the gateway do. One signal
//! (`shutdown::Shutdown`: stopping, then the grace period's end) is checked by every
//! loop and every wait: waits for a pooled connection, backoffs and channel waits are
//! sliced and end when it says so; once stopping, nothing is retried and no new job or
//! payout is started after the grace period. What cannot be interrupted is a call
//! already inside libpq (a statement on a connection whose server stopped answering) or
//! inside the gateway's HTTP client: the threads doing that are not waited for past
//! the grace period (plus [`WIND_DOWN`]);
//! [`WorkerPool::shutdown`] names them in its report and the caller exits without them.
//! Their transactions were not committed by this process (the server rolls them back
//! when the connection goes), so their jobs stay pending, and a payout whose gateway
//! call was cut off stays pending and is due again when its lease runs out.
//!
//! # Layout
//!
//! `config` (the limits), `pool` (start, submit, shutdown), `claimer` (NOTIFY -> lanes),
//! `worker` (lanes -> batch transactions -> handed-over payout claims), `dispatch`
//! (claims -> gateway -> recorded verdicts), `holds` (the hold expiry loop), `threads`
//! (tracking, restarts, sliced sleeps). This file: what they share (`Shared`, the stop signal, the batch
//! `Processor`).

use std::any::Any;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use diesel::pg::PgConnection;
use diesel::RunQueryDsl;
use ledger_core::db::{self, Pool, PoolConfig, SessionConfig};
use ledger_core::error::{RetryClass, Transient};
use ledger_core::payouts::{self, PayoutGateway, PayoutRequest, Recorded, Verdict};
use ledger_core::retry::{Backoff, Jitter, RetryPolicy};
use ledger_core::tx::Patience;
use ledger_core::withdrawals::{self, BatchItem, JobOutcome, WithdrawalStatus};
use ledger_core::{LedgerError, Tx, TxOptions, WithdrawalId};
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;

mod claimer;
mod config;
mod dispatch;
mod holds;
mod pool;
mod shutdown;
mod threads;
mod worker;

pub use config::WorkerConfig;
pub use pool::{Builder, CountsUnread, ShutdownReport, SubmitError, WorkerPool, COUNT_WAIT};
// The rooms below share these through `use super::*`.
use {claimer::*, dispatch::*, shutdown::*, threads::*, worker::*};

/// How a batch of jobs is processed inside its transaction. The default runs
/// `ledger_core::withdrawals::process_batch_tx`; tests wrap it to inject faults.
pub trait Processor: Send + Sync + 'static {
    fn process(&self, tx: &mut Tx<'_>, ids: &[WithdrawalId]) -> Result<Vec<BatchItem>, LedgerError>;

    /// Run in a fresh transaction when `process` failed with a non-transient error: it
    /// must isolate the failing job (one savepoint per job). Defaults to `process`.
    fn process_careful(&self, tx: &mut Tx<'_>, ids: &[WithdrawalId]) -> Result<Vec<BatchItem>, LedgerError> {
        self.process(tx, ids)
    }

    /// Like `process`, and the payouts it queues are claimed for this process's
    /// dispatcher with a lease of `lease_ms` (returned to hand over after commit). The
    /// default claims nothing: the dispatcher finds the payouts by polling.
    fn process_claiming(
        &self,
        tx: &mut Tx<'_>,
        ids: &[WithdrawalId],
        _lease_ms: u64,
    ) -> Result<(Vec<BatchItem>, Option<payouts::Claim>), LedgerError> {
        Ok((self.process(tx, ids)?, None))
    }
}

/// The fast path first (one set-based write, no savepoint); after an unexpected error,
/// the careful path, which isolates the job to blame.
pub struct LedgerProcessor;

impl Processor for LedgerProcessor {
    fn process(&self, tx: &mut Tx<'_>, ids: &[WithdrawalId]) -> Result<Vec<BatchItem>, LedgerError> {
        withdrawals::process_batch_fast_tx(tx, ids)
    }

    fn process_careful(&self, tx: &mut Tx<'_>, ids: &[WithdrawalId]) -> Result<Vec<BatchItem>, LedgerError> {
        withdrawals::process_batch_tx(tx, ids)
    }

    fn process_claiming(
        &self,
        tx: &mut Tx<'_>,
        ids: &[WithdrawalId],
        lease_ms: u64,
    ) -> Result<(Vec<BatchItem>, Option<payouts::Claim>), LedgerError> {
        let (items, claim) = withdrawals::process_batch_fast_claiming_tx(tx, ids, lease_ms)?;
        Ok((items, Some(claim)))
    }
}

struct Shared {
    config: WorkerConfig,
    pool: Pool,
    url: String,
    processor: Arc<dyn Processor>,
    metrics: Arc<Metrics>,
    /// Ids queued or being processed here, so the claimer does not queue them twice.
    inflight: Mutex<HashSet<i64>>,
    /// The one stop signal: stop claiming, drain until the grace period ends.
    shutdown: Shutdown,
    /// Set by the claimer when nothing is pending or in flight.
    idle: AtomicBool,
    /// Whether payouts are dispatched here (so idle also waits for them).
    dispatching: bool,
    /// The pool's threads and what each is doing, for a shutdown with a deadline.
    tracker: Arc<Tracker>,
    /// Poked when a batch debited something: its payouts are due now, so an idle
    /// dispatcher need not wait for its next poll.
    payout_wake: (Sender<()>, Receiver<()>),
    /// Payouts claimed by the batch that queued them (in its own transaction), handed
    /// to a dispatcher after commit: no claim transaction, no wait for a poll.
    payout_handoff: (Sender<payouts::Claim>, Receiver<payouts::Claim>),
    /// The gateway refused our credentials: no more calls from this process until it is
    /// restarted with credentials that work. Nothing is paid or refunded meanwhile.
    gateway_refused: AtomicBool,
}

/// Once stopping, the longest wait for a pooled connection: a queued batch that cannot
/// get one by then stays pending (the pool normally has a connection per worker).
const STOPPING_CHECKOUT_WAIT: Duration = Duration::from_secs(1);

/// After the grace period, how long shutdown still waits for statements and gateway
/// calls in flight before it stops waiting for the threads making them.
pub const WIND_DOWN: Duration = Duration::from_secs(1);

impl Shared {
    fn inflight(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.shutdown.stopping()
    }
}

/// How the daemon's transactions and checkouts wait: as configured while running; once
/// stopping, no retries, a short wait for a connection, none after the grace period or
/// once the database has failed during shutdown.
impl Patience for Shared {
    fn may_retry(&self) -> bool {
        !self.stopping()
    }

    fn give_up_waiting(&self, waited: Duration) -> bool {
        self.stopping()
            && (waited >= STOPPING_CHECKOUT_WAIT || self.shutdown.queue_abandoned() || self.shutdown.past_deadline())
    }
}

/// Recording a gateway's answer is worth retrying until the grace period is over: an
/// answer not recorded means the payout is sent again after its lease.
struct UntilDeadline<'a>(&'a Shared);

impl Patience for UntilDeadline<'_> {
    fn may_retry(&self) -> bool {
        !self.0.shutdown.past_deadline()
    }

    fn give_up_waiting(&self, waited: Duration) -> bool {
        self.0.give_up_waiting(waited)
    }
}

/// A connection from the pool, waiting as [`Shared`]'s patience allows.
fn checkout(shared: &Shared) -> Result<db::PooledConnection, LedgerError> {
    db::checkout(&shared.pool, &|waited| shared.give_up_waiting(waited))
}

/// A database failure that says the server is gone or unreachable (as opposed to, say,
/// a lock timeout on a healthy server).
fn connection_trouble(e: &LedgerError) -> bool {
    match e {
        LedgerError::RetriesExhausted { last, .. } => connection_trouble(last),
        other => other.transient() == Some(Transient::ConnectionLost),
    }
}
