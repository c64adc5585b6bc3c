//! Bad input, refused before anything touches the database: the error of every parse at
//! the edge (amounts, currencies, ids, keys). Its own room, below both the ids that are
//! parsed and the crate's error type that wraps it.

/// Input that cannot be turned into a valid domain value. Nothing touched the database.
/// Sending the same input again fails the same way: the caller must correct it.
///
/// The text a variant carries is the offending input, cut short (to 40 characters for
/// most) so that an error message stays bounded whatever was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// An amount of zero or less (amounts are strictly positive; the direction of a
    /// movement is the operation's, never the sign's).
    #[error("amount must be positive, got {0:?}")]
    NonPositiveAmount(String),
    /// Not a plain decimal: empty, longer than 40 characters, or with anything but
    /// digits and one `.` (no sign, exponent, spaces or thousands separators).
    #[error("malformed amount {0:?}: expected a decimal like 50.00")]
    MalformedAmount(String),
    /// More decimals than the currency has minor units (`"1.005"` EUR, `"1.5"` JPY).
    #[error("amount {amount:?} has more decimals than {currency} allows ({minor_units})")]
    OverPreciseAmount {
        /// The amount as sent.
        amount: String,
        /// The currency's ISO 4217 code.
        currency: String,
        /// The currency's decimals (2 for EUR, 0 for JPY).
        minor_units: u8,
    },
    /// An amount, or a balance it would produce, beyond `i64` minor units.
    #[error("amount {0:?} is too large")]
    AmountOverflow(String),
    /// Not the upper-case ISO 4217 code of a currency in
    /// [`crate::money::SUPPORTED_CURRENCIES`].
    #[error("unknown currency {0:?}: expected an upper-case ISO 4217 code the ledger supports")]
    UnknownCurrency(String),
    /// An id that is not a positive integer.
    #[error("invalid {kind} {value}: ids are positive integers")]
    BadId {
        /// The id's type, e.g. `"AccountId"`.
        kind: &'static str,
        /// The value given; 0 when the text was not an integer at all.
        value: i64,
    },
    /// An idempotency key that is empty, longer than
    /// [`crate::IdempotencyKey::MAX_LEN`] bytes, or not all printable ASCII.
    #[error("invalid idempotency key {0:?}: 1 to 128 printable ASCII characters, no spaces")]
    BadIdempotencyKey(String),
    /// Any other field out of its bounds: a limit, a batch's size, metadata, a lock
    /// name, a time, an amount that names another currency than the account's.
    #[error("invalid {field}: {reason}")]
    BadField {
        /// The field, e.g. `"limit"` or `"metadata"`.
        field: &'static str,
        /// What is wrong with it, for a person to read.
        reason: String,
    },
}

/// A listing's `limit`, refused unless at least 1 (every list and page function checks
/// it first, so a bad limit is a typed error before any query, never a panic or an
/// empty answer that looks like "no rows").
pub fn positive_limit(limit: i64) -> Result<i64, InvalidInput> {
    if limit < 1 {
        return Err(InvalidInput::BadField { field: "limit", reason: format!("must be at least 1, got {limit}") });
    }
    Ok(limit)
}
