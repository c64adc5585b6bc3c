//! The test harness and the named locks, tested on the real thing.

mod common;

use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use common::balance;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use ledger_core::accounts;
use ledger_core::db::{self, PoolConfig};
use ledger_core::locks;
use ledger_core::schema::accounts as acc;
use ledger_core::{Currency, LedgerError, TxOptions};
use ledger_testdb::{self as testing, Durability, TempCluster};

#[testing::test]
fn the_guard_catches_a_row_lock_taken_outside_a_transaction_in_rollback_mode() {
    let result = testing::try_with_rollback(|conn| {
        let a = testing::funded_account(conn, "victim", Currency::EUR, "1.00");
        // Code under test that "forgot" its transaction: in production, in autocommit,
        // this lock would be released the moment the SELECT finished.
        let _: i64 = acc::table.find(a.get()).select(acc::id).for_update().first(conn).unwrap();
    });
    let violations = result.expect_err("the guard must report the unwrapped FOR UPDATE");
    assert_eq!(violations.len(), 1);
    assert!(violations[0].sql.contains("FOR UPDATE"), "{:?}", violations[0]);
}

#[testing::test]
#[should_panic(expected = "lock guard: 1 lock(s) taken outside a transaction")]
fn with_rollback_fails_the_test_when_the_guard_fires() {
    testing::with_rollback(|conn| {
        conn.batch_execute("SELECT id FROM accounts LIMIT 1 FOR NO KEY UPDATE").unwrap();
    });
}

#[testing::test]
fn locks_taken_through_the_ledgers_transactions_pass_the_guard() {
    let result = testing::try_with_rollback(|conn| {
        let a = testing::funded_account(conn, "fine", Currency::EUR, "1.00");
        ledger_core::transaction(conn, &TxOptions::default(), |tx| {
            accounts::lock(tx, a)?;
            locks::try_acquire(tx, "fine")
        })
        .unwrap()
    });
    assert_eq!(result, Ok(true));
}

#[testing::test]
fn the_guard_also_watches_committed_mode_connections_and_pools() {
    let db = testing::committed();
    let mut conn = db.conn();
    conn.batch_execute("SELECT id FROM accounts LIMIT 1 FOR UPDATE").unwrap();
    let mut pooled = db.pool().get().unwrap();
    pooled.batch_execute("SELECT id FROM accounts LIMIT 1 FOR SHARE").unwrap();
    // Inside a transaction it is fine.
    pooled.transaction(|c| c.batch_execute("SELECT id FROM accounts LIMIT 1 FOR UPDATE")).unwrap();
    let seen = db.guard().take_violations();
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[testing::test]
fn rollback_mode_never_commits() {
    let owner = format!("ghost-{}", std::process::id());
    testing::with_rollback(|conn| {
        testing::funded_account(conn, &owner, Currency::EUR, "1.00");
        let n: i64 = acc::table.filter(acc::owner.eq(&owner)).count().get_result(conn).unwrap();
        assert_eq!(n, 1);
    });
    testing::with_rollback(|conn| {
        let n: i64 = acc::table.filter(acc::owner.eq(&owner)).count().get_result(conn).unwrap();
        assert_eq!(n, 0, "the first test's account was rolled back");
    });
}

fn database_exists(conn: &mut PgConnection, name: &str) -> bool {
    diesel::dsl::select(diesel::dsl::sql::<diesel::sql_types::Bool>(&format!(
        "EXISTS (SELECT 1 FROM pg_database WHERE datname = '{name}')"
    )))
    .get_result(conn)
    .unwrap()
}

use diesel::pg::PgConnection;

#[testing::test]
fn a_committed_test_database_is_its_own_and_is_dropped_afterwards() {
    let witness = testing::committed();
    let mut observer = witness.conn();
    let (name, a_id) = {
        let db = testing::committed();
        let mut conn = db.conn();
        let a = testing::funded_account(&mut conn, "mine", Currency::EUR, "1.00");
        assert!(database_exists(&mut observer, db.name()));
        // Committed, so visible from another connection to the same database.
        let mut other = db.conn();
        assert_eq!(balance(&mut other, a), 100);
        (db.name().to_string(), a)
    };
    assert!(!database_exists(&mut observer, &name), "dropped when the TestDb went away");
    // The witness database is a separate clone: the other test's account is not there.
    assert!(accounts::get(&mut observer, a_id).is_err() || balance(&mut observer, a_id) != 100);
}

#[testing::test]
fn wait_until_blocked_sees_a_real_lock_wait_and_times_out_without_one() {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "contended", Currency::EUR, "1.00");
    let (mut holder, mut waiter, mut observer) = (db.conn(), db.conn(), db.conn());
    let (hpid, wpid) = (testing::backend_pid(&mut holder), testing::backend_pid(&mut waiter));
    assert!(testing::wait_until_blocked(&mut observer, wpid, hpid, Duration::from_millis(50)).is_err());
    let locked = Barrier::new(2);
    let release = Barrier::new(2);
    thread::scope(|s| {
        s.spawn(|| {
            ledger_core::transaction(&mut holder, &TxOptions::no_retry(), |tx| {
                accounts::lock(tx, a)?;
                locked.wait();
                release.wait();
                Ok::<_, LedgerError>(())
            })
            .unwrap()
        });
        locked.wait();
        let w = s.spawn(|| {
            ledger_core::transaction(&mut waiter, &TxOptions::no_retry(), |tx| accounts::lock(tx, a).map(drop))
        });
        testing::wait_until_blocked(&mut observer, wpid, hpid, Duration::from_secs(10)).unwrap();
        release.wait();
        w.join().unwrap().unwrap();
    });
}

#[testing::test]
fn a_named_lock_is_exclusive_shows_its_holder_and_ends_with_the_transaction() {
    let db = testing::committed();
    let (mut c1, mut c2, mut observer) = (db.conn(), db.conn(), db.conn());
    let pid1 = testing::backend_pid(&mut c1);
    c1.batch_execute("SET application_name = 'payout-runner-1'").unwrap();
    let name = "payout-batch:EUR";
    assert_eq!(locks::holder(&mut observer, name).unwrap(), None);
    let held = Barrier::new(2);
    let release = Barrier::new(2);
    thread::scope(|s| {
        s.spawn(|| {
            ledger_core::transaction(&mut c1, &TxOptions::no_retry(), |tx| {
                assert!(locks::try_acquire(tx, name)?);
                assert!(locks::try_acquire(tx, name)?, "re-entrant within the holder's transaction");
                held.wait();
                release.wait();
                Ok::<_, LedgerError>(())
            })
            .unwrap()
        });
        held.wait();
        let holder = locks::holder(&mut observer, name).unwrap().expect("held");
        assert_eq!(holder.pid, pid1);
        assert_eq!(holder.application_name, "payout-runner-1");
        assert!(locks::is_held(&mut observer, name).unwrap());
        assert_eq!(locks::holder(&mut observer, "payout-batch:USD").unwrap(), None, "names are distinct");
        ledger_core::transaction(&mut c2, &TxOptions::no_retry(), |tx| {
            assert!(!locks::try_acquire(tx, name)?);
            let err = locks::acquire(tx, name, Duration::from_millis(30)).unwrap_err();
            assert!(matches!(err, LedgerError::LockTimeout(_)), "{err}");
            // The timeout ran in a savepoint: this transaction is still usable, and its
            // lock_timeout is what it was.
            let lt: String =
                diesel::dsl::select(diesel::dsl::sql::<diesel::sql_types::Text>("current_setting('lock_timeout')"))
                    .get_result(tx.conn())?;
            assert_eq!(lt, "0");
            assert!(locks::try_acquire(tx, "another-name")?);
            Ok::<_, LedgerError>(())
        })
        .unwrap();
        release.wait();
    });
    assert_eq!(locks::holder(&mut observer, name).unwrap(), None, "released at commit");
    ledger_core::transaction(&mut c2, &TxOptions::no_retry(), |tx| {
        locks::acquire(tx, name, Duration::from_secs(1))?;
        Ok::<_, LedgerError>(())
    })
    .unwrap();
}

#[testing::test]
fn a_dropped_connection_is_retried_on_a_fresh_pooled_connection() {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "a", Currency::EUR, "0.00");
    let pool = db::pool(db.url(), &PoolConfig { max_size: 2, min_idle: Some(0), ..PoolConfig::default() }).unwrap();
    let mut attempts = 0;
    let key = testing::key("dep");
    let receipt = ledger_core::tx::transaction_pooled(&pool, &TxOptions::default(), |tx| {
        attempts += 1;
        if attempts == 1 {
            let pid = testing::backend_pid(tx.conn());
            setup.batch_execute(&format!("SELECT pg_terminate_backend({pid})")).unwrap();
        }
        ledger_core::deposits::deposit_tx(
            tx,
            &ledger_core::deposits::Deposit { account: a, amount: common::eur("3.00"), key: key.clone() },
        )
    })
    .unwrap();
    assert_eq!(attempts, 2, "the first attempt died with its connection, the second committed");
    assert!(!receipt.replayed);
    assert_eq!(balance(&mut setup, a), 300);
    common::assert_audit_clean(&mut setup);
}

#[testing::test]
fn a_throwaway_cluster_starts_serves_and_leaves_nothing_behind() {
    let cluster = TempCluster::start(Durability::Durable).unwrap();
    let dir = cluster.socket_dir().to_path_buf();
    let mut conn = PgConnection::establish(&cluster.url("postgres")).unwrap();
    let fsync: String = diesel::dsl::select(diesel::dsl::sql::<diesel::sql_types::Text>("current_setting('fsync')"))
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(fsync, "on", "durable clusters keep fsync on");
    drop(conn);
    assert!(dir.exists());
    cluster.stop().unwrap();
    assert!(!dir.exists());
}
