//! Adversarial review (wt-review): transfers::create_batch under interleavings the
//! existing tests do not arrange. Each interleaving is forced with pg_blocking_pids, with
//! real commits on separate connections.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{assert_audit_clean, balance, result_code, transfer};
use ledger_core::batch::Item;
use ledger_core::transfers::{self, Transfer, TransferResult};
use ledger_core::{Currency, LedgerError, TxOptions};
use ledger_testdb as testing;

/// Runs `first` in a transaction on its own connection and holds it open (uncommitted)
/// until `second`, on another connection, is blocked by it; then commits `first` and
/// returns both results.
fn interleave(
    db: &testing::TestDb,
    first: Vec<Item<Transfer>>,
    second: Vec<Item<Transfer>>,
) -> (Vec<TransferResult>, Vec<TransferResult>) {
    hold_then(
        db,
        move |tx| transfers::create_batch_tx(tx, &first),
        move |c| transfers::create_batch_with(c, &TxOptions::no_retry(), &second).unwrap(),
    )
}

/// Runs `first` in a transaction on one connection and keeps it open until `second`, on
/// another, is blocked by it (pg_blocking_pids); then commits `first`. Both results.
fn hold_then<A: Send, B: Send>(
    db: &testing::TestDb,
    mut first: impl FnMut(&mut ledger_core::Tx<'_>) -> Result<A, LedgerError> + Send,
    second: impl FnOnce(&mut diesel::PgConnection) -> B + Send,
) -> (A, B) {
    let mut c1 = db.conn();
    let mut c2 = db.conn();
    let mut observer = db.conn();
    let p1 = testing::backend_pid(&mut c1);
    let p2 = testing::backend_pid(&mut c2);
    let (held_tx, held_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    thread::scope(|s| {
        let h1 = s.spawn(move || {
            ledger_core::tx::transaction(&mut c1, &TxOptions::no_retry(), |tx| {
                let r = first(tx)?;
                held_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok::<_, LedgerError>(r)
            })
            .unwrap()
        });
        held_rx.recv().unwrap();
        let h2 = s.spawn(move || second(&mut c2));
        testing::wait_until_blocked(&mut observer, p2, p1, Duration::from_secs(10)).unwrap();
        go_tx.send(()).unwrap();
        (h1.join().unwrap(), h2.join().unwrap())
    })
}

/// A key the first batch claimed but refused (given back at its commit) is free for a
/// concurrent batch waiting on it, with another request: created once, recorded under
/// the second request's fingerprint, and a replay of it replays.
#[testing::test]
fn a_key_refused_by_a_concurrent_batch_is_free_for_the_batch_waiting_on_it() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut conn, "b", Currency::EUR, "0.00");
    let k = testing::key("rv-k");
    let other = testing::key("rv-o");
    let first = vec![Item::single(transfer(a, b, "1.00", &other)), Item::single(transfer(a, b, "500.00", &k))];
    let second = vec![Item::single(transfer(a, b, "2.00", &k))];
    let (r1, r2) = interleave(&db, first, second.clone());
    assert_eq!(r1.iter().map(result_code).collect::<Vec<_>>(), ["created", "insufficient_funds"]);
    assert_eq!(r2.iter().map(result_code).collect::<Vec<_>>(), ["created"]);
    assert_eq!(balance(&mut conn, a), 700);
    assert_eq!(balance(&mut conn, b), 300);
    let again = transfers::create_batch(&mut conn, &second).unwrap();
    assert_eq!(again[0].entry(), r2[0].entry(), "replayed");
    assert!(matches!(again[0], TransferResult::Replayed { .. }));
    // The key remembers the second request: the first one under it is now a conflict.
    let conflict = transfers::create_batch(&mut conn, &[Item::single(transfer(a, b, "500.00", &k))]).unwrap();
    assert_eq!(result_code(&conflict[0]), "idempotency_conflict");
    assert_audit_clean(&mut conn);
}

/// The same key and request in two concurrent batches: the waiting batch replays the
/// first's entry, the money moves once, and the waiting batch's own running balances
/// (on the same account) follow the committed ones.
#[testing::test]
fn the_same_transfer_in_two_concurrent_batches_moves_money_once() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut conn, "b", Currency::EUR, "0.00");
    let k = testing::key("rv-same");
    let k2 = testing::key("rv-after");
    let first = vec![Item::single(transfer(a, b, "6.00", &k))];
    // Linked: the replayed item and a new one, all-or-nothing. The new one needs the
    // balance the first batch left (4.00), so it must see the committed 6.00 debit.
    let second = vec![Item::linked(transfer(a, b, "6.00", &k)), Item::single(transfer(a, b, "4.00", &k2))];
    let (r1, r2) = interleave(&db, first, second);
    assert_eq!(result_code(&r1[0]), "created");
    assert_eq!(r2.iter().map(result_code).collect::<Vec<_>>(), ["replayed", "created"]);
    assert_eq!(r2[0].entry(), r1[0].entry());
    match r2[1] {
        TransferResult::Created { from_balance_minor, to_balance_minor, .. } => {
            assert_eq!((from_balance_minor, to_balance_minor), (0, 1000));
        }
        ref other => panic!("{other:?}"),
    }
    assert_eq!(balance(&mut conn, a), 0);
    assert_eq!(balance(&mut conn, b), 1000);
    assert_audit_clean(&mut conn);
}

/// A single transfer (idempotency::begin) holding a key a batch needs, then refused:
/// the batch waiting on it creates under the key; and the reverse (a batch holding a
/// key a single transfer needs) ends with the single transfer replaying.
#[testing::test]
fn single_transfers_and_batches_share_keys_safely() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut conn, "b", Currency::EUR, "0.00");
    let k = testing::key("rv-single");
    let batch = vec![Item::single(transfer(a, b, "3.00", &k))];
    let req = transfer(a, b, "3.00", &k);
    let (single, batched) = hold_then(
        &db,
        move |tx| transfers::transfer_tx(tx, &req),
        |c| transfers::create_batch_with(c, &TxOptions::no_retry(), &batch).unwrap(),
    );
    assert!(!single.replayed);
    assert!(matches!(batched[0], TransferResult::Replayed { entry } if entry == single.entry));
    assert_eq!(balance(&mut conn, a), 700);
    assert_audit_clean(&mut conn);
}
