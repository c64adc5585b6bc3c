//! The contract's credentials: `Authorization: Bearer <token>` and
//! `Ledger-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256("<t>.<body>")>`.

use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::http::Request;

/// The signature header, lower-case as the parser stores names. (The daemon's
/// `ledger_worker::webhook::SIGNATURE_HEADER`; this crate does not link the daemon.)
const SIGNATURE_HEADER: &str = "ledger-signature";

/// Checks the bearer token and the signature (over `"<t>.<body>"`, within `max_age` of
/// the bank's clock). The error says which.
pub(crate) fn authenticate(request: &Request, token: &str, secret: &str, max_age: Duration) -> Result<(), String> {
    let token_ok = request
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
    let header = request.header(SIGNATURE_HEADER).ok_or("no Ledger-Signature header")?;
    let (mut t, mut v1) = (None, None);
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = Some(value),
            Some(("v1", value)) => v1 = hex_decode(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return Err("malformed Ledger-Signature".into());
    };
    let seconds = t.parse::<u64>().map_err(|_| "malformed Ledger-Signature timestamp")?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if now.abs_diff(seconds) > max_age.as_secs() {
        return Err("signature timestamp too old (or in the future)".into());
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| "unusable signing secret")?;
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(&request.body);
    // Both checked, so a wrong token costs the same as a wrong signature.
    let signature_ok = mac.verify_slice(&v1).is_ok();
    match (token_ok, signature_ok) {
        (true, true) => Ok(()),
        (false, _) => Err("bad or missing bearer token".into()),
        (true, false) => Err("bad signature".into()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// `bytes` random bytes as hex, for credentials made for one run (the bench's).
pub fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0_u8; bytes];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw));
    if from_os.is_err() {
        raw.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}
