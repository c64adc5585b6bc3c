//! `submit` past one chunk (1,000 lines per `request_batch`): every line answered once,
//! in input order, replays across chunks and within one, refusals line by line, the
//! summary's counts, and the jobs written.

use super::*;

#[testing::test]
fn submit_of_a_multi_chunk_input_answers_every_line_in_order_with_the_right_counts() {
    let db = testing::committed();
    let mut conn = db.conn();
    let (accounts, _) = seed(&mut conn, 3, "100.00", 0);
    let line = |account: i64, amount: &str, key: &str| {
        format!("{{\"account\": {account}, \"to\": \"{IBAN}\", \"amount\": \"{amount}\", \"key\": \"{key}\"}}")
    };
    let mut input = Vec::new();
    let mut expected: Vec<&str> = Vec::new();
    for n in 1..=2_500_u64 {
        let a = accounts[n as usize % 3].get();
        let (text, outcome) = match n {
            7 => ("not json".to_string(), "refused"),
            999 => (line(accounts[998 % 3].get(), "1.00", "k-998"), "replayed"),
            1_001 => (line(999_999, "1.00", "k-1001"), "refused"),
            1_200 => (String::new(), "skipped"),
            1_500 => (line(a, "1.001", "k-1500"), "refused"),
            2_003 => (line(accounts[0].get(), "1.00", "k-3"), "replayed"),
            2_500 => (line(accounts[0].get(), "2.00", "k-3"), "refused"),
            _ => (line(a, "1.00", &format!("k-{n}")), "enqueued"),
        };
        input.push(text);
        expected.push(outcome);
    }
    let out = with_stdin(db.url(), &["--json", "submit"], input.join("\n") + "\n");
    assert_eq!(out.status.code(), Some(1), "refused lines make the exit code 1");
    let results = json_lines(&out.stdout);
    assert_eq!(results.len(), 2_501, "one answer per line and the summary");
    let numbers: Vec<i64> = results[..2_500].iter().map(|r| r["line"].as_i64().unwrap()).collect();
    assert_eq!(numbers, (1..=2_500).collect::<Vec<i64>>(), "answers in input order");
    let outcomes: Vec<&str> = results[..2_500].iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, expected);
    assert_eq!(results[998]["id"], results[997]["id"], "a replay within a chunk answers with the first withdrawal");
    assert_eq!(results[2_002]["id"], results[2]["id"], "a replay across chunks too");
    assert_eq!(results[1_000]["kind"].as_str(), Some("not_found"), "{}", results[1_000]);
    assert_eq!(results[2_499]["code"].as_str(), Some("idempotency_conflict"), "{}", results[2_499]);
    let summary = &results[2_500];
    let counts: Vec<i64> =
        ["lines", "enqueued", "replayed", "refused", "skipped"].iter().map(|k| summary[k].as_i64().unwrap()).collect();
    assert_eq!((counts, summary["skipped_lines"].clone()), (vec![2_500, 2_493, 2, 4, 1], serde_json::json!([1_200])));
    assert_eq!(pending(&mut conn), 2_493, "one pending job per enqueued line");
}
