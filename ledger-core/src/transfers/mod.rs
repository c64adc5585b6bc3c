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
use crate::metadata::Metadata;
use crate::money::Money;
use crate::schema::{journal_entries, postings};
use crate::tx::{self, LockSet, Tx, TxOptions};

mod batch;
mod coalesce;
mod plan;

pub use batch::{create_batch, create_batch_tx, create_batch_with, TransferResult};
pub use coalesce::{
    Coalescer, CoalescerConfig, CoalescerStats, SubmitError, MAX_COMMITTERS, MAX_LINGER, MAX_QUEUE_CAPACITY,
};

/// A request to move money from one customer account to another.
#[derive(Clone, Debug)]
pub struct Transfer {
    /// The account debited: open, a customer's, able to go down by `amount` without
    /// passing its floor (0, or minus its overdraft limit).
    pub from: AccountId,
    /// The account credited: open, a customer's, not `from`.
    pub to: AccountId,
    /// How much, in which currency; the accounts must hold that currency.
    pub amount: Money,
    /// Makes the transfer safe to send again: the same transfer under the same key
    /// replays the first answer; another request under it is
    /// [`LedgerError::IdempotencyConflict`].
    pub key: IdempotencyKey,
    /// The caller's JSON object, stored on the transfer's entry and returned with it.
    pub metadata: Option<Metadata>,
}

impl Transfer {
    /// A transfer without metadata.
    pub fn new(from: AccountId, to: AccountId, amount: Money, key: IdempotencyKey) -> Transfer {
        Transfer { from, to, amount, key, metadata: None }
    }

    /// The same transfer with `metadata` on its entry.
    pub fn with_metadata(mut self, metadata: Metadata) -> Transfer {
        self.metadata = Some(metadata);
        self
    }

    /// The request as its idempotency key remembers it: the same key with another
    /// fingerprint is a conflict. Metadata is part of the request; without it the
    /// fingerprint is what it was before metadata existed, so keys used then still match.
    pub(crate) fn fingerprint(&self) -> String {
        let mut text = format!(
            "from={}|to={}|amount={}|currency={}",
            self.from,
            self.to,
            self.amount.minor(),
            self.amount.currency()
        );
        if let Some(m) = &self.metadata {
            text.push_str("|metadata=");
            text.push_str(m.as_str());
        }
        text
    }
}

/// A transfer as written, read back by its entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferRecord {
    /// The transfer's journal entry.
    pub entry: EntryId,
    /// The account debited.
    pub from: AccountId,
    /// The account credited.
    pub to: AccountId,
    /// The amount moved.
    pub amount: Money,
    /// The caller's idempotency key, as the entry's reference remembers it.
    pub key: String,
    /// The caller's metadata, if the transfer carried any.
    pub metadata: Option<Metadata>,
    /// When the entry was written (its transaction's start).
    pub created_at: std::time::SystemTime,
}

/// The transfer written under `entry` (from a [`Receipt`] or a [`TransferResult`]), with
/// its metadata. Another kind of entry, or none, is [`LedgerError::UnknownTransfer`].
pub fn get(conn: &mut PgConnection, entry: EntryId) -> Result<TransferRecord, LedgerError> {
    use diesel::prelude::*;
    let unknown = || LedgerError::UnknownTransfer(entry);
    let created_us = diesel::dsl::sql::<diesel::sql_types::BigInt>("(EXTRACT(EPOCH FROM created_at) * 1000000)::int8");
    let (reference, metadata, created_us): (Option<String>, Option<String>, i64) = journal_entries::table
        .filter(journal_entries::id.eq(entry.get()))
        .filter(journal_entries::kind.eq(EntryKind::Transfer.as_str()))
        .select((journal_entries::reference, journal_entries::metadata, created_us))
        .first(conn)
        .optional()?
        .ok_or_else(unknown)?;
    let legs: Vec<(i64, String, i64)> = postings::table
        .filter(postings::entry_id.eq(entry.get()))
        .select((postings::account_id, postings::currency, postings::amount_minor))
        .load(conn)?;
    let inconsistent = || LedgerError::Inconsistent(format!("transfer entry {entry} has not one debit and one credit"));
    let [(a, currency, a_minor), (b, _, b_minor)] = <[_; 2]>::try_from(legs).map_err(|_| inconsistent())?;
    let ((from, _), (to, to_minor)) =
        if a_minor < 0 { ((a, a_minor), (b, b_minor)) } else { ((b, b_minor), (a, a_minor)) };
    let currency = crate::money::Currency::from_code(&currency)?;
    Ok(TransferRecord {
        entry,
        from: AccountId::from_db(from),
        to: AccountId::from_db(to),
        amount: Money::from_minor(to_minor, currency).map_err(|_| inconsistent())?,
        key: reference.as_deref().and_then(|r| r.strip_prefix("transfer:")).unwrap_or_default().to_string(),
        metadata: metadata.map(Metadata::from_stored).transpose()?,
        created_at: crate::history::from_unix_micros(created_us),
    })
}

/// Moves `req.amount` from `req.from` to `req.to` in a transaction of its own (retried
/// on transient errors), both accounts locked in ascending id order. The receipt has
/// both balances right after the transfer; a replay of an earlier call under the same
/// key writes nothing and answers as the first call did. Refusals ([`LedgerError`]):
/// `SameAccount`, `UnknownAccount`, `AccountClosed`, `SystemAccount`,
/// `CurrencyMismatch`, `InsufficientFunds`, `BalanceOverflow`, `IdempotencyConflict`;
/// nothing is written for any of them.
pub fn transfer(conn: &mut PgConnection, req: &Transfer) -> Result<Receipt, LedgerError> {
    transfer_with(conn, &TxOptions::default(), req)
}

/// [`transfer`] with the caller's transaction options (retries, lock timeout).
pub fn transfer_with(conn: &mut PgConnection, opts: &TxOptions, req: &Transfer) -> Result<Receipt, LedgerError> {
    if req.from == req.to {
        return Err(LedgerError::SameAccount(req.from));
    }
    tx::transaction(conn, opts, |tx| transfer_tx(tx, req))
}

/// [`transfer`] inside the caller's transaction: nothing is retried, and the accounts
/// stay locked until that transaction ends. On `Err` it may have written part of its
/// work (its idempotency key): roll back, or call it in a [`Tx::savepoint`].
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
    let entry = journal::post_with(
        tx,
        EntryKind::Transfer,
        Some(&reference),
        req.metadata.as_ref(),
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
