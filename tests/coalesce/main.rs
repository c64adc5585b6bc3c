//! `transfers::Coalescer` on a real PostgreSQL with real commits: many callers, one
//! transaction per group, each caller answered after its group's commit with exactly
//! what `transfers::transfer` would answer.
//!
//! Groups are arranged, not hoped for: a "plug" transfer is held up by a row lock
//! another connection holds (`wait_until_blocked`), the transfers to group are queued
//! behind it one at a time (`Coalescer::queued`), and the lock is released.

#[path = "../common/mod.rs"]
mod common;
mod plug;

use std::collections::{HashMap, HashSet};
use std::thread;
use std::time::Duration;

use common::{assert_audit_clean, balance};
use diesel::connection::SimpleConnection;
use ledger_core::journal::Receipt;
use ledger_core::transfers::{self, CoalescerConfig, SubmitError, Transfer, MAX_LINGER};
use ledger_core::{AccountId, Currency, IdempotencyKey, LedgerError};
use ledger_testdb as testing;
use plug::*;

/// Many callers on few accounts, some refused for want of funds: each caller gets its
/// own transfer's receipt, committed when it returns, and the balances are exact.
#[testing::test]
fn many_callers_on_few_accounts_each_get_their_own_receipt_and_exact_balances() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 40;
    let db = testing::committed();
    let mut setup = db.conn();
    let accounts: Vec<AccountId> =
        (0..4).map(|i| testing::funded_account(&mut setup, &format!("acct{i}"), Currency::EUR, "40.00")).collect();
    let c = coalescer(&db, 2, 1_000);
    let answers: Vec<(Transfer, Answer)> = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|n| {
                let (c, db, accounts) = (&c, &db, &accounts);
                s.spawn(move || {
                    let mut observer = db.conn();
                    (0..PER_THREAD)
                        .map(|i| {
                            let from = accounts[(n + i) % 4];
                            let to = accounts[(n + 3 * i + 1) % 4];
                            let to = if to == from { accounts[(n + i + 1) % 4] } else { to };
                            let amount = format!("{}.00", 1 + (n * 7 + i * 3) % 15);
                            let tr = t(from, to, &amount, &testing::key(&format!("many-{n}")));
                            let answer = submit_and_look(c, &tr, &mut observer);
                            (tr, answer)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a caller panicked")).collect()
    });
    let mut expected: HashMap<AccountId, i64> = accounts.iter().map(|a| (*a, 4_000)).collect();
    let mut entries = HashSet::new();
    for (tr, answer) in &answers {
        match &answer.result {
            Ok(receipt) => {
                assert!(!receipt.replayed);
                assert!(answer.visible_at_return, "entry {} not committed when submit returned", receipt.entry);
                assert!(entries.insert(receipt.entry), "two callers got entry {}", receipt.entry);
                let written = transfers::get(&mut setup, receipt.entry).unwrap();
                assert_eq!((written.from, written.to, written.amount), (tr.from, tr.to, tr.amount));
                assert_eq!(written.key, tr.key.as_str(), "a caller got another caller's transfer");
                *expected.get_mut(&tr.from).unwrap() -= tr.amount.minor();
                *expected.get_mut(&tr.to).unwrap() += tr.amount.minor();
            }
            Err(SubmitError::Ledger(LedgerError::InsufficientFunds { account, .. })) => assert_eq!(*account, tr.from),
            Err(e) => panic!("unexpected answer for {tr:?}: {e}"),
        }
    }
    assert!(entries.len() > THREADS * PER_THREAD / 2, "most transfers went through: {}", entries.len());
    for a in &accounts {
        assert_eq!(balance(&mut setup, *a), expected[a], "account {a}");
    }
    let stats = c.stats();
    assert_eq!(stats.transfers as usize, THREADS * PER_THREAD, "every transfer was answered from a group");
    assert_audit_clean(&mut setup);
}

/// Transfers queued while a commit is in flight go together in the next transaction;
/// none of their callers is answered before that transaction committed.
#[testing::test]
fn transfers_queued_behind_a_commit_in_flight_commit_together_and_only_then_answer() {
    let db = testing::committed();
    let mut setup = db.conn();
    let (a, b, p) = three_accounts(&mut setup);
    let c = coalescer(&db, 1, 100);
    let plug = t(p, a, "1.00", &testing::key("plug"));
    let group: Vec<Transfer> = (0..5)
        .map(|i| t(if i % 2 == 0 { a } else { b }, if i % 2 == 0 { b } else { a }, "2.00", &testing::key("g")))
        .collect();
    let (plug_answer, answers) = plugged_group(&db, &c, &plug, &group);
    assert!(plug_answer.visible_at_return);
    for answer in &answers {
        assert!(answer.result.is_ok(), "{:?}", answer.result.as_ref().err());
        assert!(answer.visible_at_return, "a caller was answered before its entry was committed");
    }
    let stats = c.stats();
    assert_eq!((stats.groups, stats.transfers, stats.largest_group), (2, 6, 5), "the plug, then the five together");
    // In queue order, as sequential transfers: a 101 -> 99 -> 101 -> 99 -> 101 -> 99.
    let a_after: Vec<i64> = answers.iter().map(|x| x.result.as_ref().unwrap().balance_of(a).unwrap()).collect();
    assert_eq!(a_after, [9_900, 10_100, 9_900, 10_100, 9_900]);
    assert_eq!((balance(&mut setup, a), balance(&mut setup, b)), (9_900, 10_200));
    assert_audit_clean(&mut setup);
}

/// One group holding good transfers and every kind of refusal: each refused caller
/// gets exactly the error `transfers::transfer` gives for its request; the others commit.
#[testing::test]
fn a_refused_transfer_fails_alone_with_the_error_transfer_gives() {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "a", Currency::EUR, "50.00");
    let b = testing::funded_account(&mut setup, "b", Currency::EUR, "0.00");
    let usd = testing::funded_account(&mut setup, "usd", Currency::USD, "");
    let p = testing::funded_account(&mut setup, "plug", Currency::EUR, "10.00");
    let empty = testing::funded_account(&mut setup, "empty", Currency::EUR, "");
    let closed = testing::funded_account(&mut setup, "closed", Currency::EUR, "");
    ledger_core::accounts::close(&mut setup, closed).unwrap();
    let used = testing::key("used");
    transfers::transfer(&mut setup, &t(a, b, "1.00", &used)).unwrap();
    let unknown = AccountId::new(9_999_999).unwrap();
    let group = vec![
        t(a, b, "5.00", &testing::key("ok")),
        t(empty, a, "5.00", &testing::key("poor")),
        t(a, usd, "1.00", &testing::key("usd")),
        t(a, unknown, "1.00", &testing::key("unknown")),
        t(a, closed, "1.00", &testing::key("closed")),
        t(a, b, "2.00", &used), // another request under a used key
        t(b, a, "3.00", &testing::key("ok")),
    ];
    let c = coalescer(&db, 1, 100);
    let (_, answers) = plugged_group(&db, &c, &t(p, a, "1.00", &testing::key("plug")), &group);
    let codes: Vec<String> = answers.iter().map(|x| code(&x.result)).collect();
    assert_eq!(
        codes,
        [
            "created",
            "insufficient_funds",
            "currency_mismatch",
            "unknown_account",
            "account_closed",
            "idempotency_conflict",
            "created"
        ]
    );
    assert_eq!(c.stats().largest_group, group.len() as u64, "all of them in one group");
    // The same refused requests through `transfer` give the same errors, word for word.
    for (request, answer) in group.iter().zip(&answers) {
        if let Err(SubmitError::Ledger(e)) = &answer.result {
            let direct = transfers::transfer(&mut setup, request).expect_err("refused again");
            assert_eq!((direct.code(), direct.to_string()), (e.code(), e.to_string()));
        }
    }
    // a: 50 - 1 (used) + 1 (plug) - 5 + 3; b: 1 + 5 - 3.
    assert_eq!((balance(&mut setup, a), balance(&mut setup, b)), (4_800, 300));
    assert_audit_clean(&mut setup);
}

/// The requests of the key test: the same key twice, a key reused for another
/// request, and a key whose first request was refused.
fn key_requests(a: AccountId, b: AccountId, empty: AccountId, prefix: &str) -> Vec<Transfer> {
    let k: Vec<IdempotencyKey> = (0..3).map(|_| testing::key(prefix)).collect();
    vec![
        t(a, b, "1.00", &k[0]),
        t(a, b, "1.00", &k[0]), // the same request: a replay
        t(a, b, "2.00", &k[1]),
        t(a, b, "3.00", &k[1]),     // another request under it: a conflict
        t(empty, b, "5.00", &k[2]), // refused, so its key stays unused
        t(a, b, "5.00", &k[2]),     // and this one is created under it
        t(a, b, "1.00", &k[0]),     // a replay of the first again
    ]
}

/// Callers sharing keys inside one group get what the same requests sent one after
/// another through `transfers::transfer` get.
#[testing::test]
fn callers_sharing_a_key_in_one_group_answer_as_sequential_transfers() {
    let db = testing::committed();
    let mut setup = db.conn();
    let mut accounts = |tag: &str| {
        (
            testing::funded_account(&mut setup, &format!("a{tag}"), Currency::EUR, "50.00"),
            testing::funded_account(&mut setup, &format!("b{tag}"), Currency::EUR, "0.00"),
            testing::funded_account(&mut setup, &format!("e{tag}"), Currency::EUR, ""),
        )
    };
    let ((a, b, e), (a2, b2, e2)) = (accounts("1"), accounts("2"));
    let p = testing::funded_account(&mut setup, "plug", Currency::EUR, "10.00");
    let q = testing::funded_account(&mut setup, "plugged", Currency::EUR, "");
    let c = coalescer(&db, 1, 100);
    let grouped = key_requests(a, b, e, "kg");
    let (_, answers) = plugged_group(&db, &c, &t(p, q, "1.00", &testing::key("plug")), &grouped);
    assert_eq!(c.stats().largest_group, grouped.len() as u64, "all of them in one group");
    // The reference: the same shape of requests, one by one, on accounts of their own.
    let sequential: Vec<Result<Receipt, LedgerError>> =
        key_requests(a2, b2, e2, "ks").iter().map(|r| transfers::transfer(&mut setup, r)).collect();
    let shape = |r: Result<&Receipt, String>| match r {
        Ok(r) => format!(
            "{} {:?}",
            if r.replayed { "replayed" } else { "created" },
            r.balances.iter().map(|b| b.balance_minor).collect::<Vec<_>>()
        ),
        Err(code) => code,
    };
    let got: Vec<String> = answers.iter().map(|x| shape(x.result.as_ref().map_err(|e| e.code().to_string()))).collect();
    let want: Vec<String> = sequential.iter().map(|r| shape(r.as_ref().map_err(|e| e.code().to_string()))).collect();
    assert_eq!(got, want);
    assert_eq!(got[1], "replayed [4900, 100]");
    let first = answers[0].result.as_ref().unwrap();
    assert_eq!(answers[1].result.as_ref().unwrap().entry, first.entry);
    assert_eq!(answers[6].result.as_ref().unwrap().entry, first.entry);
    assert_eq!(balance(&mut setup, b), balance(&mut setup, b2));
    assert_audit_clean(&mut setup);
}

/// A full queue answers `Overloaded` at once and queues nothing; once the committer
/// has taken the queue, there is room again.
#[testing::test]
fn a_full_queue_is_overloaded_at_once_and_has_room_after_the_commit() {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut setup, "b", Currency::EUR, "0.00");
    let c = coalescer(&db, 1, 1);
    let mut observer = db.conn();
    let rejected = t(a, b, "3.00", &testing::key("over"));
    let (plug, queued, overloaded) = thread::scope(|s| {
        let lock = RowLock::take(&db, a);
        let plug = s.spawn(|| c.submit(&t(a, b, "1.00", &testing::key("plug"))));
        lock.wait_for_a_waiter(&mut observer);
        let queued = s.spawn(|| c.submit(&t(a, b, "2.00", &testing::key("queued"))));
        testing::wait_until(Duration::from_secs(30), || c.queued() == 1);
        let overloaded = c.submit(&rejected);
        lock.release();
        (plug.join().unwrap(), queued.join().unwrap(), overloaded)
    });
    assert!(matches!(overloaded, Err(SubmitError::Overloaded)), "{overloaded:?}");
    assert!(plug.is_ok() && queued.is_ok());
    assert_eq!(balance(&mut setup, b), 300, "the overloaded transfer was not written");
    // Its key is unused: the same request now goes through.
    assert!(!c.submit(&rejected).unwrap().replayed);
    assert_eq!(balance(&mut setup, b), 600);
}

/// Shutdown stops intake at once, still commits and answers every caller already
/// queued, and joins the committers; every clone is closed after it.
#[testing::test]
fn shutdown_answers_every_queued_caller_and_refuses_new_transfers() {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut setup, "b", Currency::EUR, "0.00");
    let c = coalescer(&db, 1, 100);
    let clone = c.clone();
    let mut observer = db.conn();
    let late = t(a, b, "1.00", &testing::key("late"));
    let (answers, late_answer) = thread::scope(|s| {
        let lock = RowLock::take(&db, a);
        let plug = s.spawn(|| submit_and_look(&c, &t(a, b, "1.00", &testing::key("plug")), &mut db.conn()));
        lock.wait_for_a_waiter(&mut observer);
        let mut callers = vec![plug];
        for n in 0..3 {
            callers.push(s.spawn(|| submit_and_look(&c, &t(a, b, "1.00", &testing::key("q")), &mut db.conn())));
            testing::wait_until(Duration::from_secs(30), || c.queued() == n + 1);
        }
        c.close();
        let late_answer = clone.submit(&late);
        let stopping = s.spawn(|| c.shutdown());
        lock.release();
        stopping.join().unwrap();
        (callers.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>(), late_answer)
    });
    assert!(matches!(late_answer, Err(SubmitError::ShutDown)), "{late_answer:?}");
    for answer in &answers {
        assert!(answer.result.is_ok() && answer.visible_at_return, "{:?}", answer.result.as_ref().err());
    }
    assert!(matches!(c.submit(&late), Err(SubmitError::ShutDown)));
    assert_eq!(balance(&mut setup, b), 400, "the four queued before shutdown, not the late one");
    drop(c);
    drop(clone); // the last handle: its committers were joined already
    assert_audit_clean(&mut setup);
}

/// The connection is lost during COMMIT: the group may or may not be written, so every
/// caller of it hears "outcome unknown", none a success or a refusal; sent again under
/// the same keys, each transfer is written once.
#[testing::test]
fn a_connection_lost_during_commit_leaves_every_caller_of_the_group_outcome_unknown() {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut setup, "b", Currency::EUR, "0.00");
    let p = testing::funded_account(&mut setup, "plug", Currency::EUR, "10.00");
    let (victim, bystander) = (t(a, b, "1.00", &testing::key("victim")), t(b, a, "0.50", &testing::key("by")));
    kill_backend_writing(&mut setup, &victim.key, true);
    let c = coalescer(&db, 1, 100);
    let group = [victim.clone(), bystander.clone()];
    let (plug, answers) = plugged_group(&db, &c, &t(p, a, "1.00", &testing::key("plug")), &group);
    // The control: the plug's group, without the victim, committed.
    assert!(plug.result.is_ok() && plug.visible_at_return);
    for answer in &answers {
        assert!(matches!(answer.result, Err(SubmitError::OutcomeUnknown(_))), "{:?}", answer.result);
    }
    setup.batch_execute("DROP TRIGGER die ON journal_entries").unwrap();
    // The server rolled it back; the retries under the same keys write each one once.
    for request in &group {
        assert!(!c.submit(request).unwrap().replayed);
        assert!(c.submit(request).unwrap().replayed);
    }
    assert_eq!((balance(&mut setup, a), balance(&mut setup, b)), (1_050, 50));
    assert_audit_clean(&mut setup);
}

/// The negative control of the test above: a connection lost before COMMIT wrote
/// nothing. The group is run again, and at last each transfer alone: the one to blame
/// fails with the (definite) database error, the others commit.
#[testing::test]
fn a_connection_lost_before_commit_fails_only_the_transfer_to_blame() {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut setup, "b", Currency::EUR, "0.00");
    let p = testing::funded_account(&mut setup, "plug", Currency::EUR, "10.00");
    let (victim, bystander) = (t(a, b, "1.00", &testing::key("victim")), t(b, a, "0.50", &testing::key("by")));
    let bystander2 = t(a, b, "2.00", &testing::key("by"));
    kill_backend_writing(&mut setup, &victim.key, false);
    let c = coalescer(&db, 1, 100);
    let (_, answers) =
        plugged_group(&db, &c, &t(p, a, "1.00", &testing::key("plug")), &[bystander2, victim, bystander]);
    let codes: Vec<String> = answers.iter().map(|x| code(&x.result)).collect();
    assert_eq!(codes, ["created", "database", "created"]);
    match &answers[1].result {
        Err(SubmitError::Ledger(e)) => assert!(e.is_transient(), "a lost connection: {e}"),
        other => panic!("{other:?}"),
    }
    assert!(answers.iter().filter(|x| x.result.is_ok()).all(|x| x.visible_at_return));
    assert_eq!((balance(&mut setup, a), balance(&mut setup, b)), (950, 150));
    assert_audit_clean(&mut setup);
}

/// A lone caller sending one transfer after another: every group holds one transfer,
/// none is smaller than the one before, so no group waits for company, however long
/// the linger allowed.
#[testing::test]
fn a_lone_sequential_caller_never_waits_for_company() {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "a", Currency::EUR, "100.00");
    let b = testing::funded_account(&mut setup, "b", Currency::EUR, "0.00");
    let config = CoalescerConfig { committers: 2, linger: MAX_LINGER, ..CoalescerConfig::default() };
    let c = coalescer_with(&db, config);
    for i in 0..20 {
        let receipt = c.submit(&t(a, b, "1.00", &testing::key(&format!("lone-{i}")))).expect("committed");
        assert_eq!(receipt.balance_of(b), Some(100 * (i + 1)));
    }
    let stats = c.stats();
    assert_eq!((stats.groups, stats.transfers, stats.largest_group, stats.lingered), (20, 20, 1, 0));
    assert_audit_clean(&mut setup);
}

/// After a group of three, a transfer arriving alone waits for company: the next two
/// callers join its group (one transaction for the three). A group as large as the
/// previous one never waits, nor one after the queue stood empty for longer than the
/// linger. (That a wait ends once the group is large enough is the unit test
/// `gathering_ends_once_the_group_is_as_large_as_wanted_or_the_queue_closes`.)
#[testing::test]
fn a_group_smaller_than_the_previous_one_waits_and_is_joined() {
    let db = testing::committed();
    let mut setup = db.conn();
    let (a, b, p) = three_accounts(&mut setup);
    let config = CoalescerConfig { committers: 1, linger: MAX_LINGER, ..CoalescerConfig::default() };
    let c = coalescer_with(&db, config);
    let key = |k: &str| testing::key(k);
    a_group_of_three_held_past(&db, &c, (a, b, p), MAX_LINGER);
    thread::scope(|s| {
        let c = &c;
        let spawn = |tr: Transfer| s.spawn(move || c.submit(&tr));
        // One transfer alone: smaller than 3, so its committer waits; two more join it.
        let first = spawn(t(b, a, "1.00", &key("joined-0")));
        testing::wait_until(Duration::from_secs(30), || c.stats().lingered == 1);
        let rest: Vec<_> = (1..3).map(|n| spawn(t(b, a, "1.00", &key(&format!("joined-{n}"))))).collect();
        assert!(first.join().unwrap().is_ok());
        rest.into_iter().for_each(|h| assert!(h.join().unwrap().is_ok()));
    });
    let stats = c.stats();
    assert_eq!((stats.groups, stats.transfers, stats.lingered), (3, 7, 1), "the three joined one group: {stats:?}");
    // Alone again after a group of 3, but only after the queue stood empty for longer
    // than the linger: that group's callers did not come straight back, so it is
    // forgotten and neither lone transfer waits.
    thread::sleep(MAX_LINGER + Duration::from_millis(200));
    c.submit(&t(b, a, "1.00", &key("alone-0"))).expect("committed");
    c.submit(&t(b, a, "1.00", &key("alone-1"))).expect("committed");
    let stats = c.stats();
    assert_eq!((stats.groups, stats.transfers, stats.lingered), (5, 9, 1), "{stats:?}");
    assert_eq!((balance(&mut setup, a), balance(&mut setup, b)), (10_200, 9_900));
    assert_audit_clean(&mut setup);
}

/// Shutdown while a committer waits for company: the waiting transfer is committed and
/// answered, shutdown returns, and later submits are refused.
#[testing::test]
fn shutdown_during_a_wait_for_company_commits_and_answers_the_waiting_transfer() {
    let db = testing::committed();
    let mut setup = db.conn();
    let (a, b, p) = three_accounts(&mut setup);
    let config = CoalescerConfig { committers: 1, linger: MAX_LINGER, ..CoalescerConfig::default() };
    let c = coalescer_with(&db, config);
    a_group_of_three_held_past(&db, &c, (a, b, p), MAX_LINGER);
    let lone = thread::scope(|s| {
        let lone = s.spawn(|| c.submit(&t(b, a, "1.00", &testing::key("lone"))));
        testing::wait_until(Duration::from_secs(30), || c.stats().lingered == 1);
        c.shutdown();
        lone.join().expect("the waiting caller panicked")
    });
    let receipt = lone.expect("the waiting transfer is committed at shutdown");
    assert_eq!(receipt.balance_of(a), Some(9_800), "a sent 3.00 and got 1.00 back");
    assert!(matches!(c.submit(&t(b, a, "1.00", &testing::key("late"))), Err(SubmitError::ShutDown)));
    let stats = c.stats();
    assert_eq!((stats.groups, stats.transfers, stats.lingered), (3, 5, 1), "{stats:?}");
    assert_eq!((balance(&mut setup, a), balance(&mut setup, b)), (9_800, 10_300), "b got the plug and the three");
    assert_audit_clean(&mut setup);
}
