//! The audit's checks of the holds, run by `crate::audit` at its snapshot:
//!
//! 1. Each currency's holds-pending account holds exactly the sum of its pending holds
//!    (its balance is the sum of its postings; a hold posts `+amount` into it, its
//!    resolution `-amount` out, as payouts-in-transit does for withdrawals).
//! 2. Each hold's entries move exactly its amount: the hold entry from the payer into
//!    holds-pending; the resolution entry (once finished, of the kind its status
//!    says) out of holds-pending, `posted_minor` to the payee and the rest to the payer.

use std::fmt;

use diesel::pg::PgConnection;
use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};

use super::{AuditReport, Violation};
use crate::error::LedgerError;
use crate::money::Currency;

/// A broken invariant of the holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldsViolation {
    /// A currency's holds-pending account does not hold the sum of its pending holds.
    PendingMismatch {
        /// The currency code, as stored.
        currency: String,
        /// The holds-pending account's balance (the sum of its postings).
        held_minor: i64,
        /// The sum of the pending holds in that currency.
        pending_holds_minor: i64,
    },
    /// A hold whose hold or resolution entry does not move its amount as it should.
    EntriesMismatch {
        /// The hold's id.
        hold: i64,
    },
}

impl fmt::Display for HoldsViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HoldsViolation::PendingMismatch { currency, held_minor, pending_holds_minor } => write!(
                f,
                "{currency}: holds pending holds {}, pending holds total {}",
                money(currency, *held_minor),
                money(currency, *pending_holds_minor)
            ),
            HoldsViolation::EntriesMismatch { hold } => {
                write!(f, "hold {hold}: its entries do not move its amount into and out of holds pending")
            }
        }
    }
}

fn money(currency: &str, minor: i64) -> String {
    match Currency::from_code(currency) {
        Ok(c) => format!("{} {c}", c.format_minor(minor)),
        Err(_) => format!("{minor} minor units of {currency:?}"),
    }
}

/// Most violations of each kind reported, as the rest of the audit does.
const MAX_REPORTED: i64 = 100;

/// Adds the holds' violations to `report` (called by `crate::audit` inside its
/// snapshot, with its planner settings).
pub(crate) fn extend(conn: &mut PgConnection, mut report: AuditReport) -> Result<AuditReport, LedgerError> {
    report.violations.extend(check(conn)?.into_iter().map(Violation::Holds));
    Ok(report)
}

/// Runs both checks; an empty list when the holds are sound.
pub fn check(conn: &mut PgConnection) -> Result<Vec<HoldsViolation>, LedgerError> {
    #[derive(QueryableByName)]
    struct OneId {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let mut out = Vec::new();
    let pending = ("holds_pending", "holds", "status = 'pending'");
    out.extend(super::checks::role_off_rows(conn, pending, |t| HoldsViolation::PendingMismatch {
        currency: t.currency,
        held_minor: t.held_minor,
        pending_holds_minor: t.rows_minor,
    })?);
    // Every leg of every hold's two entries, by phase, then summed per hold (hash joins
    // over whole tables, as the rest of the audit).
    let wrong: Vec<OneId> = diesel::sql_query(format!(
        "WITH legs AS (
             SELECT h.id AS hold, 'hold' AS phase, p.account_id, p.amount_minor
             FROM holds h JOIN postings p ON p.entry_id = h.hold_entry_id
             UNION ALL
             SELECT h.id, 'resolution', p.account_id, p.amount_minor
             FROM holds h JOIN postings p ON p.entry_id = h.resolution_entry_id),
         sums AS (
             SELECT l.hold,
                    COUNT(*) FILTER (WHERE l.phase = 'hold') AS hold_legs,
                    COALESCE(SUM(l.amount_minor) FILTER (WHERE l.phase = 'hold' AND l.account_id = h.payer_id), 0)
                        AS hold_from_payer,
                    COALESCE(SUM(l.amount_minor) FILTER (WHERE l.phase = 'hold' AND a.system_role = 'holds_pending'), 0)
                        AS hold_into_pending,
                    COUNT(*) FILTER (WHERE l.phase = 'resolution') AS resolution_legs,
                    COALESCE(SUM(l.amount_minor) FILTER (WHERE l.phase = 'resolution'
                                                           AND a.system_role = 'holds_pending'), 0) AS out_of_pending,
                    COALESCE(SUM(l.amount_minor) FILTER (WHERE l.phase = 'resolution'
                                                           AND l.account_id = h.payee_id), 0) AS to_payee,
                    COALESCE(SUM(l.amount_minor) FILTER (WHERE l.phase = 'resolution'
                                                           AND l.account_id = h.payer_id), 0) AS to_payer
             FROM legs l JOIN holds h ON h.id = l.hold JOIN accounts a ON a.id = l.account_id
             GROUP BY l.hold)
         SELECT h.id
         FROM holds h
         JOIN journal_entries he ON he.id = h.hold_entry_id
         LEFT JOIN journal_entries re ON re.id = h.resolution_entry_id
         LEFT JOIN sums s ON s.hold = h.id
         WHERE he.kind <> 'hold' OR s.hold IS NULL
            OR s.hold_legs <> 2 OR s.hold_from_payer <> -h.amount_minor OR s.hold_into_pending <> h.amount_minor
            OR (h.resolution_entry_id IS NULL AND s.resolution_legs <> 0)
            OR (h.resolution_entry_id IS NOT NULL AND (
                   re.kind <> CASE h.status WHEN 'posted' THEN 'hold_post' WHEN 'voided' THEN 'hold_void'
                                            WHEN 'expired' THEN 'hold_expiry' END
                OR s.out_of_pending <> -h.amount_minor
                OR s.to_payee <> h.posted_minor
                OR s.to_payer <> h.amount_minor - h.posted_minor
                OR s.resolution_legs <> 1 + (h.posted_minor > 0)::int + (h.amount_minor > h.posted_minor)::int))
         ORDER BY h.id LIMIT {MAX_REPORTED}"
    ))
    .load(conn)?;
    out.extend(wrong.into_iter().map(|r| HoldsViolation::EntriesMismatch { hold: r.id }));
    Ok(out)
}
