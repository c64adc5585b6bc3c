//! How our types are stored: each status and kind column maps to a Rust enum, each id
//! column to its typed id, each currency column to [`Currency`], through Diesel's
//! `FromSql`/`ToSql`. A value the enum does not know is an error when it is read, never
//! a silent default.
//!
//! The enums are declared in their own rooms with `text_column!`, which writes their
//! `as_str`/`parse` pair from one table, so the text of a variant is written once.

use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::{BigInt, Text};

use crate::ids::{AccountId, EntryId, HoldId, PayoutId, WithdrawalId};
use crate::money::Currency;

/// Declares the text of each variant of a fieldless enum stored in a TEXT column:
/// `as_str`, `parse`, `ALL`, and the column mapping. The enum itself derives
/// `diesel::AsExpression` and `diesel::FromSqlRow` with `sql_type = Text`.
#[macro_export]
#[doc(hidden)]
macro_rules! text_column {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The text stored in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }

            /// The variant stored as `s`, if any.
            pub fn parse(s: &str) -> Option<$ty> {
                match s {
                    $($text => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::diesel::deserialize::FromSql<::diesel::sql_types::Text, ::diesel::pg::Pg> for $ty {
            fn from_sql(value: ::diesel::pg::PgValue<'_>) -> ::diesel::deserialize::Result<Self> {
                $crate::columns::text_from_sql(value, stringify!($ty), $ty::parse)
            }
        }

        impl ::diesel::serialize::ToSql<::diesel::sql_types::Text, ::diesel::pg::Pg> for $ty {
            fn to_sql<'b>(&'b self, out: &mut ::diesel::serialize::Output<'b, '_, ::diesel::pg::Pg>) -> ::diesel::serialize::Result {
                <str as ::diesel::serialize::ToSql<::diesel::sql_types::Text, ::diesel::pg::Pg>>::to_sql(self.as_str(), out)
            }
        }
    };
}

/// Reads a TEXT column into `T` with `parse`; an unknown value is an error naming the
/// type and the value (cut short), never a default.
#[doc(hidden)]
pub fn text_from_sql<T>(value: PgValue<'_>, what: &str, parse: fn(&str) -> Option<T>) -> deserialize::Result<T> {
    let text = <String as FromSql<Text, Pg>>::from_sql(value)?;
    parse(&text)
        .ok_or_else(|| format!("unknown {what} {:?} in the database", text.chars().take(40).collect::<String>()).into())
}

macro_rules! id_column {
    ($($ty:ident),+) => {$(
        impl FromSql<BigInt, Pg> for $ty {
            fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
                let id = <i64 as FromSql<BigInt, Pg>>::from_sql(value)?;
                Ok($ty::new(id)?)
            }
        }

        impl ToSql<BigInt, Pg> for $ty {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
                ToSql::<BigInt, Pg>::to_sql(self.as_i64_ref(), out)
            }
        }
    )+};
}

id_column!(AccountId, WithdrawalId, EntryId, PayoutId, HoldId);

impl FromSql<Text, Pg> for Currency {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        let code = <String as FromSql<Text, Pg>>::from_sql(value)?;
        Ok(Currency::from_code(&code)?)
    }
}

impl ToSql<Text, Pg> for Currency {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        <str as ToSql<Text, Pg>>::to_sql(self.code(), out)
    }
}
