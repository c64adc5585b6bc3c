//! Ledger operations end to end on a real PostgreSQL: money movements, statements,
//! idempotency, savepoint batches, refusals that leave the database unchanged, and the
//! constraints the database enforces on its own.

mod batches;
#[path = "../common/mod.rs"]
mod common;
mod database;
mod idempotency;
mod movements;
mod refusals;

use std::sync::Barrier;
use std::thread;

use common::{assert_audit_clean, balance, eur, withdrawal, IBAN};
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use ledger_core::accounts::{self, NewAccount, SystemRole};
use ledger_core::deposits::{self, Deposit};
use ledger_core::error::InvalidInput;
use ledger_core::transfers::{self, Transfer};
use ledger_core::withdrawals::{self, Iban, JobOutcome, WithdrawalStatus};
use ledger_core::{AccountId, Amount, Currency, IdempotencyKey, LedgerError, Money, TxOptions};
use ledger_testdb as testing;

fn deposit_req(account: AccountId, amount: &str) -> Deposit {
    Deposit { account, amount: eur(amount), key: testing::key("dep") }
}
