//! Deposits, transfers and withdrawals in balanced entries, statements, withdrawal jobs, and overdraft limits.

use super::*;

#[testing::test]
fn deposit_transfer_and_withdraw_move_money_in_balanced_entries() {
    testing::with_rollback(|conn| {
        let alice = testing::funded_account(conn, "alice", Currency::EUR, "100.00");
        let bob = testing::funded_account(conn, "bob", Currency::EUR, "5.00");
        transfers::transfer(
            conn,
            &Transfer { from: alice, to: bob, amount: eur("30.25"), key: testing::key("t"), metadata: None },
        )
        .unwrap();
        let w = withdrawals::withdraw(conn, &withdrawal(bob, "10.00", "w")).unwrap();
        assert_eq!(w.status, WithdrawalStatus::PayingOut);
        assert_eq!(balance(conn, alice), 6975);
        assert_eq!(balance(conn, bob), 2525);
        let in_transit = accounts::system_account(conn, SystemRole::PayoutsInTransit, Currency::EUR).unwrap();
        let payout =
            ledger_core::payouts::for_withdrawal(conn, w.id).unwrap().expect("a payout row is written with the debit");
        assert_eq!((payout.amount_minor, payout.destination.as_str(), payout.status.as_str()), (1000, IBAN, "pending"));
        // The in-transit account holds what is owed to the bank: this payout and any
        // other test's committed ones, never less than this one.
        assert!(balance(conn, in_transit) >= 1000);
        assert_audit_clean(conn);
    });
}

#[testing::test]
fn a_statement_shows_each_posting_with_its_running_balance() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "10.00");
        let b = testing::funded_account(conn, "b", Currency::EUR, "0.01");
        deposits::deposit(conn, &deposit_req(a, "2.50")).unwrap();
        transfers::transfer(
            conn,
            &Transfer { from: a, to: b, amount: eur("7.00"), key: testing::key("t"), metadata: None },
        )
        .unwrap();
        let lines = ledger_core::journal::statement(conn, a, 100).unwrap();
        use ledger_core::journal::EntryKind;
        let got: Vec<(EntryKind, i64, i64)> =
            lines.iter().map(|l| (l.kind, l.amount_minor, l.balance_after_minor)).collect();
        assert_eq!(
            got,
            vec![(EntryKind::Deposit, 1000, 1000), (EntryKind::Deposit, 250, 1250), (EntryKind::Transfer, -700, 550)]
        );
    });
}

#[testing::test]
fn a_withdrawal_job_is_processed_once_and_a_refusal_is_recorded_with_its_reason() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "60.00");
        let (first, replayed) = withdrawals::request(conn, &withdrawal(a, "50.00", "job")).unwrap();
        assert!(!replayed);
        let (second, _) = withdrawals::request(conn, &withdrawal(a, "50.00", "job")).unwrap();
        assert_eq!(withdrawals::get(conn, first).unwrap().status, WithdrawalStatus::Pending);
        assert_eq!(balance(conn, a), 6000, "requesting moves no money");

        let run = |conn: &mut PgConnection, id| {
            ledger_core::transaction(conn, &TxOptions::default(), |tx| withdrawals::process_tx(tx, id)).unwrap()
        };
        assert!(matches!(run(conn, first), JobOutcome::Debited { .. }));
        assert_eq!(run(conn, first), JobOutcome::AlreadyFinal(WithdrawalStatus::PayingOut));
        assert!(matches!(run(conn, second), JobOutcome::Rejected { code: "insufficient_funds", .. }));
        let job = withdrawals::get(conn, second).unwrap();
        assert_eq!(job.status, WithdrawalStatus::Rejected);
        assert!(job.reason.unwrap().contains("insufficient funds"));
        assert_eq!(job.entry_id, None);
        assert_eq!(balance(conn, a), 1000);
        assert_audit_clean(conn);
    });
}

#[testing::test]
fn an_overdraft_limit_lowers_the_floor_and_no_further() {
    testing::with_rollback(|conn| {
        let a = accounts::open(conn, &NewAccount::new("o", Currency::EUR).with_overdraft(2000), None).unwrap();
        withdrawals::withdraw(conn, &withdrawal(a.id, "20.00", "od")).unwrap();
        assert_eq!(balance(conn, a.id), -2000);
        let err = withdrawals::withdraw(conn, &withdrawal(a.id, "0.01", "od")).unwrap_err();
        assert!(matches!(err, LedgerError::InsufficientFunds { floor_minor: -2000, .. }), "{err}");
        assert_audit_clean(conn);
    });
}

#[testing::test]
fn an_overdraft_limit_above_the_currency_ceiling_is_refused_and_opens_nothing() {
    testing::with_rollback(|conn| {
        // The default ceiling: 1,000,000 units of the currency.
        assert_eq!(accounts::overdraft_ceiling(conn, Currency::EUR).unwrap(), 100_000_000);
        assert_eq!(accounts::overdraft_ceiling(conn, Currency::JPY).unwrap(), 1_000_000);
        let before = testing::snapshot(conn);
        let huge = NewAccount::new("o", Currency::EUR).with_overdraft(i64::MAX);
        let err = accounts::open(conn, &huge, None).unwrap_err();
        assert!(err.to_string().contains("above this ledger's ceiling of 1000000.00 EUR"), "{err}");
        assert_eq!(testing::snapshot(conn), before, "nothing was opened");
        // At the ceiling is fine; a lower ceiling refuses what the old one allowed.
        accounts::open(conn, &NewAccount::new("o", Currency::EUR).with_overdraft(100_000_000), None).unwrap();
        accounts::set_overdraft_ceiling(conn, Currency::EUR, 5_000).unwrap();
        let err = accounts::open(conn, &NewAccount::new("o", Currency::EUR).with_overdraft(5_001), None).unwrap_err();
        assert!(err.to_string().contains("50.01 EUR is above this ledger's ceiling of 50.00 EUR"), "{err}");
        assert_eq!(accounts::set_overdraft_ceiling(conn, Currency::EUR, -1).unwrap_err().code(), "invalid_input");
        // The database refuses it too, whoever writes the row.
        let raw = conn.batch_execute(
            "SAVEPOINT raw; INSERT INTO accounts (owner, currency, kind, balance_minor, overdraft_limit_minor)
             VALUES ('raw', 'EUR', 'customer', 0, 5001)",
        );
        assert!(raw.unwrap_err().to_string().contains("above the EUR ceiling of 5000"));
        conn.batch_execute("ROLLBACK TO SAVEPOINT raw").unwrap();
    });
}
