//! Holds one at a time: refusals, held money, partial posts, replays, the audit, and closed accounts.

use super::*;

#[testing::test]
fn refused_holds_posts_and_voids_answer_a_typed_error_and_change_nothing() {
    testing::with_rollback(|conn| {
        let payer = testing::funded_account(conn, "payer", Currency::EUR, "100.00");
        let payee = testing::funded_account(conn, "payee", Currency::EUR, "0.00");
        let yen = testing::funded_account(conn, "yen", Currency::JPY, "0");
        let closed = testing::funded_account(conn, "closed", Currency::EUR, "0.00");
        accounts::close(conn, closed).unwrap();
        let overdraft =
            accounts::open(conn, &NewAccount::new("od", Currency::EUR).with_overdraft(2_000), None).unwrap().id;
        let funding = accounts::system_account(conn, accounts::SystemRole::ExternalFunding, Currency::EUR).unwrap();
        let unknown = AccountId::new(999_999).unwrap();

        // Holds: (from, to, amount, timeout, expected: Ok(payer's balance after) or the error's code)
        type Case = (AccountId, AccountId, Money, Option<u64>, Result<i64, &'static str>);
        let table: &[Case] = &[
            (payer, payee, eur("30.00"), None, Ok(7_000)),
            (payer, payee, eur("70.00"), Some(60_000), Ok(0)),
            (payer, payee, eur("0.01"), None, Err("insufficient_funds")),
            (overdraft, payee, eur("20.00"), None, Ok(-2_000)),
            (overdraft, payee, eur("0.01"), None, Err("insufficient_funds")),
            (payer, yen, eur("1.00"), None, Err("currency_mismatch")),
            (payer, payee, Money::parse("1", Currency::JPY).unwrap(), None, Err("currency_mismatch")),
            (payer, payer, eur("1.00"), None, Err("same_account")),
            (payer, closed, eur("1.00"), None, Err("account_closed")),
            (payer, funding, eur("1.00"), None, Err("system_account")),
            (funding, payee, eur("1.00"), None, Err("system_account")),
            (closed, payee, eur("1.00"), None, Err("account_closed")),
            (payer, unknown, eur("1.00"), None, Err("unknown_account")),
            (unknown, payee, eur("1.00"), None, Err("unknown_account")),
        ];
        let mut made = Vec::new();
        for (i, (from, to, amount, timeout_ms, expected)) in table.iter().enumerate() {
            let before = testing::snapshot(conn);
            let request = HoldRequest {
                from: *from,
                to: *to,
                amount: *amount,
                timeout: timeout_ms.map(|ms| Timeout::from_ms(ms).unwrap()),
                key: key("case"),
            };
            let got = holds::hold(conn, &request);
            match (&got, expected) {
                (Ok(r), Ok(after)) => {
                    assert_eq!(r.payer.balance_minor, *after, "case {i}");
                    assert_eq!((r.hold.status, r.replayed), (HoldStatus::Pending, false), "case {i}");
                    assert_eq!(r.hold.expires_at.is_some(), timeout_ms.is_some(), "case {i}");
                    made.push(r.hold.id);
                }
                (Err(e), Err(code)) => {
                    assert_eq!(e.code(), *code, "case {i}: {e}");
                    assert_eq!(testing::snapshot(conn), before, "case {i} changed the database");
                }
                _ => panic!("case {i}: got {got:?}, expected {expected:?}"),
            }
        }
        let (thirty, seventy) = (made[0], made[1]);
        holds::post(conn, thirty, Some(eur("10.00")), &key("p")).unwrap();

        // Posts and voids: (hold, action, expected error code)
        let missing = HoldId::new(999_999).unwrap();
        type Act = Box<dyn Fn(&mut PgConnection) -> Result<HoldReceipt, LedgerError>>;
        let refusals: Vec<(&str, Act, &str)> = vec![
            (
                "more than held",
                Box::new(move |c| holds::post(c, seventy, Some(eur("70.01")), &key("x"))),
                "post_exceeds_hold",
            ),
            (
                "another currency",
                Box::new(move |c| holds::post(c, seventy, Some(Money::parse("1", Currency::JPY).unwrap()), &key("x"))),
                "hold_currency_mismatch",
            ),
            ("posting a posted hold", Box::new(move |c| holds::post(c, thirty, None, &key("x"))), "hold_finished"),
            ("voiding a posted hold", Box::new(move |c| holds::void(c, thirty, &key("x"))), "hold_finished"),
            ("an unknown hold", Box::new(move |c| holds::post(c, missing, None, &key("x"))), "unknown_hold"),
            ("voiding an unknown hold", Box::new(move |c| holds::void(c, missing, &key("x"))), "unknown_hold"),
        ];
        for (name, act, code) in refusals {
            let before = testing::snapshot(conn);
            let e = act(conn).expect_err(name);
            assert_eq!(e.code(), code, "{name}: {e}");
            assert_eq!(testing::snapshot(conn), before, "{name} changed the database");
        }
        let finished = holds::void(conn, thirty, &key("y")).unwrap_err();
        assert_eq!(
            finished.to_string(),
            format!("hold {thirty} is posted: only a pending hold can be posted or voided")
        );
        let exceeds = holds::post(conn, seventy, Some(eur("70.01")), &key("z")).unwrap_err();
        assert_eq!(exceeds.to_string(), format!("hold {seventy} holds 70.00 EUR: cannot post 70.01 EUR"));
        assert_audit_clean(conn);
    });
}

#[testing::test]
fn held_money_cannot_be_spent_until_the_hold_is_voided() {
    testing::with_rollback(|conn| {
        let payer = testing::funded_account(conn, "payer", Currency::EUR, "100.00");
        let payee = testing::funded_account(conn, "payee", Currency::EUR, "0.00");
        let other = testing::funded_account(conn, "other", Currency::EUR, "0.00");
        let held = hold(conn, payer, payee, "70.00");
        assert_eq!(figures(conn, payer), (3_000, 7_000, 0));
        assert_eq!(holds::pending_minor(conn, payer).unwrap(), 7_000);
        assert_eq!(holds::balance(conn, payer).unwrap().posted_minor(), 10_000, "held money is still the payer's");
        assert_eq!(figures(conn, payee), (0, 0, 7_000));
        // The rest can be spent; not a cent more, by a transfer or by another hold.
        let spend = |conn: &mut PgConnection, amount: &str| {
            transfers::transfer(
                conn,
                &Transfer { from: payer, to: other, amount: eur(amount), key: key("t"), metadata: None },
            )
        };
        spend(conn, "30.00").unwrap();
        assert_eq!(spend(conn, "0.01").unwrap_err().code(), "insufficient_funds");
        assert_eq!(holds::hold(conn, &req(payer, other, "0.01")).unwrap_err().code(), "insufficient_funds");
        // Voided: all of it back, and spendable again.
        let voided = holds::void(conn, held.hold.id, &key("v")).unwrap();
        assert_eq!((voided.hold.status, voided.hold.returned_minor()), (HoldStatus::Voided, 7_000));
        assert_eq!((voided.payer.balance_minor, voided.payer.pending_debits_minor), (7_000, 0));
        assert_eq!(voided.payee.pending_credits_minor, 0);
        spend(conn, "70.00").unwrap();
        assert_eq!(balance(conn, payer), 0);
        assert_audit_clean(conn);
    });
}

#[testing::test]
fn a_partial_post_pays_the_payee_and_returns_the_rest_in_one_entry() {
    testing::with_rollback(|conn| {
        let payer = testing::funded_account(conn, "payer", Currency::EUR, "100.00");
        let payee = testing::funded_account(conn, "payee", Currency::EUR, "5.00");
        let held = hold(conn, payer, payee, "50.00");
        assert_eq!((held.payer.balance_minor, held.payer.pending_debits_minor), (5_000, 5_000));
        assert_eq!((held.payee.balance_minor, held.payee.pending_credits_minor), (500, 5_000));
        let posted = holds::post(conn, held.hold.id, Some(eur("20.00")), &key("p")).unwrap();
        assert_eq!(posted.hold.status, HoldStatus::Posted);
        assert_eq!((posted.hold.posted_minor, posted.hold.returned_minor()), (2_000, 3_000));
        assert_eq!(posted.hold.resolution_entry, Some(posted.entry));
        assert!(posted.hold.finished_at.is_some());
        assert_eq!((posted.payer.balance_minor, posted.payer.pending_debits_minor), (8_000, 0));
        assert_eq!((posted.payee.balance_minor, posted.payee.pending_credits_minor), (2_500, 0));
        assert_eq!((balance(conn, payer), balance(conn, payee)), (8_000, 2_500));
        // One entry: 50.00 out of holds pending, 20.00 to the payee, 30.00 back.
        let pending = accounts::system_account(conn, accounts::SystemRole::HoldsPending, Currency::EUR).unwrap();
        let lines = |conn: &mut PgConnection, account, entry| {
            ledger_core::journal::statement(conn, account, 100)
                .unwrap()
                .into_iter()
                .filter(|l| l.entry_id == entry)
                .map(|l| (l.kind, l.amount_minor))
                .collect::<Vec<_>>()
        };
        assert_eq!(lines(conn, pending, posted.entry), [(EntryKind::HoldPost, -5_000)]);
        assert_eq!(lines(conn, payee, posted.entry), [(EntryKind::HoldPost, 2_000)]);
        assert_eq!(lines(conn, payer, posted.entry), [(EntryKind::HoldPost, 3_000)]);
        assert_eq!(accounts::get(conn, pending).unwrap().balance_minor, 0);
        // Posting all of a hold touches only the payee.
        let all = hold(conn, payer, payee, "10.00");
        let posted_all = holds::post(conn, all.hold.id, None, &key("p")).unwrap();
        assert!(lines(conn, payer, posted_all.entry).is_empty(), "nothing to return");
        assert_eq!(lines(conn, payee, posted_all.entry), [(EntryKind::HoldPost, 1_000)]);
        assert_eq!((posted_all.hold.posted_minor, posted_all.payee.balance_minor), (1_000, 3_500));
        assert_eq!(posted_all.payer.balance_minor, 7_000);
        assert_audit_clean(conn);
    });
}

#[testing::test]
fn every_write_replays_its_first_result_and_refuses_another_request_under_its_key() {
    testing::with_rollback(|conn| {
        let payer = testing::funded_account(conn, "payer", Currency::EUR, "100.00");
        let payee = testing::funded_account(conn, "payee", Currency::EUR, "0.00");
        let request = req(payer, payee, "40.00");
        let first = holds::hold(conn, &request).unwrap();
        let before = testing::snapshot(conn);
        let again = holds::hold(conn, &request).unwrap();
        assert_eq!((again.hold.id, again.entry, again.replayed), (first.hold.id, first.entry, true));
        assert_eq!(again.payer, first.payer);
        assert_eq!(testing::snapshot(conn), before, "a replay writes nothing");
        let other = HoldRequest { amount: eur("41.00"), ..request.clone() };
        let timed = HoldRequest { timeout: Some(Timeout::parse("30s").unwrap()), ..request.clone() };
        for changed in [&other, &timed] {
            assert_eq!(holds::hold(conn, changed).unwrap_err().code(), "idempotency_conflict");
        }
        // A post under its key, replayed; the same key for another amount or a void is a conflict.
        let post_key = key("post");
        let posted = holds::post(conn, first.hold.id, Some(eur("15.00")), &post_key).unwrap();
        let before = testing::snapshot(conn);
        let replay = holds::post(conn, first.hold.id, Some(eur("15.00")), &post_key).unwrap();
        assert_eq!((replay.entry, replay.replayed, replay.hold.posted_minor), (posted.entry, true, 1_500));
        assert_eq!(testing::snapshot(conn), before);
        assert_eq!(holds::post(conn, first.hold.id, None, &post_key).unwrap_err().code(), "idempotency_conflict");
        assert_eq!(holds::void(conn, first.hold.id, &post_key).unwrap_err().code(), "idempotency_conflict");
        // The hold's own key still replays the hold (its entry), now showing it posted.
        let late = holds::hold(conn, &request).unwrap();
        assert_eq!((late.entry, late.hold.status, late.replayed), (first.entry, HoldStatus::Posted, true));
        // A void, replayed.
        let second = hold(conn, payer, payee, "10.00");
        let void_key = key("void");
        let voided = holds::void(conn, second.hold.id, &void_key).unwrap();
        let replay = holds::void(conn, second.hold.id, &void_key).unwrap();
        assert_eq!((replay.entry, replay.replayed), (voided.entry, true));
        // A refused request leaves its key unused: the same key works once it can.
        let big = req(payer, payee, "100.00");
        assert_eq!(holds::hold(conn, &big).unwrap_err().code(), "insufficient_funds");
        ledger_core::deposits::deposit(
            conn,
            &ledger_core::deposits::Deposit { account: payer, amount: eur("15.00"), key: key("top-up") },
        )
        .unwrap();
        assert!(!holds::hold(conn, &big).unwrap().replayed);
        assert_audit_clean(conn);
    });
}

#[testing::test]
fn the_audit_pairs_holds_pending_with_the_pending_holds_and_each_hold_with_its_entries() {
    testing::with_rollback(|conn| {
        let payer = testing::funded_account(conn, "payer", Currency::EUR, "100.00");
        let payee = testing::funded_account(conn, "payee", Currency::EUR, "0.00");
        let pending = hold(conn, payer, payee, "25.00");
        let posted = hold(conn, payer, payee, "25.00");
        holds::post(conn, posted.hold.id, Some(eur("5.00")), &key("p")).unwrap();
        assert_audit_clean(conn);
        // A hold that says it holds more than its entry moved.
        conn.batch_execute(&format!("UPDATE holds SET amount_minor = 2600 WHERE id = {}", pending.hold.id)).unwrap();
        let report = ledger_core::audit::run(conn).unwrap();
        let found: Vec<&Violation> = report.violations.iter().collect();
        assert!(
            found.iter().any(|v| matches!(
                v,
                Violation::Holds(HoldsViolation::PendingMismatch { held_minor: 2_500, pending_holds_minor: 2_600, .. })
            ) && v.to_string()
                == "EUR: holds pending holds 25.00 EUR, pending holds total 26.00 EUR"),
            "{report}"
        );
        let pending_id = pending.hold.id.get();
        assert!(
            found.iter().any(
                |v| matches!(v, Violation::Holds(HoldsViolation::EntriesMismatch { hold }) if *hold == pending_id)
            ),
            "{report}"
        );
        // A posted hold whose record disagrees with its resolution entry.
        conn.batch_execute(&format!(
            "UPDATE holds SET amount_minor = 2500 WHERE id = {}; UPDATE holds SET posted_minor = 600 WHERE id = {}",
            pending.hold.id, posted.hold.id
        ))
        .unwrap();
        let report = ledger_core::audit::run(conn).unwrap();
        assert_eq!(
            report.violations,
            [Violation::Holds(HoldsViolation::EntriesMismatch { hold: posted.hold.id.get() })],
            "{report}"
        );
    });
}

#[testing::test]
fn money_held_from_an_account_closed_meanwhile_still_comes_back_to_it() {
    testing::with_rollback(|conn| {
        let payer = testing::funded_account(conn, "payer", Currency::EUR, "10.00");
        let payee = testing::funded_account(conn, "payee", Currency::EUR, "0.00");
        let all = hold(conn, payer, payee, "10.00");
        accounts::close(conn, payer).unwrap();
        let voided = holds::void(conn, all.hold.id, &key("v")).unwrap();
        assert_eq!(voided.payer.balance_minor, 1_000);
        // A payee closed meanwhile cannot be paid: the post is refused, the hold stays pending.
        let payer2 = testing::funded_account(conn, "payer2", Currency::EUR, "10.00");
        let gone = testing::funded_account(conn, "gone", Currency::EUR, "0.00");
        let h = hold(conn, payer2, gone, "4.00");
        accounts::close(conn, gone).unwrap();
        assert_eq!(holds::post(conn, h.hold.id, None, &key("p")).unwrap_err().code(), "account_closed");
        assert_eq!(holds::get(conn, h.hold.id).unwrap().status, HoldStatus::Pending);
        assert_eq!(holds::void(conn, h.hold.id, &key("v")).unwrap().payer.balance_minor, 1_000);
        assert_audit_clean(conn);
    });
}
