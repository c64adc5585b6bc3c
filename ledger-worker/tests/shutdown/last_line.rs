//! The daemon's last log line after SIGTERM says what the database still holds.

use super::*;

static INFO_LOGS: AtomicUsize = AtomicUsize::new(0);

/// A daemon whose log keeps the `info` lines (the shared `spawn_daemon` logs warnings
/// only), killed and reaped when dropped, also when the test panics.
struct InfoDaemon {
    child: Child,
    log: std::path::PathBuf,
}

impl InfoDaemon {
    fn start(url: &str, extra: &[&str]) -> InfoDaemon {
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "ledger-daemon-{}-info-{}.log",
            std::process::id(),
            INFO_LOGS.fetch_add(1, SeqCst)
        ));
        let file = std::fs::File::create(&log).expect("creating the daemon log");
        let child = worker_command()
            .args(["run", "--database-url", url, "--log-format", "json"])
            .args(extra)
            .envs(CREDENTIALS.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("starting the daemon");
        InfoDaemon { child, log }
    }

    /// The daemon's log lines (JSON objects) whose message starts with `prefix`.
    fn lines(&self, prefix: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
            .collect()
    }
}

impl Drop for InfoDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[testing::test]
fn h_after_sigterm_the_last_line_says_what_the_database_still_holds() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 3_000);
    let mut daemon = InfoDaemon::start(db.url(), &[LOAD, LOG_PAYOUTS].concat());
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    stop(&mut daemon.child, "TERM", CLEAN, "(h) counts after the stop");
    let stopped = daemon.lines("stopped");
    assert_eq!(stopped.len(), 1, "one last line: {stopped:?}");
    let fields = &stopped[0]["fields"];
    eprintln!("(h) the last line: {fields}");
    assert!(fields.get("counts_error").is_none(), "the counts were read: {fields}");
    // The in-memory figure is there, under a name that says what it is.
    assert!(fields["unfinished_in_memory"].is_u64(), "{fields}");
    assert!(fields.get("left_pending").is_none(), "{fields}");
    // Every database figure is exactly what the database says, now that the daemon is gone.
    for (field, sql) in DIRECT_COUNTS {
        let direct = count(&mut conn, sql);
        assert_eq!(fields[field].as_i64(), Some(direct), "{field}: logged {} but counted {direct}", fields[field]);
    }
    let left = count(&mut conn, DIRECT_COUNTS[0].1);
    assert!(left > 0, "the signal landed mid-run, with withdrawals still pending");
    // The pool's own line agrees.
    let pool_line = daemon.lines("worker pool stopped");
    assert_eq!(pool_line.len(), 1, "{pool_line:?}");
    assert_eq!(pool_line[0]["fields"]["withdrawals_pending"].as_i64(), Some(left));
    assert_nothing_half_done(&mut conn);
    restart_and_finish(db.url(), LOG_PAYOUTS, &mut conn);
}
