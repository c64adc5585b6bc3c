//! The audit finds what it claims to find: each check, shown a ledger corrupted in its
//! way (bypassing the database's own guards on purpose), reports it; the same ledger
//! before the corruption is clean.

mod common;

use common::{assert_audit_clean, withdrawal};
use diesel::RunQueryDsl;
use ledger_core::audit::{self, Violation};
use ledger_core::withdrawals;
use ledger_core::Currency;
use ledger_testdb as testing;

/// A fresh ledger with one customer (100.00 EUR) and one withdrawal of 40.00 paying out;
/// then `corrupt` (SQL with `{account}`, `{withdrawal}` and `{entry}` filled in); returns
/// what the audit reports.
fn audit_after(corrupt: &[&str]) -> Vec<Violation> {
    let db = testing::committed();
    let mut conn = db.conn();
    let account = testing::funded_account(&mut conn, "audited", Currency::EUR, "100.00");
    let w = withdrawals::withdraw(&mut conn, &withdrawal(account, "40.00", "audit")).unwrap();
    assert_audit_clean(&mut conn);
    for sql in corrupt {
        let sql = sql
            .replace("{account}", &account.to_string())
            .replace("{withdrawal}", &w.id.to_string())
            .replace("{entry}", &w.entry_id.unwrap().to_string());
        diesel::sql_query(&sql).execute(&mut conn).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    audit::run(&mut conn).unwrap().violations
}

#[testing::test]
fn each_check_reports_the_corruption_it_is_for() {
    type Case = (&'static str, &'static [&'static str], fn(&Violation) -> bool);
    let cases: &[Case] = &[
        (
            "a stored balance that is not the sum of its postings",
            &["UPDATE accounts SET balance_minor = balance_minor + 1 WHERE id = {account}"],
            // Read in decimals with the currency, as every amount a person reads.
            |v| {
                matches!(v, Violation::BalanceMismatch { stored_minor: 6_001, postings_sum_minor: 6_000, .. })
                    && v.to_string().ends_with("stored balance 60.01 EUR != sum of postings 60.00 EUR")
            },
        ),
        (
            "a balance below its floor",
            &[
                "ALTER TABLE accounts DROP CONSTRAINT accounts_balance_floor",
                "UPDATE accounts SET balance_minor = -1 WHERE id = {account}",
            ],
            |v| {
                matches!(v, Violation::BelowFloor { balance_minor: -1, floor_minor: 0, .. })
                    && v.to_string().ends_with("balance -0.01 EUR below floor 0.00 EUR")
            },
        ),
        (
            "an entry whose postings do not sum to zero",
            &[
                "ALTER TABLE postings DISABLE TRIGGER USER",
                "INSERT INTO postings (entry_id, account_id, currency, amount_minor)
                 SELECT {entry}, id, 'EUR', 1 FROM accounts WHERE system_role = 'external_funding' AND currency = 'EUR'",
            ],
            |v| {
                matches!(v, Violation::UnbalancedEntry { sum_minor: 1, .. })
                    && v.to_string().ends_with("postings in EUR sum to 0.01 EUR, not 0")
            },
        ),
        (
            "a posting whose account does not exist in its currency",
            &[
                "ALTER TABLE postings DISABLE TRIGGER USER",
                "INSERT INTO postings (entry_id, account_id, currency, amount_minor)
                 VALUES ({entry}, {account}, 'USD', 1), ({entry}, {account}, 'USD', -1)",
            ],
            |v| {
                matches!(v, Violation::PostingWithoutReference { currency, .. } if currency == "USD")
                    && v.to_string().contains("does not exist")
            },
        ),
        (
            "a posting whose entry does not exist",
            &[
                "ALTER TABLE postings DISABLE TRIGGER USER",
                "INSERT INTO postings (entry_id, account_id, currency, amount_minor)
                 VALUES (-7, {account}, 'EUR', 1), (-7, {account}, 'EUR', -1)",
            ],
            |v| matches!(v, Violation::PostingWithoutReference { entry: -7, .. }),
        ),
        (
            "a withdrawal whose account does not exist in its currency",
            &[
                "ALTER TABLE withdrawals DISABLE TRIGGER USER",
                "UPDATE withdrawals SET currency = 'USD' WHERE id = {withdrawal}",
            ],
            |v| matches!(v, Violation::WithdrawalWithoutReference { .. }) && v.to_string().contains("does not exist"),
        ),
        (
            "a withdrawal whose entry does not exist",
            &[
                "ALTER TABLE withdrawals DISABLE TRIGGER USER",
                "UPDATE withdrawals SET entry_id = -4 WHERE id = {withdrawal}",
            ],
            |v| matches!(v, Violation::WithdrawalWithoutReference { .. }),
        ),
        (
            "a payout whose withdrawal does not exist",
            &[
                "ALTER TABLE payouts DISABLE TRIGGER USER",
                "UPDATE payouts SET withdrawal_id = -4 WHERE withdrawal_id = {withdrawal}",
            ],
            |v| matches!(v, Violation::PayoutWithoutReference { .. }) && v.to_string().contains("does not exist"),
        ),
        (
            "a payout whose account does not exist in its currency",
            &[
                "ALTER TABLE payouts DISABLE TRIGGER USER",
                "UPDATE payouts SET account_id = -{account} WHERE withdrawal_id = {withdrawal}",
            ],
            |v| matches!(v, Violation::PayoutWithoutReference { .. }),
        ),
        (
            "a payout whose resolution entry does not exist",
            &[
                "ALTER TABLE payouts DISABLE TRIGGER USER",
                "UPDATE payouts SET status = 'settled', resolution_entry_id = -4 WHERE withdrawal_id = {withdrawal}",
            ],
            |v| matches!(v, Violation::PayoutWithoutReference { .. }),
        ),
        (
            "a completed withdrawal whose payout is still pending",
            &["UPDATE withdrawals SET status = 'completed' WHERE id = {withdrawal}"],
            |v| matches!(v, Violation::PayoutStateMismatch { .. }),
        ),
        (
            "a debited withdrawal without its payout",
            &["ALTER TABLE payouts DISABLE TRIGGER USER", "DELETE FROM payouts WHERE withdrawal_id = {withdrawal}"],
            |v| matches!(v, Violation::WithdrawalWithoutPayout { .. }),
        ),
        (
            "money in transit that no open payout accounts for",
            &["ALTER TABLE payouts DISABLE TRIGGER USER", "DELETE FROM payouts WHERE withdrawal_id = {withdrawal}"],
            |v| matches!(v, Violation::InTransitMismatch { in_transit_minor: 4_000, open_payouts_minor: 0, .. }),
        ),
        (
            "a settled payout the settlement account does not hold",
            &[
                "ALTER TABLE payouts DROP CONSTRAINT payouts_resolution_matches_status",
                "UPDATE payouts SET status = 'settled' WHERE withdrawal_id = {withdrawal}",
            ],
            |v| matches!(v, Violation::SettlementMismatch { settled_minor: 0, settled_payouts_minor: 4_000, .. }),
        ),
        (
            "a withdrawal whose entry does not move its amount",
            &["UPDATE withdrawals SET amount_minor = 3999 WHERE id = {withdrawal}"],
            |v| matches!(v, Violation::WithdrawalEntryMismatch { .. }),
        ),
    ];
    for (name, corrupt, expected) in cases {
        let found = audit_after(corrupt);
        assert!(found.iter().any(expected), "{name}: the audit reported {found:?}");
    }
}
