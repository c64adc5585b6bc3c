//! An account's holds, as payer or payee, oldest first, paged by an id cursor.

use diesel::pg::PgConnection;

use crate::error::LedgerError;
use crate::ids::{AccountId, HoldId};

use super::{store, Hold, HoldStatus};

/// Which holds [`list`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldQuery {
    /// The account, as payer or payee.
    pub account: AccountId,
    /// Only holds in this status; `None`: all.
    pub status: Option<HoldStatus>,
    /// The cursor: only holds with a greater id (`None`: from the first). Pass the last
    /// hold of a page to get the next.
    pub after: Option<HoldId>,
    /// The most holds answered (1 to [`MAX_HOLD_PAGE`]).
    pub limit: i64,
}

/// The most holds one [`list`] call answers.
pub const MAX_HOLD_PAGE: i64 = 1_000;

/// Up to `query.limit` holds of `query.account` (as payer or payee) after the cursor,
/// in ascending id order. Fewer than `limit` means there are no more. One statement on
/// the `(payer_id, id)` and `(payee_id, id)` indexes; an unknown account is
/// [`LedgerError::UnknownAccount`], a bad limit a typed error before any query.
pub fn list(conn: &mut PgConnection, query: &HoldQuery) -> Result<Vec<Hold>, LedgerError> {
    let limit = crate::input::positive_limit(query.limit)?;
    if limit > MAX_HOLD_PAGE {
        return Err(crate::error::InvalidInput::BadField {
            field: "limit",
            reason: format!("at most {MAX_HOLD_PAGE}, got {limit}"),
        }
        .into());
    }
    // An unknown account is an error, not an empty page that looks like "no holds".
    crate::accounts::get(conn, query.account)?;
    store::list(conn, query.account, query.status, query.after, limit)
}
