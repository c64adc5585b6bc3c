//! Planner settings for batch statements: [`with_batch_plans`] inside a caller's
//! transaction, [`transaction_with_batch_plans`] for a transaction of our own, where
//! they ride on its BEGIN.

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::pg::PgConnection;

use super::{depth, retrying, Tx, TxOptions};
use crate::error::LedgerError;

/// The settings [`with_batch_plans`] sets, as `SET LOCAL` statements sent with BEGIN.
const BEGIN_WITH_BATCH_PLANS: &str = "BEGIN; SET LOCAL jit = off; SET LOCAL enable_seqscan = off; \
    SET LOCAL enable_bitmapscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; \
    SET LOCAL plan_cache_mode = force_generic_plan";

/// Runs `f` with plans that stay O(batch) whatever the table statistics say, then puts
/// the caller's planner settings back.
///
/// Our batch statements touch a list of rows by id (unnest of an array, joined to the
/// table) or pop the head of a queue index. The right plan for them is always a nested
/// loop of index probes. The planner does not always see that: right after a burst of
/// intake its statistics still say "almost nothing is pending", so a full scan of the
/// `WHERE status = 'pending'` partial index, a bitmap over it, or a hash join over a
/// sequential scan looks cheaper than N probes, and every batch then reads the whole
/// backlog (a batch of 800 over a backlog of 60,000 read all 60,000; throughput fell
/// as the backlog grew). A bitmap scan also never marks the dead entries of a queue
/// index, so each poll visits every row that left the queue since the last vacuum.
/// Inside `f` sequential scans, bitmap scans, hash and merge joins are disabled (the
/// statements are written not to need them), so the plan is probes by id. JIT is off
/// too: a plan that must still use a disabled node (a one-row table) is costed at 10^10
/// and would otherwise be JIT-compiled, tens of ms per statement.
///
/// Statements kept prepared (the crate's `prepared` module) reuse one generic plan
/// inside `f` (`plan_cache_mode = force_generic_plan`): with these settings it is the
/// same probes by id a custom plan would be, without planning each call. A statement
/// inside `f` that needs a partial index must write the index's predicate as a literal
/// (`status = 'pending'`), never as a bound value: a generic plan cannot prove a
/// parameter equal to it (`withdrawals::claim_due`; `tests/plans.rs` checks).
///
/// If `f` panics, the settings stay changed until the transaction ends (rolling it
/// back, as a panic should, ends them).
pub fn with_batch_plans<T>(
    tx: &mut Tx<'_>,
    f: impl FnOnce(&mut Tx<'_>) -> Result<T, LedgerError>,
) -> Result<T, LedgerError> {
    use crate::prepared::{Prepared, StaticSql};
    use diesel::sql_types::Text;
    use diesel::RunQueryDsl;
    // One round trip: the old values are read before the new ones are set (a target
    // list is evaluated left to right), and SET LOCAL ends with the transaction at most.
    enum Set {}
    impl StaticSql for Set {
        const SQL: &'static str = "SELECT current_setting('jit') AS jit, current_setting('enable_seqscan') AS seqscan,
                current_setting('enable_bitmapscan') AS bitmapscan,
                current_setting('enable_hashjoin') AS hashjoin, current_setting('enable_mergejoin') AS mergejoin,
                current_setting('plan_cache_mode') AS plan_cache,
                set_config('jit', 'off', true), set_config('enable_seqscan', 'off', true),
                set_config('enable_bitmapscan', 'off', true),
                set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true),
                set_config('plan_cache_mode', 'force_generic_plan', true)";
    }
    enum Restore {}
    impl StaticSql for Restore {
        const SQL: &'static str = "SELECT set_config('jit', $1, true), set_config('enable_seqscan', $2, true),
                set_config('enable_bitmapscan', $3, true),
                set_config('enable_hashjoin', $4, true), set_config('enable_mergejoin', $5, true),
                set_config('plan_cache_mode', $6, true)";
    }
    let saved: PlannerSettings = Prepared::<Set>::new().get_result(tx.conn())?;
    let result = f(tx);
    let restored = Prepared::<Restore>::new()
        .bind::<Text, _>(&saved.jit)
        .bind::<Text, _>(&saved.seqscan)
        .bind::<Text, _>(&saved.bitmapscan)
        .bind::<Text, _>(&saved.hashjoin)
        .bind::<Text, _>(&saved.mergejoin)
        .bind::<Text, _>(&saved.plan_cache)
        .execute(tx.conn());
    match (result, restored) {
        (Ok(value), Ok(_)) => Ok(value),
        (Ok(_), Err(e)) => Err(e.into()),
        // The first error is the one that matters; an aborted transaction cannot take
        // the restore, and rolling it back ends these settings anyway.
        (Err(e), _) => Err(e),
    }
}

/// The planner settings [`with_batch_plans`] changes, as the session sees them now.
#[derive(diesel::QueryableByName, Debug, Clone, PartialEq, Eq)]
pub struct PlannerSettings {
    /// `jit`.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub jit: String,
    /// `enable_seqscan`.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub seqscan: String,
    /// `enable_bitmapscan`.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub bitmapscan: String,
    /// `enable_hashjoin`.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub hashjoin: String,
    /// `enable_mergejoin`.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub mergejoin: String,
    /// `plan_cache_mode`.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub plan_cache: String,
}

/// Reads the settings [`with_batch_plans`] changes (to check they are put back).
pub fn planner_settings(conn: &mut PgConnection) -> Result<PlannerSettings, LedgerError> {
    use diesel::RunQueryDsl;
    Ok(diesel::sql_query(
        "SELECT current_setting('jit') AS jit, current_setting('enable_seqscan') AS seqscan,
                current_setting('enable_bitmapscan') AS bitmapscan, current_setting('enable_hashjoin') AS hashjoin,
                current_setting('enable_mergejoin') AS mergejoin, current_setting('plan_cache_mode') AS plan_cache",
    )
    .get_result(conn)?)
}

/// [`transaction`](super::transaction) whose body runs with the settings of
/// [`with_batch_plans`], sent in the same round trip as its BEGIN (with the options'
/// lock timeout): no round trip to read, set or restore them, since `SET LOCAL` ends
/// with the transaction. Retried as `transaction` retries. Called inside a transaction
/// it is a savepoint under [`with_batch_plans`].
pub fn transaction_with_batch_plans<T, F>(conn: &mut PgConnection, opts: &TxOptions, mut f: F) -> Result<T, LedgerError>
where
    F: FnMut(&mut Tx<'_>) -> Result<T, LedgerError>,
{
    assert!(opts.max_attempts >= 1, "max_attempts counts the first attempt");
    if depth(conn) > 0 {
        return super::transaction(conn, opts, |tx| with_batch_plans(tx, &mut f));
    }
    let begin = match opts.lock_timeout_ms {
        Some(ms) => format!("{BEGIN_WITH_BATCH_PLANS}; SET LOCAL lock_timeout = {ms}"),
        None => BEGIN_WITH_BATCH_PLANS.to_string(),
    };
    retrying(opts, || {
        // As diesel's `Connection::transaction`, with our BEGIN.
        AnsiTransactionManager::begin_transaction_sql(conn, &begin)?;
        match f(&mut Tx { conn }) {
            Ok(value) => {
                AnsiTransactionManager::commit_transaction(conn)?;
                Ok(value)
            }
            Err(e) => match AnsiTransactionManager::rollback_transaction(conn) {
                Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(e),
                Err(rollback) => Err(rollback.into()),
            },
        }
    })
}
