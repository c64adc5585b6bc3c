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
//! Shutdown is bounded, whatever the database or the gateway do. One signal (`stopping`,
//! then the drain deadline) is checked by every loop and every wait: waits for a pooled
//! connection, backoffs and channel waits are sliced and end when it says so; once
//! stopping, nothing is retried and no new job or payout is started after the grace
//! period. What cannot be interrupted is a call already inside libpq (a statement on a
//! connection whose server stopped answering) or inside the gateway's HTTP client: the
//! threads doing that are not waited for past the grace period (plus [`WIND_DOWN`]);
//! [`WorkerPool::shutdown`] names them in its report and the caller exits without them.
//! Their transactions were not committed by this process (the server rolls them back
//! when the connection goes), so their jobs stay pending, and a payout whose gateway
//! call was cut off stays pending and is due again when its lease runs out.

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
use ledger_core::payouts::{self, PayoutGateway, PayoutRequest, Recorded, RetryPolicy, Verdict};
use ledger_core::tx::Patience;
use ledger_core::withdrawals::{self, BatchItem, JobOutcome, WithdrawalStatus};
use ledger_core::{LedgerError, Tx, TxOptions, WithdrawalId};
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;

/// Everything has a limit. Defaults suit a small server; all are `run` flags.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub threads: usize,
    pub pool_size: u32,
    /// Jobs queued between the claimer and the workers.
    pub channel_capacity: usize,
    /// Jobs per transaction (one commit, one savepoint per job).
    pub batch_size: usize,
    /// Fallback poll when no NOTIFY arrives.
    pub poll_interval_ms: u64,
    pub lock_timeout_ms: u64,
    /// Attempts of one batch transaction on transient errors, in-process.
    pub tx_attempts: u32,
    /// Attempts of one job (across batches and restarts) before it ends as `failed`.
    pub job_max_attempts: u32,
    /// Cap of the wait between a job's attempts.
    pub job_max_backoff_ms: u64,
    /// Run the claimer (off: only jobs given to `submit` are processed).
    pub claim: bool,
    /// On shutdown, queued jobs not started within this time stay pending for later;
    /// threads still busy after it (plus [`WIND_DOWN`]) are not waited for.
    pub shutdown_grace_ms: u64,
    pub application_name: String,
    /// Payout dispatcher threads (used only when a gateway is given).
    pub payout_threads: usize,
    /// Payouts claimed per dispatcher round.
    pub payout_batch: usize,
    /// How long a claimed payout is reserved for its dispatcher. Must exceed the
    /// gateway's timeout, so two dispatchers never call for one payout at once.
    pub payout_lease_ms: u64,
    /// How often an idle dispatcher looks for due payouts.
    pub payout_poll_ms: u64,
    pub payout_retry: RetryPolicy,
    /// Gateway calls in flight at once, per dispatcher.
    pub payout_concurrency: usize,
    /// The longest one gateway call can take (connect plus whole-call timeout).
    pub payout_call_timeout_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            threads: 4,
            pool_size: 6,
            channel_capacity: 1_024,
            batch_size: 256,
            poll_interval_ms: 1_000,
            lock_timeout_ms: 2_000,
            tx_attempts: 5,
            job_max_attempts: 10,
            job_max_backoff_ms: 30_000,
            claim: true,
            shutdown_grace_ms: 10_000,
            application_name: "ledger-worker".into(),
            payout_threads: 2,
            payout_batch: 256,
            payout_lease_ms: 60_000,
            payout_poll_ms: 50,
            payout_retry: RetryPolicy::default(),
            payout_concurrency: 16,
            payout_call_timeout_ms: 10_000,
        }
    }
}

impl WorkerConfig {
    /// What a call may take, with room for scheduling: no call starts unless this much
    /// of its claim's lease is left.
    pub fn payout_call_budget_ms(&self) -> u64 {
        self.payout_call_timeout_ms.saturating_add(ledger_core::dispatcher::LEASE_MARGIN_MS)
    }

    /// The dispatcher's limits, as `ledger_core::dispatcher` checks them.
    pub fn dispatch_config(&self) -> ledger_core::dispatcher::DispatchConfig {
        ledger_core::dispatcher::DispatchConfig {
            batch: self.payout_batch,
            concurrency: self.payout_concurrency,
            lease_ms: self.payout_lease_ms,
            call_timeout_ms: self.payout_call_timeout_ms,
            retry: self.payout_retry.clone(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (self.threads >= 1 && self.threads <= 256, "--threads must be 1..=256"),
            (self.pool_size >= 1 && self.pool_size <= 512, "--pool-size must be 1..=512"),
            (self.channel_capacity >= 1 && self.channel_capacity <= 100_000, "--channel-capacity must be 1..=100000"),
            (self.batch_size >= 1 && self.batch_size <= 1_000, "--batch-size must be 1..=1000"),
            (self.poll_interval_ms >= 1, "--poll-interval-ms must be at least 1"),
            (self.tx_attempts >= 1 && self.tx_attempts <= 100, "--tx-attempts must be 1..=100"),
            (self.job_max_attempts >= 1 && self.job_max_attempts <= 1_000, "--max-attempts must be 1..=1000"),
            (self.payout_threads <= 64, "--payout-threads must be 0..=64"),
            (self.payout_batch >= 1 && self.payout_batch <= 1_000, "--payout-batch must be 1..=1000"),
            (self.payout_lease_ms >= 100, "--payout-lease-ms must be at least 100"),
            (self.payout_poll_ms >= 1, "--payout-poll-ms must be at least 1"),
            (
                self.payout_retry.max_attempts >= 1 && self.payout_retry.max_attempts <= 1_000,
                "--payout-max-attempts must be 1..=1000",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, msg)) => Err(msg.to_string()),
            None if self.payout_threads > 0 => self.dispatch_config().validate(),
            None => Ok(()),
        }
    }
}

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
    /// Stop claiming; workers drain the channel until `drain_deadline`.
    stopping: AtomicBool,
    drain_deadline: Mutex<Option<Instant>>,
    /// Set when the database failed a batch during shutdown: the rest of the queue is
    /// left pending at once instead of failing one batch after another.
    abandon_queue: AtomicBool,
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
        self.stopping.load(Ordering::SeqCst)
    }

    /// Stopping, and the grace period is over: no new work, no more waiting.
    fn past_deadline(&self) -> bool {
        let deadline = *self.drain_deadline.lock().unwrap_or_else(|e| e.into_inner());
        deadline.is_some_and(|d| Instant::now() > d)
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
            && (waited >= STOPPING_CHECKOUT_WAIT || self.abandon_queue.load(Ordering::SeqCst) || self.past_deadline())
    }
}

/// Recording a gateway's answer is worth retrying until the grace period is over: an
/// answer not recorded means the payout is sent again after its lease.
struct UntilDeadline<'a>(&'a Shared);

impl Patience for UntilDeadline<'_> {
    fn may_retry(&self) -> bool {
        !self.0.past_deadline()
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

/// The pool's threads, each with what it is doing now, so that shutdown can wait for
/// them with a deadline and name the ones still busy when it runs out.
#[derive(Default)]
struct Tracker {
    threads: Mutex<BTreeMap<String, &'static str>>,
    changed: Condvar,
}

/// A thread's entry in the [`Tracker`]: made before the thread is spawned, moved into
/// it, and dropped when it ends (also by a panic), which removes the entry.
struct Tracked {
    tracker: Arc<Tracker>,
    name: String,
}

thread_local! {
    static TRACKED: RefCell<Option<(Arc<Tracker>, String)>> = const { RefCell::new(None) };
}

impl Tracker {
    fn threads(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, &'static str>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(self: &Arc<Self>, name: &str) -> Tracked {
        self.threads().insert(name.to_string(), "starting");
        Tracked { tracker: self.clone(), name: name.to_string() }
    }

    /// Waits until every tracked thread has ended or `deadline` passes; returns the
    /// threads still running then, with what they are doing.
    fn wait_all(&self, deadline: Instant) -> Vec<(String, &'static str)> {
        let mut threads = self.threads();
        loop {
            let now = Instant::now();
            if threads.is_empty() || now >= deadline {
                return threads.iter().map(|(name, what)| (name.clone(), *what)).collect();
            }
            threads = self.changed.wait_timeout(threads, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl Tracked {
    /// Called first thing on the tracked thread, so that [`doing`] finds its entry.
    fn enter(&self) {
        TRACKED.with(|t| *t.borrow_mut() = Some((self.tracker.clone(), self.name.clone())));
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Dropped on its own thread, normally; on the spawning one if the spawn failed.
        let _ = TRACKED.try_with(|t| {
            let mut t = t.borrow_mut();
            if t.as_ref().is_some_and(|(_, name)| *name == self.name) {
                *t = None;
            }
        });
        self.tracker.threads().remove(&self.name);
        self.tracker.changed.notify_all();
    }
}

/// Notes what the current (tracked) thread is about to do; a shutdown that cannot wait
/// for the thread any longer reports it.
fn doing(what: &'static str) {
    TRACKED.with(|t| {
        if let Some((tracker, name)) = &*t.borrow() {
            if let Some(slot) = tracker.threads().get_mut(name) {
                *slot = what;
            }
        }
    });
}

/// Why `submit` did not queue a job.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the worker pool is shutting down")]
    ShuttingDown,
    #[error("the job queue stayed full for {0:?}")]
    QueueFull(Duration),
}

/// A running worker pool. Dropping it without `shutdown` stops it too (same steps).
pub struct WorkerPool {
    shared: Arc<Shared>,
    /// One lane (bounded channel) per worker; see [`lane_of`].
    senders: Option<Vec<Sender<i64>>>,
    supervisor: Option<JoinHandle<()>>,
    claimer: Option<JoinHandle<()>>,
    dispatchers: Vec<JoinHandle<()>>,
}

/// What shutdown saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Jobs queued or in progress here that were not finished: they stay pending (or
    /// are rolled back to pending by the server) and are claimed again later.
    pub left_pending: usize,
    pub elapsed_ms: u128,
    /// Threads still busy when shutdown stopped waiting (grace period plus
    /// [`WIND_DOWN`]), as "name: what it was doing". Empty after a clean stop.
    pub still_running: Vec<String>,
}

impl ShutdownReport {
    /// Every thread ended within the grace period (plus [`WIND_DOWN`]).
    pub fn is_clean(&self) -> bool {
        self.still_running.is_empty()
    }
}

/// Sets up a [`WorkerPool`]: what processes jobs, where metrics go, and which gateway
/// (if any) the payout dispatcher calls.
pub struct Builder {
    url: String,
    config: WorkerConfig,
    processor: Arc<dyn Processor>,
    metrics: Arc<Metrics>,
    gateway: Option<Arc<dyn PayoutGateway>>,
}

impl Builder {
    pub fn processor(mut self, processor: Arc<dyn Processor>) -> Builder {
        self.processor = processor;
        self
    }

    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Builder {
        self.metrics = metrics;
        self
    }

    /// Dispatches payouts through `gateway` on `payout_threads` threads.
    pub fn gateway(mut self, gateway: Arc<dyn PayoutGateway>) -> Builder {
        self.gateway = Some(gateway);
        self
    }

    pub fn start(self) -> Result<WorkerPool, LedgerError> {
        WorkerPool::start_inner(self)
    }
}

impl WorkerPool {
    /// Processes withdrawals with ledger-core; no payout dispatcher.
    pub fn start(url: &str, config: WorkerConfig) -> Result<WorkerPool, LedgerError> {
        WorkerPool::builder(url, config).start()
    }

    pub fn builder(url: &str, config: WorkerConfig) -> Builder {
        Builder {
            url: url.to_string(),
            config,
            processor: Arc::new(LedgerProcessor),
            metrics: Metrics::new(),
            gateway: None,
        }
    }

    fn start_inner(b: Builder) -> Result<WorkerPool, LedgerError> {
        let Builder { url, config, processor, metrics, gateway } = b;
        config.validate().map_err(|reason| {
            LedgerError::Invalid(ledger_core::InvalidInput::BadField { field: "worker configuration", reason })
        })?;
        let session = SessionConfig {
            lock_timeout_ms: Some(config.lock_timeout_ms),
            statement_timeout_ms: None,
            application_name: Some(config.application_name.clone()),
        };
        // Connections that stop answering fail by themselves (unless the URL says otherwise).
        let url = db::with_network_timeouts(&url);
        let pool = db::pool(
            &url,
            &PoolConfig { max_size: config.pool_size, min_idle: Some(0), connection_timeout_ms: 10_000, session },
        )?;
        let per_lane = lane_capacity(&config);
        let (senders, receivers): (Vec<Sender<i64>>, Vec<Receiver<i64>>) =
            (0..config.threads).map(|_| bounded::<i64>(per_lane)).unzip();
        let dispatching = gateway.is_some() && config.payout_threads > 0;
        let shared = Arc::new(Shared {
            config: config.clone(),
            pool,
            url: url.clone(),
            processor,
            metrics,
            inflight: Mutex::new(HashSet::new()),
            stopping: AtomicBool::new(false),
            drain_deadline: Mutex::new(None),
            abandon_queue: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            dispatching,
            tracker: Arc::default(),
            payout_wake: bounded(1),
            payout_handoff: bounded(config.payout_threads.max(1) * HANDOFF_PER_DISPATCHER),
            gateway_refused: AtomicBool::new(false),
        });
        let supervisor = {
            let shared = shared.clone();
            spawn_tracked(&shared.tracker.clone(), "supervisor".into(), move || supervise(shared, receivers))
                .map_err(|e| LedgerError::Pool(format!("spawning the supervisor: {e}")))?
        };
        let claimer = if config.claim {
            let (shared, senders) = (shared.clone(), senders.clone());
            Some(
                spawn_tracked(&shared.tracker.clone(), "claimer".into(), move || {
                    resilient(&shared.clone(), "claimer", || claim_loop(shared.clone(), senders.clone()))
                })
                .map_err(|e| LedgerError::Pool(format!("spawning the claimer: {e}")))?,
            )
        } else {
            None
        };
        let mut dispatchers = Vec::new();
        if let (true, Some(gateway)) = (dispatching, gateway) {
            for n in 0..config.payout_threads {
                let (shared, gateway) = (shared.clone(), gateway.clone());
                dispatchers.push(
                    spawn_tracked(&shared.tracker.clone(), format!("payouts-{n}"), move || {
                        resilient(&shared, "payout dispatcher", || dispatch_loop(&shared, gateway.as_ref()))
                    })
                    .map_err(|e| LedgerError::Pool(format!("spawning a payout dispatcher: {e}")))?,
                );
            }
        }
        info!(
            threads = config.threads,
            pool_size = config.pool_size,
            batch_size = config.batch_size,
            channel_capacity = config.channel_capacity,
            claim = config.claim,
            payout_threads = dispatchers.len(),
            "worker pool started"
        );
        Ok(WorkerPool { shared, senders: Some(senders), supervisor: Some(supervisor), claimer, dispatchers })
    }

    pub fn start_with(
        url: &str,
        config: WorkerConfig,
        processor: Arc<dyn Processor>,
        metrics: Arc<Metrics>,
    ) -> Result<WorkerPool, LedgerError> {
        WorkerPool::builder(url, config).processor(processor).metrics(metrics).start()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Queues a committed pending withdrawal for processing. Blocks while the queue is
    /// full, at most `wait`.
    pub fn submit(&self, id: WithdrawalId, wait: Duration) -> Result<(), SubmitError> {
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let senders = self.senders.as_ref().ok_or(SubmitError::ShuttingDown)?;
        // The account is not known here; any lane is correct, only locality suffers.
        let sender = &senders[lane_of(id.get(), senders.len())];
        if !self.shared.inflight().insert(id.get()) {
            return Ok(()); // already queued or in progress here
        }
        match sender.send_timeout(id.get(), wait) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.inflight().remove(&id.get());
                match e {
                    SendTimeoutError::Timeout(_) => Err(SubmitError::QueueFull(wait)),
                    SendTimeoutError::Disconnected(_) => Err(SubmitError::ShuttingDown),
                }
            }
        }
    }

    /// True once the claimer saw no pending job and nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.shared.idle.load(Ordering::SeqCst)
    }

    /// Jobs queued or in progress in this pool.
    pub fn inflight(&self) -> usize {
        self.shared.inflight().len()
    }

    /// Stops claiming, lets workers finish what is in flight and drain the queue for up
    /// to `shutdown_grace_ms`, and waits for every thread, but never longer than the
    /// grace period plus [`WIND_DOWN`]: threads still busy then (inside libpq on a
    /// connection that stopped answering, or inside a gateway call) are left running
    /// and listed in the report. Nothing they had not committed is committed by this
    /// process; the caller should exit (their connections close, the server rolls back).
    pub fn shutdown(mut self) -> ShutdownReport {
        self.stop()
    }

    fn stop(&mut self) -> ShutdownReport {
        let started = Instant::now();
        let grace = Duration::from_millis(self.shared.config.shutdown_grace_ms);
        *self.shared.drain_deadline.lock().unwrap_or_else(|e| e.into_inner()) = Some(started + grace);
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.senders.take();
        let give_up_at = started + grace + WIND_DOWN;
        let busy = self.shared.tracker.wait_all(give_up_at);
        let mut handles: Vec<JoinHandle<()>> = self.claimer.take().into_iter().collect();
        handles.extend(self.supervisor.take());
        handles.append(&mut self.dispatchers);
        for handle in handles {
            // A thread that left the tracker has only its return left to do; one still
            // in it is not waited for (dropping its handle detaches it).
            while !handle.is_finished() && busy.is_empty() && Instant::now() < give_up_at {
                thread::sleep(Duration::from_millis(1));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        if busy.is_empty() {
            // A batch that committed after the dispatchers stopped may have handed over
            // claims: give them back, so their payouts are due at once, not after the lease.
            for claim in self.shared.payout_handoff.1.try_iter().collect::<Vec<_>>() {
                release_claim(&self.shared, claim);
            }
        }
        let left_pending = self.shared.inflight().len();
        self.shared.inflight().clear();
        let still_running: Vec<String> = busy.iter().map(|(name, what)| format!("{name}: {what}")).collect();
        let report = ShutdownReport { left_pending, elapsed_ms: started.elapsed().as_millis(), still_running };
        if report.is_clean() {
            info!(left_pending = report.left_pending, elapsed_ms = report.elapsed_ms as u64, "worker pool stopped");
        } else {
            error!(
                threads = %report.still_running.join("; "),
                left_pending = report.left_pending,
                elapsed_ms = report.elapsed_ms as u64,
                grace_ms = self.shared.config.shutdown_grace_ms,
                "threads still busy after the shutdown grace period; not waiting for them. Nothing they \
                 had not committed is committed: the server rolls their transactions back when their \
                 connections close, their jobs stay pending, and a payout whose gateway call was cut \
                 off stays pending and is sent again (same idempotency key) when its lease runs out"
            );
        }
        report
    }
}

/// Spawns a thread registered in `tracker` for as long as it runs.
fn spawn_tracked<T: Send + 'static>(
    tracker: &Arc<Tracker>,
    name: String,
    body: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    let tracked = tracker.register(&name);
    thread::Builder::new().name(name).spawn(move || {
        tracked.enter();
        let _tracked = tracked;
        body()
    })
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        if self.supervisor.is_some() {
            self.stop();
        }
    }
}

/// Runs a long-lived loop (claimer, dispatcher) until shutdown, restarting it in place
/// after a panic instead of letting the thread die: a daemon that silently stopped
/// claiming would look alive and do nothing.
fn resilient(shared: &Shared, what: &str, body: impl Fn()) {
    loop {
        match catch_unwind(AssertUnwindSafe(&body)) {
            Ok(()) => return,
            Err(panic) => {
                shared.metrics.panics.fetch_add(1, Ordering::Relaxed);
                error!(thread = what, panic = panic_message(&panic), "panicked; restarting it");
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Jobs of one account always go to the same worker's lane, so concurrent batches lock
/// disjoint sets of accounts and never wait for each other; a hot account's jobs are
/// all batched under one lock by one worker.
fn lane_of(key: i64, lanes: usize) -> usize {
    (key.unsigned_abs() % lanes as u64) as usize
}

fn lane_capacity(config: &WorkerConfig) -> usize {
    (config.channel_capacity / config.threads).max(config.batch_size).max(1)
}

/// Keeps one worker per lane alive: a worker that panicked is replaced, until shutdown.
fn supervise(shared: Arc<Shared>, receivers: Vec<Receiver<i64>>) {
    let (s, r) = (shared.clone(), receivers.clone());
    resilient(&shared, "supervisor", move || supervise_workers(s.clone(), r.clone()));
}

fn supervise_workers(shared: Arc<Shared>, receivers: Vec<Receiver<i64>>) {
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
        let stopping = shared.stopping.load(Ordering::SeqCst);
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
enum WorkerExit {
    Done,
    Panicked,
}

fn worker_loop(shared: &Shared, receiver: &Receiver<i64>) -> WorkerExit {
    let batch_size = shared.config.batch_size;
    loop {
        doing("waiting for jobs");
        let first = match receiver.recv_timeout(Duration::from_millis(50)) {
            Ok(id) => id,
            Err(RecvTimeoutError::Disconnected) => return WorkerExit::Done,
            Err(RecvTimeoutError::Timeout) => {
                if shared.stopping.load(Ordering::SeqCst) && receiver.is_empty() {
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
        if shared.stopping() && (shared.past_deadline() || shared.abandon_queue.load(Ordering::SeqCst)) {
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

fn release(shared: &Shared, ids: &[WithdrawalId]) {
    let mut inflight = shared.inflight();
    for id in ids {
        inflight.remove(&id.get());
    }
}

fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// After a batch panicked (and rolled back), runs its jobs one at a time: the one that
/// panics again is failed at once with the panic message; the others are processed.
fn isolate_panicking_jobs(shared: &Shared, ids: &[WithdrawalId]) {
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

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// One batch: one transaction (retried in-process on transient errors, on a fresh
/// connection if the old one died), then bookkeeping of each job's outcome.
///
/// During shutdown nothing is tried twice: a batch that fails then is left pending as
/// a whole, with no attempt recorded (the next run does it).
fn process_batch(shared: &Shared, ids: &[WithdrawalId]) {
    let opts = TxOptions { max_attempts: shared.config.tx_attempts, ..TxOptions::default() };
    let mut attempts = 0_u64;
    shared.metrics.batches.fetch_add(1, Ordering::Relaxed);
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
    shared.metrics.retried.fetch_add(attempts.saturating_sub(1), Ordering::Relaxed);
    let committed_at = now_us();
    if let Ok(items) = &result {
        let debited = items.iter().filter(|i| matches!(i.outcome, JobOutcome::Debited { .. })).count();
        let handed = claimed.as_ref().map_or(0, |c| c.requests.len());
        if let Some(claim) = claimed.filter(|c| !c.requests.is_empty()) {
            hand_off(shared, claim);
        }
        if debited > handed {
            // Payouts queued unclaimed (the careful path): due now.
            let _ = shared.payout_wake.0.try_send(());
        }
    }
    match result {
        Ok(items) => {
            for item in items {
                match item.outcome {
                    JobOutcome::Debited { .. } => {
                        shared.metrics.debited.fetch_add(1, Ordering::Relaxed);
                        if let Some(t) = item.enqueued_at_us {
                            let us = u64::try_from(committed_at - t).unwrap_or(0);
                            shared.metrics.observe_latency(Duration::from_micros(us));
                        }
                        debug!(withdrawal = item.id.get(), "debited");
                    }
                    JobOutcome::Rejected { code, .. } => {
                        shared.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                        if let Some(t) = item.enqueued_at_us {
                            let us = u64::try_from(committed_at - t).unwrap_or(0);
                            shared.metrics.observe_latency(Duration::from_micros(us));
                        }
                        debug!(withdrawal = item.id.get(), code, "rejected");
                    }
                    JobOutcome::Skipped => {
                        shared.metrics.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    // Its savepoint was rolled back: during shutdown it just stays pending.
                    JobOutcome::Errored { .. } if shared.stopping() => {}
                    JobOutcome::Errored { error, .. } => {
                        record_attempt(shared, item.id, &error);
                    }
                }
            }
        }
        Err(e) if shared.stopping() => {
            if connection_trouble(&e) {
                shared.abandon_queue.store(true, Ordering::SeqCst);
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

/// How many handed-over claims may wait per dispatcher thread. Bounded: when the
/// dispatchers fall behind, the batch workers wait for them (backpressure).
const HANDOFF_PER_DISPATCHER: usize = 2;

/// The longest a batch worker waits for a dispatcher to take its claimed payouts
/// before it gives the claims back itself.
const HANDOFF_WAIT: Duration = Duration::from_secs(2);

/// Gives a batch's claimed payouts to a dispatcher. If none takes them in time (all
/// busy, stopped, or shutting down), the claims are released so the payouts are due at
/// once instead of after the lease.
fn hand_off(shared: &Shared, claim: payouts::Claim) {
    let claim = match shared.payout_handoff.0.send_timeout(claim, HANDOFF_WAIT) {
        Ok(()) => return,
        Err(SendTimeoutError::Timeout(c) | SendTimeoutError::Disconnected(c)) => c,
    };
    release_claim(shared, claim);
}

/// Gives back claims no call was made under (their payouts are due again at once).
fn release_claim(shared: &Shared, claim: payouts::Claim) {
    let verdicts: Vec<(PayoutRequest, Verdict)> = claim.requests.into_iter().map(|r| (r, Verdict::NotSent)).collect();
    if !verdicts.is_empty() {
        debug!(payouts = verdicts.len(), "handing claimed payouts back unsent");
        record_payouts(shared, &verdicts);
    }
}

/// Records a failed attempt of one job; false when the database could not be reached.
fn record_attempt(shared: &Shared, id: WithdrawalId, error: &str) -> bool {
    let opts = TxOptions { max_attempts: shared.config.tx_attempts, ..TxOptions::default() };
    let result = ledger_core::tx::transaction_pooled_until(&shared.pool, &opts, shared, |tx| {
        withdrawals::record_failed_attempt(
            tx.conn(),
            id,
            error,
            shared.config.job_max_attempts,
            shared.config.job_max_backoff_ms,
        )
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

/// The claimer: claims due jobs into the channel while it has room; when caught up,
/// waits for a NOTIFY on `ledger_withdrawals` (checked every 2 ms) or the poll interval.
fn claim_loop(shared: Arc<Shared>, senders: Vec<Sender<i64>>) {
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
            None => {
                doing("connecting to the database (claimer)");
                match listen(&shared.url, &config.application_name) {
                    Ok(c) => {
                        if failures > 0 {
                            info!("claimer reconnected");
                        }
                        failures = 0;
                        conn.insert(c)
                    }
                    Err(e) => {
                        failures += 1;
                        warn!(error = %e, "claimer cannot connect; retrying");
                        doing("backing off (claimer)");
                        sleep_unless_stopping(&shared, backoff(failures));
                        continue;
                    }
                }
            }
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
        // Fast path: the next jobs after the cursor. When that comes up short (caught
        // up), sweep for due jobs the cursor passed over, excluding what is queued here.
        let claimed = withdrawals::claim_after(c, cursor, room as i64).and_then(|mut ids| {
            // The sweep is for stragglers and retries, which can wait a few ms: at a
            // steady trickle it would otherwise run on every wake-up.
            if ids.len() < room && (ids.is_empty() || last_sweep.elapsed() >= SWEEP_EVERY) {
                last_sweep = Instant::now();
                let mut exclude: Vec<i64> = shared.inflight().iter().copied().collect();
                exclude.extend(ids.iter().map(|(w, _)| w.get()));
                ids.extend(withdrawals::claim_due(c, (room - ids.len()) as i64, &exclude)?);
            }
            Ok(ids)
        });
        match claimed {
            Ok(ids) => {
                failures = 0;
                let claimed = ids.len();
                for (id, account) in ids {
                    cursor = cursor.max(id.get());
                    shared.inflight().insert(id.get());
                    let lane = &senders[lane_of(account.get(), senders.len())];
                    doing("queueing jobs");
                    if !send_unless_stopping(&shared, lane, id.get()) {
                        shared.inflight().remove(&id.get());
                    }
                }
                shared.metrics.claimed.fetch_add(claimed as u64, Ordering::Relaxed);
                if claimed < room {
                    // Caught up. Idle when nothing is pending and nothing is in flight
                    // (checked only when this round found nothing at all).
                    doing("checking for work (database)");
                    let idle = claimed == 0
                        && shared.inflight().is_empty()
                        && withdrawals::pending_count(c).map(|n| n == 0).unwrap_or(false)
                        && (!shared.dispatching || payouts::pending_count(c).map(|n| n == 0).unwrap_or(false));
                    shared.idle.store(idle, Ordering::SeqCst);
                    doing("waiting for a NOTIFY (database)");
                    if let Err(e) = wait_for_work(&shared, c) {
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
                sleep_unless_stopping(&shared, backoff(failures));
            }
        }
    }
    debug!("claimer stopped");
}

/// How often the claimer sweeps for due jobs its cursor passed over while it has work.
const SWEEP_EVERY: Duration = Duration::from_millis(50);

fn listen(url: &str, application_name: &str) -> Result<PgConnection, LedgerError> {
    let session = SessionConfig {
        lock_timeout_ms: Some(1_000),
        statement_timeout_ms: Some(30_000),
        application_name: Some(format!("{application_name}:claimer")),
    };
    let mut conn = db::connect(url, &session)?;
    diesel::sql_query("LISTEN ledger_withdrawals").execute(&mut conn)?;
    Ok(conn)
}

fn wait_for_work(shared: &Shared, conn: &mut PgConnection) -> Result<(), LedgerError> {
    let deadline = Instant::now() + Duration::from_millis(shared.config.poll_interval_ms);
    loop {
        let mut woke = false;
        for n in conn.notifications_iter() {
            n?;
            woke = true;
        }
        if woke || Instant::now() >= deadline || shared.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Diesel does not expose the socket to wait on; checking for a NOTIFY costs one
        // non-blocking read, so a 1 ms check adds at most ~1 ms to a job's latency.
        thread::sleep(Duration::from_millis(1));
    }
}

fn send_unless_stopping(shared: &Shared, sender: &Sender<i64>, id: i64) -> bool {
    loop {
        match sender.send_timeout(id, Duration::from_millis(50)) {
            Ok(()) => return true,
            Err(SendTimeoutError::Disconnected(_)) => return false,
            Err(SendTimeoutError::Timeout(_)) if shared.stopping.load(Ordering::SeqCst) => return false,
            Err(SendTimeoutError::Timeout(_)) => {}
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let cap_ms = 2_000_u64;
    let exp = 20_u64.saturating_mul(1 << failures.min(10));
    Duration::from_millis(fastrand::u64(exp.min(cap_ms) / 2..=exp.min(cap_ms)))
}

/// Waits for a handed-over claim or a batch that debited something (or `poll` to pass,
/// or shutdown). Returns a handed-over claim if one came.
fn wait_for_payouts(shared: &Shared, poll: Duration) -> Option<payouts::Claim> {
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

fn sleep_unless_stopping(shared: &Shared, total: Duration) {
    let until = Instant::now() + total;
    loop {
        let now = Instant::now();
        if now >= until || shared.stopping() {
            return;
        }
        thread::sleep((until - now).min(Duration::from_millis(10)));
    }
}

/// A payout dispatcher: claims due payouts under a lease (a short transaction of its
/// own), calls the gateway with no connection checked out and so no transaction open,
/// then records each answer in a new transaction.
///
/// Once stopping it starts no new gateway call: the call in flight is finished and
/// recorded (the gateway's timeouts bound it), the leases of the others are handed back.
/// A call still in flight when shutdown stops waiting is simply abandoned: its payout
/// stays pending and is due again when its lease runs out.
fn dispatch_loop(shared: &Shared, gateway: &dyn PayoutGateway) {
    let config = &shared.config;
    let poll = Duration::from_millis(config.payout_poll_ms);
    let mut failures = 0_u32;
    let mut last_poll = Instant::now() - poll;
    let mut waiting: Option<payouts::Claim> = None;
    let mut last_was_table = false;
    while !shared.stopping() {
        if shared.gateway_refused.load(Ordering::SeqCst) {
            doing("stopped: the gateway refused our credentials");
            if let Some(claim) = waiting.take().or_else(|| shared.payout_handoff.1.try_recv().ok()) {
                release_claim(shared, claim);
            }
            sleep_unless_stopping(shared, Duration::from_millis(200));
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
            // Batches that committed meanwhile are sent and recorded in the same round:
            // one recording transaction for all of them. The round's lease is the
            // earliest of theirs.
            Some(mut claim) => {
                while claim.requests.len() < config.payout_batch {
                    let Ok(more) = shared.payout_handoff.1.try_recv() else { break };
                    claim.lease_until = claim.lease_until.min(more.lease_until);
                    claim.requests.extend(more.requests);
                }
                claim
            }
            None => {
                last_poll = Instant::now();
                doing("claiming payouts (database)");
                // The connection goes back to the pool here, before any gateway call.
                let claimed = checkout(shared).and_then(|mut conn| {
                    payouts::claim_due(&mut conn, config.payout_batch as i64, config.payout_lease_ms)
                });
                match claimed {
                    Ok(r) => {
                        failures = 0;
                        r
                    }
                    Err(e) => {
                        failures += 1;
                        if !shared.stopping() {
                            warn!(error = %e, "claiming payouts failed; retrying");
                        }
                        doing("backing off (payouts)");
                        sleep_unless_stopping(shared, backoff(failures));
                        continue;
                    }
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
        // Calls with bounded concurrency and no transaction open; none once stopping,
        // and none that could outlast the claim's lease. Then every verdict in one
        // transaction, each under its claim's fencing token.
        doing("calling the payout gateway");
        let budget = Duration::from_millis(config.payout_call_budget_ms());
        let lease_until = requests.lease_until;
        let may_call = || {
            !shared.stopping()
                && !shared.gateway_refused.load(Ordering::SeqCst)
                && Instant::now() + budget <= lease_until
        };
        let verdicts =
            ledger_core::dispatcher::resolve_all(gateway, &requests.requests, config.payout_concurrency, &may_call);
        shared.metrics.gateway_calls.fetch_add(verdicts.len() as u64, Ordering::Relaxed);
        doing("recording payouts (database)");
        record_payouts(shared, &verdicts);
    }
    // Claims handed over but not started: give them back, so they are due at once
    // (if the database is gone, their leases simply run out).
    doing("handing back unsent payouts");
    for claim in waiting.into_iter().chain(shared.payout_handoff.1.try_iter()) {
        release_claim(shared, claim);
    }
    debug!("payout dispatcher stopped");
}

fn record_payouts(shared: &Shared, verdicts: &[(PayoutRequest, Verdict)]) {
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
