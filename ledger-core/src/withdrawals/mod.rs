//! Withdrawals: a request row (the worker's job), then processing under row locks.
//!
//! Processing re-reads the job `FOR UPDATE` (so two workers cannot both process it),
//! locks the account `FOR UPDATE` (so two withdrawals cannot both pass the balance
//! check), checks the floor, and in one transaction writes the journal entry, the new
//! balance, the payout outbox row and the job's final status. Funds move to the
//! payouts-in-transit system account: held, not gone, until the payout settles.

use diesel::pg::PgConnection;
use diesel::prelude::*;

use crate::accounts::{self, AccountStatus, SystemRole};
use crate::error::{LedgerError, RetryClass};
use crate::idempotency::{self, Begun};
use crate::ids::{AccountId, EntryId, IdempotencyKey, PayoutId, WithdrawalId};
use crate::journal::{self, EntryKind, Leg};
use crate::money::{Amount, Currency, Money};
use crate::outbox;
use crate::schema::withdrawals;
use crate::tx::{self, Tx, TxOptions};

mod batch;
mod decide;
mod iban;
mod intake;
mod queue;

use crate::accounts::rebuild_refusal;
#[cfg(test)]
pub(crate) use batch::WritePlan;
pub use batch::{process_batch_fast_claiming_tx, process_batch_fast_tx, process_batch_tx, BatchItem, JobOutcome};
pub use decide::{decide, Decision};
pub use iban::Iban;
pub use intake::{request_batch, request_batch_tx, request_batch_with, RequestResult};
pub use queue::{claim_after, claim_due, fail_now, pending_count, record_failed_attempt};

/// The wall clock when the statement runs (`clock_timestamp()`, not the transaction's
/// start), as a nullable timestamptz (Diesel's `now` is a plain timestamp).
pub(crate) fn now_tz() -> diesel::expression::SqlLiteral<diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>> {
    diesel::dsl::sql("clock_timestamp()")
}

/// A customer's request to send money from their account to an external bank account.
#[derive(Clone, Debug)]
pub struct WithdrawalRequest {
    /// The customer account debited.
    pub account: AccountId,
    /// How much, in which currency; the accounts must hold that currency.
    pub amount: Money,
    /// The bank account the payout goes to.
    pub destination: Iban,
    /// The caller's idempotency key: the same key with the same request replays the first
    /// answer; with a different request it is refused.
    pub key: IdempotencyKey,
}

impl WithdrawalRequest {
    fn fingerprint(&self) -> String {
        format!(
            "account={}|amount={}|currency={}|to={}",
            self.account,
            self.amount.minor(),
            self.amount.currency(),
            self.destination.as_str()
        )
    }
}

/// Where a withdrawal is in its life (the `status` column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)]
#[diesel(sql_type = diesel::sql_types::Text)]
pub enum WithdrawalStatus {
    /// Requested; the worker has not processed it yet.
    Pending,
    /// Debited: funds held in payouts-in-transit, payout queued.
    PayingOut,
    /// The payout settled: the money has left.
    Completed,
    /// Refused for a business reason (insufficient funds, closed account): nothing was
    /// debited; `reason` says why.
    Rejected,
    /// Gave up after repeated infrastructure errors: nothing was debited; `reason` and
    /// `last_error` say why.
    Failed,
    /// Debited, then the payout was refused and the money went back to the customer.
    Returned,
}

crate::text_column!(WithdrawalStatus {
    Pending => "pending",
    PayingOut => "paying_out",
    Completed => "completed",
    Rejected => "rejected",
    Failed => "failed",
    Returned => "returned",
});

/// A withdrawal as stored (one row of `withdrawals`).
#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = withdrawals, check_for_backend(diesel::pg::Pg))]
pub struct Withdrawal {
    /// Its id.
    pub id: WithdrawalId,
    /// The customer account debited.
    pub account_id: AccountId,
    /// The currency of the amount.
    pub currency: Currency,
    /// How much, in minor units of `currency`.
    pub amount_minor: i64,
    /// The destination IBAN, normalized.
    pub destination: String,
    /// The idempotency key it was requested under.
    pub idempotency_key: String,
    /// Where it is in its life.
    pub status: WithdrawalStatus,
    /// Why it was rejected, failed or returned, for a person to read.
    pub reason: Option<String>,
    /// How many times a worker tried to process it.
    pub attempts: i32,
    /// The last infrastructure error a worker met on it.
    pub last_error: Option<String>,
    /// The debit's journal entry, once debited.
    pub entry_id: Option<EntryId>,
}

/// Records a pending withdrawal (the job). Idempotent under the request's key. Checks
/// the account exists, is open and holds the currency, so a bad request is refused now
/// rather than rejected later; the balance is checked when the job runs.
pub fn request(conn: &mut PgConnection, req: &WithdrawalRequest) -> Result<(WithdrawalId, bool), LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| request_tx(tx, req))
}

/// Returns the withdrawal's id and whether this call replayed an earlier request.
pub fn request_tx(tx: &mut Tx<'_>, req: &WithdrawalRequest) -> Result<(WithdrawalId, bool), LedgerError> {
    if let Begun::Replay(id) = idempotency::begin(tx, &req.key, "withdrawal", &req.fingerprint())? {
        return Ok((WithdrawalId::from_db(id), true));
    }
    let account = accounts::get(tx.conn(), req.account)?;
    if account.kind != accounts::AccountKind::Customer {
        return Err(LedgerError::SystemAccount(account.id));
    }
    if account.status == AccountStatus::Closed {
        return Err(LedgerError::AccountClosed(account.id));
    }
    account.expect_currency(req.amount.currency())?;
    let id: i64 = diesel::insert_into(withdrawals::table)
        .values((
            withdrawals::account_id.eq(req.account.get()),
            withdrawals::currency.eq(req.amount.currency().code()),
            withdrawals::amount_minor.eq(req.amount.minor()),
            withdrawals::destination.eq(req.destination.as_str()),
            withdrawals::idempotency_key.eq(req.key.as_str()),
        ))
        .returning(withdrawals::id)
        .get_result(tx.conn())?;
    idempotency::finish(tx, &req.key, id)?;
    Ok((WithdrawalId::from_db(id), false))
}

/// Reads one withdrawal; [`LedgerError::UnknownWithdrawal`] if there is none.
pub fn get(conn: &mut PgConnection, id: WithdrawalId) -> Result<Withdrawal, LedgerError> {
    withdrawals::table
        .find(id.get())
        .select(Withdrawal::as_select())
        .first(conn)
        .optional()?
        .ok_or(LedgerError::UnknownWithdrawal(id))
}

/// Processes one pending job in the caller's transaction. Business refusals are
/// recorded on the job (and returned as `Rejected`); infrastructure errors are returned
/// as `Err` and leave the job pending for a retry.
pub fn process_tx(tx: &mut Tx<'_>, id: WithdrawalId) -> Result<JobOutcome, LedgerError> {
    // Only a pending job is locked: a finished one may be waited for by its payout's
    // settlement or return, which would then wait on us. (IS NOT DISTINCT FROM: see
    // the batch path.) A job that another transaction finishes while we wait for its
    // lock is re-read as no longer pending.
    let locked: Option<Withdrawal> = withdrawals::table
        .find(id.get())
        .filter(withdrawals::status.is_not_distinct_from(WithdrawalStatus::Pending.as_str()))
        .select(Withdrawal::as_select())
        .for_update()
        .first(tx.conn())
        .optional()?;
    let Some(job) = locked else {
        let finished = get(tx.conn(), id)?;
        return Ok(JobOutcome::AlreadyFinal(finished.status));
    };
    match debit_tx(tx, &job) {
        Ok((entry, payout)) => {
            mark_debited(tx, job.id, entry)?;
            Ok(JobOutcome::Debited { entry, payout })
        }
        Err(e) if e.is_business_rejection() => {
            let reason = e.to_string();
            mark_rejected(tx, job.id, &reason)?;
            Ok(JobOutcome::Rejected { code: e.code(), reason })
        }
        Err(e) => Err(e),
    }
}

/// The money movement of a withdrawal, run in a savepoint so a refusal undoes only it.
fn debit_tx(tx: &mut Tx<'_>, job: &Withdrawal) -> Result<(EntryId, PayoutId), LedgerError> {
    tx.savepoint(|tx| {
        let account = accounts::lock(tx, job.account_id)?;
        let currency = job.currency;
        let in_transit = accounts::system_account(tx.conn(), SystemRole::PayoutsInTransit, currency)?;
        let (entry, payout, _after) = debit_locked(tx, job, &account, in_transit)?;
        Ok((entry, payout))
    })
}

/// Debits a job's amount from its account, which this transaction has locked, as
/// [`decide`] says: writes the entry (customer -> payouts in transit), the new balance and
/// the payout outbox row. Returns the entry, the payout and the balance after; a refusal
/// is the error.
pub(super) fn debit_locked(
    tx: &mut Tx<'_>,
    job: &Withdrawal,
    account: &accounts::LockedAccount,
    in_transit: AccountId,
) -> Result<(EntryId, PayoutId, i64), LedgerError> {
    assert_eq!(account.id(), job.account_id, "debit_locked needs the job's own account");
    let withdrawal = job.id;
    let (amount, currency, after) = match decide(job.currency, job.amount_minor, Ok(account.account())) {
        Decision::Debit { amount, currency, after_minor } => (amount, currency, after_minor),
        Decision::Reject(e) => return Err(e),
    };
    let reference = format!("withdrawal:{}", job.id);
    let entry = journal::post(
        tx,
        EntryKind::Withdrawal,
        Some(&reference),
        currency,
        &[
            Leg { account: account.id(), amount_minor: -amount.minor(), balance_after_minor: Some(after) },
            Leg { account: in_transit, amount_minor: amount.minor(), balance_after_minor: None },
        ],
    )?;
    accounts::set_balance(tx, account, after)?;
    let payout = outbox::enqueue(tx, withdrawal, account.id(), amount, currency, &job.destination)?;
    Ok((entry, payout, after))
}

pub(super) fn mark_debited(tx: &mut Tx<'_>, id: WithdrawalId, entry: EntryId) -> Result<(), LedgerError> {
    let updated = diesel::update(withdrawals::table.find(id.get()))
        .set((
            withdrawals::status.eq(WithdrawalStatus::PayingOut.as_str()),
            withdrawals::entry_id.eq(Some(entry.get())),
            withdrawals::attempts.eq(withdrawals::attempts + 1),
            withdrawals::finished_at.eq(now_tz()),
        ))
        .execute(tx.conn())?;
    assert_eq!(updated, 1);
    Ok(())
}

pub(super) fn mark_rejected(tx: &mut Tx<'_>, id: WithdrawalId, reason: &str) -> Result<(), LedgerError> {
    let updated = diesel::update(withdrawals::table.find(id.get()))
        .set((
            withdrawals::status.eq(WithdrawalStatus::Rejected.as_str()),
            withdrawals::reason.eq(Some(reason)),
            withdrawals::attempts.eq(withdrawals::attempts + 1),
            withdrawals::finished_at.eq(now_tz()),
        ))
        .execute(tx.conn())?;
    assert_eq!(updated, 1);
    Ok(())
}

/// Lists withdrawals, newest first, optionally by status and account. A `limit` below 1
/// is refused.
pub fn list(
    conn: &mut PgConnection,
    status: Option<WithdrawalStatus>,
    account: Option<AccountId>,
    limit: i64,
) -> Result<Vec<Withdrawal>, LedgerError> {
    let limit = crate::input::positive_limit(limit)?;
    let mut query =
        withdrawals::table.select(Withdrawal::as_select()).order(withdrawals::id.desc()).limit(limit).into_boxed();
    if let Some(s) = status {
        query = query.filter(withdrawals::status.eq(s.as_str()));
    }
    if let Some(a) = account {
        query = query.filter(withdrawals::account_id.eq(a.get()));
    }
    Ok(query.load(conn)?)
}

/// One page of withdrawals in ascending id order, those after `after` (exclusive),
/// optionally by status and account. Each page is found through the primary key, so
/// paging through any number of rows costs the same per page.
pub fn list_after(
    conn: &mut PgConnection,
    status: Option<WithdrawalStatus>,
    account: Option<AccountId>,
    after: Option<WithdrawalId>,
    limit: i64,
) -> Result<Vec<Withdrawal>, LedgerError> {
    let limit = crate::input::positive_limit(limit)?;
    let mut query = withdrawals::table
        .select(Withdrawal::as_select())
        .filter(withdrawals::id.gt(after.map_or(0, WithdrawalId::get)))
        .order(withdrawals::id.asc())
        .limit(limit)
        .into_boxed();
    if let Some(s) = status {
        query = query.filter(withdrawals::status.eq(s.as_str()));
    }
    if let Some(a) = account {
        query = query.filter(withdrawals::account_id.eq(a.get()));
    }
    Ok(query.load(conn)?)
}

/// Withdraws synchronously: records the request and processes it in one transaction.
/// A refusal (insufficient funds, closed account...) is returned as `Err` and leaves the
/// database unchanged. A replayed key returns the first withdrawal's outcome.
pub fn withdraw(conn: &mut PgConnection, req: &WithdrawalRequest) -> Result<Withdrawal, LedgerError> {
    withdraw_with(conn, &TxOptions::default(), req)
}

/// [`withdraw`] with the caller's transaction options (isolation, retries).
pub fn withdraw_with(
    conn: &mut PgConnection,
    opts: &TxOptions,
    req: &WithdrawalRequest,
) -> Result<Withdrawal, LedgerError> {
    tx::transaction(conn, opts, |tx| withdraw_tx(tx, req))
}

/// [`withdraw`] inside the caller's transaction (a savepoint when nested).
pub fn withdraw_tx(tx: &mut Tx<'_>, req: &WithdrawalRequest) -> Result<Withdrawal, LedgerError> {
    let (id, replayed) = request_tx(tx, req)?;
    if !replayed {
        let job = get(tx.conn(), id)?;
        // Run the debit directly (not process_tx): a refusal here must roll back the
        // request too, not be recorded as a rejected job.
        let (entry, _payout) = debit_tx(tx, &job)?;
        mark_debited(tx, job.id, entry)?;
    }
    get(tx.conn(), id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ibans_parse_and_normalise() {
        for text in ["DE89370400440532013000", "de89 3704 0044 0532 0130 00", "GB29NWBK60161331926819"] {
            assert!(Iban::parse(text).is_ok(), "{text}");
        }
        assert_eq!(Iban::parse("de89 3704 0044 0532 0130 00").unwrap().as_str(), "DE89370400440532013000");
    }

    #[test]
    fn ibans_with_wrong_check_digits_or_shape_are_refused() {
        for text in ["DE88370400440532013000", "DE8937040044053201300X!", "12345", "", "D189370400440532013000"] {
            assert!(Iban::parse(text).is_err(), "{text}");
        }
    }
}
