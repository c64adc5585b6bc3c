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

#[derive(Clone, Copy, Debug, PartialEq, Eq, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)]
#[diesel(sql_type = diesel::sql_types::Text)]
pub enum PayoutStatus {
    Pending,
    Settled,
    Returned,
    Failed,
}

crate::text_column!(PayoutStatus {
    Pending => "pending",
    Settled => "settled",
    Returned => "returned",
    Failed => "failed",
});

#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = payouts, check_for_backend(diesel::pg::Pg))]
pub struct Payout {
    pub id: PayoutId,
    pub withdrawal_id: WithdrawalId,
    pub account_id: AccountId,
    pub currency: Currency,
    pub amount_minor: i64,
    pub destination: String,
    pub idempotency_key: String,
    pub status: PayoutStatus,
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

pub fn get(conn: &mut PgConnection, id: PayoutId) -> Result<Payout, LedgerError> {
    payouts::table
        .find(id.get())
        .select(Payout::as_select())
        .first(conn)
        .optional()?
        .ok_or(LedgerError::UnknownPayout(id))
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

/// One page of payouts in ascending id order, those after `after` (exclusive),
/// optionally by status; each page found through the primary key.
pub fn list_after(
    conn: &mut PgConnection,
    status: Option<PayoutStatus>,
    after: Option<PayoutId>,
    limit: i64,
) -> Result<Vec<Payout>, LedgerError> {
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
