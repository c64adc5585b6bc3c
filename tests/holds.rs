//! Holds (two-phase transfers) on a real PostgreSQL: the decisions as a table, held
//! money that cannot be spent, partial posts, replays, the audit, and a post racing the
//! expiry on real concurrent connections.

mod common;

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

/// A hold of `amount` whose timeout has already passed (1 ms, then a wait past it).
fn due_hold(conn: &mut PgConnection, from: AccountId, to: AccountId, amount: &str) -> HoldId {
    let r = HoldRequest { timeout: Some(Timeout::from_ms(1).unwrap()), ..req(from, to, amount) };
    let id = holds::hold(conn, &r).unwrap().hold.id;
    thread::sleep(Duration::from_millis(5));
    id
}

#[testing::test]
fn the_expiry_returns_due_holds_only_in_bounded_batches() {
    testing::with_rollback(|conn| {
        let payer = testing::funded_account(conn, "payer", Currency::EUR, "100.00");
        let payee = testing::funded_account(conn, "payee", Currency::EUR, "0.00");
        let later = HoldRequest { timeout: Some(Timeout::parse("1h").unwrap()), ..req(payer, payee, "1.00") };
        let later = holds::hold(conn, &later).unwrap().hold.id;
        let never = hold(conn, payer, payee, "2.00").hold.id;
        let due: Vec<HoldId> = (0..3).map(|_| due_hold(conn, payer, payee, "3.00")).collect();
        assert_eq!(balance(conn, payer), 10_000 - 100 - 200 - 900);
        let first = holds::expire_due(conn, 2).unwrap();
        assert_eq!(first.iter().map(|e| e.hold).collect::<Vec<_>>(), due[..2], "earliest deadlines first");
        assert_eq!((first[1].returned_minor, first[1].payer_balance_minor), (300, 8_800 + 600));
        let rest = holds::expire_due(conn, 1_000).unwrap();
        assert_eq!(rest.iter().map(|e| e.hold).collect::<Vec<_>>(), due[2..]);
        assert!(holds::expire_due(conn, 10).unwrap().is_empty());
        for id in &due {
            let h = holds::get(conn, *id).unwrap();
            assert_eq!((h.status, h.returned_minor()), (HoldStatus::Expired, 300));
        }
        for id in [later, never] {
            assert_eq!(holds::get(conn, id).unwrap().status, HoldStatus::Pending);
        }
        assert_eq!(figures(conn, payer), (9_700, 300, 0));
        for bad in [0, holds::MAX_EXPIRY_BATCH + 1] {
            assert_eq!(holds::expire_due(conn, bad).unwrap_err().code(), "invalid_input");
        }
        assert_audit_clean(conn);
    });
}

/// The post and the expiry of due holds, released together on real connections: for
/// each hold exactly one wins, and the money adds up to the cent.
#[testing::test]
fn a_post_racing_the_expiry_ends_with_exactly_one_winner() {
    const ROUNDS: usize = 30;
    let db = testing::committed();
    let mut setup = db.conn();
    let payer = testing::funded_account(&mut setup, "payer", Currency::EUR, "1000.00");
    let payee = testing::funded_account(&mut setup, "payee", Currency::EUR, "0.00");
    let (mut poster, mut expirer) = (db.conn(), db.conn());
    let (mut posts_won, mut expiries_won, mut posted_minor) = (0, 0, 0);
    for round in 0..ROUNDS {
        let id = due_hold(&mut setup, payer, payee, "10.00");
        let start = Barrier::new(2);
        let (post, expired) = thread::scope(|s| {
            let post = s.spawn(|| {
                start.wait();
                holds::post(&mut poster, id, Some(eur("7.50")), &key("race-post"))
            });
            let expiry = s.spawn(|| {
                start.wait();
                holds::expire_due(&mut expirer, 10)
            });
            (post.join().unwrap(), expiry.join().unwrap().unwrap())
        });
        let expired_it = expired.iter().any(|e| e.hold == id);
        match post {
            Ok(r) => {
                assert!(!expired_it, "round {round}: posted and expired");
                assert_eq!(r.hold.status, HoldStatus::Posted);
                posts_won += 1;
                posted_minor += 750;
            }
            Err(LedgerError::HoldFinished { status: HoldStatus::Expired, .. }) => {
                assert!(expired_it, "round {round}: refused as expired, but the expiry did not expire it");
                expiries_won += 1;
            }
            Err(e) => panic!("round {round}: {e}"),
        }
        // Whoever lost, the next expiry round finds nothing left of this hold.
        assert!(holds::expire_due(&mut setup, 10).unwrap().is_empty());
    }
    eprintln!("post won {posts_won}, expiry won {expiries_won} of {ROUNDS}");
    assert_eq!(posts_won + expiries_won, ROUNDS);
    assert_eq!(balance(&mut setup, payer), 100_000 - posted_minor);
    assert_eq!(balance(&mut setup, payee), posted_minor);
    assert_eq!(holds::pending_minor(&mut setup, payer).unwrap(), 0);
    assert_audit_clean(&mut setup);
}

/// Both orders of the race, forced: the expiry holding the row makes the post wait and
/// then refuse; a post holding the row is skipped by the expiry, which never waits.
#[testing::test]
fn whoever_holds_the_row_first_wins_and_the_other_never_moves_money() {
    let db = testing::committed();
    let mut setup = db.conn();
    let payer = testing::funded_account(&mut setup, "payer", Currency::EUR, "100.00");
    let payee = testing::funded_account(&mut setup, "payee", Currency::EUR, "0.00");
    let (mut a, mut b, mut observer) = (db.conn(), db.conn(), db.conn());
    let (pid_a, pid_b) = (testing::backend_pid(&mut a), testing::backend_pid(&mut b));

    // 1. The expiry locks the hold first; the post waits for it, then finds it expired.
    let first = due_hold(&mut setup, payer, payee, "10.00");
    let (locked_tx, locked_rx) = std::sync::mpsc::sync_channel(0);
    let (release_tx, release_rx) = std::sync::mpsc::sync_channel(0);
    let refused = thread::scope(|s| {
        let b = &mut b;
        s.spawn(move || {
            ledger_core::transaction(b, &TxOptions::no_retry(), |tx| {
                let expired = holds::expire_due_tx(tx, 10)?;
                assert_eq!(expired.len(), 1);
                locked_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok::<_, LedgerError>(())
            })
            .unwrap();
        });
        locked_rx.recv().unwrap();
        let post = s.spawn(|| holds::post(&mut a, first, None, &key("late")));
        testing::wait_until_blocked(&mut observer, pid_a, pid_b, Duration::from_secs(30)).unwrap();
        release_tx.send(()).unwrap();
        post.join().unwrap()
    });
    assert!(matches!(refused, Err(LedgerError::HoldFinished { status: HoldStatus::Expired, .. })), "{refused:?}");

    // 2. A post holds the row (its transaction still open): the expiry skips it at once.
    let second = due_hold(&mut setup, payer, payee, "20.00");
    let (locked_tx, locked_rx) = std::sync::mpsc::sync_channel(0);
    let (release_tx, release_rx) = std::sync::mpsc::sync_channel(0);
    thread::scope(|s| {
        let a = &mut a;
        s.spawn(move || {
            ledger_core::transaction(a, &TxOptions::no_retry(), |tx| {
                holds::post_tx(tx, second, None, &key("early"))?;
                locked_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok::<_, LedgerError>(())
            })
            .unwrap();
        });
        locked_rx.recv().unwrap();
        assert!(holds::expire_due(&mut b, 10).unwrap().is_empty(), "a hold being posted is skipped");
        release_tx.send(()).unwrap();
    });
    assert!(holds::expire_due(&mut b, 10).unwrap().is_empty(), "and once posted it is never due");
    assert_eq!(holds::get(&mut setup, second).unwrap().status, HoldStatus::Posted);
    assert_eq!((balance(&mut setup, payer), balance(&mut setup, payee)), (8_000, 2_000));
    assert_audit_clean(&mut setup);
}

/// Many holds on a few payers: posts, voids and two expiry loops at once, on real
/// connections. Every hold ends exactly once, no deadlock is left unresolved (the
/// expiry locks its payers in ascending order), and the audit is clean.
#[testing::test]
fn posts_voids_and_two_expiry_rounds_at_once_settle_every_hold_exactly_once() {
    const HOLDS: usize = 60;
    let db = testing::committed();
    let mut setup = db.conn();
    let payers: Vec<AccountId> =
        (0..4).map(|i| testing::funded_account(&mut setup, &format!("p{i}"), Currency::EUR, "100.00")).collect();
    let payee = testing::funded_account(&mut setup, "payee", Currency::EUR, "0.00");
    let ids: Vec<HoldId> = (0..HOLDS).map(|i| due_hold(&mut setup, payers[i % 4], payee, "1.00")).collect();
    let start = Barrier::new(4);
    let (posted, voided) = thread::scope(|s| {
        let expirers: Vec<_> = (0..2)
            .map(|_| {
                let (start, mut conn) = (&start, db.conn());
                s.spawn(move || {
                    start.wait();
                    let mut n = 0;
                    loop {
                        let got = holds::expire_due(&mut conn, 7).unwrap().len();
                        n += got;
                        if got == 0 {
                            return n;
                        }
                    }
                })
            })
            .collect();
        let writer = |even: bool| {
            let (start, ids, mut conn) = (&start, &ids, db.conn());
            s.spawn(move || {
                start.wait();
                let mut done = 0;
                for id in ids.iter().skip(usize::from(!even)).step_by(2).rev() {
                    let r = if even {
                        holds::post(&mut conn, *id, None, &key("m-post"))
                    } else {
                        holds::void(&mut conn, *id, &key("m-void"))
                    };
                    match r {
                        Ok(_) => done += 1,
                        Err(LedgerError::HoldFinished { status: HoldStatus::Expired, .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                done
            })
        };
        let (posts, voids) = (writer(true), writer(false));
        let expired: usize = expirers.into_iter().map(|h| h.join().unwrap()).sum();
        let (posted, voided) = (posts.join().unwrap(), voids.join().unwrap());
        assert_eq!(posted + voided + expired, HOLDS, "every hold ended exactly once");
        (posted, voided)
    });
    eprintln!("posted {posted}, voided {voided}, expired {}", HOLDS - posted - voided);
    let statuses: Vec<HoldStatus> = ids.iter().map(|id| holds::get(&mut setup, *id).unwrap().status).collect();
    assert!(statuses.iter().all(|s| *s != HoldStatus::Pending));
    assert_eq!(statuses.iter().filter(|s| **s == HoldStatus::Posted).count(), posted);
    assert_eq!(balance(&mut setup, payee), posted as i64 * 100);
    let left: i64 = payers.iter().map(|p| balance(&mut setup, *p)).sum();
    assert_eq!(left, 40_000 - posted as i64 * 100);
    assert_audit_clean(&mut setup);
}
