//! Leases and fencing tokens: a stale answer is never recorded and no two calls for one payout overlap.

use super::*;

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
