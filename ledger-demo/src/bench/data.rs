//! The bench's data: accounts, funds and withdrawals, inserted in bulk.

use super::*;

/// Opens `count` EUR accounts with a zero balance.
pub(super) fn open_accounts(conn: &mut PgConnection, count: usize) -> Result<Vec<AccountId>> {
    let mut ids = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let made = ledger_core::transaction(conn, &TxOptions::default(), |tx| {
            chunk
                .iter()
                .map(|i| Ok(accounts::open_tx(tx, &NewAccount::new(format!("bench-{i}"), Currency::EUR), None)?.id))
                .collect::<Result<Vec<_>, LedgerError>>()
        })?;
        ids.extend(made);
    }
    Ok(ids)
}

/// Deposits enough for `jobs` more withdrawals (at most 10.00 each, spread at random)
/// into every account, with room to spare: the bench measures the happy path.
pub(super) fn fund(conn: &mut PgConnection, accounts: &[AccountId], jobs: usize, tag: &str) -> Result<()> {
    let per_account_minor = ((jobs / accounts.len() + 1) as i64) * 1_000 * 4;
    for chunk in accounts.chunks(500) {
        ledger_core::transaction(conn, &TxOptions::default(), |tx| {
            for a in chunk {
                ledger_core::deposits::deposit_tx(
                    tx,
                    &ledger_core::deposits::Deposit {
                        account: *a,
                        amount: Money::from_minor(per_account_minor, Currency::EUR)?,
                        key: IdempotencyKey::new(format!("bench-{tag}-{}", a.get()))?,
                    },
                )?;
            }
            Ok::<(), LedgerError>(())
        })?;
    }
    Ok(())
}

/// Inserts withdrawal jobs directly (the bench measures processing, not request intake).
pub(super) fn insert_jobs(conn: &mut PgConnection, accounts: &[AccountId], count: usize, tag: &str) -> Result<()> {
    let ids: Vec<i64> = (0..count).map(|_| accounts[fastrand::usize(..accounts.len())].get()).collect();
    let amounts: Vec<i64> = (0..count).map(|_| fastrand::i64(100..=1_000)).collect();
    diesel::sql_query(
        "INSERT INTO withdrawals (account_id, currency, amount_minor, destination, idempotency_key)
         SELECT a, 'EUR', m, 'DE89370400440532013000', $3 || '-' || gen_random_uuid()
         FROM unnest($1::bigint[], $2::bigint[]) AS j(a, m)",
    )
    .bind::<diesel::sql_types::Array<BigInt>, _>(&ids)
    .bind::<diesel::sql_types::Array<BigInt>, _>(&amounts)
    .bind::<diesel::sql_types::Text, _>(tag)
    .execute(conn)?;
    Ok(())
}

pub(super) fn enqueue_bulk(conn: &mut PgConnection, accounts: &[AccountId], n: usize) -> Result<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(5_000);
        insert_jobs(conn, accounts, k, "bench")?;
        left -= k;
    }
    Ok(())
}
