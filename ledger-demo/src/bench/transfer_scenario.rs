//! The transfers scenario: `ledger_core::transfers::transfer` (one transaction per
//! transfer) and `transfers::create_batch` (one per batch), from several threads.

use super::*;
use ledger_core::batch::Item;
use ledger_core::transfers::TransferResult;

/// Transfers per `create_batch` call in the batch row.
pub(super) const TRANSFER_BATCH: usize = 500;

/// How the transfers scenario calls the ledger.
#[derive(Clone, Copy, Debug)]
pub(super) enum TransferCalls {
    Single,
    Batch(usize),
}

impl TransferCalls {
    pub(super) fn label(self) -> &'static str {
        match self {
            TransferCalls::Single => "transfer",
            TransferCalls::Batch(_) => "transfer batch",
        }
    }
}

pub(super) fn run_transfer_scenario(url: &str, calls: TransferCalls, row: &mut Row) -> Result<()> {
    let n = row.ops;
    eprintln!("== transfers ({}): {n} operations, 1000 account(s), {} thread(s)", row.mode, row.threads);
    let (mut conn, accounts) = setup(url, 1_000, n)?;
    let started = Instant::now();
    run_transfers(url, &accounts, n, row.threads, calls)?;
    row.ops_per_sec = n as f64 / started.elapsed().as_secs_f64();
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
        TransferCalls::Single => 1,
        TransferCalls::Batch(b) => b.max(1),
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let mut progress = ledger_worker::progress::Progress::new(n);
    thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let next = &next;
                s.spawn(move || -> Result<()> {
                    let mut conn = db::connect(url, &db::SessionConfig::default())?;
                    loop {
                        let first = next.fetch_add(per_call, Ordering::Relaxed);
                        if first >= n {
                            return Ok(());
                        }
                        let batch: Vec<Transfer> = (first..(first + per_call).min(n))
                            .map(|i| random_transfer(accounts, i))
                            .collect::<Result<_>>()?;
                        match calls {
                            TransferCalls::Single => {
                                transfers::transfer(&mut conn, &batch[0])?;
                            }
                            TransferCalls::Batch(_) => {
                                let items: Vec<Item<Transfer>> = batch.into_iter().map(Item::single).collect();
                                let results = transfers::create_batch(&mut conn, &items)?;
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
        Ok(())
    })
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
