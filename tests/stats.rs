//! Queue depths and rates (ledger_core::stats): exact figures for known rows, and plans
//! that read partial indexes only.

mod common;

use std::time::Duration;

use common::withdrawal;
use diesel::sql_types::{Double, Text};
use diesel::{QueryableByName, RunQueryDsl};
use ledger_core::payouts::{self, PayoutStatus, Recorded, RetryPolicy, Verdict};
use ledger_core::retry::{Backoff, Jitter};
use ledger_core::stats::{self, QueueDepths, Rates};
use ledger_core::withdrawals::{self, WithdrawalStatus};
use ledger_core::{tx, Currency, TxOptions};
use ledger_testdb as testing;

/// Rows in every state: 4 pending (1 of them waiting for a retry), 1 failed,
/// 1 rejected, 4 debited of which 1 completed (payout settled), 1 with a failed payout
/// and 2 whose payouts are still pending.
fn known_rows(conn: &mut diesel::PgConnection) {
    let a = testing::funded_account(conn, "stats", Currency::EUR, "1000.00");
    let poor = testing::funded_account(conn, "poor", Currency::EUR, "1.00");
    for _ in 0..3 {
        withdrawals::request(conn, &withdrawal(a, "1.00", "pend")).unwrap();
    }
    let (retry, _) = withdrawals::request(conn, &withdrawal(a, "1.00", "retry")).unwrap();
    let slow = RetryPolicy { max_attempts: 5, backoff: Backoff::new(600_000, 600_000, Jitter::Half) };
    assert_eq!(
        withdrawals::record_failed_attempt(conn, retry, "connection reset", &slow).unwrap(),
        Some(WithdrawalStatus::Pending)
    );
    let (failed, _) = withdrawals::request(conn, &withdrawal(a, "1.00", "fail")).unwrap();
    assert!(withdrawals::fail_now(conn, failed, "a panic").unwrap());
    let (rejected, _) = withdrawals::request(conn, &withdrawal(poor, "5.00", "rej")).unwrap();
    ledger_core::transaction(conn, &TxOptions::default(), |tx| withdrawals::process_tx(tx, rejected)).unwrap();
    assert_eq!(withdrawals::get(conn, rejected).unwrap().status, WithdrawalStatus::Rejected);

    let debited: Vec<_> =
        (0..4).map(|_| withdrawals::withdraw(conn, &withdrawal(a, "2.00", "debit")).unwrap().id).collect();
    let claim = payouts::claim_due(conn, 100, 60_000).unwrap();
    assert_eq!(claim.requests.len(), 4);
    let find = |w| claim.requests.iter().find(|r| r.withdrawal == w).unwrap();
    let paid = Verdict::Paid { reference: Some("bank-1".into()) };
    assert_eq!(payouts::record(conn, find(debited[0]), &paid, &RetryPolicy::PAYOUTS).unwrap(), Recorded::Settled);
    let once = RetryPolicy { max_attempts: 1, backoff: Backoff::new(1, 1, Jitter::Half) };
    let down = Verdict::Unknown { error: "bank down".into() };
    assert_eq!(payouts::record(conn, find(debited[1]), &down, &once).unwrap(), Recorded::Failed);
    assert_eq!(withdrawals::get(conn, debited[0]).unwrap().status, WithdrawalStatus::Completed);
    let p = payouts::for_withdrawal(conn, debited[1]).unwrap().unwrap();
    assert_eq!(p.status, PayoutStatus::Failed);
}

#[testing::test]
fn depths_and_rates_count_exactly_the_rows_in_each_state() {
    let db = testing::committed();
    let mut conn = db.conn();
    let empty = stats::snapshot(&mut conn, stats::RATE_WINDOW).unwrap();
    assert_eq!(empty.depths, QueueDepths::default(), "a new ledger has nothing queued");
    assert_eq!(empty.rates, Rates { window_s: 60.0, ..Rates::default() });

    known_rows(&mut conn);
    std::thread::sleep(Duration::from_millis(20));
    let s = stats::snapshot(&mut conn, stats::RATE_WINDOW).unwrap();
    let age = s.depths.oldest_pending_age_s.expect("something is pending");
    assert!((0.02..60.0).contains(&age), "{age}");
    assert_eq!(
        s.depths,
        QueueDepths {
            withdrawals_pending: 4,
            withdrawals_retry_waiting: 1,
            withdrawals_paying_out: 3,
            withdrawals_failed: 1,
            payouts_pending: 2,
            payouts_failed: 1,
            oldest_pending_age_s: Some(age),
        }
    );
    assert_eq!(
        s.rates,
        Rates { window_s: 60.0, withdrawals_debited: 4, withdrawals_refused: 2, payouts_settled: 1 },
        "debited (the completed one included), refused (failed and rejected), settled"
    );
    assert!((s.rates.payouts_settled_per_s() - 1.0 / 60.0).abs() < 1e-9);
    let mut depths = stats::depths(&mut conn).unwrap();
    assert!(depths.oldest_pending_age_s.unwrap() >= age);
    depths.oldest_pending_age_s = Some(age);
    assert_eq!(depths, s.depths, "depths alone reads the same");

    // A window that ends before everything above counts nothing.
    std::thread::sleep(Duration::from_millis(50));
    let later = stats::snapshot(&mut conn, Duration::from_millis(10)).unwrap();
    assert_eq!(
        (later.rates.withdrawals_debited, later.rates.withdrawals_refused, later.rates.payouts_settled),
        (0, 0, 0)
    );
    assert_eq!(later.depths.withdrawals_pending, 4);
}

#[derive(QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = Text)]
    #[diesel(column_name = "QUERY PLAN")]
    line: String,
}

#[testing::test]
fn the_statements_read_partial_indexes_never_a_table() {
    let db = testing::committed();
    let mut conn = db.conn();
    known_rows(&mut conn);
    let plan = |conn: &mut diesel::PgConnection, sql: &str| -> String {
        ledger_core::transaction(conn, &TxOptions::default(), |t| {
            tx::with_batch_plans(t, |t| {
                let query = diesel::sql_query(format!("EXPLAIN {sql}"));
                let lines: Vec<PlanLine> = if sql.contains("$1") {
                    query.bind::<Double, _>(60.0).load(t.conn())?
                } else {
                    query.load(t.conn())?
                };
                Ok::<_, ledger_core::LedgerError>(lines.into_iter().map(|l| l.line).collect::<Vec<_>>().join("\n"))
            })
        })
        .unwrap()
    };
    let depths = plan(&mut conn, stats::DEPTHS_SQL);
    let snapshot = plan(&mut conn, stats::SNAPSHOT_SQL);
    for (sql, text) in [("depths", &depths), ("snapshot", &snapshot)] {
        assert!(!text.contains("Seq Scan") && !text.contains("Bitmap"), "{sql} scans a table:\n{text}");
        // (The retry-waiting count may read either pending index: both hold the
        // pending rows only.)
        for index in [
            "withdrawals_pending_id_idx",
            "withdrawals_paying_out_idx",
            "withdrawals_failed_idx",
            "payouts_due_idx",
            "payouts_failed_idx",
        ] {
            assert!(text.contains(index), "{sql} does not read {index}:\n{text}");
        }
    }
    for index in ["withdrawals_finished_at_idx", "payouts_settled_at_idx"] {
        assert!(snapshot.contains(index), "the rates do not read {index}:\n{snapshot}");
    }
}
