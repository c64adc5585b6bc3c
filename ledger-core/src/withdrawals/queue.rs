//! The job queue's side of a withdrawal: what the claimer reads (due jobs, by cursor
//! or sweep) and how a failed attempt is recorded.

use super::*;
use crate::prepared::{Prepared, StaticSql};
use crate::retry::RetryPolicy;

/// Records a failed attempt on a pending job: it waits as `policy` says (evaluated in
/// SQL, with the row's own attempt count) before it is claimed again, and after
/// `policy.max_attempts` attempts it ends as `failed` with its last error. Returns the
/// job's status after. [`RetryPolicy::JOBS`] is the daemon's default.
pub fn record_failed_attempt(
    conn: &mut PgConnection,
    id: WithdrawalId,
    error: &str,
    policy: &RetryPolicy,
) -> Result<Option<WithdrawalStatus>, LedgerError> {
    let b = &policy.backoff;
    #[derive(QueryableByName)]
    struct Status {
        #[diesel(sql_type = diesel::sql_types::Text)]
        status: WithdrawalStatus,
    }
    let error = crate::error::stored_text(error, crate::error::STORED_TEXT_MAX_CHARS);
    let row: Option<Status> = diesel::sql_query(
        "UPDATE withdrawals SET
             attempts = attempts + 1,
             last_error = $2,
             -- Backoff::delay(attempts) (crate::retry), here because `attempts` is the row's:
             -- ceiling min(cap $4, base $5 * 2^n), at least 1 ms, jittered above floor $6.
             next_attempt_at = now() + make_interval(secs =>
                 greatest(1, least($4::float8, $5::float8 * power(2, least(attempts, 30))))
                 * ($6::float8 + random() * (1 - $6::float8)) / 1000),
             status = CASE WHEN attempts + 1 >= $3 THEN 'failed' ELSE status END,
             reason = CASE WHEN attempts + 1 >= $3 THEN 'gave up after ' || (attempts + 1) || ' attempts: ' || $2
                           ELSE reason END,
             finished_at = CASE WHEN attempts + 1 >= $3 THEN now() ELSE finished_at END
         WHERE id = $1 AND status = 'pending'
         RETURNING status",
    )
    .bind::<diesel::sql_types::BigInt, _>(id.get())
    .bind::<diesel::sql_types::Text, _>(&error)
    .bind::<diesel::sql_types::Integer, _>(i32::try_from(policy.max_attempts).unwrap_or(i32::MAX))
    .bind::<diesel::sql_types::BigInt, _>(i64::try_from(b.cap_ms).unwrap_or(i64::MAX))
    .bind::<diesel::sql_types::BigInt, _>(i64::try_from(b.base_ms).unwrap_or(i64::MAX))
    .bind::<diesel::sql_types::Double, _>(b.floor_fraction())
    .get_result(conn)
    .optional()?;
    Ok(row.map(|r| r.status))
}

/// Ends a pending job as `failed` at once (a panic while processing it: retrying a
/// programmer error will not help, and an operator must look).
pub fn fail_now(conn: &mut PgConnection, id: WithdrawalId, reason: &str) -> Result<bool, LedgerError> {
    let reason = crate::error::stored_text(reason, crate::error::STORED_TEXT_MAX_CHARS);
    let updated = diesel::update(
        withdrawals::table.find(id.get()).filter(withdrawals::status.eq(WithdrawalStatus::Pending.as_str())),
    )
    .set((
        withdrawals::status.eq(WithdrawalStatus::Failed.as_str()),
        withdrawals::reason.eq(Some(&reason)),
        withdrawals::last_error.eq(Some(&reason)),
        withdrawals::attempts.eq(withdrawals::attempts + 1),
        withdrawals::finished_at.eq(now_tz()),
    ))
    .execute(conn)?;
    Ok(updated == 1)
}

/// Due jobs for a claimer: pending, past their `next_attempt_at`, not locked by a worker
/// right now (`SKIP LOCKED`), not in `exclude` (already queued here). Oldest first.
pub fn claim_due(
    conn: &mut PgConnection,
    limit: i64,
    exclude: &[i64],
) -> Result<Vec<(WithdrawalId, AccountId)>, LedgerError> {
    assert!(limit > 0, "claim at least one job");
    #[derive(QueryableByName)]
    struct Due {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        account_id: i64,
    }
    let ids: Vec<Due> = tx::transaction(conn, &TxOptions::default(), |tx| {
        tx::with_batch_plans(tx, |tx| {
            Prepared::<ClaimDue>::new()
                .bind::<diesel::sql_types::BigInt, _>(limit)
                .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(exclude)
                .load(tx.conn())
                .map_err(LedgerError::from)
        })
    })?;
    Ok(ids.into_iter().map(|d| (WithdrawalId::from_db(d.id), AccountId::from_db(d.account_id))).collect())
}

/// Due pending jobs, oldest due first, skipping `$2` (queued here already) and rows
/// another transaction holds. The status is written into the text, not bound: inside
/// `with_batch_plans` plans are generic, and only a literal `'pending'` lets a generic
/// plan use the pending partial index instead of reading every withdrawal ever made.
enum ClaimDue {}

impl StaticSql for ClaimDue {
    const SQL: &'static str = "SELECT id, account_id FROM withdrawals
         WHERE status = 'pending' AND next_attempt_at <= now() AND id <> ALL($2)
         ORDER BY next_attempt_at, id LIMIT $1
         FOR UPDATE SKIP LOCKED";
}

/// Due jobs with an id above `after`, in id order: the claimer's fast path while it
/// works through a backlog (it keeps the highest id it queued as the cursor). Jobs it
/// passes over (a retry whose time has come, a job committed late with a lower id) are
/// picked up by [`claim_due`] once the claimer has caught up.
pub fn claim_after(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
) -> Result<Vec<(WithdrawalId, AccountId)>, LedgerError> {
    assert!(limit > 0, "claim at least one job");
    let ids: Vec<(i64, i64)> = tx::transaction(conn, &TxOptions::default(), |tx| {
        withdrawals::table
            .filter(withdrawals::status.eq(WithdrawalStatus::Pending.as_str()))
            .filter(withdrawals::id.gt(after))
            // A bounded id window keeps the cost at O(limit) whatever plan the planner
            // picks (right after a bulk insert its row estimates are far off). Ids are
            // dense; if a gap ever leaves a window empty, the sweep moves the cursor on.
            .filter(withdrawals::id.le(after.saturating_add(limit.saturating_mul(4))))
            .filter(withdrawals::next_attempt_at.le(diesel::dsl::now))
            .order(withdrawals::id.asc())
            .limit(limit)
            .select((withdrawals::id, withdrawals::account_id))
            .for_update()
            .skip_locked()
            .load(tx.conn())
            .map_err(LedgerError::from)
    })?;
    Ok(ids.into_iter().map(|(w, a)| (WithdrawalId::from_db(w), AccountId::from_db(a))).collect())
}

/// How many jobs are still pending (due or waiting for a retry).
pub fn pending_count(conn: &mut PgConnection) -> Result<i64, LedgerError> {
    Ok(withdrawals::table
        .filter(withdrawals::status.eq(WithdrawalStatus::Pending.as_str()))
        .count()
        .get_result(conn)?)
}
