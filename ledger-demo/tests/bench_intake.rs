//! The intake scenario end to end: both child commands run against a throwaway server,
//! and the table reports each, checked and audited.

use std::process::{Command, Stdio};

use ledger_testdb as testing;

#[testing::test(600)]
fn the_intake_scenario_feeds_both_commands_and_checks_what_they_wrote() {
    let out = Command::new(env!("CARGO_BIN_EXE_ledger-demo"))
        .args(["bench", "--scenario", "intake", "--lines", "1200"])
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for (command, done) in [("submit", "1200 enqueued written"), ("transfer submit", "1200 created written")] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| intake | {command} |")))
            .unwrap_or_else(|| panic!("no {command} row in {stdout}"));
        assert!(row.ends_with("| clean |"), "{row}");
        assert!(stderr.contains(&format!("== intake ({command}): 1200 lines")), "{stderr}");
        assert!(stderr.contains(done), "{stderr}");
    }
    assert_eq!(stderr.matches("balances as the lines asked, total").count(), 2, "{stderr}");
}
