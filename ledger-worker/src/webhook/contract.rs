//! The webhook contract, read strictly: paid only on a 2xx with `{"status": "accepted"}`,
//! refused only on a 4xx that is not 408/409/425/429, unknown otherwise.

use super::*;

/// The longest response body read. A longer one is not read further and the answer is
/// unknown: a bank (or a proxy in front of it) streaming without end can neither hold a
/// dispatcher nor fill its memory.
pub const MAX_RESPONSE_BODY: usize = 16 * 1024;

/// The longest excerpt of a response body quoted in a reason or an error.
pub(super) const QUOTED_BODY_CHARS: usize = 200;

/// An idempotency key the contract can carry: in a header and as one path segment.
pub(super) fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key == "." || key == ".." {
        return Err(format!("idempotency key {key:?} cannot name a payout: not sent"));
    }
    if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(format!("idempotency key {key:?} holds characters a header cannot carry: not sent"));
    }
    Ok(())
}

/// A short, single-line excerpt of a body for a reason or an error.
pub(super) fn quote(body: &str) -> String {
    let flat: String =
        body.trim().chars().map(|c| if c.is_control() { ' ' } else { c }).take(QUOTED_BODY_CHARS + 1).collect();
    if flat.chars().count() > QUOTED_BODY_CHARS {
        let cut: String = flat.chars().take(QUOTED_BODY_CHARS).collect();
        format!("{cut}…")
    } else if flat.is_empty() {
        "(empty body)".to_string()
    } else {
        flat
    }
}

/// The body as a JSON object, if it is one.
pub(super) fn object(body: &str) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// `"reference"`, if it is a string.
pub(super) fn reference_of(map: &serde_json::Map<String, Value>) -> Option<String> {
    map.get("reference").and_then(Value::as_str).map(str::to_string)
}

/// The answer to a payout's POST, read under the contract:
///
/// | answer | outcome |
/// |---|---|
/// | 2xx, body a JSON object with `"status": "accepted"` | Accepted (`"reference"` kept if a string) |
/// | any other 2xx (other status, not JSON, empty...) | Unknown |
/// | 401, 403 | Unauthorized |
/// | 408, 409, 425, 429 | Unknown |
/// | any other 4xx | Rejected (`HTTP <code>: <short body>`) |
/// | 1xx, 3xx, 5xx, anything else | Unknown |
pub fn read_send_answer(status: u16, body: &str) -> SendOutcome {
    match status {
        200..=299 => match object(body) {
            Some(map) if map.get("status").and_then(Value::as_str) == Some("accepted") => {
                SendOutcome::Accepted { reference: reference_of(&map) }
            }
            _ => SendOutcome::Unknown {
                error: format!("HTTP {status} without {{\"status\":\"accepted\"}}: {}", quote(body)),
            },
        },
        401 | 403 => SendOutcome::Unauthorized { error: format!("HTTP {status}: {}", quote(body)) },
        408 | 409 | 425 | 429 => SendOutcome::Unknown { error: format!("HTTP {status}: {}", quote(body)) },
        400..=499 => SendOutcome::Rejected { reason: format!("HTTP {status}: {}", quote(body)) },
        300..=399 => {
            SendOutcome::Unknown { error: format!("HTTP {status} (redirects are not followed): {}", quote(body)) }
        }
        _ => SendOutcome::Unknown { error: format!("HTTP {status}: {}", quote(body)) },
    }
}

/// The answer to a lookup (`GET <url>/<key>`), read under the contract:
///
/// | answer | outcome |
/// |---|---|
/// | 200, `{"status": "accepted", ...}` | Accepted (`"reference"` kept if a string) |
/// | 200, `{"status": "rejected", "reason": "<string>", ...}` | Rejected |
/// | 404, `{"status": "not_found", "idempotency_key": "<the key>", ...}` | NotFound: the gateway never received a call with this key |
/// | 404 with any other body | Unknown: a missing route (a mistyped URL, a proxy) is not a missing payout |
/// | 401, 403 | Unauthorized |
/// | anything else (other statuses or bodies, 3xx, ...) | Unknown |
pub fn read_lookup_answer(status: u16, body: &str, key: &str) -> LookupOutcome {
    match status {
        200 => {
            let Some(map) = object(body) else {
                return LookupOutcome::Unknown {
                    error: format!("HTTP 200 with a body that is not a JSON object: {}", quote(body)),
                };
            };
            match (map.get("status").and_then(Value::as_str), map.get("reason").and_then(Value::as_str)) {
                (Some("accepted"), _) => LookupOutcome::Accepted { reference: reference_of(&map) },
                (Some("rejected"), Some(reason)) => LookupOutcome::Rejected { reason: reason.to_string() },
                _ => LookupOutcome::Unknown {
                    error: format!("HTTP 200 that is neither accepted nor rejected with a reason: {}", quote(body)),
                },
            }
        }
        // Only an explicit answer about the key: a bare 404 from a mistyped URL or a proxy
        // that does not know the route must not be read as "never received", or a
        // payout that may have been paid would be refunded.
        404 => match object(body) {
            // ...and about this key: the answer names it back.
            Some(map)
                if map.get("status").and_then(Value::as_str) == Some("not_found")
                    && map.get("idempotency_key").and_then(Value::as_str) == Some(key) =>
            {
                LookupOutcome::NotFound
            }
            _ => LookupOutcome::Unknown {
                error: format!(
                    "HTTP 404 without {{\"status\":\"not_found\",\"idempotency_key\":<this key>}} (a missing route?): {}",
                    quote(body)
                ),
            },
        },
        401 | 403 => LookupOutcome::Unauthorized { error: format!("HTTP {status}: {}", quote(body)) },
        300..=399 => {
            LookupOutcome::Unknown { error: format!("HTTP {status} (redirects are not followed): {}", quote(body)) }
        }
        _ => LookupOutcome::Unknown { error: format!("HTTP {status}: {}", quote(body)) },
    }
}
