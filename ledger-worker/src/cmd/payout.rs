//! `ledger-worker payout ...`: operator commands for payouts.

use super::*;

#[derive(Subcommand, Debug)]
pub enum PayoutCommand {
    /// List payouts, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Show one payout.
    Show { id: i64 },
    /// Send a failed payout again (its attempts start over).
    Retry { id: i64 },
    /// Give up on a failed payout and return the funds to the customer. A payout that
    /// may have reached the gateway is looked up there first (--payout-webhook, with the
    /// credentials from the environment): returned only if the gateway says it was
    /// rejected or never received, settled if it says accepted. `--force --reason`
    /// returns it without asking, recorded as forced.
    Return {
        id: i64,
        #[arg(long)]
        reason: Option<String>,
        /// Return without a lookup (needs --reason, which is recorded).
        #[arg(long)]
        force: bool,
        /// The webhook to look the payout up at.
        #[arg(long)]
        payout_webhook: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        payout_timeout_ms: u64,
        #[arg(long, default_value_t = 2_000)]
        payout_connect_timeout_ms: u64,
    },
}

pub fn run(ctx: Ctx, command: PayoutCommand) -> Result<ExitCode> {
    match command {
        PayoutCommand::List { status, limit } => {
            let status = status
                .map(|s| {
                    PayoutStatus::parse(&s)
                        .ok_or_else(|| anyhow!("unknown status {s:?}: pending, settled, returned or failed"))
                })
                .transpose()?;
            if !(1..=100_000).contains(&limit) {
                bail!("--limit must be 1..=100000");
            }
            let mut conn = connect(ctx.database_url)?;
            for p in payouts::list(&mut conn, status, limit)? {
                ctx.out.print(payout_json(&p), || payout_line(&p));
            }
        }
        PayoutCommand::Show { id } => {
            let id = PayoutId::new(id)?;
            let mut conn = connect(ctx.database_url)?;
            let p = payouts::get(&mut conn, id)?;
            ctx.out.print(payout_json(&p), || payout_line(&p));
        }
        PayoutCommand::Retry { id } => {
            let id = PayoutId::new(id)?;
            let mut conn = connect(ctx.database_url)?;
            let p = payouts::retry(&mut conn, id)?;
            ctx.out.print(payout_json(&p), || payout_line(&p));
        }
        PayoutCommand::Return { id, reason, force, payout_webhook, payout_timeout_ms, payout_connect_timeout_ms } => {
            let id = PayoutId::new(id)?;
            let mut conn = connect(ctx.database_url)?;
            let reason = reason.unwrap_or_default();
            let webhook = match (&payout_webhook, force) {
                (Some(_), true) => bail!("give either --force or --payout-webhook, not both"),
                (Some(url), false) => Some(crate::webhook::WebhookGateway::from_env(crate::webhook::WebhookConfig {
                    url: url.clone(),
                    connect_timeout: Duration::from_millis(payout_connect_timeout_ms.max(1)),
                    timeout: Duration::from_millis(payout_timeout_ms.max(1)),
                })?),
                (None, _) => None,
            };
            let no_lookup = crate::gateway::NoLookup;
            let authority = match (&webhook, force) {
                (_, true) if reason.trim().is_empty() => {
                    bail!("--force needs --reason, which is recorded with the return")
                }
                (_, true) => payouts::ReturnAuthority::Force { reason: &reason },
                (Some(g), false) => payouts::ReturnAuthority::Lookup(g),
                (None, false) => payouts::ReturnAuthority::Lookup(&no_lookup),
            };
            let why = if reason.trim().is_empty() { "returned by an operator" } else { reason.as_str() };
            let p = match payouts::return_failed(&mut conn, id, why, authority)? {
                payouts::ReturnResult::Returned(p) | payouts::ReturnResult::SettledInstead(p) => p,
            };
            ctx.out.print(payout_json(&p), || payout_line(&p));
        }
    }
    Ok(ExitCode::SUCCESS)
}
