//! Real errors: a deadlock, a lock timeout and a NOWAIT, a unique violation, a terminated backend.

use super::*;

// ---- 3. Real errors, classified by their SQLSTATE -------------------------------------

fn two_rows(db: &TestDb) {
    db.conn()
        .batch_execute("CREATE TABLE two_rows (id int PRIMARY KEY); INSERT INTO two_rows VALUES (1), (2);")
        .unwrap();
}

fn lock_row(tx: &mut ledger_core::Tx<'_>, id: i32, nowait: bool) -> Result<(), LedgerError> {
    let sql = if nowait {
        "SELECT id FROM two_rows WHERE id = $1 FOR UPDATE NOWAIT"
    } else {
        "SELECT id FROM two_rows WHERE id = $1 FOR UPDATE"
    };
    diesel::sql_query(sql).bind::<Integer, _>(id).execute(tx.conn())?;
    Ok(())
}

/// Diesel has no error kind for it: `Unknown`, so only the SQLSTATE can classify it.
fn assert_diesel_kind_unknown(error: &LedgerError) {
    assert!(
        matches!(error, LedgerError::Database(DieselError::DatabaseError(DatabaseErrorKind::Unknown, _))),
        "{error:?}"
    );
}

#[testing::test]
fn a_real_deadlock_is_recognised_by_its_sqlstate() {
    let db = testing::committed();
    two_rows(&db);
    let (mut c1, mut c2, mut observer) = (db.conn(), db.conn(), db.conn());
    let (pid1, pid2) = (testing::backend_pid(&mut c1), testing::backend_pid(&mut c2));
    let first_locks_held = Barrier::new(3);
    let first_is_blocked = Barrier::new(2);
    let no_retry = TxOptions::no_retry();
    let (r1, r2) = thread::scope(|s| {
        // 1 locks row 1 then row 2; 2 locks row 2, and asks for row 1 only once 1 is
        // waiting for row 2: a deadlock, every time.
        let t1 = s.spawn(|| {
            ledger_core::transaction(&mut c1, &no_retry, |tx| {
                lock_row(tx, 1, false)?;
                first_locks_held.wait();
                lock_row(tx, 2, false)
            })
        });
        let t2 = s.spawn(|| {
            ledger_core::transaction(&mut c2, &no_retry, |tx| {
                lock_row(tx, 2, false)?;
                first_locks_held.wait();
                first_is_blocked.wait();
                lock_row(tx, 1, false)
            })
        });
        first_locks_held.wait();
        testing::wait_until_blocked(&mut observer, pid1, pid2, Duration::from_secs(60))
            .expect("transaction 1 waits for transaction 2");
        first_is_blocked.wait();
        (t1.join().unwrap(), t2.join().unwrap())
    });
    // Exactly one victim; the other transaction commits.
    let victim = match (r1, r2) {
        (Err(e), Ok(())) | (Ok(()), Err(e)) => e,
        other => panic!("expected exactly one deadlock victim, got {other:?}"),
    };
    assert_eq!(victim.sqlstate(), Some(SqlState::DEADLOCK_DETECTED), "{victim:?}");
    assert_eq!(victim.transient(), Some(Transient::Deadlock), "{victim:?}");
    assert_diesel_kind_unknown(&victim);
    assert!(victim.to_string().ends_with("(SQLSTATE 40P01)"), "{victim}");
}

#[testing::test]
fn a_real_lock_timeout_and_a_real_nowait_are_recognised_by_their_sqlstate_and_retried() {
    let db = testing::committed();
    two_rows(&db);
    let (mut holder, mut waiter) = (db.conn(), db.conn());
    let locked = Barrier::new(2);
    let release = Barrier::new(2);
    let (timed_out, refused, retried) = thread::scope(|s| {
        s.spawn(|| {
            ledger_core::transaction(&mut holder, &TxOptions::no_retry(), |tx| {
                lock_row(tx, 1, false)?;
                locked.wait();
                release.wait();
                Ok::<_, LedgerError>(())
            })
            .unwrap();
        });
        locked.wait();
        let timed_out = ledger_core::transaction(
            &mut waiter,
            &TxOptions { lock_timeout_ms: Some(50), ..TxOptions::no_retry() },
            |tx| lock_row(tx, 1, false),
        );
        let refused = ledger_core::transaction(&mut waiter, &TxOptions::no_retry(), |tx| lock_row(tx, 1, true));
        let attempts_made = AtomicU32::new(0);
        let retried = ledger_core::transaction(&mut waiter, &attempts(4), |tx| {
            attempts_made.fetch_add(1, Ordering::SeqCst);
            lock_row(tx, 1, true)
        });
        release.wait();
        (timed_out, refused, (retried, attempts_made.load(Ordering::SeqCst)))
    });
    for error in [timed_out.unwrap_err(), refused.unwrap_err()] {
        assert_eq!(error.sqlstate(), Some(SqlState::LOCK_NOT_AVAILABLE), "{error:?}");
        assert_eq!(error.transient(), Some(Transient::LockNotAvailable), "{error:?}");
        assert_diesel_kind_unknown(&error);
    }
    let (result, attempts_made) = retried;
    assert_eq!(attempts_made, 4, "a real 55P03 is retried until the attempts run out");
    assert_eq!(result.unwrap_err().sqlstate(), Some(SqlState::LOCK_NOT_AVAILABLE));
}

#[testing::test]
fn a_real_unique_violation_has_sqlstate_23505_and_is_not_retried() {
    let db = testing::committed();
    two_rows(&db);
    let mut conn = db.conn();
    let mut ran = 0;
    let result = ledger_core::transaction(&mut conn, &attempts(8), |tx| {
        ran += 1;
        diesel::sql_query("INSERT INTO two_rows (id) VALUES (2)").execute(tx.conn())?;
        Ok::<_, LedgerError>(())
    });
    assert_eq!(ran, 1);
    let error = result.unwrap_err();
    assert!(matches!(error, LedgerError::Database(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _))));
    assert_eq!(error.sqlstate(), Some(SqlState::UNIQUE_VIOLATION), "{error:?}");
    assert_eq!(error.sqlstate().map(|s| s.class().to_string()), Some("23".to_string()));
    assert_eq!(error.transient(), None);
    assert!(!error.is_transient());
}

#[testing::test]
fn a_really_terminated_connection_is_retried_on_a_fresh_pooled_connection() {
    let db = testing::committed();
    let mut ran = 0;
    let mut first_error = None;
    let result = transaction_pooled(db.pool(), &attempts(3), |tx| {
        ran += 1;
        if ran == 1 {
            // The server ends this backend (SQLSTATE 57P01); the connection is gone.
            let outcome = diesel::sql_query("SELECT pg_terminate_backend(pg_backend_pid())")
                .execute(tx.conn())
                .and_then(|_| diesel::sql_query("SELECT 1").execute(tx.conn()));
            let error = LedgerError::from(outcome.expect_err("a terminated backend cannot answer"));
            first_error = Some(error.transient());
            return Err(error);
        }
        Ok(testing::backend_pid(tx.conn()))
    });
    assert_eq!(first_error, Some(Some(Transient::ConnectionLost)));
    assert_eq!(ran, 2, "retried once, on a new connection");
    assert!(result.is_ok(), "{result:?}");
}
