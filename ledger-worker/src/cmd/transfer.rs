//! `ledger-worker transfer`: move money between two accounts of the same currency (idempotent under --key).

use super::*;

/// The options of `transfer`.
#[derive(Args, Debug)]
pub struct TransferArgs {
    /// The account the money leaves (an account id).
    #[arg(long)]
    pub from: i64,
    /// The account the money goes to (same currency).
    #[arg(long)]
    pub to: i64,
    /// Decimal amount in the accounts' currency, e.g. 10.00.
    #[arg(long, allow_hyphen_values = true)]
    pub amount: String,
    /// Idempotency key: the same key with the same request transfers once.
    #[arg(long)]
    pub key: String,
}

pub fn run(ctx: Ctx, args: TransferArgs) -> Result<ExitCode> {
    let TransferArgs { from, to, amount, key } = args;
    let (from, to, key) = (account_id(from)?, account_id(to)?, IdempotencyKey::new(key)?);
    let mut conn = connect(ctx.database_url)?;
    let amount = amount_for(&mut conn, from, &amount)?;
    let receipt = transfers::transfer(&mut conn, &Transfer { from, to, amount, key, metadata: None })?;
    let currency = amount.currency();
    let after = |id| receipt.balance_of(id).map_or_else(|| "?".to_string(), |m| currency.format_minor(m));
    ctx.out.print(
        json!({ "entry": receipt.entry.get(), "replayed": receipt.replayed,
                "balances": balances_json(&receipt, currency) }),
        || {
            format!(
                "transferred {amount} from {from} to {to} (entry {}{}); balances after it: {from} {} {currency}, {to} {} {currency}",
                receipt.entry,
                if receipt.replayed { ", replayed" } else { "" },
                after(from),
                after(to)
            )
        },
    )?;
    Ok(ExitCode::SUCCESS)
}
