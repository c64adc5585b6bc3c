//! Command-line parsing: the options of every command, as typed values. Nothing here
//! runs anything; `commands::main` parses and dispatches.

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "ledger-worker", version, about = "PostgreSQL ledger: withdrawal daemon and CLI")]
pub struct Cli {
    /// PostgreSQL connection URL (the password is never printed).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Print one JSON object per result.
    #[arg(long, global = true)]
    pub json: bool,

    /// Log format for the daemon's logs on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply pending schema migrations.
    Migrate {
        /// Give this ledger a new instance id (part of every new payout's gateway key).
        /// Run it once on a database restored from a backup or cloned from another, so
        /// its new payouts never reuse keys the original already sent. Payouts already
        /// queued keep their keys.
        #[arg(long)]
        new_instance_id: bool,
    },
    /// Open or show customer accounts.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Deposit money into an account (idempotent under --key).
    Deposit {
        #[arg(long)]
        account: i64,
        /// Decimal amount in the account's currency, e.g. 100.00.
        #[arg(long, allow_hyphen_values = true)]
        amount: String,
        #[arg(long)]
        key: String,
    },
    /// Move money between two accounts of the same currency (idempotent under --key).
    Transfer {
        #[arg(long)]
        from: i64,
        #[arg(long)]
        to: i64,
        #[arg(long, allow_hyphen_values = true)]
        amount: String,
        #[arg(long)]
        key: String,
    },
    /// Enqueue a withdrawal to an IBAN; the daemon processes it.
    Withdraw {
        #[arg(long)]
        account: i64,
        /// Destination IBAN.
        #[arg(long)]
        to: String,
        #[arg(long, allow_hyphen_values = true)]
        amount: String,
        #[arg(long)]
        key: String,
    },
    /// Enqueue withdrawals read as JSON lines on stdin:
    /// {"account": 7, "to": "DE89...", "amount": "50.00", "key": "k-1"}
    Submit,
    /// Show or list withdrawals.
    #[command(subcommand)]
    Withdrawal(WithdrawalCommand),
    /// Operator commands for payouts.
    #[command(subcommand)]
    Payout(PayoutCommand),
    /// Run the worker daemon until SIGTERM/SIGINT (or until idle with --exit-when-idle).
    ///
    /// On SIGTERM/SIGINT it stops claiming, finishes what it can within
    /// --shutdown-grace-ms and exits at most about a second after that, whatever the
    /// database or the gateway do; a second signal exits at once. Exit status: 0 after a
    /// clean stop, 3 when it did not wait for every thread (some were still inside a
    /// database or gateway call; nothing unfinished was committed), 1 on an error.
    Run(RunArgs),
    /// Check the ledger's invariants; exits non-zero on any violation.
    Audit,
    /// Measure throughput and latency against pgbench on the same server. With no
    /// DATABASE_URL it starts and removes its own throwaway PostgreSQL (fsync on).
    Bench {
        #[arg(long, value_enum, default_value_t = crate::bench::Scenario::All)]
        scenario: crate::bench::Scenario,
        /// Withdrawals (or transfers) per scenario.
        #[arg(long, default_value_t = 20_000)]
        withdrawals: usize,
        /// Worker threads (default: 4, and 8 for the hot scenario).
        #[arg(long)]
        threads: Option<usize>,
        /// Most jobs per worker transaction.
        #[arg(long, default_value_t = 1_000)]
        batch_size: usize,
        /// Accounts for spread and transfers (default 1,000).
        #[arg(long)]
        accounts: Option<usize>,
        /// Also run pgbench's TPC-B-like transaction as the reference.
        #[arg(long)]
        pgbench: bool,
        #[arg(long, default_value_t = 10)]
        pgbench_seconds: u64,
        /// Length of the latency phase (arrivals at half the measured peak).
        #[arg(long, default_value_t = 5)]
        latency_seconds: u64,
        /// Arrivals per second in the latency phase (default: half the measured peak).
        #[arg(long)]
        latency_rate: Option<f64>,
        /// Only these modes (repeatable; default: all three).
        #[arg(long = "mode", value_enum)]
        modes: Vec<crate::bench::Mode>,
        /// Show where the time goes (pg_stat_statements on the throwaway server, CPU).
        #[arg(long)]
        profile: bool,
    },
    /// Show the talk's race being prevented, then run withdrawals through the daemon.
    /// With no DATABASE_URL it starts and removes its own throwaway PostgreSQL.
    Demo {
        #[arg(long, default_value_t = 50)]
        accounts: usize,
        #[arg(long, default_value_t = 3_000)]
        withdrawals: usize,
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum AccountCommand {
    /// Open a customer account with a zero balance.
    Open {
        #[arg(long)]
        owner: String,
        /// ISO 4217 code, e.g. EUR.
        #[arg(long)]
        currency: String,
        /// How far below zero the balance may go, e.g. 100.00.
        #[arg(long, default_value = "0", allow_hyphen_values = true)]
        overdraft_limit: String,
        /// Makes opening idempotent.
        #[arg(long)]
        key: Option<String>,
    },
    /// Show an account's balance, currency and status.
    Show { id: i64 },
}

#[derive(Subcommand, Debug)]
pub enum WithdrawalCommand {
    /// Show a withdrawal's status, reason and attempts.
    Show { id: i64 },
    /// List withdrawals, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        account: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum PayoutCommand {
    /// List payouts, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Show one payout.
    Show { id: i64 },
    /// Send a failed payout again (its attempts start over).
    Retry { id: i64 },
    /// Give up on a failed payout and return the funds to the customer. A payout that
    /// may have reached the gateway is looked up there first (--payout-webhook, with the
    /// credentials from the environment): returned only if the gateway says it was
    /// rejected or never received, settled if it says accepted. `--force --reason`
    /// returns it without asking, recorded as forced.
    Return {
        id: i64,
        #[arg(long)]
        reason: Option<String>,
        /// Return without a lookup (needs --reason, which is recorded).
        #[arg(long)]
        force: bool,
        /// The webhook to look the payout up at.
        #[arg(long)]
        payout_webhook: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        payout_timeout_ms: u64,
        #[arg(long, default_value_t = 2_000)]
        payout_connect_timeout_ms: u64,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayKind {
    /// Accept every payout and log it.
    Log,
    /// POST each payout to --payout-webhook.
    Webhook,
    /// Do not dispatch payouts in this process.
    None,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Pooled connections (workers plus bookkeeping).
    #[arg(long)]
    pub pool_size: Option<u32>,
    /// Jobs queued between the claimer and the workers (split into one lane per worker).
    #[arg(long, default_value_t = 1_024)]
    pub channel_capacity: usize,
    /// Most jobs per transaction. Under load a worker takes what is queued up to this,
    /// so a larger value buys throughput without costing latency at low load.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Poll for work this often when no NOTIFY arrives.
    #[arg(long, default_value_t = 1_000)]
    pub poll_interval_ms: u64,
    /// Longest wait for a row lock before the transaction is retried.
    #[arg(long, default_value_t = 2_000)]
    pub lock_timeout_ms: u64,
    /// In-process attempts of one batch transaction on transient errors.
    #[arg(long, default_value_t = 5)]
    pub tx_attempts: u32,
    /// Attempts of one job before it ends as failed.
    #[arg(long, default_value_t = 10)]
    pub max_attempts: u32,
    /// Longest pause between two attempts of one job.
    #[arg(long, default_value_t = 30_000)]
    pub max_backoff_ms: u64,
    /// On SIGTERM/SIGINT, how long to keep finishing queued jobs and calls in flight.
    /// Jobs not started by then stay pending; a second later the process exits (status
    /// 3 if a thread was still busy, its uncommitted work rolled back by the server).
    #[arg(long, default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// Exit (0) once no withdrawal is pending.
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9187.
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Where payouts go; required, there is no default: `webhook` (with --payout-webhook;
    /// credentials from LEDGER_PAYOUT_WEBHOOK_TOKEN/SECRET), `log` (settles every payout
    /// WITHOUT paying: to try it out), or `none` (only debit).
    #[arg(long, value_enum)]
    pub gateway: Option<GatewayKind>,
    /// URL the webhook gateway POSTs payouts to (https, or http to a loopback address).
    #[arg(long)]
    pub payout_webhook: Option<String>,
    /// Gateway calls in flight at once, per dispatcher thread.
    #[arg(long, default_value_t = 16)]
    pub payout_concurrency: usize,
    /// Longest a gateway call may take (the whole request, connecting included).
    #[arg(long, default_value_t = 10_000)]
    pub payout_timeout_ms: u64,
    /// Longest the webhook gateway waits to connect.
    #[arg(long, default_value_t = 2_000)]
    pub payout_connect_timeout_ms: u64,
    /// Payout dispatcher threads.
    #[arg(long, default_value_t = 2)]
    pub payout_threads: usize,
    /// Payouts claimed per dispatcher round (one claim, one recording transaction).
    #[arg(long, default_value_t = 256)]
    pub payout_batch: usize,
    /// How long a claimed payout is reserved; at least three gateway calls
    /// (--payout-timeout-ms plus --payout-connect-timeout-ms each) plus 250 ms.
    #[arg(long, default_value_t = 60_000)]
    pub payout_lease_ms: u64,
    /// Gateway attempts before a payout is failed (then `payout retry`/`payout return`).
    #[arg(long, default_value_t = 12)]
    pub payout_max_attempts: u32,
    /// First retry delay; doubles each attempt, with jitter.
    #[arg(long, default_value_t = 200)]
    pub payout_base_backoff_ms: u64,
    /// Longest delay between two gateway attempts.
    #[arg(long, default_value_t = 60_000)]
    pub payout_max_backoff_ms: u64,
    /// How often an idle dispatcher looks for due payouts.
    #[arg(long, default_value_t = 50)]
    pub payout_poll_ms: u64,
}
