//! Many jobs in one transaction: lock them and their accounts (ascending ids), decide
//! each ([`decide`]), and carry the decisions out in one set-based statement
//! (`write_plan.sql`); after an unexpected error, one savepoint per job.

use std::collections::HashMap;

use super::*;
use crate::prepared::StaticSql;

mod write;

use write::write_plan;

/// One batch's decisions carried out in one statement (`write_plan.sql`), kept
/// prepared on each connection.
pub(crate) enum WritePlan {}

impl StaticSql for WritePlan {
    const SQL: &'static str = include_str!("write_plan.sql");
}

/// What happened to one job: the one outcome type of every path (the batch, the careful
/// per-job path and the single `process_tx`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Debited; entry and payout written; the withdrawal is paying out.
    Debited {
        /// The debit's journal entry.
        entry: EntryId,
        /// The payout queued for it.
        payout: PayoutId,
    },
    /// A business refusal, recorded on the job.
    Rejected {
        /// The refusal's stable code (as [`LedgerError::code`](crate::LedgerError::code)).
        code: &'static str,
        /// The refusal, for a person to read.
        reason: String,
    },
    /// Not processed here: another worker holds it, or it is no longer pending.
    Skipped,
    /// Already final when the single path looked ([`super::process_tx`]): another
    /// worker, or an earlier run, finished it.
    AlreadyFinal(WithdrawalStatus),
    /// An infrastructure error rolled this job back (its savepoint) and left it pending;
    /// the caller records the attempt.
    Errored {
        /// The error, truncated as stored on the job.
        error: String,
        /// Whether a later attempt may succeed (connection lost, serialization...).
        transient: bool,
    },
}

/// One job's result, with when it was enqueued (µs since the Unix epoch, database clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchItem {
    /// The job.
    pub id: WithdrawalId,
    /// What happened to it.
    pub outcome: JobOutcome,
    /// When it was requested, for latency from enqueue (µs since the Unix epoch).
    pub enqueued_at_us: Option<i64>,
}

/// Processes several jobs in the caller's transaction, one commit for all of them.
///
/// 1. The pending jobs among `ids` are locked with `FOR UPDATE SKIP LOCKED`: a job
///    another worker (or daemon) is processing is skipped, not waited for.
/// 2. All their accounts are locked at once, in ascending id order, so two batches can
///    never deadlock however their jobs interleave.
/// 3. Each job runs in its own savepoint: a refusal or error undoes that job only.
///
/// Returns `Err` only when the whole transaction is unusable (then nothing commits).
pub fn process_batch_tx(tx: &mut Tx<'_>, ids: &[WithdrawalId]) -> Result<Vec<BatchItem>, LedgerError> {
    Ok(process_batch(tx, ids, true, None)?.0)
}

/// Like [`process_batch_tx`] but without the savepoint around the set-based write: two
/// round trips fewer per batch. If it returns a non-transient `Err`, the transaction is
/// aborted: roll it back and run the same ids through [`process_batch_tx`] in a new one
/// (which then isolates the failing job). The worker daemon does exactly that.
pub fn process_batch_fast_tx(tx: &mut Tx<'_>, ids: &[WithdrawalId]) -> Result<Vec<BatchItem>, LedgerError> {
    Ok(process_batch(tx, ids, false, None)?.0)
}

/// Like [`process_batch_fast_tx`], and every payout it queues is also claimed for the
/// caller's dispatcher at once: written with a fresh fencing token, marked possibly
/// sent, and leased for `lease_ms` from this transaction's start (`now()`).
///
/// The returned [`outbox::Claim`]'s `lease_until` is this process's view of that lease:
/// the moment the statement was sent plus the lease the server still had left while it
/// ran, so it ends no later than the database's however long the transaction has been
/// open. After commit, hand the claim to a dispatcher ([`crate::dispatcher::run_claimed`]);
/// if the transaction rolls back, drop it. A claim that is never used simply runs out:
/// the payout is claimed again after `lease_ms` and looked up first. This saves each
/// payout a separate claim transaction and row update.
pub fn process_batch_fast_claiming_tx(
    tx: &mut Tx<'_>,
    ids: &[WithdrawalId],
    lease_ms: u64,
) -> Result<(Vec<BatchItem>, outbox::Claim), LedgerError> {
    let (items, claim) = process_batch(tx, ids, false, Some(lease_ms))?;
    Ok((items, claim.unwrap_or_else(|| outbox::Claim { requests: vec![], lease_until: std::time::Instant::now() })))
}

fn process_batch(
    tx: &mut Tx<'_>,
    ids: &[WithdrawalId],
    guarded: bool,
    claim_lease_ms: Option<u64>,
) -> Result<(Vec<BatchItem>, Option<outbox::Claim>), LedgerError> {
    tx::with_batch_plans(tx, |tx| process_batch_planned(tx, ids, guarded, claim_lease_ms))
}

fn process_batch_planned(
    tx: &mut Tx<'_>,
    ids: &[WithdrawalId],
    guarded: bool,
    claim_lease_ms: Option<u64>,
) -> Result<(Vec<BatchItem>, Option<outbox::Claim>), LedgerError> {
    use std::collections::HashSet;
    if ids.is_empty() {
        return Ok((vec![], None));
    }
    let raw: Vec<i64> = ids.iter().map(|i| i.get()).collect();
    // Only pending rows are locked (a finished one may be waited for by its payout's
    // settlement or return). IS NOT DISTINCT FROM rather than `=`: an equality on status
    // would offer the planner the pending partial index as a path, read whole (see
    // tx::with_batch_plans); this way each row is reached by id.
    let jobs: Vec<LockedJob> = withdrawals::table
        .filter(withdrawals::id.eq_any(&raw))
        .filter(withdrawals::status.is_not_distinct_from(WithdrawalStatus::Pending.as_str()))
        .order(withdrawals::id.asc())
        .select((
            Withdrawal::as_select(),
            diesel::dsl::sql::<diesel::sql_types::BigInt>(
                "(EXTRACT(EPOCH FROM withdrawals.created_at) * 1000000)::bigint",
            ),
            // The in-transit account of the job's currency, fetched with the job.
            diesel::dsl::sql::<diesel::sql_types::Nullable<diesel::sql_types::BigInt>>(
                "(SELECT a.id FROM accounts a WHERE a.system_role = 'payouts_in_transit' \
                 AND a.currency = withdrawals.currency)",
            ),
        ))
        .for_update()
        .skip_locked()
        .load(tx.conn())?;
    assert!(jobs.iter().all(|(job, _, _)| job.status == WithdrawalStatus::Pending), "only pending jobs are locked");
    let lock_set: tx::LockSet = jobs.iter().map(|(j, _, _)| j.account_id).collect();
    let locked: HashMap<AccountId, Result<accounts::LockedAccount, LedgerError>> =
        lock_set.ids().zip(accounts::lock_all(tx, &lock_set)?).collect();
    let plan = plan_batch(&jobs, &locked);
    // Fast path: the whole batch in a handful of set-based statements (round trips per
    // batch, not per job). Anything unexpected rolls that savepoint back and the batch
    // is redone one savepoint per job, so a bad job still fails alone.
    let (mut items, claimed) = if guarded {
        match tx.savepoint(|tx| write_plan(tx, &jobs, &plan, claim_lease_ms)) {
            Ok(written) => written,
            Err(e) if e.is_transient() => return Err(e),
            Err(_) => (process_one_by_one(tx, &jobs, locked)?, None),
        }
    } else {
        write_plan(tx, &jobs, &plan, claim_lease_ms)?
    };
    let seen: HashSet<WithdrawalId> = items.iter().map(|i| i.id).collect();
    for id in ids {
        if !seen.contains(id) {
            items.push(BatchItem { id: *id, outcome: JobOutcome::Skipped, enqueued_at_us: None });
        }
    }
    Ok((items, claimed))
}

/// A job row locked for processing, when it was enqueued (µs), and its in-transit account.
type LockedJob = (Withdrawal, i64, Option<i64>);

/// A job's decision, with what the batch statement needs to carry it out.
enum Planned {
    Debit { after_minor: i64, in_transit: i64 },
    Reject { code: &'static str, reason: String },
}

/// Decides every job of a batch in memory ([`decide`]), in id order, tracking each
/// account's balance as earlier jobs of the batch debit it.
fn plan_batch(
    jobs: &[LockedJob],
    locked: &HashMap<AccountId, Result<accounts::LockedAccount, LedgerError>>,
) -> Vec<Planned> {
    let mut balances: HashMap<AccountId, accounts::LockedAccount> =
        locked.iter().filter_map(|(id, a)| a.as_ref().ok().map(|a| (*id, a.clone()))).collect();
    jobs.iter()
        .map(|(job, _, in_transit)| {
            let account = match locked.get(&job.account_id).expect("every job's account was looked up") {
                Err(e) => Err(rebuild_refusal(e)),
                Ok(_) => Ok(balances.get(&job.account_id).expect("locked accounts are tracked").account()),
            };
            match decide(job.currency, job.amount_minor, account) {
                Decision::Debit { after_minor, .. } => {
                    balances.get_mut(&job.account_id).expect("a debited account is locked").note_balance(after_minor);
                    let in_transit = in_transit.expect("every supported currency has an in-transit account");
                    Planned::Debit { after_minor, in_transit }
                }
                Decision::Reject(e) => Planned::Reject { code: e.code(), reason: e.to_string() },
            }
        })
        .collect()
}

/// The careful path: one savepoint per job, so a job that fails for an unexpected reason
/// is rolled back alone and reported, and the others still commit.
fn process_one_by_one(
    tx: &mut Tx<'_>,
    jobs: &[LockedJob],
    mut locked: HashMap<AccountId, Result<accounts::LockedAccount, LedgerError>>,
) -> Result<Vec<BatchItem>, LedgerError> {
    let mut items: Vec<BatchItem> = Vec::with_capacity(jobs.len());
    for (job, enqueued_at_us, in_transit) in jobs {
        let outcome = match locked.get_mut(&job.account_id).expect("every job's account was looked up") {
            Err(e) => {
                let reason = e.to_string();
                mark_rejected(tx, job.id, &reason)?;
                JobOutcome::Rejected { code: e.code(), reason }
            }
            Ok(account) => {
                let transit = AccountId::from_db(in_transit.expect("every currency has an in-transit account"));
                let result = tx.savepoint(|tx| {
                    let (entry, payout, after) = debit_locked(tx, job, account, transit)?;
                    mark_debited(tx, job.id, entry)?;
                    Ok::<_, LedgerError>((entry, payout, after))
                });
                match result {
                    Ok((entry, payout, after)) => {
                        account.note_balance(after);
                        JobOutcome::Debited { entry, payout }
                    }
                    Err(e) if e.is_business_rejection() => {
                        let reason = e.to_string();
                        mark_rejected(tx, job.id, &reason)?;
                        JobOutcome::Rejected { code: e.code(), reason }
                    }
                    Err(e) if e.transient() == Some(crate::error::Transient::ConnectionLost) => return Err(e),
                    Err(e) => JobOutcome::Errored { error: e.to_string(), transient: e.is_transient() },
                }
            }
        };
        items.push(BatchItem { id: job.id, outcome, enqueued_at_us: Some(*enqueued_at_us) });
    }
    Ok(items)
}
