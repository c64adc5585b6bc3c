//! A hold's timeout: how long it may stay pending before the expiry loop voids it.
//! Built valid only ([`Timeout::from_ms`], [`Timeout::parse`]), with its invalid-input
//! tests below.

use std::fmt;

use crate::input::InvalidInput;

/// How long a hold may stay pending before the expiry loop voids it: from 1 ms to
/// [`Timeout::MAX_MS`] (366 days). The deadline itself is computed by the database when
/// the hold is written (`clock_timestamp()` plus the timeout), so the writers and the
/// expiry loop read one clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timeout {
    ms: u64,
}

/// The units [`Timeout::parse`] reads, largest first (the order `Display` picks from).
const UNITS: &[(&str, u64)] = &[("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

impl Timeout {
    /// The longest timeout: 366 days. A limit, so a typo cannot hold money for ages.
    pub const MAX_MS: u64 = 366 * 86_400_000;

    /// A timeout of `ms` milliseconds; 0 and more than [`Timeout::MAX_MS`] are refused.
    pub fn from_ms(ms: u64) -> Result<Timeout, InvalidInput> {
        if ms == 0 || ms > Timeout::MAX_MS {
            return Err(bad(format!("{ms} ms is not between 1 ms and 366 days")));
        }
        Ok(Timeout { ms })
    }

    /// Parses a whole number and a unit: `500ms`, `30s`, `5m`, `2h`, `7d`. No unit, a
    /// sign, a fraction, spaces, zero or more than 366 days are refused.
    pub fn parse(text: &str) -> Result<Timeout, InvalidInput> {
        let shown: String = text.chars().take(40).collect();
        let digits = text.bytes().take_while(u8::is_ascii_digit).count();
        let (number, unit) = text.split_at(digits);
        let Some((_, scale)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(bad(format!("{shown:?}: expected a whole number and a unit (ms, s, m, h, d), like 30s")));
        };
        if number.is_empty() || number.len() > 12 {
            return Err(bad(format!("{shown:?}: expected a whole number and a unit (ms, s, m, h, d), like 30s")));
        }
        let n: u64 = number.parse().map_err(|_| bad(format!("{shown:?} is not a number of {unit}")))?;
        let ms = n.checked_mul(*scale).ok_or_else(|| bad(format!("{shown:?} is longer than 366 days")))?;
        Timeout::from_ms(ms).map_err(|_| bad(format!("{shown:?} is not between 1 ms and 366 days")))
    }

    /// The timeout in milliseconds.
    pub fn as_ms(self) -> u64 {
        self.ms
    }
}

fn bad(reason: String) -> InvalidInput {
    InvalidInput::BadField { field: "timeout", reason }
}

/// The largest unit that divides it exactly: `30s`, `1500ms`, `2h`.
impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, scale) = UNITS.iter().find(|(_, scale)| self.ms % scale == 0).expect("ms divides everything");
        write!(f, "{}{name}", self.ms / scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_with_their_unit_and_print_back() {
        let table: &[(&str, u64, &str)] = &[
            ("500ms", 500, "500ms"),
            ("1500ms", 1_500, "1500ms"),
            ("2000ms", 2_000, "2s"),
            ("30s", 30_000, "30s"),
            ("90s", 90_000, "90s"),
            ("5m", 300_000, "5m"),
            ("2h", 7_200_000, "2h"),
            ("7d", 604_800_000, "7d"),
            ("366d", Timeout::MAX_MS, "366d"),
            ("1ms", 1, "1ms"),
        ];
        for (text, ms, shown) in table {
            let t = Timeout::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((t.as_ms(), t.to_string().as_str()), (*ms, *shown), "{text}");
        }
    }

    #[test]
    fn bad_timeouts_are_refused_as_the_timeout_field() {
        for text in [
            "",
            "30",
            "s",
            "0s",
            "0ms",
            "-5s",
            "+5s",
            "1.5s",
            " 5s",
            "5s ",
            "5 s",
            "5S",
            "5sec",
            "367d",
            "99999999999999d",
        ] {
            match Timeout::parse(text) {
                Err(InvalidInput::BadField { field: "timeout", .. }) => {}
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(Timeout::from_ms(0).is_err());
        assert!(Timeout::from_ms(Timeout::MAX_MS + 1).is_err());
        assert_eq!(Timeout::from_ms(Timeout::MAX_MS).unwrap().as_ms(), Timeout::MAX_MS);
    }
}
