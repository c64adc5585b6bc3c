//! Verdicts: settle, final rejection, back-off and operator retry, a mixed batch of verdicts recorded in one transaction, and a round put back set-based.

use super::*;

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

#[testing::test]
fn a_round_of_unsent_claims_and_unknown_outcomes_is_put_back_row_by_row_exactly() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "payee", Currency::EUR, "100.00");
    let ws: Vec<WithdrawalId> = (0..6)
        .map(|i| withdrawals::withdraw(&mut conn, &withdrawal(a, "1.00", &format!("rq{i}"))).unwrap().id)
        .collect();
    let policy = RetryPolicy { max_attempts: 2, backoff: Backoff::new(1, 1, Jitter::Half) };
    // A 1 ms lease and a 1 ms backoff: after a pause every payout put back is due, and
    // one claim takes them all (claiming again would count attempts).
    let claim_all = |conn: &mut PgConnection| {
        std::thread::sleep(Duration::from_millis(20));
        let reqs = payouts::claim_due(conn, 100, 1).unwrap().requests;
        ws.iter().filter_map(|w| reqs.iter().find(|r| r.withdrawal == *w).cloned()).collect::<Vec<PayoutRequest>>()
    };
    // Round 1: two unknown outcomes (their payouts may have been sent), four given back.
    let r1 = claim_all(&mut conn);
    assert_eq!(r1.len(), 6);
    let timeout = Verdict::Unknown { error: "timeout after sending".into() };
    let round1: Vec<_> = r1
        .iter()
        .enumerate()
        .map(|(i, r)| (r.clone(), if i == 0 || i == 4 { timeout.clone() } else { Verdict::NotSent }))
        .collect();
    let recorded = payouts::record_all(&mut conn, &round1, &policy).unwrap();
    assert_eq!(recorded.iter().filter(|r| **r == Recorded::Retrying).count(), 2, "{recorded:?}");
    assert_eq!(recorded.iter().filter(|r| **r == Recorded::Released).count(), 4, "{recorded:?}");
    // Round 2: every kind of putting back in one recording transaction.
    let r2 = claim_all(&mut conn);
    assert_eq!(r2.len(), 6, "all due again");
    assert_eq!(r2.iter().map(|r| r.possibly_sent).collect::<Vec<_>>(), [true, false, false, false, true, false]);
    let verdicts = vec![
        (r2[0].clone(), timeout.clone()),
        (r2[1].clone(), Verdict::NotSent),
        (r2[2].clone(), Verdict::Unknown { error: "HTTP 503".into() }),
        (r2[3].clone(), Verdict::Unauthorized { error: "HTTP 401".into() }),
        (r2[4].clone(), Verdict::NotSent),
        (r2[5].clone(), Verdict::Paid { reference: None }),
    ];
    let recorded = payouts::record_all(&mut conn, &verdicts, &policy).unwrap();
    assert_eq!(
        recorded,
        [
            Recorded::Failed,
            Recorded::Released,
            Recorded::Retrying,
            Recorded::Retrying,
            Recorded::Released,
            Recorded::Settled
        ]
    );
    let row = |conn: &mut PgConnection, i: usize| payouts::for_withdrawal(conn, ws[i]).unwrap().unwrap();
    let state = |p: &payouts::Payout| (p.status, p.attempts, p.possibly_sent, p.claim_token, p.last_error.clone());
    let error = |s: &str| Some(s.to_string());
    let pending = PayoutStatus::Pending;
    assert_eq!(
        state(&row(&mut conn, 0)),
        (PayoutStatus::Failed, 2, true, Some(r2[0].token), error("timeout after sending")),
        "attempts used up: failed, keeping the last claim's token for an operator's return"
    );
    assert_eq!(state(&row(&mut conn, 1)), (pending, 0, false, None, None), "given back twice, never sent");
    assert_eq!(state(&row(&mut conn, 2)), (pending, 1, true, None, error("HTTP 503")), "one attempt used");
    assert_eq!(
        state(&row(&mut conn, 3)),
        (pending, 0, true, None, error("HTTP 401")),
        "a refused credential uses none"
    );
    assert_eq!(
        state(&row(&mut conn, 4)),
        (pending, 1, true, None, error("timeout after sending")),
        "given back unsent, but round 1 may have sent it: still looked up first"
    );
    assert_eq!(row(&mut conn, 5).status, PayoutStatus::Settled);
    let again = claim_all(&mut conn);
    assert_eq!(
        again.iter().map(|r| (r.withdrawal, r.possibly_sent)).collect::<Vec<_>>(),
        [(ws[1], false), (ws[2], true), (ws[3], true), (ws[4], true)],
        "all due again, and the failed and settled ones not"
    );
    for w in &ws[..5] {
        assert_eq!(withdrawals::get(&mut conn, *w).unwrap().status, WithdrawalStatus::PayingOut, "still held");
    }
    assert_audit_clean(&mut conn);
}

/// An unknown outcome is due again only after its claim's lease, however short its
/// backoff (a call that timed out may still be at work in the gateway); a refused
/// credential never uses up an attempt, also at the limit.
#[testing::test]
fn an_unknown_outcome_waits_out_its_lease_and_a_refused_credential_never_fails_a_payout() {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Due {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        after_lease: bool,
    }
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "payee", Currency::EUR, "100.00");
    let ws: Vec<WithdrawalId> = (0..2)
        .map(|i| withdrawals::withdraw(&mut conn, &withdrawal(a, "1.00", &format!("lease{i}"))).unwrap().id)
        .collect();
    let claim = payouts::claim_due(&mut conn, 100, 60_000).unwrap().requests;
    let by_w = |w: WithdrawalId| claim.iter().find(|r| r.withdrawal == w).unwrap().clone();
    // One attempt allowed, and the first is used: an unknown outcome fails now, so it
    // is given two; a refused credential gets one and must not fail.
    let two = RetryPolicy { max_attempts: 2, backoff: Backoff::new(1, 1, Jitter::Half) };
    let one = RetryPolicy { max_attempts: 1, ..two };
    let timeout = Verdict::Unknown { error: "timeout".into() };
    assert_eq!(payouts::record(&mut conn, &by_w(ws[0]), &timeout, &two).unwrap(), Recorded::Retrying);
    let refused = Verdict::Unauthorized { error: "HTTP 401".into() };
    assert_eq!(payouts::record(&mut conn, &by_w(ws[1]), &refused, &one).unwrap(), Recorded::Retrying);
    for w in &ws {
        let p = payouts::for_withdrawal(&mut conn, *w).unwrap().unwrap();
        let due: Due = diesel::sql_query(
            "SELECT next_attempt_at >= now() + interval '55 seconds' AS after_lease FROM payouts WHERE id = $1",
        )
        .bind::<diesel::sql_types::BigInt, _>(p.id.get())
        .get_result(&mut conn)
        .unwrap();
        assert!(due.after_lease, "a 1 ms backoff still waits for the 60 s lease: {p:?}");
        assert_eq!((p.status, p.claim_token), (PayoutStatus::Pending, None));
    }
    let p = payouts::for_withdrawal(&mut conn, ws[1]).unwrap().unwrap();
    assert_eq!(p.attempts, 0, "a refused credential gives its attempt back");
    assert!(
        payouts::claim_due(&mut conn, 100, 60_000).unwrap().requests.is_empty(),
        "nothing due before the lease ends"
    );
}
