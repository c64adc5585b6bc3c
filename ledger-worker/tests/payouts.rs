//! Payouts through the daemon: a flaky local webhook server, kill -9 at random
//! moments, and the proof that no transaction is open during a gateway call.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use ledger_core::payouts::{LookupOutcome, PayoutGateway, PayoutRequest, SendOutcome};
use ledger_core::withdrawals::{self, Iban, WithdrawalRequest};
use ledger_core::{testing, Amount, Currency, TxOptions};
use ledger_worker::daemon::{WorkerConfig, WorkerPool};

/// The bank refuses this account (HTTP 422).
const REFUSED_IBAN: &str = "GB29NWBK60161331926819";

#[derive(Default)]
struct Bank {
    /// key -> (amount, destination), for payouts the bank accepted (money left).
    accepted: Mutex<HashMap<String, (String, String)>>,
    /// Keys accepted more than once as new payments (must stay empty).
    paid_twice: Mutex<Vec<String>>,
    requests: AtomicU64,
    refused: Mutex<HashSet<String>>,
    stop: AtomicBool,
}

fn read_request(stream: &mut TcpStream) -> Option<(HashMap<String, String>, String)> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0; len.min(64 * 1024)];
    reader.read_exact(&mut body).ok()?;
    Some((headers, String::from_utf8_lossy(&body).to_string()))
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A payment API that honours idempotency keys and misbehaves: 20% HTTP 500, 10%
/// connections dropped before acting, 10% dropped after accepting (the answer is lost),
/// HTTP 422 for REFUSED_IBAN.
fn serve(bank: Arc<Bank>, listener: TcpListener) {
    listener.set_nonblocking(true).unwrap();
    let rng = Mutex::new(fastrand::Rng::with_seed(7));
    while !bank.stop.load(Ordering::SeqCst) {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => {
                thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let Some((headers, body)) = read_request(&mut stream) else { continue };
        bank.requests.fetch_add(1, Ordering::Relaxed);
        let key = headers.get("idempotency-key").cloned().unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(json["idempotency_key"].as_str(), Some(key.as_str()), "header and body carry the same key");
        let destination = json["destination"].as_str().unwrap_or("").to_string();
        let amount = json["amount"].as_str().unwrap_or("").to_string();
        if destination == REFUSED_IBAN {
            bank.refused.lock().unwrap().insert(key);
            respond(&mut stream, "422 Unprocessable Entity", r#"{"error":"account closed"}"#);
            continue;
        }
        if bank.accepted.lock().unwrap().contains_key(&key) {
            respond(&mut stream, "200 OK", &format!(r#"{{"reference":"ref-{key}","replayed":true}}"#));
            continue;
        }
        let roll = rng.lock().unwrap().u32(0..100);
        match roll {
            0..=19 => respond(&mut stream, "500 Internal Server Error", r#"{"error":"try later"}"#),
            20..=29 => drop(stream), // connection dropped, nothing done
            _ => {
                let mut accepted = bank.accepted.lock().unwrap();
                if accepted.insert(key.clone(), (amount, destination)).is_some() {
                    bank.paid_twice.lock().unwrap().push(key.clone());
                }
                drop(accepted);
                if roll < 40 {
                    drop(stream); // accepted, but the answer is lost
                } else {
                    respond(&mut stream, "200 OK", &format!(r#"{{"reference":"ref-{key}"}}"#));
                }
            }
        }
    }
}

/// The bank's serving thread, stopped and joined when dropped (also when the test panics).
struct BankServer {
    bank: Arc<Bank>,
    thread: Option<thread::JoinHandle<()>>,
}

impl BankServer {
    fn start(bank: Arc<Bank>, listener: TcpListener) -> BankServer {
        let for_thread = bank.clone();
        BankServer { bank, thread: Some(thread::spawn(move || serve(for_thread, listener))) }
    }

    fn stop(mut self) {
        self.bank.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("the bank's thread panicked");
        }
    }
}

impl Drop for BankServer {
    fn drop(&mut self) {
        self.bank.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[testing::test]
fn a_flaky_bank_and_kill_9_still_pay_each_payout_at_most_once_and_return_refusals() {
    let db = testing::committed();
    let mut conn = db.conn();
    let accounts: Vec<_> =
        (0..30).map(|i| testing::funded_account(&mut conn, &format!("p{i}"), Currency::EUR, "400.00")).collect();
    ledger_core::transaction(&mut conn, &TxOptions::default(), |tx| {
        for i in 0..1_200_usize {
            let to = if i % 10 == 3 { REFUSED_IBAN } else { IBAN };
            withdrawals::request_tx(
                tx,
                &WithdrawalRequest {
                    account: accounts[i % accounts.len()],
                    amount: Amount::from_minor(100 + (i as i64 * 37) % 2_900).unwrap(),
                    currency: Currency::EUR,
                    destination: Iban::parse(to).unwrap(),
                    key: testing::key("pay"),
                },
            )?;
        }
        Ok::<_, ledger_core::LedgerError>(())
    })
    .unwrap();

    let bank = Arc::new(Bank::default());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/payouts", listener.local_addr().unwrap());
    let server = BankServer::start(bank.clone(), listener);
    let args = [
        "--payout-webhook",
        &url,
        "--payout-max-attempts",
        "1000",
        "--payout-base-backoff-ms",
        "5",
        "--payout-max-backoff-ms",
        "50",
        "--payout-lease-ms",
        "1500",
        "--payout-timeout-ms",
        "500",
        "--payout-connect-timeout-ms",
        "200",
        "--threads",
        "2",
        "--batch-size",
        "4",
        // Small batches and one dispatcher keep the run long enough to be killed mid-way.
        "--payout-threads",
        "1",
        "--payout-batch",
        "4",
    ];
    let mut rng = fastrand::Rng::with_seed(42);
    let mut kills_mid_run = 0;
    for _ in 0..4 {
        let mut daemon = spawn_daemon(db.url(), &args);
        // Let it run a random while, then kill -9 at whatever it is doing.
        thread::sleep(Duration::from_millis(rng.u64(100..400)));
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        let unfinished = count(
            &mut conn,
            "SELECT (SELECT count(*) FROM withdrawals WHERE status IN ('pending', 'paying_out'))
                  + (SELECT count(*) FROM payouts WHERE status = 'pending') AS n",
        );
        kills_mid_run += usize::from(unfinished > 0);
    }
    assert!(kills_mid_run >= 2, "the kills must land while work remains ({kills_mid_run})");
    let mut last = spawn_daemon(db.url(), &[&args[..], &["--exit-when-idle"]].concat());
    let status = wait_exit(&mut last, Duration::from_secs(120));
    server.stop();
    assert!(status.success(), "{status}: {}", stderr_of(&mut last));

    // Every withdrawal ended: paid out, returned, or refused for insufficient funds.
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM withdrawals WHERE status NOT IN ('completed', 'returned', 'rejected')"
        ),
        0,
        "{}",
        statuses(&mut conn)
    );
    #[derive(QueryableByName)]
    struct P {
        #[diesel(sql_type = diesel::sql_types::Text)]
        key: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        status: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        amount_minor: i64,
    }
    let payouts: Vec<P> =
        diesel::sql_query("SELECT idempotency_key AS key, status, amount_minor FROM payouts").load(&mut conn).unwrap();
    let accepted = bank.accepted.lock().unwrap().clone();
    assert!(bank.paid_twice.lock().unwrap().is_empty(), "a key was paid twice");
    let settled: HashSet<&str> = payouts.iter().filter(|p| p.status == "settled").map(|p| p.key.as_str()).collect();
    let accepted_keys: HashSet<&str> = accepted.keys().map(String::as_str).collect();
    assert_eq!(settled, accepted_keys, "settled in the ledger <=> paid by the bank");
    for p in &payouts {
        match p.status.as_str() {
            "settled" => {
                assert_eq!(accepted[&p.key].0, Currency::EUR.format_minor(p.amount_minor), "the bank paid the amount")
            }
            "returned" => {
                assert!(!accepted.contains_key(&p.key), "a returned payout was never paid");
                assert!(bank.refused.lock().unwrap().contains(&p.key));
            }
            other => panic!("payout {} ended {other}", p.key),
        }
    }
    let returned = payouts.iter().filter(|p| p.status == "returned").count();
    assert!(returned > 0 && !settled.is_empty());
    // Returned money is back: each balance is its funds minus what the bank paid out.
    let bad_balances = count(
        &mut conn,
        "SELECT count(*) AS n FROM accounts a WHERE a.kind = 'customer' AND a.balance_minor <> 40000 - COALESCE(
             (SELECT sum(p.amount_minor) FROM payouts p WHERE p.account_id = a.id AND p.status = 'settled'), 0)",
    );
    assert_eq!(bad_balances, 0);
    assert_exactly_once(&mut conn);
    eprintln!(
        "bank saw {} requests for {} payouts ({} paid, {returned} refused)",
        bank.requests.load(Ordering::Relaxed),
        payouts.len(),
        settled.len()
    );
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
            amount: Amount::parse("1.00", Currency::EUR).unwrap(),
            currency: Currency::EUR,
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
