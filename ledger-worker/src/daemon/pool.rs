//! The pool's face: start it (`WorkerPool::builder`), feed it (`submit`), watch it, and
//! stop it within a bounded time (`shutdown`).

use super::*;
use ledger_core::stats::QueueDepths;

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
    hold_expiry: Option<JoinHandle<()>>,
}

/// What shutdown saw.
#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownReport {
    /// Jobs handed to this pool's workers (queued in a lane or in a batch) that were not
    /// finished when it stopped: they stay pending (or are rolled back to pending by the
    /// server) and are claimed again later. Only what this process held in memory; the
    /// database's own figures are [`ShutdownReport::in_database`].
    pub unfinished_in_memory: usize,
    pub elapsed_ms: u128,
    /// Threads still busy when shutdown stopped waiting (grace period plus
    /// [`WIND_DOWN`]), as "name: what it was doing". Empty after a clean stop.
    pub still_running: Vec<String>,
    /// What the database holds once the pool's threads have stopped (withdrawals
    /// pending, paying out..., payouts pending...), read by [`ledger_core::stats::depths`]
    /// on a connection of its own within [`COUNT_WAIT`]; or why it could not be read.
    pub in_database: Result<QueueDepths, CountsUnread>,
}

impl ShutdownReport {
    /// Every thread ended within the grace period (plus [`WIND_DOWN`]).
    pub fn is_clean(&self) -> bool {
        self.still_running.is_empty()
    }
}

/// Why shutdown could not say what is left in the database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CountsUnread {
    /// No answer in time: a connection or a statement that did not come back (a server
    /// that stopped answering). The thread asking is left behind.
    #[error("no answer from the database within {0:?}")]
    TimedOut(Duration),
    /// The database answered with an error (or could not be reached).
    #[error("{0}")]
    Failed(String),
    /// The pool was dropped without [`WorkerPool::shutdown`]: nothing was read.
    #[error("not read: the pool was dropped without shutdown")]
    NotAsked,
}

/// After its threads have stopped, the longest shutdown waits for the database's counts
/// (connecting included).
pub const COUNT_WAIT: Duration = Duration::from_secs(2);

/// The statement timeout of that read: the counts are a few index reads.
const COUNT_STATEMENT_TIMEOUT_MS: u64 = 1_000;

/// Reads the queue depths on a connection of its own (not the pool's, whose connections
/// may be held by threads left behind), on a thread of its own, so that a server that
/// stopped answering costs at most [`COUNT_WAIT`]; that thread is then left behind.
fn read_left_in_database(url: &str, application_name: &str) -> Result<QueueDepths, CountsUnread> {
    let session = SessionConfig {
        lock_timeout_ms: Some(COUNT_STATEMENT_TIMEOUT_MS),
        statement_timeout_ms: Some(COUNT_STATEMENT_TIMEOUT_MS),
        application_name: Some(format!("{application_name} shutdown counts")),
    };
    let (sender, receiver) = bounded(1);
    let url = url.to_string();
    thread::Builder::new()
        .name("shutdown-counts".into())
        .spawn(move || {
            let read = db::connect(&url, &session).and_then(|mut conn| ledger_core::stats::depths(&mut conn));
            let _ = sender.send(read.map_err(|e| CountsUnread::Failed(e.to_string())));
        })
        .map_err(|e| CountsUnread::Failed(format!("spawning the thread that reads them: {e}")))?;
    match receiver.recv_timeout(COUNT_WAIT) {
        Ok(read) => read,
        Err(_) => Err(CountsUnread::TimedOut(COUNT_WAIT)),
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

    pub(super) fn start_inner(b: Builder) -> Result<WorkerPool, LedgerError> {
        let Builder { url, config, processor, metrics, gateway } = b;
        config.validate().map_err(|reason| {
            LedgerError::Invalid(ledger_core::InvalidInput::BadField { field: "worker configuration", reason })
        })?;
        // Connections that stop answering fail by themselves (unless the URL says otherwise).
        let url = db::with_network_timeouts(&url);
        let pool = connection_pool(&url, &config)?;
        let per_lane = lane_capacity(&config);
        let (senders, receivers): (Vec<Sender<i64>>, Vec<Receiver<i64>>) =
            (0..config.threads).map(|_| bounded::<i64>(per_lane)).unzip();
        let dispatching = gateway.is_some() && config.payout_threads > 0;
        let shared = Arc::new(Shared {
            config: config.clone(),
            pool,
            url,
            processor,
            metrics,
            inflight: Mutex::new(HashSet::new()),
            shutdown: Shutdown::default(),
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
        let claimer = if config.claim { Some(spawn_claimer(&shared, &senders)?) } else { None };
        let dispatchers = match (dispatching, gateway) {
            (true, Some(gateway)) => spawn_dispatchers(&shared, &gateway)?,
            _ => Vec::new(),
        };
        let hold_expiry = if config.hold_expiry { Some(holds::spawn_hold_expiry(&shared)?) } else { None };
        info!(
            threads = config.threads,
            pool_size = config.pool_size,
            batch_size = config.batch_size,
            channel_capacity = config.channel_capacity,
            claim = config.claim,
            payout_threads = dispatchers.len(),
            hold_expiry_interval_ms = config.hold_expiry.then_some(config.hold_expiry_interval_ms),
            "worker pool started"
        );
        Ok(WorkerPool {
            shared,
            senders: Some(senders),
            supervisor: Some(supervisor),
            claimer,
            dispatchers,
            hold_expiry,
        })
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
        if self.shared.stopping() {
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
    /// Then it reads what is left in the database (at most [`COUNT_WAIT`] more):
    /// [`ShutdownReport::in_database`].
    pub fn shutdown(mut self) -> ShutdownReport {
        self.stop(true)
    }

    /// Stops the threads (see [`WorkerPool::shutdown`]); then, with `count`, reads what
    /// is left in the database.
    pub(super) fn stop(&mut self, count: bool) -> ShutdownReport {
        let started = Instant::now();
        let busy = self.stop_threads(started);
        let unfinished_in_memory = self.shared.inflight().len();
        self.shared.inflight().clear();
        let still_running: Vec<String> = busy.iter().map(|(name, what)| format!("{name}: {what}")).collect();
        if !still_running.is_empty() {
            error!(
                threads = %still_running.join("; "),
                unfinished_in_memory,
                elapsed_ms = started.elapsed().as_millis() as u64,
                grace_ms = self.shared.config.shutdown_grace_ms,
                "threads still busy after the shutdown grace period; not waiting for them. Nothing they \
                 had not committed is committed: the server rolls their transactions back when their \
                 connections close, their jobs stay pending, and a payout whose gateway call was cut \
                 off stays pending and is sent again (same idempotency key) when its lease runs out"
            );
        }
        // Only now, with this pool's threads stopped (or left behind in a call that commits
        // nothing), do the database's figures say what this stop left.
        let in_database = if count {
            read_left_in_database(&self.shared.url, &self.shared.config.application_name)
        } else {
            Err(CountsUnread::NotAsked)
        };
        let report = ShutdownReport {
            unfinished_in_memory,
            elapsed_ms: started.elapsed().as_millis(),
            still_running,
            in_database,
        };
        match &report.in_database {
            Ok(left) => info!(
                unfinished_in_memory,
                withdrawals_pending = left.withdrawals_pending,
                withdrawals_paying_out = left.withdrawals_paying_out,
                payouts_pending = left.payouts_pending,
                elapsed_ms = report.elapsed_ms as u64,
                clean = report.is_clean(),
                "worker pool stopped"
            ),
            Err(CountsUnread::NotAsked) => {
                info!(unfinished_in_memory, elapsed_ms = report.elapsed_ms as u64, "worker pool stopped")
            }
            Err(why) => warn!(
                unfinished_in_memory,
                counts_error = %why,
                elapsed_ms = report.elapsed_ms as u64,
                clean = report.is_clean(),
                "worker pool stopped; what is left in the database could not be read"
            ),
        }
        report
    }

    /// Signals the stop and waits for the threads, at most the grace period plus
    /// [`WIND_DOWN`]. Returns the ones still busy then.
    fn stop_threads(&mut self, started: Instant) -> Vec<(String, &'static str)> {
        let grace = Duration::from_millis(self.shared.config.shutdown_grace_ms);
        self.shared.shutdown.begin(started, grace);
        self.senders.take();
        let give_up_at = started + grace + WIND_DOWN;
        let busy = self.shared.tracker.wait_all(give_up_at);
        let mut handles: Vec<JoinHandle<()>> = self.claimer.take().into_iter().collect();
        handles.extend(self.supervisor.take());
        handles.append(&mut self.dispatchers);
        handles.extend(self.hold_expiry.take());
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
        busy
    }
}

/// The r2d2 pool the workers and dispatchers check connections out of.
fn connection_pool(url: &str, config: &WorkerConfig) -> Result<Pool, LedgerError> {
    let session = SessionConfig {
        lock_timeout_ms: Some(config.lock_timeout_ms),
        statement_timeout_ms: None,
        application_name: Some(config.application_name.clone()),
    };
    db::pool(url, &PoolConfig { max_size: config.pool_size, min_idle: Some(0), connection_timeout_ms: 10_000, session })
}

/// The claimer thread: NOTIFY and sweeps -> lanes, restarted after a panic.
fn spawn_claimer(shared: &Arc<Shared>, senders: &[Sender<i64>]) -> Result<JoinHandle<()>, LedgerError> {
    let (shared, senders) = (shared.clone(), senders.to_vec());
    spawn_tracked(&shared.tracker.clone(), "claimer".into(), move || {
        resilient(&shared.clone(), "claimer", || claim_loop(shared.clone(), senders.clone()))
    })
    .map_err(|e| LedgerError::Pool(format!("spawning the claimer: {e}")))
}

/// The `payout_threads` dispatcher threads, each restarted after a panic.
fn spawn_dispatchers(
    shared: &Arc<Shared>,
    gateway: &Arc<dyn PayoutGateway>,
) -> Result<Vec<JoinHandle<()>>, LedgerError> {
    (0..shared.config.payout_threads)
        .map(|n| {
            let (shared, gateway) = (shared.clone(), gateway.clone());
            spawn_tracked(&shared.tracker.clone(), format!("payouts-{n}"), move || {
                resilient(&shared, "payout dispatcher", || dispatch_loop(&shared, gateway.as_ref()))
            })
            .map_err(|e| LedgerError::Pool(format!("spawning a payout dispatcher: {e}")))
        })
        .collect()
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        if self.supervisor.is_some() {
            self.stop(false);
        }
    }
}
