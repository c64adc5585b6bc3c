//! The daemon's hold expiry loop, on a real `ledger-worker run` process: due holds are
//! voided (status expired) in bounded batches, the others stay pending, a post before
//! the deadline stands, and SIGTERM stops the loop.

mod common;

use std::time::Duration;

use common::*;
use ledger_core::holds::{self, HoldRequest, HoldStatus, Timeout};
use ledger_core::{Currency, HoldId, Money};
use ledger_testdb as testing;

#[testing::test]
fn the_daemon_expires_due_holds_in_batches_and_leaves_the_others_pending() {
    let db = testing::committed();
    let mut conn = db.conn();
    let payer = testing::funded_account(&mut conn, "payer", Currency::EUR, "1000.00");
    let payee = testing::funded_account(&mut conn, "payee", Currency::EUR, "0.00");
    let request = |amount: &str, timeout: Option<&str>| HoldRequest {
        from: payer,
        to: payee,
        amount: Money::parse(amount, Currency::EUR).unwrap(),
        timeout: timeout.map(|t| Timeout::parse(t).unwrap()),
        key: testing::key("daemon-hold"),
    };
    let mut hold = |amount: &str, timeout: Option<&str>| holds::hold(&mut conn, &request(amount, timeout)).unwrap();
    // 250 holds due within a second: more than two of the daemon's batches of 100.
    let due: Vec<HoldId> = (0..250).map(|_| hold("1.00", Some("500ms")).hold.id).collect();
    let later = hold("5.00", Some("1h")).hold.id;
    let never = hold("7.00", None).hold.id;
    let posted = hold("9.00", Some("500ms")).hold.id;
    holds::post(&mut conn, posted, None, &testing::key("post")).unwrap();
    assert_eq!(common::count(&mut conn, "SELECT count(*) AS n FROM holds WHERE status = 'pending'"), 252);

    let mut daemon =
        spawn_daemon(db.url(), &["--gateway", "none", "--hold-expiry-interval-ms", "50", "--hold-expiry-batch", "100"]);
    wait_for(Duration::from_secs(60), "the daemon to expire the 250 due holds", || {
        common::count(&mut conn, "SELECT count(*) AS n FROM holds WHERE status = 'expired'") == 250
    });
    let kill = std::process::Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = wait_exit(&mut daemon, Duration::from_secs(30));
    assert!(status.success(), "exit status {status}: {}", stderr_of(&mut daemon));

    for id in &due {
        let h = holds::get(&mut conn, *id).unwrap();
        assert_eq!((h.status, h.returned_minor()), (HoldStatus::Expired, 100), "hold {id}");
    }
    assert_eq!(holds::get(&mut conn, later).unwrap().status, HoldStatus::Pending);
    assert_eq!(holds::get(&mut conn, never).unwrap().status, HoldStatus::Pending);
    assert_eq!(holds::get(&mut conn, posted).unwrap().status, HoldStatus::Posted, "a post before expiry stands");
    let b = holds::balance(&mut conn, payer).unwrap();
    assert_eq!((b.balance_minor, b.pending_debits_minor), (100_000 - 900 - 1_200, 1_200));
    assert_eq!(holds::balance(&mut conn, payee).unwrap().balance_minor, 900);
    let report = ledger_core::audit::run(&mut conn).unwrap();
    assert!(report.is_clean(), "{report}");
}
