//! Two-phase payouts in ledger-core: settle, return, retry, leases, operator actions.

mod common;

use std::time::Duration;

use common::{assert_audit_clean, balance, withdrawal};
use diesel::pg::PgConnection;
use ledger_core::accounts::{self, SystemRole};
use ledger_core::payouts::{
    self, LookupOutcome, PayoutGateway, PayoutRequest, PayoutStatus, Recorded, RetryPolicy, ReturnAuthority,
    ReturnResult, SendOutcome, Verdict,
};
use ledger_core::retry::{Backoff, Jitter};
use ledger_core::withdrawals::{self, WithdrawalStatus};
use ledger_core::{AccountId, Currency, WithdrawalId};
use ledger_testdb as testing;

fn system_balance(conn: &mut PgConnection, role: SystemRole) -> i64 {
    let id = accounts::system_account(conn, role, Currency::EUR).unwrap();
    balance(conn, id)
}

/// A customer with `funds` and one processed withdrawal of `amount`; returns both ids.
fn paying_out(conn: &mut PgConnection, funds: &str, amount: &str) -> (AccountId, WithdrawalId) {
    let a = testing::funded_account(conn, "payee", Currency::EUR, funds);
    let w = withdrawals::withdraw(conn, &withdrawal(a, amount, "po")).unwrap();
    assert_eq!(w.status, WithdrawalStatus::PayingOut);
    (a, w.id)
}

fn claim_one(conn: &mut PgConnection, w: WithdrawalId) -> payouts::PayoutRequest {
    claim_one_leased(conn, w, 60_000)
}

/// Claims `w`'s payout with a lease of `lease_ms` (a short one ends at once, as if the
/// claim's last call was long over).
fn claim_one_leased(conn: &mut PgConnection, w: WithdrawalId, lease_ms: u64) -> payouts::PayoutRequest {
    let claimed = payouts::claim_due(conn, 100, lease_ms).unwrap();
    if lease_ms < 100 {
        std::thread::sleep(Duration::from_millis(lease_ms + 5)); // let the short lease end
    }
    claimed.requests.into_iter().find(|r| r.withdrawal == w).expect("the payout is due")
}

#[testing::test]
fn an_accepted_payout_settles_into_external_settlement_and_completes_the_withdrawal() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (a, w) = paying_out(&mut conn, "100.00", "40.00");
    assert_eq!(system_balance(&mut conn, SystemRole::PayoutsInTransit), 4_000, "held, not gone");
    let req = claim_one(&mut conn, w);
    assert_eq!((req.amount.as_str(), req.attempt), ("40.00", 1));
    let instance = payouts::instance_id(&mut conn).unwrap();
    assert_eq!(instance.len(), 32, "a random 128-bit instance id, in hex");
    assert_eq!(req.idempotency_key, format!("payout-{instance}-w{w}"), "the key names this ledger and the withdrawal");
    assert_eq!((req.possibly_sent, req.token > 0), (false, true), "a first claim, under a fencing token");
    let rec =
        payouts::record(&mut conn, &req, &Verdict::Paid { reference: Some("bank-1".into()) }, &RetryPolicy::PAYOUTS)
            .unwrap();
    assert_eq!(rec, Recorded::Settled);
    assert_eq!(withdrawals::get(&mut conn, w).unwrap().status, WithdrawalStatus::Completed);
    let p = payouts::for_withdrawal(&mut conn, w).unwrap().unwrap();
    assert_eq!((p.status, p.gateway_reference.as_deref()), (PayoutStatus::Settled, Some("bank-1")));
    assert_eq!(system_balance(&mut conn, SystemRole::PayoutsInTransit), 0);
    assert_eq!(system_balance(&mut conn, SystemRole::ExternalSettlement), 4_000);
    assert_eq!(balance(&mut conn, a), 6_000);
    assert_audit_clean(&mut conn);
}

#[testing::test]
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
        &Verdict::Refused { reason: "HTTP 422: account closed at the bank".into() },
        &RetryPolicy::PAYOUTS,
    )
    .unwrap();
    assert!(matches!(rec, Recorded::Returned { .. }));
    let wd = withdrawals::get(&mut conn, w).unwrap();
    assert_eq!(wd.status, WithdrawalStatus::Returned);
    assert!(wd.reason.unwrap().contains("account closed at the bank"));
    assert_eq!(balance(&mut conn, a), 10_000, "every cent is back");
    use ledger_core::journal::EntryKind;
    let kinds: Vec<EntryKind> =
        ledger_core::journal::statement(&mut conn, a, 10).unwrap().into_iter().map(|l| l.kind).collect();
    assert_eq!(kinds, vec![EntryKind::Deposit, EntryKind::Withdrawal, EntryKind::PayoutReturn]);
    assert_eq!(system_balance(&mut conn, SystemRole::PayoutsInTransit), 0);
    assert_audit_clean(&mut conn);
}

#[testing::test]
fn transient_failures_back_off_then_fail_and_an_operator_can_retry_or_return() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (a, w) = paying_out(&mut conn, "50.00", "10.00");
    let policy = RetryPolicy { max_attempts: 3, backoff: Backoff::new(1, 5, Jitter::Half) };
    let down = Verdict::Unknown { error: "HTTP 503: maintenance".into() };
    let mut results = vec![];
    while results.last() != Some(&Recorded::Failed) {
        assert!(results.len() < 3, "{results:?}");
        let mut req = None;
        testing::wait_until(Duration::from_secs(5), || {
            // A 1 ms lease: an unknown outcome is due again only once its lease is over.
            req = payouts::claim_due(&mut conn, 10, 1).unwrap().requests.into_iter().find(|r| r.withdrawal == w);
            req.is_some()
        });
        results.push(payouts::record(&mut conn, &req.unwrap(), &down, &policy).unwrap());
    }
    assert_eq!(results, vec![Recorded::Retrying, Recorded::Retrying, Recorded::Failed]);
    let p = payouts::for_withdrawal(&mut conn, w).unwrap().unwrap();
    assert_eq!(
        (p.status, p.attempts, p.last_error.as_deref()),
        (PayoutStatus::Failed, 3, Some("HTTP 503: maintenance"))
    );
    assert_eq!(withdrawals::get(&mut conn, w).unwrap().status, WithdrawalStatus::PayingOut, "still held");
    assert_audit_clean(&mut conn);

    // Operator: send it again; this time the bank accepts.
    let pid = p.id;
    assert_eq!(payouts::retry(&mut conn, pid).unwrap().status, PayoutStatus::Pending);
    let req = claim_one(&mut conn, w);
    assert_eq!(req.attempt, 1, "attempts start over");
    assert!(req.possibly_sent, "earlier calls had unknown outcomes: look it up first");
    payouts::record(&mut conn, &req, &Verdict::Paid { reference: None }, &policy).unwrap();
    assert_eq!(withdrawals::get(&mut conn, w).unwrap().status, WithdrawalStatus::Completed);
    assert!(payouts::retry(&mut conn, pid).is_err(), "only failed payouts can be retried");
    assert!(
        payouts::return_failed(&mut conn, pid, "no", ReturnAuthority::Force { reason: "test" }).is_err(),
        "a settled payout cannot be returned"
    );

    // Another one that fails, and the operator returns the money instead.
    let w2 = withdrawals::withdraw(&mut conn, &withdrawal(a, "5.00", "po2")).unwrap().id;
    let once = RetryPolicy { max_attempts: 1, ..policy };
    let req = claim_one_leased(&mut conn, w2, 1);
    assert_eq!(payouts::record(&mut conn, &req, &down, &once).unwrap(), Recorded::Failed);
    let p2 = payouts::for_withdrawal(&mut conn, w2).unwrap().unwrap();
    let before = balance(&mut conn, a);
    let never_received = Lookups(LookupOutcome::NotFound);
    let returned =
        payouts::return_failed(&mut conn, p2.id, "bank unreachable for days", ReturnAuthority::Lookup(&never_received))
            .unwrap();
    assert!(matches!(returned, ReturnResult::Returned(ref p) if p.forced_return_reason.is_none()), "{returned:?}");
    assert_eq!(balance(&mut conn, a), before + 500);
    assert_eq!(withdrawals::get(&mut conn, w2).unwrap().status, WithdrawalStatus::Returned);
    assert_audit_clean(&mut conn);
}

#[testing::test]
fn a_claimed_payout_is_leased_and_a_stale_answer_is_not_recorded() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (_a, w) = paying_out(&mut conn, "50.00", "10.00");
    let first = payouts::claim_due(&mut conn, 10, 1).unwrap().requests.into_iter().find(|r| r.withdrawal == w).unwrap();
    // With a 60 s lease nobody else could claim it; this one was 1 ms, so after it runs
    // out a second dispatcher takes the payout over (attempt 2).
    let mut second = None;
    testing::wait_until(Duration::from_secs(5), || {
        second = payouts::claim_due(&mut conn, 10, 60_000).unwrap().requests.into_iter().find(|r| r.withdrawal == w);
        second.is_some()
    });
    let second = second.unwrap();
    assert_eq!((first.attempt, second.attempt), (1, 2));
    assert!(second.token > first.token, "a newer claim, a newer token");
    assert!(second.possibly_sent, "the first claim may have called the gateway: the second looks it up first");
    assert!(payouts::claim_due(&mut conn, 10, 60_000).unwrap().requests.iter().all(|r| r.withdrawal != w), "leased");
    let ok = Verdict::Paid { reference: None };
    assert_eq!(payouts::record(&mut conn, &first, &ok, &RetryPolicy::PAYOUTS).unwrap(), Recorded::Superseded);
    assert_eq!(payouts::record(&mut conn, &second, &ok, &RetryPolicy::PAYOUTS).unwrap(), Recorded::Settled);
    assert_eq!(payouts::record(&mut conn, &second, &ok, &RetryPolicy::PAYOUTS).unwrap(), Recorded::Superseded);
    assert_audit_clean(&mut conn);
}

/// A gateway that must not be asked to send, and answers every lookup the same way.
struct Lookups(LookupOutcome);

impl PayoutGateway for Lookups {
    fn send(&self, r: &PayoutRequest) -> SendOutcome {
        panic!("an operator's return never sends ({})", r.idempotency_key)
    }
    fn lookup(&self, _: &PayoutRequest) -> LookupOutcome {
        self.0.clone()
    }
}

/// A withdrawal whose payout ended `failed` after calls with unknown outcomes.
fn failed_payout(conn: &mut PgConnection, a: AccountId, amount: &str) -> (WithdrawalId, ledger_core::PayoutId) {
    let w = withdrawals::withdraw(conn, &withdrawal(a, amount, "fp")).unwrap().id;
    let req = claim_one_leased(conn, w, 1);
    let once = RetryPolicy { max_attempts: 1, backoff: Backoff::new(1, 1, Jitter::Half) };
    let timeout = Verdict::Unknown { error: "timeout after sending".into() };
    assert_eq!(payouts::record(conn, &req, &timeout, &once).unwrap(), Recorded::Failed);
    (w, ledger_core::PayoutId::new(req.payout.get()).unwrap())
}

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

#[testing::test]
fn fencing_tokens_are_never_reused_so_an_old_claims_answer_is_never_recorded() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "payee", Currency::EUR, "100.00");
    let (w, p) = failed_payout(&mut conn, a, "10.00");
    let old = payouts::for_withdrawal(&mut conn, w).unwrap().unwrap();
    let old_token = old.claim_token.expect("a failed payout keeps its last claim's token");
    // The operator retries: attempts start over, but the token does not go back.
    payouts::retry(&mut conn, p).unwrap();
    let again = claim_one(&mut conn, w);
    assert_eq!(again.attempt, 1);
    assert!(again.token > old_token, "a new claim, a new token: they never go back");
    let stale = PayoutRequest { token: old_token, ..again.clone() };
    let paid = Verdict::Paid { reference: None };
    assert_eq!(payouts::record(&mut conn, &stale, &paid, &RetryPolicy::PAYOUTS).unwrap(), Recorded::Superseded);
    assert_eq!(payouts::record(&mut conn, &again, &paid, &RetryPolicy::PAYOUTS).unwrap(), Recorded::Settled);
    assert_audit_clean(&mut conn);
}

#[testing::test]
fn one_transaction_records_a_mixed_batch_of_verdicts() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "payee", Currency::EUR, "100.00");
    let b = testing::funded_account(&mut conn, "payee2", Currency::EUR, "100.00");
    let ws: Vec<WithdrawalId> = [(a, "1.00"), (b, "2.00"), (a, "3.00"), (b, "4.00"), (a, "5.00"), (b, "6.00")]
        .iter()
        .enumerate()
        .map(|(i, (acc, amt))| withdrawals::withdraw(&mut conn, &withdrawal(*acc, amt, &format!("mix{i}"))).unwrap().id)
        .collect();
    let claim = payouts::claim_due(&mut conn, 100, 60_000).unwrap();
    let by_w = |w: WithdrawalId| claim.requests.iter().find(|r| r.withdrawal == w).unwrap().clone();
    let verdicts = vec![
        (by_w(ws[0]), Verdict::Paid { reference: Some("r0".into()) }),
        (by_w(ws[1]), Verdict::Paid { reference: None }),
        (by_w(ws[2]), Verdict::Refused { reason: "HTTP 422".into() }),
        (by_w(ws[3]), Verdict::Unknown { error: "timeout".into() }),
        (by_w(ws[4]), Verdict::NotSent),
        (PayoutRequest { token: 0, ..by_w(ws[5]) }, Verdict::Paid { reference: None }),
    ];
    let recorded = payouts::record_all(&mut conn, &verdicts, &RetryPolicy::PAYOUTS).unwrap();
    assert_eq!(recorded[..2], [Recorded::Settled, Recorded::Settled]);
    assert!(matches!(recorded[2], Recorded::Returned { .. }));
    assert_eq!(recorded[3..], [Recorded::Retrying, Recorded::Released, Recorded::Superseded]);
    let status = |conn: &mut PgConnection, w| withdrawals::get(conn, w).unwrap().status;
    assert_eq!(status(&mut conn, ws[0]), WithdrawalStatus::Completed);
    assert_eq!(status(&mut conn, ws[1]), WithdrawalStatus::Completed);
    assert_eq!(status(&mut conn, ws[2]), WithdrawalStatus::Returned);
    for w in &ws[3..] {
        assert_eq!(status(&mut conn, *w), WithdrawalStatus::PayingOut);
    }
    let released = payouts::for_withdrawal(&mut conn, ws[4]).unwrap().unwrap();
    assert!(!released.possibly_sent && released.claim_token.is_none(), "given back unsent: {released:?}");
    let unknown = payouts::for_withdrawal(&mut conn, ws[3]).unwrap().unwrap();
    assert!(unknown.possibly_sent, "an unknown outcome is looked up before any refund");
    assert_eq!(system_balance(&mut conn, SystemRole::ExternalSettlement), 300);
    assert_eq!(balance(&mut conn, a), 10_000 - 100 - 500, "the refused 3.00 came back");
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

#[testing::test]
fn a_verdict_that_cannot_be_recorded_fails_alone_and_the_rest_of_the_batch_is_recorded() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "payee", Currency::EUR, "100.00");
    let healthy = withdrawals::withdraw(&mut conn, &withdrawal(a, "1.00", "ok")).unwrap().id;
    let broken = withdrawals::withdraw(&mut conn, &withdrawal(a, "2.00", "bad")).unwrap().id;
    // Data a settlement cannot accept: the broken payout's withdrawal is no longer paying out.
    diesel::RunQueryDsl::execute(
        diesel::sql_query(format!("UPDATE withdrawals SET status = 'completed' WHERE id = {broken}")),
        &mut conn,
    )
    .unwrap();
    let claim = payouts::claim_due(&mut conn, 100, 60_000).unwrap();
    let by_w = |w: WithdrawalId| claim.requests.iter().find(|r| r.withdrawal == w).unwrap().clone();
    // A reference with a NUL in it (valid JSON; PostgreSQL refuses it in TEXT).
    let verdicts = vec![
        (by_w(healthy), Verdict::Paid { reference: Some("ref\u{0}-1".into()) }),
        (by_w(broken), Verdict::Paid { reference: None }),
    ];
    let recorded = payouts::record_all(&mut conn, &verdicts, &RetryPolicy::PAYOUTS).unwrap();
    assert_eq!(recorded[0], Recorded::Settled);
    assert!(matches!(&recorded[1], Recorded::Unrecordable { error } if error.contains("inconsistent")), "{recorded:?}");
    let ok = payouts::for_withdrawal(&mut conn, healthy).unwrap().unwrap();
    assert_eq!((ok.status, ok.gateway_reference.as_deref()), (PayoutStatus::Settled, Some("ref-1")));
    let bad = payouts::for_withdrawal(&mut conn, broken).unwrap().unwrap();
    assert_eq!(bad.status, PayoutStatus::Failed, "for an operator, not claimed and failing forever");
    assert!(bad.last_error.unwrap().contains("could not record"));
}

/// A gateway whose calls take `call_ms` and that counts calls for one key in flight at once.
struct SlowGateway {
    call_ms: u64,
    in_flight: std::sync::atomic::AtomicUsize,
    overlaps: std::sync::atomic::AtomicUsize,
    calls: std::sync::atomic::AtomicUsize,
}

impl SlowGateway {
    fn call(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.calls.fetch_add(1, SeqCst);
        if self.in_flight.fetch_add(1, SeqCst) > 0 {
            self.overlaps.fetch_add(1, SeqCst);
        }
        std::thread::sleep(Duration::from_millis(self.call_ms));
        self.in_flight.fetch_sub(1, SeqCst);
    }
}

impl PayoutGateway for SlowGateway {
    fn send(&self, _: &PayoutRequest) -> SendOutcome {
        self.call();
        SendOutcome::Unknown { error: "timeout".into() }
    }
    fn lookup(&self, _: &PayoutRequest) -> LookupOutcome {
        self.call();
        LookupOutcome::Unknown { error: "timeout".into() }
    }
}

/// Two dispatchers 300 ms apart, one payout, calls of 600 ms under a lease of `lease_ms`:
/// returns the calls made and how many overlapped. `guarded` uses the dispatcher's rule (a call starts only if it ends
/// within the lease); unguarded, every call is allowed.
fn two_dispatchers(lease_ms: u64, guarded: bool) -> (usize, usize) {
    use std::sync::atomic::Ordering::SeqCst;
    let db = testing::committed();
    let mut setup = db.conn();
    let (_a, w) = paying_out(&mut setup, "50.00", "10.00");
    let gateway = SlowGateway {
        call_ms: 600,
        in_flight: Default::default(),
        overlaps: Default::default(),
        calls: Default::default(),
    };
    let budget = Duration::from_millis(600 + ledger_core::dispatcher::LEASE_MARGIN_MS);
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        for start_after_ms in [0_u64, 300] {
            let (gateway, barrier, url) = (&gateway, &barrier, db.url().to_string());
            s.spawn(move || {
                let mut conn = ledger_core::db::connect(&url, &Default::default()).unwrap();
                barrier.wait();
                std::thread::sleep(Duration::from_millis(start_after_ms));
                let claim = payouts::claim_due(&mut conn, 10, lease_ms).unwrap();
                let lease_until = claim.lease_until;
                let may_call = move || !guarded || std::time::Instant::now() + budget <= lease_until;
                let verdicts = ledger_core::dispatcher::resolve_all(gateway, &claim.requests, 4, &may_call);
                payouts::record_all(&mut conn, &verdicts, &RetryPolicy::PAYOUTS).unwrap();
            });
        }
    });
    assert!(payouts::for_withdrawal(&mut setup, w).unwrap().is_some());
    (gateway.calls.load(SeqCst), gateway.overlaps.load(SeqCst))
}

#[testing::test]
fn no_call_outlives_its_lease_so_two_dispatchers_never_call_for_one_payout_at_once() {
    // The negative control: without the rule, the second dispatcher claims the payout
    // once the first's lease ran out, while the first's call is still running.
    // A 200 ms lease is shorter than one 600 ms call.
    let (calls, overlaps) = two_dispatchers(200, false);
    assert!(calls >= 2 && overlaps >= 1, "the unguarded run must overlap ({calls} calls, {overlaps} overlaps)");
    // With it, a call that could outlast the lease is never started...
    assert_eq!(two_dispatchers(200, true), (0, 0), "no call could end within the lease, so none was made");
    // ...and with a lease that holds the call, it is made once, and the second dispatcher
    // finds the payout leased.
    assert_eq!(two_dispatchers(2_000, true), (1, 0));
}

/// `n` pending withdrawals of 1.00 each from `a`, not processed yet.
fn requested(conn: &mut PgConnection, a: AccountId, n: usize, prefix: &str) -> Vec<WithdrawalId> {
    (0..n).map(|i| withdrawals::request(conn, &withdrawal(a, "1.00", &format!("{prefix}{i}"))).unwrap().0).collect()
}

#[testing::test]
fn a_batch_can_claim_its_payouts_as_it_queues_them_under_fresh_tokens() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "payee", Currency::EUR, "100.00");
    let ws = requested(&mut conn, a, 3, "handoff");
    let opts = ledger_core::TxOptions::default();
    let (items, claimed) = ledger_core::tx::transaction(&mut conn, &opts, |tx| {
        withdrawals::process_batch_fast_claiming_tx(tx, &ws, 60_000)
    })
    .unwrap();
    assert_eq!(items.len(), 3);
    let lease_left = claimed.lease_until.saturating_duration_since(std::time::Instant::now());
    assert!(
        lease_left <= Duration::from_millis(60_000) && lease_left > Duration::from_millis(50_000),
        "this process's view of the lease ends no later than the database's: {lease_left:?}"
    );
    let claimed = claimed.requests;
    assert_eq!(claimed.iter().map(|r| r.withdrawal).collect::<Vec<_>>(), ws, "one claimed payout per debit, in order");
    let instance = payouts::instance_id(&mut conn).unwrap();
    for r in &claimed {
        assert_eq!((r.attempt, r.possibly_sent, r.amount.as_str()), (1, false, "1.00"), "a first claim: {r:?}");
        assert_eq!(r.idempotency_key, format!("payout-{instance}-w{}", r.withdrawal));
        let p = payouts::for_withdrawal(&mut conn, r.withdrawal).unwrap().unwrap();
        assert_eq!(p.claim_token, Some(r.token), "the row carries the token handed over");
        assert!(p.possibly_sent, "marked possibly sent before any call can be made");
    }
    let tokens: std::collections::BTreeSet<i64> = claimed.iter().map(|r| r.token).collect();
    assert_eq!(tokens.len(), 3, "every claim has its own token");
    assert!(payouts::claim_due(&mut conn, 100, 60_000).unwrap().requests.is_empty(), "leased: nobody else claims them");
    // Recorded like any claim: paid, given back unsent, and a stale answer ignored.
    let paid = Verdict::Paid { reference: None };
    let stale = PayoutRequest { token: claimed[2].token - 1_000_000, ..claimed[2].clone() };
    let recorded = payouts::record_all(
        &mut conn,
        &[(claimed[0].clone(), paid.clone()), (claimed[1].clone(), Verdict::NotSent), (stale, paid.clone())],
        &RetryPolicy::PAYOUTS,
    )
    .unwrap();
    assert_eq!(recorded, vec![Recorded::Settled, Recorded::Released, Recorded::Superseded]);
    let again = payouts::claim_due(&mut conn, 100, 60_000).unwrap();
    assert_eq!(again.requests.len(), 1, "the released one is due at once; the third is still leased");
    assert_eq!(again.requests[0].withdrawal, ws[1]);
    assert!(!again.requests[0].possibly_sent, "given back unsent: no lookup needed");
    assert!(again.requests[0].token > claimed[1].token, "a new claim, a newer token");
    assert_eq!(balance(&mut conn, a), 9_700);
    assert_audit_clean(&mut conn);
}

#[testing::test]
fn payouts_settled_together_share_one_entry_and_the_audit_pairs_it_with_their_sum() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "payee", Currency::EUR, "100.00");
    let ws: Vec<WithdrawalId> = ["1.00", "2.50", "4.00"]
        .iter()
        .enumerate()
        .map(|(i, amt)| withdrawals::withdraw(&mut conn, &withdrawal(a, amt, &format!("sum{i}"))).unwrap().id)
        .collect();
    let claim = payouts::claim_due(&mut conn, 100, 60_000).unwrap();
    let verdicts: Vec<_> = claim.requests.iter().map(|r| (r.clone(), Verdict::Paid { reference: None })).collect();
    let recorded = payouts::record_all(&mut conn, &verdicts, &RetryPolicy::PAYOUTS).unwrap();
    assert_eq!(recorded, vec![Recorded::Settled; 3]);
    let entries: std::collections::BTreeSet<Option<ledger_core::EntryId>> =
        ws.iter().map(|w| payouts::for_withdrawal(&mut conn, *w).unwrap().unwrap().resolution_entry_id).collect();
    assert_eq!(entries.len(), 1, "one settlement entry for the batch: {entries:?}");
    assert_eq!(system_balance(&mut conn, SystemRole::ExternalSettlement), 750, "the entry moves their sum");
    assert_eq!(system_balance(&mut conn, SystemRole::PayoutsInTransit), 0);
    assert_audit_clean(&mut conn);

    // A payout pointing at the wrong entry is caught, on both entries.
    use diesel::RunQueryDsl;
    let entry = entries.into_iter().next().flatten().unwrap();
    let other = withdrawals::get(&mut conn, ws[0]).unwrap().entry_id.unwrap();
    diesel::sql_query(format!("UPDATE payouts SET resolution_entry_id = {other} WHERE withdrawal_id = {}", ws[2]))
        .execute(&mut conn)
        .unwrap();
    let report = ledger_core::audit::run(&mut conn).unwrap();
    let mismatched: Vec<i64> = report
        .violations
        .iter()
        .filter_map(|v| match v {
            ledger_core::audit::Violation::ResolutionMismatch { entry, .. } => Some(*entry),
            _ => None,
        })
        .collect();
    assert_eq!(mismatched, vec![other.get(), entry.get()], "{:?}", report.violations);
    let p = payouts::for_withdrawal(&mut conn, ws[2]).unwrap().unwrap();
    assert!(
        report.violations.contains(&ledger_core::audit::Violation::PayoutResolutionWrong { payout: p.id.get() }),
        "a settled payout must name a settlement entry: {:?}",
        report.violations
    );
}

#[testing::test]
fn a_claim_made_inside_an_older_transaction_sees_the_shorter_lease_the_database_granted() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (_, w) = paying_out(&mut conn, "10.00", "1.00");
    let opts = ledger_core::TxOptions::default();
    let left = ledger_core::tx::transaction(&mut conn, &opts, |tx| {
        // The database measures the lease from this transaction's start (now()).
        std::thread::sleep(Duration::from_millis(400));
        let claim = payouts::claim_due(tx.conn(), 10, 2_000)?;
        assert_eq!(claim.requests.iter().map(|r| r.withdrawal).collect::<Vec<_>>(), vec![w]);
        Ok::<_, ledger_core::LedgerError>(claim.lease_until.saturating_duration_since(std::time::Instant::now()))
    })
    .unwrap();
    assert!(left <= Duration::from_millis(1_650), "the process's lease must not outlast the database's: {left:?} left");
    assert!(left > Duration::ZERO, "but some of it is left");
}
