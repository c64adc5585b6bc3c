//! `ledger-testdb`: the transactional test harness, for our tests and for services that
//! embed the ledger. A dev-dependency only: no production crate depends on it. The demo
//! and the bench reach its throwaway cluster through `ledger-demo`, never through the
//! daemon's library.
//!
//! - [`with_rollback`]: the test body gets a connection inside a transaction that is
//!   always rolled back. Fast, isolated, but nothing ever commits.
//! - [`committed`]: a brand-new database cloned from a migrated template, real commits,
//!   a real r2d2 pool and as many connections as the test wants; dropped afterwards, or
//!   kept (and its URL printed) when the test fails.
//! - The lock guard: in both modes every statement is watched; a row lock
//!   (`FOR UPDATE`/`FOR SHARE`) or transaction-scoped advisory lock taken outside a
//!   transaction of the code under test fails the test. In rollback mode the harness's
//!   own transaction does not count: code that would lock in autocommit in production
//!   (where the lock is released at once) is caught even though the test wraps it.
//! - [`wait_until_blocked`]: waits until one connection is blocked by another's lock
//!   (`pg_blocking_pids`), so interleavings are arranged deterministically.
//!
//! With neither `TEST_DATABASE_URL` nor `DATABASE_URL` set, the first use starts one
//! private throwaway PostgreSQL cluster for the test process (see [`cluster`]); it is
//! stopped and deleted when the process exits. Tests in a process share it safely: each
//! committed test has its own database, rollback tests never commit.

pub mod cluster;
pub mod deadline;
mod guard;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Text};

pub use cluster::{ClusterError, Durability, TempCluster};
pub use guard::{LockGuard, LockViolation};
/// `#[testing::test]`: a `#[test]` whose body runs under a deadline ([`deadline`]).
pub use ledger_test_macros::test;

use ledger_core::db::{self, Pool, PoolConfig, SessionConfig};
use ledger_core::{AccountId, Currency, IdempotencyKey, LedgerError};

struct Server {
    _cluster: Option<TempCluster>,
    admin_url: String,
    template: String,
    rollback_url: String,
    tag: String,
    counter: AtomicU64,
    /// CREATE DATABASE ... TEMPLATE copies one at a time per process; concurrent copies
    /// of one template can fail with "source database is being accessed by other users".
    create_lock: Mutex<()>,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

fn server() -> &'static Server {
    match SERVER.get_or_init(|| Server::start().map_err(|e| e.to_string())) {
        Ok(s) => s,
        Err(e) => panic!("test database unavailable: {e}"),
    }
}

impl Server {
    fn start() -> Result<Server, LedgerError> {
        let external = std::env::var("TEST_DATABASE_URL").or_else(|_| std::env::var("DATABASE_URL")).ok();
        let (cluster, admin_url) = match external {
            Some(url) if !url.is_empty() => (None, url),
            _ => {
                let c = TempCluster::start(Durability::Throwaway).map_err(|e| LedgerError::Pool(e.to_string()))?;
                let url = c.url("postgres");
                (Some(c), url)
            }
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() % 1_000_000_000)
            .unwrap_or(0);
        let tag = format!("{}_{nanos:x}", std::process::id());
        let template = format!("ledger_tpl_{tag}");
        let mut admin = db::connect(&admin_url, &SessionConfig::default())?;
        diesel::sql_query(format!("CREATE DATABASE {template}")).execute(&mut admin)?;
        {
            let mut conn = db::connect(&db::with_database(&admin_url, &template), &SessionConfig::default())?;
            db::run_migrations(&mut conn)?;
        }
        let rollback_db = format!("ledger_rb_{tag}");
        diesel::sql_query(format!("CREATE DATABASE {rollback_db} TEMPLATE {template}")).execute(&mut admin)?;
        let rollback_url = db::with_database(&admin_url, &rollback_db);
        Ok(Server {
            _cluster: cluster,
            admin_url,
            template,
            rollback_url,
            tag,
            counter: AtomicU64::new(0),
            create_lock: Mutex::new(()),
        })
    }
}

/// Runs `f` on a connection inside a transaction that is always rolled back. Panics if
/// the lock guard saw a lock taken at the test's own transaction level.
pub fn with_rollback<T>(f: impl FnOnce(&mut PgConnection) -> T) -> T {
    match try_with_rollback(f) {
        Ok(out) => out,
        Err(violations) => panic!("{}", guard::describe(&violations)),
    }
}

/// Like [`with_rollback`], but returns the guard's findings instead of panicking.
pub fn try_with_rollback<T>(f: impl FnOnce(&mut PgConnection) -> T) -> Result<T, Vec<LockViolation>> {
    let mut conn = PgConnection::establish(&server().rollback_url)
        .unwrap_or_else(|e| panic!("connecting to the rollback test database: {e}"));
    let guard = LockGuard::new(1);
    guard.install(&mut conn);
    conn.begin_test_transaction().expect("BEGIN for the test transaction");
    let out = f(&mut conn);
    let violations = guard.violations();
    drop(conn); // rolls the test transaction back
    if violations.is_empty() {
        Ok(out)
    } else {
        Err(violations)
    }
}

/// A database of its own for one test, with real commits. Dropped when the value is
/// dropped, unless the test is failing: then it is kept and its URL printed.
pub struct TestDb {
    name: String,
    url: String,
    pool: OnceLock<Pool>,
    guard: LockGuard,
}

/// Creates a fresh migrated database for a committed-mode test.
pub fn committed() -> TestDb {
    let server = server();
    let n = server.counter.fetch_add(1, Ordering::Relaxed);
    let name = format!("ledger_t_{}_{n}", server.tag);
    {
        let _one_at_a_time = server.create_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut admin = PgConnection::establish(&server.admin_url).expect("connecting to the admin database");
        diesel::sql_query(format!("CREATE DATABASE {name} TEMPLATE {}", server.template))
            .execute(&mut admin)
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    }
    let url = db::with_database(&server.admin_url, &name);
    TestDb { name, url, pool: OnceLock::new(), guard: LockGuard::new(0) }
}

impl TestDb {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A new dedicated connection (watched by the lock guard).
    pub fn conn(&self) -> PgConnection {
        let mut conn =
            PgConnection::establish(&self.url).unwrap_or_else(|e| panic!("connecting to {}: {e}", self.name));
        self.guard.install(&mut conn);
        conn
    }

    /// A shared r2d2 pool on this database (up to 32 connections, opened on demand).
    pub fn pool(&self) -> &Pool {
        self.pool.get_or_init(|| {
            let config = PoolConfig { max_size: 32, min_idle: Some(0), ..PoolConfig::default() };
            {
                let guard = self.guard.clone();
                db::pool_with_hook(&self.url, &config, Some(std::sync::Arc::new(move |conn| guard.install(conn))))
            }
            .unwrap_or_else(|e| panic!("pool for {}: {e}", self.name))
        })
    }

    pub fn guard(&self) -> &LockGuard {
        &self.guard
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed: keeping database {} for inspection: {}", self.name, self.url);
            return;
        }
        let violations = self.guard.violations();
        let server = server();
        if let Ok(mut admin) = PgConnection::establish(&server.admin_url) {
            let _ =
                diesel::sql_query(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut admin);
        }
        if !violations.is_empty() {
            panic!("{}", guard::describe(&violations));
        }
    }
}

/// The server process id behind a connection (to name it in `wait_until_blocked`).
pub fn backend_pid(conn: &mut PgConnection) -> i32 {
    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = Integer)]
        pid: i32,
    }
    diesel::sql_query("SELECT pg_backend_pid() AS pid").get_result::<Pid>(conn).expect("pg_backend_pid()").pid
}

/// Waits until backend `waiter` is blocked by a lock that backend `holder` holds, as
/// PostgreSQL reports it (`pg_blocking_pids`). `observer` must be a third connection.
pub fn wait_until_blocked(
    observer: &mut PgConnection,
    waiter: i32,
    holder: i32,
    timeout: Duration,
) -> Result<(), String> {
    #[derive(QueryableByName)]
    struct Blocked {
        #[diesel(sql_type = Bool)]
        blocked: bool,
    }
    let _wait = deadline::waiting_for(format!("backend {waiter} to be blocked by backend {holder}"));
    let start = Instant::now();
    loop {
        let row: Blocked = diesel::sql_query("SELECT $2 = ANY(pg_blocking_pids($1)) AS blocked")
            .bind::<Integer, _>(waiter)
            .bind::<Integer, _>(holder)
            .get_result(observer)
            .map_err(|e| e.to_string())?;
        if row.blocked {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(format!("backend {waiter} was not blocked by backend {holder} within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Polls `cond` every 2 ms until it holds; panics after `timeout`. For waiting on a
/// condition another party will make true (not for arranging interleavings).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) {
    let _wait = deadline::waiting_for(format!("a condition (testing::wait_until, {timeout:?})"));
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "condition not met within {timeout:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A fingerprint of every ledger table's contents, to show an operation changed nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbSnapshot(Vec<(String, i64, String)>);

pub fn snapshot(conn: &mut PgConnection) -> DbSnapshot {
    #[derive(QueryableByName)]
    struct TableDigest {
        #[diesel(sql_type = BigInt)]
        rows: i64,
        #[diesel(sql_type = Text)]
        digest: String,
    }
    let tables = [
        ("accounts", "id"),
        ("journal_entries", "id"),
        ("postings", "id"),
        ("withdrawals", "id"),
        ("payouts", "id"),
        ("idempotency_keys", "key"),
        ("holds", "id"),
    ];
    let digests = tables
        .iter()
        .map(|(table, pk)| {
            let d: TableDigest = diesel::sql_query(format!(
                "SELECT count(*) AS rows, md5(COALESCE(string_agg(t::text, '|' ORDER BY t.{pk}), '')) AS digest FROM {table} t"
            ))
            .get_result(conn)
            .unwrap_or_else(|e| panic!("snapshot of {table}: {e}"));
            (table.to_string(), d.rows, d.digest)
        })
        .collect();
    DbSnapshot(digests)
}

/// A process-unique idempotency key with a readable prefix.
pub fn key(prefix: &str) -> IdempotencyKey {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    IdempotencyKey::new(format!("{prefix}-{}-{n}", std::process::id())).expect("generated keys are valid")
}

/// Opens a customer account and deposits `amount` (a decimal string) into it.
pub fn funded_account(conn: &mut PgConnection, owner: &str, currency: Currency, amount: &str) -> AccountId {
    let account = ledger_core::accounts::open(conn, &ledger_core::accounts::NewAccount::new(owner, currency), None)
        .expect("opening a test account");
    if let Ok(amount) = ledger_core::Money::parse(amount, currency) {
        ledger_core::deposits::deposit(
            conn,
            &ledger_core::deposits::Deposit { account: account.id, amount, key: key("fund") },
        )
        .expect("funding a test account");
    }
    account.id
}

/// The talk's version 1, kept as a fixture: check the balance, then write it, with no
/// row lock. Every racer reads before any writes (`all_checked` makes that interleaving
/// certain), all pass the check, and each writes "balance - amount" over the others:
/// lost updates. The demo shows it; the concurrency tests use it as their negative
/// control. Never call it from production code.
pub fn unlocked_withdraw(
    conn: &mut PgConnection,
    account: AccountId,
    amount: ledger_core::Money,
    all_checked: &std::sync::Barrier,
) -> Result<(), LedgerError> {
    let currency = amount.currency();
    use ledger_core::accounts::{self, SystemRole};
    use ledger_core::journal::{self, EntryKind, Leg};
    use ledger_core::schema::accounts as a;
    ledger_core::transaction(conn, &ledger_core::TxOptions::no_retry(), |tx| {
        let balance: i64 =
            a::table.find(account.get()).select(a::balance_minor).first::<Option<i64>>(tx.conn())?.unwrap_or(0);
        all_checked.wait();
        if balance < amount.minor() {
            return Err(LedgerError::InsufficientFunds {
                account,
                currency,
                balance_minor: balance,
                floor_minor: 0,
                requested_minor: amount.minor(),
            });
        }
        let after = balance - amount.minor();
        diesel::update(a::table.find(account.get())).set(a::balance_minor.eq(Some(after))).execute(tx.conn())?;
        let in_transit = accounts::system_account(tx.conn(), SystemRole::PayoutsInTransit, currency)?;
        journal::post(
            tx,
            EntryKind::Withdrawal,
            None,
            currency,
            &[
                Leg { account, amount_minor: -amount.minor(), balance_after_minor: Some(after) },
                Leg { account: in_transit, amount_minor: amount.minor(), balance_after_minor: None },
            ],
        )?;
        Ok(())
    })
}
