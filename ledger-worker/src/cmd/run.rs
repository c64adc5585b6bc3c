//! `ledger-worker run`: the daemon, until SIGTERM/SIGINT (or idle with --exit-when-idle).

use super::*;
use crate::daemon::{CountsUnread, ShutdownReport};

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
    /// Jobs not started by then stay pending; a second later the daemon stops waiting for
    /// its threads (status 3 if one was still busy, its uncommitted work rolled back by
    /// the server), reads what is left from the database (at most 2 s) and exits.
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
    /// How long a claimed payout is reserved: at least three gateway calls
    /// (--payout-timeout-ms each, connecting included) plus 250 ms, at most an hour.
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
    /// How often the hold expiry loop voids the pending holds past their timeout
    /// (status expired); right away again after a full batch.
    #[arg(long, default_value_t = 1_000)]
    pub hold_expiry_interval_ms: u64,
    /// Most holds expired per transaction (1 to 1000).
    #[arg(long, default_value_t = 256)]
    pub hold_expiry_batch: usize,
}

pub fn run(ctx: Ctx, args: RunArgs) -> Result<ExitCode> {
    // With --json every line on stderr is JSON, the logs included.
    init_logging(if ctx.json { LogFormat::Json } else { ctx.log_format }, "info");
    run_daemon(require_url(ctx.database_url)?, &args)
}

/// `run`'s exit status when it stopped without waiting for every thread: some were
/// still busy after `--shutdown-grace-ms` (plus a second), or a second SIGTERM/SIGINT
/// came. Nothing unfinished was committed; see [`WorkerPool::shutdown`].
pub const EXIT_FORCED: u8 = 3;

const NO_GATEWAY: &str = "`run` needs an explicit payout gateway: --gateway webhook --payout-webhook URL \
     (credentials from LEDGER_PAYOUT_WEBHOOK_TOKEN and LEDGER_PAYOUT_WEBHOOK_SECRET), --gateway log to try it out \
     (settles every payout WITHOUT paying anyone), or --gateway none to only debit";

/// The daemon's configuration from its options, checked.
fn worker_config(args: &RunArgs) -> Result<WorkerConfig> {
    let config = WorkerConfig {
        threads: args.threads,
        pool_size: args.pool_size.unwrap_or(args.threads as u32 + 2),
        channel_capacity: args.channel_capacity,
        batch_size: args.batch_size,
        poll_interval_ms: args.poll_interval_ms,
        lock_timeout_ms: args.lock_timeout_ms,
        tx_attempts: args.tx_attempts,
        job_retry: RetryPolicy {
            max_attempts: args.max_attempts,
            backoff: Backoff { cap_ms: args.max_backoff_ms, ..RetryPolicy::JOBS.backoff },
        },
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
            backoff: Backoff::new(args.payout_base_backoff_ms, args.payout_max_backoff_ms, Jitter::Half),
        },
        hold_expiry: true,
        hold_expiry_interval_ms: args.hold_expiry_interval_ms,
        hold_expiry_batch: args.hold_expiry_batch,
    };
    if args.payout_timeout_ms == 0 || args.payout_connect_timeout_ms == 0 {
        let message = "--payout-timeout-ms and --payout-connect-timeout-ms must be at least 1";
        return Err(failure::usage("payout-timeout-ms", message));
    }
    config.validate().map_err(|e| CliError::Usage { field: None, message: e })?;
    Ok(config)
}

/// The gateway `--gateway` names, with its options checked.
fn payout_gateway(args: &RunArgs) -> Result<Option<Arc<dyn PayoutGateway>>> {
    let gateway: Option<Arc<dyn PayoutGateway>> = match (args.gateway, &args.payout_webhook) {
        (None, _) => return Err(failure::usage("gateway", NO_GATEWAY)),
        (Some(GatewayKind::Webhook), None) => {
            return Err(failure::usage("payout-webhook", "--gateway webhook needs --payout-webhook URL"))
        }
        (Some(GatewayKind::Log | GatewayKind::None), Some(_)) => {
            return Err(failure::usage("payout-webhook", "--payout-webhook is only used with --gateway webhook"))
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
    Ok(gateway)
}

fn run_daemon(url: String, args: &RunArgs) -> Result<ExitCode> {
    // Bad options first (exit 2, whatever the database), then fail fast, with one clear
    // line, on an unreachable or unmigrated database; with the network timeouts the pool
    // uses, so that a server that does not answer fails too. (No handler is installed
    // yet: a signal now ends the process at once.)
    let config = worker_config(args)?;
    let gateway = payout_gateway(args)?;
    drop(connect(Some(db::with_network_timeouts(&url)))?);
    let terminate = install_signal_handlers()?;
    let metrics = Metrics::new();
    if let Some(addr) = &args.metrics_addr {
        serve_metrics(&url, addr, &metrics)?;
    }
    info!(database = %db::redact_url(&url), "starting");
    let mut builder = WorkerPool::builder(&url, config).metrics(metrics.clone());
    if let Some(g) = gateway {
        builder = builder.gateway(g);
    }
    let pool = builder.start()?;
    wait_for_stop(&pool, args, &terminate, &metrics);
    // Stops the threads, then reads what is left from the database.
    let report = pool.shutdown();
    log_stopped(&report, &metrics);
    let abandoned_read = matches!(report.in_database, Err(CountsUnread::TimedOut(_)));
    if !report.is_clean() || abandoned_read {
        // Threads are still inside libpq or the gateway's HTTP client. `_exit` ends the
        // process without running exit handlers (OpenSSL's cleanup among them) under
        // their feet; the kernel closes their sockets and the server rolls back.
        let _ = std::io::stderr().flush();
        signal_hook::low_level::exit(if report.is_clean() { 0 } else { i32::from(EXIT_FORCED) });
    }
    Ok(ExitCode::SUCCESS)
}

/// The first SIGTERM/SIGINT sets the returned flag (a graceful stop); a second one
/// exits at once with [`EXIT_FORCED`].
fn install_signal_handlers() -> Result<Arc<AtomicBool>> {
    let terminate = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // The conditional exit must be registered first: handlers run in order.
        signal_hook::flag::register_conditional_shutdown(signal, i32::from(EXIT_FORCED), terminate.clone())
            .context("installing signal handlers")?;
        signal_hook::flag::register(signal, terminate.clone()).context("installing signal handlers")?;
    }
    Ok(terminate)
}

/// Serves Prometheus metrics, the queue-depth gauges included, on `addr`.
fn serve_metrics(url: &str, addr: &str, metrics: &Arc<Metrics>) -> Result<()> {
    let gauges = metrics::QueueGauges::start(url, metrics::GAUGE_INTERVAL).context("starting the gauges")?;
    let bound = metrics::serve_with_gauges(addr, metrics.clone(), Some(gauges))
        .with_context(|| format!("serving metrics on {addr}"))?;
    info!(%bound, "serving Prometheus metrics");
    Ok(())
}

/// Returns once a signal came or, with `--exit-when-idle`, nothing is left to do;
/// logs progress every 5 s meanwhile.
fn wait_for_stop(pool: &WorkerPool, args: &RunArgs, terminate: &AtomicBool, metrics: &Metrics) {
    let mut last_report = Instant::now();
    loop {
        if terminate.load(Ordering::SeqCst) {
            info!(
                grace_ms = args.shutdown_grace_ms,
                "signal received: finishing in-flight jobs (a second signal exits at once)"
            );
            return;
        }
        if args.exit_when_idle && pool.is_idle() {
            info!("no withdrawal pending: exiting");
            return;
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
}

/// The last line of a run: what this process did, the jobs it held unfinished, and what
/// the database says is left (or why that could not be read: never a made-up zero).
fn log_stopped(report: &ShutdownReport, metrics: &Metrics) {
    let elapsed_ms = report.elapsed_ms as u64;
    let (debited, rejected, failed) =
        (Metrics::get(&metrics.debited), Metrics::get(&metrics.rejected), Metrics::get(&metrics.failed));
    let (settled, returned) = (Metrics::get(&metrics.payouts_settled), Metrics::get(&metrics.payouts_returned));
    let unfinished_in_memory = report.unfinished_in_memory;
    match &report.in_database {
        Ok(left) => info!(
            debited,
            rejected,
            failed,
            payouts_settled = settled,
            payouts_returned = returned,
            unfinished_in_memory,
            withdrawals_pending = left.withdrawals_pending,
            withdrawals_retry_waiting = left.withdrawals_retry_waiting,
            withdrawals_paying_out = left.withdrawals_paying_out,
            withdrawals_failed = left.withdrawals_failed,
            payouts_pending = left.payouts_pending,
            payouts_failed = left.payouts_failed,
            elapsed_ms,
            clean = report.is_clean(),
            "stopped"
        ),
        Err(why) => warn!(
            debited,
            rejected,
            failed,
            payouts_settled = settled,
            payouts_returned = returned,
            unfinished_in_memory,
            counts_error = %why,
            elapsed_ms,
            clean = report.is_clean(),
            "stopped; the database's counts (withdrawals pending, paying out, payouts pending...) could not be read"
        ),
    }
}
