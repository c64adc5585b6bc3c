//! Payouts that may have been paid: returned only after a lookup or when forced, and never while a call may still run.

use super::*;

#[testing::test]
fn a_payout_that_may_have_been_paid_is_returned_only_after_a_lookup_or_when_forced() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "payee", Currency::EUR, "100.00");

    // The lookup cannot tell: nothing happens, and the message says what to do.
    let (w1, p1) = failed_payout(&mut conn, a, "10.00");
    let before = testing::snapshot(&mut conn);
    let unclear = Lookups(LookupOutcome::Unknown { error: "HTTP 502".into() });
    let err = payouts::return_failed(&mut conn, p1, "give up", ReturnAuthority::Lookup(&unclear)).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(testing::snapshot(&mut conn), before, "a refused return changes nothing");

    // The gateway says it paid: settled, nothing returned.
    let paid = Lookups(LookupOutcome::Accepted { reference: Some("late-yes".into()) });
    let result = payouts::return_failed(&mut conn, p1, "give up", ReturnAuthority::Lookup(&paid)).unwrap();
    assert!(matches!(result, ReturnResult::SettledInstead(ref p) if p.status == PayoutStatus::Settled), "{result:?}");
    assert_eq!(withdrawals::get(&mut conn, w1).unwrap().status, WithdrawalStatus::Completed);
    assert_eq!(balance(&mut conn, a), 9_000, "paid money is not refunded");

    // The gateway says it refused: returned.
    let (w2, p2) = failed_payout(&mut conn, a, "20.00");
    let no = Lookups(LookupOutcome::Rejected { reason: "account closed".into() });
    assert!(matches!(
        payouts::return_failed(&mut conn, p2, "refused", ReturnAuthority::Lookup(&no)).unwrap(),
        ReturnResult::Returned(_)
    ));
    assert_eq!(withdrawals::get(&mut conn, w2).unwrap().status, WithdrawalStatus::Returned);
    assert_eq!(balance(&mut conn, a), 9_000);

    // Forced: returned without asking, and recorded as forced with the reason.
    let (_w3, p3) = failed_payout(&mut conn, a, "30.00");
    assert!(
        payouts::return_failed(&mut conn, p3, "x", ReturnAuthority::Force { reason: " " }).is_err(),
        "a forced return needs a reason"
    );
    let forced = payouts::return_failed(
        &mut conn,
        p3,
        "operator",
        ReturnAuthority::Force { reason: "bank confirmed by phone: not paid" },
    )
    .unwrap();
    let ReturnResult::Returned(p) = forced else { panic!("{forced:?}") };
    assert_eq!(p.forced_return_reason.as_deref(), Some("bank confirmed by phone: not paid"));
    assert_eq!(balance(&mut conn, a), 9_000);
    assert_audit_clean(&mut conn);
}

/// A gateway whose lookup runs `during` (another party acting meanwhile) and then says
/// the payout was never received.
struct LookupWhile<F: Fn() + Send + Sync>(F);

impl<F: Fn() + Send + Sync> PayoutGateway for LookupWhile<F> {
    fn send(&self, r: &PayoutRequest) -> SendOutcome {
        panic!("an operator's return never sends ({})", r.idempotency_key)
    }
    fn lookup(&self, _: &PayoutRequest) -> LookupOutcome {
        (self.0)();
        LookupOutcome::NotFound
    }
}

#[testing::test]
fn a_return_is_refused_when_the_payout_was_sent_again_during_its_lookup() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "payee", Currency::EUR, "100.00");
    let (w, p) = failed_payout(&mut conn, a, "10.00");
    let before = balance(&mut conn, a);
    // While the operator's lookup runs: another operator retries the payout, a dispatcher
    // sends it, the answer is lost and it fails again (one attempt allowed).
    let url = db.url().to_string();
    let meanwhile = LookupWhile(move || {
        let mut other = ledger_core::db::connect(&url, &Default::default()).unwrap();
        payouts::retry(&mut other, p).unwrap();
        let req = claim_one_leased(&mut other, w, 1);
        let once = RetryPolicy { max_attempts: 1, backoff: Backoff::new(1, 1, Jitter::Half) };
        let lost = Verdict::Unknown { error: "timeout after sending".into() };
        assert_eq!(payouts::record(&mut other, &req, &lost, &once).unwrap(), Recorded::Failed);
    });
    let err = payouts::return_failed(&mut conn, p, "give up", ReturnAuthority::Lookup(&meanwhile)).unwrap_err();
    assert!(err.to_string().contains("sent again"), "{err}");
    assert_eq!(balance(&mut conn, a), before, "nothing returned: the new call may have paid");
    assert_eq!(withdrawals::get(&mut conn, w).unwrap().status, WithdrawalStatus::PayingOut);
    assert_audit_clean(&mut conn);
}

#[testing::test]
fn a_return_waits_for_the_last_calls_lease_to_end() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "payee", Currency::EUR, "100.00");
    let w = withdrawals::withdraw(&mut conn, &withdrawal(a, "10.00", "lease")).unwrap().id;
    let req = claim_one(&mut conn, w); // a 60 s lease: its call may still be at work
    let once = RetryPolicy { max_attempts: 1, backoff: Backoff::new(1, 1, Jitter::Half) };
    let lost = Verdict::Unknown { error: "timeout".into() };
    assert_eq!(payouts::record(&mut conn, &req, &lost, &once).unwrap(), Recorded::Failed);
    let never = Lookups(LookupOutcome::NotFound);
    let pid = ledger_core::PayoutId::new(req.payout.get()).unwrap();
    let err = payouts::return_failed(&mut conn, pid, "give up", ReturnAuthority::Lookup(&never)).unwrap_err();
    assert!(err.to_string().contains("in flight"), "{err}");
    assert_eq!(balance(&mut conn, a), 9_000);
}
