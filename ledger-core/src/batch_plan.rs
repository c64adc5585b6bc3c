//! What the batch paths share (transfers, deposits, withdrawal requests): claiming a
//! batch's keys in one statement, and deciding its items in memory, in order, chain by
//! chain, with what a failed chain changed undone.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sql_types::{Array, Text};

use crate::accounts::{rebuild_refusal, LockedAccount};
use crate::batch::{self, Item};
use crate::error::LedgerError;
use crate::idempotency::CLAIM_ATTEMPTS;
use crate::ids::AccountId;
use crate::prepared::{Prepared, StaticSql};
use crate::schema::idempotency_keys;
use crate::tx::Tx;

mod claim_lock;
pub(crate) mod entries;

pub(crate) use claim_lock::claim_keys_and_lock;

/// What the database held under a batch item's key before the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KeyBefore {
    /// Claimed by this batch just now: unused before.
    Fresh,
    /// Used by an earlier, committed request.
    Stored { operation: String, fingerprint: String, result: Option<i64> },
}

/// How an item's key lets it go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyUse {
    /// Unused: the item is to be made.
    Fresh,
    /// Used before for the same request: its result id.
    Replay(i64),
    /// Used by an earlier item of this batch (its index) for the same request.
    ReplayOf(usize),
}

/// A stored key as read back: key, operation, fingerprint, result.
const STORED: (
    idempotency_keys::key,
    idempotency_keys::operation,
    idempotency_keys::request_fingerprint,
    idempotency_keys::result_id,
) = (
    idempotency_keys::key,
    idempotency_keys::operation,
    idempotency_keys::request_fingerprint,
    idempotency_keys::result_id,
);

enum ClaimKeys {}
impl StaticSql for ClaimKeys {
    const SQL: &'static str = include_str!("batch_plan/claim_keys.sql");
}

/// Claims every distinct key of the batch for `operation` (ascending byte order, so
/// concurrent batches never deadlock on each other's keys) and reads back those used
/// before. `requests` gives each item's key and fingerprint, in batch order; a key's
/// first request is the one claimed with.
pub(crate) fn claim_keys<'a>(
    tx: &mut Tx<'_>,
    operation: &str,
    requests: impl Iterator<Item = (&'a str, String)>,
) -> Result<HashMap<String, KeyBefore>, LedgerError> {
    let (keys, fingerprints) = distinct_sorted(requests);
    let claimed = claim(tx, operation, &keys, &fingerprints)?;
    read_used(tx, operation, &keys, &fingerprints, claimed)
}

/// Inserts the rows of `keys` (ascending byte order) that are free; returns those inserted.
fn claim(tx: &mut Tx<'_>, operation: &str, keys: &[&str], fingerprints: &[String]) -> Result<Vec<String>, LedgerError> {
    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = Text)]
        key: String,
    }
    let claimed: Vec<Claimed> = Prepared::<ClaimKeys>::new()
        .bind::<Array<Text>, _>(keys)
        .bind::<Array<Text>, _>(fingerprints)
        .bind::<Text, _>(operation)
        .load(tx.conn())?;
    Ok(claimed.into_iter().map(|c| c.key).collect())
}

/// Each distinct key with its first request's fingerprint, in ascending byte order.
fn distinct_sorted<'a>(requests: impl Iterator<Item = (&'a str, String)>) -> (Vec<&'a str>, Vec<String>) {
    let mut first: HashMap<&str, String> = HashMap::new();
    for (key, fingerprint) in requests {
        first.entry(key).or_insert(fingerprint);
    }
    let mut sorted: Vec<(&str, String)> = first.into_iter().collect();
    sorted.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    sorted.into_iter().unzip()
}

/// Every key of the batch as it stands: those `claimed` are fresh, the others were used
/// before and are read back (and taken over if they have no result). A key row can
/// disappear between the claim and the read, or while this waits for its lock: a
/// concurrent batch gives back a key it claimed without a result. Such a key is free:
/// it is claimed again (as `idempotency::begin` does), never judged by a stale read.
fn read_used(
    tx: &mut Tx<'_>,
    operation: &str,
    keys: &[&str],
    fingerprints: &[String],
    claimed: Vec<String>,
) -> Result<HashMap<String, KeyBefore>, LedgerError> {
    let mut out: HashMap<String, KeyBefore> = claimed.into_iter().map(|key| (key, KeyBefore::Fresh)).collect();
    for _ in 0..CLAIM_ATTEMPTS {
        let used: Vec<&str> = keys.iter().copied().filter(|k| !out.contains_key(*k)).collect();
        if used.is_empty() {
            return Ok(out);
        }
        let stored: Vec<(String, String, String, Option<i64>)> =
            idempotency_keys::table.filter(idempotency_keys::key.eq_any(&used)).select(STORED).load(tx.conn())?;
        let mut resultless = Vec::new();
        for (key, operation, fingerprint, result) in stored {
            match result {
                None => resultless.push(key),
                Some(_) => {
                    out.insert(key, KeyBefore::Stored { operation, fingerprint, result });
                }
            }
        }
        take_over(tx, &resultless, &mut out)?;
        // What is still missing was deleted meanwhile: claim it again, in byte order.
        let (gone, gone_fingerprints): (Vec<&str>, Vec<String>) =
            keys.iter().zip(fingerprints).filter(|(k, _)| !out.contains_key(**k)).map(|(k, f)| (*k, f.clone())).unzip();
        if !gone.is_empty() {
            out.extend(claim(tx, operation, &gone, &gone_fingerprints)?.into_iter().map(|k| (k, KeyBefore::Fresh)));
        }
    }
    if out.len() == keys.len() {
        return Ok(out);
    }
    Err(LedgerError::Inconsistent(format!(
        "{} idempotency key(s) of this batch were given back {CLAIM_ATTEMPTS} times while it waited for them",
        keys.len() - out.len()
    )))
}

/// Keys stored without a result applied nothing (a refused `_tx` call whose caller
/// committed anyway): as in `idempotency::begin`, this batch takes them over as fresh,
/// under their row locks (taken in ascending byte order), so two takers go one after the
/// other and the second sees the first's result. A key deleted while this waited for its
/// lock is left out of `out` (the caller claims it again).
fn take_over(tx: &mut Tx<'_>, keys: &[String], out: &mut HashMap<String, KeyBefore>) -> Result<(), LedgerError> {
    if keys.is_empty() {
        return Ok(());
    }
    let locked: Vec<(String, String, String, Option<i64>)> = idempotency_keys::table
        .filter(idempotency_keys::key.eq_any(keys))
        .order(diesel::dsl::sql::<Text>("key COLLATE \"C\""))
        .select(STORED)
        .for_update()
        .load(tx.conn())?;
    // Read again under the lock: another request may have taken the key over meanwhile.
    for (key, operation, fingerprint, result) in locked {
        let before =
            if result.is_none() { KeyBefore::Fresh } else { KeyBefore::Stored { operation, fingerprint, result } };
        out.insert(key, before);
    }
    Ok(())
}

/// Decides every item in order, chain by chain: `decide` sees the state the earlier
/// items left; a chain with a refused item is undone as a whole ([`State::roll_back`])
/// and all its items refused ([`batch::fail_chain`]); an open chain is refused.
pub(crate) fn decide_all<T, P>(
    items: &[Item<T>],
    state: &mut State<'_>,
    mut decide: impl FnMut(&mut State<'_>, usize, &T) -> Result<P, LedgerError>,
) -> Vec<Result<P, LedgerError>> {
    let mut out = Vec::with_capacity(items.len());
    for chain in batch::chains(items) {
        if chain.open {
            out.extend(chain.items.map(|_| Err(LedgerError::LinkedChainOpen)));
            continue;
        }
        state.undo.clear();
        let mut decided = Vec::with_capacity(chain.items.len());
        let mut failed = None;
        for i in chain.items.clone() {
            match decide(state, i, &items[i].request) {
                Ok(p) => decided.push(Ok(p)),
                Err(e) => {
                    failed = Some((i, e));
                    break;
                }
            }
        }
        match failed {
            None => out.extend(decided),
            Some((i, error)) => {
                state.roll_back();
                out.extend(batch::fail_chain(&chain.items, i, error));
            }
        }
    }
    out
}

/// One change the current chain made, to undo if the chain fails.
enum Undo {
    Balance(AccountId, i64),
    Created(String),
}

/// A batch being decided: its keys as claimed, its accounts as locked (with the
/// balances the items decided so far leave), the keys it creates under.
pub(crate) struct State<'a> {
    operation: &'static str,
    keys: &'a HashMap<String, KeyBefore>,
    accounts: &'a mut HashMap<AccountId, Result<LockedAccount, LedgerError>>,
    /// Keys created by this batch: the item and its request's fingerprint.
    created: HashMap<String, (usize, String)>,
    undo: Vec<Undo>,
    /// Accounts moved by a created item (may repeat).
    moved: Vec<AccountId>,
}

impl<'a> State<'a> {
    /// `keys` has every item's key; `accounts` every account of every item whose key was
    /// fresh, as this transaction locked it (or why it is unusable).
    pub(crate) fn new(
        operation: &'static str,
        keys: &'a HashMap<String, KeyBefore>,
        accounts: &'a mut HashMap<AccountId, Result<LockedAccount, LedgerError>>,
    ) -> State<'a> {
        State { operation, keys, accounts, created: HashMap::new(), undo: Vec::new(), moved: Vec::new() }
    }

    /// What the item's key allows, as the single path's `idempotency::begin` would say:
    /// a replay of the same request, a conflict for another one.
    pub(crate) fn key_use(&self, key: &str, fingerprint: &str) -> Result<KeyUse, LedgerError> {
        let conflict =
            |operation: &str| LedgerError::IdempotencyConflict { key: key.to_string(), operation: operation.into() };
        if let Some((first, stored)) = self.created.get(key) {
            return if stored == fingerprint { Ok(KeyUse::ReplayOf(*first)) } else { Err(conflict(self.operation)) };
        }
        match self.keys.get(key).expect("every item's key was claimed or read") {
            KeyBefore::Fresh => Ok(KeyUse::Fresh),
            KeyBefore::Stored { operation, fingerprint: stored, result } => {
                if operation != self.operation || stored != fingerprint {
                    return Err(conflict(operation));
                }
                let id = result.ok_or_else(|| LedgerError::Inconsistent(format!("key {key:?} has no result")))?;
                Ok(KeyUse::Replay(id))
            }
        }
    }

    /// Item `index` is to be made under `key`: later items under it replay it.
    pub(crate) fn note_created(&mut self, index: usize, key: &str, fingerprint: String) {
        self.created.insert(key.to_string(), (index, fingerprint));
        self.undo.push(Undo::Created(key.to_string()));
    }

    /// The account as locked, with the balance the batch left so far; or its refusal.
    pub(crate) fn locked(&self, id: AccountId) -> Result<&LockedAccount, LedgerError> {
        match self.accounts.get(&id).expect("every account of a fresh item was locked") {
            Ok(a) => Ok(a),
            Err(e) => Err(rebuild_refusal(e)),
        }
    }

    /// Notes an account's balance after an item.
    pub(crate) fn set_balance(&mut self, id: AccountId, balance_minor: i64) {
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

    /// The final balance of every account a created item moved, and the keys this batch
    /// claimed but made nothing under (to give back).
    pub(crate) fn finish(self) -> (HashMap<AccountId, i64>, Vec<String>) {
        let balance = |id: &AccountId| Some((*id, self.accounts.get(id)?.as_ref().ok()?.balance_minor()));
        let balances = self.moved.iter().filter_map(balance).collect();
        let unused_keys = self
            .keys
            .iter()
            .filter(|(k, before)| **before == KeyBefore::Fresh && !self.created.contains_key(k.as_str()))
            .map(|(k, _)| k.clone())
            .collect();
        (balances, unused_keys)
    }
}

/// A decided item of a batch whose results are ids (deposits' entries, withdrawals).
pub(crate) enum Decided<C> {
    /// To be made, with what its result needs besides the id.
    Create(C),
    /// Its key's earlier request.
    Key(KeyUse),
}

/// Each item's result, in batch order: `ids` are those of the created items, in batch
/// order; an in-batch replay gets its first item's id.
pub(crate) fn results<C, R>(
    decided: Vec<Result<Decided<C>, LedgerError>>,
    ids: Vec<i64>,
    created: impl Fn(i64, C) -> R,
    replayed: impl Fn(i64) -> R,
    refused: impl Fn(LedgerError) -> R,
) -> Vec<R> {
    let mut ids = ids.into_iter();
    let mut id_of: Vec<Option<i64>> = Vec::with_capacity(decided.len());
    let mut out = Vec::with_capacity(decided.len());
    for d in decided {
        let (id, result) = match d {
            Ok(Decided::Create(c)) => {
                let id = ids.next().expect("one id per created item");
                (Some(id), created(id, c))
            }
            Ok(Decided::Key(KeyUse::Replay(id))) => (None, replayed(id)),
            Ok(Decided::Key(KeyUse::ReplayOf(first))) => {
                (None, replayed(id_of[first].expect("an in-batch replay follows its creation")))
            }
            Ok(Decided::Key(KeyUse::Fresh)) => unreachable!("a fresh key is decided as Create"),
            Err(e) => (None, refused(e)),
        };
        id_of.push(id);
        out.push(result);
    }
    assert!(ids.next().is_none(), "every written id belongs to a created item");
    out
}
