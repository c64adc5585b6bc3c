//! Payout gateways: `log` (accepts and records; for demos and tests) and `webhook`
//! (POSTs JSON with an `Idempotency-Key` header). Embedding services can implement
//! `ledger_core::payouts::PayoutGateway` themselves.

use std::time::Duration;

use ledger_core::payouts::{LookupOutcome, PayoutGateway, PayoutRequest, SendOutcome};
use serde_json::json;
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
        LookupOutcome::Unknown { error: "no gateway configured for lookups".into() }
    }
}

/// POSTs each payout as JSON to a URL. 2xx: accepted. 408, 409, 425, 429 and 5xx, a
/// timeout or a connection error: transient. Any other 4xx: final rejection. The
/// `Idempotency-Key` header carries the payout's key.
pub struct WebhookGateway {
    agent: ureq::Agent,
    url: String,
}

impl WebhookGateway {
    pub fn new(url: &str, connect_timeout: Duration, timeout: Duration) -> Result<WebhookGateway, String> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("--payout-webhook must be an http:// or https:// URL, got {url:?}"));
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(connect_timeout)
            .timeout(timeout)
            .redirects(0)
            .user_agent(concat!("ledger-worker/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(WebhookGateway { agent, url: url.to_string() })
    }
}

/// Longest response body read back, for the reason of a rejection.
const MAX_BODY: u64 = 2_048;

fn body_of(response: ureq::Response) -> String {
    use std::io::Read;
    let mut body = String::new();
    let _ = response.into_reader().take(MAX_BODY).read_to_string(&mut body);
    body.trim().chars().take(300).collect()
}

impl PayoutGateway for WebhookGateway {
    fn lookup(&self, _: &PayoutRequest) -> LookupOutcome {
        LookupOutcome::Unknown { error: "lookups are not implemented by this gateway".into() }
    }

    fn send(&self, r: &PayoutRequest) -> SendOutcome {
        let payload = json!({
            "payout_id": r.payout.get(),
            "withdrawal_id": r.withdrawal.get(),
            "amount": r.amount,
            "amount_minor": r.amount_minor,
            "currency": r.currency,
            "destination": r.destination,
            "idempotency_key": r.idempotency_key,
        });
        let result = self
            .agent
            .post(&self.url)
            .set("Idempotency-Key", &r.idempotency_key)
            .set("Content-Type", "application/json")
            .send_string(&payload.to_string());
        match result {
            Ok(response) => {
                let body = body_of(response);
                let reference = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("reference").and_then(|x| x.as_str()).map(str::to_string));
                SendOutcome::Accepted { reference }
            }
            Err(ureq::Error::Status(code, response)) => {
                let body = body_of(response);
                if matches!(code, 408 | 409 | 425 | 429) || code >= 500 {
                    SendOutcome::Unknown { error: format!("HTTP {code}: {body}") }
                } else {
                    SendOutcome::Rejected { reason: format!("HTTP {code}: {body}") }
                }
            }
            Err(ureq::Error::Transport(t)) => SendOutcome::Unknown { error: format!("transport: {t}") },
        }
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

    #[test]
    fn webhook_urls_must_be_http() {
        assert!(WebhookGateway::new("ftp://x", Duration::from_secs(1), Duration::from_secs(1)).is_err());
        assert!(WebhookGateway::new("http://127.0.0.1:9/x", Duration::from_secs(1), Duration::from_secs(1)).is_ok());
    }
}
