//! An embedding program: what a sync service built on `ledger-core` does, through the
//! crate's public API only, from several threads, against a real PostgreSQL.
//!
//! `cargo run --release -p ledger-demo --example embed -- [--transfers N] [--threads T]
//! [--committers C] [--linger-us L] [--pgbench-seconds S]` starts its own throwaway cluster, then:
//! 1. opens accounts and funds them with one deposit batch;
//! 2. moves money with single transfers (one transaction each), the same through a
//!    `Coalescer` (group commit), and `create_batch` (one transaction per batch), each
//!    from `T` threads, timed;
//! 3. sends linked chains: one that goes through, one whose last item is refused (the
//!    whole chain is refused and nothing of it is written), and a replayed key;
//! 4. holds from `T` threads: post part, post all, void;
//! 5. tries to mix currencies (each refused, nothing written);
//! 6. checks every account's balance against what the requests moved (each answer
//!    having said it did exactly that), and the audit;
//! 7. runs pgbench's TPC-B-like transaction at the same concurrency on the same server.
//!
//! It prints the rates beside pgbench's and exits non-zero on any mismatch.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ledger_core::accounts::{self, NewAccount};
use ledger_core::batch::Item;
use ledger_core::deposits::{self, Deposit, DepositResult};
use ledger_core::holds::{self, HoldRequest, HoldStatus};
use ledger_core::transfers::{self, Coalescer, CoalescerConfig, Transfer, TransferResult};
use ledger_core::{audit, db, AccountId, Currency, IdempotencyKey, LedgerError, Money};
use ledger_demo::database::Database;

/// What one run does; the test (`ledger-demo/tests/embed.rs`) runs it small.
#[allow(dead_code)] // the test includes this file and does not read every field
#[derive(Clone, Debug)]
pub struct Config {
    /// Accounts the transfers move money between.
    pub accounts: usize,
    /// Transfers per timed mode.
    pub transfers: usize,
    /// Caller threads (and pgbench clients).
    pub threads: usize,
    /// Transfers per `create_batch` call.
    pub batch: usize,
    /// Holds per thread.
    pub holds_per_thread: usize,
    /// The `Coalescer`'s committer threads (each with its own pooled connection).
    pub committers: usize,
    /// The `Coalescer`'s linger (`CoalescerConfig::linger`), in microseconds.
    pub linger_us: u64,
    /// How long pgbench runs; 0 skips it (the rates are then printed without a ratio).
    pub pgbench_seconds: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            accounts: 1_000,
            transfers: 20_000,
            threads: 4,
            batch: 500,
            holds_per_thread: 200,
            committers: 2,
            linger_us: CoalescerConfig::default().linger.as_micros() as u64,
            pgbench_seconds: 10,
        }
    }
}

/// One timed mode's result.
#[derive(Clone, Debug)]
pub struct Rate {
    /// The mode's name.
    pub mode: &'static str,
    /// Transfers committed per second.
    pub per_sec: f64,
    /// Median time of one call, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile time of one call, in milliseconds.
    pub p99_ms: f64,
}

/// What a run measured and checked.
#[derive(Debug)]
pub struct Outcome {
    /// The timed modes.
    pub rates: Vec<Rate>,
    /// pgbench's tps in the same run (`None` when skipped).
    pub pgbench_tps: Option<f64>,
    /// Accounts whose balance was checked against the answers.
    pub balances_checked: usize,
    /// What the answers said each account holds (for a caller to check again).
    pub expected: Expected,
}

/// Each account's expected balance, moved by each request the ledger answered as done.
#[derive(Debug)]
pub struct Expected {
    ids: Vec<AccountId>,
    minor: Vec<AtomicI64>,
}

impl Expected {
    /// The first account opened.
    pub fn first(&self) -> AccountId {
        self.ids[0]
    }

    fn add(&self, account: usize, delta: i64) {
        self.minor[account].fetch_add(delta, Ordering::Relaxed);
    }

    fn transfer(&self, from: usize, to: usize, minor: i64) {
        self.add(from, -minor);
        self.add(to, minor);
    }
}

const INITIAL_MINOR: i64 = 1_000_000; // 10,000.00 EUR each

/// A transfer between two different random accounts, 0.01 to 1.00 EUR.
fn random_transfer(ex: &Expected, key: String) -> Result<(usize, usize, Transfer)> {
    let from = fastrand::usize(..ex.ids.len());
    let to = (from + 1 + fastrand::usize(..ex.ids.len() - 1)) % ex.ids.len();
    let amount = Money::from_minor(fastrand::i64(1..=100), Currency::EUR)?;
    Ok((from, to, Transfer::new(ex.ids[from], ex.ids[to], amount, IdempotencyKey::new(key)?)))
}

/// Runs `per_call`-sized slices of `n` transfers from `threads` threads; `send` commits
/// one slice and answers, per transfer, whether it was created. Answers the rate.
fn timed<F>(cfg: &Config, ex: &Expected, mode: &'static str, per_call: usize, send: F) -> Result<Rate>
where
    F: Fn(&mut Option<diesel::PgConnection>, &[Transfer]) -> Result<Vec<bool>> + Sync,
{
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let mut calls: Vec<Duration> = thread::scope(|s| -> Result<Vec<Duration>> {
        let workers: Vec<_> = (0..cfg.threads)
            .map(|_| {
                s.spawn(|| -> Result<Vec<Duration>> {
                    let mut conn = None;
                    let mut calls = vec![];
                    loop {
                        let first = next.fetch_add(per_call, Ordering::Relaxed);
                        if first >= cfg.transfers {
                            return Ok(calls);
                        }
                        let slice = (first..(first + per_call).min(cfg.transfers))
                            .map(|i| random_transfer(ex, format!("{}-{i}", mode.replace(' ', "-"))))
                            .collect::<Result<Vec<_>>>()?;
                        let requests: Vec<Transfer> = slice.iter().map(|(_, _, t)| t.clone()).collect();
                        let call = Instant::now();
                        let created = send(&mut conn, &requests)?;
                        calls.push(call.elapsed());
                        ensure!(
                            created.len() == slice.len(),
                            "{mode}: {} answers for {} transfers",
                            created.len(),
                            slice.len()
                        );
                        for ((from, to, t), ok) in slice.iter().zip(created) {
                            ensure!(ok, "{mode}: a funded transfer was not created");
                            ex.transfer(*from, *to, t.amount.minor());
                        }
                    }
                })
            })
            .collect();
        let mut all = vec![];
        for w in workers {
            all.extend(w.join().map_err(|_| anyhow::anyhow!("{mode}: a thread panicked"))??);
        }
        Ok(all)
    })?;
    let per_sec = cfg.transfers as f64 / started.elapsed().as_secs_f64();
    calls.sort();
    let at = |q: f64| calls.get(((calls.len() as f64 * q) as usize).min(calls.len().saturating_sub(1)));
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let (p50_ms, p99_ms) = (ms(at(0.50)), ms(at(0.99)));
    eprintln!(
        "   {mode}: {} transfers, {per_sec:.0}/s, per call p50 {p50_ms:.2} ms, p99 {p99_ms:.2} ms",
        cfg.transfers
    );
    Ok(Rate { mode, per_sec, p50_ms, p99_ms })
}

fn connection<'c>(url: &str, conn: &'c mut Option<diesel::PgConnection>) -> Result<&'c mut diesel::PgConnection> {
    if conn.is_none() {
        *conn = Some(db::connect(url, &db::SessionConfig::default())?);
    }
    Ok(conn.as_mut().expect("just connected"))
}

/// The three ways of sending single transfers, timed.
fn transfer_modes(url: &str, cfg: &Config, ex: &Expected) -> Result<Vec<Rate>> {
    let single = timed(cfg, ex, "transfer", 1, |conn, ts| {
        let receipt = transfers::transfer(connection(url, conn)?, &ts[0])?;
        // Every answer carries both accounts' balances right after the transfer.
        ensure!(!receipt.replayed && receipt.balances.len() == 2, "unexpected receipt {receipt:?}");
        Ok(vec![true])
    })?;
    let pool = db::pool(url, &db::PoolConfig { max_size: cfg.committers as u32, ..db::PoolConfig::default() })?;
    let config = CoalescerConfig {
        committers: cfg.committers,
        linger: Duration::from_micros(cfg.linger_us),
        ..CoalescerConfig::default()
    };
    let coalescer = Coalescer::new(pool, config)?;
    let coalesced = timed(cfg, ex, "transfer coalesced", 1, |_, ts| {
        let receipt = coalescer.submit(&ts[0])?;
        ensure!(!receipt.replayed && receipt.balances.len() == 2, "unexpected receipt {receipt:?}");
        Ok(vec![true])
    })?;
    let stats = coalescer.stats();
    eprintln!(
        "   coalesced: {} groups ({:.2} transfers each, largest {}), {} waited for company (linger {} us)",
        stats.groups,
        stats.transfers as f64 / stats.groups.max(1) as f64,
        stats.largest_group,
        stats.lingered,
        cfg.linger_us
    );
    drop(coalescer);
    let batch = timed(cfg, ex, "transfer batch", cfg.batch, |conn, ts| {
        let items: Vec<Item<Transfer>> = ts.iter().cloned().map(Item::single).collect();
        let results = transfers::create_batch(connection(url, conn)?, &items)?;
        Ok(results.iter().map(|r| matches!(r, TransferResult::Created { .. })).collect())
    })?;
    Ok(vec![single, coalesced, batch])
}

/// Linked chains and a replay, with their per-item results checked.
fn chains(conn: &mut diesel::PgConnection, ex: &Expected) -> Result<()> {
    let eur = |minor| Money::from_minor(minor, Currency::EUR);
    let key = |k: &str| IdempotencyKey::new(format!("chain-{k}"));
    let (a, b, c) = (ex.ids[0], ex.ids[1], ex.ids[2]);
    // Goes through: a -> b -> c, all or nothing.
    let good = [
        Item::linked(Transfer::new(a, b, eur(500)?, key("good-1")?)),
        Item::single(Transfer::new(b, c, eur(300)?, key("good-2")?)),
    ];
    let results = transfers::create_batch(conn, &good)?;
    ensure!(results.iter().all(|r| matches!(r, TransferResult::Created { .. })), "good chain: {results:?}");
    ex.transfer(0, 1, 500);
    ex.transfer(1, 2, 300);
    // Its last item is beyond c's balance: the whole chain is refused, the first item too.
    let bad = [
        Item::linked(Transfer::new(a, c, eur(100)?, key("bad-1")?)),
        Item::single(Transfer::new(c, b, eur(i64::MAX / 2)?, key("bad-2")?)),
    ];
    let results = transfers::create_batch(conn, &bad)?;
    match &results[..] {
        [TransferResult::Refused(LedgerError::LinkedItemFailed { .. }), TransferResult::Refused(LedgerError::InsufficientFunds { .. })] =>
            {}
        other => bail!("bad chain: expected both refused (linked, insufficient funds), got {other:?}"),
    }
    // The first good item again under its key, beside a new one: replayed, created.
    let again = [
        Item::single(Transfer::new(a, b, eur(500)?, key("good-1")?)),
        Item::single(Transfer::new(c, a, eur(200)?, key("new-1")?)),
    ];
    let results = transfers::create_batch(conn, &again)?;
    match &results[..] {
        [TransferResult::Replayed { .. }, TransferResult::Created { .. }] => ex.transfer(2, 0, 200),
        other => bail!("replay batch: expected replayed then created, got {other:?}"),
    }
    eprintln!("   linked chains: all-or-nothing and replay answers as expected");
    Ok(())
}

/// Holds from every thread: each posts part of one, all of the next, voids the third.
fn hold_threads(url: &str, cfg: &Config, ex: &Expected) -> Result<usize> {
    let done = AtomicUsize::new(0);
    thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..cfg.threads)
            .map(|th| {
                let done = &done;
                s.spawn(move || -> Result<()> {
                    let mut conn = db::connect(url, &db::SessionConfig::default())?;
                    for i in 0..cfg.holds_per_thread {
                        let (from, to, t) = random_transfer(ex, format!("hold-{th}-{i}"))?;
                        let amount = t.amount.minor();
                        let req = HoldRequest { from: t.from, to: t.to, amount: t.amount, timeout: None, key: t.key };
                        let held = holds::hold(&mut conn, &req)?;
                        ensure!(held.payer.pending_debits_minor >= amount, "hold answer without its pending: {held:?}");
                        ex.add(from, -amount);
                        let key = IdempotencyKey::new(format!("hold-{th}-{i}-end"))?;
                        // What this call asks for, worked out from the request alone: the
                        // answer must say exactly that, and the balances follow the request.
                        let (posted, want) = match i % 3 {
                            0 => ((amount / 2).max(1), HoldStatus::Posted),
                            1 => (amount, HoldStatus::Posted),
                            _ => (0, HoldStatus::Voided),
                        };
                        let end = match i % 3 {
                            0 => {
                                let part = Money::from_minor(posted, Currency::EUR)?;
                                holds::post(&mut conn, held.hold.id, Some(part), &key)?
                            }
                            1 => holds::post(&mut conn, held.hold.id, None, &key)?,
                            _ => holds::void(&mut conn, held.hold.id, &key)?,
                        };
                        ensure!(
                            (end.hold.status, end.hold.posted_minor) == (want, posted),
                            "hold {i}: {:?} with {} posted, asked for {want:?} with {posted}",
                            end.hold.status,
                            end.hold.posted_minor
                        );
                        ex.add(to, posted);
                        ex.add(from, amount - posted);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().map_err(|_| anyhow::anyhow!("a hold thread panicked"))?)
    })?;
    let n = done.load(Ordering::Relaxed);
    eprintln!("   holds: {n} held and posted in part, posted or voided, from {} threads", cfg.threads);
    Ok(n)
}

/// Currencies that do not match are refused, and nothing is written.
fn mixed_currencies(conn: &mut diesel::PgConnection, ex: &Expected) -> Result<()> {
    let yen = accounts::open(conn, &NewAccount::new("embed-yen", Currency::JPY), None)?;
    let eur = Money::from_minor(100, Currency::EUR)?;
    let jpy = Money::parse("100", Currency::JPY)?;
    ensure!(eur.checked_add(jpy).is_err(), "EUR + JPY was not refused");
    let before = audit_entries(conn)?;
    let refused = [
        transfers::transfer(conn, &Transfer::new(ex.ids[0], yen.id, eur, IdempotencyKey::new("mix-1")?)),
        transfers::transfer(conn, &Transfer::new(ex.ids[0], ex.ids[1], jpy, IdempotencyKey::new("mix-2")?)),
        deposits::deposit(conn, &Deposit { account: ex.ids[0], amount: jpy, key: IdempotencyKey::new("mix-3")? }),
    ];
    for r in refused {
        ensure!(matches!(r, Err(LedgerError::CurrencyMismatch { .. })), "a currency mix was not refused: {r:?}");
    }
    ensure!(audit_entries(conn)? == before, "a refused currency mix wrote an entry");
    eprintln!("   mixed currencies: refused three ways, nothing written");
    Ok(())
}

fn audit_entries(conn: &mut diesel::PgConnection) -> Result<i64> {
    use diesel::prelude::*;
    Ok(ledger_core::schema::journal_entries::table.count().get_result(conn)?)
}

/// Opens the accounts and funds them with one deposit batch.
fn open_accounts(conn: &mut diesel::PgConnection, cfg: &Config) -> Result<Expected> {
    ensure!(cfg.accounts >= 3 && cfg.threads >= 1 && cfg.batch >= 1, "need 3 accounts, 1 thread, batches of 1");
    let mut ids = Vec::with_capacity(cfg.accounts);
    for i in 0..cfg.accounts {
        ids.push(accounts::open(conn, &NewAccount::new(format!("embed-{i}"), Currency::EUR), None)?.id);
    }
    let items: Vec<Item<Deposit>> = ids
        .iter()
        .enumerate()
        .map(|(i, &account)| -> Result<Item<Deposit>> {
            let amount = Money::from_minor(INITIAL_MINOR, Currency::EUR)?;
            Ok(Item::single(Deposit { account, amount, key: IdempotencyKey::new(format!("fund-{i}"))? }))
        })
        .collect::<Result<_>>()?;
    for chunk in items.chunks(1_000) {
        let results = deposits::create_batch(conn, chunk)?;
        ensure!(results.iter().all(|r| matches!(r, DepositResult::Created { .. })), "a funding deposit failed");
    }
    let minor = ids.iter().map(|_| AtomicI64::new(INITIAL_MINOR)).collect();
    Ok(Expected { ids, minor })
}

/// Every account's stored balance is what the answers said moved; the audit is clean.
pub fn check(conn: &mut diesel::PgConnection, ex: &Expected) -> Result<usize> {
    for (id, want) in ex.ids.iter().zip(&ex.minor) {
        let got = accounts::get(conn, *id)?.balance_minor;
        let want = want.load(Ordering::Relaxed);
        ensure!(got == want, "account {id}: balance {got}, the answers add up to {want}");
    }
    let report = audit::run(conn)?;
    ensure!(report.is_clean(), "audit:\n{report}");
    eprintln!("   {} balances exact, audit clean", ex.ids.len());
    Ok(ex.ids.len())
}

/// The whole program against `url` (an empty database, migrated here); pgbench runs
/// beside it on `reference`'s server when given and `cfg.pgbench_seconds` is not 0.
pub fn run_on(url: &str, cfg: &Config, reference: Option<&Database>) -> Result<Outcome> {
    let mut conn = db::connect(url, &db::SessionConfig::default())?;
    db::run_migrations(&mut conn).context("migrating")?;
    let ex = open_accounts(&mut conn, cfg)?;
    let rates = transfer_modes(url, cfg, &ex)?;
    chains(&mut conn, &ex)?;
    hold_threads(url, cfg, &ex)?;
    mixed_currencies(&mut conn, &ex)?;
    let balances_checked = check(&mut conn, &ex)?;
    let pgbench_tps = match (reference, cfg.pgbench_seconds) {
        (Some(database), s) if s > 0 => {
            Some(ledger_demo::bench::pgbench(database, "embed_pgbench", 10, cfg.threads, s)?)
        }
        _ => None,
    };
    Ok(Outcome { rates, pgbench_tps, balances_checked, expected: ex })
}

#[allow(dead_code)]
fn parse_args() -> Result<Config> {
    let mut cfg = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        let n: usize = value.parse().with_context(|| format!("{flag} {value}: not a whole number"))?;
        match flag.as_str() {
            "--transfers" => cfg.transfers = n,
            "--threads" => cfg.threads = n,
            "--batch" => cfg.batch = n,
            "--committers" => cfg.committers = n,
            "--linger-us" => cfg.linger_us = n as u64,
            "--pgbench-seconds" => cfg.pgbench_seconds = n as u64,
            _ => bail!(
                "unknown flag {flag} (--transfers N, --threads T, --batch B, --committers C, --linger-us L, --pgbench-seconds S)"
            ),
        }
    }
    Ok(cfg)
}

#[allow(dead_code)] // the test includes this file and calls `run_on`
fn main() -> Result<()> {
    let cfg = parse_args()?;
    let database = Database::given_or_throwaway(None, "ledger_embed")?;
    let url = database.url.clone();
    let outcome = run_on(&url, &cfg, Some(&database));
    database.shutdown()?;
    let outcome = outcome?;
    println!("| mode | transfers/s | ratio to pgbench ({} clients) | per call p50 / p99 |", cfg.threads);
    println!("|---|---|---|---|");
    for r in &outcome.rates {
        let ratio = outcome.pgbench_tps.map_or("-".to_string(), |p| format!("{:.2}x", r.per_sec / p));
        println!("| {} | {:.0} | {ratio} | {:.2} / {:.2} ms |", r.mode, r.per_sec, r.p50_ms, r.p99_ms);
    }
    if let Some(p) = outcome.pgbench_tps {
        println!("| pgbench TPC-B-like | {p:.0} | 1.00x | |");
    }
    println!("{} balances exact, per-item results as expected, audit clean", outcome.balances_checked);
    Ok(())
}
