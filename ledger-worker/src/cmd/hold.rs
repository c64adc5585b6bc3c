//! `ledger-worker hold ...`: two-phase transfers. Hold money from one account for
//! another (it leaves the payer at once), then post all or part of it, void it, or let
//! its timeout void it (the daemon's expiry loop).

use super::*;
use ledger_core::history;
use ledger_core::holds::{self, Balance, Hold, HoldQuery, HoldReceipt, HoldRequest, HoldStatus, Timeout};
use ledger_core::{HoldId, InvalidInput};

#[derive(Subcommand, Debug)]
pub enum HoldCommand {
    /// Hold money from one account for another (idempotent under --key): it leaves the
    /// payer's balance now, nothing else can spend it, and it waits, pending, for a post
    /// or a void (or the timeout).
    Create {
        /// The payer: the account the money is held from (an account id).
        #[arg(long)]
        from: i64,
        /// The payee: the account a post pays (same currency).
        #[arg(long)]
        to: i64,
        /// Decimal amount in the payer's currency, e.g. 30.00 (or "30.00 EUR").
        #[arg(long, allow_hyphen_values = true)]
        amount: String,
        /// Idempotency key: the same key with the same request holds once.
        #[arg(long)]
        key: String,
        /// Void the hold this long after it is made if it is still pending (the daemon
        /// does it, status expired): a whole number and a unit, 500ms, 30s, 5m, 2h or 7d,
        /// at most 366d. Without it the hold waits until posted or voided.
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Post a pending hold (idempotent under --key): --amount of it to the payee (all of
    /// it without --amount), the rest back to the payer, in one entry.
    Post {
        /// The hold's id (as `hold create` printed it).
        id: i64,
        /// Decimal amount to post, at most what is held, e.g. 20.00.
        #[arg(long, allow_hyphen_values = true)]
        amount: Option<String>,
        /// Idempotency key: the same key with the same request posts once.
        #[arg(long)]
        key: String,
    },
    /// Void a pending hold (idempotent under --key): all of it back to the payer.
    Void {
        /// The hold's id (as `hold create` printed it).
        id: i64,
        /// Idempotency key: the same key with the same request voids once.
        #[arg(long)]
        key: String,
    },
    /// Show a hold: its parties, amount, status, what was posted, its deadline.
    Show {
        /// The hold's id.
        id: i64,
    },
    /// List an account's holds (as payer or payee), oldest first; all of them unless
    /// --limit; page with --after (the last hold id you saw). Printed as they are read.
    List {
        /// The account's id.
        #[arg(long)]
        account: i64,
        /// Only holds in this status: pending, posted, voided or expired.
        #[arg(long)]
        status: Option<String>,
        /// Start after this hold id (exclusive; 0 = from the first): the cursor of the
        /// next page.
        #[arg(long)]
        after: Option<i64>,
        /// Print at most this many (default: all).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
}

pub fn run(ctx: Ctx, command: HoldCommand) -> Result<ExitCode> {
    match command {
        HoldCommand::Create { from, to, amount, key, timeout } => {
            let (from, to, key) = (account_id(from)?, account_id(to)?, IdempotencyKey::new(key)?);
            let timeout = timeout.as_deref().map(Timeout::parse).transpose()?;
            let mut conn = connect(ctx.database_url)?;
            let amount = amount_for(&mut conn, from, &amount)?;
            let r = holds::hold(&mut conn, &HoldRequest { from, to, amount, timeout, key })?;
            print_receipt(&ctx.out, &r, || {
                let expires = r.hold.expires_at.map(|t| format!(", expires {}", history::format_rfc3339(t)));
                format!(
                    "held {amount} from account {from} for account {to} (hold {}, entry {}{}{})",
                    r.hold.id,
                    r.entry,
                    expires.unwrap_or_default(),
                    replayed(&r)
                )
            })?;
        }
        HoldCommand::Post { id, amount, key } => {
            let (id, key) = (HoldId::new(id)?, IdempotencyKey::new(key)?);
            let mut conn = connect(ctx.database_url)?;
            let amount = match amount {
                Some(text) => Some(Money::parse_for(&text, holds::get(&mut conn, id)?.currency)?),
                None => None,
            };
            let r = holds::post(&mut conn, id, amount, &key)?;
            print_receipt(&ctx.out, &r, || {
                let h = &r.hold;
                format!(
                    "posted {} {c} of hold {} to account {}, {} {c} back to account {} (entry {}{})",
                    h.currency.format_minor(h.posted_minor),
                    h.id,
                    h.payee,
                    h.currency.format_minor(h.returned_minor()),
                    h.payer,
                    r.entry,
                    replayed(&r),
                    c = h.currency
                )
            })?;
        }
        HoldCommand::Void { id, key } => {
            let (id, key) = (HoldId::new(id)?, IdempotencyKey::new(key)?);
            let mut conn = connect(ctx.database_url)?;
            let r = holds::void(&mut conn, id, &key)?;
            print_receipt(&ctx.out, &r, || {
                format!(
                    "voided hold {}: {} back to account {} (entry {}{})",
                    r.hold.id,
                    r.hold.amount(),
                    r.hold.payer,
                    r.entry,
                    replayed(&r)
                )
            })?;
        }
        HoldCommand::Show { id } => {
            let id = HoldId::new(id)?;
            let mut conn = connect(ctx.database_url)?;
            let h = holds::get(&mut conn, id)?;
            ctx.out.print(hold_json(&h), || hold_line(&h))?;
        }
        HoldCommand::List { account, status, after, limit } => list(ctx, account, status, after, limit)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn list(ctx: Ctx, account: i64, status: Option<String>, after: Option<i64>, limit: Option<u64>) -> Result<()> {
    let account = account_id(account)?;
    let status = match status.as_deref() {
        None => None,
        Some(text) => Some(HoldStatus::parse(text).ok_or_else(|| InvalidInput::BadField {
            field: "status",
            reason: format!("{text:?} is not one of pending, posted, voided, expired"),
        })?),
    };
    // 0 is the cursor before the first hold, as a script starts its loop.
    let after = after.filter(|a| *a != 0).map(HoldId::new).transpose()?;
    let mut conn = connect(ctx.database_url)?;
    let fetch = |after: Option<i64>, limit: i64| -> Result<Vec<Hold>> {
        let after = after.map(HoldId::new).transpose()?;
        Ok(holds::list(&mut conn, &HoldQuery { account, status, after, limit })?)
    };
    // An account without holds prints nothing; one that does not exist is not_found.
    stream_pages(
        after.map(HoldId::get),
        limit,
        fetch,
        |h| h.id.get(),
        |h| ctx.out.print(hold_json(h), || hold_line(h)),
    )?;
    Ok(())
}

fn replayed(r: &HoldReceipt) -> &'static str {
    if r.replayed {
        ", replayed"
    } else {
        ""
    }
}

/// A write's answer: the hold, the entry, whether replayed, and both parties' balances.
fn print_receipt(out: &Output, r: &HoldReceipt, headline: impl FnOnce() -> String) -> std::io::Result<()> {
    let mut value = hold_json(&r.hold);
    value["entry"] = json!(r.entry.get());
    value["replayed"] = json!(r.replayed);
    value["balances"] = json!([balance_json(&r.payer), balance_json(&r.payee)]);
    out.print(value, || format!("{}\n  {}\n  {}", headline(), balance_line(&r.payer), balance_line(&r.payee)))
}

fn hold_json(h: &Hold) -> Value {
    let time = |t: Option<std::time::SystemTime>| t.map(history::format_rfc3339);
    json!({
        "id": h.id.get(),
        "from": h.payer.get(),
        "to": h.payee.get(),
        "amount": h.currency.format_minor(h.amount_minor),
        "posted": h.currency.format_minor(h.posted_minor),
        "returned": h.currency.format_minor(h.returned_minor()),
        "currency": h.currency.code(),
        "status": h.status.as_str(),
        "expires_at": time(h.expires_at),
        "key": h.key,
        "hold_entry": h.hold_entry.get(),
        "resolution_entry": h.resolution_entry.map(|e| e.get()),
        "created_at": history::format_rfc3339(h.created_at),
        "finished_at": time(h.finished_at),
    })
}

fn hold_line(h: &Hold) -> String {
    let c = h.currency;
    let detail = match h.status {
        HoldStatus::Pending => match h.expires_at {
            Some(t) => format!(", expires {}", history::format_rfc3339(t)),
            None => ", no timeout".to_string(),
        },
        HoldStatus::Posted => format!(
            ": {} {c} posted, {} {c} returned",
            c.format_minor(h.posted_minor),
            c.format_minor(h.returned_minor())
        ),
        _ => format!(": {} {c} returned", c.format_minor(h.returned_minor())),
    };
    format!("hold {}: {} {} from account {} for account {}{detail}", h.id, h.status, h.amount(), h.payer, h.payee)
}

/// An account's balance with its pending holds, as `account show` and the hold commands
/// print it.
pub(super) fn balance_json(b: &Balance) -> Value {
    let c = b.currency;
    json!({
        "account": b.account.get(),
        "balance": c.format_minor(b.balance_minor),
        "posted": c.format_minor(b.posted_minor()),
        "pending_debits": c.format_minor(b.pending_debits_minor),
        "pending_credits": c.format_minor(b.pending_credits_minor),
        "currency": c.code(),
    })
}

pub(super) fn balance_line(b: &Balance) -> String {
    let c = b.currency;
    format!(
        "account {}: {} {c} available; posted {} {c}, pending {} {c} out, {} {c} in",
        b.account,
        c.format_minor(b.balance_minor),
        c.format_minor(b.posted_minor()),
        c.format_minor(b.pending_debits_minor),
        c.format_minor(b.pending_credits_minor)
    )
}
