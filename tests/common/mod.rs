//! Helpers shared by the integration tests.
#![allow(dead_code)]

use diesel::pg::PgConnection;
use ledger_core::transfers::{Transfer, TransferResult};
use ledger_core::withdrawals::{Iban, WithdrawalRequest};
use ledger_core::{AccountId, Currency, IdempotencyKey, Money};
use ledger_testdb as testing;

pub const IBAN: &str = "DE89370400440532013000";

pub fn eur(text: &str) -> Money {
    Money::parse(text, Currency::EUR).unwrap()
}

/// A transfer of `amount` EUR without metadata.
pub fn transfer(from: AccountId, to: AccountId, amount: &str, key: &IdempotencyKey) -> Transfer {
    Transfer { from, to, amount: eur(amount), key: key.clone(), metadata: None }
}

/// A batch item's result as one word: created, replayed, or the refusal's error code.
pub fn result_code(r: &TransferResult) -> &'static str {
    match r {
        TransferResult::Created { .. } => "created",
        TransferResult::Replayed { .. } => "replayed",
        TransferResult::Refused(e) => e.code(),
    }
}

pub fn withdrawal(account: AccountId, amount: &str, key_prefix: &str) -> WithdrawalRequest {
    WithdrawalRequest {
        account,
        amount: eur(amount),
        destination: Iban::parse(IBAN).unwrap(),
        key: testing::key(key_prefix),
    }
}

pub fn balance(conn: &mut PgConnection, account: AccountId) -> i64 {
    ledger_core::accounts::get(conn, account).unwrap().balance_minor
}

pub fn assert_audit_clean(conn: &mut PgConnection) {
    let report = ledger_core::audit::run(conn).unwrap();
    assert!(report.is_clean(), "{report}");
}
