//! What each CLI command does. Input is parsed into domain types before anything is
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
use ledger_core::payouts::{self, Payout, PayoutGateway, PayoutStatus, RetryPolicy};
use ledger_core::transfers::{self, Transfer};
use ledger_core::withdrawals::{self, Iban, Withdrawal, WithdrawalRequest, WithdrawalStatus};
use ledger_core::{audit, db, AccountId, Amount, Currency, IdempotencyKey, PayoutId, WithdrawalId};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::cli::{AccountCommand, Cli, Command, GatewayKind, LogFormat, PayoutCommand, RunArgs, WithdrawalCommand};
use crate::daemon::{WorkerConfig, WorkerPool};
use crate::demo::{self, DemoOptions};
use crate::metrics::{self, Metrics};

/// Prints results as JSON lines (`--json`) or as short human lines.
struct Output {
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
        "status": match a.status { accounts::AccountStatus::Open => "open", accounts::AccountStatus::Closed => "closed" },
    })
}

fn withdrawal_json(w: &Withdrawal) -> Value {
    let amount = Currency::from_code(&w.currency).map(|c| c.format_minor(w.amount_minor)).unwrap_or_default();
    json!({
        "id": w.id,
        "account": w.account_id,
        "amount": amount,
        "currency": w.currency,
        "to": w.destination,
        "key": w.idempotency_key,
        "status": w.status,
        "reason": w.reason,
        "attempts": w.attempts,
        "last_error": w.last_error,
    })
}

fn payout_json(p: &Payout) -> Value {
    let amount = Currency::from_code(&p.currency).map(|c| c.format_minor(p.amount_minor)).unwrap_or_default();
    json!({
        "id": p.id,
        "withdrawal": p.withdrawal_id,
        "account": p.account_id,
        "amount": amount,
        "currency": p.currency,
        "to": p.destination,
        "key": p.idempotency_key,
        "status": p.status,
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

pub fn run(cli: Cli) -> Result<ExitCode> {
    let out = Output { json: cli.json };
    match cli.command {
        Command::Migrate { new_instance_id } => {
            let mut conn = db::connect(&require_url(cli.database_url)?, &db::SessionConfig::default())?;
            let n = db::run_migrations(&mut conn)?;
            let (instance, renewed) = if new_instance_id {
                (payouts::renew_instance_id(&mut conn)?, true)
            } else {
                (payouts::instance_id(&mut conn)?, false)
            };
            out.print(json!({ "applied": n, "instance_id": instance, "instance_id_renewed": renewed }), || {
                let what = if renewed { "new instance id" } else { "instance id" };
                format!("{n} migration(s) applied; {what} {instance}")
            });
        }
        Command::Account(AccountCommand::Open { owner, currency, overdraft_limit, key }) => {
            let currency = Currency::from_code(&currency)?;
            let limit = match overdraft_limit.as_str() {
                "0" | "0.0" | "0.00" | "0.000" => 0,
                text => Amount::parse(text, currency)?.minor(),
            };
            let key = key.map(IdempotencyKey::new).transpose()?;
            let mut conn = connect(cli.database_url)?;
            let account =
                accounts::open(&mut conn, &NewAccount::new(owner, currency).with_overdraft(limit), key.as_ref())?;
            out.print(account_json(&account), || format!("opened account {} ({})", account.id, account.currency));
        }
        Command::Account(AccountCommand::Show { id }) => {
            let id = account_id(id)?;
            let mut conn = connect(cli.database_url)?;
            let a = accounts::get(&mut conn, id)?;
            out.print(account_json(&a), || {
                format!(
                    "account {}: {} {} ({}), owner {}",
                    a.id,
                    a.balance_display(),
                    a.currency,
                    account_json(&a)["status"].as_str().unwrap_or(""),
                    a.owner
                )
            });
        }
        Command::Deposit { account, amount, key } => {
            let (account, key) = (account_id(account)?, IdempotencyKey::new(key)?);
            let mut conn = connect(cli.database_url)?;
            let (amount, currency) = amount_for(&mut conn, account, &amount)?;
            let receipt = deposits::deposit(&mut conn, &Deposit { account, amount, currency, key })?;
            let balance = accounts::get(&mut conn, account)?;
            out.print(
                json!({ "entry": receipt.entry.get(), "replayed": receipt.replayed, "account": account.get(),
                        "balance": balance.balance_display() }),
                || {
                    format!(
                        "deposited {} {currency} into account {account} (entry {}{}); balance {}",
                        amount.format(currency),
                        receipt.entry,
                        if receipt.replayed { ", replayed" } else { "" },
                        balance.balance_display()
                    )
                },
            );
        }
        Command::Transfer { from, to, amount, key } => {
            let (from, to, key) = (account_id(from)?, account_id(to)?, IdempotencyKey::new(key)?);
            let mut conn = connect(cli.database_url)?;
            let (amount, currency) = amount_for(&mut conn, from, &amount)?;
            let receipt = transfers::transfer(&mut conn, &Transfer { from, to, amount, currency, key })?;
            out.print(json!({ "entry": receipt.entry.get(), "replayed": receipt.replayed }), || {
                format!(
                    "transferred {} {currency} from {from} to {to} (entry {}{})",
                    amount.format(currency),
                    receipt.entry,
                    if receipt.replayed { ", replayed" } else { "" }
                )
            });
        }
        Command::Withdraw { account, to, amount, key } => {
            let (account, key, destination) = (account_id(account)?, IdempotencyKey::new(key)?, Iban::parse(&to)?);
            let mut conn = connect(cli.database_url)?;
            let (amount, currency) = amount_for(&mut conn, account, &amount)?;
            let (id, replayed) =
                withdrawals::request(&mut conn, &WithdrawalRequest { account, amount, currency, destination, key })?;
            let w = withdrawals::get(&mut conn, id)?;
            out.print(json!({ "id": id.get(), "status": w.status, "replayed": replayed }), || {
                format!("withdrawal {id}: {}{}", w.status, if replayed { " (replayed)" } else { "" })
            });
        }
        Command::Submit => return submit(cli.database_url),
        Command::Withdrawal(WithdrawalCommand::Show { id }) => {
            let id = WithdrawalId::new(id)?;
            let mut conn = connect(cli.database_url)?;
            let w = withdrawals::get(&mut conn, id)?;
            out.print(withdrawal_json(&w), || {
                format!(
                    "withdrawal {}: {} {} {} from account {} to {}, {} attempt(s){}",
                    w.id,
                    w.status,
                    withdrawal_json(&w)["amount"].as_str().unwrap_or(""),
                    w.currency,
                    w.account_id,
                    w.destination,
                    w.attempts,
                    w.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
                )
            });
        }
        Command::Withdrawal(WithdrawalCommand::List { status, account, limit }) => {
            let status = status
                .map(|s| {
                    WithdrawalStatus::parse(&s).ok_or_else(|| {
                        anyhow!("unknown status {s:?}: pending, paying_out, completed, rejected, failed or returned")
                    })
                })
                .transpose()?;
            let account = account.map(account_id).transpose()?;
            if !(1..=100_000).contains(&limit) {
                bail!("--limit must be 1..=100000");
            }
            let mut conn = connect(cli.database_url)?;
            for w in withdrawals::list(&mut conn, status, account, limit)? {
                out.print(withdrawal_json(&w), || {
                    format!(
                        "{:>8}  {:<10} {:>12} {}  account {}",
                        w.id,
                        w.status,
                        withdrawal_json(&w)["amount"].as_str().unwrap_or(""),
                        w.currency,
                        w.account_id
                    )
                });
            }
        }
        Command::Payout(PayoutCommand::List { status, limit }) => {
            let status = status
                .map(|s| {
                    PayoutStatus::parse(&s)
                        .ok_or_else(|| anyhow!("unknown status {s:?}: pending, settled, returned or failed"))
                })
                .transpose()?;
            if !(1..=100_000).contains(&limit) {
                bail!("--limit must be 1..=100000");
            }
            let mut conn = connect(cli.database_url)?;
            for p in payouts::list(&mut conn, status, limit)? {
                out.print(payout_json(&p), || payout_line(&p));
            }
        }
        Command::Payout(PayoutCommand::Show { id }) => {
            let id = PayoutId::new(id)?;
            let mut conn = connect(cli.database_url)?;
            let p = payouts::get(&mut conn, id)?;
            out.print(payout_json(&p), || payout_line(&p));
        }
        Command::Payout(PayoutCommand::Retry { id }) => {
            let id = PayoutId::new(id)?;
            let mut conn = connect(cli.database_url)?;
            let p = payouts::retry(&mut conn, id)?;
            out.print(payout_json(&p), || payout_line(&p));
        }
        Command::Payout(PayoutCommand::Return {
            id,
            reason,
            force,
            payout_webhook,
            payout_timeout_ms,
            payout_connect_timeout_ms,
        }) => {
            let id = PayoutId::new(id)?;
            let mut conn = connect(cli.database_url)?;
            let reason = reason.unwrap_or_default();
            let webhook = match (&payout_webhook, force) {
                (Some(_), true) => bail!("give either --force or --payout-webhook, not both"),
                (Some(url), false) => Some(crate::webhook::WebhookGateway::from_env(crate::webhook::WebhookConfig {
                    url: url.clone(),
                    connect_timeout: Duration::from_millis(payout_connect_timeout_ms.max(1)),
                    timeout: Duration::from_millis(payout_timeout_ms.max(1)),
                })?),
                (None, _) => None,
            };
            let no_lookup = crate::gateway::NoLookup;
            let authority = match (&webhook, force) {
                (_, true) if reason.trim().is_empty() => {
                    bail!("--force needs --reason, which is recorded with the return")
                }
                (_, true) => payouts::ReturnAuthority::Force { reason: &reason },
                (Some(g), false) => payouts::ReturnAuthority::Lookup(g),
                (None, false) => payouts::ReturnAuthority::Lookup(&no_lookup),
            };
            let why = if reason.trim().is_empty() { "returned by an operator" } else { reason.as_str() };
            let p = match payouts::return_failed(&mut conn, id, why, authority)? {
                payouts::ReturnResult::Returned(p) | payouts::ReturnResult::SettledInstead(p) => p,
            };
            out.print(payout_json(&p), || payout_line(&p));
        }
        Command::Run(args) => {
            init_logging(cli.log_format, "info");
            return run_daemon(require_url(cli.database_url)?, &args);
        }
        Command::Audit => {
            let mut conn = connect(cli.database_url)?;
            let report = audit::run(&mut conn)?;
            let violations: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
            out.print(
                json!({ "clean": report.is_clean(), "entries": report.entries, "postings": report.postings,
                        "accounts": report.accounts, "violations": violations }),
                || report.to_string(),
            );
            if !report.is_clean() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Bench {
            scenario,
            withdrawals,
            threads,
            batch_size,
            accounts,
            pgbench,
            pgbench_seconds,
            latency_seconds,
            latency_rate,
            modes,
            profile,
        } => {
            init_logging(cli.log_format, "warn");
            let mut mode_options = crate::bench::ModeOptions::default();
            if !modes.is_empty() {
                mode_options.modes = modes;
            }
            crate::bench::run_with(
                &crate::bench::BenchOptions {
                    database_url: cli.database_url,
                    scenario,
                    withdrawals,
                    threads,
                    batch_size,
                    accounts,
                    pgbench,
                    pgbench_seconds,
                    latency_seconds,
                    latency_rate,
                    json: cli.json,
                    profile,
                },
                &mode_options,
            )?;
        }
        Command::Demo { accounts, withdrawals, threads } => {
            init_logging(cli.log_format, "warn");
            if accounts == 0 || threads == 0 || withdrawals == 0 {
                bail!("--accounts, --withdrawals and --threads must be at least 1");
            }
            // The demo writes accounts and withdrawals and pays them out through the log
            // gateway: it never uses a database it was not explicitly given. DATABASE_URL
            // from the environment (likely a real ledger) is ignored.
            let explicit = std::env::args().any(|a| a == "--database-url" || a.starts_with("--database-url="));
            if !explicit && cli.database_url.is_some() {
                eprintln!("note: the demo ignores DATABASE_URL; it uses its own throwaway PostgreSQL (or --database-url to an empty database)");
            }
            let database_url = if explicit { cli.database_url } else { None };
            demo::run(&DemoOptions { database_url, accounts, withdrawals, threads })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitLine {
    account: i64,
    to: String,
    amount: Value,
    key: String,
}

/// Longest accepted input line; longer lines are refused, not buffered without bound.
const MAX_LINE_BYTES: usize = 16 * 1024;

fn submit(url: Option<String>) -> Result<ExitCode> {
    let mut conn = connect(url)?;
    let stdin = std::io::stdin().lock();
    let mut currencies: HashMap<i64, Currency> = HashMap::new();
    let (mut ok, mut bad) = (0_usize, 0_usize);
    let mut stdout = std::io::stdout().lock();
    for (n, line) in stdin.split(b'\n').enumerate() {
        let number = n + 1;
        let line = line.context("reading stdin")?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let result = if line.len() > MAX_LINE_BYTES {
            Err(anyhow!("line longer than {MAX_LINE_BYTES} bytes"))
        } else {
            submit_line(&mut conn, &mut currencies, &line)
        };
        let value = match result {
            Ok((id, replayed)) => {
                ok += 1;
                json!({ "line": number, "id": id.get(), "status": "pending", "replayed": replayed })
            }
            Err(e) => {
                bad += 1;
                json!({ "line": number, "error": format!("{e:#}") })
            }
        };
        writeln!(stdout, "{value}")?;
    }
    stdout.flush()?;
    if bad > 0 {
        eprintln!("error: {bad} of {} line(s) refused; the other {ok} were enqueued", ok + bad);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn submit_line(
    conn: &mut PgConnection,
    currencies: &mut HashMap<i64, Currency>,
    line: &[u8],
) -> Result<(WithdrawalId, bool)> {
    let req: SubmitLine = serde_json::from_slice(line).map_err(|e| anyhow!("bad JSON: {e}"))?;
    let Value::String(amount) = req.amount else {
        bail!("amount must be a decimal string like \"50.00\", not a JSON number");
    };
    let account = account_id(req.account)?;
    let key = IdempotencyKey::new(req.key)?;
    let destination = Iban::parse(&req.to)?;
    let currency = match currencies.get(&account.get()) {
        Some(c) => *c,
        None => {
            let c = accounts::get(conn, account)?.currency;
            currencies.insert(account.get(), c);
            c
        }
    };
    let amount = Amount::parse(&amount, currency)?;
    Ok(withdrawals::request(conn, &WithdrawalRequest { account, amount, currency, destination, key })?)
}

/// `run`'s exit status when it stopped without waiting for every thread: some were
/// still busy after `--shutdown-grace-ms` (plus a second), or a second SIGTERM/SIGINT
/// came. Nothing unfinished was committed; see [`WorkerPool::shutdown`].
pub const EXIT_FORCED: u8 = 3;

fn run_daemon(url: String, args: &RunArgs) -> Result<ExitCode> {
    // Fail fast, with one clear line, on an unreachable or unmigrated database; with the
    // network timeouts the pool uses, so that a server that does not answer fails too.
    // (No handler is installed yet: a signal now ends the process at once.)
    drop(connect(Some(db::with_network_timeouts(&url)))?);
    let config = WorkerConfig {
        threads: args.threads,
        pool_size: args.pool_size.unwrap_or(args.threads as u32 + 2),
        channel_capacity: args.channel_capacity,
        batch_size: args.batch_size,
        poll_interval_ms: args.poll_interval_ms,
        lock_timeout_ms: args.lock_timeout_ms,
        tx_attempts: args.tx_attempts,
        job_max_attempts: args.max_attempts,
        job_max_backoff_ms: args.max_backoff_ms,
        claim: true,
        shutdown_grace_ms: args.shutdown_grace_ms,
        application_name: "ledger-worker".into(),
        payout_threads: args.payout_threads,
        payout_batch: args.payout_batch,
        payout_lease_ms: args.payout_lease_ms,
        payout_poll_ms: args.payout_poll_ms,
        payout_concurrency: args.payout_concurrency,
        // The webhook's timeout bounds the whole call, connecting included.
        payout_call_timeout_ms: args.payout_timeout_ms,
        payout_retry: RetryPolicy {
            max_attempts: args.payout_max_attempts,
            base_ms: args.payout_base_backoff_ms,
            max_backoff_ms: args.payout_max_backoff_ms,
        },
    };
    if args.payout_timeout_ms == 0 || args.payout_connect_timeout_ms == 0 {
        bail!("--payout-timeout-ms and --payout-connect-timeout-ms must be at least 1");
    }
    config.validate().map_err(|e| anyhow!(e))?;
    let gateway: Option<Arc<dyn PayoutGateway>> = match (args.gateway, &args.payout_webhook) {
        (None, _) => bail!(
            "`run` needs an explicit payout gateway: --gateway webhook --payout-webhook URL (credentials from \
             LEDGER_PAYOUT_WEBHOOK_TOKEN and LEDGER_PAYOUT_WEBHOOK_SECRET), --gateway log to try it out (settles \
             every payout WITHOUT paying anyone), or --gateway none to only debit"
        ),
        (Some(GatewayKind::Webhook), None) => bail!("--gateway webhook needs --payout-webhook URL"),
        (Some(GatewayKind::Log | GatewayKind::None), Some(_)) => {
            bail!("--payout-webhook is only used with --gateway webhook")
        }
        (Some(GatewayKind::None), None) => None,
        (Some(GatewayKind::Log), None) => {
            warn!("log gateway: every payout is settled WITHOUT paying anyone; for trying the ledger out only");
            Some(Arc::new(crate::gateway::LogGateway))
        }
        (Some(GatewayKind::Webhook), Some(url)) => {
            Some(Arc::new(crate::webhook::WebhookGateway::from_env(crate::webhook::WebhookConfig {
                url: url.clone(),
                connect_timeout: Duration::from_millis(args.payout_connect_timeout_ms),
                timeout: Duration::from_millis(args.payout_timeout_ms),
            })?))
        }
    };
    let terminate = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // The first signal starts a graceful stop; a second one exits at once. (The
        // conditional exit must be registered first: handlers run in order.)
        signal_hook::flag::register_conditional_shutdown(signal, i32::from(EXIT_FORCED), terminate.clone())
            .context("installing signal handlers")?;
        signal_hook::flag::register(signal, terminate.clone()).context("installing signal handlers")?;
    }
    let metrics = Metrics::new();
    if let Some(addr) = &args.metrics_addr {
        let bound = metrics::serve(addr, metrics.clone()).with_context(|| format!("serving metrics on {addr}"))?;
        info!(%bound, "serving Prometheus metrics");
    }
    info!(database = %db::redact_url(&url), "starting");
    let mut builder = WorkerPool::builder(&url, config).metrics(metrics.clone());
    if let Some(g) = gateway {
        builder = builder.gateway(g);
    }
    let pool = builder.start()?;
    let mut last_report = Instant::now();
    loop {
        if terminate.load(Ordering::SeqCst) {
            info!(
                grace_ms = args.shutdown_grace_ms,
                "signal received: finishing in-flight jobs (a second signal exits at once)"
            );
            break;
        }
        if args.exit_when_idle && pool.is_idle() {
            info!("no withdrawal pending: exiting");
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            info!(
                claimed = Metrics::get(&metrics.claimed),
                debited = Metrics::get(&metrics.debited),
                rejected = Metrics::get(&metrics.rejected),
                failed = Metrics::get(&metrics.failed),
                retried = Metrics::get(&metrics.retried),
                payouts_settled = Metrics::get(&metrics.payouts_settled),
                payouts_returned = Metrics::get(&metrics.payouts_returned),
                "progress"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = pool.shutdown();
    info!(
        debited = Metrics::get(&metrics.debited),
        rejected = Metrics::get(&metrics.rejected),
        failed = Metrics::get(&metrics.failed),
        payouts_settled = Metrics::get(&metrics.payouts_settled),
        payouts_returned = Metrics::get(&metrics.payouts_returned),
        left_pending = report.left_pending,
        elapsed_ms = report.elapsed_ms as u64,
        clean = report.is_clean(),
        "stopped"
    );
    if !report.is_clean() {
        // Threads are still inside libpq or the gateway's HTTP client. `_exit` ends the
        // process without running exit handlers (OpenSSL's cleanup among them) under
        // their feet; the kernel closes their sockets and the server rolls back.
        let _ = std::io::stderr().flush();
        signal_hook::low_level::exit(i32::from(EXIT_FORCED));
    }
    Ok(ExitCode::SUCCESS)
}

/// The binary's entry point: parses the command line (a usage error is one line on
/// stderr and exit status 2), runs the command, and maps its result to an exit code
/// (an error is one line on stderr).
pub fn main() -> ExitCode {
    let cli = match <Cli as clap::Parser>::try_parse() {
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
