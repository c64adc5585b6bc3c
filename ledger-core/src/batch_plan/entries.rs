//! Writing a batch's two-leg entries (transfers, deposits) in one set-based statement
//! (`write_entries.sql`): entries, postings, balances, and the keys' results.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text};

use crate::error::LedgerError;
use crate::ids::{AccountId, EntryId};
use crate::journal::EntryKind;
use crate::prepared::{Prepared, StaticSql};
use crate::tx::Tx;

enum WriteEntries {}
impl StaticSql for WriteEntries {
    const SQL: &'static str = include_str!("write_entries.sql");
}

/// One created movement of a batch: `amount` from `from` to `to`.
pub(crate) struct Movement<'a> {
    pub key: &'a str,
    pub fingerprint: String,
    pub from: AccountId,
    pub to: AccountId,
    pub currency: &'a str,
    pub amount_minor: i64,
    /// `from`'s balance after it; `None` for a system account (no running balance).
    pub from_after: Option<i64>,
    pub to_after: i64,
    pub metadata: Option<&'a str>,
}

/// The created movements as the statement's columns, in batch order.
#[derive(Default)]
pub(crate) struct Columns {
    keys: Vec<String>,
    fingerprints: Vec<String>,
    from: Vec<i64>,
    to: Vec<i64>,
    currency: Vec<String>,
    amount: Vec<i64>,
    from_after: Vec<Option<i64>>,
    to_after: Vec<i64>,
    metadata: Vec<Option<String>>,
}

impl Columns {
    pub(crate) fn push(&mut self, m: Movement<'_>) {
        self.keys.push(m.key.to_string());
        self.fingerprints.push(m.fingerprint);
        self.from.push(m.from.get());
        self.to.push(m.to.get());
        self.currency.push(m.currency.to_string());
        self.amount.push(m.amount_minor);
        self.from_after.push(m.from_after);
        self.to_after.push(m.to_after);
        self.metadata.push(m.metadata.map(str::to_string));
    }
}

/// Writes the created movements in one statement (entries of `kind`, each referenced
/// `<kind>:<key>`), the accounts' final `balances`, and gives back the `unused_keys`;
/// returns the entries in batch order.
pub(crate) fn write(
    tx: &mut Tx<'_>,
    kind: EntryKind,
    cols: &Columns,
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
    let (balance_ids, balance_values): (Vec<i64>, Vec<i64>) = balances.iter().map(|(a, b)| (a.get(), *b)).unzip();
    if cols.keys.is_empty() && unused_keys.is_empty() {
        return Ok(vec![]);
    }
    let written: Written = Prepared::<WriteEntries>::new()
        .bind::<Array<Text>, _>(&cols.keys)
        .bind::<Array<Text>, _>(&cols.fingerprints)
        .bind::<Array<BigInt>, _>(&cols.from)
        .bind::<Array<BigInt>, _>(&cols.to)
        .bind::<Array<Text>, _>(&cols.currency)
        .bind::<Array<BigInt>, _>(&cols.amount)
        .bind::<Array<Nullable<BigInt>>, _>(&cols.from_after)
        .bind::<Array<BigInt>, _>(&cols.to_after)
        .bind::<Array<BigInt>, _>(&balance_ids)
        .bind::<Array<BigInt>, _>(&balance_values)
        .bind::<Array<Text>, _>(unused_keys)
        .bind::<Array<Nullable<Text>>, _>(&cols.metadata)
        .bind::<Text, _>(kind.as_str())
        .get_result(tx.conn())?;
    // Pair what was written with what was planned (assertions, not hopes).
    let created = cols.keys.len();
    assert_eq!(written.postings as usize, 2 * created, "two postings per movement");
    assert_eq!(written.balances as usize, balance_ids.len(), "one balance per moved account");
    assert_eq!(written.keys as usize, created, "one claimed key per created movement");
    assert_eq!(written.given_back as usize, unused_keys.len(), "every unused claimed key given back");
    assert_eq!(written.entries.len(), created);
    Ok(written.entries.into_iter().map(EntryId::from_db).collect())
}
