//! `ledger-worker transfer`: move money between two accounts of the same currency (idempotent under --key),
//! or many read as JSON lines (`transfer submit`, in [`super::transfer_submit`]).

use super::*;
use ledger_core::metadata::Metadata;

/// The options of `transfer`: one transfer from flags, or a subcommand.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct TransferArgs {
    /// `transfer submit`: many transfers as JSON lines on stdin.
    #[command(subcommand)]
    pub command: Option<TransferCommand>,
    /// The account the money leaves (an account id).
    #[arg(long, required = true)]
    pub from: Option<i64>,
    /// The account the money goes to (same currency).
    #[arg(long, required = true)]
    pub to: Option<i64>,
    /// Decimal amount in the accounts' currency, e.g. 10.00.
    #[arg(long, allow_hyphen_values = true, required = true)]
    pub amount: Option<String>,
    /// Idempotency key: the same key with the same request transfers once.
    #[arg(long, required = true)]
    pub key: Option<String>,
    /// A JSON object stored with the transfer's entry, e.g. '{"order": 7}'.
    #[arg(long)]
    pub metadata: Option<String>,
}

/// The subcommands of `transfer`.
#[derive(Subcommand, Debug)]
pub enum TransferCommand {
    /// Transfers read as JSON lines on stdin:
    /// {"from": 1, "to": 2, "amount": "10.00", "key": "t-1", "metadata": {...}, "linked": true}
    ///
    /// "metadata" and "linked" are optional; a line marked linked succeeds or fails with
    /// the lines after it up to the first unlinked one. Each line is answered (created
    /// with both balances, replayed, refused with why, or skipped when blank), then a
    /// summary counts each; exit status 1 if any line was refused.
    Submit,
}

pub fn run(ctx: Ctx, args: TransferArgs) -> Result<ExitCode> {
    let TransferArgs { command, from, to, amount, key, metadata } = args;
    if let Some(TransferCommand::Submit) = command {
        return super::transfer_submit::run(ctx);
    }
    let missing = |name| failure::usage(name, format!("--{name} is required"));
    let (from, to) = (account_id(from.ok_or_else(|| missing("from"))?)?, account_id(to.ok_or_else(|| missing("to"))?)?);
    let (amount, key) = (amount.ok_or_else(|| missing("amount"))?, key.ok_or_else(|| missing("key"))?);
    let key = IdempotencyKey::new(key)?;
    let metadata = metadata.as_deref().map(Metadata::parse).transpose().map_err(LedgerError::Invalid)?;
    let mut conn = connect(ctx.database_url)?;
    let amount = amount_for(&mut conn, from, &amount)?;
    let shown = metadata.as_ref().map(Metadata::to_value);
    let receipt = transfers::transfer(&mut conn, &Transfer { from, to, amount, key, metadata })?;
    let currency = amount.currency();
    let after = |id| receipt.balance_of(id).map_or_else(|| "?".to_string(), |m| currency.format_minor(m));
    ctx.out.print(
        json!({ "entry": receipt.entry.get(), "replayed": receipt.replayed,
                "balances": balances_json(&receipt, currency), "metadata": shown }),
        || {
            format!(
                "transferred {amount} from {from} to {to} (entry {}{}); balances after it: {from} {} {currency}, {to} {} {currency}{}",
                receipt.entry,
                if receipt.replayed { ", replayed" } else { "" },
                after(from),
                after(to),
                shown.as_ref().map_or_else(String::new, |m| format!("; metadata {m}"))
            )
        },
    )?;
    Ok(ExitCode::SUCCESS)
}
