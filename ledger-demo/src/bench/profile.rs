//! Where the time goes: pg_stat_statements on the throwaway server, the worker's CPU
//! and memory.

use super::*;

/// CPU time (user + system) a process has used so far, in seconds.
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds used so far by a local PostgreSQL server: the postmaster and the
/// children it reaped (`cutime`/`cstime`), plus every live child (backends, WAL writer,
/// checkpointer). Unlike pg_stat_statements' execution time this is CPU, not time spent
/// waiting for a core or a lock. `None` when the server is not on this machine.
pub(super) fn server_cpu_seconds(conn: &mut PgConnection) -> Option<f64> {
    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let backend = diesel::sql_query("SELECT pg_backend_pid() AS pid").get_result::<Pid>(conn).ok()?.pid;
    let fields = |pid: u32| -> Option<Vec<f64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = stat.rsplit_once(") ")?.1;
        // From the state field on: ppid is [1], utime..cstime are [11..=14].
        rest.split_whitespace().take(15).map(|f| f.parse::<f64>().or(Ok::<f64, ()>(0.0)).ok()).collect()
    };
    let postmaster = *fields(u32::try_from(backend).ok()?)?.get(1)? as u32;
    let own = fields(postmaster)?;
    let mut ticks: f64 = own[11..=14].iter().sum();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Some(f) = fields(pid).filter(|f| f.get(1) == Some(&(postmaster as f64))) {
            ticks += f[11] + f[12];
        }
    }
    Some(ticks / 100.0)
}

pub(super) fn start_profile(conn: &mut PgConnection) -> bool {
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
pub(super) fn print_profile(
    conn: &mut PgConnection,
    phase: &str,
    jobs: usize,
    elapsed: Duration,
    worker_cpu_s: f64,
    server_cpu_s: Option<f64>,
) -> Result<()> {
    #[derive(QueryableByName)]
    struct Stmt {
        #[diesel(sql_type = diesel::sql_types::Text)]
        query: String,
        #[diesel(sql_type = BigInt)]
        calls: i64,
        #[diesel(sql_type = Double)]
        total_ms: f64,
        #[diesel(sql_type = Double)]
        plan_ms: f64,
    }
    let rows: Vec<Stmt> = diesel::sql_query(
        "SELECT left(regexp_replace(s.query, '\\s+', ' ', 'g'), 70) AS query, s.calls,
                s.total_exec_time AS total_ms, s.total_plan_time AS plan_ms
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
         WHERE d.datname = current_database() AND s.toplevel
         ORDER BY s.total_exec_time + s.total_plan_time DESC LIMIT 10",
    )
    .load(conn)?;
    let server_ms: f64 = rows.iter().map(|r| r.total_ms).sum();
    let plan_ms: f64 = rows.iter().map(|r| r.plan_ms).sum();
    eprintln!(
        "   profile of the {phase} phase ({jobs} jobs in {:.2} s on 2 cores = {:.0} µs of wall time per job):",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / jobs as f64
    );
    eprintln!(
        "   server execution {:.0} µs/job and planning {:.0} µs/job (top statements below), worker process CPU {:.0} µs/job",
        server_ms * 1e3 / jobs as f64,
        plan_ms * 1e3 / jobs as f64,
        worker_cpu_s * 1e6 / jobs as f64
    );
    if let Some(server) = server_cpu_s {
        eprintln!(
            "   server CPU {:.0} µs/job (all PostgreSQL processes), worker CPU {:.0} µs/job: {:.0}% of 2 cores",
            server * 1e6 / jobs as f64,
            worker_cpu_s * 1e6 / jobs as f64,
            (server + worker_cpu_s) * 100.0 / (2.0 * elapsed.as_secs_f64())
        );
    }
    for r in rows {
        eprintln!(
            "   {:>7.1} µs/job {:>7} calls {:>7.2} ms/call (+{:.2} planning)  {}",
            r.total_ms * 1e3 / jobs as f64,
            r.calls,
            r.total_ms / r.calls.max(1) as f64,
            r.plan_ms / r.calls.max(1) as f64,
            r.query
        );
    }
    Ok(())
}

/// Peak resident set size of a process, in MB (Linux `VmHWM`).
pub(super) fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
