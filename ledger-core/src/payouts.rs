//! The payout outbox and its two-phase settlement.
//!
//! Phase 1 (in the withdrawal's transaction): the customer is debited into the
//! payouts-in-transit account and a `pending` payout row is written. Money can only
//! leave through such a committed row.
//!
//! Phase 2 (the dispatcher, after commit, see [`crate::dispatcher`]): due payouts are
//! claimed in one statement, each under a fencing token from a sequence (never reused)
//! and a lease; the gateway is called with **no database transaction open** and the
//! payout's idempotency key; [`resolve`] turns the answers into one [`Verdict`] per
//! payout, and [`record_all`] records them in one transaction, each only under its
//! current token:
//! - paid (an unambiguous yes): in-transit -> external settlement; withdrawal `completed`;
//! - refused (an unambiguous no to a first call, or a lookup that confirms it): a
//!   compensating entry returns the funds; withdrawal `returned` with the reason;
//! - unknown (anything else): tried again after a jittered backoff, a lookup first;
//!   after the limit the payout is `failed` and waits for an operator, who can return
//!   it only after a lookup (or forced, recorded as such).
//!
//! Money leaves only on an unambiguous yes, and is returned only on an unambiguous no:
//! a payout that may have reached the gateway (`possibly_sent`, set at claim time,
//! before any call) is never refunded on the strength of a later 4xx alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};

use crate::accounts::{self, SystemRole};
use crate::error::{InvalidInput, LedgerError};
use crate::ids::{AccountId, EntryId, PayoutId, WithdrawalId};
use crate::journal::{self, EntryKind, Leg};
use crate::money::{Amount, Currency};
use crate::schema::{ledger_instance, payouts, withdrawals};
use crate::tx::{self, Tx, TxOptions};
use crate::withdrawals::WithdrawalStatus;

pub use crate::outbox::{Claim, PayoutRequest};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayoutStatus {
    Pending,
    Settled,
    Returned,
    Failed,
}

impl PayoutStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PayoutStatus::Pending => "pending",
            PayoutStatus::Settled => "settled",
            PayoutStatus::Returned => "returned",
            PayoutStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<PayoutStatus> {
        [PayoutStatus::Pending, PayoutStatus::Settled, PayoutStatus::Returned, PayoutStatus::Failed]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = payouts, check_for_backend(diesel::pg::Pg))]
pub struct Payout {
    pub id: i64,
    pub withdrawal_id: i64,
    pub account_id: i64,
    pub currency: String,
    pub amount_minor: i64,
    pub destination: String,
    pub idempotency_key: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub gateway_reference: Option<String>,
    /// The fencing token of the current claim (None when nobody holds it).
    pub claim_token: Option<i64>,
    /// A call may have reached the gateway without our recording its answer.
    pub possibly_sent: bool,
    /// Set when an operator returned the payout without a confirming lookup.
    pub forced_return_reason: Option<String>,
    /// The entry that settled or returned it. Payouts settled in one recording
    /// transaction share one settlement entry (per currency), which moves their sum.
    pub resolution_entry_id: Option<i64>,
}

impl Payout {
    pub fn status(&self) -> PayoutStatus {
        PayoutStatus::parse(&self.status).expect("the status CHECK constraint limits the values")
    }
}

/// This ledger's instance id (random, made once by `migrate`); part of every new
/// payout's gateway key (see the `ledger_payout_key` SQL function, the one place a key
/// is made).
pub fn instance_id(conn: &mut PgConnection) -> Result<String, LedgerError> {
    Ok(ledger_instance::table.select(ledger_instance::instance_id).first(conn)?)
}

/// Gives this ledger a new random instance id, for a database restored from a backup or
/// cloned from another: its new payouts' keys then differ from every key the original
/// sent, although withdrawal ids repeat. Payouts already queued keep their stored keys.
///
/// Payouts still open in such a copy may have been sent by the original after the copy
/// was taken: they are all marked possibly sent, so each is looked up before anything
/// else is done with it.
pub fn renew_instance_id(conn: &mut PgConnection) -> Result<String, LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| {
        diesel::update(
            payouts::table
                .filter(payouts::status.eq_any([PayoutStatus::Pending.as_str(), PayoutStatus::Failed.as_str()])),
        )
        .set(payouts::possibly_sent.eq(true))
        .execute(tx.conn())?;
        Ok(diesel::update(ledger_instance::table)
            .set(ledger_instance::instance_id.eq(diesel::dsl::sql::<Text>("replace(gen_random_uuid()::text, '-', '')")))
            .returning(ledger_instance::instance_id)
            .get_result(tx.conn())?)
    })
}

pub fn get(conn: &mut PgConnection, id: PayoutId) -> Result<Payout, LedgerError> {
    payouts::table.find(id.get()).select(Payout::as_select()).first(conn).optional()?.ok_or_else(|| {
        LedgerError::Invalid(InvalidInput::BadField { field: "payout", reason: format!("no payout {id}") })
    })
}

pub fn for_withdrawal(conn: &mut PgConnection, withdrawal: WithdrawalId) -> Result<Option<Payout>, LedgerError> {
    Ok(payouts::table
        .filter(payouts::withdrawal_id.eq(withdrawal.get()))
        .select(Payout::as_select())
        .first(conn)
        .optional()?)
}

/// Payouts, newest first, optionally by status.
pub fn list(conn: &mut PgConnection, status: Option<PayoutStatus>, limit: i64) -> Result<Vec<Payout>, LedgerError> {
    let mut query = payouts::table.select(Payout::as_select()).order(payouts::id.desc()).limit(limit).into_boxed();
    if let Some(s) = status {
        query = query.filter(payouts::status.eq(s.as_str()));
    }
    Ok(query.load(conn)?)
}

/// The answer to a payout's POST, read under the gateway's contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Unambiguously paid.
    Accepted { reference: Option<String> },
    /// Unambiguously refused (for example the bank refuses the account).
    Rejected { reason: String },
    /// Anything else: timeout, connection lost, 5xx, a redirect, a body we don't expect.
    /// It may have been paid: find out before acting.
    Unknown { error: String },
    /// Our credentials were refused (401/403). Says nothing about the payout.
    Unauthorized { error: String },
}

/// The answer to a lookup of an earlier call by its idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupOutcome {
    Accepted {
        reference: Option<String>,
    },
    Rejected {
        reason: String,
    },
    /// The gateway never received a call with this key.
    NotFound,
    Unknown {
        error: String,
    },
    Unauthorized {
        error: String,
    },
}

/// Sends money out, and answers what became of an earlier call. Implementations must
/// be idempotent per `idempotency_key` or sit in front of a service that is. Called
/// with no database transaction open.
pub trait PayoutGateway: Send + Sync {
    fn send(&self, request: &PayoutRequest) -> SendOutcome;
    fn lookup(&self, request: &PayoutRequest) -> LookupOutcome;
}

/// What this claim learnt about one payout: the single decision the recording acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Settle.
    Paid { reference: Option<String> },
    /// Return the funds (a first call refused, or a lookup confirmed it).
    Refused { reason: String },
    /// Not known: try again later (a lookup comes first next time).
    Unknown { error: String },
    /// Our credentials were refused: nothing is known; the dispatcher stops.
    Unauthorized { error: String },
    /// No call sent money in this claim (no time left in the lease, or shutting down):
    /// give the claim back.
    NotSent,
}

/// Decides one claimed payout by calling the gateway: the whole protocol, in one place.
///
/// - never sent before: POST. Accepted -> Paid; Rejected -> Refused (a first call's
///   refusal is final); anything else -> Unknown.
/// - possibly sent before: look it up first. Accepted -> Paid; Rejected -> Refused;
///   NotFound -> POST, and a refusal of that POST is believed only after a second
///   lookup says rejected or not found (the earlier call may still have landed).
///
/// `may_call` is asked before every call; it says whether the lease leaves room for
/// one more call to finish. A payout whose POST was never made comes back `NotSent`.
pub fn resolve(gateway: &dyn PayoutGateway, request: &PayoutRequest, may_call: &dyn Fn() -> bool) -> Verdict {
    if request.possibly_sent {
        if !may_call() {
            return Verdict::NotSent;
        }
        match gateway.lookup(request) {
            LookupOutcome::Accepted { reference } => return Verdict::Paid { reference },
            LookupOutcome::Rejected { reason } => return Verdict::Refused { reason },
            LookupOutcome::Unknown { error } => return Verdict::Unknown { error: format!("lookup: {error}") },
            LookupOutcome::Unauthorized { error } => return Verdict::Unauthorized { error },
            LookupOutcome::NotFound => {}
        }
    }
    if !may_call() {
        return Verdict::NotSent;
    }
    match gateway.send(request) {
        SendOutcome::Accepted { reference } => Verdict::Paid { reference },
        SendOutcome::Unknown { error } => Verdict::Unknown { error },
        SendOutcome::Unauthorized { error } => Verdict::Unauthorized { error },
        SendOutcome::Rejected { reason } if !request.possibly_sent => Verdict::Refused { reason },
        SendOutcome::Rejected { reason } => {
            // A replay of a key an earlier call paid may be answered with a 4xx: ask.
            if !may_call() {
                return Verdict::Unknown { error: format!("refused ({reason}), not yet confirmed by a lookup") };
            }
            match gateway.lookup(request) {
                LookupOutcome::Rejected { reason: confirmed } => Verdict::Refused { reason: confirmed },
                LookupOutcome::NotFound => Verdict::Refused { reason },
                LookupOutcome::Accepted { reference } => Verdict::Paid { reference },
                LookupOutcome::Unknown { error } => {
                    Verdict::Unknown { error: format!("refused ({reason}), lookup unclear: {error}") }
                }
                LookupOutcome::Unauthorized { error } => Verdict::Unauthorized { error },
            }
        }
    }
}

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

/// A claimed payout and the verdict on it.
pub type Judged = (PayoutRequest, Verdict);

/// Records a batch of verdicts in one transaction (see [`record_all_with`]).
pub type RecordBatch<'a> = dyn FnMut(&[Judged]) -> Result<Vec<Recorded>, LedgerError> + 'a;

/// What recording did with one verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    Settled,
    Returned {
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
        error: String,
    },
}

/// Backoff and retry limits for unknown gateway outcomes.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 12, base_ms: 200, max_backoff_ms: 60_000 }
    }
}

impl RetryPolicy {
    /// Jittered exponential backoff before attempt `attempts + 1`.
    pub fn backoff_ms(&self, attempts: i32) -> u64 {
        let exp = self.base_ms.saturating_mul(1_u64 << attempts.clamp(0, 30));
        let ceiling = exp.min(self.max_backoff_ms).max(1);
        fastrand::u64(ceiling / 2..=ceiling)
    }
}

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
        payouts::last_error.eq(Some(db_text(error, 500))),
        payouts::updated_at.eq(diesel::dsl::now),
    ))
    .execute(tx.conn())?;
    Ok(n == 1)
}

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
    let current: HashMap<i64, Payout> = current.into_iter().map(|p| (p.id, p)).collect();
    let mut results = vec![Recorded::Superseded; verdicts.len()];
    let mut paid = Vec::new();
    let mut refused = Vec::new();
    let mut unknown = Vec::new();
    let mut released = Vec::new();
    for (i, (request, verdict)) in verdicts.iter().enumerate() {
        let Some(p) = current.get(&request.payout.get()) else { continue };
        if p.status() != PayoutStatus::Pending || p.claim_token != Some(request.token) {
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
    for (i, p, error, counts) in unknown {
        results[i] = reschedule(tx, p, error, counts, policy)?;
    }
    for (i, p, was_possibly_sent) in released {
        let n = diesel::update(payouts::table.find(p.id))
            .set((
                // Nothing was sent: the claim does not count as an attempt.
                payouts::attempts.eq(payouts::attempts - 1),
                payouts::claim_token.eq(None::<i64>),
                payouts::possibly_sent.eq(p.possibly_sent && was_possibly_sent),
                payouts::next_attempt_at.eq(diesel::dsl::now),
                payouts::updated_at.eq(diesel::dsl::now),
            ))
            .execute(tx.conn())?;
        assert_eq!(n, 1, "a locked current payout is updated");
        results[i] = Recorded::Released;
    }
    Ok(results)
}

/// An unknown outcome: due again after a backoff (and not before the claim's lease
/// ends), or `failed` once the attempts are used up. A refused credential (`counts` false) never uses up attempts: the payout
/// waits for the credentials to be fixed.
fn reschedule(
    tx: &mut Tx<'_>,
    p: &Payout,
    error: &str,
    counts: bool,
    policy: &RetryPolicy,
) -> Result<Recorded, LedgerError> {
    let error = db_text(error, 500);
    if counts && p.attempts >= i32::try_from(policy.max_attempts).unwrap_or(i32::MAX) {
        diesel::update(payouts::table.find(p.id))
            .set((
                // The last claim's token stays: an operator's return compares it to see
                // that no call went out since its lookup.
                payouts::status.eq(PayoutStatus::Failed.as_str()),
                payouts::last_error.eq(Some(&error)),
                payouts::updated_at.eq(diesel::dsl::now),
            ))
            .execute(tx.conn())?;
        return Ok(Recorded::Failed);
    }
    let wait_ms = policy.backoff_ms(p.attempts);
    diesel::sql_query(
        "UPDATE payouts SET last_error = $2, updated_at = now(), claim_token = NULL,
             attempts = attempts - $4::int,
             -- Never before the claim's lease ends: a call that timed out may still be
             -- at work in the gateway, and the next call (a lookup) must not overlap it.
             next_attempt_at = GREATEST(next_attempt_at, now() + make_interval(secs => $3::float8 / 1000))
         WHERE id = $1",
    )
    .bind::<BigInt, _>(p.id)
    .bind::<Text, _>(&error)
    .bind::<BigInt, _>(i64::try_from(wait_ms).unwrap_or(i64::MAX))
    .bind::<Integer, _>(i32::from(!counts))
    .execute(tx.conn())?;
    Ok(Recorded::Retrying)
}

fn system(tx: &mut Tx<'_>, role: SystemRole, currency: Currency) -> Result<AccountId, LedgerError> {
    accounts::system_account(tx.conn(), role, currency)
}

fn set_withdrawal(
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

/// Text from a gateway, fit for a TEXT column: PostgreSQL refuses NUL characters (a
/// JSON string may carry one), and no field grows without bound.
fn db_text(text: &str, max_chars: usize) -> String {
    text.chars().filter(|c| *c != '\0').take(max_chars).collect()
}

/// Phase 2, accepted, for many payouts in one statement: one settlement entry per
/// currency moves the batch's total from payouts-in-transit to external settlement
/// (the money left together, and one entry per batch instead of one per payout keeps a
/// settlement's cost off the debit's); each payout points at its entry
/// (`resolution_entry_id`), is settled, and its withdrawal completed. The audit checks
/// that every settlement entry moves exactly the sum of the payouts that point at it.
/// The rows are locked and their tokens checked already.
fn settle_all(tx: &mut Tx<'_>, paid: &[(usize, &Payout, Option<&str>)]) -> Result<(), LedgerError> {
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
    let ids: Vec<i64> = paid.iter().map(|(_, p, _)| p.id).collect();
    let references: Vec<Option<String>> = paid.iter().map(|(_, _, r)| r.map(|r| db_text(r, 200))).collect();
    let currencies: std::collections::BTreeSet<&str> = paid.iter().map(|(_, p, _)| p.currency.as_str()).collect();
    let done: Settled = diesel::sql_query(
        "WITH s AS (
             SELECT x.id, x.withdrawal_id, x.currency, x.amount_minor, v.reference
             FROM unnest($1::bigint[], $2::text[]) AS v(id, reference)
             JOIN payouts x ON x.id = v.id
         ), c AS (
             -- numeric sum: a total beyond bigint fails the insert below, never wraps.
             SELECT currency, sum(amount_minor) AS total, count(*) AS n FROM s GROUP BY currency
         ), ce AS MATERIALIZED (
             -- The entry ids are drawn here, once per currency, so nothing joins back.
             SELECT c.*, nextval('journal_entries_id_seq') AS entry_id FROM c ORDER BY currency
         ), e AS (
             INSERT INTO journal_entries (id, kind, reference)
             -- The payouts it settles are those naming it (resolution_entry_id).
             SELECT entry_id, 'payout_settlement', 'payout-batch:' || currency || ':' || n
             FROM ce ORDER BY entry_id
             RETURNING id
         ), p AS (
             INSERT INTO postings (entry_id, account_id, currency, amount_minor, balance_after_minor)
             SELECT ce.entry_id, a.id, ce.currency,
                    CASE a.system_role WHEN 'payouts_in_transit' THEN -ce.total ELSE ce.total END,
                    NULL
             FROM ce JOIN accounts a
               ON a.currency = ce.currency AND a.system_role IN ('payouts_in_transit', 'external_settlement')
             ORDER BY ce.currency, a.system_role DESC
             RETURNING 1
         ), u AS (
             UPDATE payouts x SET status = 'settled', resolution_entry_id = ce.entry_id,
                 gateway_reference = s.reference, claim_token = NULL, updated_at = now()
             FROM s JOIN ce ON ce.currency = s.currency WHERE x.id = s.id
             RETURNING 1
         ), w AS (
             UPDATE withdrawals x SET status = 'completed'
             FROM s WHERE x.id = s.withdrawal_id AND x.status = 'paying_out'
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM e) AS entries, (SELECT count(*) FROM p) AS postings,
                (SELECT count(*) FROM u) AS payouts, (SELECT count(*) FROM w) AS withdrawals",
    )
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

/// Phase 2, refused: a compensating entry returns the funds to the customer, whose
/// account is locked like any other balance change; withdrawal returned with the reason.
fn return_tx(tx: &mut Tx<'_>, payout: &Payout, reason: &str, forced: Option<&str>) -> Result<EntryId, LedgerError> {
    let currency = Currency::from_code(&payout.currency)?;
    let amount = Amount::from_minor(payout.amount_minor)?;
    let in_transit = system(tx, SystemRole::PayoutsInTransit, currency)?;
    // A returned payout goes back even to a closed account: the money is the customer's.
    let customer = accounts::lock_even_if_closed(tx, AccountId::from_db(payout.account_id))?;
    let after = customer.balance_after_credit(amount)?;
    let entry_ref = format!("payout:{}", payout.id);
    let entry = journal::post(
        tx,
        EntryKind::PayoutReturn,
        Some(&entry_ref),
        currency,
        &[
            Leg { account: in_transit, amount_minor: -amount.minor(), balance_after_minor: None },
            Leg { account: customer.id(), amount_minor: amount.minor(), balance_after_minor: Some(after) },
        ],
    )?;
    accounts::set_balance(tx, &customer, after)?;
    let reason = db_text(reason, 500);
    diesel::update(payouts::table.find(payout.id))
        .set((
            payouts::status.eq(PayoutStatus::Returned.as_str()),
            payouts::resolution_entry_id.eq(Some(entry.get())),
            payouts::last_error.eq(Some(&reason)),
            payouts::claim_token.eq(None::<i64>),
            payouts::forced_return_reason.eq(forced),
            payouts::updated_at.eq(diesel::dsl::now),
        ))
        .execute(tx.conn())?;
    set_withdrawal(tx, payout.withdrawal_id, WithdrawalStatus::Returned, Some(&format!("payout returned: {reason}")))?;
    Ok(entry)
}

/// Operator: send a `failed` payout again (attempts start over).
pub fn retry(conn: &mut PgConnection, id: PayoutId) -> Result<Payout, LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| {
        let updated =
            diesel::update(payouts::table.find(id.get()).filter(payouts::status.eq(PayoutStatus::Failed.as_str())))
                .set((
                    payouts::status.eq(PayoutStatus::Pending.as_str()),
                    payouts::attempts.eq(0),
                    payouts::claim_token.eq(None::<i64>),
                    // Not before the last claim's lease ends: its call may still be at work.
                    payouts::next_attempt_at
                        .eq(diesel::dsl::sql::<diesel::sql_types::Timestamptz>("GREATEST(next_attempt_at, now())")),
                    payouts::updated_at.eq(diesel::dsl::now),
                ))
                .execute(tx.conn())?;
        if updated == 0 {
            return Err(not_failed(tx.conn(), id));
        }
        get(tx.conn(), id)
    })
}

/// How an operator's return of a `failed` payout is authorised.
#[derive(Clone, Copy)]
pub enum ReturnAuthority<'a> {
    /// Ask the gateway first (required when a call may have reached it): a lookup that
    /// says rejected or never received allows the return; one that says accepted
    /// settles the payout instead; anything else refuses to act.
    Lookup(&'a dyn PayoutGateway),
    /// Return without asking, recorded as forced with the operator's reason.
    Force { reason: &'a str },
}

/// What `return_failed` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReturnResult {
    Returned(Payout),
    /// The lookup said the gateway accepted it: settled, nothing returned.
    SettledInstead(Payout),
}

/// Operator: give up on a `failed` payout and return the funds to the customer. A
/// payout that may have reached the gateway is returned only after a lookup says it was
/// rejected or never received, or when forced (recorded as such).
pub fn return_failed(
    conn: &mut PgConnection,
    id: PayoutId,
    reason: &str,
    authority: ReturnAuthority<'_>,
) -> Result<ReturnResult, LedgerError> {
    let before = get(conn, id)?;
    if before.status() != PayoutStatus::Failed {
        return Err(not_failed_err(id, &format!("is {}", before.status)));
    }
    // Its last call may still be at work in the gateway until the claim's lease ends:
    // a lookup before then could miss a payment that lands a moment later.
    let lease_running: bool =
        payouts::table.find(id.get()).select(payouts::next_attempt_at.gt(diesel::dsl::now)).first(conn)?;
    if lease_running && matches!(authority, ReturnAuthority::Lookup(_)) && before.possibly_sent {
        return Err(LedgerError::Invalid(InvalidInput::BadField {
            field: "payout",
            reason: format!("payout {id}'s last call may still be in flight until its lease ends; try again shortly"),
        }));
    }
    // The lookup runs with no transaction open; the decision is re-checked under lock.
    let (paid, forced) = match authority {
        ReturnAuthority::Force { reason: why } => {
            if why.trim().is_empty() {
                return Err(LedgerError::Invalid(InvalidInput::BadField {
                    field: "reason",
                    reason: "a forced return needs a reason".into(),
                }));
            }
            (None, Some(why.to_string()))
        }
        ReturnAuthority::Lookup(_) if !before.possibly_sent => (None, None),
        ReturnAuthority::Lookup(gateway) => match gateway.lookup(&request_of(&before)?) {
            LookupOutcome::Rejected { .. } | LookupOutcome::NotFound => (None, None),
            LookupOutcome::Accepted { reference } => (Some(reference), None),
            LookupOutcome::Unknown { error } | LookupOutcome::Unauthorized { error } => {
                return Err(LedgerError::Invalid(InvalidInput::BadField {
                    field: "payout",
                    reason: format!(
                        "payout {id} may have been paid and the gateway's lookup was unclear ({error}); \
                         nothing returned. Retry it, or return it with --force --reason if you know it was not paid"
                    ),
                }));
            }
        },
    };
    tx::transaction(conn, &TxOptions::default(), |tx| {
        let payout: Payout = payouts::table
            .find(id.get())
            .select(Payout::as_select())
            .for_no_key_update()
            .first(tx.conn())
            .optional()?
            .ok_or_else(|| not_failed_err(id, "does not exist"))?;
        if payout.status() != PayoutStatus::Failed {
            return Err(not_failed_err(id, &format!("is {}", payout.status)));
        }
        // Claimed again since the lookup (an operator's retry, a dispatcher's call): the
        // lookup no longer speaks for it.
        if (payout.claim_token, payout.attempts) != (before.claim_token, before.attempts) {
            return Err(LedgerError::Invalid(InvalidInput::BadField {
                field: "payout",
                reason: format!("payout {id} was sent again while it was being looked up; nothing returned"),
            }));
        }
        match &paid {
            Some(reference) => {
                settle_all(tx, &[(0, &payout, reference.as_deref())])?;
                Ok(ReturnResult::SettledInstead(get(tx.conn(), id)?))
            }
            None => {
                return_tx(tx, &payout, reason, forced.as_deref())?;
                Ok(ReturnResult::Returned(get(tx.conn(), id)?))
            }
        }
    })
}

/// The request a stored payout stands for (for a lookup outside a claim).
fn request_of(p: &Payout) -> Result<PayoutRequest, LedgerError> {
    let currency = Currency::from_code(&p.currency)?;
    Ok(PayoutRequest {
        payout: PayoutId::from_db(p.id),
        withdrawal: WithdrawalId::from_db(p.withdrawal_id),
        amount_minor: p.amount_minor,
        amount: currency.format_minor(p.amount_minor),
        currency: p.currency.clone(),
        destination: p.destination.clone(),
        idempotency_key: p.idempotency_key.clone(),
        attempt: p.attempts,
        token: p.claim_token.unwrap_or(0),
        possibly_sent: p.possibly_sent,
    })
}

fn not_failed(conn: &mut PgConnection, id: PayoutId) -> LedgerError {
    match get(conn, id) {
        Ok(p) => not_failed_err(id, &format!("is {}", p.status)),
        Err(e) => e,
    }
}

fn not_failed_err(id: PayoutId, what: &str) -> LedgerError {
    LedgerError::Invalid(InvalidInput::BadField {
        field: "payout",
        reason: format!("payout {id} {what}; only a failed payout can be retried or returned"),
    })
}

/// Payouts still to send (due now or waiting for a retry or a lease).
pub fn pending_count(conn: &mut PgConnection) -> Result<i64, LedgerError> {
    Ok(payouts::table.filter(payouts::status.eq(PayoutStatus::Pending.as_str())).count().get_result(conn)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A gateway that plays back scripted answers and records the calls made.
    struct Scripted {
        sends: Mutex<Vec<SendOutcome>>,
        lookups: Mutex<Vec<LookupOutcome>>,
        calls: Mutex<Vec<&'static str>>,
    }

    impl PayoutGateway for Scripted {
        fn send(&self, _: &PayoutRequest) -> SendOutcome {
            self.calls.lock().unwrap().push("send");
            self.sends.lock().unwrap().remove(0)
        }
        fn lookup(&self, _: &PayoutRequest) -> LookupOutcome {
            self.calls.lock().unwrap().push("lookup");
            self.lookups.lock().unwrap().remove(0)
        }
    }

    fn request(possibly_sent: bool) -> PayoutRequest {
        PayoutRequest {
            payout: PayoutId::from_db(1),
            withdrawal: WithdrawalId::from_db(1),
            amount_minor: 100,
            amount: "1.00".into(),
            currency: "EUR".into(),
            destination: "DE89370400440532013000".into(),
            idempotency_key: "payout-x-w1".into(),
            attempt: 1,
            token: 1,
            possibly_sent,
        }
    }

    fn accepted() -> SendOutcome {
        SendOutcome::Accepted { reference: Some("r".into()) }
    }
    fn rejected() -> SendOutcome {
        SendOutcome::Rejected { reason: "HTTP 422".into() }
    }
    fn unknown() -> SendOutcome {
        SendOutcome::Unknown { error: "timeout".into() }
    }
    fn l_accepted() -> LookupOutcome {
        LookupOutcome::Accepted { reference: Some("r".into()) }
    }
    fn l_rejected() -> LookupOutcome {
        LookupOutcome::Rejected { reason: "closed".into() }
    }
    fn l_unknown() -> LookupOutcome {
        LookupOutcome::Unknown { error: "HTTP 502".into() }
    }

    #[derive(Debug, PartialEq)]
    enum V {
        Paid,
        Refused,
        Unknown,
        Unauthorized,
        NotSent,
    }

    fn kind(v: &Verdict) -> V {
        match v {
            Verdict::Paid { .. } => V::Paid,
            Verdict::Refused { .. } => V::Refused,
            Verdict::Unknown { .. } => V::Unknown,
            Verdict::Unauthorized { .. } => V::Unauthorized,
            Verdict::NotSent => V::NotSent,
        }
    }

    #[test]
    fn the_payout_protocol_pays_on_yes_refunds_on_a_confirmed_no_and_asks_otherwise() {
        let unauthorized = || SendOutcome::Unauthorized { error: "HTTP 401".into() };
        // (possibly sent before, send answers, lookup answers, calls allowed, verdict, calls made)
        #[rustfmt::skip]
        type Row = (bool, Vec<SendOutcome>, Vec<LookupOutcome>, usize, V, Vec<&'static str>);
        let table: Vec<Row> = vec![
            // A first call: its answer is the verdict; a 4xx is final.
            (false, vec![accepted()], vec![], 9, V::Paid, vec!["send"]),
            (false, vec![rejected()], vec![], 9, V::Refused, vec!["send"]),
            (false, vec![unknown()], vec![], 9, V::Unknown, vec!["send"]),
            (false, vec![unauthorized()], vec![], 9, V::Unauthorized, vec!["send"]),
            // Possibly sent before: look it up before sending again.
            (true, vec![], vec![l_accepted()], 9, V::Paid, vec!["lookup"]),
            (true, vec![], vec![l_rejected()], 9, V::Refused, vec!["lookup"]),
            (true, vec![], vec![l_unknown()], 9, V::Unknown, vec!["lookup"]),
            (true, vec![accepted()], vec![LookupOutcome::NotFound], 9, V::Paid, vec!["lookup", "send"]),
            (true, vec![unknown()], vec![LookupOutcome::NotFound], 9, V::Unknown, vec!["lookup", "send"]),
            // ...and a 4xx to the new send is believed only once a lookup confirms it:
            // a bank may answer a replay of a key it already paid with a 4xx.
            (
                true,
                vec![rejected()],
                vec![LookupOutcome::NotFound, l_accepted()],
                9,
                V::Paid,
                vec!["lookup", "send", "lookup"],
            ),
            (
                true,
                vec![rejected()],
                vec![LookupOutcome::NotFound, l_rejected()],
                9,
                V::Refused,
                vec!["lookup", "send", "lookup"],
            ),
            (
                true,
                vec![rejected()],
                vec![LookupOutcome::NotFound, LookupOutcome::NotFound],
                9,
                V::Refused,
                vec!["lookup", "send", "lookup"],
            ),
            (
                true,
                vec![rejected()],
                vec![LookupOutcome::NotFound, l_unknown()],
                9,
                V::Unknown,
                vec!["lookup", "send", "lookup"],
            ),
            (true, vec![rejected()], vec![LookupOutcome::NotFound], 2, V::Unknown, vec!["lookup", "send"]),
            // No room left in the lease: no call is made, the claim goes back.
            (false, vec![], vec![], 0, V::NotSent, vec![]),
            (true, vec![], vec![], 0, V::NotSent, vec![]),
            (true, vec![], vec![LookupOutcome::NotFound], 1, V::NotSent, vec!["lookup"]),
        ];
        for (i, (possibly_sent, sends, lookups, allowed, expected, calls)) in table.into_iter().enumerate() {
            let gateway =
                Scripted { sends: Mutex::new(sends), lookups: Mutex::new(lookups), calls: Mutex::new(Vec::new()) };
            let left = std::cell::Cell::new(allowed);
            let may_call = || {
                let n = left.get();
                left.set(n.saturating_sub(1));
                n > 0
            };
            let verdict = resolve(&gateway, &request(possibly_sent), &may_call);
            assert_eq!(kind(&verdict), expected, "row {i}: {verdict:?}");
            assert_eq!(*gateway.calls.lock().unwrap(), calls, "row {i}: calls");
        }
    }
}
