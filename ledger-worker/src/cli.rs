//! Command-line parsing and dispatch. `main` maps `run`'s result to an exit code.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ledger_core::{audit, db};

use crate::demo::{self, DemoOptions};

#[derive(Parser, Debug)]
#[command(name = "ledger-worker", version, about = "PostgreSQL ledger: withdrawal worker and CLI")]
pub struct Cli {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply pending schema migrations.
    Migrate,
    /// Check the ledger's invariants; exits non-zero on any violation.
    Audit,
    /// Show the talk's race being prevented, then run concurrent withdrawals. With no
    /// DATABASE_URL it starts and removes its own throwaway PostgreSQL.
    Demo {
        #[arg(long, default_value_t = 50)]
        accounts: usize,
        #[arg(long, default_value_t = 3_000)]
        withdrawals: usize,
        #[arg(long, default_value_t = 8)]
        threads: usize,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn require_url(url: Option<String>) -> Result<String> {
    url.filter(|u| !u.is_empty()).ok_or_else(|| anyhow::anyhow!("no database: pass --database-url or set DATABASE_URL"))
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Migrate => {
            let mut conn = db::connect(&require_url(cli.database_url)?, &db::SessionConfig::default())?;
            let n = db::run_migrations(&mut conn)?;
            println!("{n} migration(s) applied");
        }
        Command::Audit => {
            let mut conn = db::connect(&require_url(cli.database_url)?, &db::SessionConfig::default())?;
            let report = audit::run(&mut conn)?;
            println!("{report}");
            if !report.is_clean() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Demo { accounts, withdrawals, threads } => {
            if accounts == 0 || threads == 0 {
                anyhow::bail!("--accounts and --threads must be at least 1");
            }
            demo::run(&DemoOptions { database_url: cli.database_url, accounts, withdrawals, threads })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
