//! The latency phase: open-loop arrivals at a fixed rate (half the peak unless
//! `--latency-rate`), p50/p99 from enqueue to done, and the split between the stages.

use super::*;

/// Open-loop arrivals at half the mode's measured peak rate, with a worker waiting for
/// them: enqueue -> done latency as a user would see it (not queueing behind a backlog).
/// Done is debited for debit-only (`finished_at`); end to end it is final: the payout's
/// `updated_at` once settled or returned (set by the transaction recording it), or
/// `finished_at` for a withdrawal rejected outright. Either excludes that transaction's
/// own commit, a few ms.
pub(super) fn latency_phase(
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
    let server_before = if profiling { server_cpu_seconds(conn) } else { None };
    let phase_started = Instant::now();
    let produced = produce_arrivals(spec.url, accounts, rate, Duration::from_secs(opts.latency_seconds))?;
    wait_until_final(conn, spec.mode, &mut worker, bank)?;
    let cpu_after = cpu_seconds(worker.pid()).unwrap_or(cpu_before);
    let server_used = server_before.and_then(|b| Some(server_cpu_seconds(conn)? - b));
    let status = worker.stop()?;
    if !status.success() {
        bail!("the latency-phase worker exited with {status}");
    }
    if profiling {
        print_profile(conn, "latency", produced, phase_started.elapsed(), cpu_after - cpu_before, server_used)?;
    }
    let lat = latency_since(conn, spec.mode, first_id)?;
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

/// Open-loop arrivals: a producer thread on a connection of its own inserts what is
/// due at `rate` per second (checked every 5 ms) for `duration`, however the worker
/// keeps up. Returns how many it inserted.
fn produce_arrivals(url: &str, accounts: &[AccountId], rate: f64, duration: Duration) -> Result<usize> {
    let stop = AtomicBool::new(false);
    thread::scope(|s| -> Result<usize> {
        let producer = s.spawn(|| -> Result<usize> {
            let mut producer = db::connect(url, &db::SessionConfig::default())?;
            let started = Instant::now();
            let mut sent = 0_usize;
            let tick = Duration::from_millis(5);
            while started.elapsed() < duration && !stop.load(Ordering::Relaxed) {
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
    })
}

/// Waits (checking every 20 ms) until every withdrawal is final for `mode`; fails if
/// the worker exits first, the bank refuses a call, or nothing progresses for a minute.
fn wait_until_final(conn: &mut PgConnection, mode: Mode, worker: &mut Worker, bank: Option<&Bank>) -> Result<()> {
    let mut stall = Stall::new();
    loop {
        let left = outstanding(conn, mode)?;
        if left == 0 {
            return Ok(());
        }
        if let Some(status) = worker.try_wait()? {
            bail!("the latency-phase worker exited ({status}) with {left} withdrawal(s) not final");
        }
        check_bank(bank)?;
        stall.check(left)?;
        thread::sleep(Duration::from_millis(20));
    }
}

/// Enqueue to done of the phase's withdrawals, in ms; `open` counts those not done.
#[derive(QueryableByName)]
struct Latency {
    #[diesel(sql_type = Nullable<Double>)]
    p50: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    p99: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    max: Option<f64>,
    #[diesel(sql_type = BigInt)]
    open: i64,
}

/// The latency of every withdrawal after `first_id`, to done as `mode` counts it.
fn latency_since(conn: &mut PgConnection, mode: Mode, first_id: i64) -> Result<Latency> {
    let done_at = if mode.end_to_end() {
        "CASE WHEN w.status IN ('rejected', 'failed') THEN w.finished_at
              WHEN p.status IN ('settled', 'returned') THEN p.updated_at END"
    } else {
        "w.finished_at"
    };
    Ok(diesel::sql_query(format!(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
                max(ms) AS max, count(*) FILTER (WHERE ms IS NULL) AS open
         FROM (SELECT (EXTRACT(EPOCH FROM ({done_at}) - w.created_at) * 1000)::float8 AS ms
               FROM withdrawals w LEFT JOIN payouts p ON p.withdrawal_id = w.id
               WHERE w.id > $1) l"
    ))
    .bind::<BigInt, _>(first_id)
    .get_result(conn)?)
}

/// Where an end-to-end withdrawal's time went: enqueue to debited, and debited to its
/// payout's final state, each with its own p50/p99 (so a fast stage cannot hide a slow one).
pub(super) fn stage_split(conn: &mut PgConnection, first_id: i64) -> Result<()> {
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
