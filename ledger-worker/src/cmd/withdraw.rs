//! `ledger-worker withdraw`: enqueue a withdrawal to an IBAN; the daemon processes it.

use super::*;

/// The options of `withdraw`.
#[derive(Args, Debug)]
pub struct WithdrawArgs {
    /// The account to take the money from (an account id).
    #[arg(long)]
    pub account: i64,
    /// Destination IBAN.
    #[arg(long)]
    pub to: String,
    /// Decimal amount in the account's currency, e.g. 50.00 (or 50.00 EUR: another
    /// currency than the account's is refused).
    #[arg(long, allow_hyphen_values = true)]
    pub amount: String,
    /// Idempotency key: the same key with the same request is answered as a replay, not
    /// enqueued twice.
    #[arg(long)]
    pub key: String,
}

pub fn run(ctx: Ctx, args: WithdrawArgs) -> Result<ExitCode> {
    let WithdrawArgs { account, to, amount, key } = args;
    let (account, key, destination) = (account_id(account)?, IdempotencyKey::new(key)?, Iban::parse(&to)?);
    let mut conn = connect(ctx.database_url)?;
    let amount = amount_for(&mut conn, account, &amount)?;
    let (id, replayed) = withdrawals::request(&mut conn, &WithdrawalRequest { account, amount, destination, key })?;
    let w = withdrawals::get(&mut conn, id)?;
    ctx.out.print(json!({ "id": id.get(), "status": w.status.as_str(), "replayed": replayed }), || {
        format!("withdrawal {id}: {}{}", w.status, if replayed { " (replayed)" } else { "" })
    })?;
    Ok(ExitCode::SUCCESS)
}
