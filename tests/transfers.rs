//! Batches of transfers on a real PostgreSQL: one result per item, linked chains, keys,
//! and concurrent batches over shared accounts with real commits.

mod common;

use std::collections::HashMap;
use std::sync::Barrier;
use std::thread;

use common::{assert_audit_clean, balance, eur, result_code, transfer};
use diesel::pg::PgConnection;
use ledger_core::batch::{Item, MAX_BATCH_ITEMS};
use ledger_core::transfers::{self, Transfer, TransferResult};
use ledger_core::{AccountId, Currency, IdempotencyKey, LedgerError, Money, TxOptions};
use ledger_testdb as testing;

fn postings_of(conn: &mut PgConnection, account: AccountId) -> usize {
    ledger_core::journal::statement(conn, account, 10_000).unwrap().len()
}

#[testing::test]
fn a_batch_answers_each_item_and_writes_only_what_it_created() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "100.00");
        let b = testing::funded_account(conn, "b", Currency::EUR, "10.00");
        let c = testing::funded_account(conn, "c", Currency::EUR, "0.00");
        let k: Vec<IdempotencyKey> = (0..7).map(|_| testing::key("tb")).collect();
        let batch = vec![
            Item::single(transfer(a, b, "30.00", &k[0])), // created: a 70, b 40
            Item::single(transfer(c, a, "1.00", &k[1])),  // refused: c holds nothing
            Item::linked(transfer(b, c, "40.00", &k[2])), // chain 2..=3 fails with 3
            Item::single(transfer(c, a, "50.00", &k[3])), //   (c would hold 40.00 only)
            Item::linked(transfer(b, c, "15.00", &k[4])), // chain 4..=5 succeeds: b 25, c 15
            Item::single(transfer(c, a, "5.00", &k[5])),  //   c 10, a 75
            Item::linked(transfer(a, b, "1.00", &k[6])),  // open chain: refused
        ];
        let before_c = postings_of(conn, c);
        let results = transfers::create_batch(conn, &batch).unwrap();
        let codes: Vec<&str> = results.iter().map(result_code).collect();
        assert_eq!(
            codes,
            [
                "created",
                "insufficient_funds",
                "linked_item_failed",
                "insufficient_funds",
                "created",
                "created",
                "linked_chain_open"
            ]
        );
        assert!(matches!(results[2], TransferResult::Refused(LedgerError::LinkedItemFailed { failed: 3 })));
        // Each answer carries the balances right after it, and the database agrees.
        let balances: Vec<(i64, i64)> = results
            .iter()
            .filter_map(|r| match r {
                TransferResult::Created { from_balance_minor, to_balance_minor, .. } => {
                    Some((*from_balance_minor, *to_balance_minor))
                }
                _ => None,
            })
            .collect();
        assert_eq!(balances, [(7_000, 4_000), (2_500, 1_500), (1_000, 7_500)]);
        assert_eq!((balance(conn, a), balance(conn, b), balance(conn, c)), (7_500, 2_500, 1_000));
        assert_eq!(postings_of(conn, c) - before_c, 2, "only the created items posted to c");
        let entries: Vec<_> = results.iter().filter_map(TransferResult::entry).collect();
        assert_eq!(entries.len(), 3);
        assert!(entries.windows(2).all(|w| w[0] < w[1]), "entries follow batch order");
        assert_audit_clean(conn);
    });
}

#[testing::test]
fn a_batch_sent_again_replays_what_it_created_and_a_refused_key_is_free_to_retry() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "10.00");
        let b = testing::funded_account(conn, "b", Currency::EUR, "0.00");
        let (k1, k2) = (testing::key("again"), testing::key("again"));
        let batch = vec![Item::single(transfer(a, b, "10.00", &k1)), Item::single(transfer(b, a, "20.00", &k2))];
        let first = transfers::create_batch(conn, &batch).unwrap();
        assert_eq!(first.iter().map(result_code).collect::<Vec<_>>(), ["created", "insufficient_funds"]);
        let second = transfers::create_batch(conn, &batch).unwrap();
        assert_eq!(second.iter().map(result_code).collect::<Vec<_>>(), ["replayed", "insufficient_funds"]);
        assert_eq!(second[0].entry(), first[0].entry(), "the replay names the first entry");
        assert_eq!((balance(conn, a), balance(conn, b)), (0, 1_000), "nothing applied twice");
        // The single path sees the same key as the same transfer.
        let single = transfers::transfer(conn, &batch[0].request).unwrap();
        assert!(single.replayed);
        assert_eq!(Some(single.entry), first[0].entry());
        // The refused key was given back: once b can pay, the same key goes through.
        let d = testing::funded_account(conn, "d", Currency::EUR, "20.00");
        transfers::create_batch(conn, &[Item::single(transfer(d, b, "20.00", &testing::key("fund")))]).unwrap();
        let retried = transfers::create_batch(conn, &batch[1..]).unwrap();
        assert_eq!(result_code(&retried[0]), "created");
        assert_eq!((balance(conn, a), balance(conn, b)), (2_000, 1_000));
        // A key used for another request is a conflict, in a batch as alone.
        let changed = vec![Item::single(transfer(a, b, "9.99", &k1))];
        assert_eq!(result_code(&transfers::create_batch(conn, &changed).unwrap()[0]), "idempotency_conflict");
        assert_audit_clean(conn);
    });
}

#[testing::test]
fn a_batch_too_large_or_in_another_currency_is_refused_and_changes_nothing() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "10.00");
        let b = testing::funded_account(conn, "b", Currency::EUR, "0.00");
        let before = testing::snapshot(conn);
        let key = testing::key("big");
        let big: Vec<Item<Transfer>> =
            (0..=MAX_BATCH_ITEMS).map(|_| Item::single(transfer(a, b, "0.01", &key))).collect();
        let err = transfers::create_batch(conn, &big).unwrap_err();
        assert_eq!(err.code(), "invalid_input", "{err}");
        // A transfer in a currency neither account holds is refused on its own.
        let yen = Transfer {
            from: a,
            to: b,
            amount: Money::parse("100", Currency::JPY).unwrap(),
            key: testing::key("jpy"),
            metadata: None,
        };
        let results = transfers::create_batch(conn, &[Item::single(yen)]).unwrap();
        assert_eq!(result_code(&results[0]), "currency_mismatch");
        assert_eq!(testing::snapshot(conn), before, "nothing was written");
    });
}

/// Per thread pair, `rounds` batches of `per_batch` random transfers between
/// `accounts`, every tenth linked to the next, keyed by pair, round and place.
fn shared_key_plans(
    accounts: &[AccountId],
    pairs: usize,
    rounds: usize,
    per_batch: usize,
) -> Vec<Vec<Vec<Item<Transfer>>>> {
    (0..pairs)
        .map(|pair| {
            let mut rng = fastrand::Rng::with_seed(pair as u64);
            (0..rounds)
                .map(|round| {
                    (0..per_batch)
                        .map(|i| {
                            let from = accounts[rng.usize(..accounts.len())];
                            let mut to = accounts[rng.usize(..accounts.len())];
                            while to == from {
                                to = accounts[rng.usize(..accounts.len())];
                            }
                            let amount = Money::from_minor(rng.i64(1..=2_000), Currency::EUR).unwrap();
                            let key = IdempotencyKey::new(format!("cb-{pair}-{round}-{i}")).unwrap();
                            let transfer = Transfer { from, to, amount, key, metadata: None };
                            if i % 10 == 9 {
                                Item::linked(transfer)
                            } else {
                                Item::single(transfer)
                            }
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Thread `n`'s batches, in turn with no retries (a deadlock would fail the batch, and
/// the test); an odd thread sends each batch reversed, its chains re-linked the other
/// way round. Every request with its result.
fn send_batches(conn: &mut PgConnection, n: usize, plan: &[Vec<Item<Transfer>>]) -> Vec<(Transfer, TransferResult)> {
    let mut out = Vec::new();
    for batch in plan {
        let mut batch = batch.clone();
        if n % 2 == 1 {
            batch.reverse();
            let links: Vec<bool> = batch.iter().map(|i| i.linked).collect();
            for (i, item) in batch.iter_mut().enumerate() {
                item.linked = i + 1 < links.len() && links[i + 1];
            }
        }
        let results = transfers::create_batch_with(conn, &TxOptions::no_retry(), &batch)
            .unwrap_or_else(|e| panic!("thread {n}: a batch failed as a whole: {e}"));
        out.extend(batch.into_iter().map(|i| i.request).zip(results));
    }
    out
}

/// Asserts every key was created exactly once and its twin either replayed it (naming
/// the created entry) or was refused; returns the created transfers by key.
fn created_once_and_replayed(
    results: &[Vec<(Transfer, TransferResult)>],
) -> HashMap<String, (Transfer, ledger_core::EntryId)> {
    let mut created: HashMap<String, (Transfer, ledger_core::EntryId)> = HashMap::new();
    for (transfer, result) in results.iter().flatten() {
        match result {
            TransferResult::Created { entry, .. } => {
                let twice = created.insert(transfer.key.as_str().to_string(), (transfer.clone(), *entry));
                assert!(twice.is_none(), "key {} created twice", transfer.key);
            }
            TransferResult::Replayed { .. } | TransferResult::Refused(_) => {}
        }
    }
    for (transfer, result) in results.iter().flatten() {
        if let TransferResult::Replayed { entry } = result {
            assert_eq!(
                created.get(transfer.key.as_str()).map(|c| c.1),
                Some(*entry),
                "a replay names the created entry"
            );
        }
    }
    created
}

/// Threads send batches over the same few accounts at once, in opposite orders and
/// sharing keys, each on its own connection with real commits. Account locks (sorted)
/// and key claims (sorted) keep them from deadlocking; the row locks keep every
/// balance exact.
#[testing::test]
fn concurrent_batches_over_shared_accounts_and_keys_never_deadlock_or_lose_money() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 15;
    const PER_BATCH: usize = 100;
    let db = testing::committed();
    let mut setup = db.conn();
    let accounts: Vec<AccountId> =
        (0..8).map(|i| testing::funded_account(&mut setup, &format!("acct{i}"), Currency::EUR, "50.00")).collect();
    // Keys shared by thread pairs: thread 2k and 2k+1 send the same transfers, one
    // forward and one in reverse order, so each waits on keys the other claimed.
    let plans = shared_key_plans(&accounts, THREADS / 2, ROUNDS, PER_BATCH);
    let start = Barrier::new(THREADS);
    let results: Vec<Vec<(Transfer, TransferResult)>> = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|n| {
                let (start, plan, db) = (&start, &plans[n / 2], &db);
                s.spawn(move || {
                    let mut conn = db.conn();
                    start.wait();
                    send_batches(&mut conn, n, plan)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a batch thread panicked")).collect()
    });
    let created = created_once_and_replayed(&results);
    assert!(created.len() > THREADS * ROUNDS, "the test moved money: {} transfers", created.len());
    // Each balance is its deposit plus what the created transfers moved.
    let mut expected: HashMap<AccountId, i64> = accounts.iter().map(|a| (*a, 5_000)).collect();
    for (t, _) in created.values() {
        *expected.get_mut(&t.from).unwrap() -= t.amount.minor();
        *expected.get_mut(&t.to).unwrap() += t.amount.minor();
    }
    for a in &accounts {
        assert_eq!(balance(&mut setup, *a), expected[a], "account {a}");
        assert!(expected[a] >= 0, "no account went below its floor");
    }
    assert_audit_clean(&mut setup);
}

#[testing::test]
fn metadata_is_stored_with_a_transfer_and_returned_with_it() {
    use ledger_core::history;
    use ledger_core::metadata::Metadata;
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "100.00");
        let b = testing::funded_account(conn, "b", Currency::EUR, "0.00");
        let meta = Metadata::parse(r#"{"order": 7, "note": "rent"}"#).unwrap();
        let single_key = testing::key("m");
        let single = transfer(a, b, "1.00", &single_key).with_metadata(meta.clone());
        let receipt = transfers::transfer(conn, &single).unwrap();
        let batch_key = testing::key("mb");
        let batched = transfer(a, b, "2.00", &batch_key).with_metadata(Metadata::parse(r#"{"order": 8}"#).unwrap());
        let results =
            transfers::create_batch(conn, &[batched.into(), transfer(a, b, "3.00", &testing::key("plain")).into()])
                .unwrap();
        let (batch_entry, plain_entry) = (results[0].entry().unwrap(), results[1].entry().unwrap());

        let got = transfers::get(conn, receipt.entry).unwrap();
        assert_eq!((got.from, got.to, got.amount, got.metadata.as_ref()), (a, b, eur("1.00"), Some(&meta)));
        assert_eq!(got.key, single_key.as_str());
        assert_eq!(transfers::get(conn, batch_entry).unwrap().metadata.unwrap().to_value()["order"], 8);
        assert_eq!(transfers::get(conn, plain_entry).unwrap().metadata, None);
        let lines = history::page(conn, b, None, 10).unwrap();
        let metas: Vec<Option<String>> = lines.iter().map(|l| l.metadata.as_ref().map(|m| m.to_string())).collect();
        assert_eq!(metas, vec![Some(r#"{"note":"rent","order":7}"#.into()), Some(r#"{"order":8}"#.into()), None]);

        // The same object in another key order is the same request: a replay.
        let reordered =
            transfer(a, b, "1.00", &single_key).with_metadata(Metadata::parse(r#"{"note":"rent","order":7}"#).unwrap());
        let again = transfers::transfer(conn, &reordered).unwrap();
        assert!(again.replayed && again.entry == receipt.entry);
        // Other metadata under the same key is another request: a conflict, nothing written.
        let other = transfer(a, b, "1.00", &single_key).with_metadata(Metadata::parse(r#"{"order": 9}"#).unwrap());
        assert!(matches!(transfers::transfer(conn, &other), Err(LedgerError::IdempotencyConflict { .. })));
        let without = transfer(a, b, "1.00", &single_key);
        assert!(matches!(transfers::transfer(conn, &without), Err(LedgerError::IdempotencyConflict { .. })));
        // A deposit's entry is not a transfer.
        let deposit_entry = history::page(conn, a, None, 1).unwrap()[0].entry_id;
        assert!(matches!(transfers::get(conn, deposit_entry), Err(LedgerError::UnknownTransfer(_))));
        assert_eq!(balance(conn, b), 600);
    });
}

#[testing::test]
fn the_database_refuses_metadata_that_is_not_a_small_json_object() {
    use diesel::connection::SimpleConnection;
    testing::with_rollback(|conn| {
        for bad in ["'[1]'", "'7'", "'not json'", &format!("'{{\"a\":\"{}\"}}'", "x".repeat(5000))] {
            let sql = format!("SAVEPOINT m; INSERT INTO journal_entries (kind, metadata) VALUES ('transfer', {bad})");
            let e = conn.batch_execute(&sql).expect_err(bad);
            assert!(
                e.to_string().contains("journal_entries_metadata_object") || e.to_string().contains("json"),
                "{bad}: {e}"
            );
            conn.batch_execute("ROLLBACK TO SAVEPOINT m").unwrap();
        }
    });
}

/// The planner settings batches run under, and the lock timeout, as one line.
fn plan_settings(conn: &mut PgConnection) -> String {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Line {
        #[diesel(sql_type = diesel::sql_types::Text)]
        line: String,
    }
    let sql = "SELECT concat_ws(' ', current_setting('jit'), current_setting('enable_seqscan'),
            current_setting('enable_bitmapscan'), current_setting('enable_hashjoin'),
            current_setting('enable_mergejoin'), current_setting('plan_cache_mode'),
            current_setting('lock_timeout')) AS line";
    diesel::sql_query(sql).get_result::<Line>(conn).unwrap().line
}

#[testing::test]
fn a_transaction_with_batch_plans_sets_them_with_its_begin_and_they_end_with_it() {
    use ledger_core::tx;
    let db = testing::committed();
    let mut conn = db.conn();
    let before = plan_settings(&mut conn);
    let opts = TxOptions { lock_timeout_ms: Some(1234), ..TxOptions::default() };
    let inside = tx::transaction_with_batch_plans(&mut conn, &opts, |t| Ok(plan_settings(t.conn()))).unwrap();
    assert_eq!(inside, "off off off off off force_generic_plan 1234ms");
    assert_eq!(plan_settings(&mut conn), before, "SET LOCAL ended with the transaction");
    // Inside a caller's transaction it is a savepoint: the caller's settings come back.
    let (nested, after) = tx::transaction(&mut conn, &TxOptions::default(), |t| {
        let nested = tx::transaction_with_batch_plans(t.conn(), &opts, |t| Ok(plan_settings(t.conn())))?;
        Ok::<_, LedgerError>((nested, plan_settings(t.conn())))
    })
    .unwrap();
    assert!(nested.starts_with("off off off off off force_generic_plan"), "{nested}");
    assert_eq!(after, before);
}

#[testing::test]
fn a_batch_in_its_own_transaction_replays_and_refuses_as_before_with_accounts_locked_at_the_claim() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut conn, "b", Currency::EUR, "0.00");
    let (k1, k2) = (testing::key("tc"), testing::key("tc"));
    let first = transfers::create_batch(&mut conn, &[Item::single(transfer(a, b, "4.00", &k1))]).unwrap();
    let entry = first[0].entry().expect("created");
    // A replay, a conflict under the same key, and a fresh one on the same accounts.
    let batch = [
        Item::single(transfer(a, b, "4.00", &k1)),
        Item::single(transfer(a, b, "5.00", &k1)),
        Item::single(transfer(b, a, "1.00", &k2)),
    ];
    let results = transfers::create_batch(&mut conn, &batch).unwrap();
    assert!(matches!(results[0], TransferResult::Replayed { entry: e } if e == entry), "{results:?}");
    assert!(matches!(results[1], TransferResult::Refused(LedgerError::IdempotencyConflict { .. })), "{results:?}");
    assert!(matches!(results[2], TransferResult::Created { from_balance_minor: 300, to_balance_minor: 700, .. }));
    assert_eq!((balance(&mut conn, a), balance(&mut conn, b)), (700, 300));
    assert_audit_clean(&mut conn);
}
