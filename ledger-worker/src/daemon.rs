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

use std::any::Any;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use diesel::pg::PgConnection;
use diesel::RunQueryDsl;
use ledger_core::db::{self, Pool, PoolConfig, SessionConfig};
use ledger_core::payouts::{self, GatewayOutcome, PayoutGateway, PayoutRequest, Recorded, RetryPolicy};
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
    /// On shutdown, queued jobs not started within this time stay pending for later.
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
            payout_batch: 16,
            payout_lease_ms: 60_000,
            payout_poll_ms: 50,
            payout_retry: RetryPolicy::default(),
        }
    }
}

impl WorkerConfig {
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
    /// Set by the claimer when nothing is pending or in flight.
    idle: AtomicBool,
    /// Whether payouts are dispatched here (so idle also waits for them).
    dispatching: bool,
}

impl Shared {
    fn inflight(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn past_deadline(&self) -> bool {
        let deadline = *self.drain_deadline.lock().unwrap_or_else(|e| e.into_inner());
        deadline.is_some_and(|d| Instant::now() > d)
    }
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
    /// Queued jobs left pending because the grace period ran out.
    pub left_pending: usize,
    pub elapsed_ms: u128,
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
            idle: AtomicBool::new(false),
            dispatching,
        });
        let supervisor = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("supervisor".into())
                .spawn(move || supervise(shared, receivers))
                .map_err(|e| LedgerError::Pool(format!("spawning the supervisor: {e}")))?
        };
        let claimer = if config.claim {
            let (shared, senders) = (shared.clone(), senders.clone());
            Some(
                thread::Builder::new()
                    .name("claimer".into())
                    .spawn(move || {
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
                    thread::Builder::new()
                        .name(format!("payouts-{n}"))
                        .spawn(move || {
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
    /// to `shutdown_grace_ms`, then joins every thread.
    pub fn shutdown(mut self) -> ShutdownReport {
        self.stop()
    }

    fn stop(&mut self) -> ShutdownReport {
        let started = Instant::now();
        *self.shared.drain_deadline.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(started + Duration::from_millis(self.shared.config.shutdown_grace_ms));
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.senders.take();
        if let Some(c) = self.claimer.take() {
            let _ = c.join();
        }
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
        for d in self.dispatchers.drain(..) {
            let _ = d.join();
        }
        let left_pending = self.shared.inflight().len();
        self.shared.inflight().clear();
        let report = ShutdownReport { left_pending, elapsed_ms: started.elapsed().as_millis() };
        info!(left_pending = report.left_pending, elapsed_ms = report.elapsed_ms as u64, "worker pool stopped");
        report
    }
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
    let spawn = |lane: usize, generation: usize| {
        let (shared, receiver) = (shared.clone(), receivers[lane].clone());
        thread::Builder::new()
            .name(format!("worker-{lane}.{generation}"))
            .spawn(move || worker_loop(&shared, &receiver))
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
        if stopping && workers.iter().all(Option::is_none) {
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
        if shared.stopping.load(Ordering::SeqCst) && shared.past_deadline() {
            // Out of grace: leave these pending (the next run claims them).
            let mut inflight = shared.inflight();
            batch.iter().for_each(|id| {
                inflight.remove(id);
            });
            continue;
        }
        let ids: Vec<WithdrawalId> = batch.iter().filter_map(|id| WithdrawalId::new(*id).ok()).collect();
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
        let single = [*id];
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| process_batch(shared, &single))) {
            let reason = format!("worker panicked: {}", panic_message(&panic));
            let recorded = shared
                .pool
                .get()
                .map_err(LedgerError::from)
                .and_then(|mut conn| withdrawals::fail_now(&mut conn, *id, &reason));
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
fn process_batch(shared: &Shared, ids: &[WithdrawalId]) {
    let opts = TxOptions { max_attempts: shared.config.tx_attempts, ..TxOptions::default() };
    let mut attempts = 0_u64;
    shared.metrics.batches.fetch_add(1, Ordering::Relaxed);
    let mut result = ledger_core::tx::transaction_pooled(&shared.pool, &opts, |tx| {
        attempts += 1;
        shared.processor.process(tx, ids)
    });
    if matches!(&result, Err(e) if !e.is_transient() && !matches!(e, LedgerError::RetriesExhausted { .. })) {
        warn!(error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(), "batch failed; redoing it job by job");
        result = ledger_core::tx::transaction_pooled(&shared.pool, &opts, |tx| {
            attempts += 1;
            shared.processor.process_careful(tx, ids)
        });
    }
    shared.metrics.retried.fetch_add(attempts.saturating_sub(1), Ordering::Relaxed);
    let committed_at = now_us();
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
                    JobOutcome::Errored { error, .. } => record_attempt(shared, item.id, &error),
                }
            }
        }
        Err(e) => {
            warn!(error = %e, jobs = ids.len(), "batch failed after retries; recording an attempt per job");
            for id in ids {
                record_attempt(shared, *id, &e.to_string());
            }
        }
    }
}

fn record_attempt(shared: &Shared, id: WithdrawalId, error: &str) {
    let opts = TxOptions { max_attempts: shared.config.tx_attempts, ..TxOptions::default() };
    let result = ledger_core::tx::transaction_pooled(&shared.pool, &opts, |tx| {
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
        Err(e) => warn!(withdrawal = id.get(), error = %e, "could not record a failed attempt"),
    }
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
    while !shared.stopping.load(Ordering::SeqCst) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match listen(&shared.url, &config.application_name) {
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
                    sleep_unless_stopping(&shared, backoff(failures));
                    continue;
                }
            },
        };
        let room = senders.iter().map(|s| per_lane.saturating_sub(s.len())).sum::<usize>().min(max_claim);
        // Claim in chunks worth a round trip: with the queue nearly full, let the
        // workers drain it a little instead of claiming a handful of ids at a time.
        if room < min_claim {
            thread::sleep(Duration::from_micros(500));
            continue;
        }
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
                    if !send_unless_stopping(&shared, lane, id.get()) {
                        shared.inflight().remove(&id.get());
                    }
                }
                shared.metrics.claimed.fetch_add(claimed as u64, Ordering::Relaxed);
                if claimed < room {
                    // Caught up. Idle when nothing is pending and nothing is in flight
                    // (checked only when this round found nothing at all).
                    let idle = claimed == 0
                        && shared.inflight().is_empty()
                        && withdrawals::pending_count(c).map(|n| n == 0).unwrap_or(false)
                        && (!shared.dispatching || payouts::pending_count(c).map(|n| n == 0).unwrap_or(false));
                    shared.idle.store(idle, Ordering::SeqCst);
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

fn sleep_unless_stopping(shared: &Shared, total: Duration) {
    let until = Instant::now() + total;
    while Instant::now() < until && !shared.stopping.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(10));
    }
}

/// A payout dispatcher: claims due payouts under a lease (a short transaction of its
/// own), calls the gateway with no connection checked out and so no transaction open,
/// then records each answer in a new transaction.
fn dispatch_loop(shared: &Shared, gateway: &dyn PayoutGateway) {
    let config = &shared.config;
    let mut failures = 0_u32;
    while !shared.stopping.load(Ordering::SeqCst) {
        let claimed = shared
            .pool
            .get()
            .map_err(LedgerError::from)
            .and_then(|mut conn| payouts::claim_due(&mut conn, config.payout_batch as i64, config.payout_lease_ms)); // the connection goes back to the pool here, before any gateway call
        let requests = match claimed {
            Ok(r) => {
                failures = 0;
                r
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, "claiming payouts failed; retrying");
                sleep_unless_stopping(shared, backoff(failures));
                continue;
            }
        };
        if requests.is_empty() {
            sleep_unless_stopping(shared, Duration::from_millis(config.payout_poll_ms));
            continue;
        }
        let mut unsent = requests.into_iter();
        for request in unsent.by_ref() {
            let outcome = catch_unwind(AssertUnwindSafe(|| gateway.send(&request))).unwrap_or_else(|panic| {
                GatewayOutcome::Transient { error: format!("gateway panicked: {}", panic_message(&panic)) }
            });
            shared.metrics.gateway_calls.fetch_add(1, Ordering::Relaxed);
            record_payout(shared, &request, &outcome);
            if shared.stopping.load(Ordering::SeqCst) {
                break;
            }
        }
        // Stopping mid-batch: hand back the leases of payouts not sent.
        for request in unsent {
            if let Ok(mut conn) = shared.pool.get() {
                let _ = payouts::release(&mut conn, &request);
            }
        }
    }
    debug!("payout dispatcher stopped");
}

fn record_payout(shared: &Shared, request: &PayoutRequest, outcome: &GatewayOutcome) {
    let opts = TxOptions { max_attempts: shared.config.tx_attempts.max(3), ..TxOptions::default() };
    let result = ledger_core::tx::transaction_pooled(&shared.pool, &opts, |tx| {
        payouts::record_tx(tx, request, outcome, &shared.config.payout_retry)
    });
    let payout = request.payout.get();
    match result {
        Ok(Recorded::Settled { .. }) => {
            shared.metrics.payouts_settled.fetch_add(1, Ordering::Relaxed);
            debug!(payout, "payout settled");
        }
        Ok(Recorded::Returned { .. }) => {
            shared.metrics.payouts_returned.fetch_add(1, Ordering::Relaxed);
            warn!(payout, ?outcome, "payout refused; funds returned to the customer");
        }
        Ok(Recorded::Retrying) => {
            shared.metrics.payouts_retrying.fetch_add(1, Ordering::Relaxed);
            debug!(payout, ?outcome, "payout will be retried");
        }
        Ok(Recorded::Failed) => {
            shared.metrics.payouts_failed.fetch_add(1, Ordering::Relaxed);
            error!(payout, ?outcome, "payout failed after its last attempt; an operator must retry or return it");
        }
        Ok(Recorded::Superseded) => debug!(payout, "payout lease lost; not recorded"),
        // The answer is lost with the database; the lease runs out and the payout is
        // sent again with the same idempotency key.
        Err(e) => error!(payout, error = %e, "could not record the gateway's answer"),
    }
}
