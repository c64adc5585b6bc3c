//! The committer threads of a [`Coalescer`](super::Coalescer): take a group, run it as
//! one transaction, answer every caller after commit.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use diesel::pg::PgConnection;

use crate::batch::Item;
use crate::db::Pool;
use crate::error::{LedgerError, RetryClass, Transient};
use crate::journal::{Balance, Receipt};
use crate::tx::{self, Tx, TxOptions};

use super::super::batch::create_planned;
use super::super::{transfer_tx, Transfer, TransferResult};
use super::{Counters, Job, SubmitError};

/// Attempts of one group whose connection was lost before its commit (nothing was
/// written, so a fresh connection may run it again).
const GROUP_ATTEMPTS: u32 = 3;

type Reply = Sender<Result<Receipt, SubmitError>>;

/// One committer thread's work: its share of the queue and the pool.
pub(super) struct Committer {
    pub(super) pool: Pool,
    pub(super) queue: Receiver<Job>,
    /// Held by the one committer gathering a group (the others are committing theirs,
    /// or waiting their turn), so a committer waiting for company is not robbed of it
    /// by an idle one, and groups form while the previous ones commit. It holds when the
    /// queue last stood empty for longer than the linger (the end of a gatherer's wait
    /// for a first job that long), whichever committer waited then.
    pub(super) gate: Arc<Mutex<Instant>>,
    pub(super) max: usize,
    /// The longest a group waits for company ([`CoalescerConfig::linger`](super::CoalescerConfig::linger)).
    pub(super) linger: Duration,
}

/// What a committer remembers of its previous group, to decide whether to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Previous {
    /// Its transfers (0 before the first group: the first never waits).
    size: usize,
    /// Its run, from asking for a connection to answering its callers (not counting
    /// its own wait, so waits cannot grow on each other).
    took: Duration,
    /// When its callers were answered.
    answered: Instant,
}

impl Default for Previous {
    /// No previous group: the next one does not wait.
    fn default() -> Self {
        Previous { size: 0, took: Duration::ZERO, answered: Instant::now() }
    }
}

impl Previous {
    /// How long the next group, holding `size` transfers so far, may still wait for
    /// more: only while it is smaller than the previous group (whose callers, just
    /// answered, are likely sending again), and at most the shorter of `linger` and the
    /// previous group's run, so waiting never costs more than the commit it saves.
    /// A lone sequential caller's groups are all of 1: after the first, none waits.
    fn wait_for(&self, size: usize, linger: Duration) -> Option<Duration> {
        (size < self.size).then(|| linger.min(self.took)).filter(|d| !d.is_zero())
    }
}

impl Committer {
    /// Gathers a group (under the gate) and commits it, until the queue is closed and
    /// empty. A group is the first queued job, taken as soon as there is one, plus
    /// whatever else is queued then, up to `max`; if that is fewer than this
    /// committer's previous group held, it waits a little for the rest
    /// ([`Previous::wait_for`]). If the queue stood empty for longer than `linger`
    /// since this committer's previous group was answered (whichever committer waited
    /// then), that group is forgotten: its callers did not come straight back.
    pub(super) fn run(self, counters: &Counters) {
        let mut previous = Previous::default();
        loop {
            let jobs = {
                let mut last_idle = self.gate.lock().unwrap_or_else(|p| p.into_inner());
                let waiting = Instant::now();
                let Ok(first) = self.queue.recv() else { return };
                if waiting.elapsed() > self.linger {
                    *last_idle = Instant::now();
                }
                if *last_idle >= previous.answered {
                    previous = Previous::default();
                }
                let mut jobs = vec![first];
                take_queued(&self.queue, &mut jobs, self.max);
                if let Some(wait) = previous.wait_for(jobs.len(), self.linger) {
                    counters.lingered.fetch_add(1, Ordering::Relaxed);
                    gather(&self.queue, &mut jobs, previous.size.min(self.max), Instant::now() + wait);
                }
                jobs
            };
            let size = jobs.len();
            let started = Instant::now();
            // A panic drops the group's reply senders: its callers hear "outcome
            // unknown", and this thread goes on with the next group.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| self.group(jobs, counters)));
            previous = Previous { size, took: started.elapsed(), answered: Instant::now() };
        }
    }

    /// Runs the group as one `create_batch` transaction and answers each caller after
    /// its commit. If the group cannot run as a whole
    /// (nothing was written), each transfer runs alone, so each caller gets the answer
    /// `transfer` gives for it. A committed group is counted before its callers hear
    /// of it.
    fn group(&self, jobs: Vec<Job>, counters: &Counters) {
        let size = jobs.len() as u64;
        let (items, replies): (Vec<Item<Transfer>>, Vec<Reply>) =
            jobs.into_iter().map(|j| (Item::single(j.transfer), j.reply)).unzip();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut conn = match self.pool.get() {
                Ok(conn) => conn,
                Err(e) => {
                    let text = e.to_string();
                    replies.iter().for_each(|r| drop(r.send(Err(LedgerError::Pool(text.clone()).into()))));
                    return;
                }
            };
            match tracked(&mut conn, true, |tx| create_planned(tx, &items)) {
                Ok(results) => {
                    counters.groups.fetch_add(1, Ordering::Relaxed);
                    counters.transfers.fetch_add(size, Ordering::Relaxed);
                    counters.largest_group.fetch_max(size, Ordering::Relaxed);
                    answer(&mut conn, &items, replies, results);
                    return;
                }
                Err(Failure::Unknown(why)) => {
                    replies.iter().for_each(|r| drop(r.send(Err(SubmitError::OutcomeUnknown(why.clone())))));
                    return;
                }
                Err(Failure::Definite(e)) if lost(&e) && attempt < GROUP_ATTEMPTS => continue,
                Err(Failure::Definite(_)) => {
                    drop(conn);
                    self.one_by_one(&items, replies);
                    return;
                }
            }
        }
    }

    /// Each transfer in a transaction of its own, as [`transfer`](super::super::transfer).
    fn one_by_one(&self, items: &[Item<Transfer>], replies: Vec<Reply>) {
        for (item, reply) in items.iter().zip(replies) {
            let answer = match self.pool.get() {
                Err(e) => Err(LedgerError::Pool(e.to_string()).into()),
                Ok(mut conn) => match tracked(&mut conn, false, |tx| transfer_tx(tx, &item.request)) {
                    Ok(receipt) => Ok(receipt),
                    Err(Failure::Unknown(why)) => Err(SubmitError::OutcomeUnknown(why)),
                    Err(Failure::Definite(e)) => Err(e.into()),
                },
            };
            let _ = reply.send(answer);
        }
    }
}

/// Adds whatever is queued now, without waiting, up to `max` in all.
fn take_queued<T>(queue: &Receiver<T>, jobs: &mut Vec<T>, max: usize) {
    while jobs.len() < max {
        match queue.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
}

/// Waits until `jobs` holds `target`, or `deadline`, or the queue is closed, whichever
/// is first (a closed queue still hands out what it holds); never beyond `target`.
fn gather<T>(queue: &Receiver<T>, jobs: &mut Vec<T>, target: usize, deadline: Instant) {
    while jobs.len() < target {
        match queue.recv_deadline(deadline) {
            Ok(job) => {
                jobs.push(job);
                take_queued(queue, jobs, target);
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
}

fn lost(e: &LedgerError) -> bool {
    e.transient() == Some(Transient::ConnectionLost)
}

/// How a transaction that did not commit failed.
enum Failure {
    /// Its work was done and the connection was lost while it committed: it may or may
    /// not be written.
    Unknown(String),
    /// It did not commit: rolled back, nothing written.
    Definite(LedgerError),
}

/// Runs `f` in a transaction of its own (retried on transient errors, as every
/// transaction runner here; with the batch-plan settings if `batch_plans`), telling a
/// lost COMMIT from a failure before it.
fn tracked<T>(
    conn: &mut PgConnection,
    batch_plans: bool,
    mut f: impl FnMut(&mut Tx<'_>) -> Result<T, LedgerError>,
) -> Result<T, Failure> {
    let mut body_done = false;
    let mut body = |tx: &mut Tx<'_>| {
        body_done = false;
        let out = f(tx);
        body_done = out.is_ok();
        out
    };
    let opts = TxOptions::default();
    let result = if batch_plans {
        tx::transaction_with_batch_plans(conn, &opts, &mut body)
    } else {
        tx::transaction(conn, &opts, &mut body)
    };
    classify(result, body_done)
}

/// A failure after the body succeeded can only be the COMMIT's: if the connection was
/// lost then, the server may have committed before it went.
fn classify<T>(result: Result<T, LedgerError>, body_done: bool) -> Result<T, Failure> {
    match result {
        Ok(v) => Ok(v),
        Err(e) if body_done && lost(&e) => Err(Failure::Unknown(e.to_string())),
        Err(e) => Err(Failure::Definite(e)),
    }
}

/// Answers every caller of a committed group, as `transfer` would have.
fn answer(conn: &mut PgConnection, items: &[Item<Transfer>], replies: Vec<Reply>, results: Vec<TransferResult>) {
    assert_eq!(results.len(), items.len(), "one result per item");
    let mut replays = vec![];
    for ((item, reply), result) in items.iter().zip(replies).zip(results) {
        let t = &item.request;
        let answer = match result {
            TransferResult::Created { entry, from_balance_minor, to_balance_minor } => {
                let mut balances = vec![
                    Balance { account: t.from, balance_minor: from_balance_minor },
                    Balance { account: t.to, balance_minor: to_balance_minor },
                ];
                balances.sort_by_key(|b| b.account);
                Ok(Receipt::created(entry, balances))
            }
            TransferResult::Refused(e) => Err(e.into()),
            // Read back after the created ones are answered: they need no round trip.
            TransferResult::Replayed { entry } => {
                replays.push((entry, reply));
                continue;
            }
        };
        let _ = reply.send(answer);
    }
    // The group committed and a replay's transfer stood before it: a failed read of its
    // receipt is no failure of the transfer, so the caller hears "unknown, ask again under
    // the same key" (which replays it), never a definite error.
    for (entry, reply) in replays {
        let answer = Receipt::replayed(conn, entry).map_err(|e| {
            SubmitError::OutcomeUnknown(format!(
                "the transfer stands (a replay of entry {entry}), but reading its receipt failed: {e}; \
                 submit it again under the same key to read it"
            ))
        });
        let _ = reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind, Error as DieselError};

    fn closed() -> LedgerError {
        LedgerError::Database(DieselError::DatabaseError(
            DatabaseErrorKind::ClosedConnection,
            Box::new("gone".to_string()),
        ))
    }

    #[test]
    fn a_group_waits_only_while_smaller_than_the_previous_one_and_never_longer_than_it_took() {
        let ms = Duration::from_millis;
        let linger = ms(2);
        // The first group, and a lone caller's groups of 1, never wait.
        assert_eq!(Previous::default().wait_for(1, linger), None);
        assert_eq!(Previous { size: 1, took: ms(5), answered: Instant::now() }.wait_for(1, linger), None);
        // As large as the previous group, or larger: no wait.
        assert_eq!(Previous { size: 3, took: ms(5), answered: Instant::now() }.wait_for(3, linger), None);
        assert_eq!(Previous { size: 3, took: ms(5), answered: Instant::now() }.wait_for(4, linger), None);
        // Smaller: the shorter of linger and the previous group's time.
        assert_eq!(Previous { size: 3, took: ms(5), answered: Instant::now() }.wait_for(1, linger), Some(ms(2)));
        assert_eq!(Previous { size: 3, took: ms(1), answered: Instant::now() }.wait_for(2, linger), Some(ms(1)));
        // Lingering off.
        assert_eq!(Previous { size: 3, took: ms(5), answered: Instant::now() }.wait_for(1, Duration::ZERO), None);
    }

    #[test]
    fn gathering_ends_once_the_group_is_as_large_as_wanted_or_the_queue_closes() {
        let far = Instant::now() + Duration::from_secs(60);
        let (tx, rx) = crossbeam_channel::unbounded();
        // Three more arrive from another thread while it waits: it returns with four,
        // long before its deadline, and leaves the fifth queued.
        let mut jobs = vec![0];
        let started = Instant::now();
        let sender = {
            let tx = tx.clone();
            std::thread::spawn(move || (1..=4).for_each(|n| tx.send(n).unwrap()))
        };
        gather(&rx, &mut jobs, 4, far);
        sender.join().unwrap();
        assert_eq!(jobs, [0, 1, 2, 3]);
        assert!(started.elapsed() < Duration::from_secs(30), "it waited out its deadline");
        assert_eq!(rx.len(), 1);
        // Closed: what is queued is handed out, then it returns at once.
        drop(tx);
        let mut jobs = vec![];
        gather(&rx, &mut jobs, 3, far);
        assert_eq!(jobs, [4]);
        assert!(started.elapsed() < Duration::from_secs(30), "a closed queue kept it waiting");
        // Past its deadline with nothing queued: returns as it is.
        let (_tx, rx) = crossbeam_channel::unbounded::<u8>();
        let mut jobs = vec![];
        gather(&rx, &mut jobs, 2, Instant::now());
        assert!(jobs.is_empty());
    }

    #[test]
    fn only_a_connection_lost_after_the_work_was_done_leaves_the_outcome_unknown() {
        assert!(matches!(classify::<()>(Err(closed()), true), Err(Failure::Unknown(_))));
        assert!(matches!(classify::<()>(Err(closed()), false), Err(Failure::Definite(_))));
        let refused = LedgerError::LinkedChainOpen;
        assert!(matches!(classify::<()>(Err(refused), true), Err(Failure::Definite(_))));
        assert!(matches!(classify(Ok(7), true), Ok(7)));
    }
}
