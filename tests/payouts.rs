//! Two-phase payouts in ledger-core: settle, return, retry, leases, operator actions.

mod common;

use std::time::Duration;

use common::{assert_audit_clean, balance, withdrawal};
use diesel::pg::PgConnection;
use ledger_core::accounts::{self, SystemRole};
use ledger_core::payouts::{self, GatewayOutcome, PayoutStatus, Recorded, RetryPolicy};
use ledger_core::withdrawals::{self, WithdrawalStatus};
use ledger_core::{testing, AccountId, Currency, WithdrawalId};

fn system_balance(conn: &mut PgConnection, role: SystemRole) -> i64 {
    let id = accounts::system_account(conn, role, Currency::EUR).unwrap();
    balance(conn, id)
}

/// A customer with `funds` and one processed withdrawal of `amount`; returns both ids.
fn paying_out(conn: &mut PgConnection, funds: &str, amount: &str) -> (AccountId, WithdrawalId) {
    let a = testing::funded_account(conn, "payee", Currency::EUR, funds);
    let w = withdrawals::withdraw(conn, &withdrawal(a, amount, "po")).unwrap();
    assert_eq!(w.status(), WithdrawalStatus::PayingOut);
    (a, WithdrawalId::new(w.id).unwrap())
}

fn claim_one(conn: &mut PgConnection, w: WithdrawalId) -> payouts::PayoutRequest {
    let claimed = payouts::claim_due(conn, 100, 60_000).unwrap();
    claimed.into_iter().find(|r| r.withdrawal == w).expect("the payout is due")
}

#[test]
fn an_accepted_payout_settles_into_external_settlement_and_completes_the_withdrawal() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (a, w) = paying_out(&mut conn, "100.00", "40.00");
    assert_eq!(system_balance(&mut conn, SystemRole::PayoutsInTransit), 4_000, "held, not gone");
    let req = claim_one(&mut conn, w);
    assert_eq!((req.amount.as_str(), req.attempt), ("40.00", 1));
    assert_eq!(req.idempotency_key, payouts::payout_key(w));
    let rec = payouts::record(
        &mut conn,
        &req,
        &GatewayOutcome::Accepted { reference: Some("bank-1".into()) },
        &RetryPolicy::default(),
    )
    .unwrap();
    assert!(matches!(rec, Recorded::Settled { .. }));
    assert_eq!(withdrawals::get(&mut conn, w).unwrap().status(), WithdrawalStatus::Completed);
    let p = payouts::for_withdrawal(&mut conn, w).unwrap().unwrap();
    assert_eq!((p.status(), p.gateway_reference.as_deref()), (PayoutStatus::Settled, Some("bank-1")));
    assert_eq!(system_balance(&mut conn, SystemRole::PayoutsInTransit), 0);
    assert_eq!(system_balance(&mut conn, SystemRole::ExternalSettlement), 4_000);
    assert_eq!(balance(&mut conn, a), 6_000);
    assert_audit_clean(&mut conn);
}

#[test]
fn a_final_rejection_returns_the_funds_with_a_compensating_entry() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (a, w) = paying_out(&mut conn, "100.00", "100.00");
    // The customer closes the emptied account meanwhile: returned money still reaches it.
    accounts::close(&mut conn, a).unwrap();
    let req = claim_one(&mut conn, w);
    let rec = payouts::record(
        &mut conn,
        &req,
        &GatewayOutcome::Rejected { reason: "HTTP 422: account closed at the bank".into() },
        &RetryPolicy::default(),
    )
    .unwrap();
    assert!(matches!(rec, Recorded::Returned { .. }));
    let wd = withdrawals::get(&mut conn, w).unwrap();
    assert_eq!(wd.status(), WithdrawalStatus::Returned);
    assert!(wd.reason.unwrap().contains("account closed at the bank"));
    assert_eq!(balance(&mut conn, a), 10_000, "every cent is back");
    let kinds: Vec<String> =
        ledger_core::journal::statement(&mut conn, a, 10).unwrap().into_iter().map(|l| l.kind).collect();
    assert_eq!(kinds, vec!["deposit", "withdrawal", "payout_return"]);
    assert_eq!(system_balance(&mut conn, SystemRole::PayoutsInTransit), 0);
    assert_audit_clean(&mut conn);
}

#[test]
fn transient_failures_back_off_then_fail_and_an_operator_can_retry_or_return() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (a, w) = paying_out(&mut conn, "50.00", "10.00");
    let policy = RetryPolicy { max_attempts: 3, base_ms: 1, max_backoff_ms: 5 };
    let down = GatewayOutcome::Transient { error: "HTTP 503: maintenance".into() };
    let mut results = vec![];
    while results.last() != Some(&Recorded::Failed) {
        assert!(results.len() < 3, "{results:?}");
        let mut req = None;
        testing::wait_until(Duration::from_secs(5), || {
            req = payouts::claim_due(&mut conn, 10, 60_000).unwrap().into_iter().find(|r| r.withdrawal == w);
            req.is_some()
        });
        results.push(payouts::record(&mut conn, &req.unwrap(), &down, &policy).unwrap());
    }
    assert_eq!(results, vec![Recorded::Retrying, Recorded::Retrying, Recorded::Failed]);
    let p = payouts::for_withdrawal(&mut conn, w).unwrap().unwrap();
    assert_eq!(
        (p.status(), p.attempts, p.last_error.as_deref()),
        (PayoutStatus::Failed, 3, Some("HTTP 503: maintenance"))
    );
    assert_eq!(withdrawals::get(&mut conn, w).unwrap().status(), WithdrawalStatus::PayingOut, "still held");
    assert_audit_clean(&mut conn);

    // Operator: send it again; this time the bank accepts.
    let pid = ledger_core::PayoutId::new(p.id).unwrap();
    assert_eq!(payouts::retry(&mut conn, pid).unwrap().status(), PayoutStatus::Pending);
    let req = claim_one(&mut conn, w);
    assert_eq!(req.attempt, 1, "attempts start over");
    payouts::record(&mut conn, &req, &GatewayOutcome::Accepted { reference: None }, &policy).unwrap();
    assert_eq!(withdrawals::get(&mut conn, w).unwrap().status(), WithdrawalStatus::Completed);
    assert!(payouts::retry(&mut conn, pid).is_err(), "only failed payouts can be retried");
    assert!(payouts::return_failed(&mut conn, pid, "no").is_err(), "a settled payout cannot be returned");

    // Another one that fails, and the operator returns the money instead.
    let w2 = WithdrawalId::new(withdrawals::withdraw(&mut conn, &withdrawal(a, "5.00", "po2")).unwrap().id).unwrap();
    let once = RetryPolicy { max_attempts: 1, ..policy };
    let req = claim_one(&mut conn, w2);
    assert_eq!(payouts::record(&mut conn, &req, &down, &once).unwrap(), Recorded::Failed);
    let p2 = payouts::for_withdrawal(&mut conn, w2).unwrap().unwrap();
    let before = balance(&mut conn, a);
    payouts::return_failed(&mut conn, ledger_core::PayoutId::new(p2.id).unwrap(), "bank unreachable for days").unwrap();
    assert_eq!(balance(&mut conn, a), before + 500);
    assert_eq!(withdrawals::get(&mut conn, w2).unwrap().status(), WithdrawalStatus::Returned);
    assert_audit_clean(&mut conn);
}

#[test]
fn a_claimed_payout_is_leased_and_a_stale_answer_is_not_recorded() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (_a, w) = paying_out(&mut conn, "50.00", "10.00");
    let first = payouts::claim_due(&mut conn, 10, 1).unwrap().into_iter().find(|r| r.withdrawal == w).unwrap();
    // With a 60 s lease nobody else could claim it; this one was 1 ms, so after it runs
    // out a second dispatcher takes the payout over (attempt 2).
    let mut second = None;
    testing::wait_until(Duration::from_secs(5), || {
        second = payouts::claim_due(&mut conn, 10, 60_000).unwrap().into_iter().find(|r| r.withdrawal == w);
        second.is_some()
    });
    let second = second.unwrap();
    assert_eq!((first.attempt, second.attempt), (1, 2));
    assert!(payouts::claim_due(&mut conn, 10, 60_000).unwrap().iter().all(|r| r.withdrawal != w), "leased");
    let ok = GatewayOutcome::Accepted { reference: None };
    assert_eq!(payouts::record(&mut conn, &first, &ok, &RetryPolicy::default()).unwrap(), Recorded::Superseded);
    assert!(matches!(
        payouts::record(&mut conn, &second, &ok, &RetryPolicy::default()).unwrap(),
        Recorded::Settled { .. }
    ));
    assert_eq!(payouts::record(&mut conn, &second, &ok, &RetryPolicy::default()).unwrap(), Recorded::Superseded);
    assert_audit_clean(&mut conn);
}
