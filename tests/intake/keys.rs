//! Keys left without a result (a refused `_tx` call whose caller committed anyway) are
//! free, as in `idempotency::begin`: a batch takes them over, whatever operation left
//! them, and the single path then replays what the batch made.

use diesel::connection::SimpleConnection;
use ledger_core::deposits::{self, DepositResult};
use ledger_core::withdrawals::{self, RequestResult, WithdrawalRequest};

use super::common::{assert_audit_clean, balance, withdrawal};
use super::*;

fn leave_behind(conn: &mut diesel::pg::PgConnection, key: &IdempotencyKey, operation: &str) {
    conn.batch_execute(&format!(
        "INSERT INTO idempotency_keys (key, operation, request_fingerprint) VALUES ('{key}', '{operation}', 'refused')"
    ))
    .unwrap();
}

#[testing::test]
fn keys_without_a_result_are_taken_over_by_a_batch() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "10.00");
    let (dk, wk) = (testing::key("left-dep"), testing::key("left-wd"));
    leave_behind(&mut conn, &dk, "transfer");
    leave_behind(&mut conn, &wk, "deposit");
    let results = deposits::create_batch(&mut conn, &[Item::single(dep(a, "1.00", &dk))]).unwrap();
    let DepositResult::Created { entry, balance_minor: 1_100 } = results[0] else { panic!("{:?}", results[0]) };
    let replay = deposits::deposit(&mut conn, &dep(a, "1.00", &dk)).unwrap();
    assert!(replay.replayed && replay.entry == entry, "{replay:?}");
    let req = WithdrawalRequest { key: wk, ..withdrawal(a, "2.00", "unused") };
    let results = withdrawals::request_batch(&mut conn, &[Item::single(req.clone())]).unwrap();
    let RequestResult::Created { id } = results[0] else { panic!("{:?}", results[0]) };
    assert_eq!(withdrawals::request(&mut conn, &req).unwrap(), (id, true));
    assert_eq!(balance(&mut conn, a), 1_100);
    assert_audit_clean(&mut conn);
}
