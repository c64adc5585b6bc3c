//! The double-entry journal: entries whose postings sum to zero, and statements.

use diesel::pg::PgConnection;
use diesel::prelude::*;

use crate::error::LedgerError;
use crate::ids::{AccountId, EntryId};
use crate::money::Currency;
use crate::schema::{journal_entries, postings};
use crate::tx::Tx;

#[derive(Clone, Copy, Debug, PartialEq, Eq, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)]
#[diesel(sql_type = diesel::sql_types::Text)]
pub enum EntryKind {
    Deposit,
    Withdrawal,
    Transfer,
    PayoutSettlement,
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
    pub account: AccountId,
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
    // Programmer errors, not operating errors: callers build legs from checked amounts.
    assert!(legs.len() >= 2, "an entry needs at least two legs");
    assert!(legs.iter().all(|l| l.amount_minor != 0), "zero legs are meaningless");
    let total = legs.iter().try_fold(0_i64, |acc, l| acc.checked_add(l.amount_minor));
    assert_eq!(total, Some(0), "entry legs must sum to zero: {legs:?}");

    let entry_id: i64 = diesel::insert_into(journal_entries::table)
        .values((journal_entries::kind.eq(kind.as_str()), journal_entries::reference.eq(reference)))
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

/// One line of an account statement.
#[derive(Clone, Debug, PartialEq, Eq, Queryable)]
pub struct StatementLine {
    pub posting_id: i64,
    pub entry_id: EntryId,
    pub kind: EntryKind,
    pub reference: Option<String>,
    pub amount_minor: i64,
    /// The running balance after this line.
    pub balance_after_minor: i64,
}

/// The account's postings, oldest first, with the running balance after each. For a
/// customer account the running balance is the stored `balance_after_minor`; for a
/// system account it is computed.
pub fn statement(conn: &mut PgConnection, account: AccountId, limit: i64) -> Result<Vec<StatementLine>, LedgerError> {
    assert!(limit > 0, "a statement needs a positive limit");
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
