//! Deciding a batch of transfers: pure, no database. The batch reads as if its items
//! ran one after another (each sees the balances and keys the earlier ones left), except
//! that a linked chain is undone as a whole when one of its items is refused.

use std::collections::HashMap;

use crate::accounts::LockedAccount;
use crate::batch::Item;
pub(super) use crate::batch_plan::KeyBefore;
use crate::batch_plan::{decide_all, KeyUse, State};
use crate::error::LedgerError;
use crate::ids::{AccountId, EntryId};

use super::Transfer;

/// What to do with one item.
#[derive(Debug)]
pub(super) enum Planned {
    /// Write it: the balances of both accounts after it.
    Create {
        from_after_minor: i64,
        to_after_minor: i64,
    },
    /// Its key was used before for the same request: that request's entry.
    Replay(EntryId),
    /// Its key was used by an earlier item of this batch for the same request.
    ReplayOf(usize),
    Refuse(LedgerError),
}

/// A decided batch.
#[derive(Debug)]
pub(super) struct Plan {
    pub items: Vec<Planned>,
    /// The final balance of every account a created item moved.
    pub balances: HashMap<AccountId, i64>,
    /// Keys this batch claimed but no item was created under: given back.
    pub unused_keys: Vec<String>,
}

/// Decides every item in order. `keys` has every item's key; `accounts` every account
/// of every item whose key was fresh, as this transaction locked it (or why it is
/// unusable).
pub(super) fn plan(
    items: &[Item<Transfer>],
    keys: &HashMap<String, KeyBefore>,
    accounts: &mut HashMap<AccountId, Result<LockedAccount, LedgerError>>,
) -> Plan {
    let mut state = State::new("transfer", keys, accounts);
    let decided = decide_all(items, &mut state, decide);
    let (balances, unused_keys) = state.finish();
    let items = decided.into_iter().map(|d| d.unwrap_or_else(Planned::Refuse)).collect();
    Plan { items, balances, unused_keys }
}

fn decide(state: &mut State<'_>, index: usize, t: &Transfer) -> Result<Planned, LedgerError> {
    if t.from == t.to {
        return Err(LedgerError::SameAccount(t.from));
    }
    let key = t.key.as_str();
    let fingerprint = t.fingerprint();
    match state.key_use(key, &fingerprint)? {
        KeyUse::Fresh => {}
        KeyUse::Replay(entry) => return Ok(Planned::Replay(EntryId::from_db(entry))),
        KeyUse::ReplayOf(first) => return Ok(Planned::ReplayOf(first)),
    }
    let from_after_minor = {
        let from = state.locked(t.from)?;
        from.expect_currency(t.amount.currency())?;
        from.balance_after_debit(t.amount.amount())?
    };
    let to_after_minor = {
        let to = state.locked(t.to)?;
        to.expect_currency(t.amount.currency())?;
        to.balance_after_credit(t.amount.amount())?
    };
    state.set_balance(t.from, from_after_minor);
    state.set_balance(t.to, to_after_minor);
    state.note_created(index, key, fingerprint);
    Ok(Planned::Create { from_after_minor, to_after_minor })
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
