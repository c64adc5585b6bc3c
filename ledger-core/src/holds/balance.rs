//! An account's balance beside its pending holds (see the module doc of `holds`).

use diesel::pg::PgConnection;

use super::store;
use crate::accounts;
use crate::error::LedgerError;
use crate::ids::AccountId;
use crate::money::Currency;

/// An account's balance with its pending holds (see the doc of [`crate::holds`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Balance {
    /// The account.
    pub account: AccountId,
    /// Its currency.
    pub currency: Currency,
    /// Its stored balance: what it may spend now (held money has already left it).
    pub balance_minor: i64,
    /// The sum of its pending holds as payer: its money, held for someone else.
    pub pending_debits_minor: i64,
    /// The sum of its pending holds as payee: money a post may bring, not yet its own.
    pub pending_credits_minor: i64,
}

impl Balance {
    /// The balance by posted movements only (TigerBeetle's posted balance): the stored
    /// balance plus the pending debits, which are the payer's until posted.
    pub fn posted_minor(&self) -> i64 {
        self.balance_minor.saturating_add(self.pending_debits_minor)
    }

    /// What the account may spend now: its stored balance (its floor aside).
    pub fn available_minor(&self) -> i64 {
        self.balance_minor
    }
}

/// The sum of the pending holds from `account` (its pending debits), in minor units: 0
/// for an account without any.
pub fn pending_minor(conn: &mut PgConnection, account: AccountId) -> Result<i64, LedgerError> {
    Ok(store::pending_sums(conn, account)?.0)
}

/// An account's balance with its pending debits and credits. For a system account the
/// balance is the sum of its postings (and it has no holds).
pub fn balance(conn: &mut PgConnection, account: AccountId) -> Result<Balance, LedgerError> {
    let a = accounts::get(conn, account)?;
    let (pending_debits_minor, pending_credits_minor) = store::pending_sums(conn, account)?;
    Ok(Balance {
        account,
        currency: a.currency,
        balance_minor: a.balance_minor,
        pending_debits_minor,
        pending_credits_minor,
    })
}
