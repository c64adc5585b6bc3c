//! Payouts claimed by the batch that queues them, and payouts settled together in one entry.

use super::*;

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
