//! The demo binary as a user runs it: the demo never writes into a database it did not
//! create, its figures agree, and the bench's intake scenario checks what it wrote.

use std::process::{Command, Stdio};

use ledger_testdb as testing;

/// Runs this package's binary with `args`, no `DATABASE_URL` and no stdin: whether it
/// succeeded, its stdout and its stderr.
fn ledger_demo(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ledger-demo"))
        .args(args)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[testing::test]
fn the_demo_refuses_a_database_with_data_and_writes_nothing() {
    let db = testing::committed();
    let mut conn = db.conn();
    let before = testing::snapshot(&mut conn);
    let (ok, _, stderr) = ledger_demo(&["demo", "--database-url", db.url()]);
    assert!(!ok, "the demo must refuse a database that holds a ledger");
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert_eq!(testing::snapshot(&mut conn), before, "the demo wrote nothing");
}

/// Every `ledger-worker` command runs here too, through the same code (the bench's
/// worker processes are this binary running `run`).
#[test]
fn the_worker_commands_are_here_too() {
    let out = Command::new(env!("CARGO_BIN_EXE_ledger-demo")).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && help.contains("--gateway"), "{help}");
}

/// The numbers after `prefix` in `text` (the first run of digits and dots).
fn number_after(text: &str, prefix: &str) -> String {
    let start = text.find(prefix).unwrap_or_else(|| panic!("{prefix:?} not in {text}")) + prefix.len();
    text[start..].chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect()
}

/// The issue's complaint: "3000/3000 processed (0.2s)" then "3000 in 1.40 s", "1695
/// debited (1696 payouts settled)", "3 violation(s)" with 2 listed. Each figure now has
/// one source, so the figures agree.
#[testing::test(600)]
fn the_demos_figures_agree_with_each_other() {
    let (ok, stdout, stderr) = ledger_demo(&["demo", "--withdrawals", "400", "--accounts", "4", "--threads", "2"]);
    assert!(ok, "{stdout}\n{stderr}");
    // The last progress line (stderr is a pipe: a line per tenth) and the summary.
    let last = stderr.lines().rev().find(|l| l.contains("processed (")).unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(number_after(last, "   "), "400", "{last}");
    let summary = stdout.lines().find(|l| l.contains("withdrawals/s")).unwrap_or_else(|| panic!("{stdout}"));
    let seconds = |text: &str| text.parse::<f64>().unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let (bar, said) = (seconds(&number_after(last, "processed (")), seconds(&number_after(summary, "processed in ")));
    assert!((bar - said).abs() <= 0.051, "one duration, shown to 0.1 s and to 0.01 s: {last} / {summary}");
    assert_eq!(number_after(summary, "("), "400", "{summary}");
    let counts = stdout.lines().find(|l| l.contains(" debited (")).unwrap_or_else(|| panic!("{stdout}"));
    let figure = |prefix: &str| -> u64 { number_after(counts, prefix).parse().unwrap() };
    let (debited, settled) = (figure("   "), figure("debited ("));
    let (rejected, failed) = (figure("gateway), "), figure("funds, "));
    assert_eq!(debited, settled, "{counts}");
    assert_eq!(debited + rejected + failed, 400, "{counts}");
    // The unlocked race lists as many violations as it counts.
    let counted: usize = number_after(&stdout, "audit: ").parse().unwrap();
    let race = &stdout[stdout.find("audit: ").unwrap()..stdout.find("2) ").unwrap()];
    assert_eq!(race.lines().skip(1).filter(|l| l.starts_with("      ")).count(), counted, "{race}");
}

#[test]
fn every_argument_of_the_demo_binary_is_documented() {
    use ledger_worker::cmd::help;
    let tree = help::command::<ledger_demo::cmd::Cli>();
    assert_eq!(help::undocumented(&tree), Vec::<String>::new());
}

/// The intake scenario end to end: both child commands run against a throwaway server,
/// and the table reports each, checked and audited.
#[testing::test(600)]
fn the_intake_scenario_feeds_both_commands_and_checks_what_they_wrote() {
    let (ok, stdout, stderr) = ledger_demo(&["bench", "--scenario", "intake", "--lines", "1200"]);
    assert!(ok, "{stdout}\n{stderr}");
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
