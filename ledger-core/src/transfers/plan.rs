//! Deciding a batch of transfers: pure, no database. The batch reads as if its items
//! ran one after another (each sees the balances and keys the earlier ones left), except
//! that a linked chain is undone as a whole when one of its items is refused.

use std::collections::HashMap;

use crate::accounts::{rebuild_refusal, LockedAccount};
use crate::batch::{self, Item};
use crate::error::LedgerError;
use crate::ids::{AccountId, EntryId};

use super::Transfer;

/// What the database held under a batch item's key before the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum KeyBefore {
    /// Claimed by this batch just now: unused before.
    Fresh,
    /// Used by an earlier, committed request.
    Stored { operation: String, fingerprint: String, result: Option<i64> },
}

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
    let mut state = State { keys, accounts, created: HashMap::new(), undo: Vec::new(), moved: Vec::new() };
    let mut out: Vec<Planned> = Vec::with_capacity(items.len());
    for chain in batch::chains(items) {
        if chain.open {
            out.extend(chain.items.map(|_| Planned::Refuse(LedgerError::LinkedChainOpen)));
            continue;
        }
        state.undo.clear();
        let mut decided = Vec::with_capacity(chain.items.len());
        let mut failed = None;
        for i in chain.items.clone() {
            match state.decide(i, &items[i].request) {
                Planned::Refuse(e) => {
                    failed = Some((i, e));
                    break;
                }
                ok => decided.push(ok),
            }
        }
        match failed {
            None => out.extend(decided),
            Some((i, error)) => {
                state.roll_back();
                out.extend(
                    batch::fail_chain::<()>(&chain.items, i, error)
                        .into_iter()
                        .map(|r| Planned::Refuse(r.expect_err("a failed chain has only refusals"))),
                );
            }
        }
    }
    let balances = state.moved.iter().filter_map(|id| Some((*id, state.balance(*id)?))).collect();
    let unused_keys = keys
        .iter()
        .filter(|(k, before)| **before == KeyBefore::Fresh && !state.created.contains_key(k.as_str()))
        .map(|(k, _)| k.clone())
        .collect();
    Plan { items: out, balances, unused_keys }
}

/// One change the current chain made, to undo if the chain fails.
enum Undo {
    Balance(AccountId, i64),
    Created(String),
}

struct State<'a> {
    keys: &'a HashMap<String, KeyBefore>,
    accounts: &'a mut HashMap<AccountId, Result<LockedAccount, LedgerError>>,
    /// Keys created by this batch: the item and its request's fingerprint.
    created: HashMap<String, (usize, String)>,
    undo: Vec<Undo>,
    /// Accounts moved by a created item (may repeat).
    moved: Vec<AccountId>,
}

impl State<'_> {
    fn decide(&mut self, index: usize, t: &Transfer) -> Planned {
        match self.try_decide(index, t) {
            Ok(p) => p,
            Err(e) => Planned::Refuse(e),
        }
    }

    fn try_decide(&mut self, index: usize, t: &Transfer) -> Result<Planned, LedgerError> {
        if t.from == t.to {
            return Err(LedgerError::SameAccount(t.from));
        }
        let key = t.key.as_str();
        let fingerprint = t.fingerprint();
        let conflict =
            |operation: &str| LedgerError::IdempotencyConflict { key: key.to_string(), operation: operation.into() };
        if let Some((first, stored)) = self.created.get(key) {
            return if *stored == fingerprint { Ok(Planned::ReplayOf(*first)) } else { Err(conflict("transfer")) };
        }
        match self.keys.get(key).expect("every item's key was claimed or read") {
            KeyBefore::Fresh => {}
            KeyBefore::Stored { operation, fingerprint: stored, result } => {
                if operation != "transfer" || *stored != fingerprint {
                    return Err(conflict(operation));
                }
                let entry = result.ok_or_else(|| LedgerError::Inconsistent(format!("key {key:?} has no result")))?;
                return Ok(Planned::Replay(EntryId::from_db(entry)));
            }
        }
        let from_after_minor = {
            let from = self.locked(t.from)?;
            from.expect_currency(t.amount.currency())?;
            from.balance_after_debit(t.amount.amount())?
        };
        let to_after_minor = {
            let to = self.locked(t.to)?;
            to.expect_currency(t.amount.currency())?;
            to.balance_after_credit(t.amount.amount())?
        };
        self.set_balance(t.from, from_after_minor);
        self.set_balance(t.to, to_after_minor);
        self.created.insert(key.to_string(), (index, fingerprint));
        self.undo.push(Undo::Created(key.to_string()));
        Ok(Planned::Create { from_after_minor, to_after_minor })
    }

    fn locked(&self, id: AccountId) -> Result<&LockedAccount, LedgerError> {
        match self.accounts.get(&id).expect("every account of a fresh item was locked") {
            Ok(a) => Ok(a),
            Err(e) => Err(rebuild_refusal(e)),
        }
    }

    fn balance(&self, id: AccountId) -> Option<i64> {
        self.accounts.get(&id)?.as_ref().ok().map(LockedAccount::balance_minor)
    }

    fn set_balance(&mut self, id: AccountId, balance_minor: i64) {
        let account = self.accounts.get_mut(&id).and_then(|a| a.as_mut().ok()).expect("a moved account is locked");
        self.undo.push(Undo::Balance(id, account.balance_minor()));
        account.note_balance(balance_minor);
        self.moved.push(id);
    }

    fn roll_back(&mut self) {
        while let Some(change) = self.undo.pop() {
            match change {
                Undo::Balance(id, before) => {
                    self.accounts.get_mut(&id).and_then(|a| a.as_mut().ok()).expect("locked").note_balance(before)
                }
                Undo::Created(key) => {
                    self.created.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
