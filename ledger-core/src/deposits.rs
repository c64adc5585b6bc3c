//! Deposits: money entering the ledger from outside into a customer account, one at a
//! time ([`deposit`]) or many in one transaction ([`create_batch`]).

use diesel::pg::PgConnection;

use crate::accounts::{self, SystemRole};
use crate::error::LedgerError;
use crate::idempotency::{self, Begun};
use crate::ids::{AccountId, EntryId, IdempotencyKey};
use crate::journal::{self, EntryKind, Leg};
use crate::money::Money;
use crate::tx::{self, Tx, TxOptions};

mod batch;

pub use batch::{create_batch, create_batch_tx, create_batch_with, DepositResult};

/// A request to credit a customer account with money that arrived from outside
/// (the other leg goes to the currency's external-funding system account).
#[derive(Clone, Debug)]
pub struct Deposit {
    /// The customer account credited.
    pub account: AccountId,
    /// How much, in which currency; the accounts must hold that currency.
    pub amount: Money,
    /// The caller's idempotency key: the same key with the same deposit replays the
    /// first answer; with a different deposit it is refused.
    pub key: IdempotencyKey,
}

pub use crate::journal::{Balance, Receipt};

impl Deposit {
    fn fingerprint(&self) -> String {
        format!("account={}|amount={}|currency={}", self.account, self.amount.minor(), self.amount.currency())
    }
}

/// Credits `req.account` in its own transaction and answers with the resulting balances.
pub fn deposit(conn: &mut PgConnection, req: &Deposit) -> Result<Receipt, LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| deposit_tx(tx, req))
}

/// [`deposit`] inside the caller's transaction (a savepoint when nested): the caller's
/// commit makes it durable.
pub fn deposit_tx(tx: &mut Tx<'_>, req: &Deposit) -> Result<Receipt, LedgerError> {
    if let Begun::Replay(id) = idempotency::begin(tx, &req.key, "deposit", &req.fingerprint())? {
        return Receipt::replayed(tx.conn(), EntryId::from_db(id));
    }
    let account = accounts::lock(tx, req.account)?;
    account.expect_currency(req.amount.currency())?;
    let after = account.balance_after_credit(req.amount.amount())?;
    let funding = accounts::system_account(tx.conn(), SystemRole::ExternalFunding, req.amount.currency())?;
    let reference = format!("deposit:{}", req.key);
    let entry = journal::post(
        tx,
        EntryKind::Deposit,
        Some(&reference),
        req.amount.currency(),
        &[
            Leg { account: funding, amount_minor: -req.amount.minor(), balance_after_minor: None },
            Leg { account: account.id(), amount_minor: req.amount.minor(), balance_after_minor: Some(after) },
        ],
    )?;
    accounts::set_balance(tx, &account, after)?;
    idempotency::finish(tx, &req.key, entry.get())?;
    Ok(Receipt::created(entry, vec![Balance { account: account.id(), balance_minor: after }]))
}
