//! `ledger-demo bench`: throughput and latency against pgbench on the same server.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use ledger_worker::cmd::{init_logging, Ctx};

/// The options of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Which scenario to measure.
    #[arg(long, value_enum, default_value_t = crate::bench::Scenario::All)]
    pub scenario: crate::bench::Scenario,
    /// Withdrawals (or transfers) per scenario.
    #[arg(long, default_value_t = 20_000)]
    pub withdrawals: usize,
    /// JSON lines per command in the intake scenario (`submit`, then `transfer submit`).
    #[arg(long, default_value_t = 50_000)]
    pub lines: usize,
    /// Worker threads (default: 4, and 8 for the hot scenario).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Most jobs per worker transaction.
    #[arg(long, default_value_t = 1_000)]
    pub batch_size: usize,
    /// Accounts for spread and transfers (default 1,000).
    #[arg(long)]
    pub accounts: Option<usize>,
    /// Also run pgbench's TPC-B-like transaction as the reference.
    #[arg(long)]
    pub pgbench: bool,
    /// How long pgbench runs.
    #[arg(long, default_value_t = 10)]
    pub pgbench_seconds: u64,
    /// Length of the latency phase (arrivals at half the measured peak).
    #[arg(long, default_value_t = 5)]
    pub latency_seconds: u64,
    /// Arrivals per second in the latency phase (default: half the measured peak).
    #[arg(long)]
    pub latency_rate: Option<f64>,
    /// Only these modes (repeatable; default: all three).
    #[arg(long = "mode", value_enum)]
    pub modes: Vec<crate::bench::Mode>,
    /// Show where the time goes (pg_stat_statements on the throwaway server, CPU).
    #[arg(long)]
    pub profile: bool,
    /// Also draw the results as an SVG chart at this path (throughput beside pgbench,
    /// latency p50/p99), e.g. next to the `--json` output: `--json > r.jsonl --svg r.svg`.
    #[arg(long, value_name = "PATH")]
    pub svg: Option<std::path::PathBuf>,
}

pub fn run(ctx: Ctx, args: BenchArgs) -> Result<ExitCode> {
    init_logging(ctx.log_format, "warn");
    let mut mode_options = crate::bench::ModeOptions::default();
    if !args.modes.is_empty() {
        mode_options.modes = args.modes;
    }
    let options = crate::bench::BenchOptions {
        database_url: ctx.database_url,
        scenario: args.scenario,
        withdrawals: args.withdrawals,
        lines: args.lines,
        threads: args.threads,
        batch_size: args.batch_size,
        accounts: args.accounts,
        pgbench: args.pgbench,
        pgbench_seconds: args.pgbench_seconds,
        latency_seconds: args.latency_seconds,
        latency_rate: args.latency_rate,
        json: ctx.json,
        profile: args.profile,
        svg: args.svg,
    };
    crate::bench::run_with(&options, &mode_options)?;
    Ok(ExitCode::SUCCESS)
}
