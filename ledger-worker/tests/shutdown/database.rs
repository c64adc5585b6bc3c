//! Shutdown with the database up, stopped, blackholed, or its pool exhausted.

use super::*;

#[testing::test]
fn a_database_up_sigint_stops_cleanly_within_the_grace_period() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 3_000);
    let mut daemon = spawn_daemon_with_env(db.url(), &[LOAD, LOG_PAYOUTS].concat(), CREDENTIALS);
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    stop(&mut daemon, "INT", CLEAN, "(a) database up");
    assert!(pending(&mut conn) > 0, "the signal landed mid-run");
    assert_nothing_half_done(&mut conn);
    restart_and_finish(db.url(), LOG_PAYOUTS, &mut conn);
}

#[testing::test]
fn b_database_stopped_sigterm_stops_cleanly_within_the_grace_period() {
    let (cluster, url) = own_server();
    let mut conn = db::connect(&url, &SessionConfig::default()).unwrap();
    seed(&mut conn, 20, "500.00", 3_000);
    let mut daemon = spawn_daemon_with_env(&url, &[LOAD, LOG_PAYOUTS].concat(), CREDENTIALS);
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    drop(conn);
    cluster.stop_server().unwrap();
    // Give the daemon time to run into it: its workers wait for connections the pool
    // cannot make and retry, its claimer reconnects (when it has room to claim).
    std::thread::sleep(Duration::from_millis(1_500));
    stop(&mut daemon, "TERM", CLEAN, "(b) database stopped");
    assert_counts_unread(&mut daemon, "connecting to");
    cluster.start_server_again().unwrap();
    let mut conn = db::connect(&url, &SessionConfig::default()).unwrap();
    assert!(pending(&mut conn) > 0, "the stop landed mid-run");
    assert_nothing_half_done(&mut conn);
    restart_and_finish(&url, LOG_PAYOUTS, &mut conn);
    drop(conn);
    cluster.stop().unwrap();
}

#[testing::test]
fn c_database_blackholed_sigterm_exits_without_the_stuck_threads() {
    let (cluster, url) = own_server();
    let mut conn = db::connect(&url, &SessionConfig::default()).unwrap();
    seed(&mut conn, 20, "500.00", 3_000);
    let socket = cluster.socket_dir().join(format!(".s.PGSQL.{}", cluster.port()));
    let proxy = Proxy::start(socket.clone());
    let mut daemon = spawn_daemon_with_env(&proxy.url("shutdown_test"), &[LOAD, LOG_PAYOUTS].concat(), CREDENTIALS);
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    proxy.blackhole();
    // Every connection is silent now: progress stops, and the threads hang in libpq.
    let mut last = finished(&mut conn);
    let mut since = Instant::now();
    wait_for(Duration::from_secs(30), "progress to stop", || {
        let now = finished(&mut conn);
        if now != last {
            (last, since) = (now, Instant::now());
        }
        since.elapsed() >= Duration::from_millis(500)
    });
    stop(&mut daemon, "TERM", FORCED, "(c) database blackholed");
    assert_counts_unread(&mut daemon, "no answer from the database within");
    let stuck = still_running(&daemon);
    assert!(!stuck.is_empty(), "the log names the threads left behind: {}", stderr_of(&mut daemon));
    eprintln!("(c) left behind: {stuck:?}");
    // The network comes back: the server sees those connections end and rolls back.
    drop(proxy);
    assert!(pending(&mut conn) > 0, "the blackhole landed mid-run");
    assert_nothing_half_done(&mut conn);
    // A restart over TCP again (the URL gets the network timeouts appended).
    let proxy = Proxy::start(socket);
    restart_and_finish(&proxy.url("shutdown_test"), LOG_PAYOUTS, &mut conn);
    drop(proxy);
    drop(conn);
    cluster.stop().unwrap();
}

#[testing::test]
fn d_pool_exhausted_sigint_exits_and_waiters_for_a_connection_give_up() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 3_000);
    // Two pooled connections for three workers and two payout dispatchers, and lock
    // waits longer than the test: once the accounts are locked, both connections sit
    // in a lock wait and every other thread waits for one of them.
    let mut daemon = spawn_daemon_with_env(
        db.url(),
        &[
            &[
                "--threads",
                "3",
                "--batch-size",
                "2",
                "--pool-size",
                "2",
                "--lock-timeout-ms",
                "600000",
                "--shutdown-grace-ms",
                GRACE,
            ],
            LOG_PAYOUTS,
        ]
        .concat(),
        CREDENTIALS,
    );
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    let mut holder =
        db::connect(db.url(), &SessionConfig { lock_timeout_ms: None, ..SessionConfig::default() }).unwrap();
    holder.batch_execute("BEGIN; SELECT id FROM accounts WHERE kind = 'customer' ORDER BY id FOR UPDATE").unwrap();
    wait_for(Duration::from_secs(30), "both pooled connections to wait for a lock", || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()
               AND application_name = 'ledger-worker' AND wait_event_type = 'Lock'",
        ) >= 2
    });
    let before = finished(&mut conn);
    stop(&mut daemon, "INT", FORCED, "(d) pool exhausted");
    // Left behind: only the two workers inside a lock wait. The third worker and the
    // dispatchers, waiting for a connection, gave up in time.
    let stuck = still_running(&daemon);
    eprintln!("(d) left behind: {stuck:?}");
    assert!(!stuck.is_empty() && stuck.len() <= 2, "{stuck:?}");
    assert!(stuck.iter().all(|t| t.starts_with("worker-")), "{stuck:?}");
    assert_eq!(finished(&mut conn), before, "nothing committed while the accounts were locked");
    holder.batch_execute("ROLLBACK").unwrap();
    // The abandoned backends get their locks now, find their client gone and roll back.
    wait_for(Duration::from_secs(30), "the abandoned sessions to end", || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()
               AND application_name = 'ledger-worker'",
        ) == 0
    });
    assert_eq!(finished(&mut conn), before, "the abandoned transactions did not commit");
    assert_nothing_half_done(&mut conn);
    restart_and_finish(db.url(), LOG_PAYOUTS, &mut conn);
}
