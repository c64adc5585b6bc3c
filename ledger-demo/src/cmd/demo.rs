//! `ledger-demo demo`: show the talk's race being prevented, then run withdrawals through the daemon.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use ledger_worker::cmd::{init_logging, Ctx};

use crate::demo::DemoOptions;

/// The options of `demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Customer accounts the withdrawals of step 3 are spread over (500.00 EUR each).
    #[arg(long, default_value_t = 50)]
    pub accounts: usize,
    /// Withdrawals enqueued in step 3.
    #[arg(long, default_value_t = 3_000)]
    pub withdrawals: usize,
    /// The daemon's worker threads in step 3.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
}

pub fn run(ctx: Ctx, args: DemoArgs) -> Result<ExitCode> {
    let DemoArgs { accounts, withdrawals, threads } = args;
    init_logging(ctx.log_format, "warn");
    if accounts == 0 || threads == 0 || withdrawals == 0 {
        bail!("--accounts, --withdrawals and --threads must be at least 1");
    }
    // The demo writes accounts and withdrawals and pays them out through the log
    // gateway: it never uses a database it was not explicitly given. DATABASE_URL
    // from the environment (likely a real ledger) is ignored.
    let explicit = std::env::args().any(|a| a == "--database-url" || a.starts_with("--database-url="));
    if !explicit && ctx.database_url.is_some() {
        eprintln!("note: the demo ignores DATABASE_URL; it uses its own throwaway PostgreSQL (or --database-url to an empty database)");
    }
    let database_url = if explicit { ctx.database_url } else { None };
    crate::demo::run(&DemoOptions { database_url, accounts, withdrawals, threads })?;
    Ok(ExitCode::SUCCESS)
}
