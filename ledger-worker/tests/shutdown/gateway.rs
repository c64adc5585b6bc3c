//! Shutdown with the payout gateway answering or hanging, and a second signal that exits at once.

use super::*;

/// A well-behaved bank that expects [`CREDENTIALS`] (and can be told to hang).
fn start_bank() -> Bank {
    let (token, secret) = (CREDENTIALS[0].1.to_string(), CREDENTIALS[1].1.to_string());
    Bank::start(BankConfig { token, secret, ..BankConfig::default() }).expect("starting the test bank")
}

/// The webhook gateway against `bank`, a gateway timeout of `timeout_ms` (plus 500 ms
/// to connect), and a lease of `lease_ms`: room for three calls plus a margin.
fn payout_args<'a>(bank: &'a Bank, timeout_ms: &'a str, lease_ms: &'a str) -> Vec<&'a str> {
    vec![
        "--gateway",
        "webhook",
        "--payout-webhook",
        bank.url(),
        "--payout-timeout-ms",
        timeout_ms,
        "--payout-connect-timeout-ms",
        "500",
        "--payout-lease-ms",
        lease_ms,
        "--payout-threads",
        "2",
        "--payout-batch",
        "4",
    ]
}

/// Every settled payout was paid by the bank; with `exactly`, every paid one is settled.
fn assert_settled_as_paid(conn: &mut PgConnection, bank: &Bank, exactly: bool) {
    #[derive(diesel::QueryableByName)]
    struct Key {
        #[diesel(sql_type = diesel::sql_types::Text)]
        key: String,
    }
    use diesel::RunQueryDsl;
    let settled: std::collections::HashSet<String> =
        diesel::sql_query("SELECT idempotency_key AS key FROM payouts WHERE status = 'settled'")
            .load::<Key>(conn)
            .unwrap()
            .into_iter()
            .map(|k| k.key)
            .collect();
    let paid: std::collections::HashSet<String> = bank.paid().into_keys().collect();
    assert!(settled.is_subset(&paid), "settled in the ledger => paid by the bank");
    if exactly {
        assert_eq!(settled, paid, "settled in the ledger <=> paid by the bank");
    }
}

#[testing::test]
fn e_gateway_answering_sigterm_stops_cleanly_within_the_grace_period() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 3_000);
    let bank = start_bank();
    let payout = payout_args(&bank, "1000", "6000");
    let mut daemon = spawn_daemon_with_env(db.url(), &[LOAD, &payout].concat(), CREDENTIALS);
    wait_for(Duration::from_secs(60), "payouts to settle", || {
        count(&mut conn, "SELECT count(*) AS n FROM payouts WHERE status = 'settled'") >= 50
    });
    stop(&mut daemon, "TERM", CLEAN, "(e) gateway answering");
    assert!(pending(&mut conn) > 0, "the signal landed mid-run");
    assert_nothing_half_done(&mut conn);
    // (An answer the daemon could not record before exiting is asked for again, with
    // the same key, after the lease: the bank answers it without paying twice.)
    assert_settled_as_paid(&mut conn, &bank, false);
    restart_and_finish(db.url(), &payout, &mut conn);
    assert_settled_as_paid(&mut conn, &bank, true);
}

#[testing::test]
fn f_gateway_hanging_sigterm_exits_and_cut_off_payouts_stay_pending() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 3_000);
    let bank = start_bank();
    // A gateway timeout past the grace period (plus the second of wind-down), so the
    // calls are cut off by the exit, not by their timeout.
    let payout = payout_args(&bank, "4000", "15000");
    let mut daemon = spawn_daemon_with_env(db.url(), &[LOAD, &payout].concat(), CREDENTIALS);
    wait_for(Duration::from_secs(60), "payouts to settle", || {
        count(&mut conn, "SELECT count(*) AS n FROM payouts WHERE status = 'settled'") >= 20
    });
    bank.set_hang(true);
    wait_for(Duration::from_secs(30), "both dispatchers to hang in a call", || bank.hung_keys().len() >= 2);
    stop(&mut daemon, "TERM", FORCED, "(f) gateway hanging");
    let stuck = still_running(&daemon);
    eprintln!("(f) left behind: {stuck:?}");
    assert!(
        !stuck.is_empty()
            && stuck.iter().all(|t| t.starts_with("payouts-") && t.ends_with("calling the payout gateway")),
        "{stuck:?}"
    );
    // The cut-off payouts were neither paid nor refused: pending, due after their lease.
    for key in bank.hung_keys() {
        let status = count(
            &mut conn,
            &format!("SELECT count(*) AS n FROM payouts WHERE idempotency_key = '{key}' AND status = 'pending'"),
        );
        assert_eq!(status, 1, "payout {key} is still pending");
    }
    assert_nothing_half_done(&mut conn);
    assert_settled_as_paid(&mut conn, &bank, false);
    // They are claimed again once their lease runs out. A payout whose call was cut
    // off may have been paid, so it is looked up before it is sent again; the webhook
    // gateway cannot look payouts up yet, so the rest is paid through the log gateway
    // (which knows no earlier call and sends it again).
    restart_and_finish(db.url(), LOG_PAYOUTS, &mut conn);
    for key in bank.hung_keys() {
        let settled = count(
            &mut conn,
            &format!("SELECT count(*) AS n FROM payouts WHERE idempotency_key = '{key}' AND status = 'settled'"),
        );
        assert_eq!(settled, 1, "payout {key} was claimed again after its lease and settled");
    }
}

#[testing::test]
fn g_a_second_signal_exits_at_once_without_waiting_for_the_grace_period() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 5, "500.00", 200);
    // Every account locked before the daemon starts: its first batch waits for a lock,
    // and a first signal would wait out a long grace period for it.
    let mut holder =
        db::connect(db.url(), &SessionConfig { lock_timeout_ms: None, ..SessionConfig::default() }).unwrap();
    holder.batch_execute("BEGIN; SELECT id FROM accounts WHERE kind = 'customer' ORDER BY id FOR UPDATE").unwrap();
    let mut daemon = spawn_daemon_with_env(
        db.url(),
        &[&["--threads", "1", "--lock-timeout-ms", "600000", "--shutdown-grace-ms", "60000"], LOG_PAYOUTS].concat(),
        CREDENTIALS,
    );
    wait_for(Duration::from_secs(30), "a batch to wait for a lock", || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()
               AND application_name = 'ledger-worker' AND wait_event_type = 'Lock'",
        ) >= 1
    });
    let kill = |signal: &str, pid: u32| {
        assert!(Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap().success());
    };
    kill("TERM", daemon.id());
    std::thread::sleep(Duration::from_millis(500));
    assert!(daemon.try_wait().unwrap().is_none(), "the first signal waits for the grace period");
    let sent = Instant::now();
    kill("INT", daemon.id());
    let status = wait_exit(&mut daemon, Duration::from_secs(30));
    eprintln!("second signal -> exit {status} after {} ms", sent.elapsed().as_millis());
    assert!(sent.elapsed() < Duration::from_secs(5), "a second signal exits at once");
    assert_eq!(status.code(), Some(FORCED), "{}", stderr_of(&mut daemon));
    holder.batch_execute("ROLLBACK").unwrap();
    assert_eq!(finished(&mut conn), 0, "nothing was done");
    assert_nothing_half_done(&mut conn);
    restart_and_finish(db.url(), LOG_PAYOUTS, &mut conn);
}
