//! Idempotency keys: a replay answers the first result, also under concurrent requests, with the balances right after it.

use super::*;

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
