//! Many deposits in one transaction, one result per item ([`create_batch`]), with the
//! contract of [`crate::transfers::create_batch`]: keys claimed in one statement, the
//! credited accounts locked in one statement in ascending id order, every item decided
//! in memory in order (linked chains all-or-nothing), and the created deposits written
//! in one set-based statement: each a balanced entry exactly like [`super::deposit_tx`]'s
//! (the currency's external-funding leg, then the customer's leg with its balance after).

use std::collections::HashMap;

use diesel::pg::PgConnection;
use diesel::prelude::*;

use crate::accounts::{self, SystemRole};
use crate::batch::{self, Item};
use crate::batch_plan::entries::{self, Columns, Movement};
use crate::batch_plan::{self, decide_all, Decided, KeyBefore, KeyUse, State};
use crate::error::LedgerError;
use crate::ids::{AccountId, EntryId};
use crate::journal::EntryKind;
use crate::schema::accounts as accounts_table;
use crate::tx::{self, LockSet, Tx, TxOptions};

use super::Deposit;

/// What became of one deposit of a batch.
#[derive(Debug)]
pub enum DepositResult {
    /// Written: its entry, and the account's balance right after it (later items of the
    /// batch may move it again).
    Created {
        /// The deposit's journal entry.
        entry: EntryId,
        /// The credited account's balance right after this item, in minor units.
        balance_minor: i64,
    },
    /// Its key was used before for the same deposit (by an earlier call, single or
    /// batch, or an earlier item of this batch): nothing was written.
    Replayed {
        /// The entry of the deposit first made under the key.
        entry: EntryId,
    },
    /// Refused, and why; nothing of it was written and its key stays unused. In a failed
    /// linked chain every item is refused, a replay too.
    Refused(LedgerError),
}

impl DepositResult {
    /// The entry written or replayed; `None` if refused.
    pub fn entry(&self) -> Option<EntryId> {
        match self {
            DepositResult::Created { entry, .. } | DepositResult::Replayed { entry } => Some(*entry),
            DepositResult::Refused(_) => None,
        }
    }
}

/// Makes a batch of deposits in one transaction of its own (retried as a whole on
/// transient errors), one result per item in the batch's order. Linked items succeed or
/// fail with their chain ([`crate::batch`]). At most [`batch::MAX_BATCH_ITEMS`] items;
/// `Err` only when the batch as a whole could not run (then nothing was written).
pub fn create_batch(conn: &mut PgConnection, items: &[Item<Deposit>]) -> Result<Vec<DepositResult>, LedgerError> {
    create_batch_with(conn, &TxOptions::default(), items)
}

/// [`create_batch`] with the caller's transaction options (retries, timeouts).
pub fn create_batch_with(
    conn: &mut PgConnection,
    opts: &TxOptions,
    items: &[Item<Deposit>],
) -> Result<Vec<DepositResult>, LedgerError> {
    batch::check_size(items)?;
    tx::transaction(conn, opts, |tx| create_batch_tx(tx, items))
}

/// [`create_batch`] inside the caller's transaction.
pub fn create_batch_tx(tx: &mut Tx<'_>, items: &[Item<Deposit>]) -> Result<Vec<DepositResult>, LedgerError> {
    batch::check_size(items)?;
    if items.is_empty() {
        return Ok(vec![]);
    }
    tx::with_batch_plans(tx, |tx| create_planned(tx, items))
}

fn create_planned(tx: &mut Tx<'_>, items: &[Item<Deposit>]) -> Result<Vec<DepositResult>, LedgerError> {
    let requests = items.iter().map(|i| (i.request.key.as_str(), i.request.fingerprint()));
    let keys = batch_plan::claim_keys(tx, "deposit", requests)?;
    let fresh: Vec<&Deposit> =
        items.iter().map(|i| &i.request).filter(|d| keys.get(d.key.as_str()) == Some(&KeyBefore::Fresh)).collect();
    let lock_set: LockSet = fresh.iter().map(|d| d.account).collect();
    let funding = funding_accounts(tx, &fresh)?;
    let mut locked: HashMap<AccountId, _> = lock_set.ids().zip(accounts::lock_all(tx, &lock_set)?).collect();
    let mut state = State::new("deposit", &keys, &mut locked);
    let decided = decide_all(items, &mut state, |state, index, d| decide(state, &funding, index, d));
    let (balances, unused_keys) = state.finish();
    let mut cols = Columns::default();
    for (item, d) in items.iter().zip(&decided) {
        if let Ok(Decided::Create((funding, after))) = d {
            let r = &item.request;
            cols.push(Movement {
                key: r.key.as_str(),
                fingerprint: r.fingerprint(),
                from: *funding,
                to: r.account,
                currency: r.amount.currency().code(),
                amount_minor: r.amount.minor(),
                from_after: None,
                to_after: *after,
                metadata: None,
            });
        }
    }
    let written = entries::write(tx, EntryKind::Deposit, &cols, &balances, &unused_keys)?;
    let ids = written.into_iter().map(EntryId::get).collect();
    Ok(batch_plan::results(
        decided,
        ids,
        |entry, (_, balance_minor)| DepositResult::Created { entry: EntryId::from_db(entry), balance_minor },
        |entry| DepositResult::Replayed { entry: EntryId::from_db(entry) },
        DepositResult::Refused,
    ))
}

/// The external-funding system account of every currency the fresh deposits name, in
/// one query.
fn funding_accounts(tx: &mut Tx<'_>, fresh: &[&Deposit]) -> Result<HashMap<String, AccountId>, LedgerError> {
    let mut codes: Vec<String> = fresh.iter().map(|d| d.amount.currency().code().to_string()).collect();
    codes.sort_unstable();
    codes.dedup();
    if codes.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, i64)> = accounts_table::table
        .filter(accounts_table::system_role.eq(SystemRole::ExternalFunding.as_str()))
        .filter(accounts_table::currency.eq_any(&codes))
        .select((accounts_table::currency, accounts_table::id))
        .load(tx.conn())?;
    Ok(rows.into_iter().map(|(c, id)| (c, AccountId::from_db(id))).collect())
}

/// One deposit decided as [`super::deposit_tx`] would: its key, the account (a locked
/// open customer account of the deposit's currency), the balance after the credit.
fn decide(
    state: &mut State<'_>,
    funding: &HashMap<String, AccountId>,
    index: usize,
    d: &Deposit,
) -> Result<Decided<(AccountId, i64)>, LedgerError> {
    let fingerprint = d.fingerprint();
    let key = d.key.as_str();
    match state.key_use(key, &fingerprint)? {
        KeyUse::Fresh => {}
        other => return Ok(Decided::Key(other)),
    }
    let after = {
        let account = state.locked(d.account)?;
        account.expect_currency(d.amount.currency())?;
        account.balance_after_credit(d.amount.amount())?
    };
    let currency = d.amount.currency();
    let code = currency.code();
    let from = *funding
        .get(code)
        .ok_or_else(|| LedgerError::Inconsistent(format!("no external-funding account for {code}")))?;
    state.set_balance(d.account, after);
    state.note_created(index, key, fingerprint);
    Ok(Decided::Create((from, after)))
}
