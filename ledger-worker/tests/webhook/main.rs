//! The webhook gateway against the local test bank (`ledger-testbank`): every row of the
//! contract that needs a real server, with no database.

mod payments;
mod security;

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
