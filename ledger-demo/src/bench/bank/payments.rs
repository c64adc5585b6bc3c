//! What the bank does with a request: checks the token and the signature, pays each key
//! once, and answers lookups.

use super::*;

/// Signatures further than this from the bank's clock are refused.
pub(super) const MAX_SIGNATURE_AGE_S: u64 = 300;

pub(super) fn handle(request: &Request, shared: &Shared) -> (u16, String) {
    if !authentic(request, shared) {
        shared.auth_failures.fetch_add(1, Ordering::Relaxed);
        return (401, json!({ "error": "unauthorized" }).to_string());
    }
    if !shared.delay.is_zero() {
        thread::sleep(shared.delay);
    }
    let lookup_prefix = format!("{BASE_PATH}/");
    match request.method.as_str() {
        "POST" if request.path == BASE_PATH => pay(request, shared),
        "GET" if request.path.starts_with(&lookup_prefix) => {
            shared.lookups.fetch_add(1, Ordering::Relaxed);
            let Some(key) = percent_decode(&request.path[lookup_prefix.len()..]) else {
                shared.bad_requests.fetch_add(1, Ordering::Relaxed);
                return (400, json!({ "error": "bad key encoding" }).to_string());
            };
            match shared.paid().get(&key) {
                Some(p) => (200, json!({ "status": "accepted", "reference": p.reference }).to_string()),
                None => (404, json!({ "status": "not_found", "idempotency_key": key }).to_string()),
            }
        }
        _ => {
            shared.bad_requests.fetch_add(1, Ordering::Relaxed);
            (404, json!({ "error": "not found" }).to_string())
        }
    }
}

pub(super) fn pay(request: &Request, shared: &Shared) -> (u16, String) {
    shared.posts.fetch_add(1, Ordering::Relaxed);
    let bad = |why: &str| {
        shared.bad_requests.fetch_add(1, Ordering::Relaxed);
        (400, json!({ "error": why }).to_string())
    };
    let Some(key) = request.header("idempotency-key").filter(|k| !k.is_empty()) else {
        return bad("no Idempotency-Key header");
    };
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return bad("the body is not JSON");
    };
    let (Some(body_key), Some(withdrawal_id), Some(amount_minor)) = (
        body.get("idempotency_key").and_then(Value::as_str),
        body.get("withdrawal_id").and_then(Value::as_i64),
        body.get("amount_minor").and_then(Value::as_i64),
    ) else {
        return bad("the body lacks idempotency_key, withdrawal_id or amount_minor");
    };
    if body_key != key || amount_minor <= 0 {
        return bad("the body's idempotency_key differs from the header, or the amount is not positive");
    }
    let mut paid = shared.paid();
    let next = paid.len() + 1;
    match paid.get(key) {
        Some(p) if p.withdrawal_id != withdrawal_id || p.amount_minor != amount_minor => {
            drop(paid);
            shared.bad_requests.fetch_add(1, Ordering::Relaxed);
            (409, json!({ "error": "idempotency key reused for a different payout" }).to_string())
        }
        Some(p) => {
            shared.replays.fetch_add(1, Ordering::Relaxed);
            (200, json!({ "status": "accepted", "reference": p.reference }).to_string())
        }
        None => {
            let reference = format!("bench-bank-{next}");
            paid.insert(key.to_string(), Paid { reference: reference.clone(), withdrawal_id, amount_minor });
            (200, json!({ "status": "accepted", "reference": reference }).to_string())
        }
    }
}

/// `Authorization: Bearer <token>` and a fresh, valid `Ledger-Signature` over the body.
pub(super) fn authentic(request: &Request, shared: &Shared) -> bool {
    let token_ok = request
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.as_bytes(), shared.token.as_bytes()));
    let Some(signature) = request.header(&ledger_worker::webhook::SIGNATURE_HEADER.to_ascii_lowercase()) else {
        return false;
    };
    let (mut t, mut v1) = (None, None);
    for part in signature.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = Some(value),
            Some(("v1", value)) => v1 = hex_decode(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(seconds) = t.parse::<u64>() else {
        return false;
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if now.abs_diff(seconds) > MAX_SIGNATURE_AGE_S {
        return false;
    }
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(shared.secret.as_bytes()) else {
        return false;
    };
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(&request.body);
    // Both checked, so a wrong token costs the same as a wrong signature.
    mac.verify_slice(&v1).is_ok() && token_ok
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// `bytes` random bytes as hex, for the bench's credentials.
pub fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0_u8; bytes];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw));
    if from_os.is_err() {
        raw.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}
