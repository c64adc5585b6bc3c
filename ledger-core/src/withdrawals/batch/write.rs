//! The fast path's one statement: a planned batch written by `write_plan.sql`, its
//! counts checked against the plan, and the claim on the payouts it queued.

use std::collections::HashMap;

use diesel::sql_types::{Array, BigInt, Nullable, Text};

use super::*;
use crate::prepared::Prepared;

/// What the batch statement returns: its counts, paired with the plan before anything
/// else is believed, and per debited job (in id order) its entry, payout and claim.
#[derive(QueryableByName)]
struct Written {
    #[diesel(sql_type = BigInt)]
    postings: i64,
    #[diesel(sql_type = BigInt)]
    balances: i64,
    #[diesel(sql_type = BigInt)]
    jobs: i64,
    #[diesel(sql_type = Array<BigInt>)]
    debited: Vec<i64>,
    #[diesel(sql_type = Array<BigInt>)]
    entries: Vec<i64>,
    #[diesel(sql_type = Array<BigInt>)]
    payouts: Vec<i64>,
    /// Per payout (same order): its claim token when claimed here, else NULL.
    #[diesel(sql_type = Array<Nullable<BigInt>>)]
    tokens: Vec<Option<i64>>,
    #[diesel(sql_type = Array<Text>)]
    keys: Vec<String>,
    /// What was left of the claims' lease while the statement ran (server clock).
    #[diesel(sql_type = diesel::sql_types::Double)]
    lease_left_ms: f64,
}

/// A planned batch as the statement's parameters: one array a column, in job (id)
/// order; the debits' columns all have one element per debit.
#[derive(Default)]
struct PlanColumns<'a> {
    debit_ids: Vec<i64>,
    debit_accounts: Vec<i64>,
    debit_currencies: Vec<&'a str>,
    debit_amounts_minor: Vec<i64>,
    debit_afters_minor: Vec<i64>,
    debit_in_transit: Vec<i64>,
    debit_destinations: Vec<String>,
    /// Each debited account once, with its balance after the batch's last debit of it.
    balance_accounts: Vec<i64>,
    balances_minor: Vec<i64>,
    rejected_ids: Vec<i64>,
    rejected_reasons: Vec<String>,
}

/// Writes a planned batch in one statement: data-modifying CTEs insert the entries,
/// their postings, the payouts, and update the balances and job statuses. One round
/// trip per batch instead of several per job. At the end of the statement the postings
/// trigger checks every entry is balanced and names an existing entry and account, and
/// the queue's triggers check each payout's withdrawal and account and each job's
/// entry: one pass per table, no row locks (migration 2026-12-07-000030).
pub(super) fn write_plan(
    tx: &mut Tx<'_>,
    jobs: &[LockedJob],
    plan: &[Planned],
    claim_lease_ms: Option<u64>,
) -> Result<(Vec<BatchItem>, Option<outbox::Claim>), LedgerError> {
    let columns = plan_columns(jobs, plan);
    // Before the statement is sent: the server's clock_timestamp() is later still.
    let sent_at = std::time::Instant::now();
    let written = send_plan(tx, &columns, claim_lease_ms)?;
    assert_written_as_planned(&written, &columns, jobs.len(), claim_lease_ms);
    let entry_of: HashMap<i64, i64> = written.debited.iter().copied().zip(written.entries.iter().copied()).collect();
    let payout_of: HashMap<i64, i64> = written.debited.iter().copied().zip(written.payouts.iter().copied()).collect();
    let claimed = claim_lease_ms.map(|_| claim_written(written, jobs, sent_at));
    Ok((batch_items(jobs, plan, &entry_of, &payout_of), claimed))
}

/// Splits the plan into the statement's columns: debits, final balances, refusals.
fn plan_columns<'a>(jobs: &'a [LockedJob], plan: &[Planned]) -> PlanColumns<'a> {
    let mut columns = PlanColumns::default();
    let mut last_balance: HashMap<i64, i64> = HashMap::new();
    for ((job, _, _), decision) in jobs.iter().zip(plan) {
        match decision {
            Planned::Debit { after_minor, in_transit } => {
                columns.debit_ids.push(job.id.get());
                columns.debit_accounts.push(job.account_id.get());
                columns.debit_currencies.push(job.currency.code());
                columns.debit_amounts_minor.push(job.amount_minor);
                columns.debit_afters_minor.push(*after_minor);
                columns.debit_in_transit.push(*in_transit);
                columns.debit_destinations.push(job.destination.clone());
                last_balance.insert(job.account_id.get(), *after_minor); // jobs are in id order
            }
            Planned::Reject { reason, .. } => {
                columns.rejected_ids.push(job.id.get());
                columns.rejected_reasons.push(reason.clone());
            }
        }
    }
    (columns.balance_accounts, columns.balances_minor) = last_balance.into_iter().unzip();
    columns
}

/// The one statement (`write_plan.sql`), its parameters in the order it numbers them.
fn send_plan(tx: &mut Tx<'_>, columns: &PlanColumns<'_>, claim_lease_ms: Option<u64>) -> Result<Written, LedgerError> {
    Ok(Prepared::<WritePlan>::new()
        .bind::<Array<BigInt>, _>(&columns.debit_ids)
        .bind::<Array<BigInt>, _>(&columns.debit_accounts)
        .bind::<Array<Text>, _>(&columns.debit_currencies)
        .bind::<Array<BigInt>, _>(&columns.debit_amounts_minor)
        .bind::<Array<BigInt>, _>(&columns.debit_afters_minor)
        .bind::<Array<BigInt>, _>(&columns.debit_in_transit)
        .bind::<Array<Text>, _>(&columns.debit_destinations)
        .bind::<Array<BigInt>, _>(&columns.balance_accounts)
        .bind::<Array<BigInt>, _>(&columns.balances_minor)
        .bind::<Array<BigInt>, _>(&columns.rejected_ids)
        .bind::<Array<Text>, _>(&columns.rejected_reasons)
        .bind::<Nullable<BigInt>, _>(claim_lease_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX)))
        .get_result(tx.conn())?)
}

/// Pairs the statement's counts with what was planned (assertions, not hopes).
fn assert_written_as_planned(written: &Written, columns: &PlanColumns<'_>, jobs: usize, claim_lease_ms: Option<u64>) {
    let debits = columns.debit_ids.len();
    assert_eq!(written.postings as usize, debits * 2, "two postings per debit");
    assert_eq!(written.balances as usize, columns.balance_accounts.len(), "one balance per debited account");
    assert_eq!(written.jobs as usize, jobs, "the batch holds every job's row lock");
    assert_eq!(
        written.debited,
        columns.debit_ids.iter().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>()
    );
    assert_eq!((written.entries.len(), written.payouts.len()), (debits, debits));
    assert_eq!((written.tokens.len(), written.keys.len()), (debits, debits));
    assert!(
        written.tokens.iter().all(|t| t.is_some() == claim_lease_ms.is_some()),
        "every payout is claimed exactly when a lease was asked for"
    );
}

/// The claim on every payout the statement queued (and claimed): its lease ends what
/// the server had left of it after `sent_at`, so never later than the database's.
fn claim_written(written: Written, jobs: &[LockedJob], sent_at: std::time::Instant) -> outbox::Claim {
    let left = std::time::Duration::from_millis(written.lease_left_ms.max(0.0).floor() as u64);
    let mut claim = outbox::Claim { requests: vec![], lease_until: sent_at + left };
    let job_of: HashMap<i64, &Withdrawal> = jobs.iter().map(|(j, _, _)| (j.id.get(), j)).collect();
    for ((wid, payout), (token, key)) in
        written.debited.iter().zip(&written.payouts).zip(written.tokens.iter().zip(written.keys))
    {
        let job = job_of[wid];
        let currency = job.currency;
        claim.requests.push(outbox::PayoutRequest {
            payout: PayoutId::from_db(*payout),
            withdrawal: WithdrawalId::from_db(*wid),
            amount_minor: job.amount_minor,
            amount: currency.format_minor(job.amount_minor),
            currency: job.currency.code().to_string(),
            destination: job.destination.clone(),
            idempotency_key: key,
            attempt: 1,
            token: token.expect("claimed above"),
            possibly_sent: false,
        });
    }
    claim
}

/// Each job's outcome as planned, with the entry and payout written for a debit.
fn batch_items(
    jobs: &[LockedJob],
    plan: &[Planned],
    entry_of: &HashMap<i64, i64>,
    payout_of: &HashMap<i64, i64>,
) -> Vec<BatchItem> {
    jobs.iter()
        .zip(plan)
        .map(|((job, enqueued_at_us, _), d)| BatchItem {
            id: job.id,
            outcome: match d {
                Planned::Debit { .. } => JobOutcome::Debited {
                    entry: EntryId::from_db(entry_of[&job.id.get()]),
                    payout: PayoutId::from_db(payout_of[&job.id.get()]),
                },
                Planned::Reject { code, reason } => JobOutcome::Rejected { code, reason: reason.clone() },
            },
            enqueued_at_us: Some(*enqueued_at_us),
        })
        .collect()
}
