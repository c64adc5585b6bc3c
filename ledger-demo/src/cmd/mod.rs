//! `ledger-demo`'s command line: `demo` and `bench`, and every `ledger-worker` command.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ledger_worker::cmd::{self as worker, Ctx, Global};

pub mod bench;
pub mod demo;

#[derive(Parser, Debug)]
#[command(
    name = "ledger-demo",
    version,
    about = "PostgreSQL ledger: the demo and the benchmark (and every ledger-worker command)"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Tool,
}

#[derive(Subcommand, Debug)]
pub enum Tool {
    /// Show the talk's race being prevented, then run withdrawals through the daemon.
    /// It always uses its own throwaway PostgreSQL (DATABASE_URL is ignored), or
    /// --database-url to an empty database.
    Demo(demo::DemoArgs),
    /// Measure throughput and latency against pgbench on the same server. With no
    /// DATABASE_URL it starts and removes its own throwaway PostgreSQL (fsync on).
    Bench(bench::BenchArgs),
    #[command(flatten)]
    Ledger(worker::Command),
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let ctx = Ctx::new(cli.global);
    match cli.command {
        Tool::Demo(args) => demo::run(ctx, args),
        Tool::Bench(args) => bench::run(ctx, args),
        Tool::Ledger(command) => worker::run_command(ctx, command),
    }
}
