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

mod contract;
mod credentials;
mod signing;

pub use contract::{read_lookup_answer, read_send_answer, MAX_RESPONSE_BODY};
pub use credentials::{Credentials, Secret, SECRET_FILE_VAR, SECRET_VAR, TOKEN_FILE_VAR, TOKEN_VAR};
pub use signing::{encode_path_segment, hmac_sha256_hex, sign, signature_header, SIGNATURE_HEADER};

// The rooms below share these through `use super::*`.
use {contract::*, credentials::*};

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

#[cfg(test)]
mod tests;
