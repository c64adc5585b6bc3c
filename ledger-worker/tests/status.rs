//! Watching the daemon: `status` prints the queue depths and rates from the database,
//! and the metrics endpoint serves them as gauges.

mod common;

use ledger_core::Money;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use ledger_core::withdrawals::{self, Iban, WithdrawalRequest};
use ledger_core::{AccountId, Currency};
use ledger_testdb as testing;
use serde_json::{json, Value};

fn request(account: AccountId, amount: &str) -> WithdrawalRequest {
    WithdrawalRequest {
        account,
        amount: Money::parse(amount, Currency::EUR).unwrap(),
        destination: Iban::parse(IBAN).unwrap(),
        key: testing::key("st"),
    }
}

fn status(url: &str, json: bool) -> String {
    let args: &[&str] = if json { &["--json", "status"] } else { &["status"] };
    let out = worker_command().args(args).env("DATABASE_URL", url).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn gauge(body: &str, name: &str) -> Option<f64> {
    body.lines().find(|l| l.starts_with(&format!("{name} "))).map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

#[testing::test]
fn status_prints_the_exact_depths_and_the_gauges_follow_the_database() {
    let db = testing::committed();
    let url = db.url();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "watched", Currency::EUR, "100.00");
    // 3 pending, 1 failed, 2 debited (paying out, their payouts pending).
    for _ in 0..3 {
        withdrawals::request(&mut conn, &request(a, "10.00")).unwrap();
    }
    let (failed, _) = withdrawals::request(&mut conn, &request(a, "10.00")).unwrap();
    assert!(withdrawals::fail_now(&mut conn, failed, "a panic").unwrap());
    for _ in 0..2 {
        withdrawals::withdraw(&mut conn, &request(a, "10.00")).unwrap();
    }

    let out = status(url, true);
    assert_eq!(out.lines().count(), 1, "one object: {out}");
    let mut v: Value = serde_json::from_str(&out).unwrap();
    let age = v["withdrawals"]["oldest_pending_age_s"].take();
    assert!(age.as_f64().is_some_and(|a| (0.0..60.0).contains(&a)), "{age}");
    assert_eq!(
        v,
        json!({
            "withdrawals": { "pending": 3, "retry_waiting": 0, "paying_out": 2, "failed": 1,
                             "oldest_pending_age_s": null },
            "payouts": { "pending": 2, "failed": 0 },
            "rates": { "window_s": 60.0, "withdrawals_debited": 2, "withdrawals_refused": 1, "payouts_settled": 0,
                       "withdrawals_debited_per_s": 0.03, "withdrawals_refused_per_s": 0.02,
                       "payouts_settled_per_s": 0.0 },
        })
    );
    let human = status(url, false);
    assert!(human.contains("pending 3 (0 waiting to retry, oldest "), "{human}");
    assert!(human.contains("paying out 2, failed 1"), "{human}");
    assert!(human.contains("payouts      pending 2, failed 0"), "{human}");

    // The daemon debits the 3 pending ones (no gateway: their payouts wait); its gauges
    // show the new depths within a refresh or two.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut daemon = spawn_daemon(url, &["--gateway", "none", "--metrics-addr", &addr]);
    wait_for(Duration::from_secs(30), "the jobs to be debited", || pending(&mut conn) == 0);
    let expected = [
        ("ledger_withdrawals_pending", 0.0),
        ("ledger_withdrawals_retry_waiting", 0.0),
        ("ledger_withdrawals_paying_out", 5.0),
        ("ledger_withdrawals_failed", 1.0),
        ("ledger_payouts_pending", 5.0),
        ("ledger_payouts_failed", 0.0),
        ("ledger_withdrawals_oldest_pending_age_seconds", 0.0),
    ];
    let mut body = String::new();
    wait_for(Duration::from_secs(30), "the gauges to show the debited jobs", || {
        body = scrape(&addr);
        expected.iter().all(|(name, want)| gauge(&body, name) == Some(*want))
    });
    assert!(gauge(&body, "ledger_queue_depths_age_seconds").is_some_and(|a| a < 15.0), "{body}");
    assert_eq!(gauge(&body, "ledger_queue_depths_errors_total"), Some(0.0), "{body}");
    assert!(body.contains("# TYPE ledger_withdrawals_paying_out gauge\n"), "{body}");
    let _ = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    assert!(wait_exit(&mut daemon, Duration::from_secs(15)).success());

    let after: Value = serde_json::from_str(&status(url, true)).unwrap();
    assert_eq!(
        after["withdrawals"],
        json!({ "pending": 0, "retry_waiting": 0, "paying_out": 5, "failed": 1,
                                              "oldest_pending_age_s": null })
    );
    assert_eq!(after["rates"]["withdrawals_debited"], 5);
}
