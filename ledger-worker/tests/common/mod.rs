//! Shared set-up and checks for the daemon and CLI tests.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use ledger_core::withdrawals::{self, Iban, WithdrawalRequest};
use ledger_core::{AccountId, Currency, LedgerError, Money, TxOptions, WithdrawalId};
use ledger_testdb as testing;

pub const IBAN: &str = "DE89370400440532013000";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ledger-worker")
}

/// Opens `accounts` accounts holding `funds` each and enqueues `jobs` withdrawals of
/// 1.00 to 30.00 spread over them (more than the funds: some will be refused).
pub fn seed(conn: &mut PgConnection, accounts: usize, funds: &str, jobs: usize) -> (Vec<AccountId>, Vec<WithdrawalId>) {
    let ids: Vec<AccountId> =
        (0..accounts).map(|i| testing::funded_account(conn, &format!("c{i}"), Currency::EUR, funds)).collect();
    let mut jobs_out = Vec::with_capacity(jobs);
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(1_000) {
        let made = ledger_core::transaction(conn, &TxOptions::default(), |tx| {
            chunk
                .iter()
                .map(|&i| {
                    let req = WithdrawalRequest {
                        account: ids[i % ids.len()],
                        amount: Money::from_minor(100 + (i as i64 * 7_919) % 2_900, Currency::EUR).unwrap(),
                        destination: Iban::parse(IBAN).unwrap(),
                        key: testing::key("job"),
                    };
                    withdrawals::request_tx(tx, &req).map(|(id, _)| id)
                })
                .collect::<Result<Vec<_>, LedgerError>>()
        })
        .unwrap();
        jobs_out.extend(made);
    }
    (ids, jobs_out)
}

#[derive(QueryableByName, Debug)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

pub fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap_or_else(|e| panic!("{sql}: {e}")).n
}

pub fn pending(conn: &mut PgConnection) -> i64 {
    count(conn, "SELECT count(*) AS n FROM withdrawals WHERE status = 'pending'")
}

pub fn finished(conn: &mut PgConnection) -> i64 {
    count(conn, "SELECT count(*) AS n FROM withdrawals WHERE status <> 'pending'")
}

/// Every withdrawal's effect applied exactly once: debited ones (paying out, completed
/// or returned) have exactly one journal entry debiting exactly their amount and
/// exactly one payout; nothing else moved money out; the audit is clean.
pub fn assert_exactly_once(conn: &mut PgConnection) {
    let debited =
        count(conn, "SELECT count(*) AS n FROM withdrawals WHERE status IN ('paying_out', 'completed', 'returned')");
    let entries = count(conn, "SELECT count(*) AS n FROM journal_entries WHERE kind = 'withdrawal'");
    let payouts = count(conn, "SELECT count(*) AS n FROM payouts");
    assert_eq!((entries, payouts), (debited, debited), "debited withdrawals = debits = payouts");
    let mismatched = count(
        conn,
        "SELECT count(*) AS n FROM withdrawals w
         LEFT JOIN payouts p ON p.withdrawal_id = w.id
         WHERE (w.status IN ('paying_out', 'completed', 'returned')) <> (p.id IS NOT NULL)
            OR (p.id IS NOT NULL AND p.amount_minor <> w.amount_minor)",
    );
    assert_eq!(mismatched, 0, "each debited withdrawal has its own payout of its amount");
    let debited_twice = count(
        conn,
        "SELECT count(*) AS n FROM (SELECT reference FROM journal_entries WHERE kind = 'withdrawal'
                                    GROUP BY reference HAVING count(*) > 1) d",
    );
    assert_eq!(debited_twice, 0, "no withdrawal debited twice");
    let below_floor = count(conn, "SELECT count(*) AS n FROM accounts WHERE balance_minor < -overdraft_limit_minor");
    assert_eq!(below_floor, 0);
    let report = ledger_core::audit::run(conn).unwrap();
    assert!(report.is_clean(), "{report}");
}

/// The statuses present, for messages.
pub fn statuses(conn: &mut PgConnection) -> String {
    #[derive(QueryableByName)]
    struct S {
        #[diesel(sql_type = Text)]
        s: String,
    }
    diesel::sql_query(
        "SELECT string_agg(status || '=' || n, ', ') AS s FROM
           (SELECT status, count(*) AS n FROM withdrawals GROUP BY status ORDER BY status) x",
    )
    .get_result::<S>(conn)
    .map(|r| r.s)
    .unwrap_or_default()
}

/// A `ledger-worker` command that dies with this test process: the kernel sends it
/// SIGKILL when the thread that started it exits (Linux's parent-death signal), so a
/// test binary that is killed, even with SIGKILL, leaves no daemon behind.
pub fn worker_command() -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin());
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would ever
            // send the signal.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd
}

/// A daemon started by [`spawn_daemon`]: a `Child` (through `Deref`) that is killed and
/// reaped when dropped, also when the test panics.
pub struct Daemon(Child);

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl From<Child> for Daemon {
    /// Any child process, killed and reaped when dropped.
    fn from(child: Child) -> Daemon {
        Daemon(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `ledger-worker run`. Its log goes to a file (a pipe nobody reads while the
/// test runs would fill up and block the daemon); `stderr_of` reads it back.
pub fn spawn_daemon(url: &str, extra: &[&str]) -> Daemon {
    spawn_daemon_with_env(url, extra, &[])
}

/// [`spawn_daemon`] with extra environment variables (credentials, for example).
pub fn spawn_daemon_with_env(url: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
    // Cargo's per-target scratch directory: kept for inspection, removed by `cargo clean`.
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "ledger-daemon-{}-{}.log",
        std::process::id(),
        LOGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let file = std::fs::File::create(&log).expect("creating the daemon log");
    // A short payout lease, so payouts a killed daemon had claimed come back quickly.
    let lease: &[&str] = if extra.contains(&"--payout-lease-ms") {
        &[]
    } else {
        &["--payout-lease-ms", "2000", "--payout-timeout-ms", "300", "--payout-connect-timeout-ms", "200"]
    };
    // Tests that name no gateway pay out through the log gateway.
    let gateway: &[&str] = if extra.contains(&"--gateway") { &[] } else { &["--gateway", "log"] };
    let child = worker_command()
        .args(["run", "--database-url", url, "--log-format", "json"])
        .args(lease)
        .args(gateway)
        .args(extra)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("starting the daemon");
    LOG_FILES.lock().unwrap().push((child.id(), log));
    Daemon(child)
}

static LOGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static LOG_FILES: std::sync::Mutex<Vec<(u32, std::path::PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// Waits for `cond`, polling; panics with `what` after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let _named = testing::deadline::waiting_for(what);
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for a child to exit, at most `timeout`; kills it and panics otherwise.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let _named = testing::deadline::waiting_for(format!("process {} to exit", child.id()));
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last lines a daemon started by `spawn_daemon` logged.
pub fn stderr_of(child: &mut Child) -> String {
    let files = LOG_FILES.lock().unwrap();
    let Some((_, path)) = files.iter().find(|(pid, _)| *pid == child.id()) else { return String::new() };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub fn log_path(child: &Child) -> Option<std::path::PathBuf> {
    LOG_FILES.lock().unwrap().iter().find(|(pid, _)| *pid == child.id()).map(|(_, p)| p.clone())
}
