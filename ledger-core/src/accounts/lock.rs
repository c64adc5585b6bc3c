//! Locking accounts (`FOR NO KEY UPDATE`, several always in ascending id order) and
//! writing a locked account's balance: a [`LockedAccount`] is made only here, so a
//! balance is only ever written under its row lock.

use diesel::prelude::*;

use super::{Account, AccountKind, AccountRow, AccountStatus};
use crate::error::{InvalidInput, LedgerError};
use crate::ids::AccountId;
use crate::money::{Amount, Currency};
use crate::schema::accounts;
use crate::tx::{LockSet, Tx};

/// A customer account whose row this transaction holds `FOR NO KEY UPDATE`. Only the lock
/// functions below make one, so a balance can only be written under its lock.
#[derive(Clone, Debug)]
pub struct LockedAccount {
    account: Account,
}

impl LockedAccount {
    /// A locked account for pure unit tests of decisions (no database, no lock).
    #[cfg(test)]
    pub(crate) fn for_tests(account: Account) -> LockedAccount {
        LockedAccount { account }
    }

    /// The account as read under the lock (with balances this transaction noted since).
    pub fn account(&self) -> &Account {
        &self.account
    }
    /// The account's id.
    pub fn id(&self) -> AccountId {
        self.account.id
    }
    /// The account's currency.
    pub fn currency(&self) -> Currency {
        self.account.currency
    }
    /// The balance under the lock, in minor units.
    pub fn balance_minor(&self) -> i64 {
        self.account.balance_minor
    }

    /// The balance after taking `amount` out, if that stays at or above the floor.
    pub fn balance_after_debit(&self, amount: Amount) -> Result<i64, LedgerError> {
        self.account.balance_after_debit(amount)
    }

    /// Records a balance this transaction has written (see `set_balance`), for callers
    /// that keep the lock and make several movements on the account.
    pub(crate) fn note_balance(&mut self, balance_minor: i64) {
        self.account.balance_minor = balance_minor;
    }

    /// The balance after putting `amount` in ([`LedgerError::BalanceOverflow`] past `i64`).
    pub fn balance_after_credit(&self, amount: Amount) -> Result<i64, LedgerError> {
        self.account.balance_minor.checked_add(amount.minor()).ok_or(LedgerError::BalanceOverflow(self.account.id))
    }

    /// Checks the account can take part in a movement in `currency`.
    pub fn expect_currency(&self, currency: Currency) -> Result<(), LedgerError> {
        self.account.expect_currency(currency)
    }
}

fn locked(row: AccountRow) -> Result<LockedAccount, LedgerError> {
    let account = Account::try_from(row)?;
    if account.kind == AccountKind::System {
        return Err(LedgerError::SystemAccount(account.id));
    }
    if account.status == AccountStatus::Closed {
        return Err(LedgerError::AccountClosed(account.id));
    }
    Ok(LockedAccount { account })
}

/// Locks one customer account until the transaction ends. Concurrent lockers of the
/// same account wait here (bounded by the session's lock_timeout).
///
/// The lock is `FOR NO KEY UPDATE`, the row lock PostgreSQL's own UPDATE of a non-key
/// column takes. It excludes every other writer and locker of the row exactly like
/// `FOR UPDATE`, but not the `FOR KEY SHARE` locks that foreign-key checks take when a
/// hold referencing the account is inserted (a posting's, withdrawal's or payout's
/// account is checked by a statement trigger, without a lock). With plain `FOR UPDATE`,
/// a transaction that first inserted such a row (taking KEY SHARE) and then locked the
/// account would have to upgrade its lock past other transactions' KEY SHARE locks: a
/// deadlock that the 200-withdrawal race test reproduces.
pub fn lock(tx: &mut Tx<'_>, id: AccountId) -> Result<LockedAccount, LedgerError> {
    locked(lock_row(tx, id)?)
}

/// Locks a customer account even if it is closed: money owed back to a customer (a
/// returned payout) must reach the account whatever its status.
pub fn lock_even_if_closed(tx: &mut Tx<'_>, id: AccountId) -> Result<LockedAccount, LedgerError> {
    let account = Account::try_from(lock_row(tx, id)?)?;
    if account.kind == AccountKind::System {
        return Err(LedgerError::SystemAccount(account.id));
    }
    Ok(LockedAccount { account })
}

fn lock_row(tx: &mut Tx<'_>, id: AccountId) -> Result<AccountRow, LedgerError> {
    accounts::table
        .find(id.get())
        .select(AccountRow::as_select())
        .for_no_key_update()
        .first(tx.conn())
        .optional()?
        .ok_or(LedgerError::UnknownAccount(id))
}

/// Locks several customer accounts in ascending id order (the `LockSet` is sorted), in
/// one statement: PostgreSQL locks rows in the order `ORDER BY id` returns them.
/// Returns them in that order; fails with `UnknownAccount` if any is missing.
pub fn lock_many(tx: &mut Tx<'_>, set: &LockSet) -> Result<Vec<LockedAccount>, LedgerError> {
    lock_all(tx, set)?.into_iter().collect()
}

/// Locks every account in `set` in ascending id order, like [`lock_many`], but does not
/// judge them: closed, system or missing accounts are simply reported as they are, so
/// a batch can refuse the jobs that name them one by one.
pub fn lock_all(tx: &mut Tx<'_>, set: &LockSet) -> Result<Vec<Result<LockedAccount, LedgerError>>, LedgerError> {
    let ids: Vec<i64> = set.ids().map(AccountId::get).collect();
    let rows: Vec<AccountRow> = accounts::table
        .filter(accounts::id.eq_any(&ids))
        .order(accounts::id.asc())
        .select(AccountRow::as_select())
        .for_no_key_update()
        .load(tx.conn())?;
    Ok(judge_locked(set, rows))
}

/// The rows `set` locked (in ascending id order), judged as [`lock_all`] judges them.
pub(crate) fn judge_locked(set: &LockSet, rows: Vec<AccountRow>) -> Vec<Result<LockedAccount, LedgerError>> {
    assert!(rows.windows(2).all(|w| w[0].id < w[1].id), "locked out of order");
    let mut rows = rows.into_iter().peekable();
    let mut out = Vec::with_capacity(set.len());
    for id in set.ids() {
        match rows.next_if(|r| r.id == id) {
            Some(row) => out.push(locked(row)),
            None => out.push(Err(LedgerError::UnknownAccount(id))),
        }
    }
    out
}

/// The refusal an unusable account gives every movement that names it, again: account
/// errors are shared by all the items of a batch on that account, and errors are not Clone.
pub(crate) fn rebuild_refusal(e: &LedgerError) -> LedgerError {
    match e {
        LedgerError::UnknownAccount(id) => LedgerError::UnknownAccount(*id),
        LedgerError::AccountClosed(id) => LedgerError::AccountClosed(*id),
        LedgerError::SystemAccount(id) => LedgerError::SystemAccount(*id),
        other => LedgerError::Invalid(InvalidInput::BadField { field: "account", reason: other.to_string() }),
    }
}

/// Writes the new balance of an account this transaction has locked. Crate-private: a
/// balance changes only with the journal entry that moves it (the audit checks they agree).
pub(crate) fn set_balance(tx: &mut Tx<'_>, account: &LockedAccount, balance_minor: i64) -> Result<(), LedgerError> {
    assert!(balance_minor >= account.account.floor_minor(), "caller must check the floor before writing");
    let updated = diesel::update(accounts::table.find(account.id().get()))
        .set(accounts::balance_minor.eq(Some(balance_minor)))
        .execute(tx.conn())?;
    assert_eq!(updated, 1, "a locked account row must exist");
    Ok(())
}
