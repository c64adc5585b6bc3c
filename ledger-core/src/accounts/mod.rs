//! Accounts: opening, reading, locking (`FOR NO KEY UPDATE`, in ascending id order) and
//! writing a locked account's balance.

use diesel::pg::PgConnection;
use diesel::prelude::*;

use crate::error::{InvalidInput, LedgerError};
use crate::idempotency::{self, Begun};
use crate::ids::{AccountId, IdempotencyKey};
use crate::money::{Amount, Currency};
use crate::schema::accounts;
use crate::tx::{Tx, TxOptions};

mod limits;
mod lock;
pub use limits::{overdraft_ceiling, set_overdraft_ceiling};
pub(crate) use lock::set_balance;
pub(crate) use lock::{judge_locked, rebuild_refusal};
pub use lock::{lock, lock_all, lock_even_if_closed, lock_many, LockedAccount};

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

/// Closes an account. Only an account with a zero balance can be closed.
pub fn close(conn: &mut PgConnection, id: AccountId) -> Result<Account, LedgerError> {
    crate::tx::transaction(conn, &TxOptions::default(), |tx| {
        let account = lock(tx, id)?;
        if account.balance_minor() != 0 {
            return Err(LedgerError::Invalid(InvalidInput::BadField {
                field: "account",
                reason: format!("account {id} still holds {}", account.account().balance_display()),
            }));
        }
        diesel::update(accounts::table.find(id.get())).set(accounts::status.eq("closed")).execute(tx.conn())?;
        get(tx.conn(), id)
    })
}
