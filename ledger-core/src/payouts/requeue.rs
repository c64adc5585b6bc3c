//! Putting claimed payouts back in the queue, set-based: a batch's unsent claims are
//! released, and its unknown outcomes rescheduled (or failed), each group in one
//! statement however many payouts it holds. One `UPDATE` per payout cost a round trip
//! and a run of the payouts' statement triggers each: a batch worker that could not hand
//! its claims over under overload once released 14,397 payouts one by one.
//!
//! The rows are locked, and their claims checked current, by the caller
//! ([`super::record_all_tx`]); each statement checks it touched every row it was given.

use super::*;
use crate::prepared::{Prepared, StaticSql};

/// Claims no call was made under: due again at once, and the claim does not count as an
/// attempt. `possibly_sent` stays set only if it was and this claim says so too.
enum ReleaseAll {}

impl StaticSql for ReleaseAll {
    const SQL: &'static str = "UPDATE payouts p
        SET attempts = p.attempts - 1, claim_token = NULL, possibly_sent = p.possibly_sent AND r.possibly_sent,
            next_attempt_at = now(), updated_at = now()
        FROM unnest($1::bigint[], $2::bool[]) AS r(id, possibly_sent)
        WHERE p.id = r.id";
}

/// Unknown outcomes with attempts left: due again after their backoff, and never before
/// the claim's lease ends (a call that timed out may still be at work in the gateway,
/// and the next call, a lookup, must not overlap it). A refused credential (`uncount`
/// 1) gives its attempt back: the payout waits for the credentials to be fixed.
enum RescheduleAll {}

impl StaticSql for RescheduleAll {
    const SQL: &'static str = "UPDATE payouts p
        SET last_error = r.error, updated_at = now(), claim_token = NULL, attempts = p.attempts - r.uncount,
            next_attempt_at = GREATEST(p.next_attempt_at, now() + make_interval(secs => r.wait_ms::float8 / 1000))
        FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::int[]) AS r(id, error, wait_ms, uncount)
        WHERE p.id = r.id";
}

/// Unknown outcomes whose attempts are used up: `failed`, for an operator. The last
/// claim's token stays: an operator's return compares it to see that no call went out
/// since its lookup.
enum FailAll {}

impl StaticSql for FailAll {
    const SQL: &'static str = "UPDATE payouts p
        SET status = $3, last_error = r.error, updated_at = now()
        FROM unnest($1::bigint[], $2::text[]) AS r(id, error)
        WHERE p.id = r.id";
}

/// Releases claims no call was made under: `(payout, this claim's possibly_sent)`.
pub(super) fn release_all(tx: &mut Tx<'_>, released: &[(&Payout, bool)]) -> Result<(), LedgerError> {
    if released.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = released.iter().map(|(p, _)| p.id.get()).collect();
    let sent: Vec<bool> = released.iter().map(|(_, s)| *s).collect();
    let n = Prepared::<ReleaseAll>::new()
        .bind::<Array<BigInt>, _>(&ids)
        .bind::<Array<Bool>, _>(&sent)
        .execute(tx.conn())?;
    touched_all("releasing", n, ids.len())
}

/// An unknown outcome to put back: the payout, the error, and whether it uses up an
/// attempt (a refused credential does not).
pub(super) type UnknownOutcome<'a> = (&'a Payout, &'a str, bool);

/// Reschedules unknown outcomes after a backoff, or fails those whose attempts are used
/// up; one result per outcome, in order: [`Recorded::Retrying`] or [`Recorded::Failed`].
pub(super) fn reschedule_all(
    tx: &mut Tx<'_>,
    unknown: &[UnknownOutcome<'_>],
    policy: &RetryPolicy,
) -> Result<Vec<Recorded>, LedgerError> {
    let max_attempts = i32::try_from(policy.max_attempts).unwrap_or(i32::MAX);
    let mut failed: (Vec<i64>, Vec<String>) = Default::default();
    let mut retrying: (Vec<i64>, Vec<String>, Vec<i64>, Vec<i32>) = Default::default();
    let mut results = Vec::with_capacity(unknown.len());
    for &(p, error, counts) in unknown {
        let error = stored_text(error, STORED_TEXT_MAX_CHARS);
        if counts && p.attempts >= max_attempts {
            failed.0.push(p.id.get());
            failed.1.push(error);
            results.push(Recorded::Failed);
        } else {
            let wait_ms = policy.backoff.delay(u32::try_from(p.attempts).unwrap_or(0)).as_millis();
            retrying.0.push(p.id.get());
            retrying.1.push(error);
            retrying.2.push(i64::try_from(wait_ms).unwrap_or(i64::MAX));
            retrying.3.push(i32::from(!counts));
            results.push(Recorded::Retrying);
        }
    }
    if !failed.0.is_empty() {
        let n = Prepared::<FailAll>::new()
            .bind::<Array<BigInt>, _>(&failed.0)
            .bind::<Array<Text>, _>(&failed.1)
            .bind::<Text, _>(PayoutStatus::Failed.as_str())
            .execute(tx.conn())?;
        touched_all("failing", n, failed.0.len())?;
    }
    if !retrying.0.is_empty() {
        let n = Prepared::<RescheduleAll>::new()
            .bind::<Array<BigInt>, _>(&retrying.0)
            .bind::<Array<Text>, _>(&retrying.1)
            .bind::<Array<BigInt>, _>(&retrying.2)
            .bind::<Array<Integer>, _>(&retrying.3)
            .execute(tx.conn())?;
        touched_all("rescheduling", n, retrying.0.len())?;
    }
    Ok(results)
}

/// A statement over locked, current payouts must touch each of them once; anything else
/// rolls the transaction back.
fn touched_all(what: &str, updated: usize, asked: usize) -> Result<(), LedgerError> {
    if updated == asked {
        return Ok(());
    }
    Err(LedgerError::Inconsistent(format!("{what} {asked} locked payout(s) updated {updated}")))
}
