//! The external bank account a withdrawal pays: an IBAN, checked before anything is written.

use crate::error::InvalidInput;

/// An IBAN, checked for shape and its ISO 7064 mod-97 check digits. Spaces are removed
/// and letters upper-cased, so "de89 3704 ..." and "DE893704..." are the same account.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Iban(String);

impl Iban {
    /// Checks length, country code and the mod-97 check digits; refuses with which part
    /// is wrong.
    pub fn parse(text: &str) -> Result<Iban, InvalidInput> {
        let bad = |reason: &str| InvalidInput::BadField { field: "IBAN", reason: reason.to_string() };
        let compact: String = text.chars().filter(|c| *c != ' ').collect::<String>().to_ascii_uppercase();
        if !(15..=34).contains(&compact.len()) {
            return Err(bad("expected 15 to 34 letters and digits"));
        }
        let b = compact.as_bytes();
        if !b[..2].iter().all(u8::is_ascii_uppercase) || !b[2..4].iter().all(u8::is_ascii_digit) {
            return Err(bad("expected a country code and two check digits, like DE89..."));
        }
        if !b.iter().all(u8::is_ascii_alphanumeric) {
            return Err(bad("only letters and digits are allowed"));
        }
        // Move the first four characters to the end, letters become 10..35, mod 97 == 1.
        let remainder = b[4..].iter().chain(&b[..4]).fold(0_u32, |acc, &c| {
            if c.is_ascii_digit() {
                (acc * 10 + u32::from(c - b'0')) % 97
            } else {
                (acc * 100 + u32::from(c - b'A' + 10)) % 97
            }
        });
        if remainder != 1 {
            return Err(bad("check digits do not match"));
        }
        Ok(Iban(compact))
    }

    /// The normalized form: no spaces, upper case.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
