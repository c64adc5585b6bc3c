//! Batch intake on a real PostgreSQL: `deposits::create_batch` and
//! `withdrawals::request_batch`, with the contract of `transfers::create_batch` (one
//! result per item, replays shared with the single path, linked chains, the size cap),
//! and two deposit batches racing on the same accounts with real commits.

#[path = "../common/mod.rs"]
mod common;
mod deposits;
mod keys;
mod requests;

use ledger_core::batch::{Item, MAX_BATCH_ITEMS};
use ledger_core::{AccountId, Currency, IdempotencyKey, Money};
use ledger_testdb as testing;

/// A deposit of `amount` EUR under `key`.
fn dep(account: AccountId, amount: &str, key: &IdempotencyKey) -> ledger_core::deposits::Deposit {
    ledger_core::deposits::Deposit { account, amount: common::eur(amount), key: key.clone() }
}

/// One item more than a batch may hold, all copies of `item`.
fn oversize<T: Clone>(item: T) -> Vec<Item<T>> {
    vec![Item::single(item); MAX_BATCH_ITEMS + 1]
}

/// A closed EUR account (opened, then closed at zero).
fn closed_account(conn: &mut diesel::pg::PgConnection) -> AccountId {
    let id = testing::funded_account(conn, "closed", Currency::EUR, "none");
    ledger_core::accounts::close(conn, id).unwrap();
    id
}

/// An open JPY account.
fn yen_account(conn: &mut diesel::pg::PgConnection) -> AccountId {
    testing::funded_account(conn, "yen", Currency::JPY, "none")
}

/// Money in JPY (no minor units).
fn yen(text: &str) -> Money {
    Money::parse(text, Currency::JPY).unwrap()
}
