//! Lists that scale: `--after` pages in ascending id order, without `--limit` everything
//! streams, and together they list each row exactly once.

use super::*;

fn ids(url: &str, args: &[&str]) -> Vec<i64> {
    let out = cli(url, &[&["--json"], args].concat());
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    json_lines(&out.stdout).iter().map(|row| row["id"].as_i64().unwrap()).collect()
}

#[testing::test]
fn withdrawals_and_payouts_list_by_cursor_exactly_once() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (accounts, jobs) = seed(&mut conn, 5, "100000.00", 2_500);
    let mut expected: Vec<i64> = jobs.iter().map(|j| j.get()).collect();
    expected.sort_unstable();

    // Everything, in ascending order, past the command's internal 1,000-row pages.
    assert_eq!(ids(db.url(), &["withdrawal", "list"]), expected);
    // By hand, 700 at a time with the last id as the cursor.
    let mut paged = Vec::new();
    loop {
        let mut args = vec!["withdrawal".to_string(), "list".into(), "--limit".into(), "700".into()];
        if let Some(last) = paged.last() {
            args.extend(["--after".to_string(), format!("{last}")]);
        }
        let page = ids(db.url(), &args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(page.len() <= 700);
        if page.is_empty() {
            break;
        }
        paged.extend(page);
    }
    assert_eq!(paged, expected, "no duplicates, none missed");
    let account = accounts[0].get();
    let mine = ids(db.url(), &["withdrawal", "list", "--account", &account.to_string(), "--status", "pending"]);
    assert_eq!(mine.len(), 500, "every fifth job is on the first account");
    let after = ids(db.url(), &["withdrawal", "list", "--after", &expected[2_000].to_string()]);
    assert_eq!(after, expected[2_001..]);

    let mut daemon = spawn_daemon(db.url(), &["--gateway", "none", "--exit-when-idle"]);
    assert!(wait_exit(&mut daemon, std::time::Duration::from_secs(120)).success());
    let payouts = ids(db.url(), &["payout", "list"]);
    let queued = count(&mut conn, "SELECT count(*) AS n FROM payouts");
    assert_eq!(payouts.len() as i64, queued);
    assert!(payouts.windows(2).all(|w| w[0] < w[1]), "ascending, no duplicates");
    let second_half = ids(db.url(), &["payout", "list", "--status", "pending", "--after", &payouts[999].to_string()]);
    assert_eq!(second_half, payouts[1_000..]);
}
