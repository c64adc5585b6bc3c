//! `account history` streams an account's postings with running balances, past its
//! internal 1,000-row pages and by hand with `--after`; `account balance` answers at an
//! entry or a moment; both keep the error contract.

use super::*;
use diesel::sql_types::BigInt;
use diesel::RunQueryDsl;
use ledger_core::deposits::{self, Deposit};
use ledger_core::{Currency, Money, TxOptions};

/// `account history` as JSON lines.
fn history(url: &str, args: &[&str]) -> Vec<Value> {
    let out = cli(url, &[&["--json", "account", "history"], args].concat());
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    json_lines(&out.stdout)
}

#[derive(diesel::QueryableByName)]
struct Posting {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    balance_after_minor: i64,
}

#[testing::test]
fn account_history_streams_every_posting_with_its_balance_and_pages_by_cursor() {
    let db = testing::committed();
    let url = db.url();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "hist", Currency::EUR, "1.00");
    // 2,300 more postings, in one transaction: past the command's 1,000-row pages.
    ledger_core::transaction(&mut conn, &TxOptions::default(), |tx| {
        for i in 0..2_300_i64 {
            let amount = Money::from_minor(1 + i % 997, Currency::EUR).unwrap();
            let req = Deposit { account: a, amount, key: testing::key("h") };
            deposits::deposit_tx(tx, &req)?;
        }
        Ok::<_, ledger_core::LedgerError>(())
    })
    .unwrap();
    let id = a.get().to_string();
    let stored: Vec<Posting> =
        diesel::sql_query("SELECT id, balance_after_minor FROM postings WHERE account_id = $1 ORDER BY id")
            .bind::<BigInt, _>(a.get())
            .load(&mut conn)
            .unwrap();
    assert_eq!(stored.len(), 2_301);

    let all = history(url, &[&id]);
    assert_eq!(all.len(), stored.len(), "every posting, once");
    for (line, row) in all.iter().zip(&stored) {
        assert_eq!(line["posting"].as_i64(), Some(row.id));
        assert_eq!(line["balance_after"].as_str(), Some(Currency::EUR.format_minor(row.balance_after_minor).as_str()));
        assert_eq!((line["currency"].as_str(), line["kind"].as_str()), (Some("EUR"), Some("deposit")));
        assert!(line["created_at"].as_str().unwrap().ends_with('Z'), "{line}");
    }
    let shown = ok_json(url, &["account", "show", &id]);
    assert_eq!(all.last().unwrap()["balance_after"], shown["balance"], "the last line is the balance");

    // By hand, 700 at a time, the last posting as the cursor.
    let mut paged: Vec<Value> = Vec::new();
    loop {
        let after = paged.last().map_or("0".to_string(), |l| l["posting"].to_string());
        let page = history(url, &[&id, "--limit", "700", "--after", &after]);
        assert!(page.len() <= 700);
        if page.is_empty() {
            break;
        }
        paged.extend(page);
    }
    assert_eq!(paged, all, "no duplicates, none missed, the same balances");

    // Without --json: one readable line per posting.
    let human = cli(url, &["account", "history", &id, "--limit", "2"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().all(|l| l.contains("deposit") && l.contains("EUR")), "{text}");

    // The balance after an entry, and at moments.
    let mid = &all[1_500];
    let at = ok_json(url, &["account", "balance", &id, "--at-entry", &mid["entry"].to_string()]);
    assert_eq!(at["balance"], mid["balance_after"]);
    let early = ok_json(url, &["account", "balance", &id, "--at", "1970-01-02T00:00:00Z"]);
    assert_eq!(early["balance"], "0.00");
    let late = ok_json(url, &["account", "balance", &id, "--at", "2999-01-01T00:00:00+01:00"]);
    assert_eq!((late["balance"].as_str(), late["currency"].as_str()), (shown["balance"].as_str(), Some("EUR")));
}

#[testing::test]
fn account_history_and_balance_keep_the_error_contract() {
    let db = testing::committed();
    let a = ok_json(db.url(), &["account", "open", "--owner", "e", "--currency", "EUR"])["id"].as_i64().unwrap();
    let a = a.to_string();
    assert!(history(db.url(), &[&a]).is_empty(), "no postings: nothing printed, success");
    // (args, kind, exit status, field)
    let cases: Vec<(Vec<&str>, &str, i32, Option<&str>)> = vec![
        (vec!["account", "history", "424242"], "not_found", 1, Some("account")),
        (vec!["account", "balance", "424242", "--at-entry", "1"], "not_found", 1, Some("account")),
        (vec!["account", "history", &a, "--after=-3"], "invalid_input", 2, Some("posting")),
        (vec!["account", "balance", &a, "--at", "yesterday"], "invalid_input", 2, Some("at")),
        (vec!["account", "balance", &a, "--at-entry", "0"], "invalid_input", 2, Some("entry")),
        (vec!["account", "balance", &a], "usage", 2, None),
        (vec!["account", "balance", &a, "--at-entry", "1", "--at", "2026-01-01T00:00:00Z"], "usage", 2, None),
        (vec!["account", "history", &a, "--limit", "0"], "usage", 2, None),
    ];
    for (args, kind, exit, field) in cases {
        let line = refused(&db, &[&["--json"], &args[..]].concat(), None);
        let err: Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(err["kind"].as_str(), Some(kind), "{args:?}: {err}");
        if let Some(field) = field {
            assert_eq!(err["field"].as_str(), Some(field), "{args:?}: {err}");
        }
        let out = cli(db.url(), &args);
        assert_eq!(out.status.code(), Some(exit), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
