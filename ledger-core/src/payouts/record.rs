//! Recording verdicts: settle, return, retry, fail, release, or drop a superseded
//! answer, each only under the claim's current token, a batch in one transaction.

use super::requeue;
use super::*;
use crate::prepared::{Prepared, StaticSql};

/// Settles the payouts paid in one round (`settle.sql`), kept prepared on each
/// connection.
pub(crate) enum SettleAll {}

impl StaticSql for SettleAll {
    const SQL: &'static str = include_str!("settle.sql");
}

/// A claimed payout and the verdict on it.
pub type Judged = (PayoutRequest, Verdict);

/// Records a batch of verdicts in one transaction (see [`record_all_with`]).
pub type RecordBatch<'a> = dyn FnMut(&[Judged]) -> Result<Vec<Recorded>, LedgerError> + 'a;

/// What recording did with one verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Paid: the payout is settled and its withdrawal completed.
    Settled,
    /// Refused by the gateway: the money went back to the customer.
    Returned {
        /// The journal entry that moved it back.
        entry: EntryId,
    },
    /// Will be tried again after a backoff (a lookup first).
    Retrying,
    /// Retries exhausted: an operator must retry it or return it (after a lookup).
    Failed,
    /// The claim was given back; due again at once.
    Released,
    /// The claim is no longer current (its token was superseded by a newer claim, or an
    /// operator acted): nothing recorded. A later claim looks the payout up.
    Superseded,
    /// The verdict could not be recorded (inconsistent data): the payout was set
    /// `failed` with the error, for an operator.
    Unrecordable {
        /// What was wrong, as stored on the payout.
        error: String,
    },
}

/// Backoff and retry limits for unknown gateway outcomes ([`RetryPolicy::PAYOUTS`] by
/// default): the one retry policy of the crate.
pub use crate::retry::RetryPolicy;

/// Records one verdict in its own transaction (see [`record_all`]).
pub fn record(
    conn: &mut PgConnection,
    request: &PayoutRequest,
    verdict: &Verdict,
    policy: &RetryPolicy,
) -> Result<Recorded, LedgerError> {
    let mut out = record_all(conn, &[(request.clone(), verdict.clone())], policy)?;
    Ok(out.pop().expect("one result per verdict"))
}

/// Records a claim's verdicts in one transaction, each only under its current token:
/// the paid are settled in one statement, the refused returned (customer accounts
/// locked in ascending id order), the unknown rescheduled, the unsent released. See
/// [`record_all_with`] for what happens when that transaction fails.
pub fn record_all(
    conn: &mut PgConnection,
    verdicts: &[(PayoutRequest, Verdict)],
    policy: &RetryPolicy,
) -> Result<Vec<Recorded>, LedgerError> {
    let conn = std::cell::RefCell::new(conn);
    record_all_with(
        verdicts,
        &mut |batch| {
            tx::transaction(&mut conn.borrow_mut(), &TxOptions::default(), |tx| record_all_tx(tx, batch, policy))
        },
        &mut |request, error| {
            tx::transaction(&mut conn.borrow_mut(), &TxOptions::default(), |tx| mark_unrecordable(tx, request, error))
        },
    )
}

/// Records `verdicts` with `record` (which runs [`record_all_tx`] in a transaction of
/// the caller's making). If the batch fails for a reason that is not transient, each
/// verdict is recorded alone, so the payout to blame fails alone; one that still cannot
/// be recorded is set `failed` by `give_up` with the error (an operator's case: it is
/// never refunded without a lookup), instead of being claimed and failing forever.
pub fn record_all_with(
    verdicts: &[(PayoutRequest, Verdict)],
    record: &mut RecordBatch<'_>,
    give_up: &mut dyn FnMut(&PayoutRequest, &str) -> Result<bool, LedgerError>,
) -> Result<Vec<Recorded>, LedgerError> {
    match record(verdicts) {
        Ok(done) => return Ok(done),
        Err(e) if e.is_transient() || matches!(e, LedgerError::RetriesExhausted { .. }) => return Err(e),
        Err(_) => {}
    }
    let mut out = Vec::with_capacity(verdicts.len());
    for one in verdicts {
        match record(std::slice::from_ref(one)) {
            Ok(mut done) => out.push(done.pop().expect("one result per verdict")),
            // Only data that cannot be recorded gives up; anything else (a timeout, a
            // cancelled statement, an overloaded server) leaves the claim to its lease.
            Err(e) if !is_data_error(&e) => return Err(e),
            Err(e) => {
                let error = format!("could not record {:?}: {e}", one.1);
                out.push(if give_up(&one.0, &error)? {
                    Recorded::Unrecordable { error }
                } else {
                    Recorded::Superseded
                });
            }
        }
    }
    Ok(out)
}

/// Errors that say the stored data (or the gateway's text) cannot take this verdict, as
/// opposed to the database failing to run it.
fn is_data_error(e: &LedgerError) -> bool {
    match e {
        LedgerError::Inconsistent(_) | LedgerError::BalanceOverflow(_) => true,
        LedgerError::Database(_) => e.sqlstate().is_some_and(|s| matches!(s.class(), "22" | "23")),
        _ => false,
    }
}

/// Sets a payout whose verdict cannot be recorded `failed`, with why, if its claim is
/// still current. Returns whether it did.
pub fn mark_unrecordable(tx: &mut Tx<'_>, request: &PayoutRequest, error: &str) -> Result<bool, LedgerError> {
    let n = diesel::update(
        payouts::table
            .find(request.payout.get())
            .filter(payouts::status.eq(PayoutStatus::Pending.as_str()))
            .filter(payouts::claim_token.eq(request.token)),
    )
    .set((
        payouts::status.eq(PayoutStatus::Failed.as_str()),
        payouts::last_error.eq(Some(stored_text(error, STORED_TEXT_MAX_CHARS))),
        payouts::updated_at.eq(diesel::dsl::now),
    ))
    .execute(tx.conn())?;
    Ok(n == 1)
}

/// [`record_all`] inside the caller's transaction: every verdict recorded under its
/// claim token, one result per verdict in order.
pub fn record_all_tx(
    tx: &mut Tx<'_>,
    verdicts: &[(PayoutRequest, Verdict)],
    policy: &RetryPolicy,
) -> Result<Vec<Recorded>, LedgerError> {
    tx::with_batch_plans(tx, |tx| record_all_planned(tx, verdicts, policy))
}

fn record_all_planned(
    tx: &mut Tx<'_>,
    verdicts: &[(PayoutRequest, Verdict)],
    policy: &RetryPolicy,
) -> Result<Vec<Recorded>, LedgerError> {
    let mut ids: Vec<i64> = verdicts.iter().map(|(r, _)| r.payout.get()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), verdicts.len(), "one verdict per payout");
    // Payout rows first, in id order (the same order every recorder uses).
    let current: Vec<Payout> = payouts::table
        .filter(payouts::id.eq_any(&ids))
        .order(payouts::id)
        .select(Payout::as_select())
        .for_no_key_update()
        .load(tx.conn())?;
    let current: HashMap<PayoutId, Payout> = current.into_iter().map(|p| (p.id, p)).collect();
    let mut results = vec![Recorded::Superseded; verdicts.len()];
    let mut paid = Vec::new();
    let mut refused = Vec::new();
    let mut unknown = Vec::new();
    let mut released = Vec::new();
    for (i, (request, verdict)) in verdicts.iter().enumerate() {
        let Some(p) = current.get(&request.payout) else { continue };
        if p.status != PayoutStatus::Pending || p.claim_token != Some(request.token) {
            continue; // superseded: a newer claim (or an operator) owns it now
        }
        match verdict {
            Verdict::Paid { reference } => paid.push((i, p, reference.as_deref())),
            Verdict::Refused { reason } => refused.push((i, p, reason.as_str())),
            Verdict::Unknown { error } => unknown.push((i, p, error.as_str(), true)),
            Verdict::Unauthorized { error } => unknown.push((i, p, error.as_str(), false)),
            Verdict::NotSent => released.push((i, p, request.possibly_sent)),
        }
    }
    if !paid.is_empty() {
        settle_all(tx, &paid)?;
        for (i, _, _) in &paid {
            results[*i] = Recorded::Settled;
        }
    }
    // Customer accounts in ascending id order, like every multi-row lock.
    refused.sort_by_key(|(_, p, _)| (p.account_id, p.id));
    for (i, p, reason) in refused {
        results[i] = Recorded::Returned { entry: return_tx(tx, p, reason, None)? };
    }
    let (unknown_at, unknown): (Vec<usize>, Vec<_>) = unknown.into_iter().map(|(i, p, e, c)| (i, (p, e, c))).unzip();
    let rescheduled = requeue::reschedule_all(tx, &unknown, policy)?;
    assert_eq!(rescheduled.len(), unknown_at.len(), "one result per unknown outcome");
    for (i, recorded) in unknown_at.into_iter().zip(rescheduled) {
        results[i] = recorded;
    }
    requeue::release_all(tx, &released.iter().map(|&(_, p, sent)| (p, sent)).collect::<Vec<_>>())?;
    for (i, _, _) in released {
        results[i] = Recorded::Released;
    }
    Ok(results)
}

pub(super) fn system(tx: &mut Tx<'_>, role: SystemRole, currency: Currency) -> Result<AccountId, LedgerError> {
    accounts::system_account(tx.conn(), role, currency)
}

pub(super) fn set_withdrawal(
    tx: &mut Tx<'_>,
    withdrawal: i64,
    status: WithdrawalStatus,
    reason: Option<&str>,
) -> Result<(), LedgerError> {
    let updated = diesel::update(
        withdrawals::table.find(withdrawal).filter(withdrawals::status.eq(WithdrawalStatus::PayingOut.as_str())),
    )
    .set((withdrawals::status.eq(status.as_str()), withdrawals::reason.eq(reason)))
    .execute(tx.conn())?;
    if updated != 1 {
        return Err(LedgerError::Inconsistent(format!(
            "withdrawal {withdrawal} of a pending payout is not paying out"
        )));
    }
    Ok(())
}

/// Phase 2, accepted, for many payouts in one statement: one settlement entry per
/// currency moves the batch's total from payouts-in-transit to external settlement
/// (the money left together, and one entry per batch instead of one per payout keeps a
/// settlement's cost off the debit's); each payout points at its entry
/// (`resolution_entry_id`), is settled, and its withdrawal completed. The audit checks
/// that every settlement entry moves exactly the sum of the payouts that point at it.
/// The rows are locked and their tokens checked already.
pub(super) fn settle_all(tx: &mut Tx<'_>, paid: &[(usize, &Payout, Option<&str>)]) -> Result<(), LedgerError> {
    #[derive(QueryableByName)]
    struct Settled {
        #[diesel(sql_type = BigInt)]
        entries: i64,
        #[diesel(sql_type = BigInt)]
        postings: i64,
        #[diesel(sql_type = BigInt)]
        payouts: i64,
        #[diesel(sql_type = BigInt)]
        withdrawals: i64,
    }
    let ids: Vec<i64> = paid.iter().map(|(_, p, _)| p.id.get()).collect();
    let references: Vec<Option<String>> = paid.iter().map(|(_, _, r)| r.map(|r| stored_text(r, 200))).collect();
    let currencies: std::collections::BTreeSet<&str> = paid.iter().map(|(_, p, _)| p.currency.code()).collect();
    let done: Settled = Prepared::<SettleAll>::new()
        .bind::<Array<BigInt>, _>(&ids)
        .bind::<Array<Nullable<Text>>, _>(&references)
        .get_result(tx.conn())?;
    // Pair what the statement did with what was asked. A mismatch (a withdrawal that is
    // not paying out) is an error, so the transaction rolls back whole.
    let n = ids.len() as i64;
    let c = currencies.len() as i64;
    if (done.entries, done.postings, done.payouts, done.withdrawals) != (c, 2 * c, n, n) {
        return Err(LedgerError::Inconsistent(format!(
            "settling {n} payout(s) in {c} currenc(ies) wrote {} entries, {} postings, {} payouts and {} withdrawals",
            done.entries, done.postings, done.payouts, done.withdrawals
        )));
    }
    Ok(())
}
