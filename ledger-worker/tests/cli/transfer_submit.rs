//! `transfer submit`: answers line by line with balances, linked chains all-or-nothing
//! (also across the 1,000-line chunk boundary, and an overlong chain refused to its closing line), bad lines refused with nothing written,
//! and `transfer --metadata` on the single form.

use super::*;

/// Runs `--json transfer submit` on `input`: its exit code and its answer lines.
fn transfer_submit(url: &str, input: String) -> (Option<i32>, Vec<Value>) {
    let out = with_stdin(url, &["--json", "transfer", "submit"], input);
    (out.status.code(), json_lines(&out.stdout))
}

fn line(from: i64, to: i64, amount: &str, key: &str, linked: bool) -> String {
    format!("{{\"from\": {from}, \"to\": {to}, \"amount\": \"{amount}\", \"key\": \"{key}\", \"linked\": {linked}}}")
}

fn balance(url: &str, id: i64) -> String {
    ok_json(url, &["account", "show", &id.to_string()])["balance"].as_str().unwrap().to_string()
}

/// A fresh database with `n` accounts holding `funds` each, and their ids.
fn funded(n: usize, funds: &str) -> (testing::TestDb, Vec<i64>) {
    let db = testing::committed();
    let (ids, _) = seed(&mut db.conn(), n, funds, 0);
    (db, ids.iter().map(|id| id.get()).collect())
}

fn outcomes(results: &[Value]) -> Vec<&str> {
    results.iter().filter(|r| r["summary"].is_null()).map(|r| r["outcome"].as_str().unwrap()).collect()
}

fn summary(results: &[Value]) -> Vec<i64> {
    let s = results.last().unwrap();
    assert_eq!(s["summary"], true, "{s}");
    ["lines", "created", "replayed", "refused", "skipped"].iter().map(|k| s[k].as_i64().unwrap()).collect()
}

#[testing::test]
fn transfer_submit_answers_created_replayed_refused_and_skipped_with_balances() {
    let (db, ids) = funded(2, "100.00");
    let (a, b) = (ids[0], ids[1]);
    let input = [
        line(a, b, "10.00", "t-1", false),
        String::new(),
        line(a, b, "10.00", "t-1", false),
        line(a, b, "500.00", "t-2", false),
        format!("{{\"from\": {a}, \"to\": {b}, \"amount\": 1, \"key\": \"t-3\"}}"),
        format!("{{\"from\": {a}, \"to\": {b}, \"amount\": \"1.00\", \"key\": \"t-4\", \"memo\": 1}}"),
        format!("{{\"from\": {a}, \"to\": {b}, \"amount\": \"2.00\", \"key\": \"t-5\", \"metadata\": {{\"o\": 7}}}}"),
    ]
    .join("\n");
    let (code, results) = transfer_submit(db.url(), input + "\n");
    assert_eq!(code, Some(1), "refused lines make the exit code 1");
    let expected = ["created", "skipped", "replayed", "refused", "refused", "refused", "created"];
    assert_eq!(outcomes(&results), expected, "{results:?}");
    assert_eq!(
        (results[0]["from_balance"].as_str(), results[0]["to_balance"].as_str()),
        (Some("90.00"), Some("110.00"))
    );
    assert_eq!(results[2]["entry"], results[0]["entry"], "a replay answers with the first entry");
    assert_eq!(results[3]["code"].as_str(), Some("insufficient_funds"), "{}", results[3]);
    assert!(results[4]["error"].as_str().unwrap().contains("not a JSON number"), "{}", results[4]);
    assert!(results[5]["error"].as_str().unwrap().contains("unknown field"), "{}", results[5]);
    assert_eq!(results[6]["to_balance"].as_str(), Some("112.00"));
    assert_eq!(summary(&results), vec![7, 2, 1, 3, 1]);
    assert_eq!(results.last().unwrap()["skipped_lines"], serde_json::json!([2]));
    assert_eq!((balance(db.url(), a), balance(db.url(), b)), ("88.00".into(), "112.00".into()));
}

#[testing::test]
fn a_linked_chain_with_one_bad_line_refuses_all_of_it_and_writes_nothing() {
    let (db, ids) = funded(3, "100.00");
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let input = [
        line(a, b, "1.00", "c-1", true),
        line(b, c, "1.00", "c-2", true),
        format!("{{\"from\": {c}, \"to\": {a}, \"amount\": \"1.00\", \"key\": \"c-3\", \"linked\": true, \"x\": 1}}"),
        line(c, a, "1.00", "c-4", false),
        line(a, b, "1.00", "d-1", true),
        line(b, c, "900.00", "d-2", false),
        line(a, c, "5.00", "e-1", false),
        line(a, b, "1.00", "f-1", true),
    ]
    .join("\n");
    let (code, results) = transfer_submit(db.url(), input);
    assert_eq!(code, Some(1));
    let expected = ["refused", "refused", "refused", "refused", "refused", "refused", "created", "refused"];
    assert_eq!(outcomes(&results), expected, "{results:?}");
    assert!(results[0]["error"].as_str().unwrap().contains("line 3 of its linked chain"), "{}", results[0]);
    assert!(results[2]["error"].as_str().unwrap().contains("unknown field"), "{}", results[2]);
    assert!(results[4]["error"].as_str().unwrap().contains("line 6 of its linked chain"), "{}", results[4]);
    assert!(results[7]["error"].as_str().unwrap().contains("still open"), "{}", results[7]);
    let balances: Vec<String> = [a, b, c].iter().map(|&id| balance(db.url(), id)).collect();
    assert_eq!(balances, ["95.00", "100.00", "105.00"], "only the single transfer was written");
}

#[testing::test]
fn a_chain_across_the_chunk_boundary_stays_whole() {
    let (db, ids) = funded(2, "10000.00");
    let (a, b) = (ids[0], ids[1]);
    let mut input: Vec<String> = (1..=995).map(|n| line(a, b, "1.00", &format!("s-{n}"), false)).collect();
    for n in 1..=10 {
        let amount = if n == 8 { "1.001" } else { "1.00" };
        input.push(line(b, a, amount, &format!("ch-{n}"), n < 10));
    }
    input.push(line(a, b, "1.00", "after", false));
    let (code, results) = transfer_submit(db.url(), input.join("\n") + "\n");
    assert_eq!(code, Some(1));
    let got = outcomes(&results);
    assert!(got[..995].iter().all(|o| *o == "created"), "{:?}", &got[..995]);
    assert!(got[995..1_005].iter().all(|o| *o == "refused"), "{:?}", &results[995..1_005]);
    assert_eq!(got[1_005], "created");
    assert!(results[995]["error"].as_str().unwrap().contains("line 1003 of its linked chain"), "{}", results[995]);
    assert_eq!(summary(&results), vec![1_006, 996, 0, 10, 0]);
    assert_eq!(balance(db.url(), b), "10996.00", "nothing of the chain was written");
}

#[testing::test]
fn the_flag_form_still_works_and_metadata_round_trips() {
    let (db, ids) = funded(2, "100.00");
    let (a, b) = (ids[0].to_string(), ids[1].to_string());
    let args =
        ["transfer", "--from", &a, "--to", &b, "--amount", "3.00", "--key", "m-1", "--metadata", "{\"order\": 7}"];
    let first = ok_json(db.url(), &args);
    assert_eq!((first["replayed"].as_bool(), &first["metadata"]), (Some(false), &serde_json::json!({"order": 7})));
    let again = ok_json(db.url(), &args);
    assert_eq!((again["replayed"].as_bool(), again["entry"].clone()), (Some(true), first["entry"].clone()));
    let human = cli(db.url(), &args);
    assert!(String::from_utf8_lossy(&human.stdout).contains("metadata {\"order\":7}"), "{human:?}");
    let plain = ok_json(db.url(), &["transfer", "--from", &a, "--to", &b, "--amount", "1.00", "--key", "m-2"]);
    assert_eq!((plain["replayed"].as_bool(), plain["metadata"].is_null()), (Some(false), true));
    assert_eq!(balance(db.url(), a.parse().unwrap()), "96.00");
    let err = refused(
        &db,
        &["transfer", "--from", &a, "--to", &b, "--amount", "1.00", "--key", "m-3", "--metadata", "[1]"],
        None,
    );
    assert!(err.contains("JSON object"), "{err}");
    let err = refused(&db, &["transfer", "--from", &a, "--amount", "1.00", "--key", "m-4"], None);
    assert!(err.contains("--to"), "{err}");
}

#[testing::test]
fn a_chain_longer_than_a_batch_is_refused_to_its_closing_line_even_past_the_memory_cut() {
    let (db, ids) = funded(2, "100000.00");
    let (a, b) = (ids[0], ids[1]);
    // 3 single lines, then a chain of 12,500 lines (the reader cuts after 11,000 kept in
    // memory), a blank line inside it, then single lines again.
    let mut input: Vec<String> = (1..=3).map(|n| line(a, b, "1.00", &format!("s-{n}"), false)).collect();
    input.extend((1..=12_500).map(|n| line(b, a, "1.00", &format!("long-{n}"), n < 12_500)));
    input.insert(5_000, String::new());
    input.extend((1..=2).map(|n| line(a, b, "1.00", &format!("t-{n}"), false)));
    let (code, results) = transfer_submit(db.url(), input.join("\n") + "\n");
    assert_eq!(code, Some(1));
    let got = outcomes(&results);
    assert_eq!(got.len(), 12_506);
    assert!(got[..3].iter().all(|o| *o == "created"), "{:?}", &got[..3]);
    assert_eq!(got[5_000], "skipped");
    let chain: Vec<usize> = (3..12_504).filter(|&i| i != 5_000).collect();
    let not_refused: Vec<&Value> = chain.iter().map(|&i| &results[i]).filter(|r| r["outcome"] != "refused").collect();
    assert!(not_refused.is_empty(), "every chain line refused, got {:?}", not_refused.first());
    for i in [3, 11_000, 12_503] {
        let error = results[i]["error"].as_str().unwrap();
        assert!(error.contains("from line 4) has more than 10000 lines"), "line {}: {error}", i + 1);
    }
    assert!(got[12_504..].iter().all(|o| *o == "created"), "{:?}", &got[12_504..]);
    let numbers: Vec<i64> = results[..12_506].iter().map(|r| r["line"].as_i64().unwrap()).collect();
    assert_eq!(numbers, (1..=12_506).collect::<Vec<_>>(), "answers in input order");
    assert_eq!(summary(&results), vec![12_506, 5, 0, 12_500, 1]);
    assert_eq!((balance(db.url(), a), balance(db.url(), b)), ("99995.00".into(), "100005.00".into()));
}

/// The backend of the one connection in `db` that waits on a lock, once there is one.
fn backend_waiting_on_a_lock(observer: &mut diesel::PgConnection) -> i32 {
    use diesel::prelude::*;
    #[derive(diesel::QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let sql = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let mut found = None;
    common::wait_for(std::time::Duration::from_secs(20), "transfer submit to wait on the held lock", || {
        found = diesel::sql_query(sql).get_result::<Pid>(observer).optional().unwrap().map(|p| p.pid);
        found.is_some()
    });
    found.unwrap()
}

/// While alive, the test's database refuses new connections (open ones stay); they are
/// let in again on drop, also on panic. Set from the cluster's `postgres` database: a
/// database cannot refuse connections to itself.
struct NoNewConnections<'a>(&'a testing::TestDb);

impl<'a> NoNewConnections<'a> {
    fn new(db: &'a testing::TestDb) -> Self {
        allow_connections(db, false);
        NoNewConnections(db)
    }
}

impl Drop for NoNewConnections<'_> {
    fn drop(&mut self) {
        allow_connections(self.0, true);
    }
}

fn allow_connections(db: &testing::TestDb, allow: bool) {
    use diesel::prelude::*;
    let admin_url = db.url().replacen(&format!("/{}?", db.name()), "/postgres?", 1);
    assert_ne!(admin_url, db.url(), "the URL names the database before its parameters");
    let mut admin = diesel::pg::PgConnection::establish(&admin_url).unwrap();
    diesel::sql_query(format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {allow}", db.name()))
        .execute(&mut admin)
        .unwrap();
}

#[testing::test]
fn a_connection_lost_for_good_in_a_batch_answers_its_lines_unknown_never_refused() {
    use diesel::prelude::*;
    use std::io::{Read, Write};
    let (db, ids) = funded(2, "100.00");
    let (a, b) = (ids[0], ids[1]);
    let input: Vec<String> = (1..=3).map(|n| line(a, b, "1.00", &format!("lost-{n}"), false)).collect();
    let mut holder = db.conn();
    let (locked_tx, locked) = std::sync::mpsc::channel::<()>();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let (mut child, refusing) = std::thread::scope(|s| {
        // The batch will wait on the payer's row lock, held here, and lose its connection.
        s.spawn(move || {
            ledger_core::transaction(&mut holder, &ledger_core::TxOptions::no_retry(), |tx| {
                ledger_core::accounts::lock(tx, ledger_core::AccountId::new(a).unwrap())?;
                locked_tx.send(()).unwrap();
                let _ = release_rx.recv();
                Ok::<_, ledger_core::LedgerError>(())
            })
            .unwrap()
        });
        locked.recv().unwrap();
        let _release_on_panic = release.clone();
        let mut child: common::Daemon = common::worker_command()
            .args(["--json", "transfer", "submit"])
            .env("DATABASE_URL", db.url())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
            .into();
        child.stdin.take().unwrap().write_all((input.join("\n") + "\n").as_bytes()).unwrap();
        let mut observer = db.conn();
        let waiting = backend_waiting_on_a_lock(&mut observer);
        // No new connection either: every reconnect fails.
        let refusing = NoNewConnections::new(&db);
        diesel::sql_query(format!("SELECT pg_terminate_backend({waiting})")).execute(&mut observer).unwrap();
        drop(release);
        (child, refusing)
    });
    // It tries to connect again for about 6 to 12 s (RECONNECT_ATTEMPTS), then stops.
    common::wait_exit(&mut child, std::time::Duration::from_secs(60));
    drop(refusing);
    let (mut out, mut stderr) = (String::new(), String::new());
    child.stdout.as_mut().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.as_mut().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.try_wait().unwrap().expect("exited");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["lines"], 0, "no line answered, not even as refused: {out}");
    assert_eq!((&summary["refused"], &summary["created"]), (&0.into(), &0.into()), "{out}");
    assert_eq!(summary["stopped"], true, "{out}");
    assert_eq!(summary["unknown_lines"], serde_json::json!({"from": 1, "to": 3}), "{out}");
    assert!(stderr.contains("lines 1 to 3 are not answered and their outcome is unknown"), "{stderr}");
    assert!(stderr.contains("database_unreachable"), "{stderr}");
    assert!(stderr.contains("\"attempt\":6,"), "every reconnect was tried and announced: {stderr}");
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert_eq!((balance(db.url(), a), balance(db.url(), b)), ("100.00".into(), "100.00".into()));
}

#[testing::test]
fn a_chain_that_closes_exactly_at_the_memory_cut_is_refused_whole() {
    let (db, ids) = funded(2, "100000.00");
    let (a, b) = (ids[0], ids[1]);
    // 11,001 lines: the chunk reaches CHUNK_LINES + MAX_BATCH_ITEMS + 1 on the closing line.
    let mut input: Vec<String> = (1..=11_001).map(|n| line(b, a, "1.00", &format!("edge-{n}"), n < 11_001)).collect();
    input.push(line(a, b, "1.00", "after", false));
    let (code, results) = transfer_submit(db.url(), input.join("\n") + "\n");
    assert_eq!(code, Some(1));
    let got = outcomes(&results);
    assert!(got[..11_001].iter().all(|o| *o == "refused"), "{:?}", results.first());
    assert!(results[0]["error"].as_str().unwrap().contains("11001 lines"), "{}", results[0]);
    assert_eq!(got[11_001], "created");
    assert_eq!(summary(&results), vec![11_002, 1, 0, 11_001, 0]);
}
