//! Overdraft ceilings: the highest overdraft limit an account of a currency may be
//! given (issue 12 item 6), set at migrate or by configuration.

use diesel::pg::PgConnection;
use diesel::prelude::*;

use crate::error::{InvalidInput, LedgerError};
use crate::money::Currency;

/// The highest overdraft limit an account in `currency` may be given, in minor units
/// (by default 1,000,000 units of the currency; see [`set_overdraft_ceiling`]).
pub fn overdraft_ceiling(conn: &mut PgConnection, currency: Currency) -> Result<i64, LedgerError> {
    use crate::schema::currencies;
    Ok(currencies::table.find(currency.code()).select(currencies::max_overdraft_minor).first(conn)?)
}

/// Sets the overdraft ceiling of `currency` (0: no overdrafts). It applies to limits
/// written from now on: accounts opened before keep theirs.
pub fn set_overdraft_ceiling(
    conn: &mut PgConnection,
    currency: Currency,
    ceiling_minor: i64,
) -> Result<(), LedgerError> {
    use crate::schema::currencies;
    if ceiling_minor < 0 {
        return Err(LedgerError::Invalid(InvalidInput::BadField {
            field: "overdraft ceiling",
            reason: "must not be negative".into(),
        }));
    }
    let updated = diesel::update(currencies::table.find(currency.code()))
        .set(currencies::max_overdraft_minor.eq(ceiling_minor))
        .execute(conn)?;
    assert_eq!(updated, 1, "every supported currency has a row (a test keeps the two lists equal)");
    Ok(())
}
