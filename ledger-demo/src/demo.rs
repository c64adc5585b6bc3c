//! `ledger-demo demo`: the talk's race, unlocked and then locked, followed by a few
//! thousand concurrent withdrawals, an audit and a summary. Needs nothing running: with
//! no DATABASE_URL it starts (and removes) its own PostgreSQL.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use diesel::pg::PgConnection;
use ledger_core::accounts::{self, NewAccount};
use ledger_core::deposits::{self, Deposit};
use ledger_core::withdrawals::{self, Iban, WithdrawalRequest};
use ledger_core::{audit, db, AccountId, Currency, IdempotencyKey, LedgerError, Money, TxOptions};

use crate::database::Database;
use ledger_worker::daemon::{WorkerConfig, WorkerPool};
use ledger_worker::gateway::LogGateway;

const IBAN: &str = "DE89370400440532013000";

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub database_url: Option<String>,
    pub accounts: usize,
    pub withdrawals: usize,
    pub threads: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions { database_url: None, accounts: 50, withdrawals: 3_000, threads: 8 }
    }
}

fn eur(text: &str) -> Money {
    Money::parse(text, Currency::EUR).expect("demo amounts are valid")
}

fn key(text: String) -> IdempotencyKey {
    IdempotencyKey::new(text).expect("demo keys are valid")
}

fn open_funded(conn: &mut PgConnection, owner: &str, amount: &str) -> Result<AccountId> {
    let account = accounts::open(conn, &NewAccount::new(owner, Currency::EUR), None)?;
    deposits::deposit(
        conn,
        &Deposit { account: account.id, amount: eur(amount), key: key(format!("demo-fund-{}", account.id)) },
    )?;
    Ok(account.id)
}

pub fn run(opts: &DemoOptions) -> Result<()> {
    if let Some(url) = &opts.database_url {
        refuse_unless_empty(url)?;
    }
    let database = Database::given_or_throwaway(opts.database_url.clone(), "ledger_demo")?;
    let result = run_in(&database, opts);
    let shutdown = database.shutdown();
    result.and(shutdown)
}

/// The demo's log gateway would settle every payout due in the database without paying
/// anyone, real customers' included: it runs only in a database with nothing in it.
fn refuse_unless_empty(url: &str) -> Result<()> {
    #[derive(diesel::QueryableByName)]
    struct Relations {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = db::connect(url, &db::SessionConfig::default())?;
    let found: Relations = diesel::RunQueryDsl::get_result(
        diesel::sql_query(
            "SELECT count(*) AS n FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
             WHERE s.nspname NOT IN ('pg_catalog', 'information_schema') AND s.nspname NOT LIKE 'pg_toast%'
               AND s.nspname NOT LIKE 'pg_temp%' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')",
        ),
        &mut conn,
    )?;
    if found.n > 0 {
        bail!(
            "the demo runs only in a database it creates or an empty one, and {} holds {} table(s) or sequence(s): \
             nothing was written. Run it without --database-url to use a throwaway PostgreSQL",
            db::redact_url(url),
            found.n
        );
    }
    Ok(())
}

fn run_in(database: &Database, opts: &DemoOptions) -> Result<()> {
    let mut conn = db::connect(&database.url, &db::SessionConfig::default())?;
    let applied = db::run_migrations(&mut conn)?;
    println!("migrated the ledger schema ({applied} migration(s) applied)\n");

    println!("1) The talk's race, WITHOUT a row lock: two workers check the balance, then reduce it.");
    if database.is_throwaway() {
        let scratch = format!("ledger_demo_unlocked_{}", std::process::id());
        let scratch_url = database.create_sibling(&scratch)?;
        let unlocked = unlocked_race(&scratch_url);
        database.drop_sibling(&scratch)?;
        unlocked?;
    } else {
        // It corrupts a balance on purpose, so it needs a scratch database of its own,
        // and we create nothing on a server we were only lent one database on.
        println!("   skipped: it needs a scratch database; run the demo without --database-url to see it");
    }

    println!("\n2) The same race with ledger-core: the account row is locked inside the transaction.");
    locked_race(&database.url)?;

    println!(
        "\n3) {} concurrent withdrawals over {} accounts from {} threads:",
        opts.withdrawals, opts.accounts, opts.threads
    );
    many_withdrawals(&database.url, opts)?;
    Ok(())
}

/// Version 1 of the talk, on a scratch database: read, check, write, no lock. A barrier
/// makes both workers read before either writes, the interleaving that loses money.
fn unlocked_race(url: &str) -> Result<()> {
    let mut conn = db::connect(url, &db::SessionConfig::default())?;
    db::run_migrations(&mut conn)?;
    let account = open_funded(&mut conn, "darren", "100.00")?;
    let both_checked = Barrier::new(2);
    let amounts = ["100.00", "50.00"];
    let results: Vec<Result<()>> = thread::scope(|s| {
        let handles: Vec<_> = amounts
            .iter()
            .map(|amount| {
                let both_checked = &both_checked;
                s.spawn(move || -> Result<()> {
                    let mut conn = db::connect(url, &db::SessionConfig::default())?;
                    Ok(ledger_testdb::unlocked_withdraw(&mut conn, account, eur(amount), both_checked)?)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker panicked")).collect()
    });
    for (amount, r) in amounts.iter().zip(&results) {
        match r {
            Ok(()) => println!("   worker withdrawing {amount:>6} EUR: balance check passed, paid out"),
            Err(e) => println!("   worker withdrawing {amount:>6} EUR: {e}"),
        }
    }
    let paid: i64 = amounts.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|(a, _)| eur(a).minor()).sum();
    let stored = accounts::get(&mut conn, account)?.balance_minor;
    let report = audit::run(&mut conn)?;
    println!(
        "   paid out {} EUR from an account holding 100.00 EUR; the stored balance now says {} EUR -> {}",
        Currency::EUR.format_minor(paid),
        Currency::EUR.format_minor(stored),
        if report.is_clean() {
            "audit clean".to_string()
        } else {
            format!("audit: {} violation(s)", report.violations.len())
        }
    );
    for v in &report.violations {
        println!("      {v}");
    }
    Ok(())
}

fn request(account: AccountId, amount: Money, key_text: String) -> WithdrawalRequest {
    WithdrawalRequest {
        account,
        amount,
        destination: Iban::parse(IBAN).expect("demo IBAN is valid"),
        key: key(key_text),
    }
}

fn locked_race(url: &str) -> Result<()> {
    let mut conn = db::connect(url, &db::SessionConfig::default())?;
    let account = open_funded(&mut conn, "darren", "100.00")?;
    let start = Barrier::new(2);
    let amounts = ["100.00", "50.00"];
    let results: Vec<Result<withdrawals::Withdrawal, LedgerError>> = thread::scope(|s| {
        let handles: Vec<_> = amounts
            .iter()
            .enumerate()
            .map(|(i, amount)| {
                let start = &start;
                s.spawn(move || {
                    let mut conn = db::connect(url, &db::SessionConfig::default())?;
                    start.wait();
                    withdrawals::withdraw(&mut conn, &request(account, eur(amount), format!("demo-race-{i}")))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker panicked")).collect()
    });
    for (amount, r) in amounts.iter().zip(&results) {
        match r {
            Ok(w) => println!("   worker withdrawing {amount:>6} EUR: {}", w.status),
            Err(e) => println!("   worker withdrawing {amount:>6} EUR: refused: {e}"),
        }
    }
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let balance = accounts::get(&mut conn, account)?;
    let report = audit::run(&mut conn)?;
    println!(
        "   {ok} withdrawal went through; balance {} {}; {}",
        balance.balance_display(),
        balance.currency,
        if report.is_clean() { "audit clean" } else { "AUDIT FAILED" }
    );
    if ok != 1 || !report.is_clean() {
        bail!("the locked race did not behave: {ok} succeeded\n{report}");
    }
    Ok(())
}

fn many_withdrawals(url: &str, opts: &DemoOptions) -> Result<()> {
    let mut conn = db::connect(url, &db::SessionConfig::default())?;
    let accounts: Vec<AccountId> = (0..opts.accounts)
        .map(|i| open_funded(&mut conn, &format!("customer-{i}"), "500.00"))
        .collect::<Result<_>>()?;
    // Enqueue everything first, then let the daemon's worker pool drain the queue: the
    // same code `ledger-worker run` runs.
    let total = opts.withdrawals;
    enqueue_bulk(&mut conn, &accounts, total)?;
    let config = WorkerConfig {
        threads: opts.threads,
        pool_size: opts.threads as u32 + 2,
        application_name: "ledger-demo".into(),
        ..WorkerConfig::default()
    };
    let started = Instant::now();
    let pool = WorkerPool::builder(url, config).gateway(Arc::new(LogGateway)).start()?;
    let mut reporter = ledger_worker::progress::Progress::new(total);
    // Every figure below comes from the database, counted over this step's withdrawals
    // only (the race's payout above is settled by the same pool, and is not one of them).
    let mut processed_after: Option<Duration> = None;
    let counts = loop {
        let (counts, now) = (BulkCounts::read(&mut conn)?, started.elapsed());
        if counts.pending == 0 && processed_after.is_none() {
            processed_after = Some(now);
        }
        reporter.show(counts.processed() as usize, processed_after.unwrap_or(now));
        if counts.pending == 0 && counts.open_payouts == 0 {
            break counts;
        }
        if now > Duration::from_secs(600) {
            bail!("the withdrawals did not finish within 10 minutes");
        }
        thread::sleep(Duration::from_millis(100));
    };
    let (processed, paid_out) = (processed_after.unwrap_or_default(), started.elapsed());
    reporter.finish(counts.processed() as usize, processed);
    pool.shutdown();
    let report = audit::run(&mut conn)?;
    println!(
        "   {} debited ({} payouts settled through the log gateway), {} refused for insufficient funds, {} failed",
        counts.debited, counts.settled, counts.rejected, counts.failed
    );
    println!(
        "   {:.0} withdrawals/s ({} processed in {:.2} s, all paid out after {:.2} s; {} worker threads, batches of up to {}, fsync on)",
        counts.processed() as f64 / processed.as_secs_f64(),
        counts.processed(),
        processed.as_secs_f64(),
        paid_out.as_secs_f64(),
        opts.threads,
        WorkerConfig::default().batch_size,
    );
    println!("   {report}");
    if !report.is_clean() || counts.processed() != total as i64 || counts.settled != counts.debited {
        bail!("the run did not end cleanly");
    }
    Ok(())
}

/// Step 3's withdrawals, 500 requests per commit.
fn enqueue_bulk(conn: &mut PgConnection, accounts: &[AccountId], total: usize) -> Result<()> {
    for chunk_start in (0..total).step_by(500) {
        let chunk: Vec<usize> = (chunk_start..(chunk_start + 500).min(total)).collect();
        ledger_core::transaction(conn, &TxOptions::default(), |tx| {
            for &i in &chunk {
                // Amounts 5.00 .. 24.99, so some accounts run dry and refuse.
                let amount = Money::from_minor(500 + (i as i64 * 137) % 2_000, Currency::EUR).expect("positive");
                let account = accounts[fastrand::usize(..accounts.len())];
                withdrawals::request_tx(tx, &request(account, amount, format!("demo-bulk-{i}")))?;
            }
            Ok::<_, LedgerError>(())
        })?;
    }
    Ok(())
}

/// Step 3's withdrawals (keys `demo-bulk-*`) by what became of them, and their payouts.
#[derive(diesel::QueryableByName, Debug)]
struct BulkCounts {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pending: i64,
    /// Debited: their money left the account (paying out, completed or returned).
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    debited: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    rejected: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    failed: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    settled: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    open_payouts: i64,
}

impl BulkCounts {
    fn read(conn: &mut PgConnection) -> Result<BulkCounts> {
        Ok(diesel::RunQueryDsl::get_result(
            diesel::sql_query(
                "SELECT count(*) FILTER (WHERE w.status = 'pending') AS pending,
                        count(*) FILTER (WHERE w.status IN ('paying_out', 'completed', 'returned')) AS debited,
                        count(*) FILTER (WHERE w.status = 'rejected') AS rejected,
                        count(*) FILTER (WHERE w.status = 'failed') AS failed,
                        count(p.id) FILTER (WHERE p.status = 'settled') AS settled,
                        count(p.id) FILTER (WHERE p.status = 'pending') AS open_payouts
                 FROM withdrawals w LEFT JOIN payouts p ON p.withdrawal_id = w.id
                 WHERE w.idempotency_key LIKE 'demo-bulk-%'",
            ),
            conn,
        )?)
    }

    fn processed(&self) -> i64 {
        self.debited + self.rejected + self.failed
    }
}
