//! `ledger-worker withdrawal ...`: show or list withdrawals.

use super::*;

#[derive(Subcommand, Debug)]
pub enum WithdrawalCommand {
    /// Show a withdrawal's status, reason and attempts.
    Show { id: i64 },
    /// List withdrawals, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        account: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
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
            });
        }
        WithdrawalCommand::List { status, account, limit } => {
            let status = status
                .map(|s| {
                    WithdrawalStatus::parse(&s).ok_or_else(|| {
                        anyhow!("unknown status {s:?}: pending, paying_out, completed, rejected, failed or returned")
                    })
                })
                .transpose()?;
            let account = account.map(account_id).transpose()?;
            if !(1..=100_000).contains(&limit) {
                bail!("--limit must be 1..=100000");
            }
            let mut conn = connect(ctx.database_url)?;
            for w in withdrawals::list(&mut conn, status, account, limit)? {
                ctx.out.print(withdrawal_json(&w), || {
                    format!(
                        "{:>8}  {:<10} {:>12} {}  account {}",
                        w.id,
                        w.status,
                        withdrawal_json(&w)["amount"].as_str().unwrap_or(""),
                        w.currency,
                        w.account_id
                    )
                });
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
