//! The payout outbox. A payout row is written in the same transaction that debits the
//! customer, so money can only leave through a committed row; the external call
//! happens after commit and carries the row's idempotency key.

use diesel::pg::PgConnection;
use diesel::prelude::*;

use crate::error::LedgerError;
use crate::ids::{AccountId, PayoutId, WithdrawalId};
use crate::money::{Amount, Currency};
use crate::schema::payouts;
use crate::tx::Tx;

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

pub fn for_withdrawal(conn: &mut PgConnection, withdrawal: WithdrawalId) -> Result<Option<Payout>, LedgerError> {
    Ok(payouts::table
        .filter(payouts::withdrawal_id.eq(withdrawal.get()))
        .select(Payout::as_select())
        .first(conn)
        .optional()?)
}
