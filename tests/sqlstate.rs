//! Transient errors are recognised by their SQLSTATE, never by message text: a server
//! whose `lc_messages` is German says "Verklemmung entdeckt", not "deadlock detected",
//! and its deadlocks must be retried all the same. The errors here are raised from
//! PL/pgSQL with German (or deliberately misleading English) text and a chosen
//! ERRCODE, or are real: a deadlock, a lock timeout, a unique violation, a terminated
//! backend. Everything runs on a real PostgreSQL.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::Integer;
use ledger_core::error::{RetryClass, Transient};
use ledger_core::tx::transaction_pooled;
use ledger_core::{LedgerError, SqlState, TxOptions};
use ledger_testdb::{self as testing, TestDb};

/// Retries without the backoff's waiting, so the tests stay quick.
fn attempts(max_attempts: u32) -> TxOptions {
    TxOptions {
        max_attempts,
        backoff: ledger_core::retry::Backoff::new(1, 2, ledger_core::retry::Jitter::Full),
        lock_timeout_ms: None,
    }
}

/// `RAISE EXCEPTION text USING ERRCODE = code`: an error with exactly this SQLSTATE
/// and this (untranslated, arbitrary) message.
fn raise(conn: &mut PgConnection, code: &str, text: &str) -> Result<(), LedgerError> {
    assert!(!text.contains('\''), "keep the test texts free of quotes");
    diesel::sql_query(format!("DO $$ BEGIN RAISE EXCEPTION '{text}' USING ERRCODE = '{code}'; END $$"))
        .execute(conn)?;
    Ok(())
}

/// A committed-mode database with a table that records which attempts committed.
fn database() -> TestDb {
    let db = testing::committed();
    db.conn().batch_execute("CREATE TABLE committed_attempts (attempt int NOT NULL)").unwrap();
    db
}

fn committed_attempts(conn: &mut PgConnection) -> Vec<i32> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Integer)]
        attempt: i32,
    }
    diesel::sql_query("SELECT attempt FROM committed_attempts ORDER BY attempt")
        .load::<Row>(conn)
        .unwrap()
        .into_iter()
        .map(|r| r.attempt)
        .collect()
}

/// One attempt of the body under test: records the attempt (rolled back if the attempt
/// fails), then raises `code` while `attempt <= failures`.
fn attempt_body(
    tx: &mut ledger_core::Tx<'_>,
    attempt: u32,
    failures: u32,
    code: &str,
    text: &str,
) -> Result<u32, LedgerError> {
    diesel::sql_query("INSERT INTO committed_attempts (attempt) VALUES ($1)")
        .bind::<Integer, _>(attempt as i32)
        .execute(tx.conn())?;
    if attempt <= failures {
        raise(tx.conn(), code, text)?;
    }
    Ok(attempt)
}

/// `ledger_core::transaction` on one connection, with a body that fails `failures`
/// times with `code`. Returns the result and how many attempts ran.
fn on_one_connection(
    conn: &mut PgConnection,
    opts: &TxOptions,
    failures: u32,
    code: &str,
    text: &str,
) -> (Result<u32, LedgerError>, u32) {
    let mut ran = 0;
    let result = ledger_core::transaction(conn, opts, |tx| {
        ran += 1;
        attempt_body(tx, ran, failures, code, text)
    });
    (result, ran)
}

/// `transaction_pooled`: every attempt on a connection freshly taken from the pool.
fn on_pooled_connections(
    db: &TestDb,
    opts: &TxOptions,
    failures: u32,
    code: &str,
    text: &str,
) -> (Result<u32, LedgerError>, u32) {
    let mut ran = 0;
    let result = transaction_pooled(db.pool(), opts, |tx| {
        ran += 1;
        attempt_body(tx, ran, failures, code, text)
    });
    (result, ran)
}

fn assert_is_the_raised_error(error: &LedgerError, code: &str, expected: Option<Transient>) {
    assert!(matches!(error, LedgerError::Database(DieselError::DatabaseError(..))), "{error:?}");
    assert_eq!(error.sqlstate(), SqlState::new(code), "{error:?}");
    assert_eq!(error.transient(), expected, "{error:?}");
    assert!(error.to_string().ends_with(&format!("(SQLSTATE {code})")), "{error}");
}

/// A code that can be retried on the same connection: `transaction` runs the body again
/// until it succeeds, and reports the last error as it is when attempts run out.
fn assert_retried_on_one_connection(code: &str, text: &str, expected: Transient) {
    let db = database();
    let mut conn = db.conn();

    let (result, ran) = on_one_connection(&mut conn, &attempts(8), 2, code, text);
    assert_eq!(result.unwrap(), 3, "two failed attempts, then success");
    assert_eq!(ran, 3);
    assert_eq!(committed_attempts(&mut conn), vec![3], "the failed attempts were rolled back");

    let (result, ran) = on_one_connection(&mut conn, &attempts(3), u32::MAX, code, text);
    assert_eq!(ran, 3, "every attempt ran");
    assert_is_the_raised_error(&result.unwrap_err(), code, Some(expected));
    assert_eq!(committed_attempts(&mut conn), vec![3]);

    // The pooled runner retries it too, and says so when it gives up.
    let (result, ran) = on_pooled_connections(&db, &attempts(3), u32::MAX, code, text);
    assert_eq!(ran, 3);
    match result {
        Err(ref e @ LedgerError::RetriesExhausted { attempts: 3, ref last }) => {
            assert_is_the_raised_error(last, code, Some(expected));
            assert_eq!(e.sqlstate(), SqlState::new(code), "the last attempt's SQLSTATE");
        }
        other => panic!("expected RetriesExhausted after 3 attempts, got {other:?}"),
    }
}

/// A connection-lost code: only a new connection can retry, so `transaction` on one
/// connection reports it at once, and `transaction_pooled` retries it on connections
/// from the pool. Raised by RAISE, the connection is in fact fine, and stays usable.
fn assert_retried_on_fresh_pooled_connections(code: &str, text: &str) {
    let db = database();
    let mut conn = db.conn();

    let (result, ran) = on_one_connection(&mut conn, &attempts(8), 1, code, text);
    assert_eq!(ran, 1, "not retried on the connection that reported it");
    assert_is_the_raised_error(&result.unwrap_err(), code, Some(Transient::ConnectionLost));
    let (result, ran) = on_one_connection(&mut conn, &attempts(8), 0, code, text);
    assert_eq!((result.unwrap(), ran), (1, 1), "the connection still works");

    let (result, ran) = on_pooled_connections(&db, &attempts(8), 2, code, text);
    assert_eq!(result.unwrap(), 3, "two failed attempts, then success on a pooled connection");
    assert_eq!(ran, 3);
    assert_eq!(committed_attempts(&mut conn), vec![1, 3]);

    let (result, ran) = on_pooled_connections(&db, &attempts(3), u32::MAX, code, text);
    assert_eq!(ran, 3);
    match result {
        Err(LedgerError::RetriesExhausted { attempts: 3, last }) => {
            assert_is_the_raised_error(&last, code, Some(Transient::ConnectionLost))
        }
        other => panic!("expected RetriesExhausted after 3 attempts, got {other:?}"),
    }
    assert_eq!(committed_attempts(&mut conn), vec![1, 3]);
    // The pool still hands out working connections.
    let (result, _) = on_pooled_connections(&db, &attempts(1), 0, code, text);
    assert_eq!(result.unwrap(), 1);
}

/// A code that is not transient: one attempt, whatever the retry budget, and the error
/// reaches the caller as it is (not as RetriesExhausted).
fn assert_not_retried(db: &TestDb, code: &str, text: &str) {
    let mut conn = db.conn();
    let (result, ran) = on_one_connection(&mut conn, &attempts(8), u32::MAX, code, text);
    assert_eq!(ran, 1, "SQLSTATE {code} ({text}) must not be retried");
    assert_is_the_raised_error(&result.unwrap_err(), code, None);

    let (result, ran) = on_pooled_connections(db, &attempts(8), u32::MAX, code, text);
    assert_eq!(ran, 1, "SQLSTATE {code} ({text}) must not be retried on a pooled connection either");
    assert_is_the_raised_error(&result.unwrap_err(), code, None);
    assert!(committed_attempts(&mut conn).is_empty());
}

// ---- 1. Transient codes with German text are retried --------------------------------

#[testing::test]
fn a_serialization_failure_with_german_text_is_retried() {
    assert_retried_on_one_connection(
        "40001",
        "konnte Zugriff nicht serialisieren wegen Abhängigkeiten zwischen Transaktionen",
        Transient::SerializationFailure,
    );
}

#[testing::test]
fn a_deadlock_with_german_text_is_retried() {
    assert_retried_on_one_connection("40P01", "Verklemmung entdeckt", Transient::Deadlock);
}

#[testing::test]
fn a_lock_not_available_with_german_text_is_retried() {
    assert_retried_on_one_connection(
        "55P03",
        "breche Anweisung ab wegen Zeitüberschreitung einer Sperre",
        Transient::LockNotAvailable,
    );
}

#[testing::test]
fn too_many_connections_with_german_text_is_retried() {
    assert_retried_on_one_connection(
        "53300",
        "tut mir leid, schon zu viele Verbindungen",
        Transient::TooManyConnections,
    );
}

#[testing::test]
fn an_admin_shutdown_with_german_text_is_retried_on_a_fresh_pooled_connection() {
    assert_retried_on_fresh_pooled_connections(
        "57P01",
        "Verbindung wird abgebrochen aufgrund von Anweisung des Administrators",
    );
}

#[testing::test]
fn connection_exceptions_with_german_text_are_retried_on_a_fresh_pooled_connection() {
    // Diesel itself maps 08000 and 08006 to ClosedConnection; 08003 and 08P01 it does
    // not, so those are recognised by their class alone.
    for (code, text) in [
        ("08000", "Verbindungsfehler"),
        ("08006", "Verbindung zum Server wurde unerwartet geschlossen"),
        ("08003", "Verbindung existiert nicht"),
        ("08P01", "ungültige Frontend-Message-Länge"),
    ] {
        assert_retried_on_fresh_pooled_connections(code, text);
    }
}

// ---- 2. Everything else is not retried -----------------------------------------------

#[testing::test]
fn a_unique_violation_with_german_text_is_not_retried() {
    let db = database();
    assert_not_retried(&db, "23505", "doppelter Schlüsselwert verletzt Unique-Constraint");
}

#[testing::test]
fn other_errors_with_german_text_are_not_retried() {
    let db = database();
    for (code, text) in [
        ("22012", "Division durch Null"),
        ("P0001", "Konto gesperrt"),
        ("57014", "storniere Anfrage wegen Zeitüberschreitung der Anweisung"),
        ("53200", "Speicher aufgebraucht"),
    ] {
        assert_not_retried(&db, code, text);
    }
}

#[testing::test]
fn english_messages_that_look_transient_are_not_retried_under_another_code() {
    // The texts the classification once matched: they mean nothing without the code.
    let db = database();
    for text in [
        "deadlock detected",
        "canceling statement due to lock timeout",
        "could not obtain lock on row in relation accounts",
        "terminating connection due to administrator command",
        "server closed the connection unexpectedly",
        "no connection to the server",
    ] {
        assert_not_retried(&db, "P0001", text);
    }
}

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
