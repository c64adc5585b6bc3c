//! The reference (pgbench on the same server) and the table of results.

use super::*;

/// pgbench's TPC-B-like transaction at the same concurrency on the same server: runs
/// `clients` clients for `seconds` in a scratch database `dbname` beside `database`
/// (created and dropped here), and answers its tps. Durability is the server's own
/// (fsync and synchronous_commit on, as for the ledger it is compared with).
pub fn pgbench(database: &Database, dbname: &str, scale: u32, clients: usize, seconds: u64) -> Result<f64> {
    let bin = ledger_testdb::cluster::find_bindir()?.join("pgbench");
    let url = database.create_sibling(dbname)?;
    let init = Command::new(&bin).args(["-i", "-q", "-s", &scale.to_string(), &url]).output()?;
    if !init.status.success() {
        bail!("pgbench -i failed: {}", String::from_utf8_lossy(&init.stderr));
    }
    let jobs = clients.min(2).to_string();
    let out = Command::new(&bin)
        .args(["-n", "-c", &clients.to_string(), "-j", &jobs, "-T", &seconds.to_string(), &url])
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

/// One row of `--json` output.
fn row_json(r: &Row) -> serde_json::Value {
    json!({
        "scenario": r.scenario, "mode": r.mode, "gateway": r.gateway, "threads": r.threads,
        "operations": r.ops, "ops_per_sec": r.ops_per_sec,
        "pgbench_scale": r.pgbench_scale, "pgbench_clients": r.pgbench_clients, "pgbench_tps": r.pgbench_tps,
        "ratio": r.pgbench_tps.map(|p| r.ops_per_sec / p),
        "debit_only_ops_per_sec": r.debit_only_ops_per_sec,
        "ratio_to_debit_only": r.debit_only_ops_per_sec.map(|d| r.ops_per_sec / d),
        "latency_rate": r.latency_rate, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms,
        "worker_rss_mb": r.rss_mb, "audit_clean": r.audit_clean, "bank": r.bank,
        "payout_args": r.payout_args, "error": r.error,
    })
}

pub(super) fn print_table(rows: &[Row], as_json: bool) {
    if as_json {
        rows.iter().for_each(|r| println!("{}", row_json(r)));
        return;
    }
    println!(
        "| scenario | mode | threads | ops/s | pgbench tps (scale, clients) | ratio to pgbench | e2e / debit-only \
         | p50 ms | p99 ms | max ms | latency at | worker RSS | audit |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let pg = r
            .pgbench_tps
            .map(|p| format!("{p:.0} (s{}, c{})", r.pgbench_scale, r.pgbench_clients))
            .unwrap_or("-".into());
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
        let rss = if r.scenario == scenario_name(Scenario::Intake) {
            format!("{:.1} MB (child)", r.rss_mb)
        } else if r.gateway.is_none() {
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
