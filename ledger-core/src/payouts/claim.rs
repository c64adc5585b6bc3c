//! Claiming due payouts from the table: a fencing token and a lease each, in one
//! statement.

use super::*;
use crate::prepared::{Prepared, StaticSql};

#[derive(QueryableByName)]
struct ClaimedRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    withdrawal_id: i64,
    #[diesel(sql_type = Text)]
    currency: String,
    #[diesel(sql_type = BigInt)]
    amount_minor: i64,
    #[diesel(sql_type = Text)]
    destination: String,
    #[diesel(sql_type = Text)]
    idempotency_key: String,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = BigInt)]
    claim_token: i64,
    #[diesel(sql_type = Bool)]
    was_possibly_sent: bool,
    /// What was left of the lease while the statement ran (server clock).
    #[diesel(sql_type = diesel::sql_types::Double)]
    lease_left_ms: f64,
}

/// Claims up to `limit` due payouts in one statement: each gets a new fencing token and
/// a lease (not due again for `lease_ms`), and is marked possibly sent before any call.
/// Commits before returning, so no transaction is open while the caller calls out.
///
/// The claim's `lease_until` is the moment the statement was sent plus what the server
/// still had left of the lease while it ran: it ends no later than the database's lease,
/// even when called inside a longer transaction (whose `now()` is older).
pub fn claim_due(conn: &mut PgConnection, limit: i64, lease_ms: u64) -> Result<Claim, LedgerError> {
    assert!(limit > 0, "claim at least one payout");
    let mut sent_at = Instant::now();
    let rows: Vec<ClaimedRow> = tx::transaction(conn, &TxOptions::default(), |tx| {
        tx::with_batch_plans(tx, |tx| {
            sent_at = Instant::now();
            Prepared::<ClaimDue>::new()
                .bind::<BigInt, _>(limit)
                .bind::<BigInt, _>(i64::try_from(lease_ms).unwrap_or(i64::MAX))
                .load(tx.conn())
                .map_err(LedgerError::from)
        })
    })?;
    let lease_left = rows.iter().map(|r| r.lease_left_ms).fold(f64::INFINITY, f64::min);
    let lease_until = if lease_left.is_finite() {
        sent_at + Duration::from_millis(lease_left.max(0.0).floor() as u64)
    } else {
        sent_at // nothing claimed
    };
    let requests = rows
        .into_iter()
        .map(|r| {
            let currency = Currency::from_code(&r.currency)?;
            Ok(PayoutRequest {
                payout: PayoutId::from_db(r.id),
                withdrawal: WithdrawalId::from_db(r.withdrawal_id),
                amount_minor: r.amount_minor,
                amount: currency.format_minor(r.amount_minor),
                currency: r.currency,
                destination: r.destination,
                idempotency_key: r.idempotency_key,
                attempt: r.attempts,
                token: r.claim_token,
                possibly_sent: r.was_possibly_sent,
            })
        })
        .collect::<Result<Vec<_>, LedgerError>>()?;
    debug_assert!(lease_until <= sent_at + Duration::from_millis(lease_ms));
    Ok(Claim { requests, lease_until })
}

/// Claims due payouts: a new fencing token each, *possibly sent*, and a lease of $2 ms.
/// Kept prepared on each connection (it runs on every poll of every dispatcher).
enum ClaimDue {}

impl StaticSql for ClaimDue {
    const SQL: &'static str = "WITH due AS (
         SELECT id, possibly_sent FROM payouts
         WHERE status = 'pending' AND next_attempt_at <= now()
         ORDER BY next_attempt_at, id LIMIT $1
         FOR UPDATE SKIP LOCKED
     )
     UPDATE payouts p SET attempts = p.attempts + 1, updated_at = now(),
         claim_token = nextval('payout_claim_tokens'), possibly_sent = true,
         next_attempt_at = now() + make_interval(secs => $2::float8 / 1000)
     FROM due WHERE p.id = due.id
     RETURNING p.id, p.withdrawal_id, p.currency, p.amount_minor, p.destination, p.idempotency_key,
               p.attempts, p.claim_token, due.possibly_sent AS was_possibly_sent,
               (EXTRACT(EPOCH FROM p.next_attempt_at - clock_timestamp()) * 1000)::float8 AS lease_left_ms";
}
