//! Withdrawals: a request row (the worker's job), then processing under row locks.
//!
//! Processing re-reads the job `FOR UPDATE` (so two workers cannot both process it),
//! locks the account `FOR UPDATE` (so two withdrawals cannot both pass the balance
//! check), checks the floor, and in one transaction writes the journal entry, the new
//! balance, the payout outbox row and the job's final status. Funds move to the
//! payouts-in-transit system account: held, not gone, until the payout settles.

use diesel::pg::PgConnection;
use diesel::prelude::*;

use crate::accounts::{self, AccountStatus, SystemRole};
use crate::error::{InvalidInput, LedgerError, RetryClass};
use crate::idempotency::{self, Begun};
use crate::ids::{AccountId, EntryId, IdempotencyKey, PayoutId, WithdrawalId};
use crate::journal::{self, EntryKind, Leg};
use crate::money::{Amount, Currency};
use crate::outbox;
use crate::schema::withdrawals;
use crate::tx::{self, Tx, TxOptions};

/// The transaction's timestamp, as a nullable timestamptz (Diesel's `now` is a plain timestamp).
pub(crate) fn now_tz() -> diesel::expression::SqlLiteral<diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>> {
    diesel::dsl::sql("clock_timestamp()")
}

/// An IBAN, checked for shape and its ISO 7064 mod-97 check digits. Spaces are removed
/// and letters upper-cased, so "de89 3704 ..." and "DE893704..." are the same account.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Iban(String);

impl Iban {
    pub fn parse(text: &str) -> Result<Iban, InvalidInput> {
        let bad = |reason: &str| InvalidInput::BadField { field: "IBAN", reason: reason.to_string() };
        let compact: String = text.chars().filter(|c| *c != ' ').collect::<String>().to_ascii_uppercase();
        if !(15..=34).contains(&compact.len()) {
            return Err(bad("expected 15 to 34 letters and digits"));
        }
        let b = compact.as_bytes();
        if !b[..2].iter().all(u8::is_ascii_uppercase) || !b[2..4].iter().all(u8::is_ascii_digit) {
            return Err(bad("expected a country code and two check digits, like DE89..."));
        }
        if !b.iter().all(u8::is_ascii_alphanumeric) {
            return Err(bad("only letters and digits are allowed"));
        }
        // Move the first four characters to the end, letters become 10..35, mod 97 == 1.
        let remainder = b[4..].iter().chain(&b[..4]).fold(0_u32, |acc, &c| {
            if c.is_ascii_digit() {
                (acc * 10 + u32::from(c - b'0')) % 97
            } else {
                (acc * 100 + u32::from(c - b'A' + 10)) % 97
            }
        });
        if remainder != 1 {
            return Err(bad("check digits do not match"));
        }
        Ok(Iban(compact))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Debug)]
pub struct WithdrawalRequest {
    pub account: AccountId,
    pub amount: Amount,
    pub currency: Currency,
    pub destination: Iban,
    pub key: IdempotencyKey,
}

impl WithdrawalRequest {
    fn fingerprint(&self) -> String {
        format!(
            "account={}|amount={}|currency={}|to={}",
            self.account,
            self.amount.minor(),
            self.currency,
            self.destination.as_str()
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WithdrawalStatus {
    /// Requested; the worker has not processed it yet.
    Pending,
    /// Debited: funds held in payouts-in-transit, payout queued.
    PayingOut,
    /// The payout settled: the money has left.
    Completed,
    Rejected,
    Failed,
    Returned,
}

impl WithdrawalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WithdrawalStatus::Pending => "pending",
            WithdrawalStatus::PayingOut => "paying_out",
            WithdrawalStatus::Completed => "completed",
            WithdrawalStatus::Rejected => "rejected",
            WithdrawalStatus::Failed => "failed",
            WithdrawalStatus::Returned => "returned",
        }
    }

    pub fn parse(s: &str) -> Option<WithdrawalStatus> {
        [
            WithdrawalStatus::Pending,
            WithdrawalStatus::PayingOut,
            WithdrawalStatus::Completed,
            WithdrawalStatus::Rejected,
            WithdrawalStatus::Failed,
            WithdrawalStatus::Returned,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = withdrawals, check_for_backend(diesel::pg::Pg))]
pub struct Withdrawal {
    pub id: i64,
    pub account_id: i64,
    pub currency: String,
    pub amount_minor: i64,
    pub destination: String,
    pub idempotency_key: String,
    pub status: String,
    pub reason: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub entry_id: Option<i64>,
}

impl Withdrawal {
    pub fn status(&self) -> WithdrawalStatus {
        WithdrawalStatus::parse(&self.status).expect("the status CHECK constraint limits the values")
    }
}

/// What processing a job did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Processed {
    /// Funds debited into payouts-in-transit, journal entry and payout written.
    Debited { entry: EntryId, payout: PayoutId },
    /// A business refusal (e.g. insufficient funds), recorded on the job with its reason.
    Rejected { code: &'static str, reason: String },
    /// The job was already final (another worker, or an earlier run, finished it).
    AlreadyFinal(WithdrawalStatus),
}

/// Records a pending withdrawal (the job). Idempotent under the request's key. Checks
/// the account exists, is open and holds the currency, so a bad request is refused now
/// rather than rejected later; the balance is checked when the job runs.
pub fn request(conn: &mut PgConnection, req: &WithdrawalRequest) -> Result<(WithdrawalId, bool), LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| request_tx(tx, req))
}

/// Returns the withdrawal's id and whether this call replayed an earlier request.
pub fn request_tx(tx: &mut Tx<'_>, req: &WithdrawalRequest) -> Result<(WithdrawalId, bool), LedgerError> {
    if let Begun::Replay(id) = idempotency::begin(tx, &req.key, "withdrawal", &req.fingerprint())? {
        return Ok((WithdrawalId::from_db(id), true));
    }
    let account = accounts::get(tx.conn(), req.account)?;
    if account.kind != accounts::AccountKind::Customer {
        return Err(LedgerError::SystemAccount(account.id));
    }
    if account.status == AccountStatus::Closed {
        return Err(LedgerError::AccountClosed(account.id));
    }
    if account.currency != req.currency {
        return Err(LedgerError::CurrencyMismatch {
            account: account.id,
            account_currency: account.currency.code().to_string(),
            request_currency: req.currency.code().to_string(),
        });
    }
    let id: i64 = diesel::insert_into(withdrawals::table)
        .values((
            withdrawals::account_id.eq(req.account.get()),
            withdrawals::currency.eq(req.currency.code()),
            withdrawals::amount_minor.eq(req.amount.minor()),
            withdrawals::destination.eq(req.destination.as_str()),
            withdrawals::idempotency_key.eq(req.key.as_str()),
        ))
        .returning(withdrawals::id)
        .get_result(tx.conn())?;
    idempotency::finish(tx, &req.key, id)?;
    Ok((WithdrawalId::from_db(id), false))
}

pub fn get(conn: &mut PgConnection, id: WithdrawalId) -> Result<Withdrawal, LedgerError> {
    withdrawals::table
        .find(id.get())
        .select(Withdrawal::as_select())
        .first(conn)
        .optional()?
        .ok_or(LedgerError::UnknownWithdrawal(id))
}

/// Processes one pending job in the caller's transaction. Business refusals are
/// recorded on the job (and returned as `Rejected`); infrastructure errors are returned
/// as `Err` and leave the job pending for a retry.
pub fn process_tx(tx: &mut Tx<'_>, id: WithdrawalId) -> Result<Processed, LedgerError> {
    let job: Withdrawal = withdrawals::table
        .find(id.get())
        .select(Withdrawal::as_select())
        .for_update()
        .first(tx.conn())
        .optional()?
        .ok_or(LedgerError::UnknownWithdrawal(id))?;
    if job.status() != WithdrawalStatus::Pending {
        return Ok(Processed::AlreadyFinal(job.status()));
    }
    match debit_tx(tx, &job) {
        Ok((entry, payout)) => {
            mark_debited(tx, job.id, entry)?;
            Ok(Processed::Debited { entry, payout })
        }
        Err(e) if e.is_business_rejection() => {
            let reason = e.to_string();
            mark_rejected(tx, job.id, &reason)?;
            Ok(Processed::Rejected { code: e.code(), reason })
        }
        Err(e) => Err(e),
    }
}

/// The money movement of a withdrawal, run in a savepoint so a refusal undoes only it.
fn debit_tx(tx: &mut Tx<'_>, job: &Withdrawal) -> Result<(EntryId, PayoutId), LedgerError> {
    tx.savepoint(|tx| {
        let account = accounts::lock(tx, AccountId::from_db(job.account_id))?;
        let currency = Currency::from_code(&job.currency)?;
        let in_transit = accounts::system_account(tx.conn(), SystemRole::PayoutsInTransit, currency)?;
        let (entry, payout, _after) = debit_locked(tx, job, &account, in_transit)?;
        Ok((entry, payout))
    })
}

/// Debits a job's amount from its account, which this transaction has locked: checks
/// currency and floor, writes the entry (customer -> payouts in transit), the new
/// balance and the payout outbox row. Returns the entry, the payout and the balance after.
fn debit_locked(
    tx: &mut Tx<'_>,
    job: &Withdrawal,
    account: &accounts::LockedAccount,
    in_transit: AccountId,
) -> Result<(EntryId, PayoutId, i64), LedgerError> {
    assert_eq!(account.id().get(), job.account_id, "debit_locked needs the job's own account");
    let withdrawal = WithdrawalId::from_db(job.id);
    let currency = Currency::from_code(&job.currency)?;
    let amount = Amount::from_minor(job.amount_minor)?;
    account.expect_currency(currency)?;
    let after = account.balance_after_debit(amount)?;
    let reference = format!("withdrawal:{}", job.id);
    let entry = journal::post(
        tx,
        EntryKind::Withdrawal,
        Some(&reference),
        currency,
        &[
            Leg { account: account.id(), amount_minor: -amount.minor(), balance_after_minor: Some(after) },
            Leg { account: in_transit, amount_minor: amount.minor(), balance_after_minor: None },
        ],
    )?;
    accounts::set_balance(tx, account, after)?;
    let payout = outbox::enqueue(tx, withdrawal, account.id(), amount, currency, &job.destination)?;
    Ok((entry, payout, after))
}

fn mark_debited(tx: &mut Tx<'_>, id: i64, entry: EntryId) -> Result<(), LedgerError> {
    let updated = diesel::update(withdrawals::table.find(id))
        .set((
            withdrawals::status.eq(WithdrawalStatus::PayingOut.as_str()),
            withdrawals::entry_id.eq(Some(entry.get())),
            withdrawals::attempts.eq(withdrawals::attempts + 1),
            withdrawals::finished_at.eq(now_tz()),
        ))
        .execute(tx.conn())?;
    assert_eq!(updated, 1);
    Ok(())
}

fn mark_rejected(tx: &mut Tx<'_>, id: i64, reason: &str) -> Result<(), LedgerError> {
    let updated = diesel::update(withdrawals::table.find(id))
        .set((
            withdrawals::status.eq(WithdrawalStatus::Rejected.as_str()),
            withdrawals::reason.eq(Some(reason)),
            withdrawals::attempts.eq(withdrawals::attempts + 1),
            withdrawals::finished_at.eq(now_tz()),
        ))
        .execute(tx.conn())?;
    assert_eq!(updated, 1);
    Ok(())
}

/// What happened to one job of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Debited; entry and payout written; the withdrawal is paying out.
    Debited { entry: EntryId, payout: PayoutId },
    /// A business refusal, recorded on the job.
    Rejected { code: &'static str, reason: String },
    /// Not processed here: another worker holds it, or it is no longer pending.
    Skipped,
    /// An infrastructure error rolled this job back (its savepoint) and left it pending;
    /// the caller records the attempt.
    Errored { error: String, transient: bool },
}

/// One job's result, with when it was enqueued (µs since the Unix epoch, database clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchItem {
    pub id: WithdrawalId,
    pub outcome: JobOutcome,
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
    use std::collections::{HashMap, HashSet};
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
    assert!(jobs.iter().all(|(job, _, _)| job.status() == WithdrawalStatus::Pending), "only pending jobs are locked");
    let lock_set: tx::LockSet = jobs.iter().map(|(j, _, _)| AccountId::from_db(j.account_id)).collect();
    let locked: HashMap<i64, Result<accounts::LockedAccount, LedgerError>> =
        lock_set.ids().map(AccountId::get).zip(accounts::lock_all(tx, &lock_set)?).collect();
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

enum Decision {
    Debit { after_minor: i64, in_transit: i64 },
    Reject { code: &'static str, reason: String },
}

/// Decides every job of a batch in memory, in id order, tracking each account's
/// balance as earlier jobs of the batch debit it.
fn plan_batch(
    jobs: &[LockedJob],
    locked: &std::collections::HashMap<i64, Result<accounts::LockedAccount, LedgerError>>,
) -> Vec<Decision> {
    let mut balances: std::collections::HashMap<i64, accounts::LockedAccount> =
        locked.iter().filter_map(|(id, a)| a.as_ref().ok().map(|a| (*id, a.clone()))).collect();
    jobs.iter()
        .map(|(job, _, in_transit)| {
            let mut decide = || -> Result<Decision, LedgerError> {
                let account = match locked.get(&job.account_id).expect("every job's account was looked up") {
                    Err(e) => return Err(rebuild_refusal(e)),
                    Ok(_) => balances.get_mut(&job.account_id).expect("locked accounts are tracked"),
                };
                let currency = Currency::from_code(&job.currency)?;
                let amount = Amount::from_minor(job.amount_minor)?;
                account.expect_currency(currency)?;
                let after_minor = account.balance_after_debit(amount)?;
                let in_transit = in_transit.expect("every supported currency has an in-transit account");
                account.note_balance(after_minor);
                Ok(Decision::Debit { after_minor, in_transit })
            };
            match decide() {
                Ok(d) => d,
                Err(e) => Decision::Reject { code: e.code(), reason: e.to_string() },
            }
        })
        .collect()
}

/// Account-level refusals are shared by every job on the account; errors are not Clone.
fn rebuild_refusal(e: &LedgerError) -> LedgerError {
    match e {
        LedgerError::UnknownAccount(id) => LedgerError::UnknownAccount(*id),
        LedgerError::AccountClosed(id) => LedgerError::AccountClosed(*id),
        LedgerError::SystemAccount(id) => LedgerError::SystemAccount(*id),
        other => LedgerError::Invalid(InvalidInput::BadField { field: "account", reason: other.to_string() }),
    }
}

/// Writes a planned batch in one statement: data-modifying CTEs insert the entries,
/// their postings, the payouts, and update the balances and job statuses. One round
/// trip per batch instead of several per job; the postings trigger checks every entry
/// is balanced and the foreign keys are checked as usual at the end of the statement.
fn write_plan(
    tx: &mut Tx<'_>,
    jobs: &[LockedJob],
    plan: &[Decision],
    claim_lease_ms: Option<u64>,
) -> Result<(Vec<BatchItem>, Option<outbox::Claim>), LedgerError> {
    use diesel::sql_types::{Array, BigInt, Nullable, Text};
    use std::collections::HashMap;

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

    let mut d_wid = vec![];
    let mut d_account = vec![];
    let mut d_currency = vec![];
    let mut d_amount = vec![];
    let mut d_after = vec![];
    let mut d_transit = vec![];
    let mut d_destination = vec![];
    let mut last_balance: HashMap<i64, i64> = HashMap::new();
    let mut rejected_ids = Vec::new();
    let mut rejected_reasons = Vec::new();
    for ((job, _, _), decision) in jobs.iter().zip(plan) {
        match decision {
            Decision::Debit { after_minor, in_transit } => {
                d_wid.push(job.id);
                d_account.push(job.account_id);
                d_currency.push(job.currency.clone());
                d_amount.push(job.amount_minor);
                d_after.push(*after_minor);
                d_transit.push(*in_transit);
                d_destination.push(job.destination.clone());
                last_balance.insert(job.account_id, *after_minor); // jobs are in id order
            }
            Decision::Reject { reason, .. } => {
                rejected_ids.push(job.id);
                rejected_reasons.push(reason.clone());
            }
        }
    }
    let (balance_ids, balances): (Vec<i64>, Vec<i64>) = last_balance.into_iter().unzip();
    // Before the statement is sent: the server's clock_timestamp() is later still.
    let sent_at = std::time::Instant::now();
    let written: Written = diesel::sql_query(
        "WITH de AS MATERIALIZED (
             -- Each debit's entry id is drawn here, in job order, so nothing joins back.
             SELECT d.*, nextval('journal_entries_id_seq') AS entry_id
             FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[],
                         $6::bigint[], $7::text[])
                 WITH ORDINALITY AS d(wid, account_id, currency, amount, after, transit, destination, n)
             ORDER BY n
         ), d AS (
             SELECT * FROM de
         ), e AS (
             INSERT INTO journal_entries (id, kind, reference)
             SELECT entry_id, 'withdrawal', 'withdrawal:' || wid FROM de ORDER BY entry_id
             RETURNING id
         ), p AS (
             INSERT INTO postings (entry_id, account_id, currency, amount_minor, balance_after_minor)
             SELECT entry_id, account, currency, amount, after FROM (
                 SELECT wid, 0 AS leg, entry_id, account_id AS account, currency, -amount AS amount, after FROM de
                 UNION ALL
                 SELECT wid, 1, entry_id, transit, currency, amount, NULL FROM de
             ) legs
             -- Posting ids follow job order, so each account's running balance reads in order.
             ORDER BY wid, leg
             RETURNING 1
         ), b AS (
             UPDATE accounts a SET balance_minor = v.balance
             FROM unnest($8::bigint[], $9::bigint[]) AS v(id, balance) WHERE a.id = v.id
             RETURNING 1
         ), po AS (
             -- With a lease ($12), each payout is claimed as it is queued (see
             -- process_batch_fast_claiming_tx): the same fields claim_due would set.
             INSERT INTO payouts (withdrawal_id, account_id, currency, amount_minor, destination, idempotency_key,
                                  claim_token, possibly_sent, attempts, next_attempt_at)
             SELECT wid, account_id, currency, amount, destination, ledger_payout_key(wid),
                    CASE WHEN $12::bigint IS NULL THEN NULL ELSE nextval('payout_claim_tokens') END,
                    $12::bigint IS NOT NULL,
                    CASE WHEN $12::bigint IS NULL THEN 0 ELSE 1 END,
                    now() + make_interval(secs => COALESCE($12::bigint, 0)::float8 / 1000)
             FROM d ORDER BY wid
             RETURNING id, withdrawal_id, claim_token, idempotency_key
         ), wd AS (
             -- Debited jobs, then refused ones: each row reached by id. (IS NOT DISTINCT
             -- FROM rather than =: an equality on status would offer the planner the
             -- pending partial index as a path, see tx::with_batch_plans.)
             UPDATE withdrawals x
             SET status = 'paying_out', entry_id = de.entry_id, reason = NULL,
                 attempts = x.attempts + 1, finished_at = clock_timestamp()
             FROM de
             WHERE x.id = de.wid AND x.status IS NOT DISTINCT FROM 'pending'
             RETURNING 1
         ), w AS (
             UPDATE withdrawals x
             SET status = 'rejected', reason = v.reason,
                 attempts = x.attempts + 1, finished_at = clock_timestamp()
             FROM unnest($10::bigint[], $11::text[]) AS v(id, reason)
             WHERE x.id = v.id AND x.status IS NOT DISTINCT FROM 'pending'
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM p) AS postings,
                (SELECT count(*) FROM b) AS balances,
                (SELECT count(*) FROM wd) + (SELECT count(*) FROM w) AS jobs,
                COALESCE((SELECT array_agg(de.wid ORDER BY de.wid) FROM de), '{}') AS debited,
                COALESCE((SELECT array_agg(de.entry_id ORDER BY de.wid) FROM de), '{}') AS entries,
                COALESCE((SELECT array_agg(po.id ORDER BY po.withdrawal_id) FROM po), '{}') AS payouts,
                COALESCE((SELECT array_agg(po.claim_token ORDER BY po.withdrawal_id) FROM po), '{}') AS tokens,
                COALESCE((SELECT array_agg(po.idempotency_key ORDER BY po.withdrawal_id) FROM po), '{}') AS keys,
                (EXTRACT(EPOCH FROM now() + make_interval(secs => COALESCE($12::bigint, 0)::float8 / 1000)
                                    - clock_timestamp()) * 1000)::float8 AS lease_left_ms",
    )
    .bind::<Array<BigInt>, _>(&d_wid)
    .bind::<Array<BigInt>, _>(&d_account)
    .bind::<Array<Text>, _>(&d_currency)
    .bind::<Array<BigInt>, _>(&d_amount)
    .bind::<Array<BigInt>, _>(&d_after)
    .bind::<Array<BigInt>, _>(&d_transit)
    .bind::<Array<Text>, _>(&d_destination)
    .bind::<Array<BigInt>, _>(&balance_ids)
    .bind::<Array<BigInt>, _>(&balances)
    .bind::<Array<BigInt>, _>(&rejected_ids)
    .bind::<Array<Text>, _>(&rejected_reasons)
    .bind::<Nullable<BigInt>, _>(claim_lease_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX)))
    .get_result(tx.conn())?;
    // Pair the statement's counts with what was planned (assertions, not hopes).
    assert_eq!(written.postings as usize, d_wid.len() * 2, "two postings per debit");
    assert_eq!(written.balances as usize, balance_ids.len(), "one balance per debited account");
    assert_eq!(written.jobs as usize, jobs.len(), "the batch holds every job's row lock");
    assert_eq!(
        written.debited,
        d_wid.iter().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>()
    );
    assert_eq!((written.entries.len(), written.payouts.len()), (d_wid.len(), d_wid.len()));
    assert_eq!((written.tokens.len(), written.keys.len()), (d_wid.len(), d_wid.len()));
    assert!(
        written.tokens.iter().all(|t| t.is_some() == claim_lease_ms.is_some()),
        "every payout is claimed exactly when a lease was asked for"
    );
    let entry_of: HashMap<i64, i64> = written.debited.iter().copied().zip(written.entries.iter().copied()).collect();
    let payout_of: HashMap<i64, i64> = written.debited.iter().copied().zip(written.payouts.iter().copied()).collect();
    let mut claimed = None;
    if claim_lease_ms.is_some() {
        let left = std::time::Duration::from_millis(written.lease_left_ms.max(0.0).floor() as u64);
        let claim = claimed.insert(outbox::Claim { requests: vec![], lease_until: sent_at + left });
        let job_of: HashMap<i64, &Withdrawal> = jobs.iter().map(|(j, _, _)| (j.id, j)).collect();
        for ((wid, payout), (token, key)) in
            written.debited.iter().zip(&written.payouts).zip(written.tokens.iter().zip(written.keys))
        {
            let job = job_of[wid];
            let currency = Currency::from_code(&job.currency)?;
            claim.requests.push(outbox::PayoutRequest {
                payout: PayoutId::from_db(*payout),
                withdrawal: WithdrawalId::from_db(*wid),
                amount_minor: job.amount_minor,
                amount: currency.format_minor(job.amount_minor),
                currency: job.currency.clone(),
                destination: job.destination.clone(),
                idempotency_key: key,
                attempt: 1,
                token: token.expect("claimed above"),
                possibly_sent: false,
            });
        }
    }

    let items = jobs
        .iter()
        .zip(plan)
        .map(|((job, enqueued_at_us, _), d)| BatchItem {
            id: WithdrawalId::from_db(job.id),
            outcome: match d {
                Decision::Debit { .. } => JobOutcome::Debited {
                    entry: EntryId::from_db(entry_of[&job.id]),
                    payout: PayoutId::from_db(payout_of[&job.id]),
                },
                Decision::Reject { code, reason } => JobOutcome::Rejected { code, reason: reason.clone() },
            },
            enqueued_at_us: Some(*enqueued_at_us),
        })
        .collect();
    Ok((items, claimed))
}

/// The careful path: one savepoint per job, so a job that fails for an unexpected reason
/// is rolled back alone and reported, and the others still commit.
fn process_one_by_one(
    tx: &mut Tx<'_>,
    jobs: &[LockedJob],
    mut locked: std::collections::HashMap<i64, Result<accounts::LockedAccount, LedgerError>>,
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
        items.push(BatchItem { id: WithdrawalId::from_db(job.id), outcome, enqueued_at_us: Some(*enqueued_at_us) });
    }
    Ok(items)
}

/// Records a failed attempt on a pending job: it waits (exponential backoff with jitter,
/// capped at `max_backoff_ms`) before it is claimed again, and after `max_attempts`
/// attempts it ends as `failed` with its last error. Returns the job's status after.
pub fn record_failed_attempt(
    conn: &mut PgConnection,
    id: WithdrawalId,
    error: &str,
    max_attempts: u32,
    max_backoff_ms: u64,
) -> Result<Option<WithdrawalStatus>, LedgerError> {
    #[derive(QueryableByName)]
    struct Status {
        #[diesel(sql_type = diesel::sql_types::Text)]
        status: String,
    }
    let error: String = error.chars().take(500).collect();
    let row: Option<Status> = diesel::sql_query(
        "UPDATE withdrawals SET
             attempts = attempts + 1,
             last_error = $2,
             next_attempt_at = now() + make_interval(secs =>
                 least($4::float8 / 1000, 0.05 * power(2, attempts)) * (0.5 + random() / 2)),
             status = CASE WHEN attempts + 1 >= $3 THEN 'failed' ELSE status END,
             reason = CASE WHEN attempts + 1 >= $3 THEN 'gave up after ' || (attempts + 1) || ' attempts: ' || $2
                           ELSE reason END,
             finished_at = CASE WHEN attempts + 1 >= $3 THEN now() ELSE finished_at END
         WHERE id = $1 AND status = 'pending'
         RETURNING status",
    )
    .bind::<diesel::sql_types::BigInt, _>(id.get())
    .bind::<diesel::sql_types::Text, _>(&error)
    .bind::<diesel::sql_types::Integer, _>(i32::try_from(max_attempts).unwrap_or(i32::MAX))
    .bind::<diesel::sql_types::BigInt, _>(i64::try_from(max_backoff_ms).unwrap_or(i64::MAX))
    .get_result(conn)
    .optional()?;
    Ok(row.and_then(|r| WithdrawalStatus::parse(&r.status)))
}

/// Ends a pending job as `failed` at once (a panic while processing it: retrying a
/// programmer error will not help, and an operator must look).
pub fn fail_now(conn: &mut PgConnection, id: WithdrawalId, reason: &str) -> Result<bool, LedgerError> {
    let reason: String = reason.chars().take(500).collect();
    let updated = diesel::update(
        withdrawals::table.find(id.get()).filter(withdrawals::status.eq(WithdrawalStatus::Pending.as_str())),
    )
    .set((
        withdrawals::status.eq(WithdrawalStatus::Failed.as_str()),
        withdrawals::reason.eq(Some(&reason)),
        withdrawals::last_error.eq(Some(&reason)),
        withdrawals::attempts.eq(withdrawals::attempts + 1),
        withdrawals::finished_at.eq(now_tz()),
    ))
    .execute(conn)?;
    Ok(updated == 1)
}

/// Due jobs for a claimer: pending, past their `next_attempt_at`, not locked by a worker
/// right now (`SKIP LOCKED`), not in `exclude` (already queued here). Oldest first.
pub fn claim_due(
    conn: &mut PgConnection,
    limit: i64,
    exclude: &[i64],
) -> Result<Vec<(WithdrawalId, AccountId)>, LedgerError> {
    assert!(limit > 0, "claim at least one job");
    let ids: Vec<(i64, i64)> = tx::transaction(conn, &TxOptions::default(), |tx| {
        tx::with_batch_plans(tx, |tx| {
            withdrawals::table
                .filter(withdrawals::status.eq(WithdrawalStatus::Pending.as_str()))
                .filter(withdrawals::next_attempt_at.le(diesel::dsl::now))
                .filter(withdrawals::id.ne_all(exclude))
                .order((withdrawals::next_attempt_at.asc(), withdrawals::id.asc()))
                .limit(limit)
                .select((withdrawals::id, withdrawals::account_id))
                .for_update()
                .skip_locked()
                .load(tx.conn())
                .map_err(LedgerError::from)
        })
    })?;
    Ok(ids.into_iter().map(|(w, a)| (WithdrawalId::from_db(w), AccountId::from_db(a))).collect())
}

/// Due jobs with an id above `after`, in id order: the claimer's fast path while it
/// works through a backlog (it keeps the highest id it queued as the cursor). Jobs it
/// passes over (a retry whose time has come, a job committed late with a lower id) are
/// picked up by [`claim_due`] once the claimer has caught up.
pub fn claim_after(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
) -> Result<Vec<(WithdrawalId, AccountId)>, LedgerError> {
    assert!(limit > 0, "claim at least one job");
    let ids: Vec<(i64, i64)> = tx::transaction(conn, &TxOptions::default(), |tx| {
        withdrawals::table
            .filter(withdrawals::status.eq(WithdrawalStatus::Pending.as_str()))
            .filter(withdrawals::id.gt(after))
            // A bounded id window keeps the cost at O(limit) whatever plan the planner
            // picks (right after a bulk insert its row estimates are far off). Ids are
            // dense; if a gap ever leaves a window empty, the sweep moves the cursor on.
            .filter(withdrawals::id.le(after.saturating_add(limit.saturating_mul(4))))
            .filter(withdrawals::next_attempt_at.le(diesel::dsl::now))
            .order(withdrawals::id.asc())
            .limit(limit)
            .select((withdrawals::id, withdrawals::account_id))
            .for_update()
            .skip_locked()
            .load(tx.conn())
            .map_err(LedgerError::from)
    })?;
    Ok(ids.into_iter().map(|(w, a)| (WithdrawalId::from_db(w), AccountId::from_db(a))).collect())
}

/// How many jobs are still pending (due or waiting for a retry).
pub fn pending_count(conn: &mut PgConnection) -> Result<i64, LedgerError> {
    Ok(withdrawals::table
        .filter(withdrawals::status.eq(WithdrawalStatus::Pending.as_str()))
        .count()
        .get_result(conn)?)
}

/// Lists withdrawals, newest first, optionally by status and account.
pub fn list(
    conn: &mut PgConnection,
    status: Option<WithdrawalStatus>,
    account: Option<AccountId>,
    limit: i64,
) -> Result<Vec<Withdrawal>, LedgerError> {
    let mut query =
        withdrawals::table.select(Withdrawal::as_select()).order(withdrawals::id.desc()).limit(limit).into_boxed();
    if let Some(s) = status {
        query = query.filter(withdrawals::status.eq(s.as_str()));
    }
    if let Some(a) = account {
        query = query.filter(withdrawals::account_id.eq(a.get()));
    }
    Ok(query.load(conn)?)
}

/// Withdraws synchronously: records the request and processes it in one transaction.
/// A refusal (insufficient funds, closed account...) is returned as `Err` and leaves the
/// database unchanged. A replayed key returns the first withdrawal's outcome.
pub fn withdraw(conn: &mut PgConnection, req: &WithdrawalRequest) -> Result<Withdrawal, LedgerError> {
    withdraw_with(conn, &TxOptions::default(), req)
}

pub fn withdraw_with(
    conn: &mut PgConnection,
    opts: &TxOptions,
    req: &WithdrawalRequest,
) -> Result<Withdrawal, LedgerError> {
    tx::transaction(conn, opts, |tx| withdraw_tx(tx, req))
}

pub fn withdraw_tx(tx: &mut Tx<'_>, req: &WithdrawalRequest) -> Result<Withdrawal, LedgerError> {
    let (id, replayed) = request_tx(tx, req)?;
    if !replayed {
        let job = get(tx.conn(), id)?;
        // Run the debit directly (not process_tx): a refusal here must roll back the
        // request too, not be recorded as a rejected job.
        let (entry, _payout) = debit_tx(tx, &job)?;
        mark_debited(tx, job.id, entry)?;
    }
    get(tx.conn(), id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ibans_parse_and_normalise() {
        for text in ["DE89370400440532013000", "de89 3704 0044 0532 0130 00", "GB29NWBK60161331926819"] {
            assert!(Iban::parse(text).is_ok(), "{text}");
        }
        assert_eq!(Iban::parse("de89 3704 0044 0532 0130 00").unwrap().as_str(), "DE89370400440532013000");
    }

    #[test]
    fn ibans_with_wrong_check_digits_or_shape_are_refused() {
        for text in ["DE88370400440532013000", "DE8937040044053201300X!", "12345", "", "D189370400440532013000"] {
            assert!(Iban::parse(text).is_err(), "{text}");
        }
    }
}
