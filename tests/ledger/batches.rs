//! Savepoint batches: good items commit, a bad one fails alone, and a failed job retries as its policy says.

use super::*;

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
