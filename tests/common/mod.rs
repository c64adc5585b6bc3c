//! Helpers shared by the integration tests.
#![allow(dead_code)]

use diesel::pg::PgConnection;
use ledger_core::withdrawals::{Iban, WithdrawalRequest};
use ledger_core::{AccountId, Currency, Money};
use ledger_testdb as testing;

pub const IBAN: &str = "DE89370400440532013000";

pub fn eur(text: &str) -> Money {
    Money::parse(text, Currency::EUR).unwrap()
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
