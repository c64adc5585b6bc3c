//! `ledger-worker payout ...`: operator commands for payouts.

use super::*;

#[derive(Subcommand, Debug)]
pub enum PayoutCommand {
    /// List payouts in ascending id order, all of them unless --limit; page with --after
    /// (the last id you saw). Printed as they are read, in constant memory.
    List {
        /// Only payouts in this status.
        #[arg(long, value_parser = status_parser(PayoutStatus::ALL, PayoutStatus::as_str))]
        status: Option<PayoutStatus>,
        /// Start after this payout id (exclusive; 0 = from the first): the cursor of the
        /// next page.
        #[arg(long)]
        after: Option<i64>,
        /// Print at most this many (default: all).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Show one payout.
    Show {
        /// The payout's id (as `payout list` printed it).
        id: i64,
    },
    /// Send a failed payout again (its attempts start over).
    Retry {
        /// The failed payout's id.
        id: i64,
    },
    /// Give up on a failed payout and return the funds to the customer. A payout that
    /// may have reached the gateway is looked up there first (--payout-webhook, with the
    /// credentials from the environment): returned only if the gateway says it was
    /// rejected or never received, settled if it says accepted. `--force --reason`
    /// returns it without asking, recorded as forced.
    Return {
        /// The failed payout's id.
        id: i64,
        /// Why it is returned, recorded on the withdrawal (required with --force).
        #[arg(long)]
        reason: Option<String>,
        /// Return without a lookup (needs --reason, which is recorded).
        #[arg(long)]
        force: bool,
        /// The webhook to look the payout up at.
        #[arg(long)]
        payout_webhook: Option<String>,
        /// Longest the lookup may take (the whole request, connecting included).
        #[arg(long, default_value_t = 10_000)]
        payout_timeout_ms: u64,
        /// Longest the lookup waits to connect.
        #[arg(long, default_value_t = 2_000)]
        payout_connect_timeout_ms: u64,
    },
}

pub fn run(ctx: Ctx, command: PayoutCommand) -> Result<ExitCode> {
    match command {
        PayoutCommand::List { status, after, limit } => {
            // 0 is the cursor before the first row, as a script starts its loop.
            let after = after.filter(|a| *a != 0).map(PayoutId::new).transpose()?;
            let mut conn = connect(ctx.database_url)?;
            let fetch = |after: Option<i64>, n: i64| -> Result<Vec<Payout>> {
                let after = after.map(PayoutId::new).transpose()?;
                Ok(payouts::list_after(&mut conn, status, after, n)?)
            };
            let print = |p: &Payout| ctx.out.print(payout_json(p), || payout_line(p));
            stream_pages(after.map(PayoutId::get), limit, fetch, |p| p.id.get(), print)?;
        }
        PayoutCommand::Show { id } => {
            let id = PayoutId::new(id)?;
            let mut conn = connect(ctx.database_url)?;
            let p = payouts::get(&mut conn, id)?;
            ctx.out.print(payout_json(&p), || payout_line(&p))?;
        }
        PayoutCommand::Retry { id } => {
            let id = PayoutId::new(id)?;
            let mut conn = connect(ctx.database_url)?;
            let p = payouts::retry(&mut conn, id)?;
            ctx.out.print(payout_json(&p), || payout_line(&p))?;
        }
        PayoutCommand::Return { id, reason, force, payout_webhook, payout_timeout_ms, payout_connect_timeout_ms } => {
            let id = PayoutId::new(id)?;
            let mut conn = connect(ctx.database_url)?;
            let reason = reason.unwrap_or_default();
            let webhook = match (&payout_webhook, force) {
                (Some(_), true) => {
                    return Err(failure::usage("force", "give either --force or --payout-webhook, not both"))
                }
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
                    return Err(failure::usage("reason", "--force needs --reason, which is recorded with the return"));
                }
                (_, true) => payouts::ReturnAuthority::Force { reason: &reason },
                (Some(g), false) => payouts::ReturnAuthority::Lookup(g),
                (None, false) => payouts::ReturnAuthority::Lookup(&no_lookup),
            };
            let why = if reason.trim().is_empty() { "returned by an operator" } else { reason.as_str() };
            let p = match payouts::return_failed(&mut conn, id, why, authority)? {
                payouts::ReturnResult::Returned(p) | payouts::ReturnResult::SettledInstead(p) => p,
            };
            ctx.out.print(payout_json(&p), || payout_line(&p))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
