//! Authentication, signatures, secrets kept out of output, and URLs refused or mistyped.

use super::*;

#[testing::test]
fn a_wrong_secret_or_token_is_unauthorized_and_nothing_is_paid() {
    let bank = start(Faults::none());
    let p = payout(IBAN);
    let wrong_secret = Credentials { token: Secret::new(bank.token()), secret: Secret::new("not-the-secret") };
    let wrong_token = Credentials { token: Secret::new("not-the-token"), secret: Secret::new(bank.secret()) };
    for credentials in [wrong_secret, wrong_token] {
        let gateway = WebhookGateway::new(config(bank.url()), credentials).unwrap();
        assert!(matches!(gateway.send(&p), SendOutcome::Unauthorized { error } if error.starts_with("HTTP 401")));
        assert!(matches!(gateway.lookup(&p), LookupOutcome::Unauthorized { .. }));
    }
    assert!(bank.paid().is_empty() && bank.refused().is_empty());
    assert_eq!((bank.auth_failures(), bank.requests()), (4, 4));
    // The right credentials still work: nothing was recorded against the key.
    assert!(matches!(gateway(&bank).lookup(&p), LookupOutcome::NotFound));
    assert_clean(&bank);
}

/// One raw request to the bank, signed at `t`; returns the status line.
fn raw_request(bank: &Bank, t: u64, method: &str, path: &str, body: &str, sign_body: &str) -> String {
    let signature = webhook::signature_header(&Secret::new(bank.secret()), t, sign_body);
    let mut stream = TcpStream::connect(bank.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nLedger-Signature: {signature}\r\n\
         Idempotency-Key: raw-1\r\nContent-Length: {}\r\n\r\n{body}",
        bank.token(),
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.lines().next().unwrap_or("").to_string()
}

#[testing::test]
fn the_bank_checks_signature_age_and_what_was_signed() {
    let bank = start(Faults::none());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    // A GET signs "<t>." (empty body).
    assert!(raw_request(&bank, now, "GET", "/payouts/raw-1", "", "").contains(" 404 "));
    assert!(raw_request(&bank, now - 600, "GET", "/payouts/raw-1", "", "").contains(" 401 "), "stale signature");
    assert!(raw_request(&bank, now + 600, "GET", "/payouts/raw-1", "", "").contains(" 401 "), "future signature");
    let body = r#"{"payout_id":1,"withdrawal_id":1,"amount":"1.00","amount_minor":100,"currency":"EUR","destination":"X","idempotency_key":"raw-1"}"#;
    let tampered = body.replace("1.00", "9.00");
    assert!(raw_request(&bank, now, "POST", "/payouts", &tampered, body).contains(" 401 "), "body not the signed one");
    assert!(bank.paid().is_empty());
    assert!(raw_request(&bank, now, "POST", "/payouts", body, body).contains(" 201 "));
    assert_eq!(bank.auth_failures(), 3);
    assert_eq!(bank.paid().len(), 1);
    assert_clean(&bank);
}

#[testing::test]
fn plain_http_to_another_host_is_refused_at_construction() {
    let credentials = || Credentials { token: Secret::new("tok-z"), secret: Secret::new("sec-z") };
    for url in ["http://bank.example/payouts", "http://192.168.1.10:8080/payouts", "http://[2001:db8::1]/p"] {
        let err = WebhookGateway::new(config(url), credentials()).unwrap_err();
        assert!(matches!(err, WebhookError::InsecureUrl { .. }), "{url}: {err}");
        assert!(err.to_string().contains("https://"), "{err}");
    }
    for url in ["https://bank.example/payouts", "http://127.0.0.1:1/p", "http://localhost:1/p", "http://[::1]:1/p"] {
        WebhookGateway::new(config(url), credentials()).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    assert!(matches!(
        WebhookGateway::new(config("ftp://bank.example/p"), credentials()),
        Err(WebhookError::BadScheme { .. })
    ));
}

#[testing::test]
fn secrets_never_show_in_debug_output_errors_or_outcomes() {
    let bank = Bank::start(BankConfig {
        token: "tok-very-secret".into(),
        secret: "sec-very-secret".into(),
        faults: Faults { server_error_pct: 50, drop_before_pct: 25, ..Faults::none() },
        ..BankConfig::default()
    })
    .expect("starting the test bank");
    let gateway = gateway(&bank);
    let shown = format!("{gateway:?} {gateway:#?}");
    assert!(!shown.contains("tok-very-secret") && !shown.contains("sec-very-secret"), "{shown}");
    let mut seen = String::new();
    for _ in 0..8 {
        let p = payout(IBAN);
        seen.push_str(&format!("{:?} {:?}", gateway.send(&p), gateway.lookup(&p)));
    }
    let wrong = Credentials { token: Secret::new("tok-very-secret"), secret: Secret::new("sec-wrong-secret") };
    let wrong = WebhookGateway::new(config(bank.url()), wrong).unwrap();
    seen.push_str(&format!("{:?} {wrong:?}", wrong.send(&payout(IBAN))));
    let err = WebhookGateway::new(
        config("http://bank.example/p"),
        Credentials { token: Secret::new("tok-very-secret"), secret: Secret::new("sec-very-secret") },
    )
    .unwrap_err();
    seen.push_str(&format!("{err} {err:?}"));
    for secret in ["tok-very-secret", "sec-very-secret", "sec-wrong-secret"] {
        assert!(!seen.contains(secret), "{secret} leaked: {seen}");
    }
}

#[testing::test]
fn a_mistyped_url_never_refunds_a_payout_that_may_have_been_paid() {
    let bank = start(Faults::none());
    let right = gateway(&bank);
    let p = payout(IBAN);
    // The first call paid, but its answer was lost: the payout may have been sent.
    assert!(matches!(right.send(&p), SendOutcome::Accepted { .. }));
    let in_doubt = PayoutRequest { possibly_sent: true, ..p.clone() };
    // A restart with a typo in the path: every route answers a bare 404.
    let typo_url = bank.url().replace("/payouts", "/payout");
    let credentials = Credentials { token: Secret::new(bank.token()), secret: Secret::new(bank.secret()) };
    let typo = WebhookGateway::new(config(&typo_url), credentials).unwrap();
    assert!(matches!(typo.lookup(&in_doubt), LookupOutcome::Unknown { .. }), "a missing route is not a missing payout");
    let verdict = ledger_core::payouts::resolve(&typo, &in_doubt, &|| true);
    assert!(matches!(verdict, ledger_core::payouts::Verdict::Unknown { .. }), "{verdict:?}");
    // The right URL finds the payment.
    assert!(matches!(right.lookup(&in_doubt), LookupOutcome::Accepted { .. }));
    assert_clean(&bank);
}
