//! Transfers between two customer accounts of the same currency. Both rows are locked
//! through a `LockSet`, so always in ascending id order: A->B and B->A never deadlock.
//!
//! One at a time ([`transfer`]), or many in one transaction with a result per item and
//! linked chains ([`create_batch`], decided in `plan`).

use diesel::pg::PgConnection;

use crate::accounts;
use crate::error::LedgerError;
use crate::idempotency::{self, Begun};
use crate::ids::{AccountId, EntryId, IdempotencyKey};
use crate::journal::{self, EntryKind, Leg};
use crate::journal::{Balance, Receipt};
use crate::money::Money;
use crate::tx::{self, LockSet, Tx, TxOptions};

mod batch;
mod plan;

pub use batch::{create_batch, create_batch_tx, create_batch_with, TransferResult};

#[derive(Clone, Debug)]
pub struct Transfer {
    pub from: AccountId,
    pub to: AccountId,
    /// How much, in which currency; the accounts must hold that currency.
    pub amount: Money,
    pub key: IdempotencyKey,
}

impl Transfer {
    /// The request as its idempotency key remembers it: the same key with another
    /// fingerprint is a conflict.
    pub(crate) fn fingerprint(&self) -> String {
        format!("from={}|to={}|amount={}|currency={}", self.from, self.to, self.amount.minor(), self.amount.currency())
    }
}

pub fn transfer(conn: &mut PgConnection, req: &Transfer) -> Result<Receipt, LedgerError> {
    transfer_with(conn, &TxOptions::default(), req)
}

pub fn transfer_with(conn: &mut PgConnection, opts: &TxOptions, req: &Transfer) -> Result<Receipt, LedgerError> {
    if req.from == req.to {
        return Err(LedgerError::SameAccount(req.from));
    }
    tx::transaction(conn, opts, |tx| transfer_tx(tx, req))
}

pub fn transfer_tx(tx: &mut Tx<'_>, req: &Transfer) -> Result<Receipt, LedgerError> {
    if req.from == req.to {
        return Err(LedgerError::SameAccount(req.from));
    }
    if let Begun::Replay(id) = idempotency::begin(tx, &req.key, "transfer", &req.fingerprint())? {
        return Receipt::replayed(tx.conn(), EntryId::from_db(id));
    }
    let locked = accounts::lock_many(tx, &LockSet::new().with(req.from).with(req.to))?;
    let by_id = |id: AccountId| locked.iter().find(|a| a.id() == id).expect("lock_many returns every id");
    let (source, dest) = (by_id(req.from), by_id(req.to));
    source.expect_currency(req.amount.currency())?;
    dest.expect_currency(req.amount.currency())?;
    let source_after = source.balance_after_debit(req.amount.amount())?;
    let dest_after = dest.balance_after_credit(req.amount.amount())?;
    let reference = format!("transfer:{}", req.key);
    let entry = journal::post(
        tx,
        EntryKind::Transfer,
        Some(&reference),
        req.amount.currency(),
        &[
            Leg { account: source.id(), amount_minor: -req.amount.minor(), balance_after_minor: Some(source_after) },
            Leg { account: dest.id(), amount_minor: req.amount.minor(), balance_after_minor: Some(dest_after) },
        ],
    )?;
    accounts::set_balance(tx, source, source_after)?;
    accounts::set_balance(tx, dest, dest_after)?;
    idempotency::finish(tx, &req.key, entry.get())?;
    let mut balances = vec![
        Balance { account: source.id(), balance_minor: source_after },
        Balance { account: dest.id(), balance_minor: dest_after },
    ];
    balances.sort_by_key(|b| b.account);
    Ok(Receipt::created(entry, balances))
}
