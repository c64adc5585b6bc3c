//! Accounts: opening, reading, locking (`FOR UPDATE`, in ascending id order) and
//! writing a locked account's balance.

use diesel::pg::PgConnection;
use diesel::prelude::*;

use crate::error::{InvalidInput, LedgerError};
use crate::idempotency::{self, Begun};
use crate::ids::{AccountId, IdempotencyKey};
use crate::money::{Amount, Currency};
use crate::schema::accounts;
use crate::tx::{LockSet, Tx, TxOptions};

mod limits;
pub use limits::{overdraft_ceiling, set_overdraft_ceiling};

/// Whose account it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)]
#[diesel(sql_type = diesel::sql_types::Text)]
pub enum AccountKind {
    /// A customer's: has a floor, moves only by deposits, transfers, holds and withdrawals.
    Customer,
    /// The ledger's own (see [`SystemRole`]): the other side of money entering and leaving.
    System,
}

/// Whether the account takes part in new movements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)]
#[diesel(sql_type = diesel::sql_types::Text)]
pub enum AccountStatus {
    /// Takes part in movements.
    Open,
    /// Refuses every new movement; its history stays.
    Closed,
}

/// The system accounts money flows through, one of each per currency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)]
#[diesel(sql_type = diesel::sql_types::Text)]
pub enum SystemRole {
    /// Where deposits come from: its balance is minus what the outside world paid in.
    ExternalFunding,
    /// Withdrawn funds waiting for their payout to settle.
    PayoutsInTransit,
    /// Where settled payouts go: its balance is what has left the ledger.
    ExternalSettlement,
    /// Held funds of pending holds (`holds`), until they are posted, voided or expire:
    /// its balance is the sum of the pending holds in its currency.
    HoldsPending,
}

crate::text_column!(SystemRole {
    ExternalFunding => "external_funding",
    PayoutsInTransit => "payouts_in_transit",
    ExternalSettlement => "external_settlement",
    HoldsPending => "holds_pending",
});

crate::text_column!(AccountKind {
    Customer => "customer",
    System => "system",
});

crate::text_column!(AccountStatus {
    Open => "open",
    Closed => "closed",
});

/// An account row as locked (also read by name from a batch's combined claim-and-lock).
#[derive(Queryable, QueryableByName, Selectable, Debug, Clone)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg))]
pub(crate) struct AccountRow {
    id: AccountId,
    owner: String,
    currency: Currency,
    kind: AccountKind,
    balance_minor: Option<i64>,
    overdraft_limit_minor: i64,
    status: AccountStatus,
}

/// An account as stored. For system accounts `balance_minor` is computed from postings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// The account's id.
    pub id: AccountId,
    /// Who it belongs to, as given when opened (a system role's name for system accounts).
    pub owner: String,
    /// The one currency it holds.
    pub currency: Currency,
    /// Customer or system.
    pub kind: AccountKind,
    /// The posted balance, in minor units of `currency`.
    pub balance_minor: i64,
    /// How far below zero the balance may go (0: no overdraft).
    pub overdraft_limit_minor: i64,
    /// Open or closed.
    pub status: AccountStatus,
}

impl Account {
    /// The balance after taking `amount` out, if that stays at or above the floor.
    pub fn balance_after_debit(&self, amount: Amount) -> Result<i64, LedgerError> {
        let after = self.balance_minor.checked_sub(amount.minor()).ok_or(LedgerError::BalanceOverflow(self.id))?;
        if after < self.floor_minor() {
            return Err(LedgerError::InsufficientFunds {
                account: self.id,
                currency: self.currency,
                balance_minor: self.balance_minor,
                floor_minor: self.floor_minor(),
                requested_minor: amount.minor(),
            });
        }
        Ok(after)
    }

    /// Checks the account can take part in a movement in `currency`.
    pub fn expect_currency(&self, currency: Currency) -> Result<(), LedgerError> {
        if self.currency != currency {
            return Err(LedgerError::CurrencyMismatch {
                account: self.id,
                account_currency: self.currency.code().to_string(),
                request_currency: currency.code().to_string(),
            });
        }
        Ok(())
    }

    /// The lowest balance the account may reach: 0, or minus its overdraft limit.
    pub fn floor_minor(&self) -> i64 {
        -self.overdraft_limit_minor
    }

    /// Decimal balance in the account's currency, e.g. "100.00".
    pub fn balance_display(&self) -> String {
        self.currency.format_minor(self.balance_minor)
    }
}

impl TryFrom<AccountRow> for Account {
    type Error = LedgerError;
    fn try_from(row: AccountRow) -> Result<Self, LedgerError> {
        Ok(Account {
            id: row.id,
            owner: row.owner,
            currency: row.currency,
            kind: row.kind,
            balance_minor: row.balance_minor.unwrap_or(0),
            overdraft_limit_minor: row.overdraft_limit_minor,
            status: row.status,
        })
    }
}

/// A customer account whose row this transaction holds `FOR UPDATE`. Only the lock
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
    pub fn note_balance(&mut self, balance_minor: i64) {
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

/// What to open.
#[derive(Clone, Debug)]
pub struct NewAccount {
    /// Who it belongs to: 1 to 200 characters, no control characters.
    pub owner: String,
    /// The one currency it will hold.
    pub currency: Currency,
    /// How far below zero the balance may go (0: no overdraft).
    pub overdraft_limit_minor: i64,
}

impl NewAccount {
    /// An account for `owner` in `currency`, without overdraft.
    pub fn new(owner: impl Into<String>, currency: Currency) -> NewAccount {
        NewAccount { owner: owner.into(), currency, overdraft_limit_minor: 0 }
    }

    /// The same account allowed `limit_minor` below zero (at most the overdraft ceiling,
    /// see [`overdraft_ceiling`]).
    pub fn with_overdraft(mut self, limit_minor: i64) -> NewAccount {
        self.overdraft_limit_minor = limit_minor;
        self
    }

    fn validate(&self) -> Result<(), InvalidInput> {
        let len = self.owner.chars().count();
        if len == 0 || len > 200 || self.owner.chars().any(char::is_control) {
            return Err(InvalidInput::BadField {
                field: "owner",
                reason: "1 to 200 characters, no control characters".into(),
            });
        }
        if self.overdraft_limit_minor < 0 {
            return Err(InvalidInput::BadField { field: "overdraft limit", reason: "must not be negative".into() });
        }
        Ok(())
    }

    fn fingerprint(&self) -> String {
        format!("owner={}|currency={}|overdraft={}", self.owner, self.currency, self.overdraft_limit_minor)
    }
}

/// Opens a customer account with a zero balance. With a key, opening is idempotent.
pub fn open(conn: &mut PgConnection, new: &NewAccount, key: Option<&IdempotencyKey>) -> Result<Account, LedgerError> {
    new.validate()?;
    crate::tx::transaction(conn, &TxOptions::default(), |tx| open_tx(tx, new, key))
}

/// [`open`] inside the caller's transaction.
pub fn open_tx(tx: &mut Tx<'_>, new: &NewAccount, key: Option<&IdempotencyKey>) -> Result<Account, LedgerError> {
    new.validate()?;
    if let Some(key) = key {
        if let Begun::Replay(id) = idempotency::begin(tx, key, "open_account", &new.fingerprint())? {
            return get(tx.conn(), AccountId::from_db(id));
        }
    }
    if new.overdraft_limit_minor > 0 {
        let ceiling = overdraft_ceiling(tx.conn(), new.currency)?;
        if new.overdraft_limit_minor > ceiling {
            return Err(LedgerError::Invalid(InvalidInput::BadField {
                field: "overdraft limit",
                reason: format!(
                    "{} {} is above this ledger's ceiling of {} {} (migrate --max-overdraft changes it)",
                    new.currency.format_minor(new.overdraft_limit_minor),
                    new.currency,
                    new.currency.format_minor(ceiling),
                    new.currency
                ),
            }));
        }
    }
    let row: AccountRow = diesel::insert_into(accounts::table)
        .values((
            accounts::owner.eq(&new.owner),
            accounts::currency.eq(new.currency.code()),
            accounts::kind.eq("customer"),
            accounts::balance_minor.eq(Some(0_i64)),
            accounts::overdraft_limit_minor.eq(new.overdraft_limit_minor),
        ))
        .returning(AccountRow::as_returning())
        .get_result(tx.conn())?;
    if let Some(key) = key {
        idempotency::finish(tx, key, row.id.get())?;
    }
    Account::try_from(row)
}

/// Reads an account (no lock). System accounts report the sum of their postings.
pub fn get(conn: &mut PgConnection, id: AccountId) -> Result<Account, LedgerError> {
    let row: AccountRow = accounts::table
        .find(id.get())
        .select(AccountRow::as_select())
        .first(conn)
        .optional()?
        .ok_or(LedgerError::UnknownAccount(id))?;
    let mut account = Account::try_from(row)?;
    if account.kind == AccountKind::System {
        account.balance_minor = system_balance(conn, id)?;
    }
    Ok(account)
}

/// The balance of a system account: the sum of its postings.
pub fn system_balance(conn: &mut PgConnection, id: AccountId) -> Result<i64, LedgerError> {
    #[derive(QueryableByName)]
    struct Sum {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        total: i64,
    }
    let row: Sum =
        diesel::sql_query("SELECT COALESCE(SUM(amount_minor), 0)::bigint AS total FROM postings WHERE account_id = $1")
            .bind::<diesel::sql_types::BigInt, _>(id.get())
            .get_result(conn)?;
    Ok(row.total)
}

/// The id of the system account playing `role` for `currency` (seeded by migration).
pub fn system_account(conn: &mut PgConnection, role: SystemRole, currency: Currency) -> Result<AccountId, LedgerError> {
    let id: i64 = accounts::table
        .filter(accounts::system_role.eq(role.as_str()))
        .filter(accounts::currency.eq(currency.code()))
        .select(accounts::id)
        .first(conn)?;
    Ok(AccountId::from_db(id))
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
/// posting or withdrawal referencing the account is inserted. With plain `FOR UPDATE`,
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

/// Writes the new balance of an account this transaction has locked.
pub fn set_balance(tx: &mut Tx<'_>, account: &LockedAccount, balance_minor: i64) -> Result<(), LedgerError> {
    assert!(balance_minor >= account.account.floor_minor(), "caller must check the floor before writing");
    let updated = diesel::update(accounts::table.find(account.id().get()))
        .set(accounts::balance_minor.eq(Some(balance_minor)))
        .execute(tx.conn())?;
    assert_eq!(updated, 1, "a locked account row must exist");
    Ok(())
}

/// Closes an account. Only an account with a zero balance can be closed.
pub fn close(conn: &mut PgConnection, id: AccountId) -> Result<Account, LedgerError> {
    crate::tx::transaction(conn, &TxOptions::default(), |tx| {
        let account = lock(tx, id)?;
        if account.balance_minor() != 0 {
            return Err(LedgerError::Invalid(InvalidInput::BadField {
                field: "account",
                reason: format!("account {id} still holds {}", account.account.balance_display()),
            }));
        }
        diesel::update(accounts::table.find(id.get())).set(accounts::status.eq("closed")).execute(tx.conn())?;
        get(tx.conn(), id)
    })
}
