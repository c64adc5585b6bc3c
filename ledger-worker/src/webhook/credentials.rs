//! The webhook's credentials: a bearer token and an HMAC secret, from the environment or
//! a file, never from the command line, never printed.

use super::*;

/// The bearer token sent in `Authorization`.
pub const TOKEN_VAR: &str = "LEDGER_PAYOUT_WEBHOOK_TOKEN";

/// A file holding the bearer token (instead of [`TOKEN_VAR`]).
pub const TOKEN_FILE_VAR: &str = "LEDGER_PAYOUT_WEBHOOK_TOKEN_FILE";

/// The HMAC-SHA256 key the requests are signed with.
pub const SECRET_VAR: &str = "LEDGER_PAYOUT_WEBHOOK_SECRET";

/// A file holding the signing secret (instead of [`SECRET_VAR`]).
pub const SECRET_FILE_VAR: &str = "LEDGER_PAYOUT_WEBHOOK_SECRET_FILE";

/// Credentials at least this long are masked wherever an answer or an error quotes them.
pub(super) const MIN_REDACTED: usize = 8;

/// A credential. `Debug` prints `***` and there is no `Display`: the value can only be
/// reached on purpose, through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

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

/// Reads one credential from `var` or from the file `file_var` names (one trailing
/// newline trimmed). Exactly one of the two must be set, to a non-empty value.
pub(super) fn read_secret(
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
