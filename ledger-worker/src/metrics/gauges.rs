//! The queue-depth gauges: read from the database by a thread of their own while
//! someone scrapes, rendered after the counters.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ledger_core::db;
use ledger_core::stats::{self, QueueDepths};

/// How often the queue-depth gauges are read from the database, while someone scrapes.
pub const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// With no scrape for this long, the gauges stop reading the database (until the next).
const GAUGE_IDLE_AFTER: Duration = Duration::from_secs(120);

/// The gauges' names, help and reading, in the order they are rendered.
type GaugeRow = (&'static str, &'static str, fn(&QueueDepths) -> f64);
const GAUGES: [GaugeRow; 7] = [
    ("ledger_withdrawals_pending", "withdrawals requested, not yet processed", |d| d.withdrawals_pending as f64),
    ("ledger_withdrawals_retry_waiting", "pending withdrawals waiting for a retry after a failed attempt", |d| {
        d.withdrawals_retry_waiting as f64
    }),
    ("ledger_withdrawals_paying_out", "withdrawals debited, funds held in transit until the payout resolves", |d| {
        d.withdrawals_paying_out as f64
    }),
    ("ledger_withdrawals_failed", "withdrawals given up after repeated failures: an operator looks", |d| {
        d.withdrawals_failed as f64
    }),
    ("ledger_payouts_pending", "payouts to send or being sent", |d| d.payouts_pending as f64),
    ("ledger_payouts_failed", "payouts whose retries ran out: an operator retries or returns them", |d| {
        d.payouts_failed as f64
    }),
    ("ledger_withdrawals_oldest_pending_age_seconds", "age of the oldest pending withdrawal (0 when none)", |d| {
        d.oldest_pending_age_s.unwrap_or(0.0)
    }),
];

/// Queue depths from the database (`ledger_core::stats::depths`, a few index reads)
/// for the metrics endpoint. One thread reads them every [`GAUGE_INTERVAL`] on its own
/// connection (statement timeout 2 s), however many scrapers there are, and only while
/// someone scrapes: the cost is bounded whatever the traffic, and a scrape never waits.
pub struct QueueGauges {
    state: Mutex<GaugeState>,
}

#[derive(Default)]
struct GaugeState {
    read: Option<(Instant, QueueDepths)>,
    errors: u64,
    last_scrape: Option<Instant>,
}

impl QueueGauges {
    /// Starts the reading thread (it ends when the gauges are dropped).
    pub fn start(url: &str, interval: Duration) -> std::io::Result<Arc<QueueGauges>> {
        let gauges = Arc::new(QueueGauges { state: Mutex::new(GaugeState::default()) });
        let weak = Arc::downgrade(&gauges);
        let url = db::with_network_timeouts(url);
        std::thread::Builder::new().name("metrics-depths".into()).spawn(move || refresh_loop(&url, weak, interval))?;
        Ok(gauges)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GaugeState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The gauges in Prometheus text; the depths only once they have been read.
    pub fn render(&self) -> String {
        let mut state = self.lock();
        state.last_scrape = Some(Instant::now());
        let mut out = String::new();
        if let Some((at, depths)) = &state.read {
            for (name, help, value) in GAUGES {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}\n", value(depths)));
            }
            out.push_str(&format!(
                "# HELP ledger_queue_depths_age_seconds seconds since the queue depths were read from the database\n\
                 # TYPE ledger_queue_depths_age_seconds gauge\nledger_queue_depths_age_seconds {:.3}\n",
                at.elapsed().as_secs_f64()
            ));
        }
        out.push_str(&format!(
            "# HELP ledger_queue_depths_errors_total failed reads of the queue depths\n\
             # TYPE ledger_queue_depths_errors_total counter\nledger_queue_depths_errors_total {}\n",
            state.errors
        ));
        out
    }

    fn wanted(&self) -> bool {
        let state = self.lock();
        // Read once at start, then while someone scrapes.
        state.read.is_none() || state.last_scrape.is_some_and(|t| t.elapsed() < GAUGE_IDLE_AFTER)
    }

    fn record(&self, read: Result<QueueDepths, ledger_core::LedgerError>) -> Option<ledger_core::LedgerError> {
        let mut state = self.lock();
        match read {
            Ok(depths) => {
                state.read = Some((Instant::now(), depths));
                None
            }
            Err(e) => {
                state.errors += 1;
                Some(e)
            }
        }
    }
}

fn refresh_loop(url: &str, gauges: Weak<QueueGauges>, interval: Duration) {
    let session = db::SessionConfig {
        lock_timeout_ms: Some(1_000),
        statement_timeout_ms: Some(2_000),
        application_name: Some("ledger-worker metrics".into()),
    };
    let mut conn = None;
    let mut failing = false;
    loop {
        let Some(g) = gauges.upgrade() else { return };
        if g.wanted() {
            let read = match conn.as_mut() {
                Some(c) => stats::depths(c),
                None => db::connect(url, &session).and_then(|mut c| {
                    let read = stats::depths(&mut c);
                    conn = Some(c);
                    read
                }),
            };
            match g.record(read) {
                None => failing = false,
                Some(e) => {
                    conn = None; // a fresh connection next time
                    if !failing {
                        tracing::warn!(error = %e, "reading the queue depths for the metrics failed");
                    }
                    failing = true;
                }
            }
        }
        drop(g);
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Gauges that have read one set of depths (for the dashboard test too).
    pub(in crate::metrics) fn read_gauges() -> QueueGauges {
        let depths = QueueDepths {
            withdrawals_pending: 4,
            withdrawals_retry_waiting: 1,
            withdrawals_paying_out: 3,
            withdrawals_failed: 1,
            payouts_pending: 2,
            payouts_failed: 1,
            oldest_pending_age_s: Some(2.5),
        };
        let state = GaugeState { read: Some((Instant::now(), depths)), ..GaugeState::default() };
        QueueGauges { state: Mutex::new(state) }
    }

    #[test]
    fn gauges_show_the_depths_once_read() {
        let unread = QueueGauges { state: Mutex::new(GaugeState::default()) };
        let text = unread.render();
        assert!(!text.contains("ledger_withdrawals_pending"), "no figure before the first read: {text}");
        assert!(text.contains("ledger_queue_depths_errors_total 0\n"), "{text}");
        let text = read_gauges().render();
        for line in [
            "# TYPE ledger_withdrawals_pending gauge\nledger_withdrawals_pending 4\n",
            "ledger_withdrawals_retry_waiting 1\n",
            "ledger_withdrawals_paying_out 3\n",
            "ledger_withdrawals_failed 1\n",
            "ledger_payouts_pending 2\n",
            "ledger_payouts_failed 1\n",
            "ledger_withdrawals_oldest_pending_age_seconds 2.5\n",
            "ledger_queue_depths_age_seconds 0.0",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
    }
}
