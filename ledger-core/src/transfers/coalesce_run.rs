//! The committer threads of a [`Coalescer`](super::Coalescer): take a group, run it as
//! one transaction, answer every caller after commit.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;

use crossbeam_channel::{Receiver, Sender};
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
    pub(super) max: usize,
}

impl Committer {
    /// Takes the first queued job as soon as there is one (never waiting for more),
    /// plus whatever else is queued then, up to `max`, and commits them as one group.
    /// Ends when the queue is closed and empty.
    pub(super) fn run(self, counters: &Counters) {
        while let Ok(first) = self.queue.recv() {
            let mut jobs = vec![first];
            while jobs.len() < self.max {
                match self.queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            let size = jobs.len() as u64;
            // A panic drops the group's reply senders: its callers hear "outcome
            // unknown", and this thread goes on with the next group.
            if let Ok(true) = std::panic::catch_unwind(AssertUnwindSafe(|| self.group(jobs))) {
                counters.groups.fetch_add(1, Ordering::Relaxed);
                counters.transfers.fetch_add(size, Ordering::Relaxed);
                counters.largest_group.fetch_max(size, Ordering::Relaxed);
            }
        }
    }

    /// Runs the group as one `create_batch` transaction and answers each caller after
    /// its commit; true if it committed as a group. If the group cannot run as a whole
    /// (nothing was written), each transfer runs alone, so each caller gets the answer
    /// `transfer` gives for it.
    fn group(&self, jobs: Vec<Job>) -> bool {
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
                    return false;
                }
            };
            match tracked(&mut conn, true, |tx| create_planned(tx, &items)) {
                Ok(results) => {
                    answer(&mut conn, &items, replies, results);
                    return true;
                }
                Err(Failure::Unknown(why)) => {
                    replies.iter().for_each(|r| drop(r.send(Err(SubmitError::OutcomeUnknown(why.clone())))));
                    return false;
                }
                Err(Failure::Definite(e)) if lost(&e) && attempt < GROUP_ATTEMPTS => continue,
                Err(Failure::Definite(_)) => {
                    drop(conn);
                    self.one_by_one(&items, replies);
                    return false;
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
    fn only_a_connection_lost_after_the_work_was_done_leaves_the_outcome_unknown() {
        assert!(matches!(classify::<()>(Err(closed()), true), Err(Failure::Unknown(_))));
        assert!(matches!(classify::<()>(Err(closed()), false), Err(Failure::Definite(_))));
        let refused = LedgerError::LinkedChainOpen;
        assert!(matches!(classify::<()>(Err(refused), true), Err(Failure::Definite(_))));
        assert!(matches!(classify(Ok(7), true), Ok(7)));
    }
}
