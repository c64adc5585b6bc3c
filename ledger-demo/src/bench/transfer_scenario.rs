//! The transfers scenario: `ledger_core::transfers::transfer` (one transaction per
//! transfer), the same single transfers through a `transfers::Coalescer` (group commit),
//! and `transfers::create_batch` (one transaction per batch), from several threads.

use super::*;
use ledger_core::batch::Item;
use ledger_core::transfers::{Coalescer, CoalescerConfig, TransferResult};

/// Transfers per `create_batch` call in the batch row.
pub(super) const TRANSFER_BATCH: usize = 500;

/// Committer threads of the coalesced row's `Coalescer`.
pub(super) const COALESCE_COMMITTERS: usize = 2;

/// How the transfers scenario calls the ledger.
#[derive(Clone, Copy, Debug)]
pub(super) enum TransferCalls {
    /// `transfers::transfer`, one transaction each.
    Single,
    /// `Coalescer::submit`: one transfer per call, group-committed.
    Coalesced,
    /// `transfers::create_batch` with this many transfers per call.
    Batch(usize),
}

impl TransferCalls {
    pub(super) fn label(self) -> &'static str {
        match self {
            TransferCalls::Single => "transfer",
            TransferCalls::Coalesced => "transfer coalesced",
            TransferCalls::Batch(_) => "transfer batch",
        }
    }
}

pub(super) fn run_transfer_scenario(url: &str, calls: TransferCalls, row: &mut Row) -> Result<()> {
    let n = row.ops;
    eprintln!("== transfers ({}): {n} operations, 1000 account(s), {} thread(s)", row.mode, row.threads);
    let (mut conn, accounts) = setup(url, 1_000, n)?;
    let profiled = profiling(&mut conn) && start_profile(&mut conn);
    let (cpu_before, server_before) = (cpu_seconds(std::process::id()), server_cpu_seconds(&mut conn));
    let started = Instant::now();
    run_transfers(url, &accounts, n, row.threads, calls)?;
    let elapsed = started.elapsed();
    row.ops_per_sec = n as f64 / elapsed.as_secs_f64();
    if profiled {
        let cpu = cpu_seconds(std::process::id()).zip(cpu_before).map_or(0.0, |(a, b)| a - b);
        let server = server_cpu_seconds(&mut conn).zip(server_before).map(|(a, b)| a - b);
        print_profile(&mut conn, calls.label(), n, elapsed, cpu, server)?;
    }
    row.rss_mb = rss_mb(std::process::id()).unwrap_or(0.0);
    audit_into(&mut conn, row)
}

pub(super) fn run_transfers(
    url: &str,
    accounts: &[AccountId],
    n: usize,
    threads: usize,
    calls: TransferCalls,
) -> Result<()> {
    let per_call = match calls {
        TransferCalls::Single | TransferCalls::Coalesced => 1,
        TransferCalls::Batch(b) => b.max(1),
    };
    let coalescer = match calls {
        TransferCalls::Coalesced => Some(coalescer(url)?),
        _ => None,
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let mut progress = ledger_worker::progress::Progress::new(n);
    thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (next, coalescer) = (&next, coalescer.as_ref());
                s.spawn(move || -> Result<()> {
                    // The coalesced row's callers need no connection of their own.
                    let mut conn =
                        if coalescer.is_none() { Some(db::connect(url, &db::SessionConfig::default())?) } else { None };
                    loop {
                        let first = next.fetch_add(per_call, Ordering::Relaxed);
                        if first >= n {
                            return Ok(());
                        }
                        let batch: Vec<Transfer> = (first..(first + per_call).min(n))
                            .map(|i| random_transfer(accounts, i))
                            .collect::<Result<_>>()?;
                        match (coalescer, conn.as_mut()) {
                            (Some(c), _) => {
                                c.submit(&batch[0])?;
                            }
                            (None, Some(conn)) if per_call == 1 => {
                                transfers::transfer(conn, &batch[0])?;
                            }
                            (None, conn) => {
                                let conn = conn.expect("a connection without a coalescer");
                                let items: Vec<Item<Transfer>> = batch.into_iter().map(Item::single).collect();
                                let results = transfers::create_batch(conn, &items)?;
                                // The accounts are funded for every transfer: all go through.
                                if let Some(r) = results.iter().find(|r| !matches!(r, TransferResult::Created { .. })) {
                                    bail!("a batch transfer was not created: {r:?}");
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        while handles.iter().any(|h| !h.is_finished()) {
            progress.show(next.load(Ordering::Relaxed).min(n), started.elapsed());
            thread::sleep(Duration::from_millis(100));
        }
        progress.finish(n, started.elapsed());
        for h in handles {
            h.join().map_err(|_| anyhow!("transfer thread panicked"))??;
        }
        if let Some(c) = &coalescer {
            let st = c.stats();
            let average = st.transfers as f64 / st.groups.max(1) as f64;
            eprintln!(
                "   coalesced: {} groups, {average:.1} transfers per group, largest {}, {} waited for company (linger {:?})",
                st.groups,
                st.largest_group,
                st.lingered,
                CoalescerConfig::default().linger
            );
        }
        Ok(())
    })
}

/// The coalesced row's `Coalescer`: a pool of one connection per committer.
fn coalescer(url: &str) -> Result<Coalescer> {
    let pool_config = db::PoolConfig { max_size: COALESCE_COMMITTERS as u32, ..db::PoolConfig::default() };
    let config = CoalescerConfig { committers: COALESCE_COMMITTERS, ..CoalescerConfig::default() };
    Ok(Coalescer::new(db::pool(url, &pool_config)?, config)?)
}

/// Whether `bench --profile` started the server with pg_stat_statements.
fn profiling(conn: &mut PgConnection) -> bool {
    #[derive(QueryableByName)]
    struct Preload {
        #[diesel(sql_type = diesel::sql_types::Text)]
        libs: String,
    }
    let sql = diesel::sql_query("SELECT current_setting('shared_preload_libraries') AS libs");
    sql.get_result::<Preload>(conn).is_ok_and(|p| p.libs.contains("pg_stat_statements"))
}

/// Transfer `i` of the run: between two random accounts, in either direction.
fn random_transfer(accounts: &[AccountId], i: usize) -> Result<Transfer> {
    let from = accounts[fastrand::usize(..accounts.len())];
    let mut to = accounts[fastrand::usize(..accounts.len())];
    while to == from && accounts.len() > 1 {
        to = accounts[fastrand::usize(..accounts.len())];
    }
    Ok(Transfer {
        from,
        to,
        amount: Money::from_minor(fastrand::i64(100..=1_000), Currency::EUR)?,
        key: IdempotencyKey::new(format!("bench-t-{i}"))?,
        metadata: None,
    })
}
