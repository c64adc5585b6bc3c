//! The crate's error types. Operating errors (insufficient funds, unknown account) are
//! values the caller handles; transient database errors say so via `is_transient`.

use diesel::result::{DatabaseErrorKind, Error as DieselError};

use crate::ids::{AccountId, WithdrawalId};

/// Input that cannot be turned into a valid domain value. Nothing touched the database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("amount must be positive, got {0:?}")]
    NonPositiveAmount(String),
    #[error("malformed amount {0:?}: expected a decimal like 50.00")]
    MalformedAmount(String),
    #[error("amount {amount:?} has more decimals than {currency} allows ({minor_units})")]
    OverPreciseAmount { amount: String, currency: String, minor_units: u8 },
    #[error("amount {0:?} is too large")]
    AmountOverflow(String),
    #[error("unknown currency {0:?}: expected an upper-case ISO 4217 code the ledger supports")]
    UnknownCurrency(String),
    #[error("invalid {kind} {value}: ids are positive integers")]
    BadId { kind: &'static str, value: i64 },
    #[error("invalid idempotency key {0:?}: 1 to 128 printable ASCII characters, no spaces")]
    BadIdempotencyKey(String),
    #[error("invalid {field}: {reason}")]
    BadField { field: &'static str, reason: String },
}

/// Everything a ledger operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("insufficient funds in account {account}: balance {balance_minor}, floor {floor_minor}, requested {requested_minor} (minor units)")]
    InsufficientFunds { account: AccountId, balance_minor: i64, floor_minor: i64, requested_minor: i64 },
    #[error("unknown account {0}")]
    UnknownAccount(AccountId),
    #[error("account {0} is closed")]
    AccountClosed(AccountId),
    #[error("account {0} is a system account and cannot be used here")]
    SystemAccount(AccountId),
    #[error("currency mismatch: account {account} holds {account_currency}, request is in {request_currency}")]
    CurrencyMismatch { account: AccountId, account_currency: String, request_currency: String },
    #[error("a transfer needs two different accounts, got {0} twice")]
    SameAccount(AccountId),
    #[error("idempotency key {key:?} was already used for a different request ({operation})")]
    IdempotencyConflict { key: String, operation: String },
    #[error("unknown withdrawal {0}")]
    UnknownWithdrawal(WithdrawalId),
    #[error("balance overflow on account {0}")]
    BalanceOverflow(AccountId),
    #[error("lock on {0:?} not acquired before the timeout")]
    LockTimeout(String),
    #[error("gave up after {attempts} attempts: {last}")]
    RetriesExhausted { attempts: u32, last: Box<LedgerError> },
    #[error("database error: {0}")]
    Database(#[from] DieselError),
    #[error("connection pool error: {0}")]
    Pool(String),
}

impl From<r2d2::Error> for LedgerError {
    fn from(e: r2d2::Error) -> Self {
        LedgerError::Pool(e.to_string())
    }
}

/// Why a database error is worth retrying, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transient {
    /// 40P01: PostgreSQL's deadlock detector cancelled us.
    Deadlock,
    /// 40001: a serializable (or repeatable read) transaction lost a conflict.
    SerializationFailure,
    /// 55P03: lock_timeout expired or NOWAIT found the row locked.
    LockNotAvailable,
    /// The connection is gone; only a new connection can retry.
    ConnectionLost,
}

/// Errors that can say whether the whole transaction is worth running again.
pub trait RetryClass {
    fn transient(&self) -> Option<Transient>;
}

impl RetryClass for DieselError {
    fn transient(&self) -> Option<Transient> {
        match self {
            DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => {
                Some(Transient::SerializationFailure)
            }
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => Some(Transient::ConnectionLost),
            DieselError::DatabaseError(DatabaseErrorKind::UnableToSendCommand, _) => Some(Transient::ConnectionLost),
            DieselError::BrokenTransactionManager => Some(Transient::ConnectionLost),
            // Diesel maps neither 40P01 nor 55P03 to a kind of its own and does not expose
            // the SQLSTATE, so these are recognised by PostgreSQL's primary message. That is
            // exact with lc_messages = C or English (the throwaway clusters use C); on a
            // server with translated messages they are reported as plain database errors.
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, info) => {
                let message = info.message();
                if message.starts_with("deadlock detected") {
                    Some(Transient::Deadlock)
                } else if message.starts_with("canceling statement due to lock timeout")
                    || message.starts_with("could not obtain lock")
                {
                    Some(Transient::LockNotAvailable)
                } else if message.starts_with("terminating connection")
                    || message.starts_with("server closed the connection")
                    || message.contains("no connection to the server")
                {
                    Some(Transient::ConnectionLost)
                } else {
                    None
                }
            }
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
    pub fn is_transient(&self) -> bool {
        self.transient().is_some()
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
            LedgerError::UnknownWithdrawal(_) => "unknown_withdrawal",
            LedgerError::BalanceOverflow(_) => "balance_overflow",
            LedgerError::LockTimeout(_) => "lock_timeout",
            LedgerError::RetriesExhausted { .. } => "retries_exhausted",
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
                | LedgerError::BalanceOverflow(_)
                | LedgerError::Invalid(_)
        )
    }
}
