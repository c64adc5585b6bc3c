//! Paying and looking up against the bank: accepted, refused, replayed, unknown and timed-out answers.

use super::*;

#[testing::test]
fn accepted_payout_is_paid_once_and_a_replay_answers_the_same() {
    let bank = start(Faults::none());
    let gateway = gateway(&bank);
    let p = payout(IBAN);
    let first = gateway.send(&p);
    let SendOutcome::Accepted { reference: Some(reference) } = &first else { panic!("{first:?}") };
    let paid = bank.paid();
    assert_eq!(paid.len(), 1);
    let payment = &paid[&p.idempotency_key];
    assert_eq!((payment.amount.as_str(), payment.amount_minor), ("50.00", 5_000));
    assert_eq!((payment.currency.as_str(), payment.destination.as_str()), ("EUR", IBAN));
    assert_eq!((payment.payout_id, payment.withdrawal_id), (p.payout.get(), p.withdrawal.get()));

    // The same key again: not paid again, answered with the first reference.
    assert_eq!(gateway.send(&p), first);
    assert_eq!((bank.paid().len(), bank.replays()), (1, 1));
    assert_eq!(gateway.lookup(&p), LookupOutcome::Accepted { reference: Some(reference.clone()) });
    assert_eq!((bank.requests(), bank.auth_failures()), (3, 0));
    assert_clean(&bank);
}

#[testing::test]
fn a_replay_refused_with_a_4xx_is_settled_by_a_lookup() {
    let bank = start(Faults::none());
    bank.set_replay(Replay::Status(422));
    let gateway = gateway(&bank);
    let p = payout(IBAN);
    assert!(matches!(gateway.send(&p), SendOutcome::Accepted { .. }));
    // A legal but nasty bank: the replay looks like a refusal...
    assert!(matches!(gateway.send(&p), SendOutcome::Rejected { reason } if reason.starts_with("HTTP 422: ")));
    // ...which must not be believed for a payout possibly sent: the lookup says paid.
    assert!(matches!(gateway.lookup(&p), LookupOutcome::Accepted { reference: Some(_) }));
    bank.set_replay(Replay::Status(409));
    assert!(matches!(gateway.send(&p), SendOutcome::Unknown { error } if error.starts_with("HTTP 409")));
    assert_eq!(bank.paid().len(), 1);
    assert_clean(&bank);
}

#[testing::test]
fn a_redirect_is_unknown_and_nothing_is_paid() {
    let bank = start(Faults { redirect_pct: 100, ..Faults::none() });
    let gateway = gateway(&bank);
    let p = payout(IBAN);
    let outcome = gateway.send(&p);
    assert!(matches!(&outcome, SendOutcome::Unknown { error } if error.starts_with("HTTP 307")), "{outcome:?}");
    assert!(matches!(gateway.lookup(&p), LookupOutcome::Unknown { .. }), "a redirected lookup is unknown too");
    bank.set_faults(Faults::none()).unwrap();
    assert_eq!(gateway.lookup(&p), LookupOutcome::NotFound);
    assert!(bank.paid().is_empty());
    assert_eq!(bank.requests(), 3, "the redirect was not followed");
    assert_clean(&bank);
}

#[testing::test]
fn a_success_status_without_the_accepted_body_is_unknown() {
    let bank = start(Faults { bare_success_pct: 100, ..Faults::none() });
    let gateway = gateway(&bank);
    let p = payout(IBAN);
    let outcome = gateway.send(&p);
    assert!(matches!(&outcome, SendOutcome::Unknown { error } if error.starts_with("HTTP 200 without")), "{outcome:?}");
    // This bank did pay: only the lookup may say so.
    assert!(matches!(gateway.lookup(&p), LookupOutcome::Accepted { reference: Some(_) }));
    assert_eq!(bank.paid().len(), 1);
    assert_clean(&bank);
}

#[testing::test]
fn a_body_over_the_limit_is_unknown() {
    let bank = start(Faults { oversized_pct: 100, ..Faults::none() });
    let gateway = gateway(&bank);
    let p = payout(IBAN);
    let outcome = gateway.send(&p);
    assert!(matches!(&outcome, SendOutcome::Unknown { error } if error.contains("over 16384 bytes")), "{outcome:?}");
    assert!(matches!(gateway.lookup(&p), LookupOutcome::Accepted { .. }));
    assert_clean(&bank);
}

#[testing::test]
fn a_server_error_is_unknown_and_nothing_is_paid() {
    let bank = start(Faults { server_error_pct: 100, ..Faults::none() });
    let gateway = gateway(&bank);
    let p = payout(IBAN);
    assert!(matches!(gateway.send(&p), SendOutcome::Unknown { error } if error.starts_with("HTTP 503")));
    assert!(matches!(gateway.lookup(&p), LookupOutcome::Unknown { error } if error.starts_with("HTTP 503")));
    bank.set_faults(Faults::none()).unwrap();
    assert_eq!(gateway.lookup(&p), LookupOutcome::NotFound);
    assert!(bank.paid().is_empty());
    assert_clean(&bank);
}

#[testing::test]
fn a_refused_destination_is_rejected_and_the_lookup_confirms_it() {
    let bank = start(Faults::none());
    let gateway = gateway(&bank);
    let p = payout(CLOSED_IBAN);
    let outcome = gateway.send(&p);
    assert!(
        matches!(&outcome, SendOutcome::Rejected { reason } if reason.starts_with("HTTP 422: ") && reason.contains("closed")),
        "{outcome:?}"
    );
    assert!(matches!(gateway.lookup(&p), LookupOutcome::Rejected { reason } if reason.contains("closed")));
    assert!(bank.paid().is_empty());
    assert_clean(&bank);
}

#[testing::test]
fn a_payment_whose_answer_is_lost_is_unknown_then_found_by_lookup() {
    let bank = start(Faults { pay_then_drop_pct: 100, ..Faults::none() });
    let gateway = gateway(&bank);
    let p = payout(IBAN);
    let outcome = gateway.send(&p);
    assert!(matches!(&outcome, SendOutcome::Unknown { error } if error.starts_with("no answer")), "{outcome:?}");
    let reference = bank.paid()[&p.idempotency_key].reference.clone();
    assert_eq!(gateway.lookup(&p), LookupOutcome::Accepted { reference: Some(reference) });
    assert_clean(&bank);
}

#[testing::test]
fn a_dropped_connection_is_unknown() {
    let bank = start(Faults { drop_before_pct: 100, ..Faults::none() });
    let gateway = gateway(&bank);
    let p = payout(IBAN);
    assert!(matches!(gateway.send(&p), SendOutcome::Unknown { .. }));
    assert!(matches!(gateway.lookup(&p), LookupOutcome::Unknown { .. }));
    bank.set_faults(Faults::none()).unwrap();
    assert_eq!(gateway.lookup(&p), LookupOutcome::NotFound);
    assert_clean(&bank);
}

#[testing::test]
fn no_server_at_all_is_unknown() {
    // 127.0.0.2: the banks of the tests running alongside bind 127.0.0.1 only, so the
    // freed port cannot be taken by one of them in between.
    let port = TcpListener::bind("127.0.0.2:0").unwrap().local_addr().unwrap().port();
    let credentials = Credentials { token: Secret::new("t"), secret: Secret::new("s") };
    let gateway = WebhookGateway::new(config(&format!("http://127.0.0.2:{port}/payouts")), credentials).unwrap();
    let p = payout(IBAN);
    let outcome = gateway.send(&p);
    assert!(matches!(&outcome, SendOutcome::Unknown { error } if error.starts_with("no answer")), "{outcome:?}");
    assert!(matches!(gateway.lookup(&p), LookupOutcome::Unknown { .. }));
}

#[testing::test]
fn a_server_that_never_answers_is_unknown_within_the_timeout() {
    // Connections complete (the kernel's backlog) but nobody ever reads or answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let credentials = Credentials { token: Secret::new("t"), secret: Secret::new("s") };
    let url = format!("http://{}/payouts", listener.local_addr().unwrap());
    let quick = WebhookConfig { timeout: Duration::from_millis(300), ..config(&url) };
    let gateway = WebhookGateway::new(quick, credentials).unwrap();
    let p = payout(IBAN);
    let started = std::time::Instant::now();
    assert!(matches!(gateway.send(&p), SendOutcome::Unknown { .. }));
    assert!(matches!(gateway.lookup(&p), LookupOutcome::Unknown { .. }));
    assert!(started.elapsed() < Duration::from_secs(3), "calls were not bounded: {:?}", started.elapsed());
    drop(listener);
}

#[testing::test]
fn a_slow_bank_times_out_as_unknown_and_pays_anyway() {
    let bank = start(Faults { slow_pct: 100, slow_delay: Duration::from_secs(3), ..Faults::none() });
    let credentials = Credentials { token: Secret::new(bank.token()), secret: Secret::new(bank.secret()) };
    let quick = WebhookConfig { timeout: Duration::from_millis(300), ..config(bank.url()) };
    let gateway = WebhookGateway::new(quick, credentials).unwrap();
    let p = payout(IBAN);
    let started = std::time::Instant::now();
    assert!(matches!(gateway.send(&p), SendOutcome::Unknown { .. }));
    assert!(started.elapsed() < Duration::from_millis(2_500), "the call was not bounded: {:?}", started.elapsed());
    assert!(bank.wait_idle(Duration::from_secs(10)), "the bank stays busy");
    bank.set_faults(Faults::none()).unwrap();
    assert!(matches!(gateway.lookup(&p), LookupOutcome::Accepted { .. }));
    assert_clean(&bank);
}

#[testing::test]
fn the_bank_flags_two_calls_for_one_key_in_flight() {
    // The detector the daemon's tests rely on must not be vacuous.
    let bank = start(Faults { slow_pct: 100, slow_delay: Duration::from_millis(800), ..Faults::none() });
    let gateway = gateway(&bank);
    let p = payout(IBAN);
    std::thread::scope(|s| {
        let a = s.spawn(|| gateway.send(&p));
        let b = s.spawn(|| gateway.send(&p));
        let outcomes = [a.join().unwrap(), b.join().unwrap()];
        assert!(outcomes.iter().all(|o| matches!(o, SendOutcome::Accepted { .. })), "{outcomes:?}");
    });
    assert_eq!(bank.paid().len(), 1, "one key, one payment");
    assert_eq!(bank.violations(), vec![Violation::Overlap { key: p.idempotency_key.clone() }]);
}

#[testing::test]
fn a_lookup_of_a_key_never_sent_is_not_found() {
    let bank = start(Faults::none());
    let gateway = gateway(&bank);
    assert_eq!(gateway.lookup(&payout(IBAN)), LookupOutcome::NotFound);
    assert_clean(&bank);
}

#[testing::test]
fn keys_that_need_encoding_are_looked_up_as_one_path_segment() {
    let bank = start(Faults::none());
    let gateway = gateway(&bank);
    let p = PayoutRequest { idempotency_key: "payout w/17?x=1#y%".into(), ..payout(IBAN) };
    assert!(matches!(gateway.send(&p), SendOutcome::Accepted { .. }));
    assert!(gateway.lookup_url(&p.idempotency_key).ends_with("/payouts/payout%20w%2F17%3Fx%3D1%23y%25"));
    assert!(matches!(gateway.lookup(&p), LookupOutcome::Accepted { .. }));
    assert!(bank.paid().contains_key("payout w/17?x=1#y%"));
    assert_clean(&bank);
}
