//! Named resource locks: a lock on a name (say "payout-batch:EUR" or "import:2026-11")
//! rather than on a row, held until the transaction ends, with a way to see who holds it.
//!
//! These are PostgreSQL transaction-scoped advisory locks on a 64-bit hash of the name
//! (`hashtextextended`). They need no table and cannot be leaked: commit, rollback or a
//! dropped connection releases them. The holder is read from `pg_locks` joined with
//! `pg_stat_activity`, so it is always true, never a stale row someone forgot to delete.
//! Name your processes with `SessionConfig::application_name` to make it readable.

use std::time::Duration;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};

use crate::error::{LedgerError, RetryClass, Transient};
use crate::tx::Tx;

#[derive(QueryableByName)]
struct Acquired {
    #[diesel(sql_type = Bool)]
    acquired: bool,
}

fn check_name(name: &str) -> Result<(), LedgerError> {
    if name.is_empty() || name.len() > 200 {
        return Err(crate::error::InvalidInput::BadField { field: "lock name", reason: "1 to 200 bytes".into() }.into());
    }
    Ok(())
}

/// Takes the lock if nobody holds it; returns whether this transaction now holds it.
/// Re-acquiring a lock this transaction already holds succeeds.
pub fn try_acquire(tx: &mut Tx<'_>, name: &str) -> Result<bool, LedgerError> {
    check_name(name)?;
    let row: Acquired = diesel::sql_query("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0)) AS acquired")
        .bind::<Text, _>(name)
        .get_result(tx.conn())?;
    Ok(row.acquired)
}

/// Waits up to `timeout` for the lock. On timeout returns `LockTimeout` and the
/// transaction is still usable (the wait runs in a savepoint).
pub fn acquire(tx: &mut Tx<'_>, name: &str, timeout: Duration) -> Result<(), LedgerError> {
    check_name(name)?;
    let timeout_ms = timeout.as_millis().clamp(1, i32::MAX as u128).to_string();
    let result = tx.savepoint(|tx| -> Result<(), LedgerError> {
        #[derive(QueryableByName)]
        struct Setting {
            #[diesel(sql_type = Text)]
            previous: String,
        }
        let previous: Setting = diesel::sql_query(
            "SELECT current_setting('lock_timeout') AS previous, set_config('lock_timeout', $1, true)",
        )
        .bind::<Text, _>(&timeout_ms)
        .get_result(tx.conn())?;
        diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind::<Text, _>(name)
            .execute(tx.conn())?;
        diesel::sql_query("SELECT set_config('lock_timeout', $1, true)")
            .bind::<Text, _>(&previous.previous)
            .execute(tx.conn())?;
        Ok(())
    });
    match result {
        Err(e) if e.transient() == Some(Transient::LockNotAvailable) => Err(LedgerError::LockTimeout(name.to_string())),
        other => other,
    }
}

/// Who holds a named lock, as PostgreSQL sees it.
#[derive(Clone, Debug, PartialEq, Eq, QueryableByName)]
pub struct LockHolder {
    /// The holding backend's process id (`pg_backend_pid()` on its connection).
    #[diesel(sql_type = Integer)]
    pub pid: i32,
    /// The holder's `application_name` (empty if it set none; see
    /// `SessionConfig::application_name`).
    #[diesel(sql_type = Text)]
    pub application_name: String,
    /// The holder's client address; `None` for a Unix-socket connection.
    #[diesel(sql_type = Nullable<Text>)]
    pub client_addr: Option<String>,
    /// How long the holding transaction has been open, in ms.
    #[diesel(sql_type = BigInt)]
    pub transaction_age_ms: i64,
    /// The holder's `pg_stat_activity.state`: `active` (running a statement), `idle in
    /// transaction` (waiting on its client, lock still held), ...
    #[diesel(sql_type = Nullable<Text>)]
    pub state: Option<String>,
}

/// The current holder of `name`, if any. Works from any connection, in or out of a
/// transaction (it reads PostgreSQL's lock table, not ours).
pub fn holder(conn: &mut PgConnection, name: &str) -> Result<Option<LockHolder>, LedgerError> {
    check_name(name)?;
    // A bigint advisory key k is shown as classid = high 32 bits, objid = low 32 bits,
    // objsubid = 1.
    let rows: Vec<LockHolder> = diesel::sql_query(
        "WITH k AS (SELECT hashtextextended($1, 0) AS key)
         SELECT a.pid, a.application_name, a.client_addr::text AS client_addr,
                COALESCE((EXTRACT(EPOCH FROM (clock_timestamp() - a.xact_start)) * 1000)::bigint, 0)
                    AS transaction_age_ms,
                a.state
         FROM pg_locks l
         JOIN pg_stat_activity a ON a.pid = l.pid
         CROSS JOIN k
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid::bigint = ((k.key >> 32) & 4294967295)
           AND l.objid::bigint = (k.key & 4294967295)",
    )
    .bind::<Text, _>(name)
    .load(conn)?;
    Ok(rows.into_iter().next())
}

/// Whether `name` is held by anyone (including this session).
pub fn is_held(conn: &mut PgConnection, name: &str) -> Result<bool, LedgerError> {
    Ok(holder(conn, name)?.is_some())
}
