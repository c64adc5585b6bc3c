//! The intake scenario: a JSON-lines file fed, as a caller would, to this binary's own
//! `--json submit` (withdrawal requests) and `--json transfer submit` (transfers, some
//! in short linked chains), each a child process with the file on its stdin. Timed from
//! the spawn to the child's exit; then its summary, the rows it wrote, the audit and
//! every account's balance are checked against what the file asked for.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use diesel::sql_types::{Array, Text};
use serde_json::Value;

use super::*;

/// Accounts the intake lines are spread over.
const INTAKE_ACCOUNTS: usize = 1_000;
/// Every `CHAIN_EVERY`-th transfer line starts a linked chain of `CHAIN_LEN` lines.
const CHAIN_EVERY: usize = 10;
const CHAIN_LEN: usize = 3;
/// The child is stopped (and the scenario fails) if it runs longer than this.
const CHILD_TIMEOUT: Duration = Duration::from_secs(600);
/// At most this many refused answers are quoted when a child refuses lines.
const QUOTED_REFUSALS: usize = 5;
/// Where the withdrawals go (a valid IBAN; the intake never pays anything out).
const DESTINATION: &str = "DE89370400440532013000";

/// Which line-reading command the intake scenario feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Intake {
    /// `--json submit`: withdrawal requests, enqueued.
    Withdrawals,
    /// `--json transfer submit`: transfers, created (one journal entry each).
    Transfers,
}

impl Intake {
    pub(super) const ALL: [Intake; 2] = [Intake::Withdrawals, Intake::Transfers];

    pub(super) fn label(self) -> &'static str {
        match self {
            Intake::Withdrawals => "submit",
            Intake::Transfers => "transfer submit",
        }
    }

    /// The child's arguments (`--json` is global, so it goes before the command).
    fn args(self) -> &'static [&'static str] {
        match self {
            Intake::Withdrawals => &["--json", "submit"],
            Intake::Transfers => &["--json", "transfer", "submit"],
        }
    }

    /// The summary's count of lines applied for the first time.
    fn done_field(self) -> &'static str {
        match self {
            Intake::Withdrawals => "enqueued",
            Intake::Transfers => "created",
        }
    }
}

/// One intake row: set up, write the file, run the child, check everything it did.
pub(super) fn run_intake(url: &str, intake: Intake, row: &mut Row) -> Result<()> {
    let n = row.ops;
    eprintln!("== intake ({}): {n} lines over {INTAKE_ACCOUNTS} accounts, one child process", intake.label());
    let (mut conn, accounts) = setup(url, INTAKE_ACCOUNTS, n)?;
    let before = Counts::read(&mut conn, &accounts)?;
    let dir = TempDir::new("ledger-bench-intake")?;
    let (input, deltas) = write_lines(dir.path(), intake, &accounts, n)?;
    let run = run_child(intake, url, &input, n)?;
    row.ops_per_sec = n as f64 / run.elapsed.as_secs_f64();
    row.rss_mb = run.rss_mb;
    eprintln!(
        "   {n} lines in {:.2} s: {:.0} lines/s (child peak RSS {:.1} MB)",
        run.elapsed.as_secs_f64(),
        row.ops_per_sec,
        run.rss_mb
    );
    check_summary(intake, &run.summary, n)?;
    let after = Counts::read(&mut conn, &accounts)?;
    check_rows(intake, &before, &after, n)?;
    check_balances(&before.balances, &after.balances, &deltas)?;
    audit_into(&mut conn, row)
}

/// A directory under the system's temp dir, removed with everything in it on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Result<TempDir> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether line `i` of `n` is linked to the next: the first `CHAIN_LEN - 1` lines of
/// every `CHAIN_EVERY`, when the whole chain fits before the end.
fn linked(i: usize, n: usize) -> bool {
    let position = i % CHAIN_EVERY;
    position + 1 < CHAIN_LEN && i - position + CHAIN_LEN <= n
}

/// Writes `n` lines for `intake` and returns the file and each account's expected
/// balance change (none for withdrawal requests: they are only enqueued).
fn write_lines(dir: &Path, intake: Intake, accounts: &[AccountId], n: usize) -> Result<(PathBuf, HashMap<i64, i64>)> {
    let path = dir.join("lines.jsonl");
    let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    let mut deltas: HashMap<i64, i64> = HashMap::new();
    let pick = || accounts[fastrand::usize(..accounts.len())].get();
    for i in 0..n {
        // 1.00 to 5.00: the accounts are funded for far more, so nothing is refused.
        let minor = fastrand::i64(100..=500);
        let amount = format!("{}.{:02}", minor / 100, minor % 100);
        let line = match intake {
            Intake::Withdrawals => {
                json!({ "account": pick(), "to": DESTINATION, "amount": amount, "key": format!("bench-w-{i}") })
            }
            Intake::Transfers => {
                let from = pick();
                let mut to = pick();
                while to == from {
                    to = pick();
                }
                add_to(&mut deltas, from, -minor)?;
                add_to(&mut deltas, to, minor)?;
                let mut line = json!({ "from": from, "to": to, "amount": amount, "key": format!("bench-t-{i}") });
                if linked(i, n) {
                    line["linked"] = json!(true);
                }
                line
            }
        };
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok((path, deltas))
}

/// Adds `by` to account `id`'s expected balance change.
fn add_to(deltas: &mut HashMap<i64, i64>, id: i64, by: i64) -> Result<()> {
    let change = deltas.entry(id).or_default();
    *change = change.checked_add(by).ok_or_else(|| anyhow!("account {id}'s balance change overflows"))?;
    Ok(())
}

/// What one child did: its last stdout line (the summary), how long it ran, its peak RSS.
struct ChildRun {
    summary: Value,
    elapsed: Duration,
    rss_mb: f64,
}

/// Runs `<exe> --json [transfer] submit` with `input` on stdin, showing its progress
/// (answers read back) until it exits. Non-zero exit: an error with its stderr and the
/// first refused answers.
fn run_child(intake: Intake, url: &str, input: &Path, n: usize) -> Result<ChildRun> {
    let exe = std::env::current_exe().context("locating ledger-demo")?;
    let stdin = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let command = format!("ledger-demo {}", intake.args().join(" "));
    let started = Instant::now();
    let child = Command::new(exe)
        .args(intake.args())
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{command}`"))?;
    // Dropping the guard stops the child, on every way out of here.
    let mut child = Worker { child };
    let answered = Arc::new(AtomicUsize::new(0));
    let stdout = child.child.stdout.take().expect("piped stdout");
    let reader = {
        let answered = Arc::clone(&answered);
        thread::spawn(move || read_answers(stdout, &answered))
    };
    let mut stderr = child.child.stderr.take().expect("piped stderr");
    let errors = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut progress = ledger_worker::progress::Progress::new(n);
    let mut rss_mb = 0.0;
    let status = loop {
        // VmHWM is the peak so far: the last reading before exit is the run's peak.
        rss_mb = profile::rss_mb(child.pid()).unwrap_or(rss_mb);
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > CHILD_TIMEOUT {
            child.stop()?;
            bail!("`{command}` still running after {} s: stopped", CHILD_TIMEOUT.as_secs());
        }
        progress.show(answered.load(Ordering::Relaxed).min(n), started.elapsed());
        thread::sleep(Duration::from_millis(10));
    };
    let elapsed = started.elapsed();
    progress.finish(answered.load(Ordering::Relaxed).min(n), elapsed);
    let (last, refusals) = reader.join().map_err(|_| anyhow!("the stdout reader panicked"))??;
    let stderr = errors.join().map_err(|_| anyhow!("the stderr reader panicked"))?;
    if !status.success() {
        let quoted =
            if refusals.is_empty() { String::new() } else { format!("; first refused: {}", refusals.join(" ")) };
        bail!("`{command}` failed ({status}): {}{quoted}", stderr.trim());
    }
    let summary = serde_json::from_str(&last).with_context(|| format!("`{command}`'s last line: {last:?}"))?;
    Ok(ChildRun { summary, elapsed, rss_mb })
}

/// Reads the child's answers, counting them; returns the last line and the first few
/// refused answers.
fn read_answers(stdout: impl Read, answered: &AtomicUsize) -> Result<(String, Vec<String>)> {
    let mut last = String::new();
    let mut refusals = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the child's answers")?;
        if refusals.len() < QUOTED_REFUSALS && line.contains(r#""outcome":"refused""#) {
            refusals.push(line.clone());
        }
        answered.fetch_add(1, Ordering::Relaxed);
        last = line;
    }
    Ok((last, refusals))
}

/// The summary must count every line as applied for the first time.
fn check_summary(intake: Intake, summary: &Value, n: usize) -> Result<()> {
    if summary["summary"] != json!(true) {
        bail!("the child's last line is not its summary: {summary}");
    }
    let expected = [("lines", n), (intake.done_field(), n), ("replayed", 0), ("refused", 0), ("skipped", 0)];
    for (field, want) in expected {
        if summary[field].as_u64() != Some(want as u64) {
            bail!("the summary says {field} = {}, expected {want}: {summary}", summary[field]);
        }
    }
    Ok(())
}

/// The rows the checks compare before and after a child's run.
struct Counts {
    withdrawals: i64,
    withdrawals_minor: i64,
    transfer_entries: i64,
    /// Each bench account's stored balance.
    balances: HashMap<i64, i64>,
}

#[derive(QueryableByName)]
struct Totals {
    #[diesel(sql_type = BigInt)]
    withdrawals: i64,
    #[diesel(sql_type = BigInt)]
    withdrawals_minor: i64,
    #[diesel(sql_type = BigInt)]
    transfer_entries: i64,
}

#[derive(QueryableByName)]
struct Balance {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    balance_minor: Option<i64>,
}

impl Counts {
    fn read(conn: &mut PgConnection, accounts: &[AccountId]) -> Result<Counts> {
        let totals: Totals = diesel::sql_query(
            "SELECT (SELECT count(*) FROM withdrawals) AS withdrawals,
                    (SELECT COALESCE(sum(amount_minor), 0)::bigint FROM withdrawals) AS withdrawals_minor,
                    (SELECT count(*) FROM journal_entries WHERE kind = $1) AS transfer_entries",
        )
        .bind::<Text, _>("transfer")
        .get_result(conn)
        .context("counting withdrawals and transfer entries")?;
        let ids: Vec<i64> = accounts.iter().map(|a| a.get()).collect();
        let rows: Vec<Balance> = diesel::sql_query("SELECT id, balance_minor FROM accounts WHERE id = ANY($1)")
            .bind::<Array<BigInt>, _>(&ids)
            .load(conn)
            .context("reading the bench accounts' balances")?;
        let balances = rows.into_iter().map(|b| (b.id, b.balance_minor.unwrap_or(0))).collect();
        let Totals { withdrawals, withdrawals_minor, transfer_entries } = totals;
        Ok(Counts { withdrawals, withdrawals_minor, transfer_entries, balances })
    }
}

/// Withdrawals created == lines enqueued; transfer journal entries == lines created;
/// and nothing of the other kind.
fn check_rows(intake: Intake, before: &Counts, after: &Counts, n: usize) -> Result<()> {
    let n = n as i64;
    let (withdrawals, entries) = match intake {
        Intake::Withdrawals => (n, 0),
        Intake::Transfers => (0, n),
    };
    let made = after.withdrawals - before.withdrawals;
    if made != withdrawals {
        bail!("{made} withdrawal row(s) written, expected {withdrawals}");
    }
    let made = after.transfer_entries - before.transfer_entries;
    if made != entries {
        bail!("{made} transfer journal entr(ies) written, expected {entries}");
    }
    let written = withdrawals.max(entries);
    let minor = after.withdrawals_minor - before.withdrawals_minor;
    if intake == Intake::Withdrawals && !(100 * n..=500 * n).contains(&minor) {
        bail!("the withdrawals written total {minor} minor units, outside 1.00 to 5.00 per line");
    }
    eprintln!("   checked: {written} {} written, as the summary says", intake.done_field());
    Ok(())
}

/// Every account moved by exactly what the file asked for, and the total is unchanged.
fn check_balances(before: &HashMap<i64, i64>, after: &HashMap<i64, i64>, deltas: &HashMap<i64, i64>) -> Result<()> {
    let total = |b: &HashMap<i64, i64>| b.values().try_fold(0_i64, |sum, v| sum.checked_add(*v));
    let (total_before, total_after) = (total(before), total(after));
    if total_before.is_none() || total_before != total_after {
        bail!("the bench accounts' total balance was {total_before:?} and is now {total_after:?}: not conserved");
    }
    let mut wrong: Vec<String> = before
        .iter()
        .filter_map(|(id, was)| {
            let want = was.checked_add(deltas.get(id).copied().unwrap_or(0))?;
            let now = after.get(id).copied();
            (now != Some(want)).then(|| format!("account {id}: {now:?} minor units, expected {want}"))
        })
        .collect();
    if before.len() != after.len() || !wrong.is_empty() {
        wrong.sort();
        wrong.truncate(QUOTED_REFUSALS);
        bail!("balances differ from what the lines asked for: {}", wrong.join("; "));
    }
    eprintln!(
        "   checked: {} balances as the lines asked, total {} minor units conserved",
        after.len(),
        total_after.unwrap_or(0)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(refused: u64) -> Value {
        json!({ "summary": true, "lines": 3, "created": 3 - refused, "replayed": 0, "refused": refused, "skipped": 0 })
    }

    #[test]
    fn a_summary_must_count_every_line_as_created() {
        assert!(check_summary(Intake::Transfers, &summary(0), 3).is_ok());
        let refused = check_summary(Intake::Transfers, &summary(1), 3).unwrap_err().to_string();
        assert!(refused.contains("created = 2, expected 3"), "{refused}");
        let wrong_name = check_summary(Intake::Withdrawals, &summary(0), 3).unwrap_err().to_string();
        assert!(wrong_name.contains("enqueued = null"), "{wrong_name}");
        let not_summary = check_summary(Intake::Transfers, &json!({ "line": 3 }), 3).unwrap_err().to_string();
        assert!(not_summary.contains("not its summary"), "{not_summary}");
    }

    #[test]
    fn balances_must_move_by_what_the_lines_asked_and_keep_their_total() {
        let map = |pairs: &[(i64, i64)]| pairs.iter().copied().collect::<HashMap<i64, i64>>();
        let (before, deltas) = (map(&[(1, 500), (2, 500)]), map(&[(1, -120), (2, 120)]));
        assert!(check_balances(&before, &map(&[(1, 380), (2, 620)]), &deltas).is_ok());
        let swapped = check_balances(&before, &map(&[(1, 620), (2, 380)]), &deltas).unwrap_err().to_string();
        assert!(swapped.contains("account 1: Some(620) minor units, expected 380"), "{swapped}");
        let lost = check_balances(&before, &map(&[(1, 380), (2, 600)]), &deltas).unwrap_err().to_string();
        assert!(lost.contains("not conserved"), "{lost}");
    }

    #[test]
    fn chains_are_three_lines_every_ten_and_never_left_open() {
        let linked_lines = |n| (0..n).filter(|&i| linked(i, n)).collect::<Vec<_>>();
        // Line 10 would open a chain of lines 10, 11 and 12: there is no line 12.
        assert_eq!(linked_lines(12), vec![0, 1]);
        assert_eq!(linked_lines(13), vec![0, 1, 10, 11]);
        assert_eq!(linked_lines(2), Vec::<usize>::new());
    }
}
