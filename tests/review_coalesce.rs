//! Adversarial review (wt-review, H4) of the Coalescer on main: what a caller hears
//! when its group committed but the connection is lost before its answer was read.

mod common;

use std::thread;
use std::time::Duration;

use common::{assert_audit_clean, balance, transfer};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use ledger_core::transfers::{self, Coalescer, CoalescerConfig, SubmitError};
use ledger_core::Currency;
use ledger_testdb as testing;

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

/// A replayed transfer in a group: the group commits (it writes nothing), then the
/// committer reads the replay's receipt on the same connection, and that connection is
/// lost. The transfer stands (it was committed earlier), so the caller must not hear a
/// definite failure: a receipt, or "outcome unknown" (retry with the same key).
#[testing::test]
fn a_replay_whose_receipt_read_loses_its_connection_is_not_answered_as_a_definite_failure() {
    let db = testing::committed();
    let mut setup = db.conn();
    let a = testing::funded_account(&mut setup, "a", Currency::EUR, "10.00");
    let b = testing::funded_account(&mut setup, "b", Currency::EUR, "0.00");
    let tr = transfer(a, b, "1.00", &testing::key("h4-replay"));
    transfers::transfer(&mut setup, &tr).unwrap();
    let config = CoalescerConfig { max_batch: 10, queue_capacity: 10, committers: 1, ..CoalescerConfig::default() };
    let c = Coalescer::new(db.pool().clone(), config).unwrap();
    let mut holder = db.conn();
    let holder_pid = testing::backend_pid(&mut holder);
    holder.batch_execute("BEGIN; LOCK TABLE postings IN ACCESS EXCLUSIVE MODE").unwrap();
    let answer = thread::scope(|s| {
        let caller = s.spawn(|| c.submit(&tr));
        let mut observer = db.conn();
        let mut victim = None;
        testing::wait_until(Duration::from_secs(20), || {
            let sql = "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))";
            let rows: Vec<Pid> =
                diesel::sql_query(sql).bind::<diesel::sql_types::Integer, _>(holder_pid).load(&mut observer).unwrap();
            victim = rows.first().map(|p| p.pid);
            victim.is_some()
        });
        observer.batch_execute(&format!("SELECT pg_terminate_backend({})", victim.unwrap())).unwrap();
        holder.batch_execute("COMMIT").unwrap();
        caller.join().unwrap()
    });
    match &answer {
        Ok(receipt) => assert!(receipt.replayed),
        Err(SubmitError::OutcomeUnknown(_)) => {}
        Err(other) => panic!("a committed transfer answered as a definite failure: {other:?} ({})", other.code()),
    }
    assert_eq!(balance(&mut setup, b), 100, "moved once");
    assert_audit_clean(&mut setup);
}
