//! The payout outbox and its two-phase settlement.
//!
//! Phase 1 (in the withdrawal's transaction): the customer is debited into the
//! payouts-in-transit account and a `pending` payout row is written. Money can only
//! leave through such a committed row.
//!
//! Phase 2 (the dispatcher, after commit): a payout is claimed under a lease, the
//! gateway is called with **no database transaction open** and the payout's
//! idempotency key, and the answer is recorded in a new transaction:
//! - accepted: in-transit -> external settlement (a second entry); withdrawal `completed`;
//! - final rejection: in-transit -> back to the customer (a compensating entry);
//!   withdrawal `returned` with the reason;
//! - transient: retried later with jittered exponential backoff; after the limit the
//!   payout is `failed` and waits for an operator (`retry` or `return_failed`).
//!
//! A crash between the gateway call and the recording leaves the payout pending; when
//! its lease runs out it is sent again with the same key, which a gateway that honours
//! keys answers with the first result instead of paying twice.

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};

use crate::accounts::{self, SystemRole};
use crate::error::{InvalidInput, LedgerError};
use crate::ids::{AccountId, EntryId, PayoutId, WithdrawalId};
use crate::journal::{self, EntryKind, Leg};
use crate::money::{Amount, Currency};
use crate::schema::{payouts, withdrawals};
use crate::tx::{self, Tx, TxOptions};
use crate::withdrawals::WithdrawalStatus;

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
}

impl Payout {
    pub fn status(&self) -> PayoutStatus {
        PayoutStatus::parse(&self.status).expect("the status CHECK constraint limits the values")
    }
}

/// The key the gateway sees: stable per withdrawal, so a retried call cannot pay twice.
pub fn payout_key(withdrawal: WithdrawalId) -> String {
    format!("payout-w{withdrawal}")
}

/// Queues a payout (status pending) inside the debiting transaction.
pub fn enqueue(
    tx: &mut Tx<'_>,
    withdrawal: WithdrawalId,
    account: AccountId,
    amount: Amount,
    currency: Currency,
    destination: &str,
) -> Result<PayoutId, LedgerError> {
    let id: i64 = diesel::insert_into(payouts::table)
        .values((
            payouts::withdrawal_id.eq(withdrawal.get()),
            payouts::account_id.eq(account.get()),
            payouts::currency.eq(currency.code()),
            payouts::amount_minor.eq(amount.minor()),
            payouts::destination.eq(destination),
            payouts::idempotency_key.eq(payout_key(withdrawal)),
        ))
        .returning(payouts::id)
        .get_result(tx.conn())?;
    Ok(PayoutId::from_db(id))
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

/// What the gateway is asked to do. `idempotency_key` must be passed on: it is what
/// makes a repeated call (after a timeout or a crash) safe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayoutRequest {
    pub payout: PayoutId,
    pub withdrawal: WithdrawalId,
    pub amount_minor: i64,
    /// The amount as a decimal string in the currency's scale, e.g. "50.00".
    pub amount: String,
    pub currency: String,
    pub destination: String,
    pub idempotency_key: String,
    /// 1 for the first call, then 2, 3... (the lease token).
    pub attempt: i32,
}

/// The gateway's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayOutcome {
    /// The money is on its way; settle.
    Accepted { reference: Option<String> },
    /// Final refusal (for example the bank refuses the account): return the funds.
    Rejected { reason: String },
    /// Try again later (5xx, timeout, connection error).
    Transient { error: String },
}

/// Sends money out. Implementations must be idempotent per `idempotency_key` or sit in
/// front of a service that is. Called with no database transaction open.
pub trait PayoutGateway: Send + Sync {
    fn send(&self, request: &PayoutRequest) -> GatewayOutcome;
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
}

/// Claims up to `limit` due payouts for sending: each gets a lease (it is not due again
/// for `lease_ms`) and its attempt counter, which is the lease token `record` checks.
/// Commits before returning, so no transaction is open while the caller calls out.
pub fn claim_due(conn: &mut PgConnection, limit: i64, lease_ms: u64) -> Result<Vec<PayoutRequest>, LedgerError> {
    assert!(limit > 0, "claim at least one payout");
    let rows: Vec<ClaimedRow> = tx::transaction(conn, &TxOptions::default(), |tx| {
        diesel::sql_query(
            "UPDATE payouts SET attempts = attempts + 1, updated_at = now(),
                 next_attempt_at = now() + make_interval(secs => $2::float8 / 1000)
             WHERE id IN (SELECT id FROM payouts
                          WHERE status = 'pending' AND next_attempt_at <= now()
                          ORDER BY next_attempt_at, id LIMIT $1
                          FOR UPDATE SKIP LOCKED)
             RETURNING id, withdrawal_id, currency, amount_minor, destination, idempotency_key, attempts",
        )
        .bind::<BigInt, _>(limit)
        .bind::<BigInt, _>(i64::try_from(lease_ms).unwrap_or(i64::MAX))
        .load(tx.conn())
        .map_err(LedgerError::from)
    })?;
    rows.into_iter()
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
            })
        })
        .collect()
}

/// What `record` did with the gateway's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    Settled {
        entry: EntryId,
    },
    Returned {
        entry: EntryId,
    },
    /// Will be sent again after a backoff.
    Retrying,
    /// Retries exhausted: an operator must retry or return it.
    Failed,
    /// The lease was lost (another dispatcher took the payout over, or an operator acted):
    /// nothing recorded.
    Superseded,
}

/// Backoff and retry limits for transient gateway failures.
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

/// Records the gateway's answer to `request` in its own transaction.
pub fn record(
    conn: &mut PgConnection,
    request: &PayoutRequest,
    outcome: &GatewayOutcome,
    policy: &RetryPolicy,
) -> Result<Recorded, LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| record_tx(tx, request, outcome, policy))
}

pub fn record_tx(
    tx: &mut Tx<'_>,
    request: &PayoutRequest,
    outcome: &GatewayOutcome,
    policy: &RetryPolicy,
) -> Result<Recorded, LedgerError> {
    let current: Option<Payout> = payouts::table
        .find(request.payout.get())
        .select(Payout::as_select())
        .for_no_key_update()
        .first(tx.conn())
        .optional()?;
    let Some(payout) = current else { return Ok(Recorded::Superseded) };
    if payout.status() != PayoutStatus::Pending || payout.attempts != request.attempt {
        return Ok(Recorded::Superseded);
    }
    match outcome {
        GatewayOutcome::Accepted { reference } => settle_tx(tx, &payout, reference.as_deref()),
        GatewayOutcome::Rejected { reason } => return_tx(tx, &payout, reason),
        GatewayOutcome::Transient { error } => {
            let error: String = error.chars().take(500).collect();
            if payout.attempts >= i32::try_from(policy.max_attempts).unwrap_or(i32::MAX) {
                diesel::update(payouts::table.find(payout.id))
                    .set((
                        payouts::status.eq(PayoutStatus::Failed.as_str()),
                        payouts::last_error.eq(Some(&error)),
                        payouts::updated_at.eq(diesel::dsl::now),
                    ))
                    .execute(tx.conn())?;
                return Ok(Recorded::Failed);
            }
            let exp = policy.base_ms.saturating_mul(1_u64 << payout.attempts.clamp(0, 30));
            let ceiling = exp.min(policy.max_backoff_ms).max(1);
            let wait_ms = fastrand::u64(ceiling / 2..=ceiling);
            diesel::sql_query(
                "UPDATE payouts SET last_error = $2, updated_at = now(),
                     next_attempt_at = now() + make_interval(secs => $3::float8 / 1000)
                 WHERE id = $1",
            )
            .bind::<BigInt, _>(payout.id)
            .bind::<Text, _>(&error)
            .bind::<BigInt, _>(i64::try_from(wait_ms).unwrap_or(i64::MAX))
            .execute(tx.conn())?;
            Ok(Recorded::Retrying)
        }
    }
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
    assert_eq!(updated, 1, "a pending payout's withdrawal is paying out");
    Ok(())
}

/// Phase 2, accepted: in-transit -> external settlement; withdrawal completed.
fn settle_tx(tx: &mut Tx<'_>, payout: &Payout, reference: Option<&str>) -> Result<Recorded, LedgerError> {
    let currency = Currency::from_code(&payout.currency)?;
    let in_transit = system(tx, SystemRole::PayoutsInTransit, currency)?;
    let settlement = system(tx, SystemRole::ExternalSettlement, currency)?;
    let entry_ref = format!("payout:{}", payout.id);
    let entry = journal::post(
        tx,
        EntryKind::PayoutSettlement,
        Some(&entry_ref),
        currency,
        &[
            Leg { account: in_transit, amount_minor: -payout.amount_minor, balance_after_minor: None },
            Leg { account: settlement, amount_minor: payout.amount_minor, balance_after_minor: None },
        ],
    )?;
    let reference: Option<String> = reference.map(|r| r.chars().take(200).collect());
    diesel::update(payouts::table.find(payout.id))
        .set((
            payouts::status.eq(PayoutStatus::Settled.as_str()),
            payouts::resolution_entry_id.eq(Some(entry.get())),
            payouts::gateway_reference.eq(reference),
            payouts::updated_at.eq(diesel::dsl::now),
        ))
        .execute(tx.conn())?;
    set_withdrawal(tx, payout.withdrawal_id, WithdrawalStatus::Completed, None)?;
    Ok(Recorded::Settled { entry })
}

/// Phase 2, refused: a compensating entry returns the funds to the customer, whose
/// account is locked like any other balance change; withdrawal returned with the reason.
fn return_tx(tx: &mut Tx<'_>, payout: &Payout, reason: &str) -> Result<Recorded, LedgerError> {
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
    let reason: String = reason.chars().take(500).collect();
    diesel::update(payouts::table.find(payout.id))
        .set((
            payouts::status.eq(PayoutStatus::Returned.as_str()),
            payouts::resolution_entry_id.eq(Some(entry.get())),
            payouts::last_error.eq(Some(&reason)),
            payouts::updated_at.eq(diesel::dsl::now),
        ))
        .execute(tx.conn())?;
    set_withdrawal(tx, payout.withdrawal_id, WithdrawalStatus::Returned, Some(&format!("payout returned: {reason}")))?;
    Ok(Recorded::Returned { entry })
}

/// Operator: send a `failed` payout again (attempts start over).
pub fn retry(conn: &mut PgConnection, id: PayoutId) -> Result<Payout, LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| {
        let updated =
            diesel::update(payouts::table.find(id.get()).filter(payouts::status.eq(PayoutStatus::Failed.as_str())))
                .set((
                    payouts::status.eq(PayoutStatus::Pending.as_str()),
                    payouts::attempts.eq(0),
                    payouts::next_attempt_at.eq(diesel::dsl::now),
                    payouts::updated_at.eq(diesel::dsl::now),
                ))
                .execute(tx.conn())?;
        if updated == 0 {
            return Err(not_failed(tx.conn(), id));
        }
        get(tx.conn(), id)
    })
}

/// Operator: give up on a `failed` payout and return the funds to the customer.
pub fn return_failed(conn: &mut PgConnection, id: PayoutId, reason: &str) -> Result<Payout, LedgerError> {
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
        return_tx(tx, &payout, reason)?;
        get(tx.conn(), id)
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

/// Gives back the lease of a claimed payout that was not sent (shutdown), so it is due
/// again at once instead of when the lease would have run out.
pub fn release(conn: &mut PgConnection, request: &PayoutRequest) -> Result<bool, LedgerError> {
    let n = diesel::update(
        payouts::table
            .find(request.payout.get())
            .filter(payouts::status.eq(PayoutStatus::Pending.as_str()))
            .filter(payouts::attempts.eq(request.attempt)),
    )
    .set((payouts::attempts.eq(payouts::attempts - 1), payouts::next_attempt_at.eq(diesel::dsl::now)))
    .execute(conn)?;
    Ok(n == 1)
}

/// Payouts still to send (due now or waiting for a retry or a lease).
pub fn pending_count(conn: &mut PgConnection) -> Result<i64, LedgerError> {
    Ok(payouts::table.filter(payouts::status.eq(PayoutStatus::Pending.as_str())).count().get_result(conn)?)
}
