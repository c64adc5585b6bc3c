//! `ledger-worker status`: queue depths, the oldest pending withdrawal's age and the
//! rates of the last minute, read from the database (`ledger_core::stats`).

use super::*;
use ledger_core::stats::{self, QueueStats};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The window of the rates, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub window_s: u64,
}

pub fn run(ctx: Ctx, args: StatusArgs) -> Result<ExitCode> {
    let mut conn = connect(ctx.database_url)?;
    let s = stats::snapshot(&mut conn, Duration::from_secs(args.window_s))?;
    ctx.out.print(status_json(&s), || status_text(&s))?;
    Ok(ExitCode::SUCCESS)
}

/// Rates are rounded to 0.01/s (a count over the window is exact; its quotient is not).
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub(crate) fn status_json(s: &QueueStats) -> Value {
    let (d, r) = (&s.depths, &s.rates);
    json!({
        "withdrawals": {
            "pending": d.withdrawals_pending,
            "retry_waiting": d.withdrawals_retry_waiting,
            "paying_out": d.withdrawals_paying_out,
            "failed": d.withdrawals_failed,
            "oldest_pending_age_s": d.oldest_pending_age_s.map(|a| (a * 1000.0).round() / 1000.0),
        },
        "payouts": { "pending": d.payouts_pending, "failed": d.payouts_failed },
        "rates": {
            "window_s": r.window_s,
            "withdrawals_debited": r.withdrawals_debited,
            "withdrawals_refused": r.withdrawals_refused,
            "payouts_settled": r.payouts_settled,
            "withdrawals_debited_per_s": round2(r.withdrawals_debited_per_s()),
            "withdrawals_refused_per_s": round2(r.withdrawals_refused_per_s()),
            "payouts_settled_per_s": round2(r.payouts_settled_per_s()),
        },
    })
}

fn age_text(seconds: f64) -> String {
    match seconds {
        s if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7_200.0 => format!("{:.1} min", s / 60.0),
        s => format!("{:.1} h", s / 3_600.0),
    }
}

pub(crate) fn status_text(s: &QueueStats) -> String {
    let (d, r) = (&s.depths, &s.rates);
    let oldest = d.oldest_pending_age_s.map(|a| format!(", oldest {}", age_text(a))).unwrap_or_default();
    [
        format!(
            "withdrawals  pending {} ({} waiting to retry{oldest}), paying out {}, failed {}",
            d.withdrawals_pending, d.withdrawals_retry_waiting, d.withdrawals_paying_out, d.withdrawals_failed
        ),
        format!("payouts      pending {}, failed {}", d.payouts_pending, d.payouts_failed),
        format!(
            "last {} s    debited {:.2}/s, refused {:.2}/s, payouts settled (withdrawals completed) {:.2}/s",
            r.window_s,
            r.withdrawals_debited_per_s(),
            r.withdrawals_refused_per_s(),
            r.payouts_settled_per_s()
        ),
    ]
    .join("\n")
}
