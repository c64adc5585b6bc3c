//! `ledger-worker bench`: throughput, hot-account and latency numbers, with PostgreSQL's
//! own pgbench run on the same server in the same run as the reference.
//!
//! Each scenario runs every mode on a fresh database of its own. The worker runs as a
//! separate `ledger-worker run` process (so its RSS is its own):
//! - `debit-only` (`--gateway none`): withdrawals processed (locked, checked, debited,
//!   journaled, payout queued, committed) per second; payouts are not dispatched.
//! - `e2e log` (`--gateway log`): withdrawals debited, paid out through the log gateway
//!   and settled (withdrawal `completed`, or `rejected`/`returned`) per second, from the
//!   worker's start until no withdrawal is `pending` or `paying_out`.
//! - `e2e webhook` (`--gateway webhook`): the same through the webhook gateway, to a
//!   local bank the bench runs in-process ([`bank`]) with fresh random credentials.
//!
//! Then a latency phase per mode: arrivals at half that mode's peak, p50/p99 from enqueue
//! to debited (debit-only) or to final (end to end). pgbench's TPC-B-like transaction at
//! the same concurrency on the same server is the reference for every mode.

pub mod bank;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Nullable};
use ledger_core::accounts::{self, NewAccount};
use ledger_core::transfers::{self, Transfer};
use ledger_core::{audit, db, AccountId, Amount, Currency, IdempotencyKey, LedgerError, TxOptions};
use serde_json::json;

use self::bank::{Bank, BankStats};
use crate::database::Database;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Withdrawals spread over 1,000 accounts (pgbench reference: scale 10).
    Spread,
    /// Every withdrawal on one account (pgbench reference: scale 1, one branch row).
    Hot,
    /// Transfers between random pairs, both directions (pgbench reference: scale 10).
    Transfers,
    All,
}

/// How far a withdrawal goes before it counts as done (spread and hot scenarios).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `run --gateway none`: debited (payout queued, not sent).
    DebitOnly,
    /// `run --gateway log`: debited, paid out through the log gateway and settled.
    Log,
    /// `run --gateway webhook` to a local bank the bench starts: debited, paid and settled.
    Webhook,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::DebitOnly, Mode::Log, Mode::Webhook];

    fn label(self) -> &'static str {
        match self {
            Mode::DebitOnly => "debit-only",
            Mode::Log => "e2e log",
            Mode::Webhook => "e2e webhook",
        }
    }

    fn gateway(self) -> &'static str {
        match self {
            Mode::DebitOnly => "none",
            Mode::Log => "log",
            Mode::Webhook => "webhook",
        }
    }

    fn end_to_end(self) -> bool {
        self != Mode::DebitOnly
    }
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub database_url: Option<String>,
    pub scenario: Scenario,
    pub withdrawals: usize,
    /// Worker threads; `None`: 4 for spread and transfers, 8 for hot.
    pub threads: Option<usize>,
    pub batch_size: usize,
    pub accounts: Option<usize>,
    pub pgbench: bool,
    pub pgbench_seconds: u64,
    pub latency_seconds: u64,
    /// Arrivals per second in the latency phase; `None`: half the measured peak.
    pub latency_rate: Option<f64>,
    pub json: bool,
    /// Print where the time of the throughput phase went (pg_stat_statements and CPU).
    pub profile: bool,
}

/// The modes measured and the payout settings of the worker under test. `None` leaves a
/// setting at the worker's default (nothing passed).
#[derive(Clone, Debug)]
pub struct ModeOptions {
    pub modes: Vec<Mode>,
    /// `--payout-threads`.
    pub payout_threads: Option<usize>,
    /// `--payout-batch`.
    pub payout_batch: Option<usize>,
    /// `--payout-concurrency`, passed only if the worker has the flag.
    pub payout_concurrency: Option<usize>,
    /// How long the local bank takes to answer each call.
    pub bank_delay: Duration,
}

impl Default for ModeOptions {
    fn default() -> Self {
        ModeOptions {
            modes: Mode::ALL.to_vec(),
            payout_threads: None,
            payout_batch: None,
            payout_concurrency: None,
            bank_delay: Duration::from_millis(1),
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Row {
    scenario: &'static str,
    /// `debit-only`, `e2e log`, `e2e webhook`, or `transfer` (in-process).
    mode: &'static str,
    gateway: Option<&'static str>,
    threads: usize,
    ops: usize,
    ops_per_sec: f64,
    latency_rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    rss_mb: f64,
    audit_clean: bool,
    pgbench_scale: u32,
    pgbench_tps: Option<f64>,
    /// The same scenario's debit-only rate (end-to-end rows only).
    debit_only_ops_per_sec: Option<f64>,
    bank: Option<BankStats>,
    /// Payout flags passed to the worker (end to end; empty: its defaults).
    payout_args: Vec<String>,
    /// Why this mode could not be measured.
    error: Option<String>,
}

/// The worker's flags that not every build has.
#[derive(Clone, Copy, Debug, Default)]
struct WorkerFlags {
    payout_concurrency: bool,
}

pub fn run(opts: &BenchOptions) -> Result<()> {
    run_with(opts, &ModeOptions::default())
}

pub fn run_with(opts: &BenchOptions, modes: &ModeOptions) -> Result<()> {
    if opts.withdrawals == 0 || opts.batch_size == 0 {
        bail!("--withdrawals and --batch-size must be at least 1");
    }
    if modes.modes.is_empty() {
        bail!("no mode to measure");
    }
    let flags = worker_flags()?;
    if modes.payout_concurrency.is_some() && !flags.payout_concurrency {
        eprintln!("   (this worker has no --payout-concurrency flag: its built-in concurrency is used)");
    }
    let settings: &[&str] = if opts.profile {
        &["shared_preload_libraries = 'pg_stat_statements'", "pg_stat_statements.track = 'all'"]
    } else {
        &[]
    };
    let database = Database::given_or_throwaway_with(opts.database_url.clone(), "ledger_bench_admin", settings)?;
    let result = run_all(&database, opts, modes, flags);
    let stopped = database.shutdown();
    let rows = result?;
    stopped?;
    print_table(&rows, opts.json);
    let failed: Vec<String> =
        rows.iter().filter_map(|r| r.error.as_ref().map(|e| format!("{} {}: {e}", r.scenario, r.mode))).collect();
    if !failed.is_empty() {
        bail!("{} mode(s) failed: {}", failed.len(), failed.join("; "));
    }
    if let Some(r) = rows.iter().find(|r| !r.audit_clean) {
        bail!("the audit found violations after {} {}", r.scenario, r.mode);
    }
    Ok(())
}

/// Asks the worker binary which optional `run` flags it has.
fn worker_flags() -> Result<WorkerFlags> {
    let exe = std::env::current_exe().context("locating ledger-worker")?;
    let help =
        Command::new(exe).args(["run", "--help"]).stdin(Stdio::null()).output().context("ledger-worker run --help")?;
    let text = String::from_utf8_lossy(&help.stdout);
    Ok(WorkerFlags { payout_concurrency: text.contains("--payout-concurrency") })
}

fn run_all(database: &Database, opts: &BenchOptions, modes: &ModeOptions, flags: WorkerFlags) -> Result<Vec<Row>> {
    let scenarios = match opts.scenario {
        Scenario::All => vec![Scenario::Spread, Scenario::Hot, Scenario::Transfers],
        s => vec![s],
    };
    let mut rows = vec![];
    for s in scenarios {
        let threads = opts.threads.unwrap_or(if s == Scenario::Hot { 8 } else { 4 });
        let base = Row {
            scenario: scenario_name(s),
            threads,
            ops: opts.withdrawals,
            pgbench_scale: if s == Scenario::Hot { 1 } else { 10 },
            ..Default::default()
        };
        let scenario_modes: Vec<Option<Mode>> =
            if s == Scenario::Transfers { vec![None] } else { modes.modes.iter().copied().map(Some).collect() };
        let mut these = vec![];
        for mode in scenario_modes {
            let tag = mode.map(Mode::gateway).unwrap_or("transfers");
            let name = format!("ledger_bench_{}_{tag}_{}", scenario_name(s), std::process::id());
            let url = database.create_sibling(&name)?;
            let mut row = Row { mode: mode.map(Mode::label).unwrap_or("transfer"), ..base.clone() };
            let measured = match mode {
                None => run_transfer_scenario(&url, &mut row),
                Some(mode) => run_mode(&url, s, mode, opts, modes, flags, &mut row),
            };
            database.drop_sibling(&name)?;
            if let Err(e) = measured {
                eprintln!("   {} {}: FAILED: {e:#}", row.scenario, row.mode);
                row.error = Some(format!("{e:#}"));
            }
            these.push(row);
        }
        if opts.pgbench {
            let tps = pgbench(
                database,
                &format!("ledger_bench_{}_pgbench_{}", scenario_name(s), std::process::id()),
                base.pgbench_scale,
                threads,
                opts,
            )?;
            these.iter_mut().for_each(|r| r.pgbench_tps = Some(tps));
        }
        let debit_only =
            these.iter().find(|r| r.mode == Mode::DebitOnly.label() && r.error.is_none()).map(|r| r.ops_per_sec);
        for r in these.iter_mut().filter(|r| r.mode != Mode::DebitOnly.label() && r.gateway.is_some()) {
            r.debit_only_ops_per_sec = debit_only;
        }
        rows.extend(these);
    }
    Ok(rows)
}

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Spread => "spread",
        Scenario::Hot => "hot",
        Scenario::Transfers => "transfers",
        Scenario::All => "all",
    }
}

/// Enough money that nothing is refused: the bench measures the happy path.
fn setup(url: &str, account_count: usize, n: usize) -> Result<(PgConnection, Vec<AccountId>)> {
    let mut conn = db::connect(url, &db::SessionConfig::default())?;
    db::run_migrations(&mut conn)?;
    let accounts = open_accounts(&mut conn, account_count)?;
    fund(&mut conn, &accounts, n, "fund")?;
    Ok((conn, accounts))
}

fn run_transfer_scenario(url: &str, row: &mut Row) -> Result<()> {
    let n = row.ops;
    eprintln!("== transfers: {n} operations, 1000 account(s), {} thread(s)", row.threads);
    let (mut conn, accounts) = setup(url, 1_000, n)?;
    let started = Instant::now();
    run_transfers(url, &accounts, n, row.threads)?;
    row.ops_per_sec = n as f64 / started.elapsed().as_secs_f64();
    row.rss_mb = rss_mb(std::process::id()).unwrap_or(0.0);
    audit_into(&mut conn, row)
}

fn audit_into(conn: &mut PgConnection, row: &mut Row) -> Result<()> {
    let report = audit::run(conn)?;
    row.audit_clean = report.is_clean();
    if !report.is_clean() {
        eprintln!("{report}");
    }
    Ok(())
}

/// How the worker under test is started for one mode.
struct WorkerSpec<'a> {
    url: &'a str,
    mode: Mode,
    threads: usize,
    batch_size: usize,
    modes: &'a ModeOptions,
    flags: WorkerFlags,
    /// The local bank and the credentials it expects (webhook mode).
    bank: Option<(&'a Bank, &'a str, &'a str)>,
}

impl WorkerSpec<'_> {
    /// The payout settings passed to the worker (none: its defaults).
    fn payout_args(&self) -> Vec<String> {
        let mut args = vec![];
        if self.mode.end_to_end() {
            if let Some(n) = self.modes.payout_threads {
                args.extend(["--payout-threads".to_string(), n.to_string()]);
            }
            if let Some(n) = self.modes.payout_batch {
                args.extend(["--payout-batch".to_string(), n.to_string()]);
            }
            if let (Some(n), true) = (self.modes.payout_concurrency, self.flags.payout_concurrency) {
                args.extend(["--payout-concurrency".to_string(), n.to_string()]);
            }
        }
        args
    }
}

/// A `ledger-worker run` child process. Dropping it stops it (SIGTERM, then SIGKILL).
struct Worker {
    child: Child,
}

impl Worker {
    fn spawn(spec: &WorkerSpec<'_>, exit_when_idle: bool) -> Result<Worker> {
        use crate::webhook::{SECRET_FILE_VAR, SECRET_VAR, TOKEN_FILE_VAR, TOKEN_VAR};
        let exe = std::env::current_exe().context("locating ledger-worker")?;
        let mut cmd = Command::new(exe);
        cmd.args(["run", "--gateway", spec.mode.gateway(), "--log-format", "json"])
            .args(["--threads", &spec.threads.to_string(), "--batch-size", &spec.batch_size.to_string()])
            .args(["--poll-interval-ms", "200"])
            .env("DATABASE_URL", spec.url)
            .env("RUST_LOG", "warn")
            .env_remove(TOKEN_VAR)
            .env_remove(SECRET_VAR)
            .env_remove(TOKEN_FILE_VAR)
            .env_remove(SECRET_FILE_VAR)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd.args(spec.payout_args());
        if let Some((bank, token, secret)) = spec.bank {
            cmd.args(["--payout-webhook", &bank.url()]).env(TOKEN_VAR, token).env(SECRET_VAR, secret);
        }
        if exit_when_idle {
            cmd.arg("--exit-when-idle");
        }
        Ok(Worker { child: cmd.spawn().context("starting the worker")? })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill").args([signal, &self.pid().to_string()]).status();
    }

    /// Waits up to `patience` for the process to exit by itself, then asks it to stop.
    fn wait(&mut self, patience: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.stop()
    }

    /// SIGTERM (the worker's graceful stop); SIGKILL if it is still there 30 s later.
    fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal("-TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run_mode(
    url: &str,
    s: Scenario,
    mode: Mode,
    opts: &BenchOptions,
    modes: &ModeOptions,
    flags: WorkerFlags,
    row: &mut Row,
) -> Result<()> {
    let n = row.ops;
    let threads = row.threads;
    let account_count = match s {
        Scenario::Hot => 1,
        _ => opts.accounts.unwrap_or(1_000),
    };
    eprintln!("== {} {}: {n} operations, {account_count} account(s), {threads} thread(s)", row.scenario, mode.label());
    row.gateway = Some(mode.gateway());
    let (mut conn, accounts) = setup(url, account_count, n)?;
    // The webhook's bank, with credentials made for this run only.
    let credentials = (bank::random_hex(24), bank::random_hex(32));
    let bank = match mode {
        Mode::Webhook => {
            Some(Bank::start(&credentials.0, &credentials.1, modes.bank_delay).context("starting the local bank")?)
        }
        _ => None,
    };
    let spec = WorkerSpec {
        url,
        mode,
        threads,
        batch_size: opts.batch_size,
        modes,
        flags,
        bank: bank.as_ref().map(|b| (b, credentials.0.as_str(), credentials.1.as_str())),
    };
    row.payout_args = spec.payout_args();
    if mode.end_to_end() {
        let args = row.payout_args.join(" ");
        eprintln!("   payout settings: {}", if args.is_empty() { "the worker's defaults" } else { &args });
    }
    let measured = (|| -> Result<()> {
        enqueue_bulk(&mut conn, &accounts, n)?;
        let profiling = opts.profile && start_profile(&mut conn);
        let started = Instant::now();
        let mut worker = Worker::spawn(&spec, true)?;
        let pid = worker.pid();
        let (mut rss, mut cpu) = (0.0_f64, 0.0_f64);
        let mut progress = crate::progress::Progress::new(n);
        let mut shown = None::<Instant>;
        let mut stall = Stall::new();
        let elapsed = loop {
            rss = rss.max(rss_mb(pid).unwrap_or(0.0));
            cpu = cpu_seconds(pid).unwrap_or(cpu);
            let left = outstanding(&mut conn, mode)?;
            if left == 0 {
                break started.elapsed();
            }
            if let Some(status) = worker.try_wait()? {
                // It may have finished between the count and now.
                let left = outstanding(&mut conn, mode)?;
                if left == 0 && status.success() {
                    break started.elapsed();
                }
                bail!("the worker exited ({status}) with {left} withdrawal(s) not final");
            }
            check_bank(bank.as_ref())?;
            stall.check(left)?;
            if shown.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) {
                progress.show(n.saturating_sub(left as usize), started.elapsed());
                shown = Some(Instant::now());
            }
            // Counting is cheap near the end (partial indexes): watch the tail closely.
            thread::sleep(if left > 2_000 { Duration::from_millis(100) } else { Duration::from_millis(5) });
        };
        progress.finish(n, elapsed);
        let status = worker.wait(Duration::from_secs(30))?;
        if !status.success() {
            bail!("the worker exited with {status}");
        }
        row.ops_per_sec = n as f64 / elapsed.as_secs_f64();
        row.rss_mb = rss;
        if profiling {
            print_profile(&mut conn, "throughput", n, elapsed, cpu)?;
        }
        check_final(&mut conn, mode)?;
        latency_phase(&spec, &mut conn, &accounts, opts, bank.as_ref(), row)?;
        check_final(&mut conn, mode)?;
        check_bank(bank.as_ref())?;
        if let Some(bank) = &bank {
            let stats = bank.stats();
            row.bank = Some(stats);
            let settled = count(&mut conn, "SELECT count(*) AS n FROM payouts WHERE status = 'settled'")?;
            eprintln!(
                "   bank: {} paid, {} replays, {} lookups, {} connections (at most {} at once); ledger: {settled} settled",
                stats.paid, stats.replays, stats.lookups, stats.connections, stats.peak_connections
            );
            if stats.paid != settled as u64 {
                bail!("the bank paid {} payouts but the ledger settled {settled}", stats.paid);
            }
        }
        Ok(())
    })();
    measured?;
    audit_into(&mut conn, row)
}

/// Fails the run as soon as the bank refused a call: the worker broke the contract.
fn check_bank(bank: Option<&Bank>) -> Result<()> {
    let Some(stats) = bank.map(Bank::stats) else {
        return Ok(());
    };
    if stats.auth_failures > 0 {
        bail!(
            "the bank refused {} call(s) as unauthenticated (Authorization: Bearer and Ledger-Signature as the \
             webhook contract says)",
            stats.auth_failures
        );
    }
    if stats.bad_requests > 0 {
        bail!("the bank received {} request(s) off the webhook contract", stats.bad_requests);
    }
    Ok(())
}

/// Fails when nothing became final for a minute (a stuck worker, payouts failing).
struct Stall {
    least: i64,
    since: Instant,
}

impl Stall {
    const LIMIT: Duration = Duration::from_secs(60);

    fn new() -> Stall {
        Stall { least: i64::MAX, since: Instant::now() }
    }

    fn check(&mut self, left: i64) -> Result<()> {
        if left < self.least {
            self.least = left;
            self.since = Instant::now();
        } else if self.since.elapsed() > Stall::LIMIT {
            bail!("no progress for {} s: {left} withdrawal(s) not final", Stall::LIMIT.as_secs());
        }
        Ok(())
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> Result<i64> {
    Ok(diesel::sql_query(sql).get_result::<Count>(conn)?.n)
}

/// Withdrawals not done yet in this mode: pending, plus (end to end) those whose payout
/// is still pending. Both counts use partial indexes, so watching closely is cheap. (A
/// withdrawal whose payout `failed` is not counted here; [`check_final`] catches it.)
fn outstanding(conn: &mut PgConnection, mode: Mode) -> Result<i64> {
    let sql = if mode.end_to_end() {
        "SELECT (SELECT count(*) FROM withdrawals WHERE status = 'pending')
              + (SELECT count(*) FROM payouts WHERE status = 'pending') AS n"
    } else {
        "SELECT count(*) AS n FROM withdrawals WHERE status = 'pending'"
    };
    count(conn, sql)
}

/// Every withdrawal final for this mode: none pending; end to end, none paying out.
fn check_final(conn: &mut PgConnection, mode: Mode) -> Result<()> {
    #[derive(QueryableByName)]
    struct States {
        #[diesel(sql_type = BigInt)]
        pending: i64,
        #[diesel(sql_type = BigInt)]
        paying_out: i64,
        #[diesel(sql_type = BigInt)]
        completed: i64,
        #[diesel(sql_type = BigInt)]
        other: i64,
        #[diesel(sql_type = BigInt)]
        payouts_failed: i64,
    }
    let s: States = diesel::sql_query(
        "SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                count(*) FILTER (WHERE status = 'paying_out') AS paying_out,
                count(*) FILTER (WHERE status = 'completed') AS completed,
                count(*) FILTER (WHERE status NOT IN ('pending', 'paying_out', 'completed')) AS other,
                (SELECT count(*) FROM payouts WHERE status = 'failed') AS payouts_failed
         FROM withdrawals",
    )
    .get_result(conn)?;
    if s.pending > 0 {
        bail!("{} withdrawal(s) still pending", s.pending);
    }
    if mode.end_to_end() && s.paying_out > 0 {
        bail!("{} withdrawal(s) still paying out ({} payout(s) failed)", s.paying_out, s.payouts_failed);
    }
    // The accounts hold enough money and the bank accepts everything: anything but the
    // happy path means the numbers measured something else.
    if s.other > 0 || (!mode.end_to_end() && s.completed > 0) {
        bail!(
            "{} withdrawal(s) ended rejected, failed or returned ({} completed, {} paying out): not the happy \
             path the bench measures",
            s.other,
            s.completed,
            s.paying_out
        );
    }
    Ok(())
}

/// Opens `count` EUR accounts with a zero balance.
fn open_accounts(conn: &mut PgConnection, count: usize) -> Result<Vec<AccountId>> {
    let mut ids = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let made = ledger_core::transaction(conn, &TxOptions::default(), |tx| {
            chunk
                .iter()
                .map(|i| Ok(accounts::open_tx(tx, &NewAccount::new(format!("bench-{i}"), Currency::EUR), None)?.id))
                .collect::<Result<Vec<_>, LedgerError>>()
        })?;
        ids.extend(made);
    }
    Ok(ids)
}

/// Deposits enough for `jobs` more withdrawals (at most 10.00 each, spread at random)
/// into every account, with room to spare: the bench measures the happy path.
fn fund(conn: &mut PgConnection, accounts: &[AccountId], jobs: usize, tag: &str) -> Result<()> {
    let per_account_minor = ((jobs / accounts.len() + 1) as i64) * 1_000 * 4;
    for chunk in accounts.chunks(500) {
        ledger_core::transaction(conn, &TxOptions::default(), |tx| {
            for a in chunk {
                ledger_core::deposits::deposit_tx(
                    tx,
                    &ledger_core::deposits::Deposit {
                        account: *a,
                        amount: Amount::from_minor(per_account_minor)?,
                        currency: Currency::EUR,
                        key: IdempotencyKey::new(format!("bench-{tag}-{}", a.get()))?,
                    },
                )?;
            }
            Ok::<(), LedgerError>(())
        })?;
    }
    Ok(())
}

/// Inserts withdrawal jobs directly (the bench measures processing, not request intake).
fn insert_jobs(conn: &mut PgConnection, accounts: &[AccountId], count: usize, tag: &str) -> Result<()> {
    let ids: Vec<i64> = (0..count).map(|_| accounts[fastrand::usize(..accounts.len())].get()).collect();
    let amounts: Vec<i64> = (0..count).map(|_| fastrand::i64(100..=1_000)).collect();
    diesel::sql_query(
        "INSERT INTO withdrawals (account_id, currency, amount_minor, destination, idempotency_key)
         SELECT a, 'EUR', m, 'DE89370400440532013000', $3 || '-' || gen_random_uuid()
         FROM unnest($1::bigint[], $2::bigint[]) AS j(a, m)",
    )
    .bind::<diesel::sql_types::Array<BigInt>, _>(&ids)
    .bind::<diesel::sql_types::Array<BigInt>, _>(&amounts)
    .bind::<diesel::sql_types::Text, _>(tag)
    .execute(conn)?;
    Ok(())
}

fn enqueue_bulk(conn: &mut PgConnection, accounts: &[AccountId], n: usize) -> Result<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(5_000);
        insert_jobs(conn, accounts, k, "bench")?;
        left -= k;
    }
    Ok(())
}

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn start_profile(conn: &mut PgConnection) -> bool {
    use diesel::connection::SimpleConnection;
    match conn.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset();") {
        Ok(()) => true,
        Err(e) => {
            eprintln!("   (no profile: pg_stat_statements is not available: {e})");
            false
        }
    }
}

/// Where a job's time went: server time per statement (pg_stat_statements, this
/// database only) and the worker process's own CPU, per job.
fn print_profile(
    conn: &mut PgConnection,
    phase: &str,
    jobs: usize,
    elapsed: Duration,
    worker_cpu_s: f64,
) -> Result<()> {
    #[derive(QueryableByName)]
    struct Stmt {
        #[diesel(sql_type = diesel::sql_types::Text)]
        query: String,
        #[diesel(sql_type = BigInt)]
        calls: i64,
        #[diesel(sql_type = Double)]
        total_ms: f64,
    }
    let rows: Vec<Stmt> = diesel::sql_query(
        "SELECT left(regexp_replace(s.query, '\\s+', ' ', 'g'), 70) AS query, s.calls,
                s.total_exec_time AS total_ms
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
         WHERE d.datname = current_database() AND s.toplevel
         ORDER BY s.total_exec_time DESC LIMIT 10",
    )
    .load(conn)?;
    let server_ms: f64 = rows.iter().map(|r| r.total_ms).sum();
    eprintln!(
        "   profile of the {phase} phase ({jobs} jobs in {:.2} s on 2 cores = {:.0} µs of wall time per job):",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / jobs as f64
    );
    eprintln!(
        "   server execution {:.0} µs/job (top statements below), worker process CPU {:.0} µs/job",
        server_ms * 1e3 / jobs as f64,
        worker_cpu_s * 1e6 / jobs as f64
    );
    for r in rows {
        eprintln!(
            "   {:>7.1} µs/job {:>7} calls {:>7.2} ms/call  {}",
            r.total_ms * 1e3 / jobs as f64,
            r.calls,
            r.total_ms / r.calls.max(1) as f64,
            r.query
        );
    }
    Ok(())
}

/// Peak resident set size of a process, in MB (Linux `VmHWM`).
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Open-loop arrivals at half the mode's measured peak rate, with a worker waiting for
/// them: enqueue -> done latency as a user would see it (not queueing behind a backlog).
/// Done is debited for debit-only (`finished_at`); end to end it is final: the payout's
/// `updated_at` once settled or returned (set by the transaction recording it), or
/// `finished_at` for a withdrawal rejected outright. Either excludes that transaction's
/// own commit, a few ms.
fn latency_phase(
    spec: &WorkerSpec<'_>,
    conn: &mut PgConnection,
    accounts: &[AccountId],
    opts: &BenchOptions,
    bank: Option<&Bank>,
    row: &mut Row,
) -> Result<()> {
    let rate = opts.latency_rate.unwrap_or(row.ops_per_sec / 2.0).max(1.0);
    row.latency_rate = rate;
    let first_id = count(conn, "SELECT COALESCE(max(id), 0) AS n FROM withdrawals")?;
    // The arrivals below are on top of what the accounts were funded for.
    fund(conn, accounts, (rate * opts.latency_seconds as f64) as usize + 1, "latency")?;
    let mut worker = Worker::spawn(spec, false)?;
    // Give it time to connect and LISTEN before the clock starts.
    thread::sleep(Duration::from_millis(500));
    let profiling = opts.profile && start_profile(conn);
    let cpu_before = cpu_seconds(worker.pid()).unwrap_or(0.0);
    let phase_started = Instant::now();
    let stop = AtomicBool::new(false);
    let url = spec.url;
    let produced = thread::scope(|s| -> Result<usize> {
        let producer = s.spawn(|| -> Result<usize> {
            let mut producer = db::connect(url, &db::SessionConfig::default())?;
            let started = Instant::now();
            let mut sent = 0_usize;
            let tick = Duration::from_millis(5);
            let deadline = Duration::from_secs(opts.latency_seconds);
            while started.elapsed() < deadline && !stop.load(Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * rate) as usize;
                if due > sent {
                    insert_jobs(&mut producer, accounts, due - sent, "lat")?;
                    sent = due;
                }
                thread::sleep(tick);
            }
            Ok(sent)
        });
        let r = producer.join().map_err(|_| anyhow!("producer panicked"))?;
        stop.store(true, Ordering::Relaxed);
        r
    })?;
    let mut stall = Stall::new();
    loop {
        let left = outstanding(conn, spec.mode)?;
        if left == 0 {
            break;
        }
        if let Some(status) = worker.try_wait()? {
            bail!("the latency-phase worker exited ({status}) with {left} withdrawal(s) not final");
        }
        check_bank(bank)?;
        stall.check(left)?;
        thread::sleep(Duration::from_millis(20));
    }
    let cpu_after = cpu_seconds(worker.pid()).unwrap_or(cpu_before);
    let status = worker.stop()?;
    if !status.success() {
        bail!("the latency-phase worker exited with {status}");
    }
    if profiling {
        print_profile(conn, "latency", produced, phase_started.elapsed(), cpu_after - cpu_before)?;
    }
    #[derive(QueryableByName)]
    struct Lat {
        #[diesel(sql_type = Nullable<Double>)]
        p50: Option<f64>,
        #[diesel(sql_type = Nullable<Double>)]
        p99: Option<f64>,
        #[diesel(sql_type = Nullable<Double>)]
        max: Option<f64>,
        #[diesel(sql_type = BigInt)]
        open: i64,
    }
    let done_at = if spec.mode.end_to_end() {
        "CASE WHEN w.status IN ('rejected', 'failed') THEN w.finished_at
              WHEN p.status IN ('settled', 'returned') THEN p.updated_at END"
    } else {
        "w.finished_at"
    };
    let lat: Lat = diesel::sql_query(format!(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
                max(ms) AS max, count(*) FILTER (WHERE ms IS NULL) AS open
         FROM (SELECT (EXTRACT(EPOCH FROM ({done_at}) - w.created_at) * 1000)::float8 AS ms
               FROM withdrawals w LEFT JOIN payouts p ON p.withdrawal_id = w.id
               WHERE w.id > $1) l"
    ))
    .bind::<BigInt, _>(first_id)
    .get_result(conn)?;
    if lat.open > 0 {
        bail!("latency phase: {} withdrawal(s) without a completion time", lat.open);
    }
    row.p50_ms = lat.p50.unwrap_or(0.0);
    row.p99_ms = lat.p99.unwrap_or(0.0);
    row.max_ms = lat.max.unwrap_or(0.0);
    eprintln!(
        "   latency at {rate:.0}/s ({produced} jobs, enqueue to {}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        if spec.mode.end_to_end() { "final" } else { "debited" },
        row.p50_ms,
        row.p99_ms,
        row.max_ms
    );
    if spec.mode.end_to_end() {
        stage_split(conn, first_id)?;
    }
    Ok(())
}

/// Where an end-to-end withdrawal's time went: enqueue to debited, and debited to its
/// payout's final state, each with its own p50/p99 (so a fast stage cannot hide a slow one).
fn stage_split(conn: &mut PgConnection, first_id: i64) -> Result<()> {
    #[derive(QueryableByName)]
    struct Split {
        #[diesel(sql_type = Nullable<Double>)]
        debit_p50: Option<f64>,
        #[diesel(sql_type = Nullable<Double>)]
        debit_p99: Option<f64>,
        #[diesel(sql_type = Nullable<Double>)]
        payout_p50: Option<f64>,
        #[diesel(sql_type = Nullable<Double>)]
        payout_p99: Option<f64>,
    }
    let s: Split = diesel::sql_query(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS debit_p50,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY d) AS debit_p99,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY p) AS payout_p50,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY p) AS payout_p99
         FROM (SELECT (EXTRACT(EPOCH FROM w.finished_at - w.created_at) * 1000)::float8 AS d,
                      (EXTRACT(EPOCH FROM p.updated_at - w.finished_at) * 1000)::float8 AS p
               FROM withdrawals w JOIN payouts p ON p.withdrawal_id = w.id
               WHERE w.id > $1 AND p.status IN ('settled', 'returned')) l",
    )
    .bind::<BigInt, _>(first_id)
    .get_result(conn)?;
    eprintln!(
        "     stages: enqueue to debited p50 {:.1} ms, p99 {:.1} ms; debited to paid out p50 {:.1} ms, p99 {:.1} ms",
        s.debit_p50.unwrap_or(0.0),
        s.debit_p99.unwrap_or(0.0),
        s.payout_p50.unwrap_or(0.0),
        s.payout_p99.unwrap_or(0.0)
    );
    Ok(())
}

fn run_transfers(url: &str, accounts: &[AccountId], n: usize, threads: usize) -> Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let mut progress = crate::progress::Progress::new(n);
    thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let next = &next;
                s.spawn(move || -> Result<()> {
                    let mut conn = db::connect(url, &db::SessionConfig::default())?;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        let from = accounts[fastrand::usize(..accounts.len())];
                        let mut to = accounts[fastrand::usize(..accounts.len())];
                        while to == from && accounts.len() > 1 {
                            to = accounts[fastrand::usize(..accounts.len())];
                        }
                        transfers::transfer(
                            &mut conn,
                            &Transfer {
                                from,
                                to,
                                amount: Amount::from_minor(fastrand::i64(100..=1_000))?,
                                currency: Currency::EUR,
                                key: IdempotencyKey::new(format!("bench-t-{i}"))?,
                            },
                        )?;
                    }
                })
            })
            .collect();
        while handles.iter().any(|h| !h.is_finished()) {
            progress.show(next.load(Ordering::Relaxed).min(n), started.elapsed());
            thread::sleep(Duration::from_millis(100));
        }
        progress.finish(n, started.elapsed());
        for h in handles {
            h.join().map_err(|_| anyhow!("transfer thread panicked"))??;
        }
        Ok(())
    })
}

/// pgbench's TPC-B-like transaction at the same concurrency on the same server.
fn pgbench(database: &Database, dbname: &str, scale: u32, clients: usize, opts: &BenchOptions) -> Result<f64> {
    let bin = ledger_core::testing::cluster::find_bindir()?.join("pgbench");
    let url = database.create_sibling(dbname)?;
    let init = Command::new(&bin).args(["-i", "-q", "-s", &scale.to_string(), &url]).output()?;
    if !init.status.success() {
        bail!("pgbench -i failed: {}", String::from_utf8_lossy(&init.stderr));
    }
    let jobs = clients.min(2).to_string();
    let out = Command::new(&bin)
        .args(["-n", "-c", &clients.to_string(), "-j", &jobs, "-T", &opts.pgbench_seconds.to_string(), &url])
        .output()?;
    database.drop_sibling(dbname)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next()?.parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no tps line in pgbench output: {text}"))?;
    eprintln!("   pgbench TPC-B-like, scale {scale}, {clients} clients: {tps:.0} tps");
    Ok(tps)
}

fn print_table(rows: &[Row], as_json: bool) {
    if as_json {
        for r in rows {
            println!(
                "{}",
                json!({
                    "scenario": r.scenario, "mode": r.mode, "gateway": r.gateway, "threads": r.threads,
                    "operations": r.ops, "ops_per_sec": r.ops_per_sec,
                    "pgbench_scale": r.pgbench_scale, "pgbench_tps": r.pgbench_tps,
                    "ratio": r.pgbench_tps.map(|p| r.ops_per_sec / p),
                    "debit_only_ops_per_sec": r.debit_only_ops_per_sec,
                    "ratio_to_debit_only": r.debit_only_ops_per_sec.map(|d| r.ops_per_sec / d),
                    "latency_rate": r.latency_rate, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms,
                    "worker_rss_mb": r.rss_mb, "audit_clean": r.audit_clean, "bank": r.bank,
                    "payout_args": r.payout_args, "error": r.error,
                })
            );
        }
        return;
    }
    println!(
        "| scenario | mode | threads | ops/s | pgbench tps (scale, clients) | ratio to pgbench | e2e / debit-only \
         | p50 ms | p99 ms | max ms | latency at | worker RSS | audit |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let pg = r.pgbench_tps.map(|p| format!("{p:.0} (s{}, c{})", r.pgbench_scale, r.threads)).unwrap_or("-".into());
        if r.error.is_some() {
            println!(
                "| {} | {} | {} | FAILED (below) | {pg} | - | - | - | - | - | - | - | - |",
                r.scenario, r.mode, r.threads
            );
            continue;
        }
        let ratio = r.pgbench_tps.map(|p| format!("{:.2}x", r.ops_per_sec / p)).unwrap_or("-".into());
        let e2e = r.debit_only_ops_per_sec.map(|d| format!("{:.2}x", r.ops_per_sec / d)).unwrap_or("-".into());
        let (p50, p99, max, at) = if r.latency_rate > 0.0 {
            (
                format!("{:.1}", r.p50_ms),
                format!("{:.1}", r.p99_ms),
                format!("{:.1}", r.max_ms),
                format!("{:.0}/s", r.latency_rate),
            )
        } else {
            ("-".into(), "-".into(), "-".into(), "-".into())
        };
        let rss = if r.gateway.is_none() {
            format!("{:.1} MB (bench process)", r.rss_mb)
        } else {
            format!("{:.1} MB", r.rss_mb)
        };
        println!(
            "| {} | {} | {} | {:.0} | {pg} | {ratio} | {e2e} | {p50} | {p99} | {max} | {at} | {rss} | {} |",
            r.scenario,
            r.mode,
            r.threads,
            r.ops_per_sec,
            if r.audit_clean { "clean" } else { "VIOLATIONS" }
        );
    }
    for r in rows {
        if let Some(e) = &r.error {
            println!("\n{} {} FAILED: {e}", r.scenario, r.mode);
        }
    }
}
