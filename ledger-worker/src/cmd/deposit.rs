//! `ledger-worker deposit`: deposit money into an account (idempotent under --key).

use super::*;

/// The options of `deposit`.
#[derive(Args, Debug)]
pub struct DepositArgs {
    /// The account to credit (an account id).
    #[arg(long)]
    pub account: i64,
    /// Decimal amount in the account's currency, e.g. 100.00.
    #[arg(long, allow_hyphen_values = true)]
    pub amount: String,
    /// Idempotency key: the same key with the same request deposits once.
    #[arg(long)]
    pub key: String,
}

pub fn run(ctx: Ctx, args: DepositArgs) -> Result<ExitCode> {
    let DepositArgs { account, amount, key } = args;
    let (account, key) = (account_id(account)?, IdempotencyKey::new(key)?);
    let mut conn = connect(ctx.database_url)?;
    let amount = amount_for(&mut conn, account, &amount)?;
    let receipt = deposits::deposit(&mut conn, &Deposit { account, amount, key })?;
    let balance = accounts::get(&mut conn, account)?;
    ctx.out.print(
        json!({ "entry": receipt.entry.get(), "replayed": receipt.replayed, "account": account.get(),
                "balance": balance.balance_display(), "balances": balances_json(&receipt, amount.currency()) }),
        || {
            format!(
                "deposited {amount} into account {account} (entry {}{}); balance {} {}",
                receipt.entry,
                if receipt.replayed { ", replayed" } else { "" },
                balance.balance_display(),
                balance.currency
            )
        },
    )?;
    Ok(ExitCode::SUCCESS)
}
