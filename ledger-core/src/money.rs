//! Money as integers in minor units: `Currency` (ISO 4217 code and scale), `Amount`
//! (a positive number of minor units) and `Money` (an amount that knows its currency).
//! All three can only be built valid.
//!
//! Requests (deposits, transfers, withdrawals) take a [`Money`], so a request has one
//! currency, the one its amount was parsed in: `Money::parse("100", Currency::JPY)`
//! cannot be booked as 1.00 EUR. An account of another currency refuses it
//! (`LedgerError::CurrencyMismatch`), and so does arithmetic across currencies.

use std::fmt;
use std::str::FromStr;

use crate::input::InvalidInput;

/// The currencies the ledger holds, with their ISO 4217 minor-unit scale.
/// The `currencies` table is seeded with exactly this list (a test compares them).
pub const SUPPORTED_CURRENCIES: &[(&str, u8)] = &[
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PLN", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("TND", 3),
    ("USD", 2),
    ("ZAR", 2),
];

/// An ISO 4217 currency the ledger supports. Copyable, compared by code.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow,
)]
#[diesel(sql_type = diesel::sql_types::Text)]
pub struct Currency {
    code: [u8; 3],
    minor_units: u8,
}

impl Currency {
    /// Euro, 2 decimals.
    pub const EUR: Currency = Currency { code: *b"EUR", minor_units: 2 };
    /// US dollar, 2 decimals.
    pub const USD: Currency = Currency { code: *b"USD", minor_units: 2 };
    /// Pound sterling, 2 decimals.
    pub const GBP: Currency = Currency { code: *b"GBP", minor_units: 2 };
    /// Yen, no decimals.
    pub const JPY: Currency = Currency { code: *b"JPY", minor_units: 0 };
    /// Kuwaiti dinar, 3 decimals.
    pub const KWD: Currency = Currency { code: *b"KWD", minor_units: 3 };

    /// Looks up a currency by its three-letter code (upper case, as ISO 4217 writes it).
    pub fn from_code(code: &str) -> Result<Currency, InvalidInput> {
        SUPPORTED_CURRENCIES
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(c, units)| {
                let b = c.as_bytes();
                Currency { code: [b[0], b[1], b[2]], minor_units: *units }
            })
            .ok_or_else(|| InvalidInput::UnknownCurrency(code.chars().take(16).collect()))
    }

    /// The three-letter ISO 4217 code, e.g. `"EUR"`: what the database stores.
    pub fn code(&self) -> &str {
        // The code bytes come from SUPPORTED_CURRENCIES, which is ASCII.
        std::str::from_utf8(&self.code).expect("currency codes are ASCII")
    }

    /// Digits after the decimal point (2 for EUR, 0 for JPY, 3 for KWD).
    pub fn minor_units(&self) -> u8 {
        self.minor_units
    }

    fn scale(&self) -> i64 {
        10_i64.pow(u32::from(self.minor_units))
    }

    /// Formats a signed number of minor units as a decimal string, e.g. `-12.50`.
    pub fn format_minor(&self, minor: i64) -> String {
        let scale = self.scale();
        let sign = if minor < 0 { "-" } else { "" };
        let abs = minor.unsigned_abs();
        if self.minor_units == 0 {
            return format!("{sign}{abs}");
        }
        let scale = scale as u64;
        format!("{sign}{}.{:0width$}", abs / scale, abs % scale, width = usize::from(self.minor_units))
    }
}

impl FromStr for Currency {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::from_code(s)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A strictly positive amount of money in minor units (cents for EUR). The currency
/// travels beside it (on the account); an `Amount` alone is just a count of minor units.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Amount(i64);

impl Amount {
    /// Builds an amount from minor units; zero and negative values are refused.
    pub fn from_minor(minor: i64) -> Result<Amount, InvalidInput> {
        if minor <= 0 {
            return Err(InvalidInput::NonPositiveAmount(minor.to_string()));
        }
        Ok(Amount(minor))
    }

    /// Parses a decimal string in `currency`'s scale exactly: `"50.00"`, `"50.5"` and
    /// `"50"` are fine in EUR; `"50.001"` is over-precise; signs, exponents, spaces,
    /// thousands separators and values beyond i64 minor units are refused.
    pub fn parse(text: &str, currency: Currency) -> Result<Amount, InvalidInput> {
        let bad = || InvalidInput::MalformedAmount(text.chars().take(40).collect());
        if text.is_empty() || text.len() > 40 {
            return Err(bad());
        }
        if text.starts_with('-') {
            return Err(InvalidInput::NonPositiveAmount(text.chars().take(40).collect()));
        }
        let (whole, frac) = match text.split_once('.') {
            Some((w, f)) => (w, Some(f)),
            None => (text, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(whole) {
            return Err(bad());
        }
        let frac = match frac {
            None => "",
            Some(f) if all_digits(f) => f,
            Some(_) => return Err(bad()),
        };
        if frac.len() > usize::from(currency.minor_units) {
            return Err(InvalidInput::OverPreciseAmount {
                amount: text.to_string(),
                currency: currency.code().to_string(),
                minor_units: currency.minor_units,
            });
        }
        let overflow = || InvalidInput::AmountOverflow(text.chars().take(40).collect());
        let whole_minor =
            whole.parse::<i64>().map_err(|_| overflow())?.checked_mul(currency.scale()).ok_or_else(overflow)?;
        let mut frac_minor: i64 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| bad())? };
        for _ in frac.len()..usize::from(currency.minor_units) {
            frac_minor *= 10;
        }
        let minor = whole_minor.checked_add(frac_minor).ok_or_else(overflow)?;
        Amount::from_minor(minor).map_err(|_| InvalidInput::NonPositiveAmount(text.to_string()))
    }

    /// The number of minor units, always positive.
    pub fn minor(self) -> i64 {
        self.0
    }

    /// The sum, or `None` if it leaves `i64` minor units.
    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }

    /// `self - other`, only when the result is still a positive amount.
    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0.checked_sub(other.0).filter(|m| *m > 0).map(Amount)
    }

    /// The amount as a decimal string in `currency`'s scale, e.g. `"12.50"`.
    pub fn format(self, currency: Currency) -> String {
        currency.format_minor(self.0)
    }
}

/// A strictly positive amount in one currency: what every request carries. The amount's
/// scale is the currency's, so the two cannot disagree.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Money {
    amount: Amount,
    currency: Currency,
}

/// Two amounts of different currencies were combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot combine {left} with {right}: different currencies")]
pub struct CurrencyMix {
    /// The currency of the value the method was called on.
    pub left: Currency,
    /// The currency of the argument.
    pub right: Currency,
}

impl Money {
    /// `amount` in `currency`.
    pub fn new(amount: Amount, currency: Currency) -> Money {
        Money { amount, currency }
    }

    /// Minor units in `currency`; zero and negative values are refused.
    pub fn from_minor(minor: i64, currency: Currency) -> Result<Money, InvalidInput> {
        Ok(Money { amount: Amount::from_minor(minor)?, currency })
    }

    /// A decimal string in `currency`'s scale, exactly as [`Amount::parse`] reads it.
    pub fn parse(text: &str, currency: Currency) -> Result<Money, InvalidInput> {
        Ok(Money { amount: Amount::parse(text, currency)?, currency })
    }

    /// A decimal string with an optional currency code after it (`"12.50"` or
    /// `"12.50 EUR"`), for input where the currency is known from elsewhere (the
    /// account): a code that names another currency is refused, never converted.
    pub fn parse_for(text: &str, expected: Currency) -> Result<Money, InvalidInput> {
        let (number, code) = match text.split_once(' ') {
            Some((number, code)) => (number, Some(code)),
            None => (text, None),
        };
        if let Some(code) = code {
            let named = Currency::from_code(code)?;
            if named != expected {
                return Err(InvalidInput::BadField {
                    field: "amount",
                    reason: format!("{text:?} is in {named}, but the account holds {expected}"),
                });
            }
        }
        Money::parse(number, expected)
    }

    /// The amount without its currency.
    pub fn amount(self) -> Amount {
        self.amount
    }

    /// The currency, whose scale the amount is in.
    pub fn currency(self) -> Currency {
        self.currency
    }

    /// The number of minor units of [`Money::currency`], always positive.
    pub fn minor(self) -> i64 {
        self.amount.minor()
    }

    /// The sum, refused across currencies and on overflow (`Ok(None)`).
    pub fn checked_add(self, other: Money) -> Result<Option<Money>, CurrencyMix> {
        self.same_currency(other)?;
        Ok(self.amount.checked_add(other.amount).map(|amount| Money { amount, currency: self.currency }))
    }

    /// The difference while still positive (`Ok(None)` otherwise), refused across
    /// currencies.
    pub fn checked_sub(self, other: Money) -> Result<Option<Money>, CurrencyMix> {
        self.same_currency(other)?;
        Ok(self.amount.checked_sub(other.amount).map(|amount| Money { amount, currency: self.currency }))
    }

    fn same_currency(self, other: Money) -> Result<(), CurrencyMix> {
        if self.currency != other.currency {
            return Err(CurrencyMix { left: self.currency, right: other.currency });
        }
        Ok(())
    }
}

/// `12.50 EUR`.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount.format(self.currency), self.currency)
    }
}

/// Applies a signed change to a balance, refusing overflow instead of wrapping.
pub fn checked_balance(balance_minor: i64, delta_minor: i64) -> Result<i64, InvalidInput> {
    balance_minor
        .checked_add(delta_minor)
        .ok_or_else(|| InvalidInput::AmountOverflow(format!("{balance_minor} + {delta_minor}")))
}

#[cfg(test)]
mod tests;
