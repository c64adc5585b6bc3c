//! The daemon's promises, on real processes, real connections and real commits.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use diesel::connection::SimpleConnection;
use ledger_core::retry::{Backoff, Jitter, RetryPolicy};
use ledger_core::withdrawals::{self, BatchItem, JobOutcome, WithdrawalStatus};
use ledger_core::{accounts, LedgerError, Tx, TxOptions, WithdrawalId};
use ledger_testdb as testing;
use ledger_worker::daemon::{LedgerProcessor, Processor, WorkerConfig, WorkerPool};
use ledger_worker::metrics::Metrics;

#[testing::test]
fn three_thousand_withdrawals_two_daemons_and_a_sigkill_end_exactly_once() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (_accounts, jobs) = seed(&mut conn, 50, "600.00", 3_000);
    assert_eq!(jobs.len(), 3_000);
    // Small batches and few threads keep the run long enough to be killed mid-way.
    let args = ["--threads", "2", "--batch-size", "2", "--exit-when-idle"];
    let mut a = spawn_daemon(db.url(), &args);
    let mut b = spawn_daemon(db.url(), &args);
    wait_for(Duration::from_secs(60), "daemons to make progress", || finished(&mut conn) >= 500);
    a.kill().unwrap(); // SIGKILL: no chance to finish anything
    a.wait().unwrap();
    let left_at_kill = pending(&mut conn);
    assert!(left_at_kill > 0, "the kill must land mid-run ({})", statuses(&mut conn));
    let mut a2 = spawn_daemon(db.url(), &args);
    for child in [&mut a2, &mut b] {
        let status = wait_exit(child, Duration::from_secs(120));
        assert!(status.success(), "daemon exited with {status}: {}", stderr_of(child));
    }
    assert_eq!(pending(&mut conn), 0, "{}", statuses(&mut conn));
    let failed =
        common::count(&mut conn, "SELECT count(*) AS n FROM withdrawals WHERE status NOT IN ('completed', 'rejected')");
    assert_eq!(failed, 0, "{}", statuses(&mut conn));
    let rejected = common::count(&mut conn, "SELECT count(*) AS n FROM withdrawals WHERE status = 'rejected'");
    assert!(rejected > 0, "the seed asks for more than the funds, so some are refused");
    assert_exactly_once(&mut conn);
}

#[testing::test]
fn killing_the_daemons_connections_again_and_again_loses_and_doubles_nothing() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 2_000);
    let mut daemon =
        spawn_daemon(db.url(), &["--threads", "3", "--batch-size", "4", "--exit-when-idle", "--max-attempts", "1000"]);
    let stop = AtomicBool::new(false);
    let kills = thread::scope(|s| {
        // Stops the killer however this closure ends: a panic in the wait below must not
        // leave it looping while `thread::scope` waits for it forever.
        let _stop_killer = SetOnDrop(&stop);
        let killer = s.spawn(|| {
            let mut killer = db.conn();
            let mut kills = 0;
            while !stop.load(Ordering::SeqCst) {
                // Only this test's database: other tests' daemons share the server.
                let n = common::count(
                    &mut killer,
                    "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name LIKE 'ledger-worker%'
                       AND pid <> pg_backend_pid()",
                );
                kills += n;
                thread::sleep(Duration::from_millis(40));
            }
            kills
        });
        let status = wait_exit(&mut daemon, Duration::from_secs(120));
        stop.store(true, Ordering::SeqCst);
        assert!(status.success(), "daemon exited with {status}: {}", stderr_of(&mut daemon));
        killer.join().unwrap()
    });
    assert!(kills >= 5, "the test must actually kill connections (killed {kills})");
    assert_eq!(pending(&mut conn), 0, "{}", statuses(&mut conn));
    assert_eq!(common::count(&mut conn, "SELECT count(*) AS n FROM withdrawals WHERE status = 'failed'"), 0);
    assert_exactly_once(&mut conn);
}

#[testing::test]
fn sigterm_under_load_exits_zero_and_leaves_no_job_half_done() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 20, "500.00", 3_000);
    let mut daemon = spawn_daemon(db.url(), &["--threads", "2", "--batch-size", "2"]);
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    let sent = Instant::now();
    let kill = std::process::Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = wait_exit(&mut daemon, Duration::from_secs(15));
    assert!(status.success(), "exit status {status}: {}", stderr_of(&mut daemon));
    assert!(sent.elapsed() < Duration::from_secs(12), "bounded shutdown");
    assert!(pending(&mut conn) > 0, "SIGTERM landed mid-run");
    // Whatever finished is whole; whatever did not is untouched and still pending.
    assert_exactly_once(&mut conn);
    let touched = common::count(
        &mut conn,
        "SELECT count(*) AS n FROM withdrawals WHERE status = 'pending' AND (entry_id IS NOT NULL OR attempts > 0)",
    );
    assert_eq!(touched, 0);
    // A restart finishes the rest.
    let mut again = spawn_daemon(db.url(), &["--exit-when-idle"]);
    assert!(wait_exit(&mut again, Duration::from_secs(60)).success());
    assert_eq!(pending(&mut conn), 0);
    assert_exactly_once(&mut conn);
}

/// Sets the flag when dropped, also while unwinding from a panic.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs the real processor, but panics when a batch contains `poison`, and reports
/// `stuck` as an infrastructure error every time.
struct Faulty {
    poison: Option<WithdrawalId>,
    stuck: Option<WithdrawalId>,
}

impl Processor for Faulty {
    fn process(&self, tx: &mut Tx<'_>, ids: &[WithdrawalId]) -> Result<Vec<BatchItem>, LedgerError> {
        if let Some(p) = self.poison {
            assert!(!ids.contains(&p), "poisoned job {p} reached a worker");
        }
        let others: Vec<WithdrawalId> = ids.iter().copied().filter(|id| Some(*id) != self.stuck).collect();
        let mut items = LedgerProcessor.process(tx, &others)?;
        if let Some(stuck) = self.stuck.filter(|s| ids.contains(s)) {
            items.push(BatchItem {
                id: stuck,
                outcome: JobOutcome::Errored { error: "gateway table unavailable".into(), transient: false },
                enqueued_at_us: None,
            });
        }
        Ok(items)
    }
}

fn quick_config() -> WorkerConfig {
    WorkerConfig {
        threads: 2,
        pool_size: 4,
        batch_size: 8,
        poll_interval_ms: 50,
        job_retry: RetryPolicy { max_attempts: 3, backoff: Backoff::new(10, 20, Jitter::Half) },
        ..WorkerConfig::default()
    }
}

fn status_of(conn: &mut diesel::pg::PgConnection, id: WithdrawalId) -> withdrawals::Withdrawal {
    withdrawals::get(conn, id).unwrap()
}

#[testing::test]
fn a_panicking_job_is_failed_and_its_worker_replaced_while_the_rest_complete() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (_, jobs) = seed(&mut conn, 5, "10000.00", 200);
    let poison = jobs[57];
    let metrics = Metrics::new();
    let pool = WorkerPool::start_with(
        db.url(),
        quick_config(),
        Arc::new(Faulty { poison: Some(poison), stuck: None }),
        metrics.clone(),
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "all jobs to finish", || pending(&mut conn) == 0);
    let w = status_of(&mut conn, poison);
    assert_eq!(w.status, WithdrawalStatus::Failed);
    assert!(w.reason.as_deref().unwrap_or("").contains("worker panicked"), "{w:?}");
    assert_eq!(common::count(&mut conn, "SELECT count(*) AS n FROM withdrawals WHERE status = 'paying_out'"), 199);
    wait_for(Duration::from_secs(10), "the panicked worker to be replaced", || {
        Metrics::get(&metrics.workers_replaced) >= 1
    });
    assert_eq!(Metrics::get(&metrics.panics), 1);
    // The replaced worker keeps serving new jobs.
    let (_, more) = seed(&mut conn, 1, "100.00", 3);
    wait_for(Duration::from_secs(30), "new jobs after the panic", || {
        more.iter().all(|id| status_of(&mut conn, *id).status != WithdrawalStatus::Pending)
    });
    pool.shutdown();
    assert_exactly_once(&mut conn);
}

#[testing::test]
fn a_job_that_keeps_failing_ends_failed_with_its_last_error_after_bounded_attempts() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (_, jobs) = seed(&mut conn, 3, "10000.00", 30);
    let stuck = jobs[4];
    let pool = WorkerPool::start_with(
        db.url(),
        quick_config(),
        Arc::new(Faulty { poison: None, stuck: Some(stuck) }),
        Metrics::new(),
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the stuck job to give up", || pending(&mut conn) == 0);
    pool.shutdown();
    let w = status_of(&mut conn, stuck);
    assert_eq!(w.status, WithdrawalStatus::Failed);
    assert_eq!(w.attempts, 3);
    assert_eq!(w.last_error.as_deref(), Some("gateway table unavailable"));
    assert!(w.reason.unwrap().starts_with("gave up after 3 attempts"));
    assert_exactly_once(&mut conn);
}

#[testing::test]
fn an_embedding_service_feeds_jobs_it_committed_itself_through_the_channel() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (accounts_, _) = seed(&mut conn, 1, "100.00", 0);
    // No claimer: only what the service submits is processed.
    let pool = WorkerPool::start(db.url(), WorkerConfig { claim: false, ..quick_config() }).unwrap();
    let request = |key: &str| withdrawals::WithdrawalRequest {
        account: accounts_[0],
        amount: ledger_core::Money::parse("10.00", ledger_core::Currency::EUR).unwrap(),
        destination: withdrawals::Iban::parse(IBAN).unwrap(),
        key: ledger_core::IdempotencyKey::new(key).unwrap(),
    };
    // The service's own transaction: its order row and the withdrawal commit together.
    let submitted = ledger_core::transaction(&mut conn, &TxOptions::default(), |tx| {
        tx.conn()
            .batch_execute("CREATE TABLE service_orders (id int PRIMARY KEY); INSERT INTO service_orders VALUES (1)")?;
        Ok::<_, LedgerError>(withdrawals::request_tx(tx, &request("svc-1"))?.0)
    })
    .unwrap();
    let not_submitted = withdrawals::request(&mut conn, &request("svc-2")).unwrap().0;
    pool.submit(submitted, Duration::from_secs(5)).unwrap();
    wait_for(Duration::from_secs(30), "the submitted job", || {
        status_of(&mut conn, submitted).status == WithdrawalStatus::PayingOut
    });
    assert_eq!(status_of(&mut conn, not_submitted).status, WithdrawalStatus::Pending);
    pool.shutdown();
    assert_eq!(accounts::get(&mut conn, accounts_[0]).unwrap().balance_minor, 9_000);
}

#[testing::test]
fn a_new_job_wakes_an_idle_daemon_through_notify_not_the_poll() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (accounts_, _) = seed(&mut conn, 1, "100.00", 0);
    // A one-minute poll: only NOTIFY can make the job start within seconds.
    let pool = WorkerPool::start(db.url(), WorkerConfig { poll_interval_ms: 60_000, ..quick_config() }).unwrap();
    wait_for(Duration::from_secs(10), "the claimer to go idle", || pool.is_idle());
    let started = Instant::now();
    let (id, _) = withdrawals::request(
        &mut conn,
        &withdrawals::WithdrawalRequest {
            account: accounts_[0],
            amount: ledger_core::Money::parse("1.00", ledger_core::Currency::EUR).unwrap(),
            destination: withdrawals::Iban::parse(IBAN).unwrap(),
            key: testing::key("notify"),
        },
    )
    .unwrap();
    wait_for(Duration::from_secs(20), "the job to complete", || {
        status_of(&mut conn, id).status == WithdrawalStatus::PayingOut
    });
    eprintln!("enqueue -> debited with an idle daemon: {:?}", started.elapsed());
    pool.shutdown();
}

#[testing::test]
fn a_locked_account_makes_jobs_wait_and_retry_not_fail() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (accounts_, jobs) = seed(&mut conn, 1, "1000.00", 20);
    let mut holder = db.conn();
    let metrics = Metrics::new();
    let config = WorkerConfig {
        lock_timeout_ms: 30,
        tx_attempts: 2,
        job_retry: RetryPolicy { max_attempts: 1_000, ..quick_config().job_retry },
        ..quick_config()
    };
    thread::scope(|s| {
        let (locked_tx, locked_rx) = crossbeam_channel::bounded::<()>(0);
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        s.spawn(move || {
            ledger_core::transaction(&mut holder, &TxOptions::no_retry(), |tx| {
                accounts::lock(tx, accounts_[0])?;
                locked_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok::<_, LedgerError>(())
            })
            .unwrap();
        });
        locked_rx.recv().unwrap();
        let pool = WorkerPool::start_with(db.url(), config, Arc::new(LedgerProcessor), metrics.clone()).unwrap();
        wait_for(Duration::from_secs(30), "lock timeouts to be retried", || Metrics::get(&metrics.retried) >= 3);
        assert_eq!(pending(&mut conn), 20, "nothing moved while the account was locked");
        release_tx.send(()).unwrap();
        wait_for(Duration::from_secs(30), "the jobs to complete", || pending(&mut conn) == 0);
        pool.shutdown();
    });
    for id in jobs {
        assert_eq!(status_of(&mut conn, id).status, WithdrawalStatus::PayingOut);
    }
    assert_exactly_once(&mut conn);
}

#[testing::test]
fn the_daemon_rides_out_a_database_restart() {
    use ledger_testdb::{Durability, TempCluster};
    // Its own server, so restarting it disturbs no other test.
    let cluster = TempCluster::start(Durability::Throwaway).unwrap();
    let mut admin = ledger_core::db::connect(&cluster.url("postgres"), &Default::default()).unwrap();
    admin.batch_execute("CREATE DATABASE restart_test").unwrap();
    let url = cluster.url("restart_test");
    let mut conn = ledger_core::db::connect(&url, &Default::default()).unwrap();
    ledger_core::db::run_migrations(&mut conn).unwrap();
    seed(&mut conn, 20, "500.00", 3_000);
    let mut daemon =
        spawn_daemon(&url, &["--threads", "2", "--batch-size", "2", "--exit-when-idle", "--max-attempts", "1000"]);
    wait_for(Duration::from_secs(60), "progress", || finished(&mut conn) >= 300);
    drop(conn);
    cluster.restart().unwrap();
    let mut conn = ledger_core::db::connect(&url, &Default::default()).unwrap();
    assert!(pending(&mut conn) > 0, "the restart landed mid-run");
    let status = wait_exit(&mut daemon, Duration::from_secs(120));
    assert!(status.success(), "{status}: {}", stderr_of(&mut daemon));
    assert_eq!(pending(&mut conn), 0, "{}", statuses(&mut conn));
    assert_eq!(common::count(&mut conn, "SELECT count(*) AS n FROM withdrawals WHERE status = 'failed'"), 0);
    assert_exactly_once(&mut conn);
    drop(conn);
    drop(admin);
    cluster.stop().unwrap();
}
