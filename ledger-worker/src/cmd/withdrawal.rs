//! `ledger-worker withdrawal ...`: show or list withdrawals.

use super::*;

#[derive(Subcommand, Debug)]
pub enum WithdrawalCommand {
    /// Show a withdrawal's status, reason and attempts.
    Show {
        /// The withdrawal's id (as `withdraw` or `submit` printed it).
        id: i64,
    },
    /// List withdrawals in ascending id order, all of them unless --limit; page with
    /// --after (the last id you saw). Printed as they are read, in constant memory.
    List {
        /// Only withdrawals in this status.
        #[arg(long, value_parser = status_parser(WithdrawalStatus::ALL, WithdrawalStatus::as_str))]
        status: Option<WithdrawalStatus>,
        /// Only this account's withdrawals (an account id).
        #[arg(long)]
        account: Option<i64>,
        /// Start after this withdrawal id (exclusive; 0 = from the first): the cursor of
        /// the next page.
        #[arg(long)]
        after: Option<i64>,
        /// Print at most this many (default: all).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
}

pub fn run(ctx: Ctx, command: WithdrawalCommand) -> Result<ExitCode> {
    match command {
        WithdrawalCommand::Show { id } => {
            let id = WithdrawalId::new(id)?;
            let mut conn = connect(ctx.database_url)?;
            let w = withdrawals::get(&mut conn, id)?;
            ctx.out.print(withdrawal_json(&w), || {
                format!(
                    "withdrawal {}: {} {} {} from account {} to {}, {} attempt(s){}",
                    w.id,
                    w.status,
                    withdrawal_json(&w)["amount"].as_str().unwrap_or(""),
                    w.currency,
                    w.account_id,
                    w.destination,
                    w.attempts,
                    w.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
                )
            })?;
        }
        WithdrawalCommand::List { status, account, after, limit } => {
            let account = account.map(account_id).transpose()?;
            // 0 is the cursor before the first row, as a script starts its loop.
            let after = after.filter(|a| *a != 0).map(WithdrawalId::new).transpose()?;
            let mut conn = connect(ctx.database_url)?;
            let fetch = |after: Option<i64>, n: i64| -> Result<Vec<Withdrawal>> {
                let after = after.map(WithdrawalId::new).transpose()?;
                Ok(withdrawals::list_after(&mut conn, status, account, after, n)?)
            };
            let print = |w: &Withdrawal| {
                ctx.out.print(withdrawal_json(w), || {
                    format!(
                        "{:>8}  {:<10} {:>12} {}  account {}",
                        w.id,
                        w.status,
                        withdrawal_json(w)["amount"].as_str().unwrap_or(""),
                        w.currency,
                        w.account_id
                    )
                })
            };
            stream_pages(after.map(WithdrawalId::get), limit, fetch, |w| w.id.get(), print)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
