//! The webhook gateway against the local test bank (`ledger-testbank`): every row of the
//! contract that needs a real server, with no database.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ledger_core::payouts::{LookupOutcome, PayoutGateway, PayoutRequest, SendOutcome};
use ledger_core::{PayoutId, WithdrawalId};
use ledger_testbank::{Bank, BankConfig, Faults, Replay, Violation};
use ledger_testdb as testing;
use ledger_worker::webhook::{
    self, Credentials, Secret, WebhookConfig, WebhookError, WebhookGateway, SECRET_FILE_VAR, SECRET_VAR, TOKEN_VAR,
};

const IBAN: &str = "DE89370400440532013000";
/// The bank refuses this account (HTTP 422).
const CLOSED_IBAN: &str = "GB29NWBK60161331926819";

fn config(url: &str) -> WebhookConfig {
    WebhookConfig { url: url.to_string(), connect_timeout: Duration::from_secs(2), timeout: Duration::from_secs(5) }
}

fn gateway(bank: &Bank) -> WebhookGateway {
    let credentials = Credentials { token: Secret::new(bank.token()), secret: Secret::new(bank.secret()) };
    WebhookGateway::new(config(bank.url()), credentials).expect("a loopback http URL is allowed")
}

fn start(faults: Faults) -> Bank {
    Bank::start(BankConfig {
        faults,
        refused_destinations: HashSet::from([CLOSED_IBAN.to_string()]),
        ..BankConfig::default()
    })
    .expect("starting the test bank")
}

/// A payout with ids unique in this test process (the bank flags one withdrawal paid
/// under two keys).
fn payout(destination: &str) -> PayoutRequest {
    static NEXT: AtomicI64 = AtomicI64::new(1);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    PayoutRequest {
        payout: PayoutId::new(n).unwrap(),
        withdrawal: WithdrawalId::new(1_000 + n).unwrap(),
        amount_minor: 5_000,
        amount: "50.00".into(),
        currency: "EUR".into(),
        destination: destination.into(),
        idempotency_key: format!("payout-test-w{}", 1_000 + n),
        attempt: 1,
        token: n,
        possibly_sent: false,
    }
}

fn assert_clean(bank: &Bank) {
    assert_eq!(bank.violations(), Vec::<Violation>::new(), "the client broke the contract");
}

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

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
    let pairs: Vec<(String, OsString)> = pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
    move |name| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

#[testing::test]
fn a_missing_secret_is_a_clear_error_naming_the_variable() {
    let err = Credentials::from_lookup(env(&[(TOKEN_VAR, "tok-secret-value")])).unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(matches!(err, WebhookError::MissingSecret { var: SECRET_VAR, file_var: SECRET_FILE_VAR }));
    assert!(shown.contains(SECRET_VAR) && shown.contains(SECRET_FILE_VAR), "{shown}");
    assert!(!shown.contains("tok-secret-value"), "{shown}");

    let err = Credentials::from_lookup(env(&[(SECRET_VAR, "sec-secret-value")])).unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(shown.contains(TOKEN_VAR) && !shown.contains("sec-secret-value"), "{shown}");

    let err = Credentials::from_lookup(env(&[(TOKEN_VAR, "tok-secret-value"), (SECRET_VAR, "")])).unwrap_err();
    assert!(err.to_string().contains(SECRET_VAR), "{err}");
}

#[testing::test]
fn from_env_reads_the_real_environment_in_a_child_process() {
    // set_var would race with the other tests' threads: the child gets its own
    // environment, and runs the test below, which is inert unless marked so.
    let exe = std::env::current_exe().unwrap();
    let output = std::process::Command::new(exe)
        .args(["--exact", "from_env_child", "--nocapture", "--test-threads=1"])
        .env("LEDGER_WEBHOOK_TEST_CHILD", "1")
        .env_remove(TOKEN_VAR)
        .env_remove(webhook::TOKEN_FILE_VAR)
        .env_remove(SECRET_FILE_VAR)
        .env(SECRET_VAR, "child-secret-value")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("child saw: LEDGER_PAYOUT_WEBHOOK_TOKEN is not set"), "{stdout}");
    assert!(!stdout.contains("child-secret-value"), "{stdout}");
}

#[test]
fn from_env_child() {
    if std::env::var_os("LEDGER_WEBHOOK_TEST_CHILD").is_none() {
        return;
    }
    let err = WebhookGateway::from_env(config("https://bank.example/payouts")).unwrap_err();
    println!("child saw: {err} / {err:?}");
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
