//! `ledger-worker account ...`: open or show customer accounts.

use super::*;

#[derive(Subcommand, Debug)]
pub enum AccountCommand {
    /// Open a customer account with a zero balance.
    Open {
        /// Who holds the account (1 to 200 characters).
        #[arg(long)]
        owner: String,
        /// ISO 4217 code, e.g. EUR.
        #[arg(long)]
        currency: String,
        /// How far below zero the balance may go, e.g. 100.00.
        #[arg(long, default_value = "0", allow_hyphen_values = true)]
        overdraft_limit: String,
        /// Idempotency key: opening again with the same key returns the same account.
        #[arg(long)]
        key: Option<String>,
    },
    /// Show an account's balance, currency and status.
    Show {
        /// The account's id (as `account open` printed it).
        id: i64,
    },
}

pub fn run(ctx: Ctx, command: AccountCommand) -> Result<ExitCode> {
    match command {
        AccountCommand::Open { owner, currency, overdraft_limit, key } => {
            let currency = Currency::from_code(&currency)?;
            let limit = match overdraft_limit.as_str() {
                "0" | "0.0" | "0.00" | "0.000" => 0,
                text => Amount::parse(text, currency)?.minor(),
            };
            let key = key.map(IdempotencyKey::new).transpose()?;
            let mut conn = connect(ctx.database_url)?;
            let account =
                accounts::open(&mut conn, &NewAccount::new(owner, currency).with_overdraft(limit), key.as_ref())?;
            ctx.out
                .print(account_json(&account), || format!("opened account {} ({})", account.id, account.currency))?;
        }
        AccountCommand::Show { id } => {
            let id = account_id(id)?;
            let mut conn = connect(ctx.database_url)?;
            let a = accounts::get(&mut conn, id)?;
            ctx.out.print(account_json(&a), || {
                format!(
                    "account {}: {} {} ({}), owner {}",
                    a.id,
                    a.balance_display(),
                    a.currency,
                    account_json(&a)["status"].as_str().unwrap_or(""),
                    a.owner
                )
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
