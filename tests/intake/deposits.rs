//! `deposits::create_batch`: per-item results, replays across the single path and the
//! batch, conflicts, chains, the size cap, exact balances and a clean audit, and two
//! concurrent batches on the same accounts.

use std::sync::Barrier;
use std::thread;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use ledger_core::deposits::{self, DepositResult};
use ledger_core::transfers::{self, Transfer};
use ledger_core::{LedgerError, TxOptions};

use super::common::{assert_audit_clean, balance, eur};
use super::*;

fn code(r: &DepositResult) -> &'static str {
    match r {
        DepositResult::Created { .. } => "created",
        DepositResult::Replayed { .. } => "replayed",
        DepositResult::Refused(e) => e.code(),
    }
}

#[testing::test]
fn each_item_gets_its_own_result_in_order_and_refusals_write_nothing() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let (closed, yen) = (closed_account(&mut conn), yen_account(&mut conn));
    let unknown = AccountId::new(987_654).unwrap();
    let k: Vec<IdempotencyKey> = (0..6).map(|i| testing::key(&format!("bd{i}"))).collect();
    let batch: Vec<Item<_>> = [
        dep(a, "1.00", &k[0]),
        dep(unknown, "1.00", &k[1]),
        dep(closed, "1.00", &k[2]),
        dep(yen, "1.00", &k[3]),
        dep(a, "2.50", &k[4]),
        dep(a, "1.00", &k[0]),
    ]
    .into_iter()
    .map(Item::single)
    .collect();
    let results = deposits::create_batch(&mut conn, &batch).unwrap();
    let codes: Vec<&str> = results.iter().map(code).collect();
    assert_eq!(codes, ["created", "unknown_account", "account_closed", "currency_mismatch", "created", "replayed"]);
    assert!(matches!(results[0], DepositResult::Created { balance_minor: 1_100, .. }), "{:?}", results[0]);
    assert!(matches!(results[4], DepositResult::Created { balance_minor: 1_350, .. }), "{:?}", results[4]);
    assert_eq!(results[5].entry(), results[0].entry(), "an in-batch replay answers with the first entry");
    assert_eq!(balance(&mut conn, a), 1_350);
    // A refused item's key is unused: the same key now takes another, valid deposit.
    let again = deposits::deposit(&mut conn, &dep(a, "0.50", &k[1])).unwrap();
    assert!(!again.replayed);
    assert_eq!(balance(&mut conn, a), 1_400);
    assert_audit_clean(&mut conn);
}

/// An entry's kind, reference, and each posting (account, amount, balance after) by id.
type Shape = (String, String, Vec<(i64, i64, Option<i64>)>);

/// Each posting of an entry: (account, amount, balance after), by posting id, and the
/// entry's kind and reference.
fn shape(conn: &mut diesel::pg::PgConnection, entry: ledger_core::EntryId) -> Shape {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        kind: String,
        #[diesel(sql_type = Text)]
        reference: String,
        #[diesel(sql_type = BigInt)]
        account_id: i64,
        #[diesel(sql_type = BigInt)]
        amount_minor: i64,
        #[diesel(sql_type = Nullable<BigInt>)]
        balance_after_minor: Option<i64>,
    }
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT e.kind, e.reference, p.account_id, p.amount_minor, p.balance_after_minor
         FROM postings p JOIN journal_entries e ON e.id = p.entry_id WHERE e.id = $1 ORDER BY p.id",
    )
    .bind::<BigInt, _>(entry.get())
    .load(conn)
    .unwrap();
    let legs = rows.iter().map(|r| (r.account_id, r.amount_minor, r.balance_after_minor)).collect();
    (rows[0].kind.clone(), rows[0].reference.clone(), legs)
}

#[testing::test]
fn a_batch_deposit_is_the_same_entry_as_a_single_one_and_they_replay_each_other() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "none");
    let funding = ledger_core::accounts::system_account(
        &mut conn,
        ledger_core::accounts::SystemRole::ExternalFunding,
        Currency::EUR,
    )
    .unwrap();
    let (single_key, batch_key) = (testing::key("single"), testing::key("batch"));
    let single = deposits::deposit(&mut conn, &dep(a, "3.00", &single_key)).unwrap();
    let results = deposits::create_batch(
        &mut conn,
        &[Item::single(dep(a, "3.00", &single_key)), Item::single(dep(a, "4.00", &batch_key))],
    )
    .unwrap();
    assert!(matches!(results[0], DepositResult::Replayed { entry } if entry == single.entry), "{:?}", results[0]);
    let batched = results[1].entry().unwrap();
    let (kind, reference, legs) = shape(&mut conn, batched);
    assert_eq!((kind.as_str(), reference), ("deposit", format!("deposit:{batch_key}")));
    assert_eq!(legs, [(funding.get(), -400, None), (a.get(), 400, Some(700))], "funding leg, then the customer's");
    let (single_kind, _, single_legs) = shape(&mut conn, single.entry);
    assert_eq!((single_kind, single_legs), (kind, vec![(funding.get(), -300, None), (a.get(), 300, Some(300))]));
    // The single path replays the batch's deposit, and refuses another request under it.
    let replay = deposits::deposit(&mut conn, &dep(a, "4.00", &batch_key)).unwrap();
    assert!(replay.replayed && replay.entry == batched);
    let err = deposits::deposit(&mut conn, &dep(a, "5.00", &batch_key)).unwrap_err();
    assert_eq!(err.code(), "idempotency_conflict");
    // The batch refuses another deposit under a used key, and a transfer's key.
    let b = testing::funded_account(&mut conn, "b", Currency::EUR, "none");
    let tk = testing::key("transfer");
    transfers::transfer(&mut conn, &Transfer::new(a, b, eur("1.00"), tk.clone())).unwrap();
    let refused = deposits::create_batch(
        &mut conn,
        &[Item::single(dep(a, "9.00", &single_key)), Item::single(dep(a, "1.00", &tk))],
    )
    .unwrap();
    let conflicts: Vec<_> = refused
        .iter()
        .map(|r| match r {
            DepositResult::Refused(LedgerError::IdempotencyConflict { operation, .. }) => operation.as_str(),
            other => panic!("expected a conflict, got {other:?}"),
        })
        .collect();
    assert_eq!(conflicts, ["deposit", "transfer"]);
    assert_eq!(balance(&mut conn, a), 600);
    assert_audit_clean(&mut conn);
}

#[testing::test]
fn a_linked_chain_is_all_or_nothing_and_an_open_chain_is_refused() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "none");
    let jpy = yen_account(&mut conn);
    let k: Vec<IdempotencyKey> = (0..5).map(|i| testing::key(&format!("ch{i}"))).collect();
    let batch = vec![
        Item::linked(dep(a, "1.00", &k[0])),
        Item::linked(dep(a, "2.00", &k[1])),
        Item::single(dep(jpy, "3.00", &k[2])),
        Item::single(dep(a, "4.00", &k[3])),
        Item::linked(dep(a, "5.00", &k[4])),
    ];
    let results = deposits::create_batch(&mut conn, &batch).unwrap();
    let codes: Vec<&str> = results.iter().map(code).collect();
    assert_eq!(
        codes,
        ["linked_item_failed", "linked_item_failed", "currency_mismatch", "created", "linked_chain_open"]
    );
    assert!(matches!(results[3], DepositResult::Created { balance_minor: 400, .. }), "the chain's credits undone");
    assert_eq!(balance(&mut conn, a), 400);
    // The failed chain's keys stayed unused: the chain, fixed, goes through under them.
    let in_yen = deposits::Deposit { account: jpy, amount: yen("3"), key: k[2].clone() };
    let fixed = [Item::linked(dep(a, "1.00", &k[0])), Item::linked(dep(a, "2.00", &k[1])), Item::single(in_yen)];
    let results = deposits::create_batch(&mut conn, &fixed).unwrap();
    assert_eq!(results.iter().map(code).collect::<Vec<_>>(), ["created", "created", "created"]);
    assert_eq!((balance(&mut conn, a), balance(&mut conn, jpy)), (700, 3));
    assert_audit_clean(&mut conn);
}

#[testing::test]
fn an_oversize_batch_is_refused_with_nothing_written() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "none");
    let before = testing::snapshot(&mut conn);
    let err = deposits::create_batch(&mut conn, &oversize(dep(a, "1.00", &testing::key("big")))).unwrap_err();
    assert_eq!(err.code(), "invalid_input");
    assert_eq!(testing::snapshot(&mut conn), before, "nothing written, not even a key");
}

#[testing::test]
fn an_overflowing_credit_is_refused_alone() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "none");
        let huge = Money::from_minor(i64::MAX - 5, Currency::EUR).unwrap();
        let big = ledger_core::deposits::Deposit { account: a, amount: huge, key: testing::key("huge") };
        let results = deposits::create_batch(
            conn,
            &[
                Item::single(big),
                Item::single(dep(a, "1.00", &testing::key("over"))),
                Item::single(dep(a, "0.05", &testing::key("fits"))),
            ],
        )
        .unwrap();
        assert_eq!(results.iter().map(code).collect::<Vec<_>>(), ["created", "balance_overflow", "created"]);
        assert_eq!(balance(conn, a), i64::MAX);
    });
}

/// Many deposits over a few accounts: every Created balance is the running balance,
/// the final balances are the sums, the audit is clean.
#[testing::test]
fn balances_are_exact_and_the_audit_clean_after_a_large_batch() {
    let db = testing::committed();
    let mut conn = db.conn();
    let accounts: Vec<AccountId> =
        (0..7).map(|i| testing::funded_account(&mut conn, &format!("x{i}"), Currency::EUR, "1.00")).collect();
    let batch: Vec<Item<_>> = (0..2_000)
        .map(|i| Item::single(dep(accounts[i % 7], &format!("0.{:02}", 1 + i % 97), &testing::key("many"))))
        .collect();
    let results = deposits::create_batch(&mut conn, &batch).unwrap();
    let mut running = [100_i64; 7];
    for (i, r) in results.iter().enumerate() {
        running[i % 7] += 1 + (i % 97) as i64;
        assert!(
            matches!(r, DepositResult::Created { balance_minor, .. } if *balance_minor == running[i % 7]),
            "item {i}: {r:?}"
        );
    }
    for (i, a) in accounts.iter().enumerate() {
        assert_eq!(balance(&mut conn, *a), running[i], "account {i}");
    }
    assert_audit_clean(&mut conn);
}

/// Two batches on the same accounts, in opposite orders, started together on two
/// connections with real commits and no retries: neither deadlocks (that would be an
/// error here, not a retry), and the balances hold every credit once.
#[testing::test]
fn two_concurrent_batches_on_overlapping_accounts_never_deadlock_and_balances_are_exact() {
    let db = testing::committed();
    let mut conn = db.conn();
    let accounts: Vec<AccountId> =
        (0..20).map(|i| testing::funded_account(&mut conn, &format!("c{i}"), Currency::EUR, "none")).collect();
    let batch = |rev: bool| -> Vec<Item<_>> {
        (0..1_000)
            .map(|i| {
                let n = if rev { 19 - i % 20 } else { i % 20 };
                Item::single(dep(accounts[n], "0.01", &testing::key(if rev { "rev" } else { "fwd" })))
            })
            .collect()
    };
    let (fwd, rev) = (batch(false), batch(true));
    let barrier = Barrier::new(2);
    let (mut c1, mut c2) = (db.conn(), db.conn());
    let run = |c: &mut diesel::pg::PgConnection, items: &[Item<_>]| {
        barrier.wait();
        deposits::create_batch_with(c, &TxOptions::no_retry(), items)
    };
    // The scope joins both threads, also when one panics.
    let (r1, r2) = thread::scope(|s| {
        let h1 = s.spawn(|| run(&mut c1, &fwd));
        let h2 = s.spawn(|| run(&mut c2, &rev));
        (h1.join().expect("first batch panicked"), h2.join().expect("second batch panicked"))
    });
    for r in [r1.unwrap(), r2.unwrap()] {
        assert!(
            r.iter().all(|x| matches!(x, DepositResult::Created { .. })),
            "{:?}",
            r.iter().find(|x| !matches!(x, DepositResult::Created { .. }))
        );
    }
    for a in &accounts {
        assert_eq!(balance(&mut conn, *a), 100, "50 + 50 credits of 0.01");
    }
    assert_audit_clean(&mut conn);
}
