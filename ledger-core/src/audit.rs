//! The audit: checks the ledger's invariants across the whole database at one snapshot.
//!
//! 1. Every journal entry has at least two postings and they sum to zero per currency.
//! 2. Every customer account's stored balance equals the sum of its postings, each
//!    posting's running balance is right, and no balance is below its floor.
//! 3. The payouts-in-transit accounts hold exactly the payouts not yet settled or
//!    returned; the external-settlement accounts hold exactly the settled ones; every
//!    debited withdrawal has exactly one entry and one payout, in matching states;
//!    every settlement or return entry moves out of transit exactly the amounts of the
//!    payouts that name it as their resolution (a settlement entry covers a batch).
//! 4. The holds (`holds/audit.rs`): each holds-pending account holds its pending holds.

use std::fmt;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use crate::error::LedgerError;
use crate::money::Currency;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    UnbalancedEntry { entry: i64, currency: String, sum_minor: i64 },
    TooFewPostings { entry: i64, postings: i64 },
    BalanceMismatch { account: i64, currency: String, stored_minor: i64, postings_sum_minor: i64 },
    RunningBalanceWrong { posting: i64, currency: String, stored_minor: i64, expected_minor: i64 },
    BelowFloor { account: i64, currency: String, balance_minor: i64, floor_minor: i64 },
    InTransitMismatch { currency: String, in_transit_minor: i64, open_payouts_minor: i64 },
    SettlementMismatch { currency: String, settled_minor: i64, settled_payouts_minor: i64 },
    PayoutStateMismatch { withdrawal: i64, withdrawal_status: String, payout_status: String },
    WithdrawalWithoutPayout { withdrawal: i64 },
    WithdrawalEntryMismatch { withdrawal: i64 },
    ResolutionMismatch { entry: i64, currency: String, moved_minor: i64, payouts_minor: i64 },
    PayoutResolutionWrong { payout: i64 },
    Holds(crate::holds::audit::HoldsViolation),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::UnbalancedEntry { entry, currency, sum_minor } => {
                write!(f, "entry {entry}: postings in {currency} sum to {}, not 0", money(currency, *sum_minor))
            }
            Violation::TooFewPostings { entry, postings } => write!(f, "entry {entry}: {postings} posting(s), need 2+"),
            Violation::BalanceMismatch { account, currency: c, stored_minor, postings_sum_minor: sum } => {
                let (stored, sum) = (money(c, *stored_minor), money(c, *sum));
                write!(f, "account {account}: stored balance {stored} != sum of postings {sum}")
            }
            Violation::RunningBalanceWrong { posting, currency: c, stored_minor, expected_minor } => {
                let (stored, expected) = (money(c, *stored_minor), money(c, *expected_minor));
                write!(f, "posting {posting}: running balance {stored}, expected {expected}")
            }
            Violation::BelowFloor { account, currency: c, balance_minor, floor_minor } => {
                write!(
                    f,
                    "account {account}: balance {} below floor {}",
                    money(c, *balance_minor),
                    money(c, *floor_minor)
                )
            }
            Violation::InTransitMismatch { currency: c, in_transit_minor: held, open_payouts_minor: open } => {
                write!(f, "{c}: payouts in transit hold {}, open payouts total {}", money(c, *held), money(c, *open))
            }
            Violation::SettlementMismatch { currency: c, settled_minor: held, settled_payouts_minor: paid } => {
                let (held, paid) = (money(c, *held), money(c, *paid));
                write!(f, "{c}: external settlement holds {held}, settled payouts total {paid}")
            }
            Violation::PayoutStateMismatch { withdrawal, withdrawal_status, payout_status } => {
                write!(f, "withdrawal {withdrawal} is {withdrawal_status} but its payout is {payout_status}")
            }
            Violation::WithdrawalWithoutPayout { withdrawal } => {
                write!(f, "withdrawal {withdrawal}: debited without exactly one payout")
            }
            Violation::WithdrawalEntryMismatch { withdrawal } => {
                write!(f, "withdrawal {withdrawal}: its journal entry does not move its amount")
            }
            Violation::ResolutionMismatch { entry, currency: c, moved_minor: moved, payouts_minor: total } => {
                let (moved, total) = (money(c, *moved), money(c, *total));
                write!(f, "entry {entry}: moves {moved} out of transit, but the payouts it resolves total {total}")
            }
            Violation::Holds(h) => h.fmt(f),
            Violation::PayoutResolutionWrong { payout } => write!(
                f,
                "payout {payout}: its resolution entry is not a settlement (or return) out of transit in its currency"
            ),
        }
    }
}

/// An amount as people read it: a decimal with its currency (minor units if the stored
/// code is not one the ledger knows, which is itself worth seeing).
fn money(currency: &str, minor: i64) -> String {
    match Currency::from_code(currency) {
        Ok(c) => format!("{} {c}", c.format_minor(minor)),
        Err(_) => format!("{minor} minor units of {currency:?}"),
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    pub entries: i64,
    pub postings: i64,
    pub accounts: i64,
    pub violations: Vec<Violation>,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "audit: {} entries, {} postings, {} accounts: {}",
            self.entries,
            self.postings,
            self.accounts,
            if self.is_clean() { "clean".to_string() } else { format!("{} violation(s)", self.violations.len()) }
        )?;
        for v in &self.violations {
            write!(f, "\n  - {v}")?;
        }
        Ok(())
    }
}

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

/// A system account's holdings in a currency beside the payouts that should match them.
#[derive(QueryableByName)]
struct CurrencyTotals {
    #[diesel(sql_type = Text)]
    currency: String,
    #[diesel(sql_type = BigInt)]
    held_minor: i64,
    #[diesel(sql_type = BigInt)]
    payouts_minor: i64,
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

fn rows<R: QueryableByName<diesel::pg::Pg> + 'static>(
    conn: &mut PgConnection,
    sql: &str,
) -> Result<Vec<R>, LedgerError> {
    Ok(diesel::sql_query(format!("{sql} LIMIT {MAX_REPORTED}")).load(conn)?)
}

/// Runs every check. Outside a transaction it opens a read-only REPEATABLE READ one, so
/// all checks see the same snapshot even while workers keep writing.
pub fn run(conn: &mut PgConnection) -> Result<AuditReport, LedgerError> {
    if crate::tx::depth(conn) == 0 {
        conn.build_transaction().repeatable_read().read_only().run(checks)
    } else {
        checks(conn)
    }
}

fn checks(conn: &mut PgConnection) -> Result<AuditReport, LedgerError> {
    // Every check reads whole tables, where hash joins are right. Right after a bulk load
    // the planner's row estimates can be off by orders of magnitude and a nested loop
    // would turn a seconds-long audit into hours, so nested loops are off for the
    // audit (and put back as they were afterwards, in case we run inside a caller's
    // transaction).
    #[derive(QueryableByName)]
    struct Previous {
        #[diesel(sql_type = Text)]
        previous: String,
    }
    let previous: Previous = diesel::sql_query(
        "SELECT current_setting('enable_nestloop') AS previous, set_config('enable_nestloop', 'off', true)",
    )
    .get_result(conn)?;
    let report = run_checks(conn).and_then(|r| crate::holds::audit::extend(conn, r));
    diesel::sql_query("SELECT set_config('enable_nestloop', $1, true)")
        .bind::<Text, _>(&previous.previous)
        .execute(conn)?;
    report
}

fn run_checks(conn: &mut PgConnection) -> Result<AuditReport, LedgerError> {
    let mut report = AuditReport::default();
    let counts: Counts = diesel::sql_query(
        "SELECT (SELECT count(*) FROM journal_entries) AS entries, (SELECT count(*) FROM postings) AS postings,
                (SELECT count(*) FROM accounts) AS accounts",
    )
    .get_result(conn)?;
    report.entries = counts.entries;
    report.postings = counts.postings;
    report.accounts = counts.accounts;
    let v = &mut report.violations;

    for r in rows::<EntrySum>(
        conn,
        "SELECT entry_id AS entry, currency, SUM(amount_minor)::bigint AS sum_minor
         FROM postings GROUP BY entry_id, currency HAVING SUM(amount_minor) <> 0 ORDER BY entry_id",
    )? {
        v.push(Violation::UnbalancedEntry { entry: r.entry, currency: r.currency, sum_minor: r.sum_minor });
    }
    for r in rows::<EntryPostings>(
        conn,
        "SELECT e.id AS entry, COUNT(p.id) AS postings
         FROM journal_entries e LEFT JOIN postings p ON p.entry_id = e.id
         GROUP BY e.id HAVING COUNT(p.id) < 2 ORDER BY e.id",
    )? {
        v.push(Violation::TooFewPostings { entry: r.entry, postings: r.postings });
    }
    for r in rows::<StoredVsExpected>(
        conn,
        "SELECT a.id, a.currency, a.balance_minor AS stored_minor, COALESCE(s.total, 0)::bigint AS expected_minor
         FROM accounts a
         LEFT JOIN (SELECT account_id, SUM(amount_minor) AS total FROM postings GROUP BY account_id) s
                ON s.account_id = a.id
         WHERE a.kind = 'customer' AND a.balance_minor <> COALESCE(s.total, 0) ORDER BY a.id",
    )? {
        v.push(Violation::BalanceMismatch {
            account: r.id,
            currency: r.currency,
            stored_minor: r.stored_minor,
            postings_sum_minor: r.expected_minor,
        });
    }
    for r in rows::<StoredVsExpected>(
        conn,
        "SELECT id, currency, balance_after_minor AS stored_minor, running::bigint AS expected_minor FROM (
             SELECT id, currency, balance_after_minor,
                    SUM(amount_minor) OVER (PARTITION BY account_id ORDER BY id) AS running
             FROM postings) p
         WHERE balance_after_minor IS NOT NULL AND balance_after_minor <> running ORDER BY id",
    )? {
        v.push(Violation::RunningBalanceWrong {
            posting: r.id,
            currency: r.currency,
            stored_minor: r.stored_minor,
            expected_minor: r.expected_minor,
        });
    }
    for r in rows::<StoredVsExpected>(
        conn,
        "SELECT id, currency, balance_minor AS stored_minor, -overdraft_limit_minor AS expected_minor
         FROM accounts WHERE kind = 'customer' AND balance_minor < -overdraft_limit_minor ORDER BY id",
    )? {
        let (balance_minor, floor_minor) = (r.stored_minor, r.expected_minor);
        v.push(Violation::BelowFloor { account: r.id, currency: r.currency, balance_minor, floor_minor });
    }
    for r in rows::<CurrencyTotals>(
        conn,
        "SELECT t.currency, t.held::bigint AS held_minor, COALESCE(o.open, 0)::bigint AS payouts_minor FROM (
             SELECT a.currency, COALESCE(SUM(p.amount_minor), 0) AS held
             FROM accounts a LEFT JOIN postings p ON p.account_id = a.id
             WHERE a.system_role = 'payouts_in_transit' GROUP BY a.currency) t
         LEFT JOIN (SELECT currency, SUM(amount_minor) AS open FROM payouts
                    WHERE status IN ('pending', 'failed') GROUP BY currency) o
                ON o.currency = t.currency
         WHERE t.held <> COALESCE(o.open, 0) ORDER BY t.currency",
    )? {
        v.push(Violation::InTransitMismatch {
            currency: r.currency,
            in_transit_minor: r.held_minor,
            open_payouts_minor: r.payouts_minor,
        });
    }
    for r in rows::<OneId>(
        conn,
        "SELECT w.id
         FROM withdrawals w
         LEFT JOIN (SELECT withdrawal_id, COUNT(*) AS n FROM payouts GROUP BY withdrawal_id) pc
                ON pc.withdrawal_id = w.id
         WHERE w.status IN ('paying_out', 'completed', 'returned') AND COALESCE(pc.n, 0) <> 1
         ORDER BY w.id",
    )? {
        v.push(Violation::WithdrawalWithoutPayout { withdrawal: r.id });
    }
    for r in rows::<CurrencyTotals>(
        conn,
        "SELECT t.currency, t.held::bigint AS held_minor, COALESCE(o.settled, 0)::bigint AS payouts_minor FROM (
             SELECT a.currency, COALESCE(SUM(p.amount_minor), 0) AS held
             FROM accounts a LEFT JOIN postings p ON p.account_id = a.id
             WHERE a.system_role = 'external_settlement' GROUP BY a.currency) t
         LEFT JOIN (SELECT currency, SUM(amount_minor) AS settled FROM payouts
                    WHERE status = 'settled' GROUP BY currency) o
                ON o.currency = t.currency
         WHERE t.held <> COALESCE(o.settled, 0) ORDER BY t.currency",
    )? {
        v.push(Violation::SettlementMismatch {
            currency: r.currency,
            settled_minor: r.held_minor,
            settled_payouts_minor: r.payouts_minor,
        });
    }
    for r in rows::<States>(
        conn,
        "SELECT w.id AS withdrawal, w.status AS withdrawal_status, p.status AS payout_status
         FROM withdrawals w JOIN payouts p ON p.withdrawal_id = w.id
         WHERE NOT ((w.status = 'paying_out' AND p.status IN ('pending', 'failed'))
                 OR (w.status = 'completed' AND p.status = 'settled')
                 OR (w.status = 'returned' AND p.status = 'returned'))
         ORDER BY w.id",
    )? {
        v.push(Violation::PayoutStateMismatch {
            withdrawal: r.withdrawal,
            withdrawal_status: r.withdrawal_status,
            payout_status: r.payout_status,
        });
    }
    for r in rows::<OneId>(
        conn,
        "SELECT w.id
         FROM withdrawals w
         LEFT JOIN postings p
                ON p.entry_id = w.entry_id AND p.account_id = w.account_id AND p.amount_minor = -w.amount_minor
         WHERE w.entry_id IS NOT NULL AND p.id IS NULL
         ORDER BY w.id",
    )? {
        v.push(Violation::WithdrawalEntryMismatch { withdrawal: r.id });
    }
    for r in rows::<StoredVsExpected>(
        conn,
        "SELECT e.id, COALESCE(m.currency, r.currency, '') AS currency,
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
         ORDER BY e.id",
    )? {
        v.push(Violation::ResolutionMismatch {
            entry: r.id,
            currency: r.currency,
            moved_minor: r.stored_minor,
            payouts_minor: r.expected_minor,
        });
    }
    for r in rows::<OneId>(
        conn,
        "SELECT p.id
         FROM payouts p JOIN journal_entries e ON e.id = p.resolution_entry_id
         WHERE e.kind <> CASE p.status WHEN 'settled' THEN 'payout_settlement' ELSE 'payout_return' END
            OR NOT EXISTS (SELECT 1 FROM postings q JOIN accounts a ON a.id = q.account_id
                           WHERE q.entry_id = e.id AND a.system_role = 'payouts_in_transit'
                             AND q.currency = p.currency AND q.amount_minor < 0)
         ORDER BY p.id",
    )? {
        v.push(Violation::PayoutResolutionWrong { payout: r.id });
    }
    Ok(report)
}
