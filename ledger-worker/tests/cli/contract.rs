//! The output contract with `--json`: every failure is one JSON line on stderr with a
//! stable kind and the field or id concerned, under a documented exit code; amounts
//! people read are decimals with their currency; logs carry no colour codes off a
//! terminal.

use super::*;

/// Runs `--json` + `args`, which must fail with exit status `code` and change nothing;
/// every line of stdout and stderr must be JSON, and stderr exactly one line.
fn json_failure(db: &testing::TestDb, args: &[&str], code: i32) -> Value {
    let mut conn = db.conn();
    let before = testing::snapshot(&mut conn);
    let out = cli(db.url(), &[&["--json"], args].concat());
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    json_lines(&out.stdout);
    let errors = json_lines(&out.stderr);
    assert_eq!(errors.len(), 1, "{args:?}: one JSON error line expected, got {errors:?}");
    assert_eq!(testing::snapshot(&mut conn), before, "{args:?} changed the database");
    errors[0].clone()
}

#[testing::test]
fn every_failure_is_one_json_line_with_a_kind_and_a_documented_exit_code() {
    let db = testing::committed();
    let a = ok_json(db.url(), &["account", "open", "--owner", "a", "--currency", "EUR"])["id"].as_i64().unwrap();
    let b = ok_json(db.url(), &["account", "open", "--owner", "b", "--currency", "EUR"])["id"].as_i64().unwrap();
    let (a_s, b_s) = (a.to_string(), b.to_string());
    ok_json(db.url(), &["deposit", "--account", &a_s, "--amount", "11.50", "--key", "d-1"]);
    // (args, exit code, kind, field, id)
    type Case<'a> = (Vec<&'a str>, i32, &'a str, Option<&'a str>, Option<i64>);
    let cases: Vec<Case> = vec![
        (
            vec!["transfer", "--from", &a_s, "--to", &b_s, "--amount", "100000.00", "--key", "t"],
            1,
            "insufficient_funds",
            Some("account"),
            Some(a),
        ),
        (vec!["account", "show", "424242"], 1, "not_found", Some("account"), Some(424242)),
        (vec!["withdrawal", "show", "424242"], 1, "not_found", Some("withdrawal"), Some(424242)),
        (vec!["payout", "retry", "424242"], 1, "not_found", Some("payout"), Some(424242)),
        (vec!["deposit", "--account", &a_s, "--amount", "12.00", "--key", "d-1"], 1, "conflict", Some("key"), None),
        (
            vec!["deposit", "--account", &a_s, "--amount", "1,00", "--key", "k"],
            2,
            "invalid_input",
            Some("amount"),
            None,
        ),
        (
            vec!["withdraw", "--account", "0", "--to", IBAN, "--amount", "1", "--key", "k"],
            2,
            "invalid_input",
            Some("account"),
            None,
        ),
        (
            vec!["deposit", "--account", &a_s, "--amount", "100 JPY", "--key", "k"],
            2,
            "invalid_input",
            Some("amount"),
            None,
        ),
        (vec!["deposit", "--account", &a_s, "--amount", "1.00"], 2, "usage", None, None),
        (vec!["withdrawal", "list", "--status", "done"], 2, "usage", Some("status"), None),
        (vec!["account", "show", "x"], 2, "usage", Some("id"), None),
        (vec!["frobnicate"], 2, "usage", None, None),
        (vec!["run", "--exit-when-idle"], 2, "usage", Some("gateway"), None),
    ];
    for (args, code, kind, field, id) in cases {
        let e = json_failure(&db, &args, code);
        let got = (e["kind"].as_str(), e["field"].as_str(), e["id"].as_i64());
        assert_eq!(got, (Some(kind), field, id), "{args:?}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{args:?}: {e}");
    }
    let funds =
        json_failure(&db, &["transfer", "--from", &a_s, "--to", &b_s, "--amount", "100000.00", "--key", "t"], 1);
    assert!(
        funds["message"].as_str().unwrap().contains("balance 11.50 EUR, floor 0.00 EUR, requested 100000.00 EUR"),
        "{funds}"
    );
    // The payout settings are checked by ledger-core, which names its own fields; the
    // daemon's message names the flag.
    let lease = json_failure(&db, &["run", "--gateway", "log", "--payout-lease-ms", "1000"], 2);
    assert_eq!(lease["kind"], "usage", "{lease}");
    assert!(
        lease["message"]
            .as_str()
            .unwrap()
            .starts_with("--payout-lease-ms (1000) must be at least three gateway timeouts"),
        "{lease}"
    );
    // Without --json the same failure is one human line.
    let out = cli(db.url(), &["account", "show", "424242"]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "error: unknown account 424242\n");
}

#[testing::test]
fn an_unreachable_database_has_its_own_kind_and_exit_code() {
    // Nothing listens on port 1; the URL's password must not leak into the message.
    let url = "postgres://app:hunter2@127.0.0.1:1/ledger";
    let out = worker_command().args(["--json", "account", "show", "1", "--database-url", url]).output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    let e = json_lines(&out.stderr);
    assert_eq!(e[0]["kind"], "database_unreachable", "{e:?}");
    assert!(!e[0]["message"].as_str().unwrap().contains("hunter2"), "{e:?}");
    let run = worker_command().args(["run", "--gateway", "none", "--database-url", url]).output().unwrap();
    assert_eq!(run.status.code(), Some(4), "{}", String::from_utf8_lossy(&run.stderr));
}

#[testing::test]
fn a_rejected_withdrawal_stores_its_reason_in_decimals_and_logs_have_no_colour_codes() {
    let db = testing::committed();
    let url = db.url();
    let a = ok_json(url, &["account", "open", "--owner", "a", "--currency", "EUR"])["id"].as_i64().unwrap().to_string();
    ok_json(url, &["deposit", "--account", &a, "--amount", "11.50", "--key", "d"]);
    let w = ok_json(url, &["withdraw", "--account", &a, "--to", IBAN, "--amount", "100000.00", "--key", "w"]);
    // Human logs on a pipe, as an operator's supervisor would capture them.
    let out = worker_command()
        .args(["run", "--gateway", "none", "--exit-when-idle", "--log-format", "human"])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{logs}");
    assert!(logs.contains("starting") && !logs.contains('\x1b'), "no escape codes on a pipe: {logs:?}");
    let shown = ok_json(url, &["withdrawal", "show", &w["id"].as_i64().unwrap().to_string()]);
    assert_eq!(shown["status"], "rejected");
    let expected =
        format!("insufficient funds in account {a}: balance 11.50 EUR, floor 0.00 EUR, requested 100000.00 EUR");
    assert_eq!(shown["reason"], expected.as_str());
}

#[test]
fn colours_only_on_a_terminal_without_no_color() {
    use ledger_worker::cmd::colours_wanted;
    use std::ffi::OsStr;
    assert!(colours_wanted(true, None));
    assert!(colours_wanted(true, Some(OsStr::new(""))), "an empty NO_COLOR does not count");
    assert!(!colours_wanted(true, Some(OsStr::new("1"))));
    assert!(!colours_wanted(false, None));
}

#[testing::test]
fn a_failed_audit_exits_1_with_its_report_on_stdout_and_a_json_error_on_stderr() {
    let db = testing::committed();
    let a = ok_json(db.url(), &["account", "open", "--owner", "a", "--currency", "EUR"])["id"].as_i64().unwrap();
    let mut conn = db.conn();
    // A stored balance that no posting explains: what the audit is there to find.
    diesel::RunQueryDsl::execute(
        diesel::sql_query(format!("UPDATE accounts SET balance_minor = 5 WHERE id = {a}")),
        &mut conn,
    )
    .unwrap();
    let out = cli(db.url(), &["--json", "audit"]);
    assert_eq!(out.status.code(), Some(1));
    let report = json_lines(&out.stdout);
    assert_eq!(report[0]["clean"], false);
    let n = report[0]["violations"].as_array().unwrap().len();
    let e = json_lines(&out.stderr);
    assert_eq!((e.len(), e[0]["kind"].as_str()), (1, Some("audit_failed")), "{e:?}");
    assert!(e[0]["message"].as_str().unwrap().contains(&format!("{n} violation(s)")), "{e:?}");
}
