//! `withdrawals::request_batch`: per-item results as `request_tx` checks them, replays
//! across the single path and the batch, conflicts, chains, the size cap, and jobs the
//! daemon is woken for and processes like single requests.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use ledger_core::withdrawals::{self, JobOutcome, RequestResult, WithdrawalRequest, WithdrawalStatus};
use ledger_core::{deposits, TxOptions};

use super::common::{balance, withdrawal};
use super::*;

fn code(r: &RequestResult) -> &'static str {
    match r {
        RequestResult::Created { .. } => "created",
        RequestResult::Replayed { .. } => "replayed",
        RequestResult::Refused(e) => e.code(),
    }
}

fn pending_rows(conn: &mut diesel::pg::PgConnection) -> i64 {
    withdrawals::pending_count(conn).unwrap()
}

#[testing::test]
fn each_request_is_checked_as_the_single_path_checks_it() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let (closed, jpy) = (closed_account(&mut conn), yen_account(&mut conn));
    let system = ledger_core::accounts::system_account(
        &mut conn,
        ledger_core::accounts::SystemRole::ExternalFunding,
        Currency::EUR,
    )
    .unwrap();
    let first = withdrawal(a, "1.00", "r0");
    let batch: Vec<Item<WithdrawalRequest>> = [
        first.clone(),
        withdrawal(AccountId::new(876_543).unwrap(), "1.00", "r1"),
        withdrawal(closed, "1.00", "r2"),
        withdrawal(jpy, "1.00", "r3"),
        withdrawal(system, "1.00", "r4"),
        withdrawal(a, "99.00", "r5"),
        first,
    ]
    .into_iter()
    .map(Item::single)
    .collect();
    let results = withdrawals::request_batch(&mut conn, &batch).unwrap();
    let codes: Vec<&str> = results.iter().map(code).collect();
    assert_eq!(
        codes,
        ["created", "unknown_account", "account_closed", "currency_mismatch", "system_account", "created", "replayed"]
    );
    assert_eq!(results[6].id(), results[0].id(), "an in-batch replay answers with the first withdrawal");
    // The balance is checked when the job runs, as for a single request.
    let job = withdrawals::get(&mut conn, results[5].id().unwrap()).unwrap();
    assert_eq!((job.status, job.amount_minor, job.account_id), (WithdrawalStatus::Pending, 9_900, a));
    assert_eq!((job.destination.as_str(), job.idempotency_key.as_str()), (common::IBAN, batch[5].request.key.as_str()));
    assert_eq!(pending_rows(&mut conn), 2);
    // A refused item's key is unused.
    let retry = WithdrawalRequest { account: a, ..batch[1].request.clone() };
    assert!(!withdrawals::request(&mut conn, &retry).unwrap().1);
}

#[testing::test]
fn single_and_batch_requests_replay_each_other_and_conflicts_are_refused() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let single = withdrawal(a, "1.00", "one");
    let (single_id, _) = withdrawals::request(&mut conn, &single).unwrap();
    let batched = withdrawal(a, "2.00", "two");
    let results =
        withdrawals::request_batch(&mut conn, &[Item::single(single.clone()), Item::single(batched.clone())]).unwrap();
    assert!(matches!(results[0], RequestResult::Replayed { id } if id == single_id), "{:?}", results[0]);
    let batched_id = results[1].id().unwrap();
    assert_eq!(withdrawals::request(&mut conn, &batched).unwrap(), (batched_id, true));
    let other = |r: &WithdrawalRequest| WithdrawalRequest { amount: common::eur("3.00"), ..r.clone() };
    assert_eq!(withdrawals::request(&mut conn, &other(&batched)).unwrap_err().code(), "idempotency_conflict");
    let deposit_key = testing::key("dep");
    deposits::deposit(&mut conn, &dep(a, "1.00", &deposit_key)).unwrap();
    let under_deposit = WithdrawalRequest { key: deposit_key, ..single.clone() };
    let results =
        withdrawals::request_batch(&mut conn, &[Item::single(other(&single)), Item::single(under_deposit)]).unwrap();
    let operations: Vec<&str> = results
        .iter()
        .map(|r| match r {
            RequestResult::Refused(ledger_core::LedgerError::IdempotencyConflict { operation, .. }) => {
                operation.as_str()
            }
            other => panic!("expected a conflict, got {other:?}"),
        })
        .collect();
    assert_eq!(operations, ["withdrawal", "deposit"]);
    assert_eq!(pending_rows(&mut conn), 2);
}

#[testing::test]
fn a_linked_chain_of_requests_is_all_or_nothing_and_oversize_is_refused() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let closed = closed_account(&mut conn);
    let chain = [Item::linked(withdrawal(a, "1.00", "l0")), Item::single(withdrawal(closed, "1.00", "l1"))];
    let results = withdrawals::request_batch(&mut conn, &chain).unwrap();
    assert_eq!(results.iter().map(code).collect::<Vec<_>>(), ["linked_item_failed", "account_closed"]);
    let open = [Item::single(withdrawal(a, "1.00", "o0")), Item::linked(withdrawal(a, "1.00", "o1"))];
    let results = withdrawals::request_batch(&mut conn, &open).unwrap();
    assert_eq!(results.iter().map(code).collect::<Vec<_>>(), ["created", "linked_chain_open"]);
    assert_eq!(pending_rows(&mut conn), 1);
    // The chain's first key stayed unused.
    assert!(!withdrawals::request(&mut conn, &chain[0].request).unwrap().1);
    let before = testing::snapshot(&mut conn);
    let err = withdrawals::request_batch(&mut conn, &oversize(withdrawal(a, "1.00", "big"))).unwrap_err();
    assert_eq!(err.code(), "invalid_input");
    assert_eq!(testing::snapshot(&mut conn), before, "nothing written");
}

/// The daemon listens on `ledger_withdrawals`: a batch's commit notifies it (once, like
/// a single request), and its jobs process like any other.
#[testing::test]
fn a_batch_wakes_the_daemon_and_its_jobs_process_like_single_requests() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let mut listener = db.conn();
    listener.batch_execute("LISTEN ledger_withdrawals").unwrap();
    let batch: Vec<_> = (0..3).map(|i| Item::single(withdrawal(a, "2.00", &format!("wake{i}")))).collect();
    let results = withdrawals::request_batch(&mut conn, &batch).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut woken = 0;
    while woken == 0 && Instant::now() < deadline {
        listener.batch_execute("SELECT 1").unwrap();
        woken +=
            listener.notifications_iter().filter_map(Result::ok).filter(|n| n.channel == "ledger_withdrawals").count();
    }
    assert!(woken >= 1, "no notification on ledger_withdrawals after the batch committed");
    for r in &results {
        let id = r.id().unwrap();
        let outcome =
            ledger_core::transaction(&mut conn, &TxOptions::default(), |tx| withdrawals::process_tx(tx, id)).unwrap();
        assert!(matches!(outcome, JobOutcome::Debited { .. }), "{outcome:?}");
    }
    assert_eq!(balance(&mut conn, a), 400);
    common::assert_audit_clean(&mut conn);
}
