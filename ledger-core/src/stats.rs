//! Queue depths and the rates of the last minute, read from the database: what
//! `ledger-worker status` prints and what the daemon's metrics gauges show. Embedders
//! can call the same functions.
//!
//! Every figure comes from a partial index (migrations `..._pending_id_index`,
//! `..._payout_settlement` and `..._queue_stats_indexes`), so its cost follows the size
//! of the queue or of the window, never of the tables: `completed` and `settled` rows
//! are never read. The statements name each state as a literal (`status = 'pending'`),
//! which is what lets the planner use the partial index on it, and they run under
//! [`tx::with_batch_plans`] (no sequential or bitmap scans), so stale statistics right
//! after a burst of intake cannot turn a count into a table scan. `tests/stats.rs`
//! checks the plans.

use std::time::Duration;

use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Double, Nullable};
use diesel::{QueryableByName, RunQueryDsl};

use crate::error::LedgerError;
use crate::tx::{self, TxOptions};

/// How many rows are in each state that is still moving or needs an operator.
#[derive(Clone, Debug, Default, PartialEq, QueryableByName)]
pub struct QueueDepths {
    /// Requested, not yet processed (due now or waiting for a retry).
    #[diesel(sql_type = BigInt)]
    pub withdrawals_pending: i64,
    /// Of those, the ones waiting for a retry after a failed attempt (`next_attempt_at`
    /// still ahead).
    #[diesel(sql_type = BigInt)]
    pub withdrawals_retry_waiting: i64,
    /// Debited, funds held in transit until the payout settles or is returned.
    #[diesel(sql_type = BigInt)]
    pub withdrawals_paying_out: i64,
    /// Given up after repeated non-business failures (or a panic): an operator looks.
    #[diesel(sql_type = BigInt)]
    pub withdrawals_failed: i64,
    /// To be sent, or being sent under a dispatcher's lease.
    #[diesel(sql_type = BigInt)]
    pub payouts_pending: i64,
    /// Retries exhausted: funds still held; an operator retries or returns them.
    #[diesel(sql_type = BigInt)]
    pub payouts_failed: i64,
    /// Seconds since the oldest pending withdrawal was requested (the one with the
    /// lowest id: ids are drawn as rows are inserted, so it is the oldest but for
    /// transactions inserting at the same moment). `None` when nothing is pending.
    #[diesel(sql_type = Nullable<Double>)]
    pub oldest_pending_age_s: Option<f64>,
}

/// What happened in the last `window_s` seconds, counted from the rows' timestamps.
#[derive(Clone, Debug, Default, PartialEq, QueryableByName)]
pub struct Rates {
    /// The window the counts cover, in seconds.
    #[diesel(sql_type = Double)]
    pub window_s: f64,
    /// Withdrawals debited (their `finished_at`, set as they leave `pending`).
    #[diesel(sql_type = BigInt)]
    pub withdrawals_debited: i64,
    /// Withdrawals refused for a business reason or given up (`rejected`, `failed`).
    #[diesel(sql_type = BigInt)]
    pub withdrawals_refused: i64,
    /// Payouts settled (their `updated_at` once settled). A withdrawal completes in the
    /// statement that settles its payout, so this is also the withdrawals completed.
    #[diesel(sql_type = BigInt)]
    pub payouts_settled: i64,
}

impl Rates {
    fn per_s(&self, n: i64) -> f64 {
        if self.window_s > 0.0 {
            n as f64 / self.window_s
        } else {
            0.0
        }
    }
    /// Withdrawals debited per second over the window (0 for an empty window).
    pub fn withdrawals_debited_per_s(&self) -> f64 {
        self.per_s(self.withdrawals_debited)
    }
    /// Withdrawals refused or given up per second over the window.
    pub fn withdrawals_refused_per_s(&self) -> f64 {
        self.per_s(self.withdrawals_refused)
    }
    /// Payouts settled per second, which is withdrawals completed per second.
    pub fn payouts_settled_per_s(&self) -> f64 {
        self.per_s(self.payouts_settled)
    }
}

/// Depths and rates read at one snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueStats {
    /// How many rows are in each open state now.
    pub depths: QueueDepths,
    /// What happened over the window before now.
    pub rates: Rates,
}

/// The rates' default window.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// The depth columns. Each count reads one partial index: `withdrawals_pending_id_idx`,
/// `withdrawals_pending_idx` (next_attempt_at, id), `withdrawals_paying_out_idx`,
/// `withdrawals_failed_idx`, `payouts_due_idx`, `payouts_failed_idx`.
macro_rules! depth_columns {
    () => {
        "(SELECT count(*) FROM withdrawals WHERE status = 'pending') AS withdrawals_pending,
         (SELECT count(*) FROM withdrawals WHERE status = 'pending' AND next_attempt_at > now())
             AS withdrawals_retry_waiting,
         (SELECT count(*) FROM withdrawals WHERE status = 'paying_out') AS withdrawals_paying_out,
         (SELECT count(*) FROM withdrawals WHERE status = 'failed') AS withdrawals_failed,
         (SELECT count(*) FROM payouts WHERE status = 'pending') AS payouts_pending,
         (SELECT count(*) FROM payouts WHERE status = 'failed') AS payouts_failed,
         EXTRACT(EPOCH FROM now() - (SELECT created_at FROM withdrawals WHERE status = 'pending'
                                      ORDER BY id LIMIT 1))::float8 AS oldest_pending_age_s"
    };
}

/// The statement [`depths`] runs (public for `EXPLAIN`).
pub const DEPTHS_SQL: &str = concat!("SELECT ", depth_columns!());

/// The statement [`snapshot`] runs, `$1` the window in seconds (public for `EXPLAIN`).
/// The rates read `withdrawals_finished_at_idx` and `payouts_settled_at_idx`, over the
/// window's rows only.
pub const SNAPSHOT_SQL: &str = concat!(
    "SELECT ",
    depth_columns!(),
    ",
     $1::float8 AS window_s,
     w.debited AS withdrawals_debited, w.refused AS withdrawals_refused,
     (SELECT count(*) FROM payouts WHERE status = 'settled'
          AND updated_at > now() - make_interval(secs => $1::float8)) AS payouts_settled
     FROM (SELECT count(*) FILTER (WHERE entry_id IS NOT NULL) AS debited,
                  count(*) FILTER (WHERE entry_id IS NULL) AS refused
           FROM withdrawals WHERE finished_at > now() - make_interval(secs => $1::float8)) w"
);

/// The queue depths and the oldest pending age: a handful of index reads (what the
/// metrics gauges refresh).
pub fn depths(conn: &mut PgConnection) -> Result<QueueDepths, LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| {
        tx::with_batch_plans(tx, |tx| Ok(diesel::sql_query(DEPTHS_SQL).get_result::<QueueDepths>(tx.conn())?))
    })
}

/// Depths and the rates over the last `window` (at least a millisecond), at one
/// snapshot. The rates read every row of the window, so their cost grows with the
/// throughput times the window; [`depths`] alone is cheaper.
pub fn snapshot(conn: &mut PgConnection, window: Duration) -> Result<QueueStats, LedgerError> {
    let window_s = window.as_secs_f64().max(0.001);
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(embed)]
        depths: QueueDepths,
        #[diesel(embed)]
        rates: Rates,
    }
    let row = tx::transaction(conn, &TxOptions::default(), |tx| {
        tx::with_batch_plans(tx, |tx| {
            Ok(diesel::sql_query(SNAPSHOT_SQL).bind::<Double, _>(window_s).get_result::<Row>(tx.conn())?)
        })
    })?;
    Ok(QueueStats { depths: row.depths, rates: row.rates })
}
