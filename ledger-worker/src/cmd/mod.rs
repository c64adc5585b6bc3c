//! The command line: global options and the command enum here, one file per command
//! with its options and its `run`. Input is parsed into domain types before anything is
//! written, so bad input is refused with the database unchanged.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use diesel::pg::PgConnection;
use diesel_migrations::MigrationHarness;
use ledger_core::accounts::{self, Account, NewAccount};
use ledger_core::deposits::{self, Deposit};
use ledger_core::payouts::{self, Payout, PayoutGateway, PayoutStatus};
use ledger_core::retry::{Backoff, Jitter, RetryPolicy};
use ledger_core::transfers::{self, Transfer};
use ledger_core::withdrawals::{self, Iban, Withdrawal, WithdrawalRequest, WithdrawalStatus};
use ledger_core::{db, AccountId, Amount, Currency, IdempotencyKey, PayoutId, WithdrawalId};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::daemon::{WorkerConfig, WorkerPool};
use crate::metrics::{self, Metrics};
use clap::{Args, Parser, Subcommand, ValueEnum};

mod account;
mod audit;
mod deposit;
mod migrate;
mod payout;
mod run;
mod status;
mod submit;
mod transfer;
mod withdraw;
mod withdrawal;

pub use run::{GatewayKind, RunArgs, EXIT_FORCED};

#[derive(Parser, Debug)]
#[command(name = "ledger-worker", version, about = "PostgreSQL ledger: withdrawal daemon and CLI")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Command,
}

/// The options every command takes (also `ledger-demo`'s).
#[derive(Args, Debug)]
pub struct Global {
    /// PostgreSQL connection URL (the password is never printed).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Print one JSON object per result.
    #[arg(long, global = true)]
    pub json: bool,

    /// Log format for the daemon's logs on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply pending schema migrations.
    Migrate(migrate::MigrateArgs),
    /// Open or show customer accounts.
    #[command(subcommand)]
    Account(account::AccountCommand),
    /// Deposit money into an account (idempotent under --key).
    Deposit(deposit::DepositArgs),
    /// Move money between two accounts of the same currency (idempotent under --key).
    Transfer(transfer::TransferArgs),
    /// Enqueue a withdrawal to an IBAN; the daemon processes it.
    Withdraw(withdraw::WithdrawArgs),
    /// Enqueue withdrawals read as JSON lines on stdin:
    /// {"account": 7, "to": "DE89...", "amount": "50.00", "key": "k-1"}
    Submit,
    /// Show or list withdrawals.
    #[command(subcommand)]
    Withdrawal(withdrawal::WithdrawalCommand),
    /// Operator commands for payouts.
    #[command(subcommand)]
    Payout(payout::PayoutCommand),
    /// Run the worker daemon until SIGTERM/SIGINT (or until idle with --exit-when-idle).
    ///
    /// On SIGTERM/SIGINT it stops claiming, finishes what it can within
    /// --shutdown-grace-ms and exits at most about a second after that, whatever the
    /// database or the gateway do; a second signal exits at once. Exit status: 0 after a
    /// clean stop, 3 when it did not wait for every thread (some were still inside a
    /// database or gateway call; nothing unfinished was committed), 1 on an error.
    Run(run::RunArgs),
    /// Check the ledger's invariants; exits non-zero on any violation.
    Audit,
    /// Queue depths, the oldest pending withdrawal's age and the rates of the last minute.
    Status(status::StatusArgs),
}

/// What every command gets besides its own options: the global options, and where its
/// results go.
pub struct Ctx {
    pub database_url: Option<String>,
    pub json: bool,
    pub log_format: LogFormat,
    pub out: Output,
}

impl Ctx {
    pub fn new(global: Global) -> Ctx {
        Ctx {
            database_url: global.database_url,
            json: global.json,
            log_format: global.log_format,
            out: Output { json: global.json },
        }
    }
}

/// Runs the command the user asked for: one file per command, dispatched from here.
pub fn run(cli: Cli) -> Result<ExitCode> {
    run_command(Ctx::new(cli.global), cli.command)
}

/// Runs one command (`ledger-demo` adds its own two and runs the rest through here).
pub fn run_command(ctx: Ctx, command: Command) -> Result<ExitCode> {
    match command {
        Command::Migrate(args) => migrate::run(ctx, args),
        Command::Account(command) => account::run(ctx, command),
        Command::Deposit(args) => deposit::run(ctx, args),
        Command::Transfer(args) => transfer::run(ctx, args),
        Command::Withdraw(args) => withdraw::run(ctx, args),
        Command::Submit => submit::run(ctx),
        Command::Withdrawal(command) => withdrawal::run(ctx, command),
        Command::Payout(command) => payout::run(ctx, command),
        Command::Run(args) => run::run(ctx, args),
        Command::Audit => audit::run(ctx),
        Command::Status(args) => status::run(ctx, args),
    }
}

/// Prints results as JSON lines (`--json`) or as short human lines.
pub struct Output {
    json: bool,
}

impl Output {
    fn print(&self, value: Value, human: impl FnOnce() -> String) {
        let mut stdout = std::io::stdout().lock();
        let line = if self.json { value.to_string() } else { human() };
        let _ = writeln!(stdout, "{line}");
    }
}

fn require_url(url: Option<String>) -> Result<String> {
    url.filter(|u| !u.is_empty()).ok_or_else(|| anyhow!("no database: pass --database-url or set DATABASE_URL"))
}

fn connect(url: Option<String>) -> Result<PgConnection> {
    let url = require_url(url)?;
    let mut conn = db::connect(&url, &db::SessionConfig::default())?;
    let pending = conn.has_pending_migration(db::MIGRATIONS).map_err(|e| anyhow!("checking migrations: {e}"))?;
    if pending {
        bail!("the database schema is not up to date: run `ledger-worker migrate` first");
    }
    Ok(conn)
}

pub fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

fn account_json(a: &Account) -> Value {
    json!({
        "id": a.id.get(),
        "owner": a.owner,
        "currency": a.currency.code(),
        "balance": a.balance_display(),
        "overdraft_limit": a.currency.format_minor(a.overdraft_limit_minor),
        "status": a.status.as_str(),
    })
}

fn withdrawal_json(w: &Withdrawal) -> Value {
    json!({
        "id": w.id.get(),
        "account": w.account_id.get(),
        "amount": w.currency.format_minor(w.amount_minor),
        "currency": w.currency.code(),
        "to": w.destination,
        "key": w.idempotency_key,
        "status": w.status.as_str(),
        "reason": w.reason,
        "attempts": w.attempts,
        "last_error": w.last_error,
    })
}

fn payout_json(p: &Payout) -> Value {
    json!({
        "id": p.id.get(),
        "withdrawal": p.withdrawal_id.get(),
        "account": p.account_id.get(),
        "amount": p.currency.format_minor(p.amount_minor),
        "currency": p.currency.code(),
        "to": p.destination,
        "key": p.idempotency_key,
        "status": p.status.as_str(),
        "attempts": p.attempts,
        "last_error": p.last_error,
        "reference": p.gateway_reference,
    })
}

fn payout_line(p: &Payout) -> String {
    format!(
        "payout {}: {} {} {} for withdrawal {}, {} attempt(s){}",
        p.id,
        p.status,
        payout_json(p)["amount"].as_str().unwrap_or(""),
        p.currency,
        p.withdrawal_id,
        p.attempts,
        p.last_error.as_ref().map(|e| format!(", last error: {e}")).unwrap_or_default()
    )
}

fn account_id(raw: i64) -> Result<AccountId> {
    Ok(AccountId::new(raw)?)
}

/// Parses an amount in the account's currency (looked up, so it must exist).
fn amount_for(conn: &mut PgConnection, account: AccountId, text: &str) -> Result<(Amount, Currency)> {
    let currency = accounts::get(conn, account)?.currency;
    Ok((Amount::parse(text, currency)?, currency))
}

/// The binary's entry point: parses the command line (a usage error is one line on
/// stderr and exit status 2), runs the command, and maps its result to an exit code
/// (an error is one line on stderr).
pub fn main() -> ExitCode {
    main_with(run)
}

/// [`main`] for any command line: `ledger-demo` parses its own and shares the rest.
pub fn main_with<C: Parser>(run: impl FnOnce(C) -> Result<ExitCode>) -> ExitCode {
    let cli = match C::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line, as scripts expect; `--help` has the rest.
            let text = e.to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            eprintln!("{} (see --help)", line.join(" "));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
