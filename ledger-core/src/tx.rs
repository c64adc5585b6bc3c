//! Transactions, savepoints, retries, and the handle that makes row locks impossible
//! to take outside a transaction.
//!
//! A [`Tx`] exists only inside [`transaction`] (or a savepoint of it): it has no public
//! constructor. Every function that takes a row lock asks for `&mut Tx`, so calling it
//! on a bare connection in autocommit mode, where the lock would be released as soon as
//! the statement ends, does not compile.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::pg::PgConnection;
use diesel::Connection;

use crate::db::Pool;
use crate::error::{LedgerError, RetryClass, Transient};
use crate::ids::AccountId;
use crate::retry::{Backoff, Jitter};

#[path = "tx_plans.rs"]
mod plans;

pub use plans::{planner_settings, transaction_with_batch_plans, with_batch_plans, PlannerSettings};

/// How the outermost transaction retries transient failures.
#[derive(Clone, Debug)]
pub struct TxOptions {
    /// Total attempts, including the first. 1 disables retries.
    pub max_attempts: u32,
    /// The wait before each retry (full jitter: spreads out the workers that collided
    /// so they do not collide again).
    pub backoff: Backoff,
    /// `SET LOCAL lock_timeout` for this transaction; `None` keeps the session's value
    /// (pools made by `db::pool` set one for every connection).
    pub lock_timeout_ms: Option<u64>,
}

impl Default for TxOptions {
    fn default() -> Self {
        TxOptions { max_attempts: 8, backoff: Backoff::new(2, 200, Jitter::Full), lock_timeout_ms: None }
    }
}

impl TxOptions {
    /// One attempt only: transient errors reach the caller. Tests use it to show that
    /// something never happens (rather than happens and is retried away).
    pub fn no_retry() -> TxOptions {
        TxOptions { max_attempts: 1, ..TxOptions::default() }
    }
}

/// A handle to an open transaction (or savepoint). Only this module can make one.
pub struct Tx<'c> {
    conn: &'c mut PgConnection,
}

impl<'c> Tx<'c> {
    /// The connection, for queries inside this transaction.
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn
    }

    /// Nesting depth: 1 for a transaction, 2+ inside savepoints.
    pub fn depth(&mut self) -> u32 {
        depth(self.conn)
    }

    /// Runs `f` in a savepoint: if it returns `Err`, only what `f` did is rolled back
    /// and the surrounding transaction carries on.
    pub fn savepoint<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E>,
        E: From<diesel::result::Error>,
    {
        self.conn.transaction(|conn| f(&mut Tx { conn }))
    }

    /// Runs `f` once per item, each in its own savepoint. Good items stay applied, a
    /// failing item is rolled back alone and reported in its slot. Returns `Err` only
    /// when the transaction itself is lost (for example the connection dropped), in
    /// which case nothing of it will commit.
    pub fn batch<I, T, F>(&mut self, items: I, mut f: F) -> Result<Vec<Result<T, LedgerError>>, LedgerError>
    where
        I: IntoIterator,
        F: FnMut(&mut Tx<'_>, I::Item) -> Result<T, LedgerError>,
    {
        let mut outcomes = Vec::new();
        for item in items {
            let outcome = self.savepoint(|tx| f(tx, item));
            if let Err(e) = &outcome {
                if e.transient() == Some(Transient::ConnectionLost) {
                    return Err(outcome.err().expect("checked above"));
                }
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }
}

/// The connection's current transaction depth (0: autocommit).
pub fn depth(conn: &mut PgConnection) -> u32 {
    match AnsiTransactionManager::transaction_manager_status_mut(conn).transaction_depth() {
        Ok(Some(d)) => d.get(),
        Ok(None) => 0,
        // A broken transaction manager is "inside something we cannot trust".
        Err(_) => u32::MAX,
    }
}

/// Runs `f` in a transaction and commits if it returns `Ok`.
///
/// At the outermost level, transient failures (deadlock, serialization failure, lock
/// timeout, too many connections) roll back and run `f` again, up to
/// `opts.max_attempts` times with jittered exponential backoff, so `f` must be safe to
/// re-run (all its effects are in the rolled-back transaction). A lost connection is
/// returned at once (only a new connection can retry: [`transaction_pooled`]), and so
/// is the last attempt's error, as it is. Called inside a transaction, it is a
/// savepoint and does not retry: the outer transaction still holds its locks, so only
/// its owner can decide.
pub fn transaction<T, E, F>(conn: &mut PgConnection, opts: &TxOptions, mut f: F) -> Result<T, E>
where
    F: FnMut(&mut Tx<'_>) -> Result<T, E>,
    E: From<diesel::result::Error> + RetryClass,
{
    assert!(opts.max_attempts >= 1, "max_attempts counts the first attempt");
    if depth(conn) > 0 {
        return conn.transaction(|conn| f(&mut Tx { conn }));
    }
    retrying(opts, || {
        conn.transaction(|conn| {
            if let Some(ms) = opts.lock_timeout_ms {
                diesel::RunQueryDsl::execute(diesel::sql_query(format!("SET LOCAL lock_timeout = {ms}")), conn)?;
            }
            f(&mut Tx { conn })
        })
    })
}

/// Runs `attempt` up to `opts.max_attempts` times while it fails transiently (not for a
/// lost connection), with the options' backoff between attempts.
fn retrying<T, E: RetryClass>(opts: &TxOptions, mut run: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = run();
        match result {
            Err(e) if attempt < opts.max_attempts => match e.transient() {
                // A lost connection cannot be retried on the same connection.
                Some(Transient::ConnectionLost) | None => return Err(e),
                Some(_) => std::thread::sleep(opts.backoff.delay(attempt)),
            },
            other => return other,
        }
    }
}

/// Like [`transaction`], but takes a fresh pooled connection for every attempt, so a
/// dropped connection (or a pool timeout) is retried too. When every attempt failed
/// transiently the error is [`LedgerError::RetriesExhausted`] (unless `max_attempts`
/// is 1: then it is the one attempt's error).
pub fn transaction_pooled<T, F>(pool: &Pool, opts: &TxOptions, f: F) -> Result<T, LedgerError>
where
    F: FnMut(&mut Tx<'_>) -> Result<T, LedgerError>,
{
    transaction_pooled_until(pool, opts, &Unbounded, f)
}

/// Lets the caller of [`transaction_pooled_until`] cut its waits short, for example
/// because the process is shutting down. Both are asked often (every 10 to 100 ms while
/// waiting), so they must be cheap.
pub trait Patience {
    /// Asked before each retry and during the backoff before it: `false` ends the
    /// retries, and the last attempt's error is returned as it is.
    fn may_retry(&self) -> bool {
        true
    }

    /// Asked while waiting for a pooled connection, with the time waited so far: `true`
    /// ends the wait (and the attempt) with a `LedgerError::Pool` error.
    fn give_up_waiting(&self, _waited: Duration) -> bool {
        false
    }
}

/// Waits as long as the options and the pool allow.
pub struct Unbounded;

impl Patience for Unbounded {}

/// [`transaction_pooled`] whose waits (for a connection, in a backoff) end as soon as
/// `patience` says so. What it cannot cut short is a statement already sent to the
/// server: that takes as long as the server (or the network) takes.
pub fn transaction_pooled_until<T, F>(
    pool: &Pool,
    opts: &TxOptions,
    patience: &dyn Patience,
    mut f: F,
) -> Result<T, LedgerError>
where
    F: FnMut(&mut Tx<'_>) -> Result<T, LedgerError>,
{
    assert!(opts.max_attempts >= 1, "max_attempts counts the first attempt");
    let once = TxOptions { max_attempts: 1, ..opts.clone() };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = crate::db::checkout(pool, &|waited| patience.give_up_waiting(waited))
            .and_then(|mut conn| transaction(&mut conn, &once, &mut f));
        match result {
            Err(e) if e.is_transient() && attempt < opts.max_attempts => {
                if !patience.may_retry() || !sleep_unless(opts.backoff.delay(attempt), || !patience.may_retry()) {
                    return Err(e);
                }
            }
            Err(e) if e.is_transient() && opts.max_attempts > 1 => {
                return Err(LedgerError::RetriesExhausted { attempts: attempt, last: Box::new(e) })
            }
            other => return other,
        }
    }
}

/// Sleeps `total` in short steps; returns `false` (early) as soon as `stop()` is true.
fn sleep_unless(total: Duration, stop: impl Fn() -> bool) -> bool {
    let until = Instant::now() + total;
    loop {
        if stop() {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(10)));
    }
}

/// A set of accounts to lock together. It sorts and deduplicates itself, so every caller
/// locks in the same (ascending id) order and two transfers can never deadlock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockSet(BTreeSet<AccountId>);

impl LockSet {
    /// An empty set.
    pub fn new() -> LockSet {
        LockSet(BTreeSet::new())
    }

    /// The set with `id` added (a no-op if it is already in).
    pub fn with(mut self, id: AccountId) -> LockSet {
        self.0.insert(id);
        self
    }

    /// Adds `id` (a no-op if it is already in).
    pub fn insert(&mut self, id: AccountId) {
        self.0.insert(id);
    }

    /// How many distinct accounts.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set has no account.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Ascending, without duplicates.
    pub fn ids(&self) -> impl Iterator<Item = AccountId> + '_ {
        self.0.iter().copied()
    }
}

impl FromIterator<AccountId> for LockSet {
    fn from_iter<I: IntoIterator<Item = AccountId>>(iter: I) -> Self {
        LockSet(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_sets_sort_and_deduplicate() {
        let id = |n| AccountId::new(n).unwrap();
        let set: LockSet = [id(9), id(2), id(9), id(5)].into_iter().collect();
        assert_eq!(set.ids().map(AccountId::get).collect::<Vec<_>>(), vec![2, 5, 9]);
        assert_eq!(LockSet::new().with(id(3)).with(id(1)).ids().map(AccountId::get).collect::<Vec<_>>(), vec![1, 3]);
    }
}
