//! The command line: global options and the command enum here, one file per command
//! with its options and its `run`. Input is parsed into domain types before anything is
//! written, so bad input is refused with the database unchanged.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use diesel::pg::PgConnection;
use diesel_migrations::MigrationHarness;
use ledger_core::accounts::{self, Account, NewAccount};
use ledger_core::deposits::{self, Deposit};
use ledger_core::payouts::{self, Payout, PayoutGateway, PayoutStatus};
use ledger_core::retry::{Backoff, Jitter, RetryPolicy};
use ledger_core::transfers::{self, Transfer};
use ledger_core::withdrawals::{self, Iban, Withdrawal, WithdrawalRequest, WithdrawalStatus};
use ledger_core::{db, AccountId, Amount, Currency, IdempotencyKey, LedgerError, Money, PayoutId, WithdrawalId};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::daemon::{WorkerConfig, WorkerPool};
use crate::metrics::{self, Metrics};
use clap::{Args, Parser, Subcommand, ValueEnum};

mod account;
mod audit;
mod deposit;
pub mod failure;
pub mod help;
mod hold;
mod lines;
mod migrate;
mod payout;
mod reconnect;
mod run;
mod status;
mod submit;
mod transfer;
mod transfer_submit;
mod withdraw;
mod withdrawal;

pub use failure::{CliError, Failure};
pub use run::{GatewayKind, RunArgs, EXIT_FORCED};

#[derive(Parser, Debug)]
#[command(
    name = "ledger-worker",
    version,
    about = "PostgreSQL ledger: withdrawal daemon and CLI",
    after_help = "Exit status: 0 ok; 1 refused (a business refusal, a conflict, an unknown id, a failed audit, \
                  refused submit lines) or another failure; 2 bad command line or bad input (nothing written); \
                  3 `run` stopped without waiting for every thread; 4 database unreachable."
)]
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

    /// One JSON object per line for every result (stdout) and every error (stderr, with
    /// a stable "kind"); `run` then logs JSON too.
    #[arg(long, global = true)]
    pub json: bool,

    /// Format of the logs on stderr (colours only on a terminal, never with NO_COLOR).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line.
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
    /// Two-phase transfers: hold money for another account, then post all or part of
    /// it, void it, or let its --timeout void it (the daemon's expiry loop).
    #[command(subcommand)]
    Hold(hold::HoldCommand),
    /// Enqueue a withdrawal to an IBAN; the daemon processes it.
    Withdraw(withdraw::WithdrawArgs),
    /// Enqueue withdrawals read as JSON lines on stdin:
    /// {"account": 117, "to": "DE89...", "amount": "50.00", "key": "k-1"}
    ///
    /// Each line is answered (enqueued, replayed, refused with why, or skipped when
    /// blank), then a summary counts each; exit status 1 if any line was refused.
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
    /// --shutdown-grace-ms, logs what the database still holds (withdrawals pending,
    /// paying out, payouts pending...) and exits at most about 3 s after that, whatever
    /// the database or the gateway do; a second signal exits at once. Exit status: 0 after a
    /// clean stop, 3 when it did not wait for every thread (some were still inside a
    /// database or gateway call; nothing unfinished was committed), 2 on bad options,
    /// 4 when the database is unreachable at start, 1 on another error.
    Run(run::RunArgs),
    /// Check the ledger's invariants; exit status 1 on any violation.
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
        Command::Hold(command) => hold::run(ctx, command),
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
    /// Writes one result line. An error (a closed pipe: `| head`) tells a streaming
    /// command to stop.
    fn print(&self, value: Value, human: impl FnOnce() -> String) -> std::io::Result<()> {
        let mut stdout = std::io::stdout().lock();
        let line = if self.json { value.to_string() } else { human() };
        writeln!(stdout, "{line}")
    }
}

fn require_url(url: Option<String>) -> Result<String> {
    url.filter(|u| !u.is_empty())
        .ok_or_else(|| failure::usage("database-url", "no database: pass --database-url or set DATABASE_URL"))
}

fn connect(url: Option<String>) -> Result<PgConnection> {
    let url = require_url(url)?;
    let mut conn = db::connect(&url, &db::SessionConfig::default())?;
    // A diesel error stays typed (a connection lost here is retried and reported as such).
    let pending =
        conn.has_pending_migration(db::MIGRATIONS).map_err(|e| match e.downcast::<diesel::result::Error>() {
            Ok(d) => anyhow::Error::from(LedgerError::from(*d)).context("checking migrations"),
            Err(e) => anyhow!("checking migrations: {e}"),
        })?;
    if pending {
        return Err(CliError::SchemaOutdated.into());
    }
    Ok(conn)
}

/// Whether the human log format may colour its output: only on a terminal, and never
/// with `NO_COLOR` set to anything but the empty string (no-color.org).
pub fn colours_wanted(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

pub fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = colours_wanted(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
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

/// A `--status` option's parser: the possible values are the status's stored texts, so
/// `--help` lists them and anything else is a usage error.
fn status_parser<T: Copy + Send + Sync + 'static>(
    all: &'static [T],
    text: fn(T) -> &'static str,
) -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(all.iter().map(|s| text(*s)))
        .map(move |chosen| *all.iter().find(|s| text(**s) == chosen).expect("one of the possible values"))
}

/// Rows fetched per query by the list commands.
const PAGE: u64 = 1_000;

/// Streams the rows after `after` (ascending id), at most `limit` of them, a page at a
/// time by id > cursor, printing each as it comes: memory stays one page whatever the
/// table holds, and no row is listed twice or skipped. A closed stdout (`| head`) ends
/// it quietly. Returns how many were printed.
fn stream_pages<T>(
    after: Option<i64>,
    limit: Option<u64>,
    mut fetch: impl FnMut(Option<i64>, i64) -> Result<Vec<T>>,
    id: impl Fn(&T) -> i64,
    mut print: impl FnMut(&T) -> std::io::Result<()>,
) -> Result<u64> {
    let (mut cursor, mut printed) = (after, 0_u64);
    loop {
        let want = limit.map_or(PAGE, |l| (l - printed).min(PAGE));
        if want == 0 {
            return Ok(printed);
        }
        let page = fetch(cursor, want as i64)?;
        for row in &page {
            match print(row) {
                Ok(()) => printed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(printed),
                Err(e) => return Err(anyhow::Error::from(e).context("writing the list")),
            }
        }
        match page.last() {
            Some(last) if page.len() as u64 == want => cursor = Some(id(last)),
            _ => return Ok(printed),
        }
    }
}

fn account_id(raw: i64) -> Result<AccountId> {
    Ok(AccountId::new(raw)?)
}

/// Parses an amount in the account's currency (looked up, so it must exist). The text
/// may name its currency (`12.50 EUR`); another currency than the account's is refused
/// before anything is written.
fn amount_for(conn: &mut PgConnection, account: AccountId, text: &str) -> Result<Money> {
    let currency = accounts::get(conn, account)?.currency;
    Ok(Money::parse_for(text, currency)?)
}

/// A receipt's balances (right after its entry) as JSON, decimals in `currency`.
fn balances_json(receipt: &deposits::Receipt, currency: Currency) -> Value {
    receipt
        .balances
        .iter()
        .map(|b| json!({ "account": b.account.get(), "balance": currency.format_minor(b.balance_minor) }))
        .collect()
}

/// The binary's entry point: parses the command line, runs the command, and maps its
/// result to an exit code. A failure is one line on stderr (JSON with `--json`), its
/// exit code from [`failure`]'s table.
pub fn main() -> ExitCode {
    main_with(run)
}

/// [`main`] for any command line: `ledger-demo` parses its own and shares the rest.
pub fn main_with<C: Parser>(run: impl FnOnce(C) -> Result<ExitCode>) -> ExitCode {
    // Known before parsing, so that even a usage error comes out as JSON.
    let json = std::env::args_os().take_while(|a| a != "--").any(|a| a == "--json");
    let parsed = help::command::<C>().try_get_matches().and_then(|m| C::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            return failure::of_clap(&e).report(json);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => Failure::of(&e).report(json),
    }
}
