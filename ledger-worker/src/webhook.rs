//! The webhook payout gateway: signed, authenticated HTTP calls to a bank (or a
//! payment service) under a contract that leaves no answer open to interpretation.
//!
//! - `POST <url>` sends a payout (JSON body, `Idempotency-Key` header). It is paid only
//!   on a 2xx whose body is a JSON object with `"status": "accepted"`; refused only on
//!   a 4xx other than 401, 403, 408, 409, 425 and 429; 401/403 mean our credentials
//!   were refused; everything else (redirects, 5xx, timeouts, odd bodies...) is unknown.
//! - `GET <url>/<key>` asks what became of an earlier call with that key.
//! - Every request carries `Authorization: Bearer <token>` and
//!   `Ledger-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
//!
//! The classification is two pure functions, [`read_send_answer`] and
//! [`read_lookup_answer`], so the whole table is tested in one place. The token and the
//! signing secret come from the environment (or files it names), never from the command
//! line, and are kept in [`Secret`], whose `Debug` prints `***`.

use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use ledger_core::payouts::{LookupOutcome, PayoutGateway, PayoutRequest, SendOutcome};
use serde_json::{json, Value};
use sha2::Sha256;

/// The bearer token sent in `Authorization`.
pub const TOKEN_VAR: &str = "LEDGER_PAYOUT_WEBHOOK_TOKEN";
/// A file holding the bearer token (instead of [`TOKEN_VAR`]).
pub const TOKEN_FILE_VAR: &str = "LEDGER_PAYOUT_WEBHOOK_TOKEN_FILE";
/// The HMAC-SHA256 key the requests are signed with.
pub const SECRET_VAR: &str = "LEDGER_PAYOUT_WEBHOOK_SECRET";
/// A file holding the signing secret (instead of [`SECRET_VAR`]).
pub const SECRET_FILE_VAR: &str = "LEDGER_PAYOUT_WEBHOOK_SECRET_FILE";
/// The header carrying the request's signature.
pub const SIGNATURE_HEADER: &str = "Ledger-Signature";
/// The longest response body read. A longer one is not read further and the answer is
/// unknown: a bank (or a proxy in front of it) streaming without end can neither hold a
/// dispatcher nor fill its memory.
pub const MAX_RESPONSE_BODY: usize = 16 * 1024;
/// Credentials at least this long are masked wherever an answer or an error quotes them.
const MIN_REDACTED: usize = 8;
/// The longest excerpt of a response body quoted in a reason or an error.
const QUOTED_BODY_CHARS: usize = 200;

/// A credential. `Debug` prints `***` and there is no `Display`: the value can only be
/// reached on purpose, through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// What the gateway authenticates with.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Secret,
    /// Signs every request (`Ledger-Signature`).
    pub secret: Secret,
}

impl Credentials {
    /// Reads both credentials from the process environment ([`TOKEN_VAR`] or
    /// [`TOKEN_FILE_VAR`], [`SECRET_VAR`] or [`SECRET_FILE_VAR`]).
    pub fn from_env() -> Result<Credentials, WebhookError> {
        Credentials::from_lookup(|name| std::env::var_os(name))
    }

    /// [`Credentials::from_env`] with the environment given as a lookup function, so the
    /// parsing can be tested without touching the process's environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Credentials, WebhookError> {
        let token = read_secret(&lookup, TOKEN_VAR, TOKEN_FILE_VAR)?;
        if !token.0.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            // It goes into a header: a space, a newline or a non-ASCII byte would either be
            // refused by the HTTP library at every call or change the header's meaning.
            return Err(WebhookError::BadToken);
        }
        let secret = read_secret(&lookup, SECRET_VAR, SECRET_FILE_VAR)?;
        Ok(Credentials { token, secret })
    }
}

/// Where the gateway sends payouts and how long it waits.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// `https://...`; `http://` only for a loopback host (127.0.0.0/8, ::1, localhost).
    pub url: String,
    /// Longest wait for the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest a whole call may take, connecting and reading the answer included.
    pub timeout: Duration,
}

/// Why the webhook gateway could not be built. No variant ever holds a credential.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("payout webhook URL {url:?} is not valid: {reason}")]
    BadUrl { url: String, reason: String },
    /// The URL held a user name or password; it is not repeated here.
    #[error(
        "the payout webhook URL must not carry a user name or password: give the token in {TOKEN_VAR} (or \
         {TOKEN_FILE_VAR})"
    )]
    CredentialsInUrl,
    #[error("payout webhook URL {url:?}: plain http:// is allowed only to a loopback host (127.0.0.0/8, ::1, localhost); use https://")]
    InsecureUrl { url: String },
    #[error("payout webhook URL {url:?}: the scheme must be https:// (or http:// to a loopback host)")]
    BadScheme { url: String },
    #[error("{var} is not set (nor {file_var}): the webhook gateway needs it")]
    MissingSecret { var: &'static str, file_var: &'static str },
    #[error("{var} and {file_var} are both set: set only one")]
    AmbiguousSecret { var: &'static str, file_var: &'static str },
    #[error("{var} is empty")]
    EmptySecret { var: &'static str },
    #[error("{var} is not valid UTF-8")]
    NotUtf8 { var: &'static str },
    #[error("{var} names {path:?}, which cannot be read: {source}")]
    UnreadableSecretFile {
        var: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{TOKEN_VAR} may hold only visible ASCII characters (no spaces or line breaks)")]
    BadToken,
}

/// Reads one credential from `var` or from the file `file_var` names (one trailing
/// newline trimmed). Exactly one of the two must be set, to a non-empty value.
fn read_secret(
    lookup: &impl Fn(&str) -> Option<OsString>,
    var: &'static str,
    file_var: &'static str,
) -> Result<Secret, WebhookError> {
    let direct = lookup(var).filter(|v| !v.is_empty());
    let file = lookup(file_var).filter(|v| !v.is_empty());
    let value = match (direct, file) {
        (Some(_), Some(_)) => return Err(WebhookError::AmbiguousSecret { var, file_var }),
        (None, None) => {
            if lookup(var).is_some() {
                return Err(WebhookError::EmptySecret { var });
            }
            return Err(WebhookError::MissingSecret { var, file_var });
        }
        (Some(value), None) => value.into_string().map_err(|_| WebhookError::NotUtf8 { var })?,
        (None, Some(path)) => {
            let path = PathBuf::from(path);
            let bytes = std::fs::read(&path).map_err(|source| WebhookError::UnreadableSecretFile {
                var: file_var,
                path: path.clone(),
                source,
            })?;
            let mut text = String::from_utf8(bytes).map_err(|_| WebhookError::NotUtf8 { var: file_var })?;
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            if text.is_empty() {
                return Err(WebhookError::EmptySecret { var: file_var });
            }
            text
        }
    };
    Ok(Secret(value))
}

/// Checks the URL: absolute, https (or http to a loopback host), no credentials, no
/// query or fragment (the lookup URL is built by appending a path segment). Returns it
/// without a trailing slash, the form both calls are built from.
fn check_url(raw: &str) -> Result<String, WebhookError> {
    let bad = |reason: &str| WebhookError::BadUrl { url: raw.to_string(), reason: reason.to_string() };
    let url = url::Url::parse(raw).map_err(|e| {
        // The parser's message never quotes the input; still, a URL with a password in it
        // is not repeated back.
        if raw.contains('@') {
            WebhookError::CredentialsInUrl
        } else {
            bad(&e.to_string())
        }
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(WebhookError::CredentialsInUrl);
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err(bad("it has no host")),
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => return Err(WebhookError::InsecureUrl { url: raw.to_string() }),
        _ => return Err(WebhookError::BadScheme { url: raw.to_string() }),
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("it must not have a query or a fragment (lookups append /<idempotency-key> to it)"));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// POSTs payouts to a URL and looks them up there, under the contract in the module's
/// documentation.
pub struct WebhookGateway {
    agent: ureq::Agent,
    /// Checked and without a trailing slash.
    url: String,
    config: WebhookConfig,
    credentials: Credentials,
}

impl fmt::Debug for WebhookGateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookGateway")
            .field("url", &self.url)
            .field("connect_timeout", &self.config.connect_timeout)
            .field("timeout", &self.config.timeout)
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl WebhookGateway {
    /// The gateway for the daemon: credentials from the environment ([`Credentials::from_env`]).
    pub fn from_env(config: WebhookConfig) -> Result<WebhookGateway, WebhookError> {
        WebhookGateway::new(config, Credentials::from_env()?)
    }

    /// The gateway with credentials given directly (tests, embedding services).
    pub fn new(config: WebhookConfig, credentials: Credentials) -> Result<WebhookGateway, WebhookError> {
        let url = check_url(&config.url)?;
        if !credentials.token.0.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(WebhookError::BadToken);
        }
        if credentials.token.0.is_empty() {
            return Err(WebhookError::EmptySecret { var: TOKEN_VAR });
        }
        if credentials.secret.0.is_empty() {
            return Err(WebhookError::EmptySecret { var: SECRET_VAR });
        }
        // Keep-alive for every call in flight (ureq keeps one idle connection by default).
        let agent = ureq::AgentBuilder::new()
            .max_idle_connections(256)
            .max_idle_connections_per_host(256)
            .timeout_connect(config.connect_timeout)
            .timeout(config.timeout)
            .redirects(0)
            .try_proxy_from_env(false)
            .user_agent(concat!("ledger-worker/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(WebhookGateway { agent, url, config, credentials })
    }

    /// The URL payouts are POSTed to (checked, without a trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL an earlier call with `key` is looked up at.
    pub fn lookup_url(&self, key: &str) -> String {
        format!("{}/{}", self.url, encode_path_segment(key))
    }

    /// Adds the authentication headers, signing `body` (empty for a GET) now.
    fn authenticate(&self, request: ureq::Request, body: &str) -> ureq::Request {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        request
            .set("Authorization", &format!("Bearer {}", self.credentials.token.expose()))
            .set(SIGNATURE_HEADER, &signature_header(&self.credentials.secret, t, body))
    }

    /// Performs one call; `Ok((status, body))` for any answer read whole, `Err` for no
    /// answer (transport error, body over the limit or unreadable).
    fn call(&self, request: ureq::Request, body: Option<&str>) -> Result<(u16, Vec<u8>), String> {
        let result = match body {
            Some(body) => request.send_string(body),
            None => request.call(),
        };
        let response = match result {
            Ok(response) | Err(ureq::Error::Status(_, response)) => response,
            Err(ureq::Error::Transport(t)) => return Err(format!("no answer: {t}")),
        };
        let status = response.status();
        let mut bytes = Vec::new();
        match response.into_reader().take(MAX_RESPONSE_BODY as u64 + 1).read_to_end(&mut bytes) {
            Ok(_) if bytes.len() > MAX_RESPONSE_BODY => {
                Err(format!("HTTP {status} with a body over {MAX_RESPONSE_BODY} bytes: answer not read"))
            }
            Ok(_) => Ok((status, bytes)),
            Err(e) => Err(format!("HTTP {status}, reading its body failed: {e}")),
        }
    }

    /// Replaces any credential a server echoed back (or an error message quoted). A
    /// credential shorter than [`MIN_REDACTED`] is left alone: replacing every "t" in a
    /// message would destroy it, and so short a credential protects nothing anyway.
    fn redact(&self, text: String) -> String {
        let mut text = text;
        for secret in [&self.credentials.token, &self.credentials.secret] {
            if secret.0.len() >= MIN_REDACTED && text.contains(&secret.0) {
                text = text.replace(&secret.0, "***");
            }
        }
        text
    }
}

/// An idempotency key the contract can carry: in a header and as one path segment.
fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key == "." || key == ".." {
        return Err(format!("idempotency key {key:?} cannot name a payout: not sent"));
    }
    if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(format!("idempotency key {key:?} holds characters a header cannot carry: not sent"));
    }
    Ok(())
}

impl PayoutGateway for WebhookGateway {
    fn send(&self, r: &PayoutRequest) -> SendOutcome {
        if let Err(error) = check_key(&r.idempotency_key) {
            return SendOutcome::Unknown { error };
        }
        let body = json!({
            "payout_id": r.payout.get(),
            "withdrawal_id": r.withdrawal.get(),
            "amount": r.amount,
            "amount_minor": r.amount_minor,
            "currency": r.currency,
            "destination": r.destination,
            "idempotency_key": r.idempotency_key,
        })
        .to_string();
        let request = self
            .agent
            .post(&self.url)
            .set("Content-Type", "application/json")
            .set("Idempotency-Key", &r.idempotency_key);
        let request = self.authenticate(request, &body);
        let outcome = match self.call(request, Some(&body)) {
            Ok((status, bytes)) => match std::str::from_utf8(&bytes) {
                Ok(text) => read_send_answer(status, text),
                // Not UTF-8 is not JSON: a 2xx with it is not the accepted body.
                Err(_) if (200..=299).contains(&status) => {
                    SendOutcome::Unknown { error: format!("HTTP {status} with a body that is not UTF-8") }
                }
                Err(_) => read_send_answer(status, &String::from_utf8_lossy(&bytes)),
            },
            Err(error) => SendOutcome::Unknown { error },
        };
        match outcome {
            SendOutcome::Accepted { reference } => {
                SendOutcome::Accepted { reference: reference.map(|r| self.redact(r)) }
            }
            SendOutcome::Rejected { reason } => SendOutcome::Rejected { reason: self.redact(reason) },
            SendOutcome::Unknown { error } => SendOutcome::Unknown { error: self.redact(error) },
            SendOutcome::Unauthorized { error } => SendOutcome::Unauthorized { error: self.redact(error) },
        }
    }

    fn lookup(&self, r: &PayoutRequest) -> LookupOutcome {
        if let Err(error) = check_key(&r.idempotency_key) {
            return LookupOutcome::Unknown { error };
        }
        let request = self.authenticate(self.agent.get(&self.lookup_url(&r.idempotency_key)), "");
        let outcome = match self.call(request, None) {
            Ok((status, bytes)) => match std::str::from_utf8(&bytes) {
                Ok(text) => read_lookup_answer(status, text, &r.idempotency_key),
                Err(_) => LookupOutcome::Unknown { error: format!("HTTP {status} with a body that is not UTF-8") },
            },
            Err(error) => LookupOutcome::Unknown { error },
        };
        match outcome {
            LookupOutcome::Accepted { reference } => {
                LookupOutcome::Accepted { reference: reference.map(|r| self.redact(r)) }
            }
            LookupOutcome::Rejected { reason } => LookupOutcome::Rejected { reason: self.redact(reason) },
            LookupOutcome::NotFound => LookupOutcome::NotFound,
            LookupOutcome::Unknown { error } => LookupOutcome::Unknown { error: self.redact(error) },
            LookupOutcome::Unauthorized { error } => LookupOutcome::Unauthorized { error: self.redact(error) },
        }
    }
}

/// A short, single-line excerpt of a body for a reason or an error.
fn quote(body: &str) -> String {
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
fn object(body: &str) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// `"reference"`, if it is a string.
fn reference_of(map: &serde_json::Map<String, Value>) -> Option<String> {
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

fn to_hex(bytes: &[u8]) -> String {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    use LookupOutcome as L;
    use SendOutcome as S;

    fn accepted(reference: Option<&str>) -> SendOutcome {
        S::Accepted { reference: reference.map(str::to_string) }
    }

    /// The whole POST contract, one row per case.
    #[test]
    fn send_answers_are_read_under_the_contract() {
        #[derive(Debug)]
        enum K {
            Accepted(Option<&'static str>),
            Rejected,
            Unknown,
            Unauthorized,
        }
        let rows: &[(u16, &str, K)] = &[
            (200, r#"{"status":"accepted"}"#, K::Accepted(None)),
            (201, r#"{"status":"accepted"}"#, K::Accepted(None)),
            (202, r#"{"status":"accepted","reference":"r1"}"#, K::Accepted(Some("r1"))),
            (200, r#" {"reference":"r2","status":"accepted","extra":[1,2]} "#, K::Accepted(Some("r2"))),
            (200, r#"{"status":"accepted","reference":42}"#, K::Accepted(None)),
            (204, "", K::Unknown),
            (200, "", K::Unknown),
            (200, "{}", K::Unknown),
            (200, r#""accepted""#, K::Unknown),
            (200, "accepted", K::Unknown),
            (200, "OK", K::Unknown),
            (200, r#"{"status":"Accepted"}"#, K::Unknown),
            (200, r#"{"status":"ok"}"#, K::Unknown),
            (200, r#"{"status":"rejected","reason":"no"}"#, K::Unknown),
            (200, r#"{"status":["accepted"]}"#, K::Unknown),
            (200, r#"[{"status":"accepted"}]"#, K::Unknown),
            (200, r#"{"status":"accepted""#, K::Unknown),
            (100, "", K::Unknown),
            (101, "", K::Unknown),
            (301, r#"{"status":"accepted"}"#, K::Unknown),
            (302, "", K::Unknown),
            (303, "", K::Unknown),
            (304, "", K::Unknown),
            (307, "", K::Unknown),
            (308, "", K::Unknown),
            (400, "bad request", K::Rejected),
            (402, "", K::Rejected),
            (404, "not here", K::Rejected),
            (405, "", K::Rejected),
            (410, "", K::Rejected),
            (422, r#"{"error":"account closed"}"#, K::Rejected),
            (451, "", K::Rejected),
            (499, "", K::Rejected),
            (401, "", K::Unauthorized),
            (403, "forbidden", K::Unauthorized),
            (408, "", K::Unknown),
            (409, r#"{"status":"accepted"}"#, K::Unknown),
            (425, "", K::Unknown),
            (429, "slow down", K::Unknown),
            (500, r#"{"status":"accepted"}"#, K::Unknown),
            (502, "", K::Unknown),
            (503, "", K::Unknown),
            (504, "", K::Unknown),
            (599, "", K::Unknown),
            (600, "", K::Unknown),
            (0, "", K::Unknown),
            (999, r#"{"status":"accepted"}"#, K::Unknown),
        ];
        for (status, body, expected) in rows {
            let got = read_send_answer(*status, body);
            let ok = match (&got, expected) {
                (S::Accepted { reference }, K::Accepted(r)) => reference.as_deref() == *r,
                (S::Rejected { reason }, K::Rejected) => reason.starts_with(&format!("HTTP {status}: ")),
                (S::Unknown { error }, K::Unknown) => error.starts_with(&format!("HTTP {status}")),
                (S::Unauthorized { error }, K::Unauthorized) => error.starts_with(&format!("HTTP {status}")),
                _ => false,
            };
            assert!(ok, "POST answered {status} {body:?}: read as {got:?}, expected {expected:?}");
        }
    }

    /// The whole lookup contract, one row per case.
    #[test]
    fn lookup_answers_are_read_under_the_contract() {
        let unknown = |e: &LookupOutcome| matches!(e, L::Unknown { .. });
        type Check = dyn Fn(&LookupOutcome) -> bool;
        let rows: &[(u16, &str, &Check)] = &[
            (200, r#"{"status":"accepted"}"#, &|o| *o == L::Accepted { reference: None }),
            (200, r#"{"status":"accepted","reference":"r9"}"#, &|o| *o == L::Accepted { reference: Some("r9".into()) }),
            (200, r#"{"status":"rejected","reason":"account closed"}"#, &|o| {
                *o == L::Rejected { reason: "account closed".into() }
            }),
            (200, r#"{"status":"rejected"}"#, &unknown),
            (200, r#"{"status":"rejected","reason":7}"#, &unknown),
            (200, r#"{"status":"pending"}"#, &unknown),
            (200, "{}", &unknown),
            (200, "", &unknown),
            (200, r#""accepted""#, &unknown),
            (200, "not json", &unknown),
            (201, r#"{"status":"accepted"}"#, &unknown),
            (202, r#"{"status":"accepted"}"#, &unknown),
            (204, "", &unknown),
            (404, r#"{"status":"not_found","idempotency_key":"k-1"}"#, &|o| *o == L::NotFound),
            (404, r#"{"status":"not_found","idempotency_key":"k-1","detail":"never received"}"#, &|o| {
                *o == L::NotFound
            }),
            (404, r#"{"status":"not_found"}"#, &|o| matches!(o, L::Unknown { .. })),
            (404, r#"{"status":"not_found","idempotency_key":"k-2"}"#, &|o| matches!(o, L::Unknown { .. })),
            (404, "", &|o| matches!(o, L::Unknown { .. })),
            (404, "<html>Not Found</html>", &|o| matches!(o, L::Unknown { .. })),
            (404, r#"{"error":"no such route"}"#, &|o| matches!(o, L::Unknown { .. })),
            (404, r#"{"status":"accepted"}"#, &|o| matches!(o, L::Unknown { .. })),
            (401, "", &|o| matches!(o, L::Unauthorized { .. })),
            (403, "", &|o| matches!(o, L::Unauthorized { .. })),
            (301, "", &unknown),
            (302, r#"{"status":"accepted"}"#, &unknown),
            (307, "", &unknown),
            (400, "", &unknown),
            (408, "", &unknown),
            (409, "", &unknown),
            (410, "", &unknown),
            (422, r#"{"status":"rejected","reason":"x"}"#, &unknown),
            (429, "", &unknown),
            (500, "", &unknown),
            (503, r#"{"status":"accepted"}"#, &unknown),
            (100, "", &unknown),
            (0, "", &unknown),
        ];
        for (status, body, check) in rows {
            let got = read_lookup_answer(*status, body, "k-1");
            assert!(check(&got), "GET answered {status} {body:?}: read as {got:?}");
        }
    }

    #[test]
    fn reasons_quote_a_short_single_line_of_the_body() {
        let long = "x".repeat(5_000);
        match read_send_answer(422, &long) {
            S::Rejected { reason } => assert!(reason.chars().count() < 260, "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(read_send_answer(422, "a\nb\r\n"), S::Rejected { reason: "HTTP 422: a b".into() });
        assert_eq!(read_send_answer(410, "  "), S::Rejected { reason: "HTTP 410: (empty body)".into() });
        assert_eq!(read_send_answer(202, r#"{"status":"accepted","reference":"r1"}"#), accepted(Some("r1")));
    }

    /// RFC 4231, test case 2.
    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// Vectors computed independently (Python's `hmac` module).
    #[test]
    fn signatures_cover_the_timestamp_a_dot_and_the_body() {
        let secret = Secret::new("whsec_test");
        assert_eq!(
            sign(&secret, 1_700_000_000, r#"{"a":1}"#),
            "38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
        // A GET signs "<t>." (an empty body).
        assert_eq!(
            sign(&secret, 1_700_000_000, ""),
            "5967f3c560522fa40cf2876ebc3c3a08551dd6959aaade3b413460591895bdcc"
        );
        assert_eq!(
            signature_header(&secret, 1_700_000_000, ""),
            "t=1700000000,v1=5967f3c560522fa40cf2876ebc3c3a08551dd6959aaade3b413460591895bdcc"
        );
        assert_eq!(sign(&secret, 1_700_000_000, ""), hmac_sha256_hex(b"whsec_test", b"1700000000."));
    }

    #[test]
    fn keys_are_encoded_as_one_path_segment() {
        assert_eq!(encode_path_segment("payout-w17"), "payout-w17");
        assert_eq!(encode_path_segment("a b/c?d#e%f"), "a%20b%2Fc%3Fd%23e%25f");
        assert_eq!(encode_path_segment("é"), "%C3%A9");
        assert!(check_key(".").is_err() && check_key("..").is_err() && check_key("").is_err());
        assert!(check_key("a\nb").is_err());
        assert!(check_key("payout-w17").is_ok());
    }

    #[test]
    fn urls_must_be_https_unless_loopback() {
        let ok = [
            ("https://bank.example/payouts", "https://bank.example/payouts"),
            ("https://bank.example/payouts/", "https://bank.example/payouts"),
            ("https://bank.example", "https://bank.example"),
            ("http://127.0.0.1:8080/p", "http://127.0.0.1:8080/p"),
            ("http://127.9.8.7/p", "http://127.9.8.7/p"),
            ("http://localhost:1/p", "http://localhost:1/p"),
            ("http://LOCALHOST/p", "http://localhost/p"),
            ("http://[::1]:9/p", "http://[::1]:9/p"),
        ];
        for (raw, checked) in ok {
            assert_eq!(check_url(raw).unwrap_or_else(|e| panic!("{raw}: {e}")), checked);
        }
        let insecure =
            ["http://bank.example/p", "http://10.0.0.1/p", "http://[::2]/p", "http://localhost.bank.example/p"];
        for raw in insecure {
            assert!(matches!(check_url(raw), Err(WebhookError::InsecureUrl { .. })), "{raw}");
        }
        for raw in ["ftp://bank.example/p", "file:///etc/passwd", "ws://127.0.0.1/p"] {
            assert!(check_url(raw).is_err(), "{raw}");
        }
        for raw in ["", "bank.example/p", "https://", "https://bank.example/p?x=1", "https://bank.example/p#f"] {
            assert!(matches!(check_url(raw), Err(WebhookError::BadUrl { .. })), "{raw}: {:?}", check_url(raw));
        }
        let err = check_url("https://user:hunter2@bank.example/p").unwrap_err();
        assert!(matches!(err, WebhookError::CredentialsInUrl));
        assert!(!err.to_string().contains("hunter2") && !format!("{err:?}").contains("hunter2"));
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn credentials_come_from_variables_or_files() {
        let c = Credentials::from_lookup(env(&[(TOKEN_VAR, "tok-1"), (SECRET_VAR, "sec-1")])).unwrap();
        assert_eq!((c.token.expose(), c.secret.expose()), ("tok-1", "sec-1"));

        let dir = std::env::temp_dir().join(format!("ledger-webhook-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token_file = dir.join("token");
        let secret_file = dir.join("secret");
        std::fs::write(&token_file, "tok-2\n").unwrap();
        std::fs::write(&secret_file, "sec-2\n\n").unwrap();
        let c = Credentials::from_lookup(env(&[
            (TOKEN_FILE_VAR, token_file.to_str().unwrap()),
            (SECRET_FILE_VAR, secret_file.to_str().unwrap()),
        ]))
        .unwrap();
        // One trailing newline is trimmed, not more.
        assert_eq!((c.token.expose(), c.secret.expose()), ("tok-2", "sec-2\n"));
        std::fs::write(&secret_file, "sec-3\r\n").unwrap();
        let c = Credentials::from_lookup(env(&[(TOKEN_VAR, "t"), (SECRET_FILE_VAR, secret_file.to_str().unwrap())]))
            .unwrap();
        assert_eq!(c.secret.expose(), "sec-3");
        std::fs::write(&secret_file, "\n").unwrap();
        let err = Credentials::from_lookup(env(&[(TOKEN_VAR, "t"), (SECRET_FILE_VAR, secret_file.to_str().unwrap())]))
            .unwrap_err();
        assert!(matches!(err, WebhookError::EmptySecret { var: SECRET_FILE_VAR }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn credential_errors_name_the_variable_and_never_the_value() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[(SECRET_VAR, "sec-x")], TOKEN_VAR),
            (&[(TOKEN_VAR, "tok-x")], SECRET_VAR),
            (&[(TOKEN_VAR, "tok-x"), (SECRET_VAR, "")], SECRET_VAR),
            (&[(TOKEN_VAR, "tok-x"), (SECRET_VAR, "sec-x"), (SECRET_FILE_VAR, "/x")], SECRET_FILE_VAR),
            (&[(TOKEN_VAR, "tok-x"), (SECRET_FILE_VAR, "/nonexistent/ledger/secret")], SECRET_FILE_VAR),
            (&[(TOKEN_VAR, "tok x"), (SECRET_VAR, "sec-x")], TOKEN_VAR),
            (&[(TOKEN_VAR, "tok-x\n"), (SECRET_VAR, "sec-x")], TOKEN_VAR),
        ];
        for (vars, named) in cases {
            let err = Credentials::from_lookup(env(vars)).unwrap_err();
            let shown = format!("{err} / {err:?}");
            assert!(shown.contains(named), "{vars:?}: {shown}");
            assert!(!shown.contains("tok-x") && !shown.contains("sec-x") && !shown.contains("tok x"), "{shown}");
        }
    }

    #[test]
    fn secrets_print_as_stars() {
        let c = Credentials { token: Secret::new("tok-yyyyyy"), secret: Secret::new("sec-yyyyyy") };
        assert_eq!(format!("{:?}", c.token), "***");
        let config = WebhookConfig {
            url: "https://bank.example/p".into(),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
        };
        let gateway = WebhookGateway::new(config, c).unwrap();
        let shown = format!("{gateway:?} {gateway:#?}");
        assert!(!shown.contains("tok-yyyyyy") && !shown.contains("sec-yyyyyy") && shown.contains("***"), "{shown}");
        assert_eq!(gateway.redact("echo tok-yyyyyy and sec-yyyyyy".into()), "echo *** and ***");
    }
}
