//! Many transfers in one transaction, one result per item ([`create_batch`]).
//!
//! 1. The batch's keys are claimed in one statement, in ascending order
//!    (`claim_keys.sql`); keys used before are read back for replays and conflicts.
//! 2. Every account of every fresh item is locked at once, in ascending id order.
//! 3. Every item is decided in memory, in order ([`super::plan`]).
//! 4. The decisions are written in one set-based statement (`create_batch.sql`):
//!    entries, postings, balances, and the keys' results.
//!
//! Four round trips (and the batch-plan settings) however many items: one commit per
//! batch instead of per transfer.

use std::collections::HashMap;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text};

use crate::accounts;
use crate::batch::{self, Item};
use crate::error::LedgerError;
use crate::ids::{AccountId, EntryId};
use crate::prepared::{Prepared, StaticSql};
use crate::schema::idempotency_keys;
use crate::tx::{self, LockSet, Tx, TxOptions};

use super::plan::{plan, KeyBefore, Planned};
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

enum ClaimKeys {}
impl StaticSql for ClaimKeys {
    const SQL: &'static str = include_str!("claim_keys.sql");
}

enum CreateBatch {}
impl StaticSql for CreateBatch {
    const SQL: &'static str = include_str!("create_batch.sql");
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
    tx::transaction(conn, opts, |tx| create_batch_tx(tx, items))
}

/// [`create_batch`] inside the caller's transaction.
pub fn create_batch_tx(tx: &mut Tx<'_>, items: &[Item<Transfer>]) -> Result<Vec<TransferResult>, LedgerError> {
    batch::check_size(items)?;
    if items.is_empty() {
        return Ok(vec![]);
    }
    tx::with_batch_plans(tx, |tx| create_planned(tx, items))
}

fn create_planned(tx: &mut Tx<'_>, items: &[Item<Transfer>]) -> Result<Vec<TransferResult>, LedgerError> {
    let keys = claim_keys(tx, items)?;
    let lock_set: LockSet = items
        .iter()
        .map(|i| &i.request)
        .filter(|t| keys.get(t.key.as_str()) == Some(&KeyBefore::Fresh) && t.from != t.to)
        .flat_map(|t| [t.from, t.to])
        .collect();
    let mut locked: HashMap<AccountId, _> = lock_set.ids().zip(accounts::lock_all(tx, &lock_set)?).collect();
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

/// Claims every distinct key of the batch (ascending, so concurrent batches never
/// deadlock on each other's keys) and reads back those used before.
fn claim_keys(tx: &mut Tx<'_>, items: &[Item<Transfer>]) -> Result<HashMap<String, KeyBefore>, LedgerError> {
    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = Text)]
        key: String,
    }
    let mut first: HashMap<&str, String> = HashMap::new();
    for item in items {
        first.entry(item.request.key.as_str()).or_insert_with(|| item.request.fingerprint());
    }
    let mut sorted: Vec<(&str, String)> = first.into_iter().collect();
    sorted.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let (keys, fingerprints): (Vec<&str>, Vec<String>) = sorted.into_iter().unzip();
    let claimed: Vec<Claimed> = Prepared::<ClaimKeys>::new()
        .bind::<Array<Text>, _>(&keys)
        .bind::<Array<Text>, _>(&fingerprints)
        .load(tx.conn())?;
    let mut out: HashMap<String, KeyBefore> = claimed.into_iter().map(|c| (c.key, KeyBefore::Fresh)).collect();
    let used: Vec<&str> = keys.iter().copied().filter(|k| !out.contains_key(*k)).collect();
    if !used.is_empty() {
        let stored: Vec<(String, String, String, Option<i64>)> = idempotency_keys::table
            .filter(idempotency_keys::key.eq_any(&used))
            .select((
                idempotency_keys::key,
                idempotency_keys::operation,
                idempotency_keys::request_fingerprint,
                idempotency_keys::result_id,
            ))
            .load(tx.conn())?;
        for (key, operation, fingerprint, result) in stored {
            out.insert(key, KeyBefore::Stored { operation, fingerprint, result });
        }
    }
    // Pair the claim with the batch: every key is either ours now or was used before.
    assert_eq!(out.len(), keys.len(), "a key neither claimed nor stored");
    Ok(out)
}

/// Writes the created transfers in one statement; returns their entries in batch order.
fn write(
    tx: &mut Tx<'_>,
    items: &[Item<Transfer>],
    planned: &[Planned],
    balances: &HashMap<AccountId, i64>,
    unused_keys: &[String],
) -> Result<Vec<EntryId>, LedgerError> {
    #[derive(QueryableByName)]
    struct Written {
        #[diesel(sql_type = BigInt)]
        postings: i64,
        #[diesel(sql_type = BigInt)]
        balances: i64,
        #[diesel(sql_type = BigInt)]
        keys: i64,
        #[diesel(sql_type = BigInt)]
        given_back: i64,
        #[diesel(sql_type = Array<BigInt>)]
        entries: Vec<i64>,
    }
    let mut cols = Columns::default();
    for (item, p) in items.iter().zip(planned) {
        if let Planned::Create { from_after_minor, to_after_minor } = p {
            cols.push(&item.request, *from_after_minor, *to_after_minor);
        }
    }
    let (balance_ids, balance_values): (Vec<i64>, Vec<i64>) = balances.iter().map(|(a, b)| (a.get(), *b)).unzip();
    if cols.keys.is_empty() && unused_keys.is_empty() {
        return Ok(vec![]);
    }
    let written: Written = Prepared::<CreateBatch>::new()
        .bind::<Array<Text>, _>(&cols.keys)
        .bind::<Array<Text>, _>(&cols.fingerprints)
        .bind::<Array<BigInt>, _>(&cols.from)
        .bind::<Array<BigInt>, _>(&cols.to)
        .bind::<Array<Text>, _>(&cols.currency)
        .bind::<Array<BigInt>, _>(&cols.amount)
        .bind::<Array<BigInt>, _>(&cols.from_after)
        .bind::<Array<BigInt>, _>(&cols.to_after)
        .bind::<Array<BigInt>, _>(&balance_ids)
        .bind::<Array<BigInt>, _>(&balance_values)
        .bind::<Array<Text>, _>(unused_keys)
        .bind::<Array<Nullable<Text>>, _>(&cols.metadata)
        .get_result(tx.conn())?;
    // Pair what was written with what was planned (assertions, not hopes).
    let created = cols.keys.len();
    assert_eq!(written.postings as usize, 2 * created, "two postings per transfer");
    assert_eq!(written.balances as usize, balance_ids.len(), "one balance per moved account");
    assert_eq!(written.keys as usize, created, "one claimed key per created transfer");
    assert_eq!(written.given_back as usize, unused_keys.len(), "every unused claimed key given back");
    assert_eq!(written.entries.len(), created);
    Ok(written.entries.into_iter().map(EntryId::from_db).collect())
}

/// The created transfers as the statement's columns.
#[derive(Default)]
struct Columns {
    keys: Vec<String>,
    fingerprints: Vec<String>,
    from: Vec<i64>,
    to: Vec<i64>,
    currency: Vec<String>,
    amount: Vec<i64>,
    from_after: Vec<i64>,
    to_after: Vec<i64>,
    metadata: Vec<Option<String>>,
}

impl Columns {
    fn push(&mut self, t: &Transfer, from_after: i64, to_after: i64) {
        self.keys.push(t.key.as_str().to_string());
        self.fingerprints.push(t.fingerprint());
        self.from.push(t.from.get());
        self.to.push(t.to.get());
        self.currency.push(t.amount.currency().code().to_string());
        self.amount.push(t.amount.minor());
        self.from_after.push(from_after);
        self.to_after.push(to_after);
        self.metadata.push(t.metadata.as_ref().map(|m| m.as_str().to_string()));
    }
}
