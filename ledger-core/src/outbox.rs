//! The payout outbox, phase 1 of a payout: the row a debit queues in its own
//! transaction, with the gateway key made once by the database, and what a claimed
//! payout carries to the gateway. Withdrawals write it; `payouts` (phase 2: calling the
//! gateway and recording its answers) reads it. Nothing here imports either.

use std::time::Instant;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use crate::error::LedgerError;
use crate::ids::{AccountId, PayoutId, WithdrawalId};
use crate::money::{Amount, Currency};
use crate::tx::Tx;

/// Queues a payout (status pending) inside the debiting transaction. Its gateway key
/// is made by the database (`ledger_payout_key`), stored, and never recomputed.
pub fn enqueue(
    tx: &mut Tx<'_>,
    withdrawal: WithdrawalId,
    account: AccountId,
    amount: Amount,
    currency: Currency,
    destination: &str,
) -> Result<PayoutId, LedgerError> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let row: Id = diesel::sql_query(
        "INSERT INTO payouts (withdrawal_id, account_id, currency, amount_minor, destination, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, ledger_payout_key($1))
         RETURNING id",
    )
    .bind::<BigInt, _>(withdrawal.get())
    .bind::<BigInt, _>(account.get())
    .bind::<Text, _>(currency.code())
    .bind::<BigInt, _>(amount.minor())
    .bind::<Text, _>(destination)
    .get_result(tx.conn())?;
    Ok(PayoutId::from_db(row.id))
}

/// What the gateway is asked to do. `idempotency_key` must be passed on: it is what
/// makes a repeated call (after a timeout or a crash) safe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayoutRequest {
    /// The payout row.
    pub payout: PayoutId,
    /// The withdrawal that queued it.
    pub withdrawal: WithdrawalId,
    /// The amount to send, in minor units of `currency`; positive.
    pub amount_minor: i64,
    /// The amount as a decimal string in the currency's scale, e.g. "50.00".
    pub amount: String,
    /// The ISO 4217 code, e.g. "EUR".
    pub currency: String,
    /// Where the money goes: the withdrawal's IBAN, normalised (no spaces, upper case).
    pub destination: String,
    /// The payout's gateway key, made once by the database (`payout-<instance>-w<id>`)
    /// and the same on every call for this payout.
    pub idempotency_key: String,
    /// 1 for the first claim, then 2, 3... (informational; `retry` starts it over).
    pub attempt: i32,
    /// This claim's fencing token: an answer is recorded only while it is current.
    pub token: i64,
    /// An earlier call may have reached the gateway: look it up before anything else.
    pub possibly_sent: bool,
}

/// Claimed payouts and how long this process may call the gateway for them.
#[derive(Debug)]
pub struct Claim {
    /// The payouts claimed, each under its own fencing token; empty when none was due.
    pub requests: Vec<PayoutRequest>,
    /// The lease as this process sees it: taken before the claim was sent, so it ends
    /// no later than the lease the database granted. No call may still run after it.
    pub lease_until: Instant,
}
