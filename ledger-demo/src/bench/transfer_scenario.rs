//! The transfers scenario: `ledger_core::transfers::transfer` from several threads.

use super::*;

pub(super) fn run_transfer_scenario(url: &str, row: &mut Row) -> Result<()> {
    let n = row.ops;
    eprintln!("== transfers: {n} operations, 1000 account(s), {} thread(s)", row.threads);
    let (mut conn, accounts) = setup(url, 1_000, n)?;
    let started = Instant::now();
    run_transfers(url, &accounts, n, row.threads)?;
    row.ops_per_sec = n as f64 / started.elapsed().as_secs_f64();
    row.rss_mb = rss_mb(std::process::id()).unwrap_or(0.0);
    audit_into(&mut conn, row)
}

pub(super) fn run_transfers(url: &str, accounts: &[AccountId], n: usize, threads: usize) -> Result<()> {
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
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        let from = accounts[fastrand::usize(..accounts.len())];
                        let mut to = accounts[fastrand::usize(..accounts.len())];
                        while to == from && accounts.len() > 1 {
                            to = accounts[fastrand::usize(..accounts.len())];
                        }
                        transfers::transfer(
                            &mut conn,
                            &Transfer {
                                from,
                                to,
                                amount: Amount::from_minor(fastrand::i64(100..=1_000))?,
                                currency: Currency::EUR,
                                key: IdempotencyKey::new(format!("bench-t-{i}"))?,
                            },
                        )?;
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
