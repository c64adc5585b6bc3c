//! Bad input, refused before anything touches the database: the error of every parse at
//! the edge (amounts, currencies, ids, keys). Its own room, below both the ids that are
//! parsed and the crate's error type that wraps it.

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
