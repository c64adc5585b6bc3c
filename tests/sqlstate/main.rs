//! Transient errors are recognised by their SQLSTATE, never by message text: a server
//! whose `lc_messages` is German says "Verklemmung entdeckt", not "deadlock detected",
//! and its deadlocks must be retried all the same. The errors here are raised from
//! PL/pgSQL with German (or deliberately misleading English) text and a chosen
//! ERRCODE, or are real: a deadlock, a lock timeout, a unique violation, a terminated
//! backend. Everything runs on a real PostgreSQL.

mod raised;
mod real;

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
