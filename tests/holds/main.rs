//! Holds (two-phase transfers) on a real PostgreSQL: the decisions as a table, held
//! money that cannot be spent, partial posts, replays, the audit, and a post racing the
//! expiry on real concurrent connections.

#[path = "../common/mod.rs"]
mod common;
mod decisions;
mod expiry;
mod list;

use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use common::{assert_audit_clean, balance, eur};
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use ledger_core::accounts::{self, NewAccount};
use ledger_core::audit::holds::HoldsViolation;
use ledger_core::audit::Violation;
use ledger_core::holds::{self, HoldReceipt, HoldRequest, HoldStatus, Timeout};
use ledger_core::journal::EntryKind;
use ledger_core::transfers::{self, Transfer};
use ledger_core::{AccountId, Currency, HoldId, IdempotencyKey, LedgerError, Money, TxOptions};
use ledger_testdb as testing;

fn req(from: AccountId, to: AccountId, amount: &str) -> HoldRequest {
    HoldRequest { from, to, amount: eur(amount), timeout: None, key: testing::key("hold") }
}

fn hold(conn: &mut PgConnection, from: AccountId, to: AccountId, amount: &str) -> HoldReceipt {
    holds::hold(conn, &req(from, to, amount)).unwrap()
}

fn key(prefix: &str) -> IdempotencyKey {
    testing::key(prefix)
}

/// (balance, pending debits, pending credits) of an account, in minor units.
fn figures(conn: &mut PgConnection, account: AccountId) -> (i64, i64, i64) {
    let b = holds::balance(conn, account).unwrap();
    (b.balance_minor, b.pending_debits_minor, b.pending_credits_minor)
}
