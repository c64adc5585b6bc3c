//! `ledger-worker migrate`: apply pending schema migrations.

use super::*;

/// The options of `migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Give this ledger a new instance id (part of every new payout's gateway key).
    /// Run it once on a database restored from a backup or cloned from another, so
    /// its new payouts never reuse keys the original already sent. Payouts already
    /// queued keep their keys.
    #[arg(long)]
    pub new_instance_id: bool,

    /// The highest overdraft limit accounts in a currency may be given, as
    /// CURRENCY=AMOUNT (e.g. EUR=5000.00; 0 allows no overdraft). Repeatable. The
    /// default is 1000000 units of each currency. Accounts opened before keep their limit.
    #[arg(long, value_name = "CURRENCY=AMOUNT", value_parser = parse_ceiling)]
    pub max_overdraft: Vec<(Currency, i64)>,
}

/// `EUR=5000.00` -> (EUR, 500000): the amount in the currency's own scale, 0 allowed.
fn parse_ceiling(text: &str) -> Result<(Currency, i64), String> {
    let (code, amount) = text.split_once('=').ok_or("expected CURRENCY=AMOUNT, e.g. EUR=5000.00")?;
    let currency = Currency::from_code(code.trim()).map_err(|e| e.to_string())?;
    let amount = amount.trim();
    let (whole, fraction) = amount.split_once('.').unwrap_or((amount, "0"));
    let zeros = |s: &str| !s.is_empty() && s.chars().all(|c| c == '0');
    let minor = if zeros(whole) && zeros(fraction) {
        0
    } else {
        Amount::parse(amount, currency).map_err(|e| e.to_string())?.minor()
    };
    Ok((currency, minor))
}

pub fn run(ctx: Ctx, args: MigrateArgs) -> Result<ExitCode> {
    let MigrateArgs { new_instance_id, max_overdraft } = args;
    let mut conn = db::connect(&require_url(ctx.database_url)?, &db::SessionConfig::default())?;
    let n = db::run_migrations(&mut conn)?;
    for (currency, ceiling_minor) in &max_overdraft {
        ledger_core::accounts::set_overdraft_ceiling(&mut conn, *currency, *ceiling_minor)?;
    }
    let (instance, renewed) = if new_instance_id {
        (payouts::renew_instance_id(&mut conn)?, true)
    } else {
        (payouts::instance_id(&mut conn)?, false)
    };
    let ceilings: Vec<Value> = max_overdraft
        .iter()
        .map(|(c, m)| json!({ "currency": c.code(), "max_overdraft": c.format_minor(*m) }))
        .collect();
    ctx.out.print(
        json!({ "applied": n, "instance_id": instance, "instance_id_renewed": renewed, "overdraft_ceilings": ceilings }),
        || {
            let what = if renewed { "new instance id" } else { "instance id" };
            let set: String = max_overdraft
                .iter()
                .map(|(c, m)| format!("; overdraft ceiling {} {c}", c.format_minor(*m)))
                .collect();
            format!("{n} migration(s) applied; {what} {instance}{set}")
        },
    )?;
    Ok(ExitCode::SUCCESS)
}
