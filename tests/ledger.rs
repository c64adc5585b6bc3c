//! Ledger operations end to end on a real PostgreSQL: money movements, statements,
//! idempotency, savepoint batches, refusals that leave the database unchanged, and the
//! constraints the database enforces on its own.

mod common;

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

#[testing::test]
fn the_same_key_with_the_same_request_replays_the_first_result() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "0.00");
        let req = deposit_req(a, "10.00");
        let first = deposits::deposit(conn, &req).unwrap();
        let again = deposits::deposit(conn, &req).unwrap();
        assert!(!first.replayed && again.replayed);
        assert_eq!(first.entry, again.entry);
        assert_eq!(balance(conn, a), 1000, "applied once");

        let w = withdrawal(a, "4.00", "w");
        let w1 = withdrawals::withdraw(conn, &w).unwrap();
        let w2 = withdrawals::withdraw(conn, &w).unwrap();
        assert_eq!(w1, w2);
        assert_eq!(balance(conn, a), 600);
    });
}

#[testing::test]
fn concurrent_requests_with_one_key_apply_once() {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "a", Currency::EUR, "0.00");
    let req = deposit_req(a, "10.00");
    let start = Barrier::new(8);
    let receipts: Vec<_> = thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let mut conn = db.conn();
                let (start, req) = (&start, &req);
                s.spawn(move || {
                    start.wait();
                    deposits::deposit(&mut conn, req).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(receipts.iter().filter(|r| !r.replayed).count(), 1);
    assert!(receipts.iter().all(|r| r.entry == receipts[0].entry));
    assert_eq!(balance(&mut setup, a), 1000);
    assert_audit_clean(&mut setup);
}

/// Runs `op` and checks that it failed with the expected error and changed nothing.
fn refused(conn: &mut PgConnection, op: impl FnOnce(&mut PgConnection) -> Result<(), LedgerError>) -> LedgerError {
    let before = testing::snapshot(conn);
    let err = op(conn).expect_err("the request should be refused");
    assert_eq!(testing::snapshot(conn), before, "a refused request changed the database: {err}");
    err
}

#[testing::test]
fn every_write_answers_with_the_balances_right_after_it_also_when_replayed() {
    let db = testing::committed();
    let mut conn = db.conn();
    let alice = testing::funded_account(&mut conn, "alice", Currency::EUR, "100.00");
    let bob = testing::funded_account(&mut conn, "bob", Currency::EUR, "5.00");
    let dep = deposit_req(alice, "1.00");
    let receipt = deposits::deposit(&mut conn, &dep).unwrap();
    assert_eq!(receipt.balances, vec![deposits::Balance { account: alice, balance_minor: 10_100 }]);
    let t = Transfer { from: alice, to: bob, amount: eur("30.25"), key: testing::key("t"), metadata: None };
    let first = transfers::transfer(&mut conn, &t).unwrap();
    assert_eq!((first.balance_of(alice), first.balance_of(bob), first.replayed), (Some(7_075), Some(3_525), false));
    // Later movements do not change what the first call answered.
    transfers::transfer(&mut conn, &Transfer { key: testing::key("t2"), ..t.clone() }).unwrap();
    let again = transfers::transfer(&mut conn, &t).unwrap();
    assert!(again.replayed);
    assert_eq!((again.entry, &again.balances), (first.entry, &first.balances));
    let replayed_deposit = deposits::deposit(&mut conn, &dep).unwrap();
    assert_eq!((replayed_deposit.replayed, replayed_deposit.balances), (true, receipt.balances));
    assert_eq!(accounts::get(&mut conn, alice).unwrap().balance_minor, 4_050);
}

#[testing::test]
fn money_parsed_in_yen_is_never_booked_in_euros() {
    // Issue 12: `Amount::parse("100", JPY)` deposited with `currency: EUR` once added
    // 1.00 EUR. A request now has one currency, its money's; a EUR account refuses yen.
    let db = testing::committed();
    let mut conn = db.conn();
    let alice = testing::funded_account(&mut conn, "alice", Currency::EUR, "100.00");
    let bob = testing::funded_account(&mut conn, "bob", Currency::EUR, "0.00");
    let yen = Money::parse("100", Currency::JPY).unwrap();
    let e = refused(&mut conn, |c| {
        deposits::deposit(c, &Deposit { account: alice, amount: yen, key: testing::key("jpy") }).map(drop)
    });
    assert!(matches!(&e, LedgerError::CurrencyMismatch { request_currency, .. } if request_currency == "JPY"), "{e}");
    let transfer = Transfer { from: alice, to: bob, amount: yen, key: testing::key("jpy"), metadata: None };
    let e = refused(&mut conn, |c| transfers::transfer(c, &transfer).map(drop));
    assert!(matches!(e, LedgerError::CurrencyMismatch { .. }), "{e}");
    let before = testing::snapshot(&mut conn);
    let results = transfers::create_batch(&mut conn, &[transfer.into()]).unwrap();
    assert!(matches!(results[..], [transfers::TransferResult::Refused(LedgerError::CurrencyMismatch { .. })]));
    assert_eq!(testing::snapshot(&mut conn), before, "a refused batch item changed the database");
    let mut request = withdrawal(alice, "1.00", "jpy");
    request.amount = yen;
    let e = refused(&mut conn, |c| withdrawals::request(c, &request).map(drop));
    assert!(matches!(e, LedgerError::CurrencyMismatch { .. }), "{e}");
    // Arithmetic across currencies is refused too.
    assert!(eur("1.00").checked_add(yen).is_err());
}

/// Values that cannot even be built never reach the database.
fn assert_unbuildable_inputs_are_refused() {
    assert!(matches!(Amount::parse("-5.00", Currency::EUR), Err(InvalidInput::NonPositiveAmount(_))));
    assert!(matches!(Amount::parse("0", Currency::EUR), Err(InvalidInput::NonPositiveAmount(_))));
    assert!(matches!(Amount::parse("50.001", Currency::EUR), Err(InvalidInput::OverPreciseAmount { .. })));
    assert!(matches!(Amount::parse("1e99", Currency::EUR), Err(InvalidInput::MalformedAmount(_))));
    assert!(matches!(Amount::parse("99999999999999999999.00", Currency::EUR), Err(InvalidInput::AmountOverflow(_))));
    assert!(Iban::parse("DE00370400440532013000").is_err());
    assert!(IdempotencyKey::new("").is_err());
}

/// An EUR account with a balance near i64::MAX, so one more deposit would overflow.
fn nearly_overflowing_account(conn: &mut PgConnection) -> AccountId {
    let rich = accounts::open(conn, &NewAccount::new("rich", Currency::EUR), None).unwrap().id;
    deposits::deposit(
        conn,
        &Deposit {
            account: rich,
            amount: Money::from_minor(i64::MAX - 10, Currency::EUR).unwrap(),
            key: testing::key("big"),
        },
    )
    .unwrap();
    rich
}

/// 1.00 EUR from `from` to `to`, under a fresh key.
fn one_eur_transfer(from: AccountId, to: AccountId) -> Transfer {
    Transfer::new(from, to, eur("1.00"), testing::key("t"))
}

/// A key reused for a different request: conflict, and the first result stands.
fn assert_a_reused_key_conflicts(conn: &mut PgConnection, account: AccountId) {
    let mut req = deposit_req(account, "1.00");
    deposits::deposit(conn, &req).unwrap();
    req.amount = eur("2.00");
    let e = refused(conn, |c| deposits::deposit(c, &req).map(drop));
    assert!(matches!(e, LedgerError::IdempotencyConflict { .. }), "{e}");
    let w = withdrawal(account, "1.00", "w");
    let mut other = w.clone();
    other.key = req.key.clone();
    let e = refused(conn, |c| withdrawals::withdraw(c, &other).map(drop));
    assert!(matches!(e, LedgerError::IdempotencyConflict { .. }), "{e}");
}

#[testing::test]
fn bad_input_gets_a_typed_error_and_changes_nothing() {
    assert_unbuildable_inputs_are_refused();

    let db = testing::committed();
    let mut conn = db.conn();
    let eur_acct = testing::funded_account(&mut conn, "eur", Currency::EUR, "100.00");
    let usd_acct = testing::funded_account(&mut conn, "usd", Currency::USD, "100.00");
    let rich = nearly_overflowing_account(&mut conn);
    let unknown = AccountId::new(999_999).unwrap();
    let closed = accounts::open(&mut conn, &NewAccount::new("gone", Currency::EUR), None).unwrap().id;
    accounts::close(&mut conn, closed).unwrap();
    let in_transit = accounts::system_account(&mut conn, SystemRole::PayoutsInTransit, Currency::EUR).unwrap();

    let e = refused(&mut conn, |c| deposits::deposit(c, &deposit_req(unknown, "1.00")).map(drop));
    assert!(matches!(e, LedgerError::UnknownAccount(id) if id == unknown));
    let e = refused(&mut conn, |c| withdrawals::withdraw(c, &withdrawal(unknown, "1.00", "w")).map(drop));
    assert!(matches!(e, LedgerError::UnknownAccount(_)));
    let e = refused(&mut conn, |c| deposits::deposit(c, &deposit_req(usd_acct, "1.00")).map(drop));
    assert!(matches!(e, LedgerError::CurrencyMismatch { .. }), "{e}");
    let e = refused(&mut conn, |c| transfers::transfer(c, &one_eur_transfer(eur_acct, usd_acct)).map(drop));
    assert!(matches!(e, LedgerError::CurrencyMismatch { .. }), "{e}");
    let e = refused(&mut conn, |c| withdrawals::withdraw(c, &withdrawal(eur_acct, "100.01", "w")).map(drop));
    assert!(matches!(e, LedgerError::InsufficientFunds { balance_minor: 10000, requested_minor: 10001, .. }), "{e}");
    let e = refused(&mut conn, |c| withdrawals::withdraw(c, &withdrawal(closed, "1.00", "w")).map(drop));
    assert!(matches!(e, LedgerError::AccountClosed(_)), "{e}");
    let e = refused(&mut conn, |c| deposits::deposit(c, &deposit_req(closed, "1.00")).map(drop));
    assert!(matches!(e, LedgerError::AccountClosed(_)), "{e}");
    let e = refused(&mut conn, |c| deposits::deposit(c, &deposit_req(in_transit, "1.00")).map(drop));
    assert!(matches!(e, LedgerError::SystemAccount(_)), "{e}");
    let e = refused(&mut conn, |c| deposits::deposit(c, &deposit_req(rich, "1.00")).map(drop));
    assert!(matches!(e, LedgerError::BalanceOverflow(_)), "{e}");
    let e = refused(&mut conn, |c| transfers::transfer(c, &one_eur_transfer(eur_acct, eur_acct)).map(drop));
    assert!(matches!(e, LedgerError::SameAccount(_)), "{e}");
    let e = refused(&mut conn, |c| accounts::open(c, &NewAccount::new("", Currency::EUR), None).map(drop));
    assert!(matches!(e, LedgerError::Invalid(InvalidInput::BadField { field: "owner", .. })), "{e}");
    let e = refused(&mut conn, |c| {
        accounts::open(c, &NewAccount::new("neg", Currency::EUR).with_overdraft(-1), None).map(drop)
    });
    assert!(matches!(e, LedgerError::Invalid(_)), "{e}");

    assert_a_reused_key_conflicts(&mut conn, eur_acct);
    assert_audit_clean(&mut conn);
}

#[testing::test]
fn a_batch_commits_the_good_items_and_reports_the_bad_one() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "0.00");
    let unknown = AccountId::new(424_242).unwrap();
    let targets: Vec<AccountId> = (1..=10).map(|i| if i == 5 { unknown } else { a }).collect();
    let outcomes = ledger_core::transaction(&mut conn, &TxOptions::default(), |tx| {
        tx.batch(targets.iter().copied(), |tx, account| deposits::deposit_tx(tx, &deposit_req(account, "1.00")))
    })
    .unwrap();
    assert_eq!(outcomes.len(), 10);
    for (i, o) in outcomes.iter().enumerate() {
        if i == 4 {
            assert!(matches!(o, Err(LedgerError::UnknownAccount(id)) if *id == unknown), "{o:?}");
        } else {
            assert!(o.is_ok(), "item {i}: {o:?}");
        }
    }
    // Read back on a fresh connection: the nine are committed.
    let mut other = db.conn();
    assert_eq!(balance(&mut other, a), 900);
    assert_audit_clean(&mut other);
}

#[testing::test]
fn a_failing_inner_block_rolls_back_only_itself_as_in_the_talk() {
    // with atomic(): foo(); try: with atomic(): bar(); raise ... except: pass; baz()
    let db = testing::committed();
    let mut conn = db.conn();
    let foo = accounts::open(&mut conn, &NewAccount::new("foo", Currency::EUR), None).unwrap().id;
    let bar = accounts::open(&mut conn, &NewAccount::new("bar", Currency::EUR), None).unwrap().id;
    let baz = accounts::open(&mut conn, &NewAccount::new("baz", Currency::EUR), None).unwrap().id;
    ledger_core::transaction(&mut conn, &TxOptions::default(), |tx| {
        deposits::deposit_tx(tx, &deposit_req(foo, "1.00"))?;
        let inner: Result<(), LedgerError> = tx.savepoint(|tx| {
            deposits::deposit_tx(tx, &deposit_req(bar, "1.00"))?;
            Err(LedgerError::Pool("bar raised".into()))
        });
        assert!(inner.is_err());
        deposits::deposit_tx(tx, &deposit_req(baz, "1.00"))?;
        Ok::<_, LedgerError>(())
    })
    .unwrap();
    let mut other = db.conn();
    assert_eq!((balance(&mut other, foo), balance(&mut other, bar), balance(&mut other, baz)), (100, 0, 100));
    assert_audit_clean(&mut other);
}

#[testing::test]
fn the_database_itself_refuses_overdrafts_edits_and_unbalanced_entries() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "1.00");
        let id = a.get();
        let e = ledger_core::transaction(conn, &TxOptions::default(), |tx| {
            tx.savepoint(|tx| {
                tx.conn().batch_execute(&format!("UPDATE accounts SET balance_minor = -1 WHERE id = {id}"))
            })
        });
        assert!(e.unwrap_err().to_string().contains("accounts_balance_floor"));

        let attempts = [
            (format!("UPDATE postings SET amount_minor = 1 WHERE account_id = {id}"), "append-only"),
            (format!("DELETE FROM postings WHERE account_id = {id}"), "append-only"),
            ("DELETE FROM journal_entries".to_string(), "append-only"),
            (
                format!(
                    "WITH e AS (INSERT INTO journal_entries (kind) VALUES ('deposit') RETURNING id)
                     INSERT INTO postings (entry_id, account_id, currency, amount_minor)
                     SELECT e.id, {id}, 'EUR', 5 FROM e"
                ),
                "unbalanced",
            ),
            (
                format!("INSERT INTO postings (entry_id, account_id, currency, amount_minor) SELECT max(id), {id}, 'USD', 1 FROM journal_entries"),
                "postings_account_currency_fkey",
            ),
            ("INSERT INTO accounts (owner, currency, balance_minor) VALUES ('x', 'XXX', 0)".to_string(), "currency"),
            (
                format!("INSERT INTO withdrawals (account_id, currency, amount_minor, destination, idempotency_key, status)
                         VALUES ({id}, 'EUR', 100, 'x', 'k-status', 'completed')"),
                "withdrawals_entry_matches_status",
            ),
        ];
        for (sql, expected) in &attempts {
            let msg = ledger_core::transaction(conn, &TxOptions::default(), |tx| {
                tx.savepoint(|tx| tx.conn().batch_execute(sql))
            })
            .expect_err(sql)
            .to_string();
            assert!(msg.contains(expected), "{sql}: {msg}");
        }
        assert_audit_clean(conn);
    });
}

#[testing::test]
fn the_currency_table_and_the_code_agree() {
    testing::with_rollback(|conn| {
        let rows: Vec<(String, i16)> = ledger_core::schema::currencies::table
            .select((ledger_core::schema::currencies::code, ledger_core::schema::currencies::minor_units))
            .order(ledger_core::schema::currencies::code)
            .load(conn)
            .unwrap();
        let code: Vec<(String, i16)> =
            ledger_core::money::SUPPORTED_CURRENCIES.iter().map(|(c, u)| (c.to_string(), i16::from(*u))).collect();
        assert_eq!(rows, code);
    });
}

#[testing::test]
fn migrations_revert_cleanly_and_apply_again() {
    use diesel_migrations::MigrationHarness;
    let db = testing::committed();
    let mut conn = db.conn();
    let reverted = conn.revert_all_migrations(ledger_core::db::MIGRATIONS).unwrap();
    assert_eq!(reverted.len(), ledger_core::db::migration_count());
    let left: i64 = diesel::dsl::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "(SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename <> '__diesel_schema_migrations')",
    ))
    .get_result(&mut conn)
    .unwrap();
    assert_eq!(left, 0, "down.sql leaves no table behind");
    assert_eq!(ledger_core::db::run_migrations(&mut conn).unwrap(), ledger_core::db::migration_count());
    let a = testing::funded_account(&mut conn, "after-redo", Currency::EUR, "1.00");
    assert_eq!(balance(&mut conn, a), 100);
}

/// `diesel print-schema` output is committed as ledger-core/src/schema.rs and must
/// match the migrated database. This re-derives each table's column list from
/// information_schema the way print-schema does and compares it with the file.
#[testing::test]
fn the_committed_schema_file_matches_the_migrated_database() {
    let committed = include_str!("../ledger-core/src/schema.rs");
    let mut from_file: Vec<(String, Vec<String>)> = vec![];
    let mut in_table = false;
    for line in committed.lines().map(str::trim) {
        if let Some(table) = line.strip_suffix('{').and_then(|l| l.split_once(" (")).map(|(t, _)| t.to_string()) {
            from_file.push((table, vec![]));
            in_table = true;
        } else if line == "}" {
            in_table = false;
        } else if let (true, Some((name, ty)), Some(current)) =
            (in_table, line.split_once(" -> "), from_file.last_mut())
        {
            current.1.push(format!("{name} -> {}", ty.trim_end_matches(',')));
        }
    }
    assert!(from_file.len() >= 7, "parsed {from_file:?}");
    testing::with_rollback(|conn| {
        #[derive(QueryableByName)]
        struct Col {
            #[diesel(sql_type = diesel::sql_types::Text)]
            table_name: String,
            #[diesel(sql_type = diesel::sql_types::Text)]
            column_name: String,
            #[diesel(sql_type = diesel::sql_types::Text)]
            data_type: String,
            #[diesel(sql_type = diesel::sql_types::Text)]
            is_nullable: String,
        }
        let cols: Vec<Col> = diesel::sql_query(
            "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text
             FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name <> '__diesel_schema_migrations'
             ORDER BY table_name, ordinal_position",
        )
        .load(conn)
        .unwrap();
        let mut from_db: Vec<(String, Vec<String>)> = vec![];
        for c in cols {
            let ty = match c.data_type.as_str() {
                "bigint" => "Int8",
                "integer" => "Int4",
                "smallint" => "Int2",
                "text" => "Text",
                "boolean" => "Bool",
                "timestamp with time zone" => "Timestamptz",
                other => panic!("no mapping for {other} (extend this test)"),
            };
            let ty = if c.is_nullable == "YES" { format!("Nullable<{ty}>") } else { ty.to_string() };
            if from_db.last().map(|(t, _)| t != &c.table_name).unwrap_or(true) {
                from_db.push((c.table_name.clone(), vec![]));
            }
            from_db.last_mut().unwrap().1.push(format!("{} -> {ty}", c.column_name));
        }
        assert_eq!(from_file, from_db, "regenerate with `diesel print-schema` (see README)");
    });
}

#[testing::test]
fn a_batch_whose_set_based_write_fails_is_redone_one_savepoint_per_job() {
    use ledger_core::withdrawals::JobOutcome;
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "100.00");
        let ids: Vec<_> =
            (0..3).map(|i| withdrawals::request(conn, &withdrawal(a, "10.00", &format!("b{i}"))).unwrap().0).collect();
        let (bystander, _) = withdrawals::request(conn, &withdrawal(a, "1.00", "by")).unwrap();
        // Sabotage the middle job: its payout key is already taken, so the batch's one
        // payout INSERT fails and only that job can be to blame.
        let taken = ledger_core::payouts::instance_id(conn).map(|i| format!("payout-{i}-w{}", ids[1])).unwrap();
        conn.batch_execute(&format!(
            "INSERT INTO payouts (withdrawal_id, account_id, currency, amount_minor, destination, idempotency_key)
             VALUES ({}, {}, 'EUR', 1, 'x', '{}')",
            bystander.get(),
            a.get(),
            taken
        ))
        .unwrap();
        let items = ledger_core::transaction(conn, &TxOptions::default(), |tx| withdrawals::process_batch_tx(tx, &ids))
            .unwrap();
        let outcome = |id| items.iter().find(|i| i.id == id).map(|i| i.outcome.clone()).unwrap();
        assert!(matches!(outcome(ids[0]), JobOutcome::Debited { .. }));
        assert!(matches!(outcome(ids[1]), JobOutcome::Errored { .. }), "{:?}", outcome(ids[1]));
        assert!(matches!(outcome(ids[2]), JobOutcome::Debited { .. }));
        assert_eq!(withdrawals::get(conn, ids[1]).unwrap().status, WithdrawalStatus::Pending);
        assert_eq!(balance(conn, a), 8_000, "two of the three debited, once each");
    });
}

/// Status and kind columns map to enums (and ids to typed ids) through Diesel: every
/// variant goes into the database and comes back the same, and a text the code does
/// not know is an error when read, never a default.
#[testing::test]
fn columns_map_to_enums_and_typed_ids_and_an_unknown_value_is_an_error() {
    use diesel::sql_types::{BigInt, Text};
    use ledger_core::accounts::{AccountKind, AccountStatus};
    use ledger_core::journal::EntryKind;
    use ledger_core::payouts::PayoutStatus;
    testing::with_rollback(|conn| {
        #[derive(QueryableByName)]
        struct Kind {
            #[diesel(sql_type = Text)]
            v: AccountKind,
        }
        // Each variant written through ToSql and read back through FromSql, beside the
        // text the database holds.
        macro_rules! round_trip {
            ($ty:ty) => {{
                #[derive(QueryableByName)]
                struct Back {
                    #[diesel(sql_type = Text)]
                    v: $ty,
                    #[diesel(sql_type = Text)]
                    text: String,
                }
                for value in <$ty>::ALL {
                    let back: Back = diesel::sql_query("SELECT $1 AS v, $1 AS text")
                        .bind::<Text, _>(*value)
                        .get_result(conn)
                        .unwrap();
                    assert_eq!((back.v, back.text.as_str()), (*value, value.as_str()));
                }
            }};
        }
        round_trip!(WithdrawalStatus);
        round_trip!(PayoutStatus);
        round_trip!(AccountKind);
        round_trip!(AccountStatus);
        round_trip!(SystemRole);
        round_trip!(EntryKind);
        round_trip!(ledger_core::holds::HoldStatus);
        assert_eq!(WithdrawalStatus::ALL.len(), 6);

        let known: Kind = diesel::sql_query("SELECT 'system' AS v").get_result(conn).unwrap();
        assert_eq!(known.v, AccountKind::System);
        let unknown = diesel::sql_query("SELECT 'customer ' AS v").get_result::<Kind>(conn).map(|k| k.v).unwrap_err();
        assert!(unknown.to_string().contains("unknown AccountKind \"customer \""), "{unknown}");

        #[derive(QueryableByName)]
        struct Id {
            #[diesel(sql_type = BigInt)]
            v: AccountId,
        }
        let id: Id = diesel::sql_query("SELECT 7::bigint AS v").get_result(conn).unwrap();
        assert_eq!(id.v, AccountId::new(7).unwrap());
        assert!(diesel::sql_query("SELECT 0::bigint AS v").get_result::<Id>(conn).is_err(), "ids are positive");
        assert!(diesel::sql_query("SELECT 'customer' AS v").get_result::<Kind>(conn).is_ok());
        #[derive(QueryableByName)]
        struct Cur {
            #[diesel(sql_type = Text)]
            v: Currency,
        }
        let c: Cur = diesel::sql_query("SELECT 'JPY' AS v").get_result(conn).unwrap();
        assert_eq!(c.v, Currency::JPY);
        assert!(diesel::sql_query("SELECT 'XXX' AS v").get_result::<Cur>(conn).is_err(), "unknown currency");
    });
}

/// A withdrawal job's retry waits as its `RetryPolicy` says, though the wait is
/// computed in SQL (next to the row's attempt count): under the same capped ceiling as
/// `Backoff::delay`, above the jitter's floor, and `failed` after `max_attempts`.
#[testing::test]
fn a_failed_jobs_retry_waits_as_the_one_retry_policy_says() {
    use ledger_core::retry::{Backoff, Jitter, RetryPolicy};
    testing::with_rollback(|conn| {
        #[derive(QueryableByName)]
        struct Wait {
            #[diesel(sql_type = diesel::sql_types::Double)]
            ms: f64,
        }
        let a = testing::funded_account(conn, "r", Currency::EUR, "10.00");
        let (job, _) = withdrawals::request(conn, &withdrawal(a, "1.00", "retry")).unwrap();
        let policy = RetryPolicy { max_attempts: 6, backoff: Backoff::new(1_000, 4_000, Jitter::Half) };
        for n in 0..5_u32 {
            let status = withdrawals::record_failed_attempt(conn, job, "boom", &policy).unwrap();
            assert_eq!(status, Some(WithdrawalStatus::Pending), "attempt {n}");
            let wait: Wait = diesel::sql_query(
                "SELECT EXTRACT(EPOCH FROM next_attempt_at - now())::float8 * 1000 AS ms FROM withdrawals WHERE id = $1",
            )
            .bind::<diesel::sql_types::BigInt, _>(job.get())
            .get_result(conn)
            .unwrap();
            let ceiling = policy.backoff.ceiling_ms(n) as f64;
            assert!(
                wait.ms >= ceiling / 2.0 - 1.0 && wait.ms <= ceiling + 1.0,
                "retry {n}: {} ms, ceiling {ceiling}",
                wait.ms
            );
        }
        let last = withdrawals::record_failed_attempt(conn, job, "boom", &policy).unwrap();
        assert_eq!(last, Some(WithdrawalStatus::Failed), "the sixth attempt was the last");
    });
}

#[testing::test]
fn a_key_left_by_a_refused_call_in_a_committed_transaction_is_free_again() {
    // A `_tx` call refused inside the caller's transaction, which commits anyway, leaves
    // its key without a result. It applied nothing, so the next request takes the key
    // (this used to panic: "a committed idempotency key always has its result id").
    let db = testing::committed();
    let mut conn = db.conn();
    let alice = testing::funded_account(&mut conn, "alice", Currency::EUR, "10.00");
    let bob = testing::funded_account(&mut conn, "bob", Currency::EUR, "1.00");
    let key = testing::key("orphan");
    let too_much = Transfer::new(alice, bob, eur("50.00"), key.clone());
    ledger_core::transaction(&mut conn, &TxOptions::no_retry(), |tx| {
        let refused = transfers::transfer_tx(tx, &too_much);
        assert!(matches!(refused, Err(LedgerError::InsufficientFunds { .. })), "{refused:?}");
        Ok::<_, LedgerError>(()) // the caller commits its own work regardless
    })
    .unwrap();
    let fits = Transfer::new(alice, bob, eur("5.00"), key.clone());
    let first = transfers::transfer(&mut conn, &fits).unwrap();
    assert!(!first.replayed);
    let again = transfers::transfer(&mut conn, &fits).unwrap();
    assert!(again.replayed && again.entry == first.entry);
    assert_eq!((balance(&mut conn, alice), balance(&mut conn, bob)), (500, 600));
    assert_audit_clean(&mut conn);
}
