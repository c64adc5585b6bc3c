//! Claiming a batch's keys and locking its accounts in one round trip
//! ([`claim_keys_and_lock`], `claim_lock.sql`).

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text};

use crate::accounts::{judge_locked, AccountRow, LockedAccount};
use crate::error::LedgerError;
use crate::ids::AccountId;
use crate::prepared::{Prepared, StaticSql};
use crate::tx::{LockSet, Tx};

use super::{distinct_sorted, read_used, KeyBefore};

enum ClaimLock {}
impl StaticSql for ClaimLock {
    const SQL: &'static str = include_str!("claim_lock.sql");
}

/// Every account of a batch as locked, or why it is unusable.
pub(crate) type Locked = HashMap<AccountId, Result<LockedAccount, LedgerError>>;

/// One row of `claim_lock.sql`: a claimed key, or a locked account.
#[derive(QueryableByName)]
struct ClaimedOrLocked {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    part: i32,
    #[diesel(sql_type = Nullable<Text>)]
    claimed: Option<String>,
    #[diesel(embed)]
    account: Option<AccountRow>,
}

/// A batch's keys as [`claim_keys`](super::claim_keys) claims them (ascending byte
/// order), then its keys stored without a result locked (ascending byte order, as
/// `idempotency::begin` locks one before its accounts), then every account of `lock` locked as `accounts::lock_all` locks them
/// (ascending id, judged the same way), in one statement. The caller locks the accounts
/// of every item (also those whose key turns out used before): it cannot know the fresh
/// ones before the claim, and an extra lock held to commit changes no decision.
pub(crate) fn claim_keys_and_lock<'a>(
    tx: &mut Tx<'_>,
    operation: &str,
    requests: impl Iterator<Item = (&'a str, String)>,
    lock: &LockSet,
) -> Result<(HashMap<String, KeyBefore>, Locked), LedgerError> {
    let (keys, fingerprints) = distinct_sorted(requests);
    let ids: Vec<i64> = lock.ids().map(AccountId::get).collect();
    let rows: Vec<ClaimedOrLocked> = Prepared::<ClaimLock>::new()
        .bind::<Array<Text>, _>(&keys)
        .bind::<Array<Text>, _>(&fingerprints)
        .bind::<Text, _>(operation)
        .bind::<Array<BigInt>, _>(&ids)
        .load(tx.conn())?;
    assert!(rows.windows(2).all(|w| w[0].part <= w[1].part), "keys come before accounts");
    let mut claimed = Vec::new();
    let mut accounts = Vec::with_capacity(ids.len());
    for row in rows {
        match (row.part, row.claimed, row.account) {
            (0, Some(key), None) => claimed.push(key),
            // Locked before the accounts; `read_used` reads it again under that lock.
            (1, Some(_), None) => {}
            (2, None, Some(account)) => accounts.push(account),
            _ => unreachable!("a row is a claimed key, a locked resultless key or a locked account"),
        }
    }
    let locked = lock.ids().zip(judge_locked(lock, accounts)).collect();
    Ok((read_used(tx, operation, &keys, &fingerprints, claimed)?, locked))
}
