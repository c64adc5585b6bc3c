//! Payouts through the daemon: a flaky local bank that checks every signature, two
//! daemons killed with kill -9 at random moments, a wrong secret, and the proof that no transaction is open during a gateway call.

mod common;

use ledger_core::Money;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use ledger_core::payouts::{LookupOutcome, PayoutGateway, PayoutRequest, SendOutcome};
use ledger_core::withdrawals::{self, Iban, WithdrawalRequest};
use ledger_core::{Currency, TxOptions};
use ledger_testbank::{Bank, BankConfig, Faults, Replay};
use ledger_testdb as testing;
use ledger_worker::daemon::{WorkerConfig, WorkerPool};

/// The bank refuses this account (HTTP 422).
const REFUSED_IBAN: &str = "GB29NWBK60161331926819";

/// 1,200 withdrawals over 30 accounts of 400.00; every tenth goes to REFUSED_IBAN.
fn seed_payouts(conn: &mut diesel::pg::PgConnection) {
    let accounts: Vec<_> =
        (0..30).map(|i| testing::funded_account(conn, &format!("p{i}"), Currency::EUR, "400.00")).collect();
    ledger_core::transaction(conn, &TxOptions::default(), |tx| {
        for i in 0..1_200_usize {
            let to = if i % 10 == 3 { REFUSED_IBAN } else { IBAN };
            withdrawals::request_tx(
                tx,
                &WithdrawalRequest {
                    account: accounts[i % accounts.len()],
                    amount: Money::from_minor(100 + (i as i64 * 37) % 2_900, Currency::EUR).unwrap(),
                    destination: Iban::parse(to).unwrap(),
                    key: testing::key("pay"),
                },
            )?;
        }
        Ok::<_, ledger_core::LedgerError>(())
    })
    .unwrap();
}

/// `ledger-worker run` through the webhook gateway to `bank`, with its credentials.
fn spawn_paying_daemon(url: &str, bank: &Bank, token: &str, secret: &str, extra: &[&str]) -> Daemon {
    let webhook = bank.url().to_string();
    let args = [
        &[
            "--gateway",
            "webhook",
            "--payout-webhook",
            webhook.as_str(),
            "--payout-max-attempts",
            "1000",
            "--payout-base-backoff-ms",
            "5",
            "--payout-max-backoff-ms",
            "50",
            "--payout-lease-ms",
            "1500",
            "--payout-timeout-ms",
            "250",
            "--payout-connect-timeout-ms",
            "100",
            "--threads",
            "2",
            "--batch-size",
            "4",
            // Small batches keep the run long enough to be killed mid-way.
            "--payout-threads",
            "2",
            "--payout-batch",
            "8",
            "--payout-concurrency",
            "4",
        ][..],
        extra,
    ]
    .concat();
    spawn_daemon_with_env(
        url,
        &args,
        &[("LEDGER_PAYOUT_WEBHOOK_TOKEN", token), ("LEDGER_PAYOUT_WEBHOOK_SECRET", secret)],
    )
}

/// A bank that drops, fails, redirects, cuts short, pads and delays calls, answers a
/// replay of a paid key with 409, and refuses REFUSED_IBAN.
fn nasty_bank_config() -> BankConfig {
    let nasty = Faults {
        drop_before_pct: 8,
        server_error_pct: 12,
        pay_then_drop_pct: 10,
        redirect_pct: 6,
        bare_success_pct: 5,
        oversized_pct: 3,
        // Slower than the call's timeout (it is cut off, unknown), within the lease.
        slow_pct: 4,
        slow_delay: Duration::from_millis(600),
    };
    BankConfig {
        faults: nasty,
        // A replay of a key already paid is answered 409: only a lookup tells the truth.
        replay: Replay::Status(409),
        refused_destinations: [REFUSED_IBAN.to_string()].into_iter().collect(),
        seed: 42,
        ..BankConfig::default()
    }
}

/// Four rounds of two paying daemons killed with kill -9 after a random while; returns
/// in how many rounds work was still left when they died.
fn kill_two_daemons_again_and_again(
    conn: &mut diesel::pg::PgConnection,
    url: &str,
    bank: &Bank,
    token: &str,
    secret: &str,
) -> usize {
    let mut rng = fastrand::Rng::with_seed(42);
    let mut kills_mid_run = 0;
    for _ in 0..4 {
        let mut a = spawn_paying_daemon(url, bank, token, secret, &[]);
        let mut b = spawn_paying_daemon(url, bank, token, secret, &[]);
        // Let them run a random while, then kill -9 both at whatever they are doing.
        thread::sleep(Duration::from_millis(rng.u64(150..500)));
        for d in [&mut a, &mut b] {
            d.kill().unwrap();
            d.wait().unwrap();
        }
        let unfinished = count(
            conn,
            "SELECT (SELECT count(*) FROM withdrawals WHERE status IN ('pending', 'paying_out'))
                  + (SELECT count(*) FROM payouts WHERE status = 'pending') AS n",
        );
        kills_mid_run += usize::from(unfinished > 0);
    }
    kills_mid_run
}

/// The ledger and the bank agree: no key paid twice, every withdrawal ended, settled in
/// the ledger exactly when paid by the bank (the same amount), returned only when
/// refused and never paid, and each balance its funds minus what was paid out.
fn assert_the_ledger_and_the_bank_agree(conn: &mut diesel::pg::PgConnection, bank: &Bank) {
    assert_eq!(bank.violations(), vec![], "no key paid twice, no two calls for one key at once");
    assert_eq!(bank.auth_failures(), 0, "every request carried a valid token and signature");
    // Every withdrawal ended: paid out, returned, or refused for insufficient funds.
    assert_eq!(
        count(conn, "SELECT count(*) AS n FROM withdrawals WHERE status NOT IN ('completed', 'returned', 'rejected')"),
        0,
        "{}",
        statuses(conn)
    );
    let payouts = stored_payouts(conn);
    let paid = bank.paid();
    let settled: HashSet<&str> = payouts.iter().filter(|p| p.status == "settled").map(|p| p.key.as_str()).collect();
    let paid_keys: HashSet<&str> = paid.keys().map(String::as_str).collect();
    assert_eq!(settled, paid_keys, "settled in the ledger <=> paid by the bank");
    for p in &payouts {
        match p.status.as_str() {
            "settled" => assert_eq!(paid[&p.key].amount_minor, p.amount_minor, "the bank paid the amount"),
            "returned" => {
                assert!(!paid.contains_key(&p.key), "a returned payout was never paid");
                assert!(bank.refused().contains_key(&p.key), "a returned payout was refused by the bank");
            }
            other => panic!("payout {} ended {other}", p.key),
        }
    }
    let returned = payouts.iter().filter(|p| p.status == "returned").count();
    assert!(returned > 0 && !settled.is_empty());
    // Returned money is back: each balance is its funds minus what the bank paid out.
    let bad_balances = count(
        conn,
        "SELECT count(*) AS n FROM accounts a WHERE a.kind = 'customer' AND a.balance_minor <> 40000 - COALESCE(
             (SELECT sum(p.amount_minor) FROM payouts p WHERE p.account_id = a.id AND p.status = 'settled'), 0)",
    );
    assert_eq!(bad_balances, 0);
    assert_exactly_once(conn);
    eprintln!(
        "bank saw {} requests ({} replays) for {} payouts ({} paid, {returned} refused)",
        bank.requests(),
        bank.replays(),
        payouts.len(),
        settled.len()
    );
}

#[testing::test]
fn a_flaky_bank_and_two_daemons_killed_again_and_again_pay_each_payout_exactly_once() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed_payouts(&mut conn);
    let config = nasty_bank_config();
    let (token, secret) = (config.token.clone(), config.secret.clone());
    let bank = Bank::start(config).expect("starting the test bank");
    let kills_mid_run = kill_two_daemons_again_and_again(&mut conn, db.url(), &bank, &token, &secret);
    assert!(kills_mid_run >= 2, "the kills must land while work remains ({kills_mid_run})");
    // The bank calms down; two daemons finish the rest.
    bank.set_faults(Faults { server_error_pct: 10, pay_then_drop_pct: 5, ..Faults::none() }).unwrap();
    let mut a = spawn_paying_daemon(db.url(), &bank, &token, &secret, &["--exit-when-idle"]);
    let mut b = spawn_paying_daemon(db.url(), &bank, &token, &secret, &[]);
    let status = wait_exit(&mut a, Duration::from_secs(120));
    assert!(status.success(), "{status}: {}", stderr_of(&mut a));
    wait_for(Duration::from_secs(60), "every payout to be final", || {
        count(&mut conn, "SELECT count(*) AS n FROM payouts WHERE status = 'pending'") == 0
    });
    let _ = std::process::Command::new("kill").args(["-TERM", &b.id().to_string()]).status();
    assert!(wait_exit(&mut b, Duration::from_secs(30)).success(), "{}", stderr_of(&mut b));
    assert!(bank.wait_idle(Duration::from_secs(10)), "the bank still has calls in flight");
    assert_the_ledger_and_the_bank_agree(&mut conn, &bank);
}

#[testing::test]
fn with_a_wrong_secret_nothing_is_paid_and_nothing_is_refunded() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed_payouts(&mut conn);
    let config =
        BankConfig { refused_destinations: [REFUSED_IBAN.to_string()].into_iter().collect(), ..BankConfig::default() };
    let token = config.token.clone();
    let bank = Bank::start(config).expect("starting the test bank");
    let mut daemon = spawn_paying_daemon(db.url(), &bank, &token, "not-the-bank-secret", &[]);
    wait_for(Duration::from_secs(60), "the bank to refuse our signatures", || bank.auth_failures() >= 1);
    wait_for(Duration::from_secs(60), "every withdrawal to be debited", || pending(&mut conn) == 0);
    // Refused credentials stop the dispatchers: no call hammers the bank meanwhile.
    let requests = bank.requests();
    thread::sleep(Duration::from_millis(1_500));
    assert_eq!(bank.requests(), requests, "no calls after the bank refused our credentials");
    assert!(requests <= 2 * 8, "at most one round per dispatcher reached the bank ({requests})");
    let _ = std::process::Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    wait_exit(&mut daemon, Duration::from_secs(30));
    assert!(bank.paid().is_empty() && bank.refused().is_empty(), "the bank acted on nothing");
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM payouts WHERE status <> 'pending'"),
        0,
        "nothing settled, returned or failed"
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM withdrawals WHERE status IN ('completed', 'returned')"), 0);
    let log = stderr_of(&mut daemon);
    assert!(log.contains("credentials"), "the operator is told why: {log}");
    assert!(!log.contains("not-the-bank-secret"), "the secret never reaches the log");
    assert_exactly_once(&mut conn);
}

#[derive(QueryableByName)]
struct StoredPayout {
    #[diesel(sql_type = diesel::sql_types::Text)]
    key: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    status: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    amount_minor: i64,
}

fn stored_payouts(conn: &mut diesel::pg::PgConnection) -> Vec<StoredPayout> {
    diesel::sql_query("SELECT idempotency_key AS key, status, amount_minor FROM payouts").load(conn).unwrap()
}

/// Asks PostgreSQL, during every gateway call, whether any connection of the worker
/// pool has a transaction open.
struct Inspector {
    url: String,
    app: String,
    calls: AtomicU64,
    open_during_call: AtomicU64,
}

impl Inspector {
    fn open_transactions(&self) -> i64 {
        let mut conn = ledger_core::db::connect(&self.url, &Default::default()).unwrap();
        count(
            &mut conn,
            &format!(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = '{}' AND xact_start IS NOT NULL",
                self.app
            ),
        )
    }
}

impl PayoutGateway for Inspector {
    fn send(&self, _r: &PayoutRequest) -> SendOutcome {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.open_during_call.fetch_add(self.open_transactions() as u64, Ordering::Relaxed);
        SendOutcome::Accepted { reference: None }
    }

    fn lookup(&self, _r: &PayoutRequest) -> LookupOutcome {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.open_during_call.fetch_add(self.open_transactions() as u64, Ordering::Relaxed);
        LookupOutcome::NotFound
    }
}

#[testing::test]
fn no_database_transaction_is_open_while_a_gateway_call_is_in_flight() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "a", Currency::EUR, "100.00");
    for i in 0..20 {
        let req = WithdrawalRequest {
            account: a,
            amount: Money::parse("1.00", Currency::EUR).unwrap(),
            destination: Iban::parse(IBAN).unwrap(),
            key: testing::key(&format!("notx{i}")),
        };
        withdrawals::withdraw(&mut conn, &req).unwrap(); // debited now: only payouts remain
    }
    let app = format!("notx-{}", std::process::id());
    let inspector = Arc::new(Inspector {
        url: db.url().to_string(),
        app: app.clone(),
        calls: AtomicU64::new(0),
        open_during_call: AtomicU64::new(0),
    });
    // The check can fail: an open transaction under that name is seen.
    let mut holder = ledger_core::db::connect(
        db.url(),
        &ledger_core::db::SessionConfig { application_name: Some(app.clone()), ..Default::default() },
    )
    .unwrap();
    holder.batch_execute("BEGIN; SELECT 1;").unwrap();
    assert_eq!(inspector.open_transactions(), 1, "negative control: the inspector sees an open transaction");
    holder.batch_execute("ROLLBACK").unwrap();
    assert_eq!(inspector.open_transactions(), 0);

    // One dispatcher and no withdrawal work: any transaction of the pool seen during a
    // call would be the dispatcher's own.
    let config = WorkerConfig { application_name: app, payout_threads: 1, payout_batch: 4, ..WorkerConfig::default() };
    let pool = WorkerPool::builder(db.url(), config).gateway(inspector.clone()).start().unwrap();
    wait_for(Duration::from_secs(30), "payouts to settle", || {
        count(&mut conn, "SELECT count(*) AS n FROM payouts WHERE status = 'settled'") == 20
    });
    pool.shutdown();
    assert_eq!(inspector.calls.load(Ordering::Relaxed), 20);
    assert_eq!(inspector.open_during_call.load(Ordering::Relaxed), 0);
    assert_exactly_once(&mut conn);
}
