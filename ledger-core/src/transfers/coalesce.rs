//! Group commit for single transfers, as TigerBeetle's clients batch: many threads call
//! [`Coalescer::submit`]; committer threads take whatever is queued (up to a maximum)
//! and run it as one [`create_batch`](super::create_batch) transaction, every item
//! unlinked. Each caller blocks until its own item's transaction has committed and gets
//! the [`Receipt`] that [`transfer`](super::transfer) would give; a refused item fails
//! alone, with the error `transfer` would give.
//!
//! One committer at a time gathers a group while the others commit theirs: it takes the
//! first transfer as soon as one is queued, plus whatever else is queued at that
//! moment. If that is fewer than its previous group held (the callers it just answered
//! are still on their way back), it waits for them a little: at most
//! [`CoalescerConfig::linger`], never longer than the previous group's run, and not at
//! all if no committer took from the queue for longer than the linger first. It stops
//! waiting as soon as the group is as large as the previous one. So a lone sequential
//! caller, whose groups are all of one transfer, waits only right after larger groups
//! (at most once per committer) and never after the queue stood idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender, TrySendError};

use crate::batch::MAX_BATCH_ITEMS;
use crate::db::Pool;
use crate::error::{InvalidInput, LedgerError};
use crate::journal::Receipt;

use super::Transfer;

#[path = "coalesce_run.rs"]
mod run;

/// The most committer threads a [`Coalescer`] starts.
pub const MAX_COMMITTERS: usize = 16;

/// The largest queue a [`Coalescer`] takes (its slots are allocated up front).
pub const MAX_QUEUE_CAPACITY: usize = 1_000_000;

/// The longest [`CoalescerConfig::linger`] a [`Coalescer`] takes.
pub const MAX_LINGER: Duration = Duration::from_secs(1);

/// Limits of a [`Coalescer`], checked by [`Coalescer::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoalescerConfig {
    /// The most transfers one transaction takes (1 to [`MAX_BATCH_ITEMS`]).
    pub max_batch: usize,
    /// The most transfers waiting for a committer (1 to [`MAX_QUEUE_CAPACITY`]); beyond
    /// it [`Coalescer::submit`] is [`SubmitError::Overloaded`] at once.
    pub queue_capacity: usize,
    /// Committer threads (1 to [`MAX_COMMITTERS`]), each with a pooled connection while
    /// it commits: the pool needs at least as many connections.
    pub committers: usize,
    /// The longest a group smaller than its committer's previous group waits for more
    /// transfers before it commits (0 to [`MAX_LINGER`]; zero never waits). The wait is
    /// also never longer than the previous group's run; a group as large as the previous
    /// one, or gathered after the queue stood empty for longer than `linger`, does not
    /// wait at all. Each transfer waits at most this long, once.
    pub linger: Duration,
}

impl Default for CoalescerConfig {
    fn default() -> Self {
        CoalescerConfig { max_batch: 1_000, queue_capacity: 10_000, committers: 2, linger: Duration::from_millis(1) }
    }
}

impl CoalescerConfig {
    /// Refuses a limit out of range ([`InvalidInput::BadField`], the field named).
    pub fn check(&self) -> Result<(), LedgerError> {
        let bad = |field: &'static str, reason: String| Err(InvalidInput::BadField { field, reason }.into());
        if !(1..=MAX_BATCH_ITEMS).contains(&self.max_batch) {
            return bad("max_batch", format!("{}; must be 1 to {MAX_BATCH_ITEMS}", self.max_batch));
        }
        if !(1..=MAX_QUEUE_CAPACITY).contains(&self.queue_capacity) {
            return bad("queue_capacity", format!("{}; must be 1 to {MAX_QUEUE_CAPACITY}", self.queue_capacity));
        }
        if !(1..=MAX_COMMITTERS).contains(&self.committers) {
            return bad("committers", format!("{}; must be 1 to {MAX_COMMITTERS}", self.committers));
        }
        if self.linger > MAX_LINGER {
            return bad("linger", format!("{:?}; must be at most {MAX_LINGER:?}", self.linger));
        }
        Ok(())
    }
}

/// Why [`Coalescer::submit`] has no receipt for a transfer.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The transfer was refused, or its transaction failed before commit: the same
    /// error [`transfer`](super::transfer) gives for it. Nothing of it was written.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The connection was lost while its transaction was committing (or the committer
    /// stopped without an answer): it may or may not be written. Send the same transfer
    /// again under the same key: it is written once, or replayed.
    #[error("outcome unknown, retry with the same key: {0}")]
    OutcomeUnknown(String),
    /// The queue is full; nothing was queued. Try again later.
    #[error("transfer coalescer overloaded: its queue is full")]
    Overloaded,
    /// The coalescer was closed before the transfer was queued; nothing was written.
    #[error("transfer coalescer shut down")]
    ShutDown,
}

impl SubmitError {
    /// A short machine-readable name: the ledger error's [`LedgerError::code`], or
    /// `outcome_unknown`, `overloaded`, `shut_down`.
    pub fn code(&self) -> &'static str {
        match self {
            SubmitError::Ledger(e) => e.code(),
            SubmitError::OutcomeUnknown(_) => "outcome_unknown",
            SubmitError::Overloaded => "overloaded",
            SubmitError::ShutDown => "shut_down",
        }
    }
}

/// What the committers did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoalescerStats {
    /// Group transactions committed.
    pub groups: u64,
    /// Transfers answered from committed groups (created, replayed or refused).
    pub transfers: u64,
    /// The most transfers one committed group held.
    pub largest_group: u64,
    /// Groups that waited for more transfers before committing (see
    /// [`CoalescerConfig::linger`]), committed or not.
    pub lingered: u64,
}

/// Counters the committers update (they hold these, never a [`Coalescer`]).
#[derive(Default)]
struct Counters {
    groups: AtomicU64,
    transfers: AtomicU64,
    largest_group: AtomicU64,
    lingered: AtomicU64,
}

/// One submitted transfer and where its answer goes.
struct Job {
    transfer: Transfer,
    reply: Sender<Result<Receipt, SubmitError>>,
}

struct Inner {
    /// `None` once closed: no new transfer is queued.
    queue: RwLock<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<Counters>,
}

/// The handle an embedding service shares across threads: `Send + Sync`, cheap to
/// clone (all clones share one queue and its committers). [`Coalescer::shutdown`], or
/// dropping the last clone, stops intake, lets the committers answer every transfer
/// already queued, and joins them.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use ledger_core::transfers::{Coalescer, CoalescerConfig, Transfer};
/// # let pool: ledger_core::db::Pool = unimplemented!();
/// # let (from, to) = (ledger_core::AccountId::new(1)?, ledger_core::AccountId::new(2)?);
/// let coalescer = Coalescer::new(pool, CoalescerConfig::default())?;
/// let amount = ledger_core::Money::parse("10.00", ledger_core::Currency::EUR)?;
/// let key = ledger_core::IdempotencyKey::new("order-17")?;
/// let receipt = coalescer.submit(&Transfer::new(from, to, amount, key))?; // committed
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Coalescer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").field("queued", &self.queued()).field("stats", &self.stats()).finish()
    }
}

impl Coalescer {
    /// Starts `config.committers` committer threads taking connections from `pool`.
    /// A limit out of range is [`LedgerError::Invalid`], and nothing is started.
    pub fn new(pool: Pool, config: CoalescerConfig) -> Result<Coalescer, LedgerError> {
        config.check()?;
        let (tx, rx) = bounded::<Job>(config.queue_capacity);
        let counters = Arc::new(Counters::default());
        let mut threads = Vec::with_capacity(config.committers);
        let gate = Arc::new(Mutex::new(std::time::Instant::now()));
        for n in 0..config.committers {
            let committer = run::Committer {
                pool: pool.clone(),
                queue: rx.clone(),
                gate: Arc::clone(&gate),
                max: config.max_batch,
                linger: config.linger,
            };
            let counters = Arc::clone(&counters);
            let spawned = std::thread::Builder::new()
                .name(format!("ledger-coalesce-{n}"))
                .spawn(move || committer.run(&counters))
                .map_err(|e| LedgerError::Pool(format!("starting a committer thread: {e}")));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    drop(tx); // the threads started so far see the queue closed and end
                    threads.into_iter().for_each(|t| drop(t.join()));
                    return Err(e);
                }
            }
        }
        let inner = Inner { queue: RwLock::new(Some(tx)), threads: Mutex::new(threads), counters };
        Ok(Coalescer { inner: Arc::new(inner) })
    }

    /// Queues `transfer` and blocks until its group's transaction has committed (or
    /// failed), then answers as [`transfer`](super::transfer) would: the receipt (entry,
    /// `replayed`, balances right after it), or the refusal. Never waits for room in
    /// the queue: a full queue is [`SubmitError::Overloaded`] at once, a closed
    /// coalescer [`SubmitError::ShutDown`].
    pub fn submit(&self, transfer: &Transfer) -> Result<Receipt, SubmitError> {
        if transfer.from == transfer.to {
            return Err(LedgerError::SameAccount(transfer.from).into());
        }
        let (reply, answer) = bounded(1);
        let job = Job { transfer: transfer.clone(), reply };
        {
            let queue = self.inner.queue.read().unwrap_or_else(|p| p.into_inner());
            match queue.as_ref().map(|q| q.try_send(job)) {
                Some(Ok(())) => {}
                Some(Err(TrySendError::Full(_))) => return Err(SubmitError::Overloaded),
                None | Some(Err(TrySendError::Disconnected(_))) => return Err(SubmitError::ShutDown),
            }
        }
        // Every queued job is answered, also at shutdown; no answer means its committer
        // panicked, perhaps after its commit.
        answer
            .recv()
            .unwrap_or_else(|_| Err(SubmitError::OutcomeUnknown("the committer stopped without answering".into())))
    }

    /// How many transfers are queued, waiting for a committer.
    pub fn queued(&self) -> usize {
        self.inner.queue.read().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, Sender::len)
    }

    /// What the committers did so far.
    pub fn stats(&self) -> CoalescerStats {
        let c = &self.inner.counters;
        CoalescerStats {
            groups: c.groups.load(Ordering::Relaxed),
            transfers: c.transfers.load(Ordering::Relaxed),
            largest_group: c.largest_group.load(Ordering::Relaxed),
            lingered: c.lingered.load(Ordering::Relaxed),
        }
    }

    /// Stops intake at once: from now on [`Coalescer::submit`] is
    /// [`SubmitError::ShutDown`]. Transfers already queued are still committed and
    /// answered. Does not wait for the committers ([`Coalescer::shutdown`] does).
    pub fn close(&self) {
        self.inner.queue.write().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// [`Coalescer::close`], then waits until the committers have answered every queued
    /// transfer and ended. Other clones keep working as closed handles.
    pub fn shutdown(&self) {
        self.close();
        // Joined under the lock: a second caller returns only once they have ended too.
        let mut threads = self.inner.threads.lock().unwrap_or_else(|p| p.into_inner());
        for t in threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Inner {
    /// The last handle is gone: no caller can be waiting. The committers hold no
    /// handle, so joining them here cannot wait on ourselves.
    fn drop(&mut self) {
        self.queue.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        for t in self.threads.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_out_of_range_is_refused_naming_its_field() {
        let ok = CoalescerConfig::default();
        assert!(ok.check().is_ok());
        let cases = [
            (CoalescerConfig { max_batch: 0, ..ok.clone() }, "max_batch"),
            (CoalescerConfig { max_batch: MAX_BATCH_ITEMS + 1, ..ok.clone() }, "max_batch"),
            (CoalescerConfig { queue_capacity: 0, ..ok.clone() }, "queue_capacity"),
            (CoalescerConfig { queue_capacity: MAX_QUEUE_CAPACITY + 1, ..ok.clone() }, "queue_capacity"),
            (CoalescerConfig { committers: 0, ..ok.clone() }, "committers"),
            (CoalescerConfig { committers: MAX_COMMITTERS + 1, ..ok.clone() }, "committers"),
            (CoalescerConfig { linger: MAX_LINGER + Duration::from_nanos(1), ..ok.clone() }, "linger"),
        ];
        for (config, field) in cases {
            match config.check() {
                Err(LedgerError::Invalid(InvalidInput::BadField { field: f, .. })) => assert_eq!(f, field),
                other => panic!("{config:?}: {other:?}"),
            }
        }
        let edge = CoalescerConfig {
            max_batch: MAX_BATCH_ITEMS,
            queue_capacity: 1,
            committers: MAX_COMMITTERS,
            linger: MAX_LINGER,
        };
        assert!(edge.check().is_ok());
        let edge =
            CoalescerConfig { max_batch: 1, queue_capacity: MAX_QUEUE_CAPACITY, committers: 1, linger: Duration::ZERO };
        assert!(edge.check().is_ok());
    }

    #[test]
    fn a_coalescer_handle_can_be_shared_across_threads() {
        fn shared<T: Send + Sync + Clone>() {}
        shared::<Coalescer>();
    }
}
