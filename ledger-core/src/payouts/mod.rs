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
use crate::error::{stored_text, InvalidInput, LedgerError, STORED_TEXT_MAX_CHARS};
use crate::ids::{AccountId, EntryId, PayoutId, WithdrawalId};
use crate::journal::{self, EntryKind, Leg};
use crate::money::{Amount, Currency};
use crate::schema::{ledger_instance, payouts, withdrawals};
use crate::tx::{self, Tx, TxOptions};
use crate::withdrawals::WithdrawalStatus;

pub use crate::outbox::{Claim, PayoutRequest};

mod claim;
mod operator;
mod protocol;
mod record;
mod requeue;

pub use claim::claim_due;
pub use operator::{retry, return_failed, ReturnAuthority, ReturnResult};
pub use protocol::{resolve, LookupOutcome, PayoutGateway, SendOutcome, Verdict};
#[cfg(test)]
pub(crate) use record::SettleAll;
pub use record::{
    mark_unrecordable, record, record_all, record_all_tx, record_all_with, Judged, RecordBatch, Recorded, RetryPolicy,
};
// Shared by the rooms below (each starts with `use super::*`).
use {
    operator::return_tx,
    record::{set_withdrawal, settle_all, system},
};

/// Where a payout is in its life, stored in `payouts.status`. `Settled` and `Returned`
/// are final; the money is held in payouts-in-transit while it is `Pending` or `Failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)]
#[diesel(sql_type = diesel::sql_types::Text)]
pub enum PayoutStatus {
    /// To be sent, being sent under a claim's lease, or waiting for a retry: due again
    /// at its `next_attempt_at`.
    Pending,
    /// The gateway paid it: the funds moved to external settlement and the withdrawal
    /// is `completed`.
    Settled,
    /// The gateway refused it, or an operator returned it: the funds went back to the
    /// customer and the withdrawal is `returned`.
    Returned,
    /// Retries exhausted, or a verdict that could not be recorded: nothing is sent
    /// until an operator retries it ([`retry`]) or returns it ([`return_failed`]).
    Failed,
}

crate::text_column!(PayoutStatus {
    Pending => "pending",
    Settled => "settled",
    Returned => "returned",
    Failed => "failed",
});

/// A payout row, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = payouts, check_for_backend(diesel::pg::Pg))]
pub struct Payout {
    /// The payout's id.
    pub id: PayoutId,
    /// The withdrawal that queued it (one payout per withdrawal).
    pub withdrawal_id: WithdrawalId,
    /// The customer account debited, and credited back if the payout is returned.
    pub account_id: AccountId,
    /// The currency of the amount.
    pub currency: Currency,
    /// The amount sent, in minor units; positive.
    pub amount_minor: i64,
    /// Where the money goes: the withdrawal's IBAN, normalised.
    pub destination: String,
    /// The gateway key, made once when the payout was queued and sent on every call.
    pub idempotency_key: String,
    /// Where the payout is in its life.
    pub status: PayoutStatus,
    /// Claims that may have called the gateway, counted against the retry policy's
    /// `max_attempts`. A claim given back unsent, or answered with a refused credential,
    /// does not count; an operator's [`retry`] starts it over at 0.
    pub attempts: i32,
    /// The last unknown outcome or why recording failed (for a `returned` payout, the
    /// reason it was returned), cut to [`crate::error::STORED_TEXT_MAX_CHARS`].
    pub last_error: Option<String>,
    /// The gateway's reference for the payment, once settled, if it gave one.
    pub gateway_reference: Option<String>,
    /// The fencing token of the current claim (None when nobody holds it).
    pub claim_token: Option<i64>,
    /// A call may have reached the gateway without our recording its answer.
    pub possibly_sent: bool,
    /// Set when an operator returned the payout without a confirming lookup.
    pub forced_return_reason: Option<String>,
    /// The entry that settled or returned it. Payouts settled in one recording
    /// transaction share one settlement entry (per currency), which moves their sum.
    pub resolution_entry_id: Option<EntryId>,
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

/// The payout `id`; [`LedgerError::UnknownPayout`] if there is none.
pub fn get(conn: &mut PgConnection, id: PayoutId) -> Result<Payout, LedgerError> {
    payouts::table
        .find(id.get())
        .select(Payout::as_select())
        .first(conn)
        .optional()?
        .ok_or(LedgerError::UnknownPayout(id))
}

/// The payout a withdrawal queued; `None` until it was debited (or if it was
/// rejected), or if the withdrawal does not exist.
pub fn for_withdrawal(conn: &mut PgConnection, withdrawal: WithdrawalId) -> Result<Option<Payout>, LedgerError> {
    Ok(payouts::table
        .filter(payouts::withdrawal_id.eq(withdrawal.get()))
        .select(Payout::as_select())
        .first(conn)
        .optional()?)
}

/// Payouts, newest first, optionally by status. A `limit` below 1 is refused.
pub fn list(conn: &mut PgConnection, status: Option<PayoutStatus>, limit: i64) -> Result<Vec<Payout>, LedgerError> {
    let limit = crate::input::positive_limit(limit)?;
    let mut query = payouts::table.select(Payout::as_select()).order(payouts::id.desc()).limit(limit).into_boxed();
    if let Some(s) = status {
        query = query.filter(payouts::status.eq(s.as_str()));
    }
    Ok(query.load(conn)?)
}

/// One page of payouts in ascending id order, those after `after` (exclusive),
/// optionally by status; each page found through the primary key.
pub fn list_after(
    conn: &mut PgConnection,
    status: Option<PayoutStatus>,
    after: Option<PayoutId>,
    limit: i64,
) -> Result<Vec<Payout>, LedgerError> {
    let limit = crate::input::positive_limit(limit)?;
    let mut query = payouts::table
        .select(Payout::as_select())
        .filter(payouts::id.gt(after.map_or(0, PayoutId::get)))
        .order(payouts::id.asc())
        .limit(limit)
        .into_boxed();
    if let Some(s) = status {
        query = query.filter(payouts::status.eq(s.as_str()));
    }
    Ok(query.load(conn)?)
}

/// Payouts still to send (due now or waiting for a retry or a lease).
pub fn pending_count(conn: &mut PgConnection) -> Result<i64, LedgerError> {
    Ok(payouts::table.filter(payouts::status.eq(PayoutStatus::Pending.as_str())).count().get_result(conn)?)
}
