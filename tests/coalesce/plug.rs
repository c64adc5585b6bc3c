//! Helpers of tests/coalesce/main.rs: arranging a group behind a held row lock.

use std::thread::{self, ScopedJoinHandle};
use std::time::Duration;

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::pg::PgConnection;
use ledger_core::journal::Receipt;
use ledger_core::transfers::{self, Coalescer, CoalescerConfig, SubmitError, Transfer};
use ledger_core::{AccountId, IdempotencyKey};
use ledger_testdb::{self as testing, TestDb};

use crate::common::eur;

pub fn t(from: AccountId, to: AccountId, amount: &str, key: &IdempotencyKey) -> Transfer {
    Transfer::new(from, to, eur(amount), key.clone())
}

/// Accounts `a` and `b` and a `plug` account (whose row lock holds a committer), each
/// with 100.00 EUR.
pub fn three_accounts(conn: &mut PgConnection) -> (AccountId, AccountId, AccountId) {
    let funded =
        |conn: &mut PgConnection, name| testing::funded_account(conn, name, ledger_core::Currency::EUR, "100.00");
    (funded(conn, "a"), funded(conn, "b"), funded(conn, "plug"))
}

pub fn coalescer(db: &TestDb, committers: usize, queue_capacity: usize) -> Coalescer {
    coalescer_with(db, CoalescerConfig { max_batch: 1_000, queue_capacity, committers, ..CoalescerConfig::default() })
}

pub fn coalescer_with(db: &TestDb, config: CoalescerConfig) -> Coalescer {
    Coalescer::new(db.pool().clone(), config).expect("a valid config")
}

/// A row lock held by a connection of its own until [`RowLock::release`] (or drop,
/// which closes the connection and so ends its transaction).
pub struct RowLock {
    conn: PgConnection,
    pid: i32,
}

impl RowLock {
    pub fn take(db: &TestDb, account: AccountId) -> RowLock {
        let mut conn = db.conn();
        let pid = testing::backend_pid(&mut conn);
        AnsiTransactionManager::begin_transaction(&mut conn).unwrap();
        conn.batch_execute(&format!("SELECT id FROM accounts WHERE id = {account} FOR UPDATE")).unwrap();
        RowLock { conn, pid }
    }

    /// Waits until some backend is blocked by this lock.
    pub fn wait_for_a_waiter(&self, observer: &mut PgConnection) {
        use diesel::prelude::*;
        #[derive(QueryableByName)]
        struct Waiters {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let sql = "SELECT count(*) AS n FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))";
        testing::wait_until(Duration::from_secs(30), || {
            let w: Waiters =
                diesel::sql_query(sql).bind::<diesel::sql_types::Integer, _>(self.pid).get_result(observer).unwrap();
            w.n > 0
        });
    }

    pub fn release(mut self) {
        AnsiTransactionManager::commit_transaction(&mut self.conn).unwrap();
    }
}

/// What one caller got, and whether its entry was visible from another connection the
/// moment `submit` returned.
pub struct Answer {
    pub result: Result<Receipt, SubmitError>,
    pub visible_at_return: bool,
}

/// Submits `transfer` and, as soon as it returns, looks its entry up on `observer`.
pub fn submit_and_look(c: &Coalescer, transfer: &Transfer, observer: &mut PgConnection) -> Answer {
    let result = c.submit(transfer);
    let visible_at_return = match &result {
        Ok(r) => transfers::get(observer, r.entry).is_ok(),
        Err(_) => false,
    };
    Answer { result, visible_at_return }
}

/// Runs `plug` (held up by a lock on its source account), queues `group` behind it in
/// order, checks that no caller was answered while the plug's commit was held up,
/// then releases it. Returns the plug's answer and the group's, in order.
pub fn plugged_group(db: &TestDb, c: &Coalescer, plug: &Transfer, group: &[Transfer]) -> (Answer, Vec<Answer>) {
    let mut observer = db.conn();
    thread::scope(|s| {
        // Declared inside the scope: a failing assertion drops (releases) it before the
        // scope joins the callers, who can then finish.
        let lock = RowLock::take(db, plug.from);
        let spawn = |t: &Transfer| {
            let t = t.clone();
            s.spawn(move || submit_and_look(c, &t, &mut db.conn()))
        };
        let plug_caller = spawn(plug);
        lock.wait_for_a_waiter(&mut observer);
        let mut callers: Vec<ScopedJoinHandle<'_, Answer>> = vec![];
        for (n, transfer) in group.iter().enumerate() {
            callers.push(spawn(transfer));
            testing::wait_until(Duration::from_secs(30), || c.queued() == n + 1);
        }
        // The committer is blocked in the database: nobody can have been answered.
        assert!(!plug_caller.is_finished(), "the plug's caller was answered before its commit");
        assert!(callers.iter().all(|h| !h.is_finished()), "a queued caller was answered before any commit");
        lock.release();
        let plug = plug_caller.join().expect("the plug's caller panicked");
        (plug, callers.into_iter().map(|h| h.join().expect("a caller panicked")).collect())
    })
}

pub fn code(result: &Result<Receipt, SubmitError>) -> String {
    match result {
        Ok(r) if r.replayed => "replayed".into(),
        Ok(_) => "created".into(),
        Err(e) => e.code().into(),
    }
}

/// Installs a trigger that ends the backend writing the transfer under `key`: at
/// COMMIT (`deferred`) or as the entry is inserted.
pub fn kill_backend_writing(conn: &mut PgConnection, key: &IdempotencyKey, deferred: bool) {
    let timing = if deferred { "DEFERRABLE INITIALLY DEFERRED" } else { "NOT DEFERRABLE" };
    conn.batch_execute(&format!(
        "CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER die AFTER INSERT ON journal_entries {timing}
         FOR EACH ROW WHEN (NEW.reference = 'transfer:{key}') EXECUTE FUNCTION die();"
    ))
    .unwrap();
}

/// With one committer: commits the plug (`p` to `b`, a group of 1) and then three
/// transfers from `a` to `b` that queued behind it (a group of 3, larger: no wait),
/// holding that group on `a`'s row lock for longer than `linger`, so the next smaller
/// group's wait is bounded by the linger alone. Every caller is answered on return.
pub fn a_group_of_three_held_past(
    db: &TestDb,
    c: &Coalescer,
    (a, b, p): (AccountId, AccountId, AccountId),
    linger: Duration,
) {
    let mut observer = db.conn();
    thread::scope(|s| {
        let spawn = |tr: Transfer| s.spawn(move || c.submit(&tr));
        let plug_lock = RowLock::take(db, p);
        let plug = spawn(t(p, b, "1.00", &testing::key("plug")));
        plug_lock.wait_for_a_waiter(&mut observer);
        let a_lock = RowLock::take(db, a);
        let three: Vec<_> = (0..3)
            .map(|n| {
                let h = spawn(t(a, b, "1.00", &testing::key(&format!("three-{n}"))));
                testing::wait_until(Duration::from_secs(30), || c.queued() == n + 1);
                h
            })
            .collect();
        plug_lock.release();
        a_lock.wait_for_a_waiter(&mut observer);
        thread::sleep(linger + Duration::from_millis(100));
        a_lock.release();
        assert!(plug.join().unwrap().is_ok());
        three.into_iter().for_each(|h| assert!(h.join().unwrap().is_ok()));
        let stats = c.stats();
        assert_eq!((stats.groups, stats.largest_group, stats.lingered), (2, 3, 0), "{stats:?}");
    });
}
