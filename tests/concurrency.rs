//! Concurrency claims, on real connections with real commits, each with a negative
//! control that shows the test would catch the bug it guards against.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use common::{assert_audit_clean, balance, eur, withdrawal};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use ledger_core::accounts;
use ledger_core::error::{RetryClass, Transient};
use ledger_core::transfers::{self, Transfer};
use ledger_core::{AccountId, Currency, LedgerError, TxOptions};
use ledger_testdb::{self as testing, TestDb};

const RACERS: usize = 200;

#[derive(Debug)]
struct RaceOutcome {
    succeeded: usize,
    insufficient: usize,
    other_errors: Vec<String>,
    balance_minor: i64,
    audit_clean: bool,
}

/// The talk's race: RACERS workers withdraw 50.00 at once from an account holding
/// 100.00, each on its own connection, released together by a barrier.
fn race<F>(db: &TestDb, withdraw: F) -> RaceOutcome
where
    F: Fn(&mut PgConnection, AccountId) -> Result<(), LedgerError> + Sync,
{
    // Two races at once would need 400 connections; run them one after the other.
    static ONE_RACE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_RACE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut setup = db.conn();
    let account = testing::funded_account(&mut setup, "darren", Currency::EUR, "100.00");
    // Connect first, so connection set-up is not part of the race.
    let conns: Vec<PgConnection> = (0..RACERS).map(|_| db.conn()).collect();
    let start = Barrier::new(RACERS);
    let results: Vec<Result<(), LedgerError>> = thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                let (start, withdraw) = (&start, &withdraw);
                s.spawn(move || {
                    start.wait();
                    withdraw(&mut conn, account)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("racer panicked")).collect()
    });
    let mut outcome = RaceOutcome {
        succeeded: 0,
        insufficient: 0,
        other_errors: vec![],
        balance_minor: balance(&mut setup, account),
        audit_clean: ledger_core::audit::run(&mut setup).unwrap().is_clean(),
    };
    for r in results {
        match r {
            Ok(()) => outcome.succeeded += 1,
            Err(LedgerError::InsufficientFunds { .. }) => outcome.insufficient += 1,
            Err(e) => outcome.other_errors.push(e.to_string()),
        }
    }
    outcome
}

#[testing::test]
fn two_hundred_concurrent_withdrawals_never_overdraw_or_lose_an_update() {
    let db = testing::committed();
    let outcome = race(&db, |conn, account| {
        ledger_core::withdrawals::withdraw(conn, &withdrawal(account, "50.00", "race")).map(|_| ())
    });
    assert!(outcome.other_errors.is_empty(), "{:?}", outcome.other_errors);
    assert_eq!(outcome.succeeded, 2, "{outcome:?}");
    assert_eq!(outcome.insufficient, RACERS - 2, "{outcome:?}");
    assert_eq!(outcome.balance_minor, 0);
    assert!(outcome.audit_clean);
    let mut conn = db.conn();
    let debited: i64 = ledger_core::schema::withdrawals::table
        .filter(ledger_core::schema::withdrawals::status.eq("paying_out"))
        .count()
        .get_result(&mut conn)
        .unwrap();
    let payouts: i64 = ledger_core::schema::payouts::table.count().get_result(&mut conn).unwrap();
    assert_eq!((debited, payouts), (2, 2), "one payout per debited withdrawal, none for refusals");
}

#[testing::test]
fn the_same_race_without_a_row_lock_loses_updates_and_the_test_sees_it() {
    let db = testing::committed();
    let all_checked = Barrier::new(RACERS);
    let outcome = race(&db, |conn, account| testing::unlocked_withdraw(conn, account, eur("50.00"), &all_checked));
    assert!(outcome.other_errors.is_empty(), "{:?}", outcome.other_errors);
    // Far more than two withdrawals of 50.00 "succeeded" out of 100.00 ...
    assert!(outcome.succeeded > 2, "{outcome:?}");
    // ... yet the stored balance says only one did, and the audit catches the mismatch.
    assert_eq!(outcome.balance_minor, eur("50.00").minor());
    assert!(!outcome.audit_clean, "{outcome:?}");
}

#[testing::test]
fn two_thousand_crossing_transfers_never_deadlock_because_locks_are_ordered() {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "A", Currency::EUR, "1000.00");
    let b = testing::funded_account(&mut setup, "B", Currency::EUR, "1000.00");
    const THREADS: usize = 8;
    const PER_THREAD: usize = 250;
    let start = Barrier::new(THREADS);
    // No retries: a deadlock would reach the caller, so "no error" means none happened.
    let no_retry = TxOptions::no_retry();
    let (errors, net_a_to_b): (Vec<String>, i64) = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (start, no_retry, db) = (&start, &no_retry, &db);
                s.spawn(move || {
                    let mut conn = db.conn();
                    start.wait();
                    let mut errors = vec![];
                    let mut net = 0_i64;
                    for i in 0..PER_THREAD {
                        let cents = 1 + ((t * PER_THREAD + i) % 7) as i64;
                        let (from, to) = if (t + i) % 2 == 0 { (a, b) } else { (b, a) };
                        let req = Transfer {
                            from,
                            to,
                            amount: ledger_core::Money::from_minor(cents, Currency::EUR).unwrap(),
                            key: testing::key("xfer"),
                            metadata: None,
                        };
                        match transfers::transfer_with(&mut conn, no_retry, &req) {
                            Ok(_) => net += if from == a { cents } else { -cents },
                            Err(e) => errors.push(e.to_string()),
                        }
                    }
                    (errors, net)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).fold((vec![], 0), |(mut errs, net), (e, n)| {
            errs.extend(e);
            (errs, net + n)
        })
    });
    assert!(errors.is_empty(), "{} errors, first: {:?}", errors.len(), errors.first());
    assert_eq!(balance(&mut setup, a), 100_000 - net_a_to_b);
    assert_eq!(balance(&mut setup, b), 100_000 + net_a_to_b);
    let entries: i64 = ledger_core::schema::journal_entries::table
        .filter(ledger_core::schema::journal_entries::kind.eq("transfer"))
        .count()
        .get_result(&mut setup)
        .unwrap();
    assert_eq!(entries, (THREADS * PER_THREAD) as i64);
    assert_audit_clean(&mut setup);
}

/// Two transactions each lock their "from" row, then their "to" row: A->B and B->A.
/// Returns each side's result. The interleaving is forced with barriers and
/// `wait_until_blocked`, not sleeps.
fn crossing_lockers<F>(
    db: &TestDb,
    opts: &TxOptions,
    lock_pair: F,
) -> (Result<(), LedgerError>, Result<(), LedgerError>)
where
    F: Fn(&mut ledger_core::Tx<'_>, AccountId, AccountId, &dyn Fn()) -> Result<(), LedgerError> + Sync,
{
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "A", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut setup, "B", Currency::EUR, "10.00");
    let (mut c1, mut c2, mut observer) = (db.conn(), db.conn(), db.conn());
    let (pid1, pid2) = (testing::backend_pid(&mut c1), testing::backend_pid(&mut c2));
    let first_locks_held = Barrier::new(2);
    let one_is_blocked = Barrier::new(2);
    let first_run = AtomicU32::new(0);
    thread::scope(|s| {
        let t1 = s.spawn(|| {
            ledger_core::transaction(&mut c1, opts, |tx| {
                let first = first_run.fetch_add(1, Ordering::SeqCst) < 2;
                lock_pair(tx, a, b, &|| {
                    if first {
                        first_locks_held.wait();
                    }
                })
            })
        });
        let t2 = s.spawn(|| {
            ledger_core::transaction(&mut c2, opts, |tx| {
                let first = first_run.fetch_add(1, Ordering::SeqCst) < 2;
                lock_pair(tx, b, a, &|| {
                    if first {
                        first_locks_held.wait();
                        one_is_blocked.wait();
                    }
                })
            })
        });
        // Whatever the lock order, once both hold their first lock, transaction 1 asks
        // for its second row and must wait for transaction 2.
        testing::wait_until_blocked(&mut observer, pid1, pid2, Duration::from_secs(10))
            .or_else(|_| testing::wait_until_blocked(&mut observer, pid2, pid1, Duration::from_secs(10)))
            .expect("one transaction waits for the other");
        one_is_blocked.wait();
        (t1.join().unwrap(), t2.join().unwrap())
    })
}

fn lock_in_request_order(
    tx: &mut ledger_core::Tx<'_>,
    from: AccountId,
    to: AccountId,
    between: &dyn Fn(),
) -> Result<(), LedgerError> {
    accounts::lock(tx, from)?;
    between();
    accounts::lock(tx, to)?;
    Ok(())
}

#[testing::test]
fn locking_in_request_order_deadlocks_and_postgres_detects_it() {
    let db = testing::committed();
    let (r1, r2) = crossing_lockers(&db, &TxOptions::no_retry(), lock_in_request_order);
    let deadlocks =
        [&r1, &r2].iter().filter(|r| matches!(r, Err(e) if e.transient() == Some(Transient::Deadlock))).count();
    assert_eq!(deadlocks, 1, "exactly one victim: {r1:?} / {r2:?}");
    assert!(r1.is_ok() || r2.is_ok(), "the survivor commits");
}

#[testing::test]
fn a_deadlock_is_retried_at_the_outermost_transaction_and_never_reaches_the_caller() {
    let db = testing::committed();
    let (r1, r2) = crossing_lockers(&db, &TxOptions::default(), lock_in_request_order);
    assert!(r1.is_ok() && r2.is_ok(), "{r1:?} / {r2:?}");
}

/// Runs `body` while `holder` keeps `account`'s row locked in an open transaction on its
/// own thread. `body` lets go of the lock by calling its argument; it is let go at the
/// latest when `body` returns or panics, so the holder's thread always ends.
fn with_account_locked<R: Send>(
    holder: &mut PgConnection,
    account: AccountId,
    body: impl FnOnce(&(dyn Fn() + Sync)) -> R + Send,
) -> R {
    struct LetGo<'a>(&'a std::sync::Once, &'a Barrier);
    impl LetGo<'_> {
        fn now(&self) {
            self.0.call_once(|| {
                self.1.wait();
            });
        }
    }
    impl Drop for LetGo<'_> {
        fn drop(&mut self) {
            self.now();
        }
    }
    let (locked, release, once) = (Barrier::new(2), Barrier::new(2), std::sync::Once::new());
    thread::scope(|s| {
        s.spawn(|| {
            ledger_core::transaction(holder, &TxOptions::no_retry(), |tx| {
                accounts::lock(tx, account)?;
                locked.wait();
                release.wait();
                Ok::<_, LedgerError>(())
            })
            .unwrap();
        });
        locked.wait();
        let let_go = LetGo(&once, &release);
        body(&|| let_go.now())
    })
}

#[testing::test]
fn a_lock_timeout_is_retried_until_the_holder_lets_go() {
    let db = testing::committed();
    let mut setup = db.conn();
    let account = testing::funded_account(&mut setup, "busy", Currency::EUR, "10.00");
    let before = balance(&mut setup, account);
    let (mut holder, mut depositor) = (db.conn(), db.conn());
    let attempts = AtomicU32::new(0);
    let opts = TxOptions {
        lock_timeout_ms: Some(20),
        max_attempts: 1_000,
        backoff: ledger_core::retry::Backoff { cap_ms: 5, ..TxOptions::default().backoff },
    };
    let req = ledger_core::deposits::Deposit { account, amount: eur("1.00"), key: testing::key("dep") };
    let result = with_account_locked(&mut holder, account, |let_go| {
        thread::scope(|s| {
            let depositing = s.spawn(|| {
                ledger_core::transaction(&mut depositor, &opts, |tx| {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    ledger_core::deposits::deposit_tx(tx, &req)
                })
            });
            // Let a few attempts time out against the held lock, then release it.
            while attempts.load(Ordering::SeqCst) < 3 {
                thread::yield_now();
            }
            let_go();
            depositing.join().unwrap()
        })
    });
    assert!(result.is_ok(), "{result:?}");
    assert!(attempts.load(Ordering::SeqCst) >= 3);
    assert_eq!(balance(&mut setup, account), before + 100, "applied exactly once across the retries");
    assert_audit_clean(&mut setup);
}

#[testing::test]
fn without_retries_a_lock_timeout_reaches_the_caller_and_changes_nothing() {
    let db = testing::committed();
    let mut setup = db.conn();
    let account = testing::funded_account(&mut setup, "busy", Currency::EUR, "10.00");
    let snapshot = testing::snapshot(&mut setup);
    let (mut holder, mut depositor) = (db.conn(), db.conn());
    let opts = TxOptions { lock_timeout_ms: Some(20), ..TxOptions::no_retry() };
    let req = ledger_core::deposits::Deposit { account, amount: eur("1.00"), key: testing::key("dep") };
    let result = with_account_locked(&mut holder, account, |_| {
        ledger_core::transaction(&mut depositor, &opts, |tx| ledger_core::deposits::deposit_tx(tx, &req))
    });
    assert!(matches!(&result, Err(e) if e.transient() == Some(Transient::LockNotAvailable)), "{result:?}");
    assert_eq!(testing::snapshot(&mut setup), snapshot);
}
