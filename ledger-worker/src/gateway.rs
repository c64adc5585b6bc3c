//! The log gateway (settles every payout without paying anyone: for demos, tests and
//! trying the ledger out) and helpers shared by gateways. The real one is
//! [`crate::webhook`]; embedding services can implement
//! `ledger_core::payouts::PayoutGateway` themselves.

use ledger_core::payouts::{LookupOutcome, PayoutGateway, PayoutRequest, SendOutcome};
use tracing::info;

/// Shows only the country, check digits and last four characters of an IBAN in logs.
pub fn mask_iban(iban: &str) -> String {
    if iban.len() <= 8 {
        return "****".into();
    }
    format!("{}…{}", &iban[..4], &iban[iban.len() - 4..])
}

/// Accepts every payout and logs it. The reference it returns is derived from the
/// idempotency key, so a repeated call answers the same.
pub struct LogGateway;

impl PayoutGateway for LogGateway {
    fn send(&self, r: &PayoutRequest) -> SendOutcome {
        info!(
            payout = r.payout.get(),
            withdrawal = r.withdrawal.get(),
            amount = %r.amount,
            currency = %r.currency,
            to = %mask_iban(&r.destination),
            key = %r.idempotency_key,
            attempt = r.attempt,
            "payout sent (log gateway)"
        );
        SendOutcome::Accepted { reference: Some(format!("log:{}", r.idempotency_key)) }
    }

    /// The log gateway keeps no record: as far as it knows nothing was ever received,
    /// so a payout whose first call's outcome was lost is simply sent (logged) again.
    fn lookup(&self, _: &PayoutRequest) -> LookupOutcome {
        LookupOutcome::NotFound
    }
}

/// A gateway that can answer no lookup: a return needing one is refused.
pub struct NoLookup;

impl PayoutGateway for NoLookup {
    fn send(&self, _: &PayoutRequest) -> SendOutcome {
        SendOutcome::Unknown { error: "no gateway configured".into() }
    }
    fn lookup(&self, _: &PayoutRequest) -> LookupOutcome {
        LookupOutcome::Unknown { error: "no --payout-webhook was given to look it up at".into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ibans_are_masked_in_logs() {
        assert_eq!(mask_iban("DE89370400440532013000"), "DE89…3000");
        assert_eq!(mask_iban("short"), "****");
    }
}
