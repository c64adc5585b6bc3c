//! The output contract for failures: every error gets a stable `kind`, an exit code, and
//! the field or id it concerns when known. Decided from the typed errors in the chain
//! (ledger-core's `LedgerError`, `InvalidInput`, this crate's [`CliError`]), never from
//! message text, which may change or be translated.

use std::process::ExitCode;

use ledger_core::error::{RetryClass, Transient};
use ledger_core::{InvalidInput, LedgerError};
use serde_json::{json, Value};

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: refused (a business refusal, a conflict, an unknown id, a failed audit,
/// refused `submit` lines) or any other failure that is not one of the two below.
pub const EXIT_REFUSED: u8 = 1;
/// Exit status: bad command line or bad input; nothing was written.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the database could not be reached. (3 is `run`'s forced stop.)
pub const EXIT_UNREACHABLE: u8 = 4;

/// Failures the command line raises itself.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A bad option or a bad combination of options (kind `usage`, exit 2).
    #[error("{message}")]
    Usage { field: Option<&'static str>, message: String },
    /// The command ran and its answer is no (kind `refused` or `audit_failed`, exit 1):
    /// refused `submit` lines, a failed audit. The result itself is already on stdout.
    #[error("{message}")]
    Refused { kind: &'static str, message: String },
    /// The schema is behind this binary (kind `schema_outdated`, exit 1).
    #[error("the database schema is not up to date: run `ledger-worker migrate` first")]
    SchemaOutdated,
}

/// A usage error about one option, as an `anyhow::Error` to return with `?`.
pub fn usage(field: &'static str, message: impl Into<String>) -> anyhow::Error {
    CliError::Usage { field: Some(field), message: message.into() }.into()
}

/// What a script reads about a failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: &'static str,
    /// ledger-core's own finer name (`unknown_account`, `currency_mismatch`...), if any.
    pub code: Option<&'static str>,
    pub message: String,
    pub field: Option<String>,
    pub id: Option<i64>,
    pub exit: u8,
}

impl Failure {
    fn new(kind: &'static str, exit: u8) -> Failure {
        Failure { kind, code: None, message: String::new(), field: None, id: None, exit }
    }

    fn field(mut self, field: &str) -> Failure {
        self.field = Some(field.to_string());
        self
    }

    fn id(mut self, id: i64) -> Failure {
        self.id = Some(id);
        self
    }

    /// The failure of a whole command: the first typed error in the chain decides.
    pub fn of(e: &anyhow::Error) -> Failure {
        let typed = e.chain().find_map(|cause| {
            if let Some(c) = cause.downcast_ref::<CliError>() {
                Some(of_cli(c))
            } else if let Some(l) = cause.downcast_ref::<LedgerError>() {
                Some(of_ledger(l))
            } else {
                cause.downcast_ref::<InvalidInput>().map(of_input)
            }
        });
        let mut failure = typed.unwrap_or_else(|| Failure::new("error", EXIT_REFUSED));
        // One line, whatever the causes' texts hold.
        failure.message = format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ");
        failure
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({ "kind": self.kind, "message": self.message });
        if let Some(code) = self.code {
            v["code"] = json!(code);
        }
        if let Some(field) = &self.field {
            v["field"] = json!(field);
        }
        if let Some(id) = self.id {
            v["id"] = json!(id);
        }
        v
    }

    /// Writes the failure to stderr (a JSON line with `--json`, else `error: ...`) and
    /// gives the exit code.
    pub fn report(&self, json: bool) -> ExitCode {
        if json {
            eprintln!("{}", self.to_json());
        } else {
            eprintln!("error: {}", self.message);
        }
        ExitCode::from(self.exit)
    }
}

fn of_cli(e: &CliError) -> Failure {
    match e {
        CliError::Usage { field, .. } => {
            let f = Failure::new("usage", EXIT_USAGE);
            match field {
                Some(name) => f.field(name),
                None => f,
            }
        }
        CliError::Refused { kind, .. } => Failure::new(kind, EXIT_REFUSED),
        CliError::SchemaOutdated => Failure::new("schema_outdated", EXIT_REFUSED),
    }
}

/// The field of the input an `InvalidInput` is about, named as the options name it.
fn of_input(e: &InvalidInput) -> Failure {
    let field = match e {
        InvalidInput::NonPositiveAmount(_)
        | InvalidInput::MalformedAmount(_)
        | InvalidInput::OverPreciseAmount { .. }
        | InvalidInput::AmountOverflow(_) => "amount",
        InvalidInput::UnknownCurrency(_) => "currency",
        InvalidInput::BadIdempotencyKey(_) => "key",
        InvalidInput::BadId { kind, .. } => id_field(kind),
        InvalidInput::BadField { field, .. } => field,
    };
    Failure::new("invalid_input", EXIT_USAGE).field(field)
}

fn id_field(kind: &str) -> &str {
    match kind {
        "AccountId" => "account",
        "WithdrawalId" => "withdrawal",
        "PayoutId" => "payout",
        "HoldId" => "hold",
        "EntryId" => "entry",
        "PostingId" => "posting",
        other => other,
    }
}

fn of_ledger(e: &LedgerError) -> Failure {
    if matches!(e.transient(), Some(Transient::ConnectionLost | Transient::TooManyConnections)) {
        return Failure { code: Some(e.code()), ..Failure::new("database_unreachable", EXIT_UNREACHABLE) };
    }
    let refused = |id: i64| Failure::new("refused", EXIT_REFUSED).id(id).field("account");
    let failure = match e {
        LedgerError::Invalid(input) => of_input(input),
        LedgerError::RetriesExhausted { last, .. } => return of_ledger(last),
        LedgerError::InsufficientFunds { account, .. } => {
            Failure::new("insufficient_funds", EXIT_REFUSED).id(account.get()).field("account")
        }
        LedgerError::UnknownAccount(id) => Failure::new("not_found", EXIT_REFUSED).id(id.get()).field("account"),
        LedgerError::UnknownWithdrawal(id) => Failure::new("not_found", EXIT_REFUSED).id(id.get()).field("withdrawal"),
        LedgerError::UnknownTransfer(id) => Failure::new("not_found", EXIT_REFUSED).id(id.get()).field("transfer"),
        LedgerError::UnknownPayout(id) => Failure::new("not_found", EXIT_REFUSED).id(id.get()).field("payout"),
        LedgerError::UnknownHold(id) => Failure::new("not_found", EXIT_REFUSED).id(id.get()).field("hold"),
        LedgerError::HoldFinished { hold, .. } => Failure::new("conflict", EXIT_REFUSED).id(hold.get()).field("hold"),
        LedgerError::PostExceedsHold { hold, .. } | LedgerError::HoldCurrencyMismatch { hold, .. } => {
            Failure::new("refused", EXIT_REFUSED).id(hold.get()).field("amount")
        }
        LedgerError::AccountClosed(id)
        | LedgerError::SystemAccount(id)
        | LedgerError::SameAccount(id)
        | LedgerError::BalanceOverflow(id) => refused(id.get()),
        LedgerError::CurrencyMismatch { account, .. } => refused(account.get()),
        LedgerError::LinkedItemFailed { .. } | LedgerError::LinkedChainOpen => Failure::new("refused", EXIT_REFUSED),
        LedgerError::IdempotencyConflict { .. } => Failure::new("conflict", EXIT_REFUSED).field("key"),
        LedgerError::PayoutState { payout, .. } => Failure::new("conflict", EXIT_REFUSED).id(payout.get()),
        LedgerError::LockTimeout(_)
        | LedgerError::Database(_)
        | LedgerError::Pool(_)
        | LedgerError::Inconsistent(_) => Failure::new("database_error", EXIT_REFUSED),
    };
    Failure { code: Some(e.code()), ..failure }
}

/// A clap parse error as a failure: kind `usage`, exit 2, the argument concerned if clap
/// names one. The message is one line; `--help` has the rest.
pub fn of_clap(e: &clap::Error) -> Failure {
    use clap::error::{ContextKind, ContextValue};
    let text = e.to_string();
    let line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    // "--status <STATUS>" or "<ID>": the option's or the argument's name.
    let field = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg.split_whitespace().next().map(|name| {
            name.trim_start_matches('-').trim_start_matches('<').trim_end_matches('>').to_ascii_lowercase()
        }),
        _ => None,
    };
    let text = line.join(" ");
    let message = format!("{} (see --help)", text.strip_prefix("error: ").unwrap_or(&text));
    Failure { message, field, ..Failure::new("usage", EXIT_USAGE) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger_core::holds::HoldStatus;
    use ledger_core::{AccountId, Currency, HoldId, PayoutId};

    #[test]
    fn each_typed_error_has_its_kind_exit_code_and_subject() {
        let funds = LedgerError::InsufficientFunds {
            account: AccountId::new(117).unwrap(),
            currency: Currency::EUR,
            balance_minor: 0,
            floor_minor: 0,
            requested_minor: 1,
        };
        let lost = LedgerError::Pool("connecting to postgres://x: refused".into());
        // (error, kind, exit status, field, id)
        type Case = (anyhow::Error, &'static str, u8, Option<&'static str>, Option<i64>);
        let cases: Vec<Case> = vec![
            (funds.into(), "insufficient_funds", 1, Some("account"), Some(117)),
            (LedgerError::UnknownAccount(AccountId::new(5).unwrap()).into(), "not_found", 1, Some("account"), Some(5)),
            (LedgerError::UnknownPayout(PayoutId::new(3).unwrap()).into(), "not_found", 1, Some("payout"), Some(3)),
            (LedgerError::UnknownHold(HoldId::new(4).unwrap()).into(), "not_found", 1, Some("hold"), Some(4)),
            (
                LedgerError::HoldFinished { hold: HoldId::new(4).unwrap(), status: HoldStatus::Expired }.into(),
                "conflict",
                1,
                Some("hold"),
                Some(4),
            ),
            (
                LedgerError::PostExceedsHold {
                    hold: HoldId::new(4).unwrap(),
                    currency: Currency::EUR,
                    held_minor: 1,
                    requested_minor: 2,
                }
                .into(),
                "refused",
                1,
                Some("amount"),
                Some(4),
            ),
            (InvalidInput::BadId { kind: "HoldId", value: 0 }.into(), "invalid_input", 2, Some("hold"), None),
            (InvalidInput::MalformedAmount("1,00".into()).into(), "invalid_input", 2, Some("amount"), None),
            (InvalidInput::BadId { kind: "AccountId", value: 0 }.into(), "invalid_input", 2, Some("account"), None),
            (
                LedgerError::IdempotencyConflict { key: "k".into(), operation: "deposit".into() }.into(),
                "conflict",
                1,
                Some("key"),
                None,
            ),
            (lost.into(), "database_unreachable", 4, None, None),
            (usage("limit", "--limit must be at least 1"), "usage", 2, Some("limit"), None),
            (anyhow::anyhow!("something else"), "error", 1, None, None),
        ];
        for (error, kind, exit, field, id) in cases {
            let f = Failure::of(&error);
            assert_eq!((f.kind, f.exit, f.field.as_deref(), f.id), (kind, exit, field, id), "{error:#}");
            assert_eq!(f.message, format!("{error:#}"));
        }
    }

    #[test]
    fn context_around_a_typed_error_keeps_its_kind_and_its_text() {
        let e = anyhow::Error::from(LedgerError::UnknownAccount(AccountId::new(9).unwrap())).context("reading line 3");
        let f = Failure::of(&e);
        assert_eq!((f.kind, f.code), ("not_found", Some("unknown_account")));
        assert_eq!(f.to_json()["message"], "reading line 3: unknown account 9");
    }
}
