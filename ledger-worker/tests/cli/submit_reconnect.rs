//! `submit` and `transfer submit` go on after their database connection is lost (a
//! terminated backend, as in a server restart or failover), between chunks or inside a
//! batch: the chunk is sent again on a new connection, every line is answered once,
//! every key applied once.

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use std::time::Duration;

use super::*;

/// The `application_name` the command under test connects with (libpq's PGAPPNAME),
/// so the test ends that backend and no other.
const APP: &str = "reconnect-under-test";

/// Where the command is when its backend is ended.
#[derive(Clone, Copy)]
enum Between {
    /// Idle between two chunks: the next chunk's first statement finds it lost.
    Chunks,
    /// In the next chunk's batch, waiting for the row lock on this account (held by
    /// the test): lost in the middle of its transaction.
    BatchWaitingOn(i64),
}

/// Runs `args` with its stdin fed by hand: `first` lines (one chunk), then, once all of
/// them are answered on stdout, `rest`, with the command's backend ended where `at`
/// says. Returns the exit code, the answer lines and stderr.
fn across_a_lost_connection(
    db: &testing::TestDb,
    args: &[&str],
    (first, rest): (&[String], &[String]),
    at: Between,
) -> (Option<i32>, Vec<Value>, String) {
    use std::io::BufRead;
    let mut conn = db.conn();
    let mut child = spawn_under_test(args, db.url());
    let mut stdin = child.stdin.take();
    let (stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    // Read as it runs: a pipe nobody reads would fill and block the command.
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let out = {
        let answered = answered.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                answered.lock().unwrap().push(line?);
            }
            Ok::<_, std::io::Error>(())
        })
    };
    let err = std::thread::spawn(move || std::io::read_to_string(&mut stderr));
    stdin.as_mut().unwrap().write_all((first.join("\n") + "\n").as_bytes()).unwrap();
    // Answered, so its commit is done and known: the connection is lost after it.
    wait_for(Duration::from_secs(60), "the first chunk to be answered", || {
        answered.lock().unwrap().len() == first.len()
    });
    let mut lock = db.conn();
    if let Between::BatchWaitingOn(account) = at {
        AnsiTransactionManager::begin_transaction(&mut lock).unwrap();
        lock.batch_execute(&format!("SELECT id FROM accounts WHERE id = {account} FOR UPDATE")).unwrap();
        // The end of the input sends the last chunk.
        write_and_close(stdin.take().unwrap(), rest);
        let blocked = format!(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = '{APP}' AND wait_event_type = 'Lock'"
        );
        wait_for(Duration::from_secs(60), "the next batch to wait for the row lock", || {
            count(&mut conn, &blocked) == 1
        });
    }
    let ended = count(
        &mut conn,
        &format!(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = '{APP}'"
        ),
    );
    assert_eq!(ended, 1, "the command's one connection was ended");
    match at {
        Between::Chunks => write_and_close(stdin.take().unwrap(), rest),
        Between::BatchWaitingOn(_) => AnsiTransactionManager::commit_transaction(&mut lock).unwrap(),
    }
    let status = wait_exit(&mut child, Duration::from_secs(120));
    out.join().expect("the stdout reader panicked").unwrap();
    let stderr = err.join().expect("the stderr reader panicked").unwrap();
    let lines = std::mem::take(&mut *answered.lock().unwrap());
    (status.code(), json_lines((lines.join("\n") + "\n").as_bytes()), stderr)
}

/// Starts the command under test (named [`APP`]) on `url`, its stdin, stdout and stderr
/// piped; killed when dropped.
fn spawn_under_test(args: &[&str], url: &str) -> Daemon {
    let command = worker_command()
        .args(args)
        .env("DATABASE_URL", url)
        .env("PGAPPNAME", APP)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Daemon::from(command)
}

/// A transfer line of 0.01 from `a` to `b` under key `key`.
fn transfer_line(a: i64, b: i64, key: &str) -> String {
    format!("{{\"from\": {a}, \"to\": {b}, \"amount\": \"0.01\", \"key\": \"{key}\"}}")
}

fn write_and_close(mut stdin: std::process::ChildStdin, lines: &[String]) {
    stdin.write_all((lines.join("\n") + "\n").as_bytes()).unwrap();
}

fn outcomes_and_summary(results: &[Value]) -> (Vec<String>, Value) {
    let (summary, answers) = results.split_last().expect("a summary");
    (answers.iter().map(|r| r["outcome"].as_str().unwrap().to_string()).collect(), summary.clone())
}

#[testing::test]
fn submit_reconnects_after_its_connection_is_lost_between_chunks_and_applies_every_line_once() {
    submit_across_a_lost_connection(|_| Between::Chunks);
}

#[testing::test]
fn submit_reconnects_after_its_connection_is_lost_inside_a_batch_and_applies_every_line_once() {
    submit_across_a_lost_connection(|accounts| Between::BatchWaitingOn(accounts[0].get()));
}

fn submit_across_a_lost_connection(at: impl FnOnce(&[ledger_core::AccountId]) -> Between) {
    let db = testing::committed();
    let mut conn = db.conn();
    let (accounts, _) = seed(&mut conn, 3, "100.00", 0);
    let at = at(&accounts);
    let line = |n: usize| {
        let a = accounts[n % 3].get();
        format!("{{\"account\": {a}, \"to\": \"{IBAN}\", \"amount\": \"0.01\", \"key\": \"rc-{n}\"}}")
    };
    // Line 1,500 replays line 3 (a replay across the lost connection).
    let first: Vec<String> = (1..=1_000).map(line).collect();
    let rest: Vec<String> = (1_001..=2_000).map(|n| if n == 1_500 { line(3) } else { line(n) }).collect();
    let (code, results, stderr) = across_a_lost_connection(&db, &["--json", "submit"], (&first, &rest), at);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("\"notice\":\"reconnecting\""), "the reconnect is logged: {stderr}");
    let (outcomes, summary) = outcomes_and_summary(&results);
    assert_eq!(outcomes.len(), 2_000, "one answer per line");
    assert_eq!(outcomes.iter().filter(|o| *o == "enqueued").count(), 1_999, "{summary}");
    assert_eq!(outcomes[1_499], "replayed");
    assert_eq!((summary["enqueued"].as_i64(), summary["replayed"].as_i64()), (Some(1_999), Some(1)), "{summary}");
    assert_eq!(pending(&mut conn), 1_999, "one job per key");
}

#[testing::test]
fn transfer_submit_reconnects_after_its_connection_is_lost_inside_a_batch_and_applies_every_line_once() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (accounts, _) = seed(&mut conn, 2, "100.00", 0);
    let (a, b) = (accounts[0].get(), accounts[1].get());
    let line = |n: usize| transfer_line(a, b, &format!("rt-{n}"));
    let first: Vec<String> = (1..=1_000).map(line).collect();
    let rest: Vec<String> = (1_001..=1_500).map(line).collect();
    let transfers = "SELECT count(*) AS n FROM journal_entries WHERE kind = 'transfer'";
    let args = ["--json", "transfer", "submit"];
    let at = Between::BatchWaitingOn(b);
    let (code, results, stderr) = across_a_lost_connection(&db, &args, (&first, &rest), at);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("\"notice\":\"reconnecting\""), "the reconnect is logged: {stderr}");
    let (outcomes, summary) = outcomes_and_summary(&results);
    assert_eq!(outcomes, vec!["created".to_string(); 1_500], "{summary}");
    assert_eq!(count(&mut conn, transfers), 1_500, "one transfer per key");
    let mut balance = |id: i64| count(&mut conn, &format!("SELECT balance_minor AS n FROM accounts WHERE id = {id}"));
    assert_eq!((balance(a), balance(b)), (10_000 - 1_500, 10_000 + 1_500), "exact balances");
}

/// The case the resend exists for: the chunk's transaction commits, and the connection
/// is cut before its answer comes back. The command cannot know whether it committed;
/// sent again, every line is answered replayed, nothing is written twice.
#[testing::test]
fn transfer_submit_resent_after_a_commit_whose_answer_was_lost_replays_every_line() {
    use diesel::prelude::*;
    let db = testing::committed();
    let mut conn = db.conn();
    let (accounts, _) = seed(&mut conn, 2, "100.00", 0);
    let (a, b) = (accounts[0].get(), accounts[1].get());
    // The first transaction that writes a journal entry sleeps in its COMMIT (a
    // deferred constraint trigger), so the cut lands while it commits.
    conn.batch_execute(
        "CREATE TABLE test_sleep_once (slept bool NOT NULL);
         INSERT INTO test_sleep_once VALUES (false);
         CREATE FUNCTION test_sleep_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             UPDATE test_sleep_once SET slept = true WHERE NOT slept;
             IF FOUND THEN PERFORM pg_sleep(3); END IF;
             RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER test_sleep_at_commit AFTER INSERT ON journal_entries
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_sleep_at_commit();",
    )
    .unwrap();
    let param = |key: &str| {
        let (_, rest) = db.url().split_once(&format!("{key}=")).expect("the URL names its host and port");
        rest.split('&').next().unwrap().to_string()
    };
    let proxy =
        support::Proxy::start(std::path::PathBuf::from(param("host")).join(format!(".s.PGSQL.{}", param("port"))));
    let lines: Vec<String> = (1..=500).map(|n| transfer_line(a, b, &format!("cut-{n}"))).collect();
    let mut child = spawn_under_test(&["--json", "transfer", "submit"], &proxy.url(db.name()));
    write_and_close(child.stdin.take().unwrap(), &lines);
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || std::io::read_to_string(&mut stdout));
    let err = std::thread::spawn(move || std::io::read_to_string(&mut stderr));
    let sleeping = format!(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = '{APP}' AND wait_event = 'PgSleep'"
    );
    wait_for(Duration::from_secs(60), "the batch to sleep in its commit", || count(&mut conn, &sleeping) == 1);
    proxy.cut();
    let status = wait_exit(&mut child, Duration::from_secs(120));
    let stdout = out.join().expect("the stdout reader panicked").unwrap();
    let stderr = err.join().expect("the stderr reader panicked").unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("\"notice\":\"reconnecting\""), "the reconnect is logged: {stderr}");
    let (outcomes, summary) = outcomes_and_summary(&json_lines(stdout.as_bytes()));
    assert_eq!(outcomes, vec!["replayed".to_string(); 500], "written by the lost connection: {summary}");
    let slept: bool =
        diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>("(SELECT slept FROM test_sleep_once)"))
            .get_result(&mut conn)
            .unwrap();
    assert!(slept, "the first commit slept, and went through");
    let transfers = "SELECT count(*) AS n FROM journal_entries WHERE kind = 'transfer'";
    assert_eq!(count(&mut conn, transfers), 500, "one transfer per key");
    let mut balance = |id: i64| count(&mut conn, &format!("SELECT balance_minor AS n FROM accounts WHERE id = {id}"));
    assert_eq!((balance(a), balance(b)), (10_000 - 500, 10_000 + 500), "exact balances");
    drop(proxy);
}
