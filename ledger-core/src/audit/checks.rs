//! The audit's checks: one function a check, each one query whose rows are the
//! violations it found (at most [`MAX_REPORTED`] of each kind), run in the order of
//! [`CHECKS`], which is the order of the module's list and of the report.

use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use super::{AuditReport, Violation};
use crate::error::LedgerError;

// One named row type per shape of check, its fields named as the SQL names its columns.

#[derive(QueryableByName)]
struct Counts {
    #[diesel(sql_type = BigInt)]
    entries: i64,
    #[diesel(sql_type = BigInt)]
    postings: i64,
    #[diesel(sql_type = BigInt)]
    accounts: i64,
}

#[derive(QueryableByName)]
struct PostingRefs {
    #[diesel(sql_type = BigInt)]
    posting: i64,
    #[diesel(sql_type = BigInt)]
    entry: i64,
    #[diesel(sql_type = BigInt)]
    account: i64,
    #[diesel(sql_type = Text)]
    currency: String,
}

#[derive(QueryableByName)]
struct EntrySum {
    #[diesel(sql_type = BigInt)]
    entry: i64,
    #[diesel(sql_type = Text)]
    currency: String,
    #[diesel(sql_type = BigInt)]
    sum_minor: i64,
}

#[derive(QueryableByName)]
struct EntryPostings {
    #[diesel(sql_type = BigInt)]
    entry: i64,
    #[diesel(sql_type = BigInt)]
    postings: i64,
}

/// A stored figure beside the one it should equal (a balance and its postings' sum, a
/// running balance and its recomputation, a balance and its floor).
#[derive(QueryableByName)]
struct StoredVsExpected {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    currency: String,
    #[diesel(sql_type = BigInt)]
    stored_minor: i64,
    #[diesel(sql_type = BigInt)]
    expected_minor: i64,
}

/// A system account's holdings in a currency beside the rows (payouts, holds) that
/// should add up to them.
#[derive(QueryableByName)]
pub(super) struct CurrencyTotals {
    #[diesel(sql_type = Text)]
    pub(super) currency: String,
    #[diesel(sql_type = BigInt)]
    pub(super) held_minor: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) rows_minor: i64,
}

/// Per currency, where they differ: the postings on the system accounts of `role`
/// beside the amounts of the rows of `table` matching `rows_where` that they should
/// hold. The one shape of every "this system account holds exactly these rows" check;
/// its arguments are the audit's own constants, never input.
pub(super) fn role_off_rows<V>(
    conn: &mut PgConnection,
    (role, table, rows_where): (&str, &str, &str),
    violation: impl Fn(CurrencyTotals) -> V,
) -> Result<Vec<V>, LedgerError> {
    let sql = format!(
        "SELECT t.currency, t.held::bigint AS held_minor, COALESCE(o.total, 0)::bigint AS rows_minor FROM (
             SELECT a.currency, COALESCE(SUM(p.amount_minor), 0) AS held
             FROM accounts a LEFT JOIN postings p ON p.account_id = a.id
             WHERE a.system_role = '{role}' GROUP BY a.currency) t
         LEFT JOIN (SELECT currency, SUM(amount_minor) AS total FROM {table} WHERE {rows_where} GROUP BY currency) o
                ON o.currency = t.currency
         WHERE t.held <> COALESCE(o.total, 0) ORDER BY t.currency LIMIT {MAX_REPORTED}"
    );
    let rows: Vec<CurrencyTotals> = diesel::sql_query(sql).load(conn)?;
    Ok(rows.into_iter().map(violation).collect())
}

/// A row of one of two tables, named by `kind`.
#[derive(QueryableByName)]
struct KindAndId {
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[derive(QueryableByName)]
struct OneId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[derive(QueryableByName)]
struct States {
    #[diesel(sql_type = BigInt)]
    withdrawal: i64,
    #[diesel(sql_type = Text)]
    withdrawal_status: String,
    #[diesel(sql_type = Text)]
    payout_status: String,
}

/// Most violations of each kind reported; the count is what matters past that.
const MAX_REPORTED: i64 = 100;

/// One check: its query's rows as violations.
type Check = fn(&mut PgConnection) -> Result<Vec<Violation>, LedgerError>;

/// Every check, in the order the report lists what they find.
const CHECKS: [Check; 14] = [
    // 1. Entries.
    unbalanced_entries,
    entries_with_too_few_postings,
    postings_off_their_references,
    // 2. Customer balances.
    balances_off_their_postings,
    running_balances_wrong,
    balances_below_floor,
    // 3. Payouts and withdrawals.
    queue_off_its_references,
    in_transit_off_open_payouts,
    withdrawals_without_one_payout,
    settlement_off_settled_payouts,
    payout_states_off_withdrawals,
    withdrawal_entries_off_amounts,
    resolutions_off_payouts,
    payout_resolutions_wrong,
];

/// The counts, then every check in turn; the first error ends the audit.
pub(super) fn run_checks(conn: &mut PgConnection) -> Result<AuditReport, LedgerError> {
    let counts: Counts = diesel::sql_query(
        "SELECT (SELECT count(*) FROM journal_entries) AS entries, (SELECT count(*) FROM postings) AS postings,
                (SELECT count(*) FROM accounts) AS accounts",
    )
    .get_result(conn)?;
    let mut report = AuditReport {
        entries: counts.entries,
        postings: counts.postings,
        accounts: counts.accounts,
        violations: Vec::new(),
    };
    for check in CHECKS {
        report.violations.extend(check(conn)?);
    }
    Ok(report)
}

/// The first [`MAX_REPORTED`] rows of `sql`, each made a violation.
fn found<R: QueryableByName<Pg> + 'static>(
    conn: &mut PgConnection,
    sql: &str,
    violation: impl Fn(R) -> Violation,
) -> Result<Vec<Violation>, LedgerError> {
    let rows: Vec<R> = diesel::sql_query(format!("{sql} LIMIT {MAX_REPORTED}")).load(conn)?;
    Ok(rows.into_iter().map(violation).collect())
}

fn unbalanced_entries(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT entry_id AS entry, currency, SUM(amount_minor)::bigint AS sum_minor
         FROM postings GROUP BY entry_id, currency HAVING SUM(amount_minor) <> 0 ORDER BY entry_id";
    found(conn, sql, |r: EntrySum| Violation::UnbalancedEntry {
        entry: r.entry,
        currency: r.currency,
        sum_minor: r.sum_minor,
    })
}

fn entries_with_too_few_postings(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT e.id AS entry, COUNT(p.id) AS postings
         FROM journal_entries e LEFT JOIN postings p ON p.entry_id = e.id
         GROUP BY e.id HAVING COUNT(p.id) < 2 ORDER BY e.id";
    found(conn, sql, |r: EntryPostings| Violation::TooFewPostings { entry: r.entry, postings: r.postings })
}

fn postings_off_their_references(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT p.id AS posting, p.entry_id AS entry, p.account_id AS account, p.currency
         FROM postings p
         LEFT JOIN journal_entries e ON e.id = p.entry_id
         LEFT JOIN accounts a ON a.id = p.account_id AND a.currency = p.currency
         WHERE e.id IS NULL OR a.id IS NULL
         ORDER BY p.id";
    found(conn, sql, |r: PostingRefs| Violation::PostingWithoutReference {
        posting: r.posting,
        entry: r.entry,
        account: r.account,
        currency: r.currency,
    })
}

/// Withdrawals and payouts naming what does not exist: the references the database
/// checks when each row is written (`ledger_check_queue_references`).
fn queue_off_its_references(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT 'withdrawal' AS kind, w.id
         FROM withdrawals w
         LEFT JOIN accounts a ON a.id = w.account_id AND a.currency = w.currency
         LEFT JOIN journal_entries e ON e.id = w.entry_id
         WHERE a.id IS NULL OR (w.entry_id IS NOT NULL AND e.id IS NULL)
         UNION ALL
         SELECT 'payout', p.id
         FROM payouts p
         LEFT JOIN withdrawals w ON w.id = p.withdrawal_id
         LEFT JOIN accounts a ON a.id = p.account_id AND a.currency = p.currency
         LEFT JOIN journal_entries e ON e.id = p.resolution_entry_id
         WHERE w.id IS NULL OR a.id IS NULL OR (p.resolution_entry_id IS NOT NULL AND e.id IS NULL)
         ORDER BY kind DESC, id";
    found(conn, sql, |r: KindAndId| match r.kind.as_str() {
        "withdrawal" => Violation::WithdrawalWithoutReference { withdrawal: r.id },
        _ => Violation::PayoutWithoutReference { payout: r.id },
    })
}

fn balances_off_their_postings(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT a.id, a.currency, a.balance_minor AS stored_minor, COALESCE(s.total, 0)::bigint AS expected_minor
         FROM accounts a
         LEFT JOIN (SELECT account_id, SUM(amount_minor) AS total FROM postings GROUP BY account_id) s
                ON s.account_id = a.id
         WHERE a.kind = 'customer' AND a.balance_minor <> COALESCE(s.total, 0) ORDER BY a.id";
    found(conn, sql, |r: StoredVsExpected| Violation::BalanceMismatch {
        account: r.id,
        currency: r.currency,
        stored_minor: r.stored_minor,
        postings_sum_minor: r.expected_minor,
    })
}

fn running_balances_wrong(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT id, currency, balance_after_minor AS stored_minor, running::bigint AS expected_minor FROM (
             SELECT id, currency, balance_after_minor,
                    SUM(amount_minor) OVER (PARTITION BY account_id ORDER BY id) AS running
             FROM postings) p
         WHERE balance_after_minor IS NOT NULL AND balance_after_minor <> running ORDER BY id";
    found(conn, sql, |r: StoredVsExpected| Violation::RunningBalanceWrong {
        posting: r.id,
        currency: r.currency,
        stored_minor: r.stored_minor,
        expected_minor: r.expected_minor,
    })
}

fn balances_below_floor(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT id, currency, balance_minor AS stored_minor, -overdraft_limit_minor AS expected_minor
         FROM accounts WHERE kind = 'customer' AND balance_minor < -overdraft_limit_minor ORDER BY id";
    found(conn, sql, |r: StoredVsExpected| {
        let (balance_minor, floor_minor) = (r.stored_minor, r.expected_minor);
        Violation::BelowFloor { account: r.id, currency: r.currency, balance_minor, floor_minor }
    })
}

fn in_transit_off_open_payouts(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let open = ("payouts_in_transit", "payouts", "status IN ('pending', 'failed')");
    role_off_rows(conn, open, |r| Violation::InTransitMismatch {
        currency: r.currency,
        in_transit_minor: r.held_minor,
        open_payouts_minor: r.rows_minor,
    })
}

fn withdrawals_without_one_payout(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT w.id
         FROM withdrawals w
         LEFT JOIN (SELECT withdrawal_id, COUNT(*) AS n FROM payouts GROUP BY withdrawal_id) pc
                ON pc.withdrawal_id = w.id
         WHERE w.status IN ('paying_out', 'completed', 'returned') AND COALESCE(pc.n, 0) <> 1
         ORDER BY w.id";
    found(conn, sql, |r: OneId| Violation::WithdrawalWithoutPayout { withdrawal: r.id })
}

fn settlement_off_settled_payouts(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let settled = ("external_settlement", "payouts", "status = 'settled'");
    role_off_rows(conn, settled, |r| Violation::SettlementMismatch {
        currency: r.currency,
        settled_minor: r.held_minor,
        settled_payouts_minor: r.rows_minor,
    })
}

fn payout_states_off_withdrawals(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT w.id AS withdrawal, w.status AS withdrawal_status, p.status AS payout_status
         FROM withdrawals w JOIN payouts p ON p.withdrawal_id = w.id
         WHERE NOT ((w.status = 'paying_out' AND p.status IN ('pending', 'failed'))
                 OR (w.status = 'completed' AND p.status = 'settled')
                 OR (w.status = 'returned' AND p.status = 'returned'))
         ORDER BY w.id";
    found(conn, sql, |r: States| Violation::PayoutStateMismatch {
        withdrawal: r.withdrawal,
        withdrawal_status: r.withdrawal_status,
        payout_status: r.payout_status,
    })
}

fn withdrawal_entries_off_amounts(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT w.id
         FROM withdrawals w
         LEFT JOIN postings p
                ON p.entry_id = w.entry_id AND p.account_id = w.account_id AND p.amount_minor = -w.amount_minor
         WHERE w.entry_id IS NOT NULL AND p.id IS NULL
         ORDER BY w.id";
    found(conn, sql, |r: OneId| Violation::WithdrawalEntryMismatch { withdrawal: r.id })
}

fn resolutions_off_payouts(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT e.id, COALESCE(m.currency, r.currency, '') AS currency,
                (-COALESCE(m.moved, 0))::bigint AS stored_minor, COALESCE(r.total, 0)::bigint AS expected_minor
         FROM journal_entries e
         LEFT JOIN (SELECT p.entry_id, min(p.currency) AS currency, SUM(p.amount_minor) AS moved
                    FROM postings p JOIN accounts a ON a.id = p.account_id
                    WHERE a.system_role = 'payouts_in_transit' GROUP BY p.entry_id) m ON m.entry_id = e.id
         LEFT JOIN (SELECT resolution_entry_id, min(currency) AS currency, SUM(amount_minor) AS total FROM payouts
                    WHERE resolution_entry_id IS NOT NULL GROUP BY resolution_entry_id) r
                ON r.resolution_entry_id = e.id
         -- Every settlement or return entry, and every entry a payout names as its
         -- resolution (which must be one of those kinds).
         WHERE (e.kind IN ('payout_settlement', 'payout_return') OR r.total IS NOT NULL)
           AND (e.kind NOT IN ('payout_settlement', 'payout_return') OR -COALESCE(m.moved, 0) <> COALESCE(r.total, 0))
         ORDER BY e.id";
    found(conn, sql, |r: StoredVsExpected| Violation::ResolutionMismatch {
        entry: r.id,
        currency: r.currency,
        moved_minor: r.stored_minor,
        payouts_minor: r.expected_minor,
    })
}

fn payout_resolutions_wrong(conn: &mut PgConnection) -> Result<Vec<Violation>, LedgerError> {
    let sql = "SELECT p.id
         FROM payouts p JOIN journal_entries e ON e.id = p.resolution_entry_id
         WHERE e.kind <> CASE p.status WHEN 'settled' THEN 'payout_settlement' ELSE 'payout_return' END
            OR NOT EXISTS (SELECT 1 FROM postings q JOIN accounts a ON a.id = q.account_id
                           WHERE q.entry_id = e.id AND a.system_role = 'payouts_in_transit'
                             AND q.currency = p.currency AND q.amount_minor < 0)
         ORDER BY p.id";
    found(conn, sql, |r: OneId| Violation::PayoutResolutionWrong { payout: r.id })
}
