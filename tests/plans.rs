//! Batch statements read the rows of their batch, not the backlog, whatever the
//! planner's statistics say; and they leave the caller's planner settings as they were.

mod common;

use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use ledger_core::payouts::{self, Recorded, RetryPolicy, Verdict};
use ledger_core::tx::PlannerSettings as Settings;
use ledger_core::withdrawals;
use ledger_core::{Currency, TxOptions, WithdrawalId};
use ledger_testdb as testing;

#[derive(QueryableByName)]
struct Reads {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = BigInt)]
    idx: i64,
}

/// Rows of `table` this transaction has read so far, by sequential and by index scans.
fn reads(conn: &mut PgConnection, table: &str) -> Reads {
    diesel::sql_query(
        "SELECT COALESCE(seq_tup_read, 0) AS seq, COALESCE(idx_tup_fetch, 0) AS idx
         FROM pg_stat_xact_user_tables WHERE relname = $1",
    )
    .bind::<Text, _>(table)
    .get_result(conn)
    .unwrap()
}

/// `n` pending withdrawals of 0.01 from `account`, in one statement (a burst of intake).
fn backlog(conn: &mut PgConnection, account: i64, n: i64) -> Vec<WithdrawalId> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let ids: Vec<Id> = diesel::sql_query(
        "INSERT INTO withdrawals (account_id, currency, amount_minor, destination, idempotency_key)
         SELECT $1, 'EUR', 1, 'DE89370400440532013000', 'burst-' || gen_random_uuid() FROM generate_series(1, $2) g
         RETURNING id",
    )
    .bind::<BigInt, _>(account)
    .bind::<BigInt, _>(n)
    .load(conn)
    .unwrap();
    let mut ids: Vec<WithdrawalId> = ids.into_iter().map(|r| WithdrawalId::new(r.id).unwrap()).collect();
    ids.sort();
    ids
}

#[testing::test]
fn a_batch_reads_its_own_rows_not_the_backlog_even_with_stale_statistics() {
    const BACKLOG: i64 = 6_000;
    const BATCH: usize = 300;
    let db = testing::committed();
    let mut conn = db.conn();
    let account = testing::funded_account(&mut conn, "burst", Currency::EUR, "1000.00");
    // Statistics taken while nothing is pending: the planner believes the pending partial
    // indexes are empty, the state a daemon is in right after a burst of intake.
    diesel::sql_query("ANALYZE withdrawals").execute(&mut conn).unwrap();
    diesel::sql_query("ANALYZE payouts").execute(&mut conn).unwrap();
    let ids = backlog(&mut conn, account.get(), BACKLOG);
    let batch = &ids[..BATCH];
    let (items, read) = ledger_core::tx::transaction(&mut conn, &TxOptions::default(), |tx| {
        let items = withdrawals::process_batch_fast_tx(tx, batch)?;
        Ok::<_, ledger_core::LedgerError>((items, reads(tx.conn(), "withdrawals")))
    })
    .unwrap();
    assert_eq!(items.len(), BATCH);
    assert!(items.iter().all(|i| matches!(i.outcome, withdrawals::JobOutcome::Debited { .. })), "{items:?}");
    // Each job's row is read a few times (the lock, the update, the reference check of
    // its payout); reading the backlog would be BACKLOG rows per statement.
    let total = read.seq + read.idx;
    assert!(
        total <= 8 * BATCH as i64,
        "a batch of {BATCH} read {} rows by sequential scans and {} by index scans of withdrawals \
         (a backlog of {BACKLOG})",
        read.seq,
        read.idx
    );
    assert_eq!(read.seq, 0, "no sequential scan of withdrawals");
}

/// A round of settlements reads its own withdrawals, not every withdrawal paying out:
/// with statistics from when none was paying out, the settle statement once scanned the
/// whole paying_out partial index in every round (found by the bench, whose latency
/// phase then fell behind for good). With that statement (`x.status = 'paying_out'`)
/// this test read 2,975 rows for a round of 25 and failed (checked by hand).
#[testing::test]
fn a_settlement_reads_its_own_withdrawals_not_the_backlog_paying_out() {
    const HISTORY: i64 = 2_000;
    const BACKLOG: i64 = 3_000;
    const ROUND: usize = 50;
    let db = testing::committed();
    let mut conn = db.conn();
    // The statistics below must stay stale: no automatic ANALYZE on this database.
    for table in ["withdrawals", "payouts"] {
        diesel::sql_query(format!("ALTER TABLE {table} SET (autovacuum_enabled = false)")).execute(&mut conn).unwrap();
    }
    let account = testing::funded_account(&mut conn, "settle", Currency::EUR, "1000.00");
    // A history of completed withdrawals, and statistics taken then: the planner
    // believes almost none is ever paying out.
    let history = backlog(&mut conn, account.get(), HISTORY);
    debit(&mut conn, &history);
    loop {
        let claim = payouts::claim_due(&mut conn, 1_000, 60_000).unwrap();
        if claim.requests.is_empty() {
            break;
        }
        let paid: Vec<_> = claim.requests.iter().map(|r| (r.clone(), Verdict::Paid { reference: None })).collect();
        payouts::record_all(&mut conn, &paid, &RetryPolicy::PAYOUTS).unwrap();
    }
    diesel::sql_query("ANALYZE withdrawals").execute(&mut conn).unwrap();
    diesel::sql_query("ANALYZE payouts").execute(&mut conn).unwrap();
    // Then a backlog paying out (the dispatchers behind).
    let ids = backlog(&mut conn, account.get(), BACKLOG);
    debit(&mut conn, &ids);
    let claim = payouts::claim_due(&mut conn, ROUND as i64, 60_000).unwrap();
    assert_eq!(claim.requests.len(), ROUND);
    let paid: Vec<_> = claim.requests.iter().map(|r| (r.clone(), Verdict::Paid { reference: None })).collect();
    let (recorded, read) = ledger_core::tx::transaction(&mut conn, &TxOptions::default(), |tx| {
        // Twice (half each), counting the second: the plan cached by the first is reused.
        let mut recorded = payouts::record_all_tx(tx, &paid[..ROUND / 2], &RetryPolicy::PAYOUTS)?;
        let before = reads(tx.conn(), "withdrawals");
        recorded.extend(payouts::record_all_tx(tx, &paid[ROUND / 2..], &RetryPolicy::PAYOUTS)?);
        let after = reads(tx.conn(), "withdrawals");
        Ok::<_, ledger_core::LedgerError>((recorded, (after.seq - before.seq, after.idx - before.idx)))
    })
    .unwrap();
    assert!(recorded.iter().all(|r| *r == Recorded::Settled), "{recorded:?}");
    let (seq, idx) = read;
    assert!(
        seq + idx <= 4 * (ROUND / 2) as i64,
        "settling {} payouts read {seq} rows of withdrawals by sequential scans and {idx} by index scans \
         ({BACKLOG} paying out)",
        ROUND / 2
    );
}

/// A round of claims given back unsent and of unknown outcomes is put back by probes of
/// its own payouts (`payouts/requeue.rs`), not by reading the payouts of the backlog,
/// with statistics from before there was one.
#[testing::test]
fn putting_a_round_back_reads_its_own_payouts_not_the_backlog() {
    const BACKLOG: i64 = 3_000;
    const ROUND: usize = 50;
    let db = testing::committed();
    let mut conn = db.conn();
    diesel::sql_query("ALTER TABLE payouts SET (autovacuum_enabled = false)").execute(&mut conn).unwrap();
    let account = testing::funded_account(&mut conn, "requeue", Currency::EUR, "1000.00");
    diesel::sql_query("ANALYZE payouts").execute(&mut conn).unwrap();
    let ids = backlog(&mut conn, account.get(), BACKLOG);
    debit(&mut conn, &ids);
    let claim = payouts::claim_due(&mut conn, ROUND as i64, 60_000).unwrap();
    assert_eq!(claim.requests.len(), ROUND);
    let verdicts: Vec<_> = claim
        .requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let verdict = match i % 3 {
                0 => Verdict::NotSent,
                1 => Verdict::Unknown { error: "timeout".into() },
                _ => Verdict::Unauthorized { error: "HTTP 401".into() },
            };
            (r.clone(), verdict)
        })
        .collect();
    let (recorded, (seq, idx)) = ledger_core::tx::transaction(&mut conn, &TxOptions::default(), |tx| {
        // Twice (half each), counting the second: the plans cached by the first are reused.
        let mut recorded = payouts::record_all_tx(tx, &verdicts[..ROUND / 2], &RetryPolicy::PAYOUTS)?;
        let before = reads(tx.conn(), "payouts");
        recorded.extend(payouts::record_all_tx(tx, &verdicts[ROUND / 2..], &RetryPolicy::PAYOUTS)?);
        let after = reads(tx.conn(), "payouts");
        Ok::<_, ledger_core::LedgerError>((recorded, (after.seq - before.seq, after.idx - before.idx)))
    })
    .unwrap();
    assert!(recorded.iter().all(|r| matches!(r, Recorded::Released | Recorded::Retrying)), "{recorded:?}");
    // Each payout is read by its lock and by its update; the backlog would be
    // BACKLOG rows per statement.
    assert!(
        seq + idx <= 4 * (ROUND / 2) as i64,
        "putting {} payouts back read {seq} rows of payouts by sequential scans and {idx} by index scans \
         ({BACKLOG} paying out)",
        ROUND / 2
    );
    assert_eq!(seq, 0, "no sequential scan of payouts");
}

/// Debits `ids` (a thousand per batch).
fn debit(conn: &mut PgConnection, ids: &[WithdrawalId]) {
    for chunk in ids.chunks(1_000) {
        ledger_core::tx::transaction(conn, &TxOptions::default(), |tx| withdrawals::process_batch_fast_tx(tx, chunk))
            .unwrap();
    }
}

/// The claimer's sweep for due jobs reads the pending partial index, not the history:
/// its plan is generic inside `with_batch_plans`, so the status must be in its text.
#[testing::test]
fn the_sweep_for_due_jobs_reads_the_pending_jobs_not_every_withdrawal_ever_made() {
    const HISTORY: i64 = 5_000;
    let db = testing::committed();
    let mut conn = db.conn();
    let account = testing::funded_account(&mut conn, "sweep", Currency::EUR, "1000.00");
    let old = backlog(&mut conn, account.get(), HISTORY);
    // On another connection: a backend's table counters (read below) keep what its
    // earlier transactions did until they are flushed, and this update reads them all.
    diesel::sql_query(
        "UPDATE withdrawals SET status = 'rejected', reason = 'history', finished_at = now() WHERE id <= $1",
    )
    .bind::<BigInt, _>(old.last().unwrap().get())
    .execute(&mut db.conn())
    .unwrap();
    let pending: Vec<i64> = (0..3)
        .map(|i| {
            withdrawals::request(&mut conn, &common::withdrawal(account, "0.01", &format!("due-{i}"))).unwrap().0.get()
        })
        .collect();
    diesel::sql_query("VACUUM ANALYZE withdrawals").execute(&mut conn).unwrap();
    let (claimed, read) = ledger_core::tx::transaction(&mut conn, &TxOptions::default(), |tx| {
        let mut claimed = vec![];
        // Several times: a cached plan is reused from the second call on.
        for _ in 0..6 {
            claimed = withdrawals::claim_due(tx.conn(), 100, &[])?;
        }
        Ok::<_, ledger_core::LedgerError>((claimed, reads(tx.conn(), "withdrawals")))
    })
    .unwrap();
    let claimed: Vec<i64> = claimed.iter().map(|(w, _)| w.get()).collect();
    assert_eq!(claimed, pending);
    assert!(
        read.seq + read.idx <= 6 * 3 * 2,
        "six sweeps over 3 pending jobs read {} rows by sequential scans and {} by index scans \
         (a history of {HISTORY})",
        read.seq,
        read.idx
    );
}

fn settings(conn: &mut PgConnection) -> Settings {
    ledger_core::tx::planner_settings(conn).unwrap()
}

#[testing::test]
fn batch_plans_leave_the_callers_planner_settings_as_they_were() {
    let db = testing::committed();
    let mut conn = db.conn();
    let account = testing::funded_account(&mut conn, "settings", Currency::EUR, "10.00");
    let ids = backlog(&mut conn, account.get(), 2);
    let (inside, after) = ledger_core::tx::transaction(&mut conn, &TxOptions::default(), |tx| {
        // The caller's own choices, some of them the opposite of the batch's.
        diesel::sql_query("SET LOCAL enable_hashjoin = off").execute(tx.conn())?;
        diesel::sql_query("SET LOCAL enable_mergejoin = on").execute(tx.conn())?;
        let before = settings(tx.conn());
        let inside = ledger_core::tx::with_batch_plans(tx, |tx| Ok(settings(tx.conn())))?;
        withdrawals::process_batch_fast_tx(tx, &ids)?;
        let after = settings(tx.conn());
        assert_eq!(after, before, "restored after with_batch_plans and after a batch");
        Ok::<_, ledger_core::LedgerError>((inside, after))
    })
    .unwrap();
    assert_eq!(
        inside,
        Settings {
            jit: "off".into(),
            seqscan: "off".into(),
            bitmapscan: "off".into(),
            hashjoin: "off".into(),
            mergejoin: "off".into(),
            plan_cache: "force_generic_plan".into()
        }
    );
    assert_eq!((after.hashjoin.as_str(), after.mergejoin.as_str()), ("off", "on"));
    assert_eq!(after.plan_cache, "auto", "generic plans only inside with_batch_plans");
    // SET LOCAL ends with the transaction: the session is back to its defaults.
    assert_eq!(settings(&mut conn).hashjoin, "on");
}
