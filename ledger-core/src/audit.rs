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
//! 4. The holds (`audit/holds.rs`): each holds-pending account holds its pending holds.

use std::fmt;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;

use crate::error::LedgerError;
use crate::money::Currency;

mod checks;
pub mod holds;

/// One broken invariant the audit found. Ids are the raw row ids, currencies the stored
/// codes (shown as read, even when not one the ledger knows), amounts in minor units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// A journal entry whose postings in one currency do not sum to zero.
    UnbalancedEntry {
        /// The journal entry.
        entry: i64,
        /// The currency whose postings do not balance.
        currency: String,
        /// What they sum to instead of 0.
        sum_minor: i64,
    },
    /// A journal entry with fewer than two postings.
    TooFewPostings {
        /// The journal entry.
        entry: i64,
        /// How many postings it has.
        postings: i64,
    },
    /// An account whose stored balance is not the sum of its postings.
    BalanceMismatch {
        /// The account.
        account: i64,
        /// Its currency.
        currency: String,
        /// The balance stored on the account row.
        stored_minor: i64,
        /// The sum of its postings.
        postings_sum_minor: i64,
    },
    /// A posting whose stored running balance is not the account's sum up to it.
    RunningBalanceWrong {
        /// The posting.
        posting: i64,
        /// Its currency.
        currency: String,
        /// The running balance stored on the posting.
        stored_minor: i64,
        /// The sum of the account's postings up to and including it.
        expected_minor: i64,
    },
    /// A customer account below its floor (0, or minus its overdraft limit).
    BelowFloor {
        /// The account.
        account: i64,
        /// Its currency.
        currency: String,
        /// Its balance.
        balance_minor: i64,
        /// The lowest balance allowed.
        floor_minor: i64,
    },
    /// The in-transit system account does not hold exactly the open payouts.
    InTransitMismatch {
        /// The currency.
        currency: String,
        /// What the in-transit account holds.
        in_transit_minor: i64,
        /// What the payouts not yet settled or returned total.
        open_payouts_minor: i64,
    },
    /// The external settlement account does not hold exactly the settled payouts.
    SettlementMismatch {
        /// The currency.
        currency: String,
        /// What the settlement account holds.
        settled_minor: i64,
        /// What the settled payouts total.
        settled_payouts_minor: i64,
    },
    /// A withdrawal's status disagrees with its payout's.
    PayoutStateMismatch {
        /// The withdrawal.
        withdrawal: i64,
        /// Its stored status.
        withdrawal_status: String,
        /// Its payout's stored status.
        payout_status: String,
    },
    /// A posting whose entry does not exist, or whose account does not exist in the
    /// posting's currency (the database refuses both when a posting is written).
    PostingWithoutReference {
        /// The posting.
        posting: i64,
        /// The entry it names.
        entry: i64,
        /// The account it names.
        account: i64,
        /// Its currency.
        currency: String,
    },
    /// A withdrawal whose account does not exist in its currency, or whose journal
    /// entry does not exist (the database refuses both when the row is written).
    WithdrawalWithoutReference {
        /// The withdrawal.
        withdrawal: i64,
    },
    /// A payout whose withdrawal, account in its currency, or resolution entry does not
    /// exist (the database refuses each when the row is written).
    PayoutWithoutReference {
        /// The payout.
        payout: i64,
    },
    /// A debited withdrawal without exactly one payout.
    WithdrawalWithoutPayout {
        /// The withdrawal.
        withdrawal: i64,
    },
    /// A withdrawal whose journal entry does not move its amount into transit.
    WithdrawalEntryMismatch {
        /// The withdrawal.
        withdrawal: i64,
    },
    /// A settlement or return entry that moves another amount than the payouts it resolves.
    ResolutionMismatch {
        /// The journal entry.
        entry: i64,
        /// Its currency.
        currency: String,
        /// What it moves out of transit.
        moved_minor: i64,
        /// What the payouts it resolves total.
        payouts_minor: i64,
    },
    /// A resolved payout whose resolution entry is not a settlement or return out of transit.
    PayoutResolutionWrong {
        /// The payout.
        payout: i64,
    },
    /// A broken invariant of holds (see [`holds::HoldsViolation`]).
    Holds(holds::HoldsViolation),
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
            Violation::PostingWithoutReference { posting, entry, account, currency } => {
                write!(f, "posting {posting}: entry {entry} or account {account} in {currency} does not exist")
            }
            Violation::WithdrawalWithoutReference { withdrawal } => {
                write!(f, "withdrawal {withdrawal}: its account in its currency or its entry does not exist")
            }
            Violation::PayoutWithoutReference { payout } => {
                write!(f, "payout {payout}: its withdrawal, its account in its currency or its resolution entry does not exist")
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

/// What [`run`] read and what it found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Journal entries checked.
    pub entries: i64,
    /// Postings checked.
    pub postings: i64,
    /// Accounts checked.
    pub accounts: i64,
    /// Every broken invariant found; empty when the ledger is consistent.
    pub violations: Vec<Violation>,
}

impl AuditReport {
    /// No violation found.
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

/// Runs every check. Outside a transaction it opens a read-only REPEATABLE READ one, so
/// all checks see the same snapshot even while workers keep writing.
pub fn run(conn: &mut PgConnection) -> Result<AuditReport, LedgerError> {
    if crate::tx::depth(conn) == 0 {
        conn.build_transaction().repeatable_read().read_only().run(without_nested_loops)
    } else {
        without_nested_loops(conn)
    }
}

fn without_nested_loops(conn: &mut PgConnection) -> Result<AuditReport, LedgerError> {
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
    let report = checks::run_checks(conn).and_then(|r| holds::extend(conn, r));
    diesel::sql_query("SELECT set_config('enable_nestloop', $1, true)")
        .bind::<Text, _>(&previous.previous)
        .execute(conn)?;
    report
}
