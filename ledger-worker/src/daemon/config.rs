//! The daemon's configuration: every limit, as typed values, checked once.

use super::*;

/// Everything has a limit. Defaults suit a small server; all are `run` flags.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub threads: usize,
    pub pool_size: u32,
    /// Jobs queued between the claimer and the workers.
    pub channel_capacity: usize,
    /// Most jobs per transaction: one commit and one set-based statement for all of them
    /// (one savepoint per job only when a batch is redone after an unexpected error).
    pub batch_size: usize,
    /// Fallback poll when no NOTIFY arrives.
    pub poll_interval_ms: u64,
    pub lock_timeout_ms: u64,
    /// Attempts of one batch transaction on transient errors, in-process.
    pub tx_attempts: u32,
    /// Attempts of one job (across batches and restarts) before it ends as `failed`,
    /// and the wait between them.
    pub job_retry: RetryPolicy,
    /// Run the claimer (off: only jobs given to `submit` are processed).
    pub claim: bool,
    /// On shutdown, queued jobs not started within this time stay pending for later;
    /// threads still busy after it (plus [`WIND_DOWN`]) are not waited for.
    pub shutdown_grace_ms: u64,
    pub application_name: String,
    /// Payout dispatcher threads (used only when a gateway is given).
    pub payout_threads: usize,
    /// Payouts claimed per dispatcher round.
    pub payout_batch: usize,
    /// How long a claimed payout is reserved for its dispatcher. Must exceed the
    /// gateway's timeout, so two dispatchers never call for one payout at once.
    pub payout_lease_ms: u64,
    /// How often an idle dispatcher looks for due payouts.
    pub payout_poll_ms: u64,
    pub payout_retry: RetryPolicy,
    /// Gateway calls in flight at once, per dispatcher.
    pub payout_concurrency: usize,
    /// The longest one gateway call can take (connect plus whole-call timeout).
    pub payout_call_timeout_ms: u64,
    /// Run the hold expiry loop (`daemon/holds.rs`): void pending holds past their
    /// timeout.
    pub hold_expiry: bool,
    /// How often the expiry loop looks for due holds (at once again after a full batch).
    pub hold_expiry_interval_ms: u64,
    /// Most holds expired per transaction.
    pub hold_expiry_batch: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            threads: 4,
            pool_size: 6,
            channel_capacity: 1_024,
            batch_size: 256,
            poll_interval_ms: 1_000,
            lock_timeout_ms: 2_000,
            tx_attempts: 5,
            job_retry: RetryPolicy::JOBS,
            claim: true,
            shutdown_grace_ms: 10_000,
            application_name: "ledger-worker".into(),
            payout_threads: 2,
            payout_batch: 256,
            payout_lease_ms: 60_000,
            payout_poll_ms: 50,
            payout_retry: RetryPolicy::PAYOUTS,
            payout_concurrency: 16,
            payout_call_timeout_ms: 10_000,
            hold_expiry: true,
            hold_expiry_interval_ms: 1_000,
            hold_expiry_batch: 256,
        }
    }
}

impl WorkerConfig {
    /// What a call may take, with room for scheduling: no call starts unless this much
    /// of its claim's lease is left.
    pub fn payout_call_budget_ms(&self) -> u64 {
        self.payout_call_timeout_ms.saturating_add(ledger_core::dispatcher::LEASE_MARGIN_MS)
    }

    /// The dispatcher's limits, as `ledger_core::dispatcher` checks them.
    pub fn dispatch_config(&self) -> ledger_core::dispatcher::DispatchConfig {
        ledger_core::dispatcher::DispatchConfig {
            batch: self.payout_batch,
            concurrency: self.payout_concurrency,
            lease_ms: self.payout_lease_ms,
            call_timeout_ms: self.payout_call_timeout_ms,
            retry: self.payout_retry,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (self.threads >= 1 && self.threads <= 256, "--threads must be 1..=256"),
            (self.pool_size >= 1 && self.pool_size <= 512, "--pool-size must be 1..=512"),
            (self.channel_capacity >= 1 && self.channel_capacity <= 100_000, "--channel-capacity must be 1..=100000"),
            (self.batch_size >= 1 && self.batch_size <= 1_000, "--batch-size must be 1..=1000"),
            (self.poll_interval_ms >= 1, "--poll-interval-ms must be at least 1"),
            (self.tx_attempts >= 1 && self.tx_attempts <= 100, "--tx-attempts must be 1..=100"),
            (
                self.job_retry.max_attempts >= 1 && self.job_retry.max_attempts <= 1_000,
                "--max-attempts must be 1..=1000",
            ),
            (self.payout_threads <= 64, "--payout-threads must be 0..=64"),
            (self.payout_batch >= 1 && self.payout_batch <= 1_000, "--payout-batch must be 1..=1000"),
            (self.payout_lease_ms >= 100, "--payout-lease-ms must be at least 100"),
            (self.payout_poll_ms >= 1, "--payout-poll-ms must be at least 1"),
            (
                self.payout_retry.max_attempts >= 1 && self.payout_retry.max_attempts <= 1_000,
                "--payout-max-attempts must be 1..=1000",
            ),
            (
                self.hold_expiry_interval_ms >= 1 && self.hold_expiry_interval_ms <= 3_600_000,
                "--hold-expiry-interval-ms must be 1..=3600000",
            ),
            (
                self.hold_expiry_batch >= 1 && self.hold_expiry_batch <= ledger_core::holds::MAX_EXPIRY_BATCH,
                "--hold-expiry-batch must be 1..=1000",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, msg)) => Err(msg.to_string()),
            None if self.payout_threads > 0 => self.dispatch_config().validate().map_err(|e| match e {
                ledger_core::InvalidInput::BadField { field, reason } => format!("{} {reason}", flag_of(field)),
                other => other.to_string(),
            }),
            None => Ok(()),
        }
    }
}

/// The daemon's flag for a [`ledger_core::dispatcher::DispatchConfig`] field named in its validation error.
fn flag_of(field: &str) -> &str {
    match field {
        "batch" => "--payout-batch",
        "concurrency" => "--payout-concurrency",
        "lease_ms" => "--payout-lease-ms",
        "call_timeout_ms" => "the gateway call timeout",
        other => other,
    }
}
