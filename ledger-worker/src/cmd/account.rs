//! `ledger-worker account ...`: open or show customer accounts, their history and their
//! balance at a point in the past.

use super::*;
use ledger_core::history::{self, At, HistoryLine, PostingId};
use ledger_core::EntryId;

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
    /// Show an account's balance (what it may spend now), its posted balance and its
    /// pending holds (debits: held from it; credits: held for it), currency and status.
    Show {
        /// The account's id (as `account open` printed it).
        id: i64,
    },
    /// List an account's postings, oldest first, each with the balance right after it;
    /// all of them unless --limit; page with --after (the last posting id you saw).
    /// Printed as they are read, in constant memory.
    History {
        /// The account's id (customer or system).
        id: i64,
        /// Start after this posting id (exclusive; 0 = from the first): the cursor of
        /// the next page.
        #[arg(long)]
        after: Option<i64>,
        /// Print at most this many (default: all).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// An account's balance right after a journal entry, or at a moment.
    #[command(group(clap::ArgGroup::new("point").required(true).args(["at_entry", "at"])))]
    Balance {
        /// The account's id (customer or system).
        id: i64,
        /// Right after this journal entry (and every earlier one).
        #[arg(long)]
        at_entry: Option<i64>,
        /// At this moment, RFC 3339, e.g. 2026-12-04T18:30:00Z or 2026-12-04T19:30:00+01:00.
        #[arg(long)]
        at: Option<String>,
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
            let b = ledger_core::holds::balance(&mut conn, id)?;
            let mut value = account_json(&a);
            for field in ["posted", "pending_debits", "pending_credits"] {
                value[field] = super::hold::balance_json(&b)[field].clone();
            }
            ctx.out.print(value, || {
                let c = a.currency;
                format!(
                    "account {}: {} {c} ({}), owner {}; posted {} {c}, pending {} {c} out, {} {c} in",
                    a.id,
                    a.balance_display(),
                    a.status,
                    a.owner,
                    c.format_minor(b.posted_minor()),
                    c.format_minor(b.pending_debits_minor),
                    c.format_minor(b.pending_credits_minor)
                )
            })?;
        }
        AccountCommand::History { id, after, limit } => history_command(ctx, id, after, limit)?,
        AccountCommand::Balance { id, at_entry, at } => balance_command(ctx, id, at_entry, at)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `account history`: pages of [`PAGE`] postings, printed as they come.
fn history_command(ctx: Ctx, id: i64, after: Option<i64>, limit: Option<u64>) -> Result<()> {
    let id = account_id(id)?;
    // 0 is the cursor before the first posting, as a script starts its loop.
    let after = after.filter(|a| *a != 0).map(PostingId::new).transpose()?;
    let mut conn = connect(ctx.database_url)?;
    let fetch = |after: Option<i64>, n: i64| -> Result<Vec<HistoryLine>> {
        let after = after.map(PostingId::new).transpose()?;
        Ok(history::page(&mut conn, id, after, n)?)
    };
    let print = |l: &HistoryLine| {
        let json = history_json(l);
        ctx.out.print(json.clone(), || {
            format!(
                "{:>8}  {}  {:<17} {:>12} {:>12} {}  entry {}{}",
                l.posting_id,
                json["created_at"].as_str().unwrap_or(""),
                l.kind,
                json["amount"].as_str().unwrap_or(""),
                json["balance_after"].as_str().unwrap_or(""),
                l.currency,
                l.entry_id,
                l.reference.as_ref().map(|r| format!("  {r}")).unwrap_or_default()
            )
        })
    };
    // An account without postings prints nothing; one that does not exist is not_found.
    stream_pages(after.map(PostingId::get), limit, fetch, |l| l.posting_id.get(), print)?;
    Ok(())
}

fn history_json(l: &HistoryLine) -> Value {
    json!({
        "posting": l.posting_id.get(),
        "entry": l.entry_id.get(),
        "created_at": history::format_rfc3339(l.created_at),
        "kind": l.kind.as_str(),
        "reference": l.reference,
        "metadata": l.metadata.as_ref().map(|m| m.to_value()),
        "amount": l.currency.format_minor(l.amount_minor),
        "balance_after": l.currency.format_minor(l.balance_after_minor),
        "currency": l.currency.code(),
    })
}

/// `account balance --at-entry N | --at TIME`.
fn balance_command(ctx: Ctx, id: i64, at_entry: Option<i64>, at: Option<String>) -> Result<()> {
    let id = account_id(id)?;
    let point = match (at_entry, at) {
        (Some(entry), None) => At::Entry(EntryId::new(entry)?),
        (None, Some(text)) => At::Time(history::parse_rfc3339(&text)?),
        _ => return Err(failure::usage("at", "give one of --at-entry N and --at TIME")),
    };
    let mut conn = connect(ctx.database_url)?;
    let b = history::balance_at(&mut conn, id, point)?;
    let (at_key, at_value) = match point {
        At::Entry(entry) => ("at_entry", json!(entry.get())),
        At::Time(time) => ("at", json!(history::format_rfc3339(time))),
    };
    let balance = b.currency.format_minor(b.balance_minor);
    let mut value = json!({ "account": b.account.get(), "balance": balance, "currency": b.currency.code() });
    value[at_key] = at_value.clone();
    ctx.out.print(value, || {
        let at = at_value.as_str().map_or_else(|| format!("after entry {at_value}"), |t| format!("at {t}"));
        format!("account {} {at}: {balance} {}", b.account, b.currency)
    })?;
    Ok(())
}
