//! `ledger-worker bench`: throughput, hot-account and latency numbers, with PostgreSQL's
//! own pgbench run on the same server in the same run as the reference.
//!
//! Each scenario gets a fresh database. The worker runs as a separate `ledger-worker run`
//! process (so its RSS is its own), with payouts not dispatched (`--gateway none`): the
//! number measured is withdrawals processed (locked, checked, debited, journaled, payout
//! queued, committed) per second.

use std::process::{Child, Command, Stdio};
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
    pub json: bool,
    /// Print where the time of the throughput phase went (pg_stat_statements and CPU).
    pub profile: bool,
}

#[derive(Debug, Default, Clone)]
struct ScenarioResult {
    scenario: &'static str,
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
}

pub fn run(opts: &BenchOptions) -> Result<()> {
    if opts.withdrawals == 0 || opts.batch_size == 0 {
        bail!("--withdrawals and --batch-size must be at least 1");
    }
    let settings: &[&str] = if opts.profile {
        &["shared_preload_libraries = 'pg_stat_statements'", "pg_stat_statements.track = 'all'"]
    } else {
        &[]
    };
    let database = Database::given_or_throwaway_with(opts.database_url.clone(), "ledger_bench_admin", settings)?;
    let result = run_all(&database, opts);
    let stopped = database.shutdown();
    let results = result?;
    stopped?;
    print_table(&results, opts.json);
    Ok(())
}

fn run_all(database: &Database, opts: &BenchOptions) -> Result<Vec<ScenarioResult>> {
    let scenarios = match opts.scenario {
        Scenario::All => vec![Scenario::Spread, Scenario::Hot, Scenario::Transfers],
        s => vec![s],
    };
    let mut results = vec![];
    for s in scenarios {
        let name = format!("ledger_bench_{}_{}", scenario_name(s), std::process::id());
        let url = database.create_sibling(&name)?;
        let r = run_scenario(&url, s, opts);
        let r = r.and_then(|mut r| {
            if opts.pgbench {
                r.pgbench_tps = Some(pgbench(database, &format!("{name}_pgbench"), r.pgbench_scale, r.threads, opts)?);
            }
            Ok(r)
        });
        database.drop_sibling(&name)?;
        results.push(r?);
    }
    Ok(results)
}

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Spread => "spread",
        Scenario::Hot => "hot",
        Scenario::Transfers => "transfers",
        Scenario::All => "all",
    }
}

fn run_scenario(url: &str, s: Scenario, opts: &BenchOptions) -> Result<ScenarioResult> {
    let mut conn = db::connect(url, &db::SessionConfig::default())?;
    db::run_migrations(&mut conn)?;
    let threads = opts.threads.unwrap_or(if s == Scenario::Hot { 8 } else { 4 });
    let n = opts.withdrawals;
    let account_count = match s {
        Scenario::Hot => 1,
        _ => opts.accounts.unwrap_or(1_000),
    };
    eprintln!("== {}: {n} operations, {account_count} account(s), {threads} thread(s)", scenario_name(s));
    // Enough money that nothing is refused: the bench measures the happy path.
    let per_account_minor = ((n / account_count + 1) as i64) * 1_000 * 4;
    let accounts = open_accounts(&mut conn, account_count, per_account_minor)?;
    let mut result = ScenarioResult {
        scenario: scenario_name(s),
        threads,
        ops: n,
        pgbench_scale: if s == Scenario::Hot { 1 } else { 10 },
        ..Default::default()
    };
    if s == Scenario::Transfers {
        let started = Instant::now();
        run_transfers(url, &accounts, n, threads)?;
        result.ops_per_sec = n as f64 / started.elapsed().as_secs_f64();
        result.rss_mb = rss_mb(std::process::id()).unwrap_or(0.0);
    } else {
        enqueue_bulk(&mut conn, &accounts, n)?;
        let profiling = opts.profile && start_profile(&mut conn);
        let started = Instant::now();
        let mut worker = spawn_worker(url, threads, opts.batch_size, true)?;
        let worker_pid = worker.id();
        let mut worker_cpu = 0.0_f64;
        let mut rss = 0.0_f64;
        let mut progress = crate::progress::Progress::new(n);
        loop {
            rss = rss.max(rss_mb(worker.id()).unwrap_or(0.0));
            worker_cpu = cpu_seconds(worker_pid).unwrap_or(worker_cpu);
            if let Some(status) = worker.try_wait()? {
                if !status.success() {
                    bail!("the worker exited with {status}");
                }
                break;
            }
            progress.show(n.saturating_sub(pending_count(&mut conn)? as usize), started.elapsed());
            thread::sleep(Duration::from_millis(250));
        }
        let elapsed = started.elapsed();
        progress.finish(finished_count(&mut conn)? as usize, elapsed);
        result.ops_per_sec = n as f64 / elapsed.as_secs_f64();
        result.rss_mb = rss;
        if profiling {
            print_profile(&mut conn, n, elapsed, worker_cpu)?;
        }
        let pending = pending_count(&mut conn)?;
        if pending != 0 {
            bail!("{pending} withdrawals still pending after the worker went idle");
        }
        latency_phase(url, &mut conn, &accounts, threads, opts, &mut result)?;
    }
    let report = audit::run(&mut conn)?;
    result.audit_clean = report.is_clean();
    if !report.is_clean() {
        eprintln!("{report}");
    }
    Ok(result)
}

fn open_accounts(conn: &mut PgConnection, count: usize, funds_minor: i64) -> Result<Vec<AccountId>> {
    let mut ids = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let made = ledger_core::transaction(conn, &TxOptions::default(), |tx| {
            chunk
                .iter()
                .map(|i| {
                    let a = accounts::open_tx(tx, &NewAccount::new(format!("bench-{i}"), Currency::EUR), None)?;
                    ledger_core::deposits::deposit_tx(
                        tx,
                        &ledger_core::deposits::Deposit {
                            account: a.id,
                            amount: Amount::from_minor(funds_minor)?,
                            currency: Currency::EUR,
                            key: IdempotencyKey::new(format!("bench-fund-{i}"))?,
                        },
                    )?;
                    Ok(a.id)
                })
                .collect::<Result<Vec<_>, LedgerError>>()
        })?;
        ids.extend(made);
    }
    Ok(ids)
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

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn finished_count(conn: &mut PgConnection) -> Result<i64> {
    Ok(diesel::sql_query("SELECT count(*) AS n FROM withdrawals WHERE status <> 'pending'")
        .get_result::<Count>(conn)?
        .n)
}

fn pending_count(conn: &mut PgConnection) -> Result<i64> {
    Ok(ledger_core::withdrawals::pending_count(conn)?)
}

fn spawn_worker(url: &str, threads: usize, batch_size: usize, exit_when_idle: bool) -> Result<Child> {
    let exe = std::env::current_exe().context("locating ledger-worker")?;
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--gateway", "none", "--log-format", "json"])
        .args(["--threads", &threads.to_string(), "--batch-size", &batch_size.to_string()])
        .args(["--poll-interval-ms", "200"])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if exit_when_idle {
        cmd.arg("--exit-when-idle");
    }
    cmd.spawn().context("starting the worker")
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
fn print_profile(conn: &mut PgConnection, jobs: usize, elapsed: Duration, worker_cpu_s: f64) -> Result<()> {
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
        "   profile of the throughput phase ({jobs} jobs in {:.2} s on 2 cores = {:.0} µs of wall time per job):",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / jobs as f64
    );
    eprintln!(
        "   server execution {:.0} µs/job (top statements below), worker process CPU {:.0} µs/job",
        server_ms * 1e3 / jobs as f64,
        worker_cpu_s * 1e6 / jobs as f64
    );
    for r in rows {
        eprintln!("   {:>7.1} µs/job {:>7} calls  {}", r.total_ms * 1e3 / jobs as f64, r.calls, r.query);
    }
    Ok(())
}

/// Peak resident set size of a process, in MB (Linux `VmHWM`).
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Open-loop arrivals at half the measured peak rate, with a worker waiting for them:
/// enqueue -> processed latency as a user would see it (not queueing behind a backlog).
fn latency_phase(
    url: &str,
    conn: &mut PgConnection,
    accounts: &[AccountId],
    threads: usize,
    opts: &BenchOptions,
    result: &mut ScenarioResult,
) -> Result<()> {
    let rate = (result.ops_per_sec / 2.0).max(1.0);
    result.latency_rate = rate;
    let first_id = diesel::sql_query("SELECT COALESCE(max(id), 0) AS n FROM withdrawals").get_result::<Count>(conn)?.n;
    let mut worker = spawn_worker(url, threads, opts.batch_size, false)?;
    // Give it time to connect and LISTEN before the clock starts.
    thread::sleep(Duration::from_millis(500));
    let stop = AtomicBool::new(false);
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
    let waited = Instant::now();
    while pending_count(conn)? > 0 {
        if waited.elapsed() > Duration::from_secs(120) {
            bail!("latency phase: jobs still pending after 2 minutes");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill").args(["-TERM", &worker.id().to_string()]).status();
    let status = worker.wait()?;
    if !status.success() {
        bail!("the latency-phase worker exited with {status}");
    }
    #[derive(QueryableByName)]
    struct Lat {
        #[diesel(sql_type = Nullable<Double>)]
        p50: Option<f64>,
        #[diesel(sql_type = Nullable<Double>)]
        p99: Option<f64>,
        #[diesel(sql_type = Nullable<Double>)]
        max: Option<f64>,
    }
    let lat: Lat = diesel::sql_query(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
                max(ms) AS max
         FROM (SELECT (EXTRACT(EPOCH FROM (finished_at - created_at)) * 1000)::float8 AS ms
               FROM withdrawals WHERE id > $1) l",
    )
    .bind::<BigInt, _>(first_id)
    .get_result(conn)?;
    result.p50_ms = lat.p50.unwrap_or(0.0);
    result.p99_ms = lat.p99.unwrap_or(0.0);
    result.max_ms = lat.max.unwrap_or(0.0);
    eprintln!(
        "   latency at {rate:.0}/s ({produced} jobs): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        result.p50_ms, result.p99_ms, result.max_ms
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

fn print_table(results: &[ScenarioResult], as_json: bool) {
    if as_json {
        for r in results {
            println!(
                "{}",
                json!({
                    "scenario": r.scenario, "threads": r.threads, "operations": r.ops,
                    "ops_per_sec": r.ops_per_sec, "pgbench_scale": r.pgbench_scale, "pgbench_tps": r.pgbench_tps,
                    "ratio": r.pgbench_tps.map(|p| r.ops_per_sec / p),
                    "latency_rate": r.latency_rate, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms,
                    "worker_rss_mb": r.rss_mb, "audit_clean": r.audit_clean,
                })
            );
        }
        return;
    }
    println!(
        "| scenario | threads | ours (ops/s) | pgbench tps (scale, clients) | ratio | p50 / p99 / max ms at half peak | worker RSS | audit |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in results {
        let pg = r.pgbench_tps.map(|p| format!("{p:.0} (s{}, c{})", r.pgbench_scale, r.threads)).unwrap_or("-".into());
        let ratio = r.pgbench_tps.map(|p| format!("{:.2}x", r.ops_per_sec / p)).unwrap_or("-".into());
        let lat = if r.latency_rate > 0.0 {
            format!("{:.1} / {:.1} / {:.1} (at {:.0}/s)", r.p50_ms, r.p99_ms, r.max_ms, r.latency_rate)
        } else {
            "-".into()
        };
        let rss = if r.scenario == "transfers" {
            format!("{:.1} MB (bench process)", r.rss_mb)
        } else {
            format!("{:.1} MB", r.rss_mb)
        };
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.threads,
            r.ops_per_sec,
            pg,
            ratio,
            lat,
            rss,
            if r.audit_clean { "clean" } else { "VIOLATIONS" }
        );
    }
}
