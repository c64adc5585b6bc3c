//! The CLI contract: names, JSON output, exit codes, one-line errors, and bad input
//! that leaves the database unchanged.

mod common;
#[path = "cli/contract.rs"]
mod contract;
#[path = "cli/help.rs"]
mod help;
#[path = "cli/history.rs"]
mod history;
#[path = "cli/holds.rs"]
mod holds;
#[path = "cli/lists.rs"]
mod lists;
#[path = "cli/review_transfer_submit.rs"]
mod review_transfer_submit;
#[path = "cli/submit_chunks.rs"]
mod submit_chunks;
#[path = "cli/submit_reconnect.rs"]
mod submit_reconnect;
#[path = "support/mod.rs"]
mod support;
#[path = "cli/transfer_submit.rs"]
mod transfer_submit;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::*;
use ledger_testdb as testing;
use serde_json::Value;

fn cli(url: &str, args: &[&str]) -> Output {
    worker_command().args(args).env("DATABASE_URL", url).stdin(Stdio::null()).output().unwrap()
}

fn ok_json(url: &str, args: &[&str]) -> Value {
    let out = cli(url, &[&["--json"], args].concat());
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Runs a command with `input` on its stdin, written from a thread so the answers can
/// stream back while the input is still going in.
fn with_stdin(url: &str, args: &[&str], input: String) -> Output {
    let mut child = worker_command()
        .args(args)
        .env("DATABASE_URL", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().expect("the stdin writer panicked").unwrap();
    out
}

/// Every line of a stream, parsed as JSON (a line that is not JSON fails the test).
fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

/// Runs a command that must fail: non-zero exit, exactly one line on stderr, database unchanged.
fn refused(db: &testing::TestDb, args: &[&str], stdin: Option<&str>) -> String {
    let mut conn = db.conn();
    let before = testing::snapshot(&mut conn);
    let mut child = worker_command()
        .args(args)
        .env("DATABASE_URL", db.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} should fail");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: one-line error expected, got {stderr:?}");
    assert_eq!(testing::snapshot(&mut conn), before, "{args:?} changed the database");
    stderr
}

#[testing::test]
fn the_documented_commands_work_end_to_end() {
    let db = testing::committed();
    let url = db.url();
    assert_eq!(ok_json(url, &["migrate"])["applied"], 0);
    let a = ok_json(url, &["account", "open", "--owner", "alice", "--currency", "EUR"]);
    let b = ok_json(url, &["account", "open", "--owner", "bob", "--currency", "EUR", "--overdraft-limit", "10.00"]);
    let (a_id, b_id) = (a["id"].as_i64().unwrap().to_string(), b["id"].as_i64().unwrap().to_string());
    assert_eq!(b["overdraft_limit"], "10.00");
    let dep = ok_json(url, &["deposit", "--account", &a_id, "--amount", "100.00", "--key", "d-1"]);
    assert_eq!((dep["balance"].as_str(), dep["replayed"].as_bool()), (Some("100.00"), Some(false)));
    let again = ok_json(url, &["deposit", "--account", &a_id, "--amount", "100.00", "--key", "d-1"]);
    assert_eq!((again["balance"].as_str(), again["replayed"].as_bool()), (Some("100.00"), Some(true)));
    ok_json(url, &["transfer", "--from", &a_id, "--to", &b_id, "--amount", "10.00", "--key", "t-1"]);
    let w = ok_json(url, &["withdraw", "--account", &a_id, "--to", IBAN, "--amount", "50.00", "--key", "w-1"]);
    assert_eq!(w["status"], "pending");
    let wid = w["id"].as_i64().unwrap().to_string();

    let lines = format!(
        "{{\"account\": {a_id}, \"to\": \"{IBAN}\", \"amount\": \"5.00\", \"key\": \"s-1\"}}\n\
         not json\n\
         {{\"account\": {a_id}, \"to\": \"{IBAN}\", \"amount\": \"5.001\", \"key\": \"s-2\"}}\n\
         \n\
         {{\"account\": {b_id}, \"to\": \"{IBAN}\", \"amount\": \"1.00\", \"key\": \"s-3\"}}\n\
         {{\"account\": {a_id}, \"to\": \"{IBAN}\", \"amount\": \"5.00\", \"key\": \"s-1\"}}\n"
    );
    let out = with_stdin(url, &["--json", "submit"], lines);
    assert_eq!(out.status.code(), Some(1), "a refused line makes the exit code 1");
    let results = json_lines(&out.stdout);
    let outcomes: Vec<(i64, &str)> =
        results[..6].iter().map(|r| (r["line"].as_i64().unwrap(), r["outcome"].as_str().unwrap())).collect();
    let expected = [(1, "enqueued"), (2, "refused"), (3, "refused"), (4, "skipped"), (5, "enqueued"), (6, "replayed")];
    assert_eq!(outcomes, expected, "{results:?}");
    assert_eq!(results[0]["id"], results[5]["id"], "a replay answers with the first withdrawal");
    assert!(results[1]["error"].as_str().unwrap().contains("bad JSON"), "{}", results[1]);
    assert_eq!((results[2]["kind"].as_str(), results[2]["field"].as_str()), (Some("invalid_input"), Some("amount")));
    let summary = &results[6];
    let counts: Vec<i64> =
        ["lines", "enqueued", "replayed", "refused", "skipped"].iter().map(|k| summary[k].as_i64().unwrap()).collect();
    assert_eq!((counts, summary["skipped_lines"].clone()), (vec![6, 2, 1, 2, 1], serde_json::json!([4])));
    assert_eq!(results.len(), 7, "one answer per line and the summary");
    let error = json_lines(&out.stderr);
    assert_eq!((error.len(), error[0]["kind"].as_str()), (1, Some("refused")), "{error:?}");

    let mut daemon = spawn_daemon(url, &["--exit-when-idle"]);
    assert!(wait_exit(&mut daemon, std::time::Duration::from_secs(60)).success());
    let shown = ok_json(url, &["withdrawal", "show", &wid]);
    assert_eq!((shown["status"].as_str(), shown["attempts"].as_i64()), (Some("completed"), Some(1)));
    let listed = cli(url, &["--json", "withdrawal", "list", "--status", "completed", "--account", &a_id]);
    let rows: Vec<Value> =
        String::from_utf8_lossy(&listed.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    let shown_a = ok_json(url, &["account", "show", &a_id]);
    assert_eq!(shown_a["balance"], "35.00"); // 100 - 10 - 50 - 5
    let audit = ok_json(url, &["audit"]);
    assert_eq!(audit["clean"], true);
}

#[testing::test]
fn bad_input_gets_a_clear_one_line_error_and_changes_nothing() {
    let db = testing::committed();
    let a = ok_json(db.url(), &["account", "open", "--owner", "a", "--currency", "EUR"])["id"].as_i64().unwrap();
    let a = a.to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["deposit", "--account", "999999", "--amount", "1.00", "--key", "k"], "unknown account 999999"),
        (vec!["deposit", "--account", &a, "--amount", "1,00", "--key", "k"], "malformed amount"),
        (vec!["deposit", "--account", &a, "--amount", "-1.00", "--key", "k"], "must be positive"),
        (vec!["deposit", "--account", &a, "--amount", "0.001", "--key", "k"], "more decimals"),
        (vec!["deposit", "--account", &a, "--amount", "1.00"], "--key"),
        (vec!["deposit", "--account", &a, "--amount", "1.00", "--key", "has space"], "idempotency key"),
        (vec!["withdraw", "--account", &a, "--to", "DE00370400440532013000", "--amount", "1.00", "--key", "k"], "IBAN"),
        (vec!["withdraw", "--account", "0", "--to", IBAN, "--amount", "1.00", "--key", "k"], "ids are positive"),
        (vec!["account", "open", "--owner", "x", "--currency", "XYZ"], "unknown currency"),
        (vec!["account", "show", "424242"], "unknown account"),
        (vec!["withdrawal", "show", "424242"], "unknown withdrawal"),
        (vec!["withdrawal", "list", "--status", "done"], "possible values: pending, paying_out"),
        (vec!["transfer", "--from", &a, "--to", &a, "--amount", "1.00", "--key", "k"], "two different accounts"),
        (vec!["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, expected) in cases {
        let err = refused(&db, &args, None);
        assert!(err.contains(expected), "{args:?}: expected {expected:?} in {err:?}");
    }
    let err = refused(&db, &["submit"], Some("{\"account\": 1, \"to\": \"x\"}\n"));
    assert!(err.contains("1 line(s): 0 enqueued, 0 replayed, 1 refused"), "{err}");
}

#[testing::test]
fn passwords_never_reach_the_output() {
    let out = worker_command()
        .args(["account", "show", "1", "--database-url", "postgres://app:hunter2-secret@127.0.0.1:1/ledger"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("hunter2-secret"), "{stderr}");
    assert!(stderr.contains("app:***@"), "{stderr}");
}

#[testing::test]
fn metrics_are_served_in_prometheus_format_when_asked() {
    let db = testing::committed();
    let mut conn = db.conn();
    seed(&mut conn, 2, "100.00", 10);
    // Ask the OS for a free port, then hand it to the daemon.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut daemon = spawn_daemon(db.url(), &["--metrics-addr", &addr]);
    wait_for(std::time::Duration::from_secs(30), "jobs to finish", || pending(&mut conn) == 0);
    let scrape = || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let value = |body: &str, name: &str| -> u64 {
        let line =
            body.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}: {body}"));
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    let finished = |body: &str| value(body, "ledger_jobs_debited_total") + value(body, "ledger_jobs_rejected_total");
    // The counters move just after each batch commits: a scrape right after the last
    // commit may still show the one before. Each job is counted once, so the counts
    // reach 10 and stay there.
    let mut body = scrape();
    wait_for(std::time::Duration::from_secs(30), "the metrics to count all 10 jobs", || {
        body = scrape();
        finished(&body) >= 10 && value(&body, "ledger_job_latency_seconds_count") >= 10
    });
    let _ = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    assert!(wait_exit(&mut daemon, std::time::Duration::from_secs(15)).success());
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert_eq!(finished(&body), 10, "{body}");
    assert!(body.contains("ledger_job_latency_seconds_count 10"), "{body}");
}

#[testing::test]
fn migrate_can_give_a_restored_ledger_a_new_instance_id_and_queued_payouts_keep_their_keys() {
    let db = testing::committed();
    let url = db.url();
    let first = ok_json(url, &["migrate"]);
    let old = first["instance_id"].as_str().unwrap().to_string();
    assert_eq!(old.len(), 32);
    let a = ok_json(url, &["account", "open", "--owner", "ida", "--currency", "EUR"]);
    let a_id = a["id"].as_i64().unwrap().to_string();
    ok_json(url, &["deposit", "--account", &a_id, "--amount", "10.00", "--key", "i-d"]);
    ok_json(url, &["withdraw", "--account", &a_id, "--to", IBAN, "--amount", "1.00", "--key", "i-w1"]);
    let mut daemon = spawn_daemon(url, &["--gateway", "none", "--exit-when-idle"]);
    assert!(wait_exit(&mut daemon, std::time::Duration::from_secs(60)).success());
    let renewed = ok_json(url, &["migrate", "--new-instance-id"]);
    let new = renewed["instance_id"].as_str().unwrap().to_string();
    assert!(renewed["instance_id_renewed"].as_bool().unwrap() && new != old && new.len() == 32);
    ok_json(url, &["withdraw", "--account", &a_id, "--to", IBAN, "--amount", "1.00", "--key", "i-w2"]);
    let mut daemon = spawn_daemon(url, &["--gateway", "none", "--exit-when-idle"]);
    assert!(wait_exit(&mut daemon, std::time::Duration::from_secs(60)).success());
    let mut conn = db.conn();
    let keys: Vec<String> =
        ledger_core::payouts::list(&mut conn, None, 10).unwrap().into_iter().map(|p| p.idempotency_key).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys[0].starts_with(&format!("payout-{new}-w")), "the new payout carries the new id: {keys:?}");
    assert!(keys[1].starts_with(&format!("payout-{old}-w")), "the queued one keeps its key: {keys:?}");
}

#[testing::test]
fn run_refuses_to_start_without_an_explicit_gateway() {
    let db = testing::committed();
    let url = db.url();
    let out = cli(url, &["run", "--exit-when-idle"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--gateway webhook") && stderr.contains("--gateway log") && stderr.contains("--gateway none"),
        "{stderr}"
    );
}

/// The daemon's binary has no demo and no bench: they start throwaway servers, and live
/// in `ledger-demo`.
#[test]
fn the_daemon_binary_has_no_demo_and_no_bench() {
    for command in ["demo", "bench"] {
        let out = worker_command().arg(command).stdin(Stdio::null()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(stderr.contains(&format!("unrecognized subcommand '{command}'")), "{stderr}");
    }
}

#[testing::test]
fn migrate_sets_an_overdraft_ceiling_that_account_open_keeps() {
    let db = testing::committed();
    let url = db.url();
    let set = ok_json(url, &["migrate", "--max-overdraft", "EUR=50.00", "--max-overdraft", "JPY=0"]);
    assert_eq!(set["overdraft_ceilings"][0]["max_overdraft"], "50.00");
    assert_eq!(set["overdraft_ceilings"][1]["max_overdraft"], "0");
    ok_json(url, &["account", "open", "--owner", "at", "--currency", "EUR", "--overdraft-limit", "50.00"]);
    let err =
        refused(&db, &["account", "open", "--owner", "over", "--currency", "EUR", "--overdraft-limit", "50.01"], None);
    assert!(err.contains("50.01 EUR is above this ledger's ceiling of 50.00 EUR"), "{err}");
    let err = refused(&db, &["account", "open", "--owner", "yen", "--currency", "JPY", "--overdraft-limit", "1"], None);
    assert!(err.contains("ceiling of 0 JPY"), "{err}");
    for bad in ["EUR", "XXX=1.00", "EUR=-1", "EUR=1.001"] {
        refused(&db, &["migrate", "--max-overdraft", bad], None);
    }
}
