//! Bounded shutdown: after SIGTERM or SIGINT, `ledger-worker run` exits within
//! `--shutdown-grace-ms` plus 5 s whether the database is up, stopped, blackholed, or
//! its pool exhausted, and whether the payout gateway answers or hangs; and whatever it
//! did not finish is left untouched (pending, or a payout due again after its lease),
//! never half done. Real processes, real PostgreSQL, real sockets.
//!
//! Exit status: 0 when every thread ended within the grace period (plus a second), 3
//! when the daemon stopped waiting for threads stuck in a database or gateway call.

mod common;
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

#[testing::test]
fn a_database_up_sigint_stops_cleanly_within_the_grace_period() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 3_000);
    let mut daemon = spawn_daemon_with_env(db.url(), &[LOAD, LOG_PAYOUTS].concat(), CREDENTIALS);
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    stop(&mut daemon, "INT", CLEAN, "(a) database up");
    assert!(pending(&mut conn) > 0, "the signal landed mid-run");
    assert_nothing_half_done(&mut conn);
    restart_and_finish(db.url(), LOG_PAYOUTS, &mut conn);
}

#[testing::test]
fn b_database_stopped_sigterm_stops_cleanly_within_the_grace_period() {
    let (cluster, url) = own_server();
    let mut conn = db::connect(&url, &SessionConfig::default()).unwrap();
    seed(&mut conn, 20, "500.00", 3_000);
    let mut daemon = spawn_daemon_with_env(&url, &[LOAD, LOG_PAYOUTS].concat(), CREDENTIALS);
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    drop(conn);
    cluster.stop_server().unwrap();
    // Give the daemon time to run into it: its workers wait for connections the pool
    // cannot make and retry, its claimer reconnects (when it has room to claim).
    std::thread::sleep(Duration::from_millis(1_500));
    stop(&mut daemon, "TERM", CLEAN, "(b) database stopped");
    assert_counts_unread(&mut daemon, "connecting to");
    cluster.start_server_again().unwrap();
    let mut conn = db::connect(&url, &SessionConfig::default()).unwrap();
    assert!(pending(&mut conn) > 0, "the stop landed mid-run");
    assert_nothing_half_done(&mut conn);
    restart_and_finish(&url, LOG_PAYOUTS, &mut conn);
    drop(conn);
    cluster.stop().unwrap();
}

#[testing::test]
fn c_database_blackholed_sigterm_exits_without_the_stuck_threads() {
    let (cluster, url) = own_server();
    let mut conn = db::connect(&url, &SessionConfig::default()).unwrap();
    seed(&mut conn, 20, "500.00", 3_000);
    let socket = cluster.socket_dir().join(format!(".s.PGSQL.{}", cluster.port()));
    let proxy = Proxy::start(socket.clone());
    let mut daemon = spawn_daemon_with_env(&proxy.url("shutdown_test"), &[LOAD, LOG_PAYOUTS].concat(), CREDENTIALS);
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    proxy.blackhole();
    // Every connection is silent now: progress stops, and the threads hang in libpq.
    let mut last = finished(&mut conn);
    let mut since = Instant::now();
    wait_for(Duration::from_secs(30), "progress to stop", || {
        let now = finished(&mut conn);
        if now != last {
            (last, since) = (now, Instant::now());
        }
        since.elapsed() >= Duration::from_millis(500)
    });
    stop(&mut daemon, "TERM", FORCED, "(c) database blackholed");
    assert_counts_unread(&mut daemon, "no answer from the database within");
    let stuck = still_running(&daemon);
    assert!(!stuck.is_empty(), "the log names the threads left behind: {}", stderr_of(&mut daemon));
    eprintln!("(c) left behind: {stuck:?}");
    // The network comes back: the server sees those connections end and rolls back.
    drop(proxy);
    assert!(pending(&mut conn) > 0, "the blackhole landed mid-run");
    assert_nothing_half_done(&mut conn);
    // A restart over TCP again (the URL gets the network timeouts appended).
    let proxy = Proxy::start(socket);
    restart_and_finish(&proxy.url("shutdown_test"), LOG_PAYOUTS, &mut conn);
    drop(proxy);
    drop(conn);
    cluster.stop().unwrap();
}

#[testing::test]
fn d_pool_exhausted_sigint_exits_and_waiters_for_a_connection_give_up() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 3_000);
    // Two pooled connections for three workers and two payout dispatchers, and lock
    // waits longer than the test: once the accounts are locked, both connections sit
    // in a lock wait and every other thread waits for one of them.
    let mut daemon = spawn_daemon_with_env(
        db.url(),
        &[
            &[
                "--threads",
                "3",
                "--batch-size",
                "2",
                "--pool-size",
                "2",
                "--lock-timeout-ms",
                "600000",
                "--shutdown-grace-ms",
                GRACE,
            ],
            LOG_PAYOUTS,
        ]
        .concat(),
        CREDENTIALS,
    );
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    let mut holder =
        db::connect(db.url(), &SessionConfig { lock_timeout_ms: None, ..SessionConfig::default() }).unwrap();
    holder.batch_execute("BEGIN; SELECT id FROM accounts WHERE kind = 'customer' ORDER BY id FOR UPDATE").unwrap();
    wait_for(Duration::from_secs(30), "both pooled connections to wait for a lock", || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()
               AND application_name = 'ledger-worker' AND wait_event_type = 'Lock'",
        ) >= 2
    });
    let before = finished(&mut conn);
    stop(&mut daemon, "INT", FORCED, "(d) pool exhausted");
    // Left behind: only the two workers inside a lock wait. The third worker and the
    // dispatchers, waiting for a connection, gave up in time.
    let stuck = still_running(&daemon);
    eprintln!("(d) left behind: {stuck:?}");
    assert!(!stuck.is_empty() && stuck.len() <= 2, "{stuck:?}");
    assert!(stuck.iter().all(|t| t.starts_with("worker-")), "{stuck:?}");
    assert_eq!(finished(&mut conn), before, "nothing committed while the accounts were locked");
    holder.batch_execute("ROLLBACK").unwrap();
    // The abandoned backends get their locks now, find their client gone and roll back.
    wait_for(Duration::from_secs(30), "the abandoned sessions to end", || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()
               AND application_name = 'ledger-worker'",
        ) == 0
    });
    assert_eq!(finished(&mut conn), before, "the abandoned transactions did not commit");
    assert_nothing_half_done(&mut conn);
    restart_and_finish(db.url(), LOG_PAYOUTS, &mut conn);
}

/// The webhook gateway's credentials, which the bank checks.
const CREDENTIALS: &[(&str, &str)] =
    &[("LEDGER_PAYOUT_WEBHOOK_TOKEN", "shutdown-test-token"), ("LEDGER_PAYOUT_WEBHOOK_SECRET", "shutdown-test-secret")];

/// A well-behaved bank that expects [`CREDENTIALS`] (and can be told to hang).
fn start_bank() -> Bank {
    let (token, secret) = (CREDENTIALS[0].1.to_string(), CREDENTIALS[1].1.to_string());
    Bank::start(BankConfig { token, secret, ..BankConfig::default() }).expect("starting the test bank")
}

/// The webhook gateway against `bank`, a gateway timeout of `timeout_ms` (plus 500 ms
/// to connect), and a lease of `lease_ms`: room for three calls plus a margin.
fn payout_args<'a>(bank: &'a Bank, timeout_ms: &'a str, lease_ms: &'a str) -> Vec<&'a str> {
    vec![
        "--gateway",
        "webhook",
        "--payout-webhook",
        bank.url(),
        "--payout-timeout-ms",
        timeout_ms,
        "--payout-connect-timeout-ms",
        "500",
        "--payout-lease-ms",
        lease_ms,
        "--payout-threads",
        "2",
        "--payout-batch",
        "4",
    ]
}

/// Every settled payout was paid by the bank; with `exactly`, every paid one is settled.
fn assert_settled_as_paid(conn: &mut PgConnection, bank: &Bank, exactly: bool) {
    #[derive(diesel::QueryableByName)]
    struct Key {
        #[diesel(sql_type = diesel::sql_types::Text)]
        key: String,
    }
    use diesel::RunQueryDsl;
    let settled: std::collections::HashSet<String> =
        diesel::sql_query("SELECT idempotency_key AS key FROM payouts WHERE status = 'settled'")
            .load::<Key>(conn)
            .unwrap()
            .into_iter()
            .map(|k| k.key)
            .collect();
    let paid: std::collections::HashSet<String> = bank.paid().into_keys().collect();
    assert!(settled.is_subset(&paid), "settled in the ledger => paid by the bank");
    if exactly {
        assert_eq!(settled, paid, "settled in the ledger <=> paid by the bank");
    }
}

#[testing::test]
fn e_gateway_answering_sigterm_stops_cleanly_within_the_grace_period() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 3_000);
    let bank = start_bank();
    let payout = payout_args(&bank, "1000", "6000");
    let mut daemon = spawn_daemon_with_env(db.url(), &[LOAD, &payout].concat(), CREDENTIALS);
    wait_for(Duration::from_secs(60), "payouts to settle", || {
        count(&mut conn, "SELECT count(*) AS n FROM payouts WHERE status = 'settled'") >= 50
    });
    stop(&mut daemon, "TERM", CLEAN, "(e) gateway answering");
    assert!(pending(&mut conn) > 0, "the signal landed mid-run");
    assert_nothing_half_done(&mut conn);
    // (An answer the daemon could not record before exiting is asked for again, with
    // the same key, after the lease: the bank answers it without paying twice.)
    assert_settled_as_paid(&mut conn, &bank, false);
    restart_and_finish(db.url(), &payout, &mut conn);
    assert_settled_as_paid(&mut conn, &bank, true);
}

#[testing::test]
fn f_gateway_hanging_sigterm_exits_and_cut_off_payouts_stay_pending() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 3_000);
    let bank = start_bank();
    // A gateway timeout past the grace period (plus the second of wind-down), so the
    // calls are cut off by the exit, not by their timeout.
    let payout = payout_args(&bank, "4000", "15000");
    let mut daemon = spawn_daemon_with_env(db.url(), &[LOAD, &payout].concat(), CREDENTIALS);
    wait_for(Duration::from_secs(60), "payouts to settle", || {
        count(&mut conn, "SELECT count(*) AS n FROM payouts WHERE status = 'settled'") >= 20
    });
    bank.set_hang(true);
    wait_for(Duration::from_secs(30), "both dispatchers to hang in a call", || bank.hung_keys().len() >= 2);
    stop(&mut daemon, "TERM", FORCED, "(f) gateway hanging");
    let stuck = still_running(&daemon);
    eprintln!("(f) left behind: {stuck:?}");
    assert!(
        !stuck.is_empty()
            && stuck.iter().all(|t| t.starts_with("payouts-") && t.ends_with("calling the payout gateway")),
        "{stuck:?}"
    );
    // The cut-off payouts were neither paid nor refused: pending, due after their lease.
    for key in bank.hung_keys() {
        let status = count(
            &mut conn,
            &format!("SELECT count(*) AS n FROM payouts WHERE idempotency_key = '{key}' AND status = 'pending'"),
        );
        assert_eq!(status, 1, "payout {key} is still pending");
    }
    assert_nothing_half_done(&mut conn);
    assert_settled_as_paid(&mut conn, &bank, false);
    // They are claimed again once their lease runs out. A payout whose call was cut
    // off may have been paid, so it is looked up before it is sent again; the webhook
    // gateway cannot look payouts up yet, so the rest is paid through the log gateway
    // (which knows no earlier call and sends it again).
    restart_and_finish(db.url(), LOG_PAYOUTS, &mut conn);
    for key in bank.hung_keys() {
        let settled = count(
            &mut conn,
            &format!("SELECT count(*) AS n FROM payouts WHERE idempotency_key = '{key}' AND status = 'settled'"),
        );
        assert_eq!(settled, 1, "payout {key} was claimed again after its lease and settled");
    }
}

#[testing::test]
fn g_a_second_signal_exits_at_once_without_waiting_for_the_grace_period() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 5, "500.00", 200);
    // Every account locked before the daemon starts: its first batch waits for a lock,
    // and a first signal would wait out a long grace period for it.
    let mut holder =
        db::connect(db.url(), &SessionConfig { lock_timeout_ms: None, ..SessionConfig::default() }).unwrap();
    holder.batch_execute("BEGIN; SELECT id FROM accounts WHERE kind = 'customer' ORDER BY id FOR UPDATE").unwrap();
    let mut daemon = spawn_daemon_with_env(
        db.url(),
        &[&["--threads", "1", "--lock-timeout-ms", "600000", "--shutdown-grace-ms", "60000"], LOG_PAYOUTS].concat(),
        CREDENTIALS,
    );
    wait_for(Duration::from_secs(30), "a batch to wait for a lock", || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()
               AND application_name = 'ledger-worker' AND wait_event_type = 'Lock'",
        ) >= 1
    });
    let kill = |signal: &str, pid: u32| {
        assert!(Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap().success());
    };
    kill("TERM", daemon.id());
    std::thread::sleep(Duration::from_millis(500));
    assert!(daemon.try_wait().unwrap().is_none(), "the first signal waits for the grace period");
    let sent = Instant::now();
    kill("INT", daemon.id());
    let status = wait_exit(&mut daemon, Duration::from_secs(30));
    eprintln!("second signal -> exit {status} after {} ms", sent.elapsed().as_millis());
    assert!(sent.elapsed() < Duration::from_secs(5), "a second signal exits at once");
    assert_eq!(status.code(), Some(FORCED), "{}", stderr_of(&mut daemon));
    holder.batch_execute("ROLLBACK").unwrap();
    assert_eq!(finished(&mut conn), 0, "nothing was done");
    assert_nothing_half_done(&mut conn);
    restart_and_finish(db.url(), LOG_PAYOUTS, &mut conn);
}

static INFO_LOGS: AtomicUsize = AtomicUsize::new(0);

/// A daemon whose log keeps the `info` lines (the shared `spawn_daemon` logs warnings
/// only), killed and reaped when dropped, also when the test panics.
struct InfoDaemon {
    child: Child,
    log: std::path::PathBuf,
}

impl InfoDaemon {
    fn start(url: &str, extra: &[&str]) -> InfoDaemon {
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "ledger-daemon-{}-info-{}.log",
            std::process::id(),
            INFO_LOGS.fetch_add(1, SeqCst)
        ));
        let file = std::fs::File::create(&log).expect("creating the daemon log");
        let child = worker_command()
            .args(["run", "--database-url", url, "--log-format", "json"])
            .args(extra)
            .envs(CREDENTIALS.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("starting the daemon");
        InfoDaemon { child, log }
    }

    /// The daemon's log lines (JSON objects) whose message starts with `prefix`.
    fn lines(&self, prefix: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
            .collect()
    }
}

impl Drop for InfoDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

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

#[testing::test]
fn h_after_sigterm_the_last_line_says_what_the_database_still_holds() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 3_000);
    let mut daemon = InfoDaemon::start(db.url(), &[LOAD, LOG_PAYOUTS].concat());
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    stop(&mut daemon.child, "TERM", CLEAN, "(h) counts after the stop");
    let stopped = daemon.lines("stopped");
    assert_eq!(stopped.len(), 1, "one last line: {stopped:?}");
    let fields = &stopped[0]["fields"];
    eprintln!("(h) the last line: {fields}");
    assert!(fields.get("counts_error").is_none(), "the counts were read: {fields}");
    // The in-memory figure is there, under a name that says what it is.
    assert!(fields["unfinished_in_memory"].is_u64(), "{fields}");
    assert!(fields.get("left_pending").is_none(), "{fields}");
    // Every database figure is exactly what the database says, now that the daemon is gone.
    for (field, sql) in DIRECT_COUNTS {
        let direct = count(&mut conn, sql);
        assert_eq!(fields[field].as_i64(), Some(direct), "{field}: logged {} but counted {direct}", fields[field]);
    }
    let left = count(&mut conn, DIRECT_COUNTS[0].1);
    assert!(left > 0, "the signal landed mid-run, with withdrawals still pending");
    // The pool's own line agrees.
    let pool_line = daemon.lines("worker pool stopped");
    assert_eq!(pool_line.len(), 1, "{pool_line:?}");
    assert_eq!(pool_line[0]["fields"]["withdrawals_pending"].as_i64(), Some(left));
    assert_nothing_half_done(&mut conn);
    restart_and_finish(db.url(), LOG_PAYOUTS, &mut conn);
}

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
