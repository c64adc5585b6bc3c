//! The `holds` table: every statement on it (read, lock, insert, finish, the pending
//! sums). Times are read as microseconds since the epoch (Diesel maps `Timestamptz` to
//! no std type).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl};

use crate::error::LedgerError;
use crate::ids::{AccountId, EntryId, HoldId};
use crate::money::Currency;
use crate::tx::Tx;

use super::decide::Resolution;
use super::{Hold, HoldRequest, HoldStatus};

/// The columns of a [`Row`], for every statement that reads holds.
const COLUMNS: &str = "id, payer_id, payee_id, currency, amount_minor, posted_minor, status, \
     (EXTRACT(EPOCH FROM expires_at) * 1000000)::bigint AS expires_us, idempotency_key, hold_entry_id, \
     resolution_entry_id, (EXTRACT(EPOCH FROM created_at) * 1000000)::bigint AS created_us, \
     (EXTRACT(EPOCH FROM finished_at) * 1000000)::bigint AS finished_us";

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    id: HoldId,
    #[diesel(sql_type = BigInt)]
    payer_id: AccountId,
    #[diesel(sql_type = BigInt)]
    payee_id: AccountId,
    #[diesel(sql_type = Text)]
    currency: Currency,
    #[diesel(sql_type = BigInt)]
    amount_minor: i64,
    #[diesel(sql_type = BigInt)]
    posted_minor: i64,
    #[diesel(sql_type = Text)]
    status: HoldStatus,
    #[diesel(sql_type = Nullable<BigInt>)]
    expires_us: Option<i64>,
    #[diesel(sql_type = Text)]
    idempotency_key: String,
    #[diesel(sql_type = BigInt)]
    hold_entry_id: EntryId,
    #[diesel(sql_type = Nullable<BigInt>)]
    resolution_entry_id: Option<EntryId>,
    #[diesel(sql_type = BigInt)]
    created_us: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    finished_us: Option<i64>,
}

fn time(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

impl From<Row> for Hold {
    fn from(r: Row) -> Hold {
        Hold {
            id: r.id,
            payer: r.payer_id,
            payee: r.payee_id,
            currency: r.currency,
            amount_minor: r.amount_minor,
            posted_minor: r.posted_minor,
            status: r.status,
            expires_at: r.expires_us.map(time),
            key: r.idempotency_key,
            hold_entry: r.hold_entry_id,
            resolution_entry: r.resolution_entry_id,
            created_at: time(r.created_us),
            finished_at: r.finished_us.map(time),
        }
    }
}

/// Reads a hold (no lock).
pub(super) fn find(conn: &mut PgConnection, id: HoldId) -> Result<Hold, LedgerError> {
    let rows: Vec<Row> = diesel::sql_query(format!("SELECT {COLUMNS} FROM holds WHERE id = $1"))
        .bind::<BigInt, _>(id.get())
        .load(conn)?;
    rows.into_iter().next().map(Hold::from).ok_or(LedgerError::UnknownHold(id))
}

/// Locks a hold's row until the transaction ends (`FOR UPDATE`; nothing references a
/// hold, so no foreign-key check ever takes a lock on it that this would have to wait
/// past). A concurrent post, void or expiry of the same hold waits here, then reads
/// the status the first one left.
pub(super) fn lock(tx: &mut Tx<'_>, id: HoldId) -> Result<Hold, LedgerError> {
    let rows: Vec<Row> = diesel::sql_query(format!("SELECT {COLUMNS} FROM holds WHERE id = $1 FOR UPDATE"))
        .bind::<BigInt, _>(id.get())
        .load(tx.conn())?;
    rows.into_iter().next().map(Hold::from).ok_or(LedgerError::UnknownHold(id))
}

/// Up to `limit` holds of `account` (payer or payee), optionally of one status, with
/// ids above `after`, in id order: the first `limit` of each side, each from its
/// `(payer_id, id)` or `(payee_id, id)` index, merged.
pub(super) fn list(
    conn: &mut PgConnection,
    account: AccountId,
    status: Option<HoldStatus>,
    after: Option<HoldId>,
    limit: i64,
) -> Result<Vec<Hold>, LedgerError> {
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT {COLUMNS} FROM holds WHERE id IN (
           (SELECT id FROM holds WHERE payer_id = $1 AND id > $3 AND ($2::text IS NULL OR status = $2)
             ORDER BY id LIMIT $4)
           UNION ALL
           (SELECT id FROM holds WHERE payee_id = $1 AND id > $3 AND ($2::text IS NULL OR status = $2)
             ORDER BY id LIMIT $4))
         ORDER BY id LIMIT $4"
    ))
    .bind::<BigInt, _>(account.get())
    .bind::<Nullable<Text>, _>(status.map(HoldStatus::as_str))
    .bind::<BigInt, _>(after.map_or(0, HoldId::get))
    .bind::<BigInt, _>(limit)
    .load(conn)?;
    Ok(rows.into_iter().map(Hold::from).collect())
}

/// Locks up to `limit` pending holds whose timeout has passed, the earliest first,
/// skipping the ones another transaction holds (a post in progress, another expiry
/// round): from the head of the partial index `holds_due_idx`.
pub(super) fn lock_due(tx: &mut Tx<'_>, limit: usize) -> Result<Vec<Hold>, LedgerError> {
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT {COLUMNS} FROM holds
         WHERE status = 'pending' AND expires_at IS NOT NULL AND expires_at <= clock_timestamp()
         ORDER BY expires_at, id LIMIT $1 FOR UPDATE SKIP LOCKED"
    ))
    .bind::<BigInt, _>(limit as i64)
    .load(tx.conn())?;
    Ok(rows.into_iter().map(Hold::from).collect())
}

/// Writes a pending hold whose amount `entry` moved into holds-pending. Its deadline is
/// the database's clock plus the timeout.
pub(super) fn insert(tx: &mut Tx<'_>, req: &HoldRequest, entry: EntryId) -> Result<HoldId, LedgerError> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: HoldId,
    }
    let timeout_ms = req.timeout.map(|t| i64::try_from(t.as_ms()).expect("a timeout is at most 366 days"));
    let row: Id = diesel::sql_query(
        "INSERT INTO holds (payer_id, payee_id, currency, amount_minor, expires_at, idempotency_key, hold_entry_id)
         VALUES ($1, $2, $3, $4, clock_timestamp() + $5::float8 * interval '1 millisecond', $6, $7)
         RETURNING id",
    )
    .bind::<BigInt, _>(req.from.get())
    .bind::<BigInt, _>(req.to.get())
    .bind::<Text, _>(req.amount.currency().code())
    .bind::<BigInt, _>(req.amount.minor())
    .bind::<Nullable<BigInt>, _>(timeout_ms)
    .bind::<Text, _>(req.key.as_str())
    .bind::<BigInt, _>(entry.get())
    .get_result(tx.conn())?;
    Ok(row.id)
}

/// Records the resolution of a hold this transaction has locked and found pending.
pub(super) fn finish(tx: &mut Tx<'_>, id: HoldId, r: &Resolution, entry: EntryId) -> Result<(), LedgerError> {
    let updated = diesel::sql_query(
        "UPDATE holds SET status = $2, posted_minor = $3, resolution_entry_id = $4, finished_at = clock_timestamp()
         WHERE id = $1 AND status = 'pending'",
    )
    .bind::<BigInt, _>(id.get())
    .bind::<Text, _>(r.status)
    .bind::<BigInt, _>(r.posted_minor)
    .bind::<BigInt, _>(entry.get())
    .execute(tx.conn())?;
    assert_eq!(updated, 1, "a hold is finished only under its row lock, while pending");
    Ok(())
}

/// The sums of the pending holds from `account` (debits) and to it (credits), each
/// from its partial index.
pub(super) fn pending_sums(conn: &mut PgConnection, account: AccountId) -> Result<(i64, i64), LedgerError> {
    #[derive(QueryableByName)]
    struct Sums {
        #[diesel(sql_type = BigInt)]
        debits_minor: i64,
        #[diesel(sql_type = BigInt)]
        credits_minor: i64,
    }
    let sums: Sums = diesel::sql_query(
        "SELECT (SELECT COALESCE(SUM(amount_minor), 0) FROM holds
                  WHERE payer_id = $1 AND status = 'pending')::bigint AS debits_minor,
                (SELECT COALESCE(SUM(amount_minor), 0) FROM holds
                  WHERE payee_id = $1 AND status = 'pending')::bigint AS credits_minor",
    )
    .bind::<BigInt, _>(account.get())
    .get_result(conn)?;
    Ok((sums.debits_minor, sums.credits_minor))
}
