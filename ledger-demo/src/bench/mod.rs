//! `ledger-demo bench`: throughput, hot-account and latency numbers, with PostgreSQL's
//! own pgbench run on the same server in the same run as the reference.
//!
//! Each scenario runs every mode on a fresh database of its own. The worker runs as a
//! separate `ledger-demo run` process (the daemon's own code, so its RSS is its own):
//! - `debit-only` (`--gateway none`): withdrawals processed (locked, checked, debited,
//!   journaled, payout queued, committed) per second; payouts are not dispatched.
//! - `e2e log` (`--gateway log`): withdrawals debited, paid out through the log gateway
//!   and settled (withdrawal `completed`, or `rejected`/`returned`) per second, from the
//!   worker's start until no withdrawal is `pending` or `paying_out`.
//! - `e2e webhook` (`--gateway webhook`): the same through the webhook gateway, to a
//!   local bank the bench runs in-process (`ledger_testbank`, fast and well-behaved) with fresh random credentials.
//!
//! Then a latency phase per mode: arrivals at half that mode's peak, p50/p99 from enqueue
//! to debited (debit-only) or to final (end to end). pgbench's TPC-B-like transaction at
//! the same concurrency on the same server is the reference for every mode.

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
use ledger_core::{audit, db, AccountId, Currency, IdempotencyKey, LedgerError, Money, TxOptions};
use ledger_testbank::{Bank, BankConfig, BankStats};
use serde_json::json;

use crate::database::Database;

mod chart;
mod data;
mod intake;
mod latency;
mod modes;
mod profile;
mod report;
pub use report::pgbench;
mod transfer_scenario;
mod worker;

// The rooms below share these through `use super::*`.
use {data::*, intake::*, latency::*, modes::*, profile::*, report::*, transfer_scenario::*, worker::*};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Withdrawals spread over 1,000 accounts (pgbench reference: scale 10).
    Spread,
    /// Every withdrawal on one account (pgbench reference: scale 1, one branch row).
    Hot,
    /// Transfers between random pairs, both directions (pgbench reference: scale 10).
    Transfers,
    /// JSON lines fed to this binary's `submit` and `transfer submit`, each a child
    /// process reading a file on stdin (pgbench reference: scale 10, 4 clients).
    Intake,
    /// All four, one after the other.
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
    /// Lines per command in the intake scenario.
    pub lines: usize,
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
    /// Also draw the results as an SVG chart at this path.
    pub svg: Option<std::path::PathBuf>,
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
    /// pgbench's clients in the reference run (the scenario's threads, 4 for intake).
    pgbench_clients: usize,
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

pub fn run(opts: &BenchOptions) -> Result<()> {
    run_with(opts, &ModeOptions::default())
}

pub fn run_with(opts: &BenchOptions, modes: &ModeOptions) -> Result<()> {
    if opts.withdrawals == 0 || opts.batch_size == 0 || opts.lines == 0 {
        bail!("--withdrawals, --lines and --batch-size must be at least 1");
    }
    if let Some(rate) = opts.latency_rate {
        if !(rate.is_finite() && (1.0..=1_000_000.0).contains(&rate)) {
            bail!("--latency-rate must be a number of arrivals per second from 1 to 1000000, got {rate}");
        }
    }
    if modes.modes.is_empty() {
        bail!("no mode to measure");
    }
    let flags = worker_flags()?;
    if modes.payout_concurrency.is_some() && !flags.payout_concurrency {
        eprintln!("   (this worker has no --payout-concurrency flag: its built-in concurrency is used)");
    }
    let settings: &[&str] = if opts.profile {
        &[
            "shared_preload_libraries = 'pg_stat_statements'",
            "pg_stat_statements.track = 'all'",
            "pg_stat_statements.track_planning = on",
        ]
    } else {
        &[]
    };
    let database = Database::given_or_throwaway_with(opts.database_url.clone(), "ledger_bench_admin", settings)?;
    let result = run_all(&database, opts, modes, flags);
    let stopped = database.shutdown();
    let rows = result?;
    stopped?;
    print_table(&rows, opts.json);
    if let Some(path) = &opts.svg {
        let doc = chart::svg(&rows, "ledger bench: ours against pgbench on the same server", &run_caption());
        std::fs::write(path, doc).with_context(|| format!("writing the chart to {}", path.display()))?;
        eprintln!("   chart: {}", path.display());
    }
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

/// One row of a scenario: how it is measured.
#[derive(Clone, Copy, Debug)]
enum Job {
    /// Withdrawals through a `run` worker, in this mode.
    Worker(Mode),
    /// Transfers called in-process.
    Transfers(TransferCalls),
    /// JSON lines through a `submit` or `transfer submit` child.
    Intake(Intake),
}

impl Job {
    /// The scenario's rows, in order.
    fn of(s: Scenario, modes: &ModeOptions) -> Vec<Job> {
        match s {
            // One transfer per call, the same coalesced, then batches.
            Scenario::Transfers => {
                [TransferCalls::Single, TransferCalls::Coalesced, TransferCalls::Batch(TRANSFER_BATCH)]
                    .map(Job::Transfers)
                    .to_vec()
            }
            Scenario::Intake => Intake::ALL.map(Job::Intake).to_vec(),
            _ => modes.modes.iter().copied().map(Job::Worker).collect(),
        }
    }

    /// A tag for its database's name, and its row's label.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Job::Worker(m) => (m.gateway(), m.label()),
            Job::Transfers(calls) => ("transfers", calls.label()),
            Job::Intake(Intake::Withdrawals) => ("submit", Intake::Withdrawals.label()),
            Job::Intake(Intake::Transfers) => ("tsubmit", Intake::Transfers.label()),
        }
    }
}

fn run_all(database: &Database, opts: &BenchOptions, modes: &ModeOptions, flags: WorkerFlags) -> Result<Vec<Row>> {
    let scenarios = match opts.scenario {
        Scenario::All => vec![Scenario::Spread, Scenario::Hot, Scenario::Transfers, Scenario::Intake],
        s => vec![s],
    };
    let mut rows = vec![];
    for s in scenarios {
        let threads = opts.threads.unwrap_or(if s == Scenario::Hot { 8 } else { 4 });
        let base = Row {
            scenario: scenario_name(s),
            // An intake row is one child process on one connection.
            threads: if s == Scenario::Intake { 1 } else { threads },
            pgbench_clients: threads,
            ops: if s == Scenario::Intake { opts.lines } else { opts.withdrawals },
            pgbench_scale: if s == Scenario::Hot { 1 } else { 10 },
            ..Default::default()
        };
        let mut these = vec![];
        for job in Job::of(s, modes) {
            let (tag, label) = job.names();
            let name = format!("ledger_bench_{}_{tag}_{}", scenario_name(s), std::process::id());
            let url = database.create_sibling(&name)?;
            let mut row = Row { mode: label, ..base.clone() };
            let measured = match job {
                Job::Transfers(calls) => run_transfer_scenario(&url, calls, &mut row),
                Job::Worker(mode) => run_mode(&url, s, mode, opts, modes, flags, &mut row),
                Job::Intake(intake) => run_intake(&url, intake, &mut row),
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
                base.pgbench_clients,
                opts.pgbench_seconds,
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

/// Which run a chart came from: the command line (the database URL and the chart's path
/// left out), the machine's cores and the date.
fn run_caption() -> String {
    let mut args = vec![];
    let mut skip = false;
    for a in std::env::args().skip(1) {
        if std::mem::take(&mut skip) {
            continue;
        }
        if a == "--database-url" || a == "--svg" {
            skip = true;
        } else if !a.starts_with("--database-url=") && !a.starts_with("--svg=") {
            args.push(a);
        }
    }
    let cores = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let days = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() / 86_400);
    let date = days.map(|d| civil_date(d as i64)).unwrap_or_default();
    format!("ledger-demo {} · {cores} cores · {date} UTC", args.join(" "))
}

/// Days since 1970-01-01 as YYYY-MM-DD (Howard Hinnant's civil_from_days).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Spread => "spread",
        Scenario::Hot => "hot",
        Scenario::Transfers => "transfers",
        Scenario::Intake => "intake",
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

fn audit_into(conn: &mut PgConnection, row: &mut Row) -> Result<()> {
    let report = audit::run(conn)?;
    row.audit_clean = report.is_clean();
    if !report.is_clean() {
        eprintln!("{report}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_date(0), "1970-01-01");
        assert_eq!(super::civil_date(19_782), "2024-02-29");
        assert_eq!(super::civil_date(20_819), "2027-01-01");
    }
}
