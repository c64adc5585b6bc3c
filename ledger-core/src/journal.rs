//! The double-entry journal: entries whose postings sum to zero, and statements.

use diesel::pg::PgConnection;
use diesel::prelude::*;

use crate::error::LedgerError;
use crate::ids::{AccountId, EntryId};
use crate::metadata::Metadata;
use crate::money::Currency;
use crate::schema::{journal_entries, postings};
use crate::tx::Tx;

/// What a journal entry records, stored in `journal_entries.kind`. Each kind moves
/// money between fixed kinds of accounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)]
#[diesel(sql_type = diesel::sql_types::Text)]
pub enum EntryKind {
    /// Money paid in: external funding -> the customer.
    Deposit,
    /// A withdrawal's debit: the customer -> payouts in transit, written with the
    /// payout's outbox row.
    Withdrawal,
    /// Between two customer accounts of one currency.
    Transfer,
    /// Payouts the gateway paid: payouts in transit -> external settlement. One entry
    /// per currency moves the sum of the payouts settled together.
    PayoutSettlement,
    /// A refused (or operator-returned) payout: payouts in transit -> the customer.
    PayoutReturn,
    /// A hold: the amount from the payer into holds-pending.
    Hold,
    /// A hold's post: out of holds-pending, the posted part to the payee, the rest back.
    HoldPost,
    /// A hold's void: out of holds-pending, all back to the payer.
    HoldVoid,
    /// A hold voided by the expiry loop once its timeout passed.
    HoldExpiry,
}

crate::text_column!(EntryKind {
    Deposit => "deposit",
    Withdrawal => "withdrawal",
    Transfer => "transfer",
    PayoutSettlement => "payout_settlement",
    PayoutReturn => "payout_return",
    Hold => "hold",
    HoldPost => "hold_post",
    HoldVoid => "hold_void",
    HoldExpiry => "hold_expiry",
});

/// One leg of an entry. Positive `amount_minor` raises the account's balance.
#[derive(Clone, Debug)]
pub struct Leg {
    /// The account the posting belongs to.
    pub account: AccountId,
    /// The signed change, in minor units of the entry's currency; never 0.
    pub amount_minor: i64,
    /// The customer account's balance after this leg; `None` for system accounts.
    pub balance_after_minor: Option<i64>,
}

/// Writes one balanced entry and all its postings (in one INSERT, which the
/// `postings_balanced` trigger checks as a whole).
pub fn post(
    tx: &mut Tx<'_>,
    kind: EntryKind,
    reference: Option<&str>,
    currency: Currency,
    legs: &[Leg],
) -> Result<EntryId, LedgerError> {
    post_with(tx, kind, reference, None, currency, legs)
}

/// [`post`], with the caller's metadata on the entry.
pub fn post_with(
    tx: &mut Tx<'_>,
    kind: EntryKind,
    reference: Option<&str>,
    metadata: Option<&Metadata>,
    currency: Currency,
    legs: &[Leg],
) -> Result<EntryId, LedgerError> {
    // Programmer errors, not operating errors: callers build legs from checked amounts.
    assert!(legs.len() >= 2, "an entry needs at least two legs");
    assert!(legs.iter().all(|l| l.amount_minor != 0), "zero legs are meaningless");
    let total = legs.iter().try_fold(0_i64, |acc, l| acc.checked_add(l.amount_minor));
    assert_eq!(total, Some(0), "entry legs must sum to zero: {legs:?}");

    let entry_id: i64 = diesel::insert_into(journal_entries::table)
        .values((
            journal_entries::kind.eq(kind.as_str()),
            journal_entries::reference.eq(reference),
            journal_entries::metadata.eq(metadata.map(Metadata::as_str)),
        ))
        .returning(journal_entries::id)
        .get_result(tx.conn())?;
    let rows: Vec<_> = legs
        .iter()
        .map(|l| {
            (
                postings::entry_id.eq(entry_id),
                postings::account_id.eq(l.account.get()),
                postings::currency.eq(currency.code()),
                postings::amount_minor.eq(l.amount_minor),
                postings::balance_after_minor.eq(l.balance_after_minor),
            )
        })
        .collect();
    let written = diesel::insert_into(postings::table).values(&rows).execute(tx.conn())?;
    assert_eq!(written, legs.len());
    Ok(EntryId::from_db(entry_id))
}

/// A customer account's balance right after an entry (minor units of the entry's
/// currency): every write answers with these for the accounts it touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Balance {
    /// The customer account.
    pub account: AccountId,
    /// Its balance right after the entry, in minor units.
    pub balance_minor: i64,
}

/// The answer to a single write: its journal entry, whether this call replayed an
/// earlier one, and the balances of the customer accounts it touched right after that
/// entry (for a replay, after the first call's entry: the same answer again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The write's journal entry (the first call's, for a replay).
    pub entry: EntryId,
    /// Whether this call wrote nothing and answered for an earlier call under the same
    /// idempotency key.
    pub replayed: bool,
    /// The customer accounts the entry touched, in ascending id order, each with its
    /// balance right after the entry (not the balance now).
    pub balances: Vec<Balance>,
}

impl Receipt {
    /// A write just made, with the balances it wrote.
    pub(crate) fn created(entry: EntryId, balances: Vec<Balance>) -> Receipt {
        Receipt { entry, replayed: false, balances }
    }

    /// An earlier write, read back ([`balances_after`]).
    pub(crate) fn replayed(conn: &mut PgConnection, entry: EntryId) -> Result<Receipt, LedgerError> {
        Ok(Receipt { entry, replayed: true, balances: balances_after(conn, entry)? })
    }

    /// The balance of `account` right after the entry, if the write touched it.
    pub fn balance_of(&self, account: AccountId) -> Option<i64> {
        self.balances.iter().find(|b| b.account == account).map(|b| b.balance_minor)
    }
}

/// The balances of the customer accounts an entry touched, right after it, by account
/// id (its customer postings carry them). For any entry: a withdrawal's debit
/// (`Withdrawal::entry_id`) as well as a deposit or a transfer.
pub fn balances_after(conn: &mut PgConnection, entry: EntryId) -> Result<Vec<Balance>, LedgerError> {
    let rows: Vec<(i64, Option<i64>)> = postings::table
        .filter(postings::entry_id.eq(entry.get()))
        .filter(postings::balance_after_minor.is_not_null())
        .order(postings::account_id)
        .select((postings::account_id, postings::balance_after_minor))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .filter_map(|(account, after)| Some(Balance { account: AccountId::from_db(account), balance_minor: after? }))
        .collect())
}

/// One line of an account statement.
#[derive(Clone, Debug, PartialEq, Eq, Queryable)]
pub struct StatementLine {
    /// The posting's id: lines are in ascending id order.
    pub posting_id: i64,
    /// The entry the posting belongs to.
    pub entry_id: EntryId,
    /// What the entry records.
    pub kind: EntryKind,
    /// The entry's reference as stored (e.g. `transfer:<key>`), if any.
    pub reference: Option<String>,
    /// The signed change, in minor units: positive raised the balance.
    pub amount_minor: i64,
    /// The running balance after this line, in minor units.
    pub balance_after_minor: i64,
}

/// The account's postings, oldest first, with the running balance after each. For a
/// customer account the running balance is the stored `balance_after_minor`; for a
/// system account it is computed. At most `limit` lines; a `limit` below 1 is refused.
pub fn statement(conn: &mut PgConnection, account: AccountId, limit: i64) -> Result<Vec<StatementLine>, LedgerError> {
    let limit = crate::input::positive_limit(limit)?;
    type Row = (i64, EntryId, EntryKind, Option<String>, i64, Option<i64>);
    let rows: Vec<Row> = postings::table
        .inner_join(journal_entries::table)
        .filter(postings::account_id.eq(account.get()))
        .order(postings::id.asc())
        .limit(limit)
        .select((
            postings::id,
            postings::entry_id,
            journal_entries::kind,
            journal_entries::reference,
            postings::amount_minor,
            postings::balance_after_minor,
        ))
        .load(conn)?;
    let mut running: i64 = 0;
    let mut lines = Vec::with_capacity(rows.len());
    for (posting_id, entry_id, kind, reference, amount_minor, stored_after) in rows {
        running = running.checked_add(amount_minor).ok_or(LedgerError::BalanceOverflow(account))?;
        let balance_after_minor = stored_after.unwrap_or(running);
        lines.push(StatementLine { posting_id, entry_id, kind, reference, amount_minor, balance_after_minor });
    }
    Ok(lines)
}
