//! Refusals: bad input gets a typed error and changes nothing, and a refused call leaves its key free.

use super::*;

/// Runs `op` and checks that it failed with the expected error and changed nothing.
fn refused(conn: &mut PgConnection, op: impl FnOnce(&mut PgConnection) -> Result<(), LedgerError>) -> LedgerError {
    let before = testing::snapshot(conn);
    let err = op(conn).expect_err("the request should be refused");
    assert_eq!(testing::snapshot(conn), before, "a refused request changed the database: {err}");
    err
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

#[testing::test]
fn every_listing_refuses_a_limit_below_one_with_a_typed_error() {
    testing::with_rollback(|conn| {
        let alice = testing::funded_account(conn, "alice", Currency::EUR, "10.00");
        type Lister = fn(&mut PgConnection, AccountId, i64) -> Result<usize, LedgerError>;
        let listings: [(&str, Lister); 6] = [
            ("journal::statement", |c, a, n| Ok(ledger_core::journal::statement(c, a, n)?.len())),
            ("history::page", |c, a, n| Ok(ledger_core::history::page(c, a, None, n)?.len())),
            ("payouts::list", |c, _, n| Ok(ledger_core::payouts::list(c, None, n)?.len())),
            ("payouts::list_after", |c, _, n| Ok(ledger_core::payouts::list_after(c, None, None, n)?.len())),
            ("withdrawals::list", |c, a, n| Ok(withdrawals::list(c, None, Some(a), n)?.len())),
            ("withdrawals::list_after", |c, a, n| Ok(withdrawals::list_after(c, None, Some(a), None, n)?.len())),
        ];
        for (name, list) in listings {
            for bad in [0, -1, i64::MIN] {
                let e = list(conn, alice, bad).expect_err(name);
                assert!(
                    matches!(e, LedgerError::Invalid(InvalidInput::BadField { field: "limit", .. })),
                    "{name}: {e}"
                );
            }
            assert!(list(conn, alice, 1).unwrap() <= 1, "{name} with limit 1");
        }
    });
}
