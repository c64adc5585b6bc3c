//! Many withdrawal requests in one transaction, one result per item
//! ([`request_batch`]), with the contract of [`crate::transfers::create_batch`]: keys
//! claimed in one statement, the accounts locked in one statement in ascending id
//! order, every item checked in memory in order as [`super::request_tx`] checks it
//! (customer account, open, currency; linked chains all-or-nothing), and the pending
//! jobs written in one INSERT, whose statement trigger wakes the daemon as a single
//! request's does.

use std::collections::HashMap;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};

use crate::accounts;
use crate::batch::{self, Item};
use crate::batch_plan::{self, decide_all, Decided, KeyBefore, KeyUse, State};
use crate::error::LedgerError;
use crate::ids::{AccountId, WithdrawalId};
use crate::prepared::{Prepared, StaticSql};
use crate::tx::{self, LockSet, Tx, TxOptions};

use super::WithdrawalRequest;

/// What became of one withdrawal request of a batch.
#[derive(Debug)]
pub enum RequestResult {
    /// Recorded as a pending job: its id.
    Created {
        /// The new withdrawal.
        id: WithdrawalId,
    },
    /// Its key was used before for the same request (by an earlier call, single or
    /// batch, or an earlier item of this batch): nothing was written.
    Replayed {
        /// The withdrawal first requested under the key.
        id: WithdrawalId,
    },
    /// Refused, and why; nothing of it was written and its key stays unused. In a failed
    /// linked chain every item is refused, a replay too.
    Refused(LedgerError),
}

impl RequestResult {
    /// The withdrawal recorded or replayed; `None` if refused.
    pub fn id(&self) -> Option<WithdrawalId> {
        match self {
            RequestResult::Created { id } | RequestResult::Replayed { id } => Some(*id),
            RequestResult::Refused(_) => None,
        }
    }
}

enum RequestBatch {}
impl StaticSql for RequestBatch {
    const SQL: &'static str = include_str!("request_batch.sql");
}

/// Records a batch of withdrawal requests in one transaction of its own (retried as a
/// whole on transient errors), one result per item in the batch's order. At most
/// [`batch::MAX_BATCH_ITEMS`] items; `Err` only when the batch as a whole could not run
/// (then nothing was written).
pub fn request_batch(
    conn: &mut PgConnection,
    items: &[Item<WithdrawalRequest>],
) -> Result<Vec<RequestResult>, LedgerError> {
    request_batch_with(conn, &TxOptions::default(), items)
}

/// [`request_batch`] with the caller's transaction options (retries, timeouts).
pub fn request_batch_with(
    conn: &mut PgConnection,
    opts: &TxOptions,
    items: &[Item<WithdrawalRequest>],
) -> Result<Vec<RequestResult>, LedgerError> {
    batch::check_size(items)?;
    tx::transaction(conn, opts, |tx| request_batch_tx(tx, items))
}

/// [`request_batch`] inside the caller's transaction.
pub fn request_batch_tx(tx: &mut Tx<'_>, items: &[Item<WithdrawalRequest>]) -> Result<Vec<RequestResult>, LedgerError> {
    batch::check_size(items)?;
    if items.is_empty() {
        return Ok(vec![]);
    }
    tx::with_batch_plans(tx, |tx| request_planned(tx, items))
}

fn request_planned(tx: &mut Tx<'_>, items: &[Item<WithdrawalRequest>]) -> Result<Vec<RequestResult>, LedgerError> {
    let requests = items.iter().map(|i| (i.request.key.as_str(), i.request.fingerprint()));
    let keys = batch_plan::claim_keys(tx, "withdrawal", requests)?;
    let lock_set: LockSet = items
        .iter()
        .map(|i| &i.request)
        .filter(|r| keys.get(r.key.as_str()) == Some(&KeyBefore::Fresh))
        .map(|r| r.account)
        .collect();
    let mut locked: HashMap<AccountId, _> = lock_set.ids().zip(accounts::lock_all(tx, &lock_set)?).collect();
    let mut state = State::new("withdrawal", &keys, &mut locked);
    let decided = decide_all(items, &mut state, decide);
    let (_, unused_keys) = state.finish();
    let created = items.iter().zip(&decided).filter(|(_, d)| matches!(d, Ok(Decided::Create(())))).map(|(i, _)| i);
    let ids = write(tx, created.map(|i| &i.request).collect(), &unused_keys)?;
    Ok(batch_plan::results(
        decided,
        ids,
        |id, ()| RequestResult::Created { id: WithdrawalId::from_db(id) },
        |id| RequestResult::Replayed { id: WithdrawalId::from_db(id) },
        RequestResult::Refused,
    ))
}

/// One request checked as [`super::request_tx`] checks it.
fn decide(state: &mut State<'_>, index: usize, r: &WithdrawalRequest) -> Result<Decided<()>, LedgerError> {
    let fingerprint = r.fingerprint();
    let key = r.key.as_str();
    match state.key_use(key, &fingerprint)? {
        KeyUse::Fresh => {}
        other => return Ok(Decided::Key(other)),
    }
    // Unknown, system and closed accounts are refused by the lock, in request_tx's order.
    state.locked(r.account)?.expect_currency(r.amount.currency())?;
    state.note_created(index, key, fingerprint);
    Ok(Decided::Create(()))
}

/// Writes the created requests in one statement; their ids in batch order.
fn write(tx: &mut Tx<'_>, created: Vec<&WithdrawalRequest>, unused_keys: &[String]) -> Result<Vec<i64>, LedgerError> {
    #[derive(QueryableByName)]
    struct Written {
        #[diesel(sql_type = BigInt)]
        inserted: i64,
        #[diesel(sql_type = BigInt)]
        keys: i64,
        #[diesel(sql_type = BigInt)]
        given_back: i64,
        #[diesel(sql_type = Array<BigInt>)]
        ids: Vec<i64>,
    }
    if created.is_empty() && unused_keys.is_empty() {
        return Ok(vec![]);
    }
    let keys: Vec<&str> = created.iter().map(|r| r.key.as_str()).collect();
    let fingerprints: Vec<String> = created.iter().map(|r| r.fingerprint()).collect();
    let accounts: Vec<i64> = created.iter().map(|r| r.account.get()).collect();
    let currencies: Vec<String> = created.iter().map(|r| r.amount.currency().code().to_string()).collect();
    let amounts: Vec<i64> = created.iter().map(|r| r.amount.minor()).collect();
    let destinations: Vec<&str> = created.iter().map(|r| r.destination.as_str()).collect();
    let written: Written = Prepared::<RequestBatch>::new()
        .bind::<Array<Text>, _>(&keys)
        .bind::<Array<Text>, _>(&fingerprints)
        .bind::<Array<BigInt>, _>(&accounts)
        .bind::<Array<Text>, _>(&currencies)
        .bind::<Array<BigInt>, _>(&amounts)
        .bind::<Array<Text>, _>(&destinations)
        .bind::<Array<Text>, _>(unused_keys)
        .get_result(tx.conn())?;
    assert_eq!(written.inserted as usize, created.len(), "one withdrawal per created request");
    assert_eq!(written.keys as usize, created.len(), "one claimed key per created request");
    assert_eq!(written.given_back as usize, unused_keys.len(), "every unused claimed key given back");
    assert_eq!(written.ids.len(), created.len());
    Ok(written.ids)
}
