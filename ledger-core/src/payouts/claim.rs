//! Claiming due payouts from the table: a fencing token and a lease each, in one
//! statement.

use super::*;

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
}

/// Claims up to `limit` due payouts in one statement: each gets a new fencing token and
/// a lease (not due again for `lease_ms`), and is marked possibly sent before any call.
/// Commits before returning, so no transaction is open while the caller calls out.
pub fn claim_due(conn: &mut PgConnection, limit: i64, lease_ms: u64) -> Result<Claim, LedgerError> {
    assert!(limit > 0, "claim at least one payout");
    let asked_at = Instant::now();
    let rows: Vec<ClaimedRow> = tx::transaction(conn, &TxOptions::default(), |tx| {
        tx::with_batch_plans(tx, |tx| {
            diesel::sql_query(
                "WITH due AS (
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
                       p.attempts, p.claim_token, due.possibly_sent AS was_possibly_sent",
            )
            .bind::<BigInt, _>(limit)
            .bind::<BigInt, _>(i64::try_from(lease_ms).unwrap_or(i64::MAX))
            .load(tx.conn())
            .map_err(LedgerError::from)
        })
    })?;
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
    Ok(Claim { requests, lease_until: asked_at + Duration::from_millis(lease_ms) })
}
