//! Request signing: `Ledger-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`,
//! and keys made safe as URL path segments.

use super::*;

/// The header carrying the request's signature.
pub const SIGNATURE_HEADER: &str = "Ledger-Signature";

/// Lower-case hex of HMAC-SHA256(`key`, `data`).
pub fn hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    to_hex(&mac.finalize().into_bytes())
}

/// The signature of a request sent at `t` (unix seconds) with `body` (empty for a GET):
/// lower-case hex of HMAC-SHA256 over `"<t>.<body>"` under `secret`.
pub fn sign(secret: &Secret, t: u64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    to_hex(&mac.finalize().into_bytes())
}

/// The `Ledger-Signature` header's value: `t=<t>,v1=<sign(secret, t, body)>`.
pub fn signature_header(secret: &Secret, t: u64, body: &str) -> String {
    format!("t={t},v1={}", sign(secret, t, body))
}

pub(super) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Percent-encodes `segment` as one URL path segment: every byte except the unreserved
/// ones (`A-Z a-z 0-9 - . _ ~`) becomes `%XX`.
pub fn encode_path_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
