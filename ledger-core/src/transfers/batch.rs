//! Many transfers in one transaction, one result per item ([`create_batch`]).
//!
//! 1. The batch's keys are claimed in ascending order, and then every account of every
//!    item is locked in ascending id order, in one statement
//!    (`batch_plan::claim_keys_and_lock`); keys used before are read back for replays
//!    and conflicts (a second round trip, only when there are such keys).
//! 3. Every item is decided in memory, in order ([`super::plan`]).
//! 4. The decisions are written in one set-based statement (`batch_plan::entries`):
//!    entries, postings, balances, and the keys' results.
//!
//! In a transaction of its own ([`create_batch`]) that is four round trips however many
//! items (BEGIN with the batch-plan settings, claim-and-lock, write, COMMIT): one commit
//! per batch instead of per transfer.

use std::collections::HashMap;

use diesel::pg::PgConnection;

use crate::batch::{self, Item};
use crate::batch_plan::{self, entries, entries::Columns, entries::Movement};
use crate::error::LedgerError;
use crate::ids::{AccountId, EntryId};
use crate::journal::EntryKind;
use crate::tx::{self, LockSet, Tx, TxOptions};

use super::plan::{plan, Planned};
use super::Transfer;

/// What became of one transfer of a batch.
#[derive(Debug)]
pub enum TransferResult {
    /// Written: its entry, and both accounts' balances right after it (minor units).
    Created {
        /// The transfer's journal entry.
        entry: EntryId,
        /// The source account's balance right after this item (later items of the
        /// batch may move it again).
        from_balance_minor: i64,
        /// The destination account's balance right after this item.
        to_balance_minor: i64,
    },
    /// Its key was used before for the same transfer (by an earlier call or an earlier
    /// item of this batch): nothing was written, here is that transfer's entry.
    Replayed {
        /// The entry of the transfer first made under the key.
        entry: EntryId,
    },
    /// Refused, and why; nothing of it was written. A refused item leaves its key
    /// unused, so it may be sent again under the same key. In a linked chain that
    /// failed every item is refused, a replay too (its earlier transfer stands): this
    /// call applied nothing of the chain.
    Refused(LedgerError),
}

impl TransferResult {
    /// The entry written or replayed; `None` if refused.
    pub fn entry(&self) -> Option<EntryId> {
        match self {
            TransferResult::Created { entry, .. } | TransferResult::Replayed { entry } => Some(*entry),
            TransferResult::Refused(_) => None,
        }
    }
}

/// Creates a batch of transfers in one transaction of its own (retried as a whole on
/// transient errors), one result per item in the batch's order. Items marked linked
/// succeed or fail with the rest of their chain ([`crate::batch`]). At most
/// [`batch::MAX_BATCH_ITEMS`] items; `Err` only when the batch as a whole could not run
/// (then nothing was written).
pub fn create_batch(conn: &mut PgConnection, items: &[Item<Transfer>]) -> Result<Vec<TransferResult>, LedgerError> {
    create_batch_with(conn, &TxOptions::default(), items)
}

/// [`create_batch`] with the caller's transaction options (retries, timeouts).
pub fn create_batch_with(
    conn: &mut PgConnection,
    opts: &TxOptions,
    items: &[Item<Transfer>],
) -> Result<Vec<TransferResult>, LedgerError> {
    batch::check_size(items)?;
    tx::transaction_with_batch_plans(conn, opts, |tx| create_planned(tx, items))
}

/// [`create_batch`] inside the caller's transaction.
pub fn create_batch_tx(tx: &mut Tx<'_>, items: &[Item<Transfer>]) -> Result<Vec<TransferResult>, LedgerError> {
    batch::check_size(items)?;
    if items.is_empty() {
        return Ok(vec![]);
    }
    tx::with_batch_plans(tx, |tx| create_planned(tx, items))
}

/// The batch in a transaction already running under the batch-plan settings (the
/// coalescer's groups, [`create_batch_with`]); empty batches are the caller's to skip.
pub(crate) fn create_planned(tx: &mut Tx<'_>, items: &[Item<Transfer>]) -> Result<Vec<TransferResult>, LedgerError> {
    batch::check_size(items)?;
    if items.is_empty() {
        return Ok(vec![]);
    }
    let requests = items.iter().map(|i| (i.request.key.as_str(), i.request.fingerprint()));
    // Every item's accounts, locked with the claim in one round trip (see
    // `claim_keys_and_lock` for why a replayed item's accounts are locked too).
    let lock_set: LockSet =
        items.iter().map(|i| &i.request).filter(|t| t.from != t.to).flat_map(|t| [t.from, t.to]).collect();
    let (keys, mut locked) = batch_plan::claim_keys_and_lock(tx, "transfer", requests, &lock_set)?;
    let plan = plan(items, &keys, &mut locked);
    let entries = write(tx, items, &plan.items, &plan.balances, &plan.unused_keys)?;
    let mut created = entries.into_iter();
    let mut entry_of: Vec<Option<EntryId>> = Vec::with_capacity(items.len());
    let mut results = Vec::with_capacity(items.len());
    for planned in plan.items {
        let result = match planned {
            Planned::Create { from_after_minor, to_after_minor } => TransferResult::Created {
                entry: created.next().expect("one entry per created transfer"),
                from_balance_minor: from_after_minor,
                to_balance_minor: to_after_minor,
            },
            Planned::Replay(entry) => TransferResult::Replayed { entry },
            Planned::ReplayOf(first) => {
                TransferResult::Replayed { entry: entry_of[first].expect("an in-batch replay follows its creation") }
            }
            Planned::Refuse(e) => TransferResult::Refused(e),
        };
        entry_of.push(match &result {
            TransferResult::Created { entry, .. } => Some(*entry),
            _ => None,
        });
        results.push(result);
    }
    assert!(created.next().is_none(), "every written entry belongs to a created transfer");
    Ok(results)
}

/// The created transfers written in one statement; their entries in batch order.
fn write(
    tx: &mut Tx<'_>,
    items: &[Item<Transfer>],
    planned: &[Planned],
    balances: &HashMap<AccountId, i64>,
    unused_keys: &[String],
) -> Result<Vec<EntryId>, LedgerError> {
    let mut cols = Columns::default();
    for (item, p) in items.iter().zip(planned) {
        if let Planned::Create { from_after_minor, to_after_minor } = p {
            let t = &item.request;
            cols.push(Movement {
                key: t.key.as_str(),
                fingerprint: t.fingerprint(),
                from: t.from,
                to: t.to,
                currency: t.amount.currency().code(),
                amount_minor: t.amount.minor(),
                from_after: Some(*from_after_minor),
                to_after: *to_after_minor,
                metadata: t.metadata.as_ref().map(|m| m.as_str()),
            });
        }
    }
    entries::write(tx, EntryKind::Transfer, &cols, balances, unused_keys)
}
