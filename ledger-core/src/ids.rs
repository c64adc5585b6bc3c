//! Typed identifiers, so an account id can never be passed where a withdrawal id is
//! expected, and the caller-supplied idempotency key, which can only be built valid.

use std::fmt;

use crate::input::InvalidInput;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow)]
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        pub struct $name(i64);

        impl $name {
            /// Wraps a database id. Ids are positive; anything else cannot name a row.
            pub fn new(id: i64) -> Result<Self, InvalidInput> {
                if id <= 0 {
                    return Err(InvalidInput::BadId { kind: stringify!($name), value: id });
                }
                Ok($name(id))
            }

            /// For ids read back from the database, which are positive by construction.
            pub(crate) fn from_db(id: i64) -> Self {
                debug_assert!(id > 0, "database ids are positive");
                $name(id)
            }

            /// The database id, always positive.
            pub fn get(self) -> i64 {
                self.0
            }

            /// For the column mapping (`columns.rs`), which writes from a reference.
            pub(crate) fn as_i64_ref(&self) -> &i64 {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidInput;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let id = s.parse::<i64>().map_err(|_| InvalidInput::BadId {
                    kind: stringify!($name),
                    value: 0,
                })?;
                $name::new(id)
            }
        }
    };
}

id_type!(
    /// An account (customer or system).
    AccountId
);
id_type!(
    /// A withdrawal request, which is also the worker's job.
    WithdrawalId
);
id_type!(
    /// A journal entry: one balanced movement of money.
    EntryId
);
id_type!(
    /// A payout outbox row.
    PayoutId
);
id_type!(
    /// A hold: a two-phase transfer, pending until posted, voided or expired.
    HoldId
);

/// A caller-supplied idempotency key: 1 to 128 printable ASCII characters, no spaces.
///
/// Keys share one namespace across operations: a key names one request (a deposit, a
/// transfer, a withdrawal, an account opening) forever. Sending that request again
/// replays its first answer; any other request under the key is
/// [`crate::LedgerError::IdempotencyConflict`].
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The longest key, in bytes (each a printable ASCII character).
    pub const MAX_LEN: usize = 128;

    /// Checks `key`: refused with [`InvalidInput::BadIdempotencyKey`] if empty, longer
    /// than [`IdempotencyKey::MAX_LEN`], or holding anything but printable ASCII (no
    /// spaces, no control characters).
    pub fn new(key: impl Into<String>) -> Result<IdempotencyKey, InvalidInput> {
        let key = key.into();
        let printable = key.bytes().all(|b| b.is_ascii_graphic());
        if key.is_empty() || key.len() > Self::MAX_LEN || !printable {
            let shown: String = key.chars().take(40).collect();
            return Err(InvalidInput::BadIdempotencyKey(shown));
        }
        Ok(IdempotencyKey(key))
    }

    /// The key as the caller gave it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_positive() {
        assert!(AccountId::new(0).is_err());
        assert!(AccountId::new(-3).is_err());
        assert_eq!(AccountId::new(7).unwrap().get(), 7);
        assert!("abc".parse::<WithdrawalId>().is_err());
        assert_eq!("12".parse::<WithdrawalId>().unwrap().get(), 12);
    }

    #[test]
    fn idempotency_keys_are_short_printable_and_non_empty() {
        assert!(IdempotencyKey::new("k-1").is_ok());
        assert!(IdempotencyKey::new("x".repeat(128)).is_ok());
        for bad in [String::new(), "x".repeat(129), "has space".into(), "tab\t".into(), "é".into()] {
            assert!(IdempotencyKey::new(bad.clone()).is_err(), "{bad:?} was accepted");
        }
    }
}
