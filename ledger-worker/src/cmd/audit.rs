//! `ledger-worker audit`: checks the ledger's invariants; exit 1 on any violation.

use super::*;

pub fn run(ctx: Ctx) -> Result<ExitCode> {
    let mut conn = connect(ctx.database_url)?;
    let report = ledger_core::audit::run(&mut conn)?;
    let violations: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
    ctx.out.print(
        json!({ "clean": report.is_clean(), "entries": report.entries, "postings": report.postings,
                "accounts": report.accounts, "violations": violations }),
        || report.to_string(),
    )?;
    if !report.is_clean() {
        // The report is the result (stdout); the failure is said once more on stderr,
        // where scripts look for it.
        let message = format!("audit failed: {} violation(s)", violations.len());
        return Err(CliError::Refused { kind: "audit_failed", message }.into());
    }
    Ok(ExitCode::SUCCESS)
}
