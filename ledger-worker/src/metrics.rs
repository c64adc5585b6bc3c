//! Counters and a latency histogram for the daemon, and queue-depth gauges read from
//! the database, rendered in Prometheus text format and served on `--metrics-addr` (off
//! by default).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod gauges;

pub use gauges::{QueueGauges, GAUGE_INTERVAL};

/// Upper bounds of the latency buckets, in milliseconds (enqueue -> final state).
const BUCKETS_MS: [u64; 14] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 60_000];

#[derive(Default)]
pub struct Metrics {
    pub claimed: AtomicU64,
    /// Jobs processed: funds debited and payout queued.
    pub debited: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
    /// Transaction attempts that hit a transient error and ran again.
    pub retried: AtomicU64,
    /// Jobs put back to pending with a recorded failed attempt.
    pub deferred: AtomicU64,
    /// Jobs another worker or daemon already had.
    pub skipped: AtomicU64,
    pub panics: AtomicU64,
    pub workers_replaced: AtomicU64,
    pub batches: AtomicU64,
    pub gateway_calls: AtomicU64,
    pub payouts_settled: AtomicU64,
    pub payouts_returned: AtomicU64,
    pub payouts_retrying: AtomicU64,
    pub payouts_failed: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS_MS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    latency_max_us: AtomicU64,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    pub fn observe_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let ms = us / 1_000;
        for (bucket, bound) in self.latency_buckets.iter().zip(BUCKETS_MS) {
            if ms < bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.latency_max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Jobs that reached the end of processing (debited, rejected or failed).
    pub fn finished(&self) -> u64 {
        Self::get(&self.debited) + Self::get(&self.rejected) + Self::get(&self.failed)
    }

    /// Payouts that reached a final state (settled or returned).
    pub fn payouts_resolved(&self) -> u64 {
        Self::get(&self.payouts_settled) + Self::get(&self.payouts_returned)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &AtomicU64, &str); 15] = [
            ("claimed", &self.claimed, "jobs handed to workers by the claimer"),
            ("debited", &self.debited, "withdrawals debited and queued for payout"),
            ("rejected", &self.rejected, "withdrawals refused for a business reason"),
            ("failed", &self.failed, "withdrawals given up after repeated non-business failures"),
            ("retried", &self.retried, "transaction attempts retried after a transient error"),
            ("deferred", &self.deferred, "jobs put back to pending after a failed attempt"),
            ("skipped", &self.skipped, "jobs already taken by another worker"),
            ("panics", &self.panics, "worker panics"),
            ("workers_replaced", &self.workers_replaced, "worker threads replaced after a panic"),
            ("batches", &self.batches, "batch transactions run"),
            ("gateway_calls", &self.gateway_calls, "payout gateway calls"),
            ("payouts_settled", &self.payouts_settled, "payouts accepted and settled"),
            ("payouts_returned", &self.payouts_returned, "payouts finally rejected, funds returned"),
            ("payouts_retrying", &self.payouts_retrying, "transient gateway failures, retried later"),
            ("payouts_failed", &self.payouts_failed, "payouts that exhausted their retries"),
        ];
        for (name, value, help) in counters {
            out.push_str(&format!(
                "# HELP ledger_jobs_{name}_total {help}\n# TYPE ledger_jobs_{name}_total counter\nledger_jobs_{name}_total {}\n",
                Self::get(value)
            ));
        }
        out.push_str("# HELP ledger_job_latency_seconds enqueue to final state\n");
        out.push_str("# TYPE ledger_job_latency_seconds histogram\n");
        for (bucket, bound) in self.latency_buckets.iter().zip(BUCKETS_MS) {
            out.push_str(&format!(
                "ledger_job_latency_seconds_bucket{{le=\"{}\"}} {}\n",
                bound as f64 / 1000.0,
                Self::get(bucket)
            ));
        }
        let count = Self::get(&self.latency_count);
        out.push_str(&format!("ledger_job_latency_seconds_bucket{{le=\"+Inf\"}} {count}\n"));
        out.push_str(&format!(
            "ledger_job_latency_seconds_sum {}\n",
            Self::get(&self.latency_sum_us) as f64 / 1_000_000.0
        ));
        out.push_str(&format!("ledger_job_latency_seconds_count {count}\n"));
        out
    }
}

/// Serves `metrics.render()` to any HTTP request on `addr`, from a background thread.
pub fn serve(addr: &str, metrics: Arc<Metrics>) -> std::io::Result<std::net::SocketAddr> {
    serve_with_gauges(addr, metrics, None)
}

/// [`serve`], with the queue-depth gauges after the counters. A scrape never waits for
/// the database: it shows the depths last read, and how old they are.
pub fn serve_with_gauges(
    addr: &str,
    metrics: Arc<Metrics>,
    gauges: Option<Arc<QueueGauges>>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut request = [0_u8; 1024];
            let _ = stream.read(&mut request);
            let mut body = metrics.render();
            if let Some(g) = &gauges {
                body.push_str(&g.render());
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_cumulative_buckets() {
        let m = Metrics::default();
        m.observe_latency(Duration::from_micros(500));
        m.observe_latency(Duration::from_millis(30));
        let text = m.render();
        assert!(text.contains("ledger_job_latency_seconds_bucket{le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("ledger_job_latency_seconds_bucket{le=\"0.025\"} 1\n"), "{text}");
        assert!(text.contains("ledger_job_latency_seconds_bucket{le=\"0.05\"} 2\n"), "{text}");
        assert!(text.contains("ledger_job_latency_seconds_count 2\n"), "{text}");
    }

    /// Every metric the endpoint exposes, by the name a query uses (a histogram's
    /// series with their suffixes).
    fn exposed() -> std::collections::BTreeSet<String> {
        let text = Metrics::default().render() + &gauges::tests::read_gauges().render();
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
            .collect()
    }

    fn metric_names_in(text: &str, out: &mut Vec<String>) {
        let bytes = text.as_bytes();
        let mut i = 0;
        while let Some(at) = text[i..].find("ledger_") {
            let start = i + at;
            let starts_word = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |n| start + n);
            if starts_word {
                out.push(text[start..end].to_string());
            }
            i = end;
        }
    }

    fn queries(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(q)) => metric_names_in(q, out),
                        _ => queries(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_grafana_dashboard_queries_only_metrics_the_endpoint_exposes_and_shows_them_all() {
        let text = include_str!("../../ops/grafana/ledger-dashboard.json");
        let dashboard: serde_json::Value = serde_json::from_str(text).expect("the dashboard is JSON");
        let mut used = Vec::new();
        queries(&dashboard, &mut used);
        let exposed = exposed();
        assert!(used.len() > 20, "{used:?}");
        for name in &used {
            assert!(
                exposed.contains(name),
                "the dashboard queries {name}, which the endpoint does not expose: {exposed:?}"
            );
        }
        // And nothing the endpoint exposes is left off (a histogram counts once).
        let shown = |name: &str| {
            let family = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            used.iter().any(|u| u.starts_with(family))
        };
        for name in &exposed {
            assert!(shown(name), "the dashboard does not show {name}");
        }
    }
}
