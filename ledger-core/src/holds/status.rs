//! A hold's status, as stored: a value with no dependencies, so errors can name it.

/// Where a hold is in its life.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow,
)]
#[diesel(sql_type = diesel::sql_types::Text)]
pub enum HoldStatus {
    /// Held: the amount sits in holds-pending, to be posted, voided or expired.
    Pending,
    /// Posted: `posted_minor` went to the payee, the rest back to the payer.
    Posted,
    /// Voided by a caller: all back to the payer.
    Voided,
    /// Voided by the expiry loop after its timeout: all back to the payer.
    Expired,
}

crate::text_column!(HoldStatus {
    Pending => "pending",
    Posted => "posted",
    Voided => "voided",
    Expired => "expired",
});
