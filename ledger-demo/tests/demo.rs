//! The demo never writes into a database it did not create.

use std::process::{Command, Stdio};

use ledger_testdb as testing;

#[testing::test]
fn the_demo_refuses_a_database_with_data_and_writes_nothing() {
    let db = testing::committed();
    let mut conn = db.conn();
    let before = testing::snapshot(&mut conn);
    let out = Command::new(env!("CARGO_BIN_EXE_ledger-demo"))
        .args(["demo", "--database-url", db.url()])
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the demo must refuse a database that holds a ledger");
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
