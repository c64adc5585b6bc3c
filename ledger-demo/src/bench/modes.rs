//! One mode of one scenario: fund, enqueue, start the worker, time it until every
//! withdrawal is final for that mode, then check the end state.

use super::*;

pub(super) fn run_mode(
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
    let credentials = (ledger_testbank::random_hex(24), ledger_testbank::random_hex(32));
    let bank = match mode {
        Mode::Webhook => {
            let config = BankConfig::fast(&credentials.0, &credentials.1, modes.bank_delay);
            Some(Bank::start(config).context("starting the local bank")?)
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
    measure(&mut conn, &spec, &accounts, opts, bank.as_ref(), row)?;
    audit_into(&mut conn, row)
}

/// The mode's measurements on its set-up database: the throughput of `row.ops` queued
/// withdrawals, then the latency phase, each ending with every withdrawal final; then
/// what the bank paid against what the ledger settled.
fn measure(
    conn: &mut PgConnection,
    spec: &WorkerSpec<'_>,
    accounts: &[AccountId],
    opts: &BenchOptions,
    bank: Option<&Bank>,
    row: &mut Row,
) -> Result<()> {
    let n = row.ops;
    enqueue_bulk(conn, accounts, n)?;
    let profiling = opts.profile && start_profile(conn);
    let server_before = if profiling { server_cpu_seconds(conn) } else { None };
    let started = Instant::now();
    let mut worker = Worker::spawn(spec, true)?;
    let watched = watch_until_final(conn, spec.mode, &mut worker, bank, n, started)?;
    let status = worker.wait(Duration::from_secs(30))?;
    if !status.success() {
        bail!("the worker exited with {status}");
    }
    row.ops_per_sec = n as f64 / watched.elapsed.as_secs_f64();
    row.rss_mb = watched.peak_rss_mb;
    if profiling {
        let server_used = server_before.and_then(|b| Some(server_cpu_seconds(conn)? - b));
        print_profile(conn, "throughput", n, watched.elapsed, watched.cpu_seconds, server_used)?;
    }
    check_final(conn, spec.mode)?;
    latency_phase(spec, conn, accounts, opts, bank, row)?;
    check_final(conn, spec.mode)?;
    check_bank(bank)?;
    if let Some(bank) = bank {
        let stats = bank.stats();
        row.bank = Some(stats);
        let settled = count(conn, "SELECT count(*) AS n FROM payouts WHERE status = 'settled'")?;
        eprintln!(
            "   bank: {} paid, {} replays, {} lookups, {} connections (at most {} at once); ledger: {settled} settled",
            stats.paid, stats.replays, stats.lookups, stats.connections, stats.peak_connections
        );
        if stats.paid != settled as u64 {
            bail!("the bank paid {} payouts but the ledger settled {settled}", stats.paid);
        }
    }
    Ok(())
}

/// What watching the throughput run saw: its time from `started` until every
/// withdrawal was final, and the worker's peak RSS and CPU time meanwhile.
struct Watched {
    elapsed: Duration,
    peak_rss_mb: f64,
    cpu_seconds: f64,
}

/// Watches the worker until all `n` withdrawals are final for `mode`, showing progress
/// every 250 ms; fails if it exits first, the bank refuses a call, or nothing
/// progresses for a minute.
fn watch_until_final(
    conn: &mut PgConnection,
    mode: Mode,
    worker: &mut Worker,
    bank: Option<&Bank>,
    n: usize,
    started: Instant,
) -> Result<Watched> {
    let pid = worker.pid();
    let (mut rss, mut cpu) = (0.0_f64, 0.0_f64);
    let mut progress = ledger_worker::progress::Progress::new(n);
    let mut shown = None::<Instant>;
    let mut stall = Stall::new();
    let elapsed = loop {
        rss = rss.max(rss_mb(pid).unwrap_or(0.0));
        cpu = cpu_seconds(pid).unwrap_or(cpu);
        let left = outstanding(conn, mode)?;
        if left == 0 {
            break started.elapsed();
        }
        if let Some(status) = worker.try_wait()? {
            // It may have finished between the count and now.
            let left = outstanding(conn, mode)?;
            if left == 0 && status.success() {
                break started.elapsed();
            }
            bail!("the worker exited ({status}) with {left} withdrawal(s) not final");
        }
        check_bank(bank)?;
        stall.check(left)?;
        if shown.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) {
            progress.show(n.saturating_sub(left as usize), started.elapsed());
            shown = Some(Instant::now());
        }
        // Counting is cheap near the end (partial indexes): watch the tail closely.
        thread::sleep(if left > 2_000 { Duration::from_millis(100) } else { Duration::from_millis(5) });
    };
    progress.finish(n, elapsed);
    Ok(Watched { elapsed, peak_rss_mb: rss, cpu_seconds: cpu })
}

/// Fails the run as soon as the bank refused a call: the worker broke the contract.
pub(super) fn check_bank(bank: Option<&Bank>) -> Result<()> {
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
pub(super) struct Stall {
    pub(super) least: i64,
    pub(super) since: Instant,
}

impl Stall {
    const LIMIT: Duration = Duration::from_secs(60);

    pub(super) fn new() -> Stall {
        Stall { least: i64::MAX, since: Instant::now() }
    }

    pub(super) fn check(&mut self, left: i64) -> Result<()> {
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
pub(super) struct Count {
    #[diesel(sql_type = BigInt)]
    pub(super) n: i64,
}

pub(super) fn count(conn: &mut PgConnection, sql: &str) -> Result<i64> {
    Ok(diesel::sql_query(sql).get_result::<Count>(conn)?.n)
}

/// Withdrawals not done yet in this mode: pending, plus (end to end) those whose payout
/// is still pending. Both counts use partial indexes, so watching closely is cheap. (A
/// withdrawal whose payout `failed` is not counted here; [`check_final`] catches it.)
pub(super) fn outstanding(conn: &mut PgConnection, mode: Mode) -> Result<i64> {
    let sql = if mode.end_to_end() {
        "SELECT (SELECT count(*) FROM withdrawals WHERE status = 'pending')
              + (SELECT count(*) FROM payouts WHERE status = 'pending') AS n"
    } else {
        "SELECT count(*) AS n FROM withdrawals WHERE status = 'pending'"
    };
    count(conn, sql)
}

/// Every withdrawal final for this mode: none pending; end to end, none paying out.
pub(super) fn check_final(conn: &mut PgConnection, mode: Mode) -> Result<()> {
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
