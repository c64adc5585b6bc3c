//! Bounded shutdown: after SIGTERM or SIGINT, `ledger-worker run` exits within
//! `--shutdown-grace-ms` plus 5 s whether the database is up, stopped, blackholed, or
//! its pool exhausted, and whether the payout gateway answers or hangs; and whatever it
//! did not finish is left untouched (pending, or a payout due again after its lease),
//! never half done. Real processes, real PostgreSQL, real sockets.
//!
//! Exit status: 0 when every thread ended within the grace period (plus a second), 3
//! when the daemon stopped waiting for threads stuck in a database or gateway call.

#[path = "../common/mod.rs"]
mod common;
mod database;
mod gateway;
mod last_line;
#[path = "../support/mod.rs"]
mod support;

use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use ledger_core::db::{self, SessionConfig};
use ledger_testbank::{Bank, BankConfig};
use ledger_testdb::{self as testing, Durability, TempCluster};
use support::Proxy;

const GRACE_MS: u64 = 2_000;

const GRACE: &str = "2000";

/// The promise under test: the daemon is gone this long after the grace period.
const SLACK: Duration = Duration::from_secs(5);

const CLEAN: i32 = 0;

const FORCED: i32 = 3;

/// Sends `signal` ("TERM" or "INT") to the daemon, waits for it to exit (killing it,
/// and failing, if it takes far longer than promised) and checks that it exited with
/// `expected` within the grace period plus [`SLACK`]. Returns how long it took.
fn stop(daemon: &mut Child, signal: &str, expected: i32, case: &str) -> Duration {
    let pid = daemon.id().to_string();
    let sent = Instant::now();
    let kill = Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap();
    assert!(kill.success(), "kill -{signal} {pid}");
    let status: ExitStatus = wait_exit(daemon, Duration::from_millis(GRACE_MS) + Duration::from_secs(60));
    let took = sent.elapsed();
    eprintln!("shutdown case {case}: SIG{signal} -> exit {status} after {} ms", took.as_millis());
    assert!(
        took <= Duration::from_millis(GRACE_MS) + SLACK,
        "case {case}: exited after {took:?}, more than the grace period ({GRACE_MS} ms) plus {SLACK:?}"
    );
    assert_eq!(status.code(), Some(expected), "case {case}: exit status {status}: {}", stderr_of(daemon));
    took
}

/// The threads the daemon said it stopped waiting for ("name: what"), from its log.
fn still_running(daemon: &Child) -> Vec<String> {
    let log = log_path(daemon).map(|p| std::fs::read_to_string(p).unwrap_or_default()).unwrap_or_default();
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"].as_str().is_some_and(|m| m.starts_with("threads still busy")))
        .filter_map(|v| v["fields"]["threads"].as_str().map(str::to_string))
        .flat_map(|t| t.split("; ").map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// Whatever finished is whole (exactly once, clean audit); whatever did not is
/// untouched: still pending with no debit and no attempt recorded.
fn assert_nothing_half_done(conn: &mut PgConnection) {
    assert_exactly_once(conn);
    let touched = count(
        conn,
        "SELECT count(*) AS n FROM withdrawals WHERE status = 'pending' AND (entry_id IS NOT NULL OR attempts > 0)",
    );
    assert_eq!(touched, 0, "pending withdrawals that were touched: {}", statuses(conn));
}

/// A restarted daemon finishes everything: no withdrawal left pending, paying out or
/// failed, and each effect exactly once.
fn restart_and_finish(url: &str, extra: &[&str], conn: &mut PgConnection) {
    let mut again = spawn_daemon_with_env(url, &[extra, &["--exit-when-idle"]].concat(), CREDENTIALS);
    let status = wait_exit(&mut again, Duration::from_secs(120));
    assert!(status.success(), "restarted daemon: {status}: {}", stderr_of(&mut again));
    let unfinished =
        count(conn, "SELECT count(*) AS n FROM withdrawals WHERE status NOT IN ('completed', 'rejected', 'returned')");
    assert_eq!(unfinished, 0, "{}", statuses(conn));
    assert_eq!(count(conn, "SELECT count(*) AS n FROM payouts WHERE status <> 'settled'"), 0);
    assert_exactly_once(conn);
}

/// A server of the test's own (its faults reach no other test), with a migrated
/// database `shutdown_test`.
fn own_server() -> (TempCluster, String) {
    let cluster = TempCluster::start(Durability::Throwaway).expect("starting a throwaway cluster");
    let mut admin = db::connect(&cluster.url("postgres"), &SessionConfig::default()).unwrap();
    admin.batch_execute("CREATE DATABASE shutdown_test").unwrap();
    let url = cluster.url("shutdown_test");
    let mut conn = db::connect(&url, &SessionConfig::default()).unwrap();
    db::run_migrations(&mut conn).unwrap();
    (cluster, url)
}

/// Small batches and two workers keep the run going long enough to be stopped mid-way.
const LOAD: &[&str] = &["--threads", "2", "--batch-size", "2", "--shutdown-grace-ms", GRACE];

/// Payouts through the log gateway, with a lease that leaves room for three gateway
/// calls (a lookup, a send and a confirming lookup) plus a margin.
const LOG_PAYOUTS: &[&str] = &[
    "--gateway",
    "log",
    "--payout-lease-ms",
    "6000",
    "--payout-timeout-ms",
    "1000",
    "--payout-connect-timeout-ms",
    "500",
];

/// The webhook gateway's credentials, which the bank checks.
const CREDENTIALS: &[(&str, &str)] =
    &[("LEDGER_PAYOUT_WEBHOOK_TOKEN", "shutdown-test-token"), ("LEDGER_PAYOUT_WEBHOOK_SECRET", "shutdown-test-secret")];

/// The figures the daemon's last line must match, counted directly in the database.
const DIRECT_COUNTS: &[(&str, &str)] = &[
    ("withdrawals_pending", "SELECT count(*) AS n FROM withdrawals WHERE status = 'pending'"),
    (
        "withdrawals_retry_waiting",
        "SELECT count(*) AS n FROM withdrawals WHERE status = 'pending' AND next_attempt_at > now()",
    ),
    ("withdrawals_paying_out", "SELECT count(*) AS n FROM withdrawals WHERE status = 'paying_out'"),
    ("withdrawals_failed", "SELECT count(*) AS n FROM withdrawals WHERE status = 'failed'"),
    ("payouts_pending", "SELECT count(*) AS n FROM payouts WHERE status = 'pending'"),
    ("payouts_failed", "SELECT count(*) AS n FROM payouts WHERE status = 'failed'"),
];

/// When the database cannot be read at the stop, the last line says so and why, and
/// carries no figure for it.
fn assert_counts_unread(daemon: &mut Child, why: &str) {
    let log = log_path(daemon).map(|p| std::fs::read_to_string(p).unwrap_or_default()).unwrap_or_default();
    let stopped: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"].as_str().is_some_and(|m| m.starts_with("stopped")))
        .collect();
    assert_eq!(stopped.len(), 1, "one last line: {}", stderr_of(daemon));
    let fields = &stopped[0]["fields"];
    eprintln!("the last line: {fields}");
    assert!(fields["message"].as_str().unwrap().contains("could not be read"), "{fields}");
    let error = fields["counts_error"].as_str().unwrap_or_default();
    assert!(error.contains(why), "counts_error says why ({why}): {fields}");
    for (field, _) in DIRECT_COUNTS {
        assert!(fields.get(field).is_none(), "no made-up {field}: {fields}");
    }
}
