//! Adversarial review (wt-review, H4) of the batch paths: deposits::create_batch,
//! withdrawals::request_batch, transfers::create_batch and the shared batch_plan. Every
//! interleaving is forced with pg_blocking_pids on real connections, with real commits.

mod common;

use std::thread;
use std::time::Duration;

use common::{assert_audit_clean, balance, eur, result_code, transfer, withdrawal};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::pg::PgConnection;
use ledger_core::batch::Item;
use ledger_core::deposits::{self, Deposit, DepositResult};
use ledger_core::transfers::{self, TransferResult};
use ledger_core::withdrawals::{self, RequestResult};
use ledger_core::{AccountId, Currency, IdempotencyKey, LedgerError, Money, TxOptions};
use ledger_testdb as testing;

const WAIT: Duration = Duration::from_secs(20);

/// Leaves `key` stored without a result, the documented way: a `_tx` transfer under it
/// is refused and the caller's transaction commits anyway.
fn resultless_key(conn: &mut PgConnection, from: AccountId, to: AccountId, key: &IdempotencyKey) {
    ledger_core::tx::transaction(conn, &TxOptions::no_retry(), |tx| {
        let refused = transfers::transfer_tx(tx, &transfer(from, to, "999999.00", key));
        assert!(matches!(refused, Err(LedgerError::InsufficientFunds { .. })), "{refused:?}");
        Ok::<_, LedgerError>(())
    })
    .unwrap();
    let stored: Count = diesel::RunQueryDsl::get_result(
        diesel::sql_query(format!(
            "SELECT count(*) AS n FROM idempotency_keys WHERE key = '{key}' AND result_id IS NULL"
        )),
        conn,
    )
    .unwrap();
    assert_eq!(stored.n, 1, "the refused transfer left its key without a result");
}

/// Opens a transaction on `conn` that holds `account`'s row lock until `COMMIT`.
fn hold_account(conn: &mut PgConnection, account: AccountId) {
    AnsiTransactionManager::begin_transaction(conn).unwrap();
    conn.batch_execute(&format!("SELECT 1 FROM accounts WHERE id = {} FOR UPDATE", account.get())).unwrap();
}

/// The race both tests below arrange: a key stored without a result is taken over by
/// batch T1 (row lock on the key), and T1 then waits for an account another transaction
/// holds. `second` (on its own connection, under the same key, moving `c` to `b`) finds
/// the key without a result and waits for T1's key lock. T1's item is refused, so T1 gives
/// the key back (DELETE) and commits. Returns T1's result code and `second`'s result.
fn race_on_a_given_back_key<R: Send>(
    prefix: &str,
    second: impl FnOnce(&mut PgConnection, AccountId, AccountId, &IdempotencyKey) -> R + Send,
) -> (String, R, i64) {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut setup, "b", Currency::EUR, "0.00");
    let c = testing::funded_account(&mut setup, "c", Currency::EUR, "10.00");
    let k = testing::key(prefix);
    resultless_key(&mut setup, a, b, &k);
    let (mut c1, mut c2, mut c3, mut observer) = (db.conn(), db.conn(), db.conn(), db.conn());
    let (p1, p2, p3) = (testing::backend_pid(&mut c1), testing::backend_pid(&mut c2), testing::backend_pid(&mut c3));
    hold_account(&mut c3, a);
    let refused_first = vec![Item::single(transfer(a, b, "500.00", &k))];
    let (r1, r2) = thread::scope(|s| {
        let h1 = s.spawn(|| transfers::create_batch_with(&mut c1, &TxOptions::no_retry(), &refused_first).unwrap());
        let k2 = k.clone();
        let arranged = testing::wait_until_blocked(&mut observer, p1, p3, WAIT).map(|()| {
            let h2 = s.spawn(move || second(&mut c2, c, b, &k2));
            (testing::wait_until_blocked(&mut observer, p2, p1, WAIT), h2)
        });
        // Released also when the race could not be arranged: T1 waits for this lock, and a
        // panic here with T1 still waiting would hang the scope until the test's deadline.
        AnsiTransactionManager::commit_transaction(&mut c3).unwrap();
        let (waited, h2) = arranged.unwrap_or_else(|e| panic!("T1 did not wait for the held account: {e}"));
        let r1 = h1.join().unwrap();
        let r2 = h2.join().unwrap();
        waited.unwrap_or_else(|e| panic!("the second request did not wait for T1's key lock: {e}"));
        (r1, r2)
    });
    assert_audit_clean(&mut setup);
    (result_code(&r1[0]).to_string(), r2, balance(&mut setup, b))
}

/// T2 is a batch: its locked re-read finds no row, it keeps the stale pre-lock read, and
/// refuses its good, fresh transfer as an idempotency conflict although the key is free.
#[testing::test]
fn a_resultless_key_given_back_by_a_concurrent_batch_is_free_for_the_batch_waiting_on_it() {
    let (first, second, b_minor) = race_on_a_given_back_key("h4-stale", |conn, c, b, k| {
        let r = transfers::create_batch_with(conn, &TxOptions::no_retry(), &[Item::single(transfer(c, b, "2.00", k))]);
        r.unwrap().remove(0)
    });
    assert_eq!(first, "insufficient_funds");
    assert_eq!(result_code(&second), "created", "the key was free: {second:?}");
    assert_eq!(b_minor, 200);
}

/// The same race, with the single path waiting: `idempotency::begin` locks the key it
/// found, and the row is gone when the lock is granted.
#[testing::test]
fn a_resultless_key_given_back_by_a_concurrent_batch_is_free_for_a_waiting_single_transfer() {
    let (first, second, b_minor) = race_on_a_given_back_key("h4-stale1", |conn, c, b, k| {
        transfers::transfer_with(conn, &TxOptions::no_retry(), &transfer(c, b, "2.00", k))
    });
    assert_eq!(first, "insufficient_funds");
    let receipt = second.expect("the key was free");
    assert!(!receipt.replayed);
    assert_eq!(b_minor, 200);
}

fn deposit(account: AccountId, amount: &str, key: &IdempotencyKey) -> Deposit {
    Deposit { account, amount: eur(amount), key: key.clone() }
}

fn deposit_code(r: &DepositResult) -> &'static str {
    match r {
        DepositResult::Created { .. } => "created",
        DepositResult::Replayed { .. } => "replayed",
        DepositResult::Refused(e) => e.code(),
    }
}

/// A deposit chain whose second item overflows the account: nothing of the chain is
/// written, its first key is given back (usable again), the next chain is applied, and
/// the same key twice with different deposits is a conflict.
#[testing::test]
fn a_deposit_chain_with_an_overflowing_item_writes_nothing_and_gives_its_keys_back() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "0.00");
    let big = Money::from_minor(i64::MAX - 5, Currency::EUR).unwrap();
    let (k0, k1, k2, k3) = (testing::key("d0"), testing::key("d1"), testing::key("d2"), testing::key("d3"));
    let first = deposits::create_batch(&mut conn, &[Item::single(Deposit { account: a, amount: big, key: k0 })]);
    assert_eq!(deposit_code(&first.unwrap()[0]), "created");
    let items = vec![
        Item::linked(deposit(a, "0.01", &k1)),
        Item::single(deposit(a, "0.10", &k2)),
        Item::single(deposit(a, "0.02", &k3)),
        Item::single(deposit(a, "0.03", &k3)),
    ];
    let r = deposits::create_batch(&mut conn, &items).unwrap();
    let codes: Vec<_> = r.iter().map(deposit_code).collect();
    assert_eq!(codes, ["linked_item_failed", "balance_overflow", "created", "idempotency_conflict"]);
    assert_eq!(balance(&mut conn, a), i64::MAX - 3);
    // k1 applied nothing: it is free for another deposit.
    let again = deposits::create_batch(&mut conn, &[Item::single(deposit(a, "0.03", &k1))]).unwrap();
    assert_eq!(deposit_code(&again[0]), "created");
    assert_eq!(balance(&mut conn, a), i64::MAX);
    assert_audit_clean(&mut conn);
}

/// Currency mixing in one transfer batch: a EUR transfer to a USD account is refused by
/// itself, the items around it are applied, and no posting of it exists.
#[testing::test]
fn a_transfer_batch_refuses_a_currency_mix_alone_and_applies_the_rest() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut conn, "b", Currency::EUR, "0.00");
    let u = testing::funded_account(&mut conn, "u", Currency::USD, "0.00");
    let items = vec![
        Item::single(transfer(a, b, "1.00", &testing::key("m0"))),
        Item::single(transfer(a, u, "1.00", &testing::key("m1"))),
        Item::single(transfer(b, a, "0.25", &testing::key("m2"))),
    ];
    let r = transfers::create_batch(&mut conn, &items).unwrap();
    let codes: Vec<_> = r.iter().map(result_code).collect();
    assert_eq!(codes[0], "created");
    assert_ne!(codes[1], "created");
    assert_eq!(codes[2], "created");
    assert_eq!((balance(&mut conn, a), balance(&mut conn, b), balance(&mut conn, u)), (925, 75, 0));
    assert_audit_clean(&mut conn);
}

/// Withdrawal requests: the same key twice in one batch with different requests is a
/// conflict for the second; with the same request a replay of the first; the batch sent
/// again replays every created one and the refused key stays free.
#[testing::test]
fn a_withdrawal_request_batch_with_repeated_keys_creates_each_key_once() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let u = testing::funded_account(&mut conn, "u", Currency::USD, "10.00");
    let w0 = withdrawal(a, "1.00", "w0");
    let mut w0_other = w0.clone();
    w0_other.amount = eur("2.00");
    let mut bad = withdrawal(u, "1.00", "w1");
    bad.amount = eur("1.00");
    let items = vec![Item::single(bad.clone()), Item::single(w0.clone()), Item::single(w0_other), Item::single(w0)];
    let code = |r: &RequestResult| match r {
        RequestResult::Created { .. } => "created".to_string(),
        RequestResult::Replayed { .. } => "replayed".to_string(),
        RequestResult::Refused(e) => e.code().to_string(),
    };
    let r = withdrawals::request_batch(&mut conn, &items).unwrap();
    let codes: Vec<_> = r.iter().map(code).collect();
    assert_ne!(codes[0], "created");
    assert_eq!(&codes[1..], ["created", "idempotency_conflict", "replayed"]);
    let again = withdrawals::request_batch(&mut conn, &items).unwrap();
    assert_eq!(again.iter().map(code).collect::<Vec<_>>()[1..], ["replayed", "idempotency_conflict", "replayed"]);
    let count: i64 = diesel::RunQueryDsl::get_result(
        diesel::sql_query(format!("SELECT count(*) AS n FROM withdrawals WHERE account_id = {}", a.get())),
        &mut conn,
    )
    .map(|r: Count| r.n)
    .unwrap();
    assert_eq!(count, 1);
    // The refused request's key applied nothing: it is free.
    let mut fixed = bad;
    fixed.amount = Money::parse("1.00", Currency::USD).unwrap();
    assert_eq!(code(&withdrawals::request_batch(&mut conn, &[Item::single(fixed)]).unwrap()[0]), "created");
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Two batches moving money both ways between the same accounts, many times over, on
/// real threads: accounts are locked in id order, so neither deadlocks (no retries
/// allowed), and the balances are exact.
#[testing::test]
fn batches_moving_money_both_ways_never_deadlock() {
    const ROUNDS: usize = 40;
    let db = testing::committed();
    let mut setup = db.conn();
    let ids: Vec<AccountId> =
        (0..4).map(|i| testing::funded_account(&mut setup, &format!("x{i}"), Currency::EUR, "100.00")).collect();
    thread::scope(|s| {
        for dir in 0..2 {
            let (db, ids) = (&db, &ids);
            s.spawn(move || {
                let mut conn = db.conn();
                for round in 0..ROUNDS {
                    let order: Vec<AccountId> =
                        if dir == 0 { ids.clone() } else { ids.iter().rev().copied().collect() };
                    let items: Vec<_> = order
                        .windows(2)
                        .enumerate()
                        .map(|(i, w)| {
                            Item::single(transfer(w[0], w[1], "0.01", &testing::key(&format!("dl{dir}{round}{i}"))))
                        })
                        .collect();
                    let r = transfers::create_batch_with(&mut conn, &TxOptions::no_retry(), &items)
                        .unwrap_or_else(|e| panic!("batch {dir}/{round} failed: {e}"));
                    assert!(r.iter().all(|r| matches!(r, TransferResult::Created { .. })), "{r:?}");
                }
            });
        }
    });
    // Each direction moves 0.01 along 3 edges per round: the ends net out, the middles too.
    let total: i64 = ids.iter().map(|a| balance(&mut setup, *a)).sum();
    assert_eq!(total, 40_000);
    assert_eq!(balance(&mut setup, ids[0]), 10_000);
    assert_eq!(balance(&mut setup, ids[3]), 10_000);
    assert_audit_clean(&mut setup);
}

/// A failed chain that moved accounts in memory is undone before the next item is
/// decided: the next item sees the balances from before the chain (a left-over credit
/// would let `b` overspend, a left-over debit would refuse `a`).
#[testing::test]
fn an_item_after_a_failed_chain_sees_the_balances_from_before_the_chain() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut conn, "b", Currency::EUR, "0.00");
    let c = testing::funded_account(&mut conn, "c", Currency::EUR, "0.00");
    let k = |s: &str| testing::key(s);
    let items = vec![
        Item::linked(transfer(a, b, "5.00", &k("ch0"))),
        Item::linked(transfer(b, c, "5.00", &k("ch1"))),
        Item::single(transfer(a, c, "100.00", &k("ch2"))),
        Item::single(transfer(b, c, "0.01", &k("ch3"))),
        Item::single(transfer(c, a, "0.01", &k("ch4"))),
        Item::single(transfer(a, c, "10.00", &k("ch5"))),
        // The chain's first key applied nothing: a later item may use it for another transfer.
        Item::single(transfer(c, b, "1.00", &k("ch0"))),
    ];
    let r = transfers::create_batch(&mut conn, &items).unwrap();
    let codes: Vec<_> = r.iter().map(result_code).collect();
    assert_eq!(
        codes,
        [
            "linked_item_failed",
            "linked_item_failed",
            "insufficient_funds",
            "insufficient_funds",
            "insufficient_funds",
            "created",
            "created"
        ]
    );
    assert_eq!((balance(&mut conn, a), balance(&mut conn, b), balance(&mut conn, c)), (0, 100, 900));
    assert_audit_clean(&mut conn);
}

/// A key used by one operation is a conflict for every other operation's batch, and
/// nothing is written under it.
#[testing::test]
fn a_key_used_by_a_deposit_is_a_conflict_for_a_transfer_batch_and_a_withdrawal_batch() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut conn, "b", Currency::EUR, "0.00");
    let shared = testing::key("h4-shared");
    let r = deposits::create_batch(&mut conn, &[Item::single(deposit(a, "1.00", &shared))]).unwrap();
    assert_eq!(deposit_code(&r[0]), "created");
    let before = testing::snapshot(&mut conn);
    let t = transfers::create_batch(&mut conn, &[Item::single(transfer(a, b, "1.00", &shared))]).unwrap();
    assert_eq!(result_code(&t[0]), "idempotency_conflict");
    let mut w = withdrawal(a, "1.00", "unused");
    w.key = shared.clone();
    let wr = withdrawals::request_batch(&mut conn, &[Item::single(w)]).unwrap();
    assert!(matches!(&wr[0], RequestResult::Refused(LedgerError::IdempotencyConflict { .. })), "{:?}", wr[0]);
    assert_eq!(testing::snapshot(&mut conn), before, "nothing written");
    let again = deposits::create_batch(&mut conn, &[Item::single(deposit(a, "1.00", &shared))]).unwrap();
    assert_eq!(deposit_code(&again[0]), "replayed");
}
