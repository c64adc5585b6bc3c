//! The crate's error types. Operating errors (insufficient funds, unknown account) are
//! values the caller handles; transient database errors say so via `is_transient`.
//!
//! Whether to retry is decided by [`RetryClass`] (the SQLSTATE or Diesel's own error
//! kind, never message text): a transient error means running the whole transaction
//! again may succeed; any other error will fail the same way until something changes.

use diesel::result::{DatabaseErrorKind, Error as DieselError};

use crate::holds::status::HoldStatus;
use crate::ids::{AccountId, EntryId, HoldId, PayoutId, WithdrawalId};
pub use crate::input::InvalidInput;
use crate::money::Currency;
use crate::sqlstate::{self, SqlState};

/// The most characters of an error or a reason stored on a row (a job's last error, a
/// payout's refusal reason): enough to diagnose, bounded whatever a gateway sends.
pub const STORED_TEXT_MAX_CHARS: usize = 500;

/// Text from outside (a gateway's answer, an error message) fit for a TEXT column: at
/// most `max_chars` characters, and no NUL (PostgreSQL refuses it; a JSON string may
/// carry one).
pub fn stored_text(text: &str, max_chars: usize) -> String {
    text.chars().filter(|c| *c != '\0').take(max_chars).collect()
}

/// Everything a ledger operation can fail with.
///
/// An operation that runs its own transaction and fails wrote nothing: the transaction
/// was rolled back, idempotency key included, so the request may be sent again under
/// the same key. An `_tx` form that fails may have written part of its work into the
/// caller's transaction: roll that back (or run the call in [`crate::Tx::savepoint`]).
/// [`LedgerError::is_transient`] says whether sending it again unchanged may succeed;
/// [`LedgerError::code`] names the variant for logs and stored reasons.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The request is malformed or out of range (see [`InvalidInput`]); most are found
    /// before the database is touched. Sending it again unchanged fails the same way.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// A debit would take the account below its floor (0, or minus its overdraft
    /// limit). The same request may succeed once the account has been credited.
    ///
    /// The amounts stay minor units for code; people read them as decimals with the
    /// currency (this text is also the reason stored on a rejected withdrawal).
    #[error(
        "insufficient funds in account {account}: balance {balance} {currency}, floor {floor} {currency}, requested {requested} {currency}",
        balance = .currency.format_minor(*.balance_minor),
        floor = .currency.format_minor(*.floor_minor),
        requested = .currency.format_minor(*.requested_minor)
    )]
    InsufficientFunds {
        /// The account that would be debited.
        account: AccountId,
        /// The account's currency, the scale of the three amounts.
        currency: Currency,
        /// The balance before the debit, in minor units.
        balance_minor: i64,
        /// The lowest balance the account may reach, in minor units: 0, or minus its
        /// overdraft limit.
        floor_minor: i64,
        /// The amount the debit asked for, in minor units.
        requested_minor: i64,
    },
    /// No account has this id. Sending the request again does not help.
    #[error("unknown account {0}")]
    UnknownAccount(AccountId),
    /// The account is closed and takes no new movements. (A returned payout still
    /// reaches it: the money is the customer's.)
    #[error("account {0} is closed")]
    AccountClosed(AccountId),
    /// The id names a system account (external funding, payouts in transit, external
    /// settlement), which only the ledger itself moves: no request may name one.
    #[error("account {0} is a system account and cannot be used here")]
    SystemAccount(AccountId),
    /// The request's currency is not the account's. Nothing is ever converted: send
    /// the request in the account's currency.
    #[error("currency mismatch: account {account} holds {account_currency}, request is in {request_currency}")]
    CurrencyMismatch {
        /// The account named by the request.
        account: AccountId,
        /// The currency the account holds (ISO 4217 code).
        account_currency: String,
        /// The currency of the request's amount (ISO 4217 code).
        request_currency: String,
    },
    /// A transfer names the same account as its source and its destination.
    #[error("a transfer needs two different accounts, got {0} twice")]
    SameAccount(AccountId),
    /// The idempotency key was already used for a different request: another operation,
    /// or the same operation with other fields. Sending it again never succeeds; use a
    /// new key, or the original request to get the original answer.
    #[error("idempotency key {key:?} was already used for a different request ({operation})")]
    IdempotencyConflict {
        /// The key, as the caller sent it.
        key: String,
        /// The operation the key was first used for (`deposit`, `transfer`,
        /// `withdrawal`, `open_account`).
        operation: String,
    },
    /// A batch item not applied because another item of its linked chain (`failed`, its
    /// index in the batch) was refused: a chain succeeds or fails as a whole. Fix or
    /// drop the failed item and send the chain again.
    #[error("not applied: item {failed} of its linked chain was refused")]
    LinkedItemFailed {
        /// The index in the batch of the item whose refusal failed the chain.
        failed: usize,
    },
    /// A batch item not applied because its linked chain was never closed: the batch's
    /// last item was marked `linked`.
    #[error("not applied: its linked chain is not closed (the batch's last item is marked linked)")]
    LinkedChainOpen,
    /// No withdrawal has this id.
    #[error("unknown withdrawal {0}")]
    UnknownWithdrawal(WithdrawalId),
    /// No transfer was written under this journal entry.
    #[error("no transfer has entry {0}")]
    UnknownTransfer(EntryId),
    /// No payout has this id.
    #[error("unknown payout {0}")]
    UnknownPayout(PayoutId),
    /// The payout is not in a state that allows the operation (not failed, its last call
    /// still in flight, sent again meanwhile, a lookup that could not tell). `reason`
    /// names the payout and says what to do.
    #[error("{reason}")]
    PayoutState {
        /// The payout the operation named.
        payout: PayoutId,
        /// What is in the way, and what to do about it, for an operator to read.
        reason: String,
    },
    /// No hold has this id. Nothing was written.
    #[error("unknown hold {0}")]
    UnknownHold(HoldId),
    /// Only a pending hold can be posted or voided: this one was already posted,
    /// voided or expired (by another call, or by the expiry loop that won the race).
    #[error("hold {hold} is {status}: only a pending hold can be posted or voided")]
    HoldFinished {
        /// The hold the call named.
        hold: HoldId,
        /// Where it ended.
        status: HoldStatus,
    },
    /// A post asked for more than the hold holds. Nothing was written.
    #[error(
        "hold {hold} holds {held} {currency}: cannot post {requested} {currency}",
        held = .currency.format_minor(*.held_minor),
        requested = .currency.format_minor(*.requested_minor)
    )]
    PostExceedsHold {
        /// The hold the call named.
        hold: HoldId,
        /// The hold's currency.
        currency: Currency,
        /// What the hold holds, in minor units.
        held_minor: i64,
        /// What the post asked for, in minor units.
        requested_minor: i64,
    },
    /// A post's amount is in another currency than the hold's. Nothing was written.
    #[error("hold {hold} is in {hold_currency}, the request is in {request_currency}")]
    HoldCurrencyMismatch {
        /// The hold the call named.
        hold: HoldId,
        /// The hold's currency.
        hold_currency: Currency,
        /// The currency of the requested amount.
        request_currency: Currency,
    },
    /// A balance (or a running sum of postings, while reading) would leave the `i64`
    /// range of minor units. Nothing was written.
    #[error("balance overflow on account {0}")]
    BalanceOverflow(AccountId),
    /// A named lock ([`crate::locks::acquire`]) was not granted within its timeout; the
    /// text is the lock's name. The caller's transaction is still usable; try again
    /// later, or ask [`crate::locks::holder`] who holds it. (A row lock that times out
    /// is a [`LedgerError::Database`] error with SQLSTATE 55P03, which is transient.)
    #[error("lock on {0:?} not acquired before the timeout")]
    LockTimeout(String),
    /// A pooled transaction ([`crate::tx::transaction_pooled`]) failed transiently on
    /// every one of its attempts. Not transient itself: the runner already retried, so
    /// the caller decides whether to try again later.
    #[error("gave up after {attempts} attempts: {last}")]
    RetriesExhausted {
        /// The attempts made, the first included.
        attempts: u32,
        /// The last attempt's error.
        last: Box<LedgerError>,
    },
    /// Any other error from the database or from Diesel. [`LedgerError::is_transient`]
    /// says whether running the transaction again may help; [`LedgerError::sqlstate`]
    /// gives the server's error code.
    ///
    /// The server's message is in its `lc_messages` language; the SQLSTATE, appended
    /// when there is one, is the same everywhere.
    #[error("database error: {error}{suffix}", error = .0, suffix = sqlstate_suffix(.0))]
    Database(#[from] DieselError),
    /// No usable connection: the pool timed out or was told to stop waiting
    /// ([`crate::db::checkout`]), connecting or building a pool failed, or migrations
    /// could not run. Classified as transient ([`Transient::ConnectionLost`]): a retry
    /// takes a new connection.
    #[error("connection pool error: {0}")]
    Pool(String),
    /// Stored rows disagree with what the operation requires (for example a pending
    /// payout whose withdrawal is not paying out). Nothing was written.
    #[error("inconsistent ledger data: {0}")]
    Inconsistent(String),
}

impl From<r2d2::Error> for LedgerError {
    fn from(e: r2d2::Error) -> Self {
        LedgerError::Pool(e.to_string())
    }
}

fn sqlstate_suffix(e: &DieselError) -> String {
    sqlstate::of_diesel_error(e).map(|s| format!(" (SQLSTATE {s})")).unwrap_or_default()
}

/// Why a database error is worth retrying, if it is. Decided by the SQLSTATE (or by
/// Diesel's own error kinds), never by message text, which the server translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transient {
    /// 40P01: PostgreSQL's deadlock detector cancelled us.
    Deadlock,
    /// 40001: a serializable (or repeatable read) transaction lost a conflict.
    SerializationFailure,
    /// 55P03: lock_timeout expired or NOWAIT found the row locked.
    LockNotAvailable,
    /// 53300: the server had no connection slot free. Retry after a backoff. It is
    /// reported when connecting, which the pool reports as `ConnectionLost`; reported
    /// on an open connection (say, re-raised by a function) that connection still works.
    TooManyConnections,
    /// The connection is gone, or the server says it is going (57P01 admin_shutdown,
    /// class 08 connection exception, or Diesel found it closed): only a new connection
    /// can retry.
    ConnectionLost,
}

impl Transient {
    /// The retry class of a SQLSTATE: the whole mapping, as a pure function.
    pub fn from_sqlstate(state: SqlState) -> Option<Transient> {
        match state.as_str() {
            "40001" => Some(Transient::SerializationFailure),
            "40P01" => Some(Transient::Deadlock),
            "55P03" => Some(Transient::LockNotAvailable),
            "53300" => Some(Transient::TooManyConnections),
            "57P01" => Some(Transient::ConnectionLost),
            _ if state.class() == SqlState::CONNECTION_EXCEPTION_CLASS => Some(Transient::ConnectionLost),
            _ => None,
        }
    }
}

/// Errors that can say whether the whole transaction is worth running again.
pub trait RetryClass {
    /// Why running the transaction again may succeed, or `None` when it would fail the
    /// same way.
    fn transient(&self) -> Option<Transient>;
}

impl RetryClass for DieselError {
    fn transient(&self) -> Option<Transient> {
        match self {
            // Diesel's own kinds first: a connection Diesel found closed is lost, whatever
            // the SQLSTATE of the error that came with it.
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => Some(Transient::ConnectionLost),
            DieselError::DatabaseError(DatabaseErrorKind::UnableToSendCommand, _) => Some(Transient::ConnectionLost),
            DieselError::BrokenTransactionManager => Some(Transient::ConnectionLost),
            DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => {
                Some(Transient::SerializationFailure)
            }
            // Everything else by its SQLSTATE (Diesel has no kind for 40P01 or 55P03).
            DieselError::DatabaseError(_, info) => sqlstate::sqlstate(info.as_ref()).and_then(Transient::from_sqlstate),
            _ => None,
        }
    }
}

impl RetryClass for LedgerError {
    fn transient(&self) -> Option<Transient> {
        match self {
            LedgerError::Database(e) => e.transient(),
            LedgerError::Pool(_) => Some(Transient::ConnectionLost),
            _ => None,
        }
    }
}

impl LedgerError {
    /// Whether running the transaction again, unchanged, may succeed (a deadlock, a
    /// serialization failure, a lock or connection timeout, a lost connection). The
    /// transaction runners in [`crate::tx`] already retry these.
    pub fn is_transient(&self) -> bool {
        self.transient().is_some()
    }

    /// The SQLSTATE of the server error behind this one (for `RetriesExhausted`, behind
    /// the last attempt's error), if there is one.
    pub fn sqlstate(&self) -> Option<SqlState> {
        match self {
            LedgerError::Database(e) => sqlstate::of_diesel_error(e),
            LedgerError::RetriesExhausted { last, .. } => last.sqlstate(),
            _ => None,
        }
    }

    /// A short machine-readable name, for job reasons, logs and JSON output.
    pub fn code(&self) -> &'static str {
        match self {
            LedgerError::Invalid(_) => "invalid_input",
            LedgerError::InsufficientFunds { .. } => "insufficient_funds",
            LedgerError::UnknownAccount(_) => "unknown_account",
            LedgerError::AccountClosed(_) => "account_closed",
            LedgerError::SystemAccount(_) => "system_account",
            LedgerError::CurrencyMismatch { .. } => "currency_mismatch",
            LedgerError::SameAccount(_) => "same_account",
            LedgerError::IdempotencyConflict { .. } => "idempotency_conflict",
            LedgerError::LinkedItemFailed { .. } => "linked_item_failed",
            LedgerError::LinkedChainOpen => "linked_chain_open",
            LedgerError::UnknownWithdrawal(_) => "unknown_withdrawal",
            LedgerError::UnknownTransfer(_) => "unknown_transfer",
            LedgerError::UnknownPayout(_) => "unknown_payout",
            LedgerError::PayoutState { .. } => "payout_state",
            LedgerError::UnknownHold(_) => "unknown_hold",
            LedgerError::HoldFinished { .. } => "hold_finished",
            LedgerError::PostExceedsHold { .. } => "post_exceeds_hold",
            LedgerError::HoldCurrencyMismatch { .. } => "hold_currency_mismatch",
            LedgerError::BalanceOverflow(_) => "balance_overflow",
            LedgerError::LockTimeout(_) => "lock_timeout",
            LedgerError::RetriesExhausted { .. } => "retries_exhausted",
            LedgerError::Inconsistent(_) => "inconsistent",
            LedgerError::Database(_) => "database",
            LedgerError::Pool(_) => "pool",
        }
    }

    /// True for refusals that are the customer's business outcome (the request was
    /// well-formed, the ledger said no), as opposed to infrastructure failures.
    pub fn is_business_rejection(&self) -> bool {
        matches!(
            self,
            LedgerError::InsufficientFunds { .. }
                | LedgerError::UnknownAccount(_)
                | LedgerError::AccountClosed(_)
                | LedgerError::SystemAccount(_)
                | LedgerError::CurrencyMismatch { .. }
                | LedgerError::SameAccount(_)
                | LedgerError::LinkedItemFailed { .. }
                | LedgerError::LinkedChainOpen
                | LedgerError::BalanceOverflow(_)
                | LedgerError::PostExceedsHold { .. }
                | LedgerError::HoldCurrencyMismatch { .. }
                | LedgerError::Invalid(_)
        )
    }
}

#[cfg(test)]
mod tests;
