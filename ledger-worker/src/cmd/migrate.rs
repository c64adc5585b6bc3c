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
}

pub fn run(ctx: Ctx, args: MigrateArgs) -> Result<ExitCode> {
    let MigrateArgs { new_instance_id } = args;
    let mut conn = db::connect(&require_url(ctx.database_url)?, &db::SessionConfig::default())?;
    let n = db::run_migrations(&mut conn)?;
    let (instance, renewed) = if new_instance_id {
        (payouts::renew_instance_id(&mut conn)?, true)
    } else {
        (payouts::instance_id(&mut conn)?, false)
    };
    ctx.out.print(json!({ "applied": n, "instance_id": instance, "instance_id_renewed": renewed }), || {
        let what = if renewed { "new instance id" } else { "instance id" };
        format!("{n} migration(s) applied; {what} {instance}")
    })?;
    Ok(ExitCode::SUCCESS)
}
