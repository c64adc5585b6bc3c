//! An account's history with running balances, paged by a cursor, and its balance at a
//! point in time: on a real PostgreSQL, against the stored balances.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{balance, eur, withdrawal};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable};
use ledger_core::accounts::{self, NewAccount, SystemRole};
use ledger_core::deposits::{self, Deposit};
use ledger_core::history::{self, At, HistoryLine, PostingId};
use ledger_core::journal::EntryKind;
use ledger_core::transfers::{self, Transfer};
use ledger_core::{withdrawals, AccountId, Currency, EntryId, LedgerError};
use ledger_testdb as testing;

/// Every page of `page_size` after the other, until a short one.
fn all_pages(conn: &mut PgConnection, account: AccountId, page_size: i64) -> Vec<HistoryLine> {
    let (mut lines, mut cursor, mut pages) = (Vec::new(), None::<PostingId>, 0);
    loop {
        let page = history::page(conn, account, cursor, page_size).unwrap();
        pages += 1;
        assert!(page.len() as i64 <= page_size);
        let full = page.len() as i64 == page_size;
        cursor = page.last().map(|l| l.posting_id).or(cursor);
        lines.extend(page);
        if !full {
            break;
        }
        assert!(pages < 10_000, "paging ends");
    }
    lines
}

#[derive(QueryableByName)]
struct Stored {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    balance_after_minor: Option<i64>,
}

/// The account's postings as stored: id and stored balance after each.
fn stored(conn: &mut PgConnection, account: AccountId) -> Vec<Stored> {
    diesel::sql_query("SELECT id, balance_after_minor FROM postings WHERE account_id = $1 ORDER BY id")
        .bind::<BigInt, _>(account.get())
        .load(conn)
        .unwrap()
}

/// Deposits, transfers both ways and withdrawals (debited, paying out) on `alice` and
/// `bob`: `n` movements.
fn movements(conn: &mut PgConnection, alice: AccountId, bob: AccountId, n: usize) {
    for i in 0..n {
        let amount = format!("{}.{:02}", 1 + i % 7, (i * 37) % 100);
        match i % 4 {
            0 => {
                let req = Deposit { account: alice, amount: eur(&amount), key: testing::key("d") };
                deposits::deposit(conn, &req).unwrap();
            }
            1 => {
                let t = Transfer { from: alice, to: bob, amount: eur(&amount), key: testing::key("t"), metadata: None };
                transfers::transfer(conn, &t).unwrap();
            }
            2 => {
                withdrawals::withdraw(conn, &withdrawal(alice, &amount, "w")).unwrap();
            }
            _ => {
                let t = Transfer { from: bob, to: alice, amount: eur("0.50"), key: testing::key("t"), metadata: None };
                transfers::transfer(conn, &t).unwrap();
            }
        }
    }
}

#[testing::test]
fn pages_of_any_size_chain_into_the_one_big_page_and_end_at_the_stored_balance() {
    let db = testing::committed();
    let mut conn = db.conn();
    let alice = testing::funded_account(&mut conn, "alice", Currency::EUR, "500.00");
    let bob = testing::funded_account(&mut conn, "bob", Currency::EUR, "20.00");
    movements(&mut conn, alice, bob, 41);

    let big = history::page(&mut conn, alice, None, 10_000).unwrap();
    assert_eq!(big.len(), 42, "one line per posting of alice: the funding and each movement");
    let rows = stored(&mut conn, alice);
    assert_eq!(big.len(), rows.len());
    // Ascending, and each running balance is the stored one; the last is the balance.
    let mut running = 0_i64;
    for (line, row) in big.iter().zip(&rows) {
        assert_eq!(line.posting_id.get(), row.id);
        running += line.amount_minor;
        assert_eq!(line.balance_after_minor, running, "the running sum at posting {}", row.id);
        assert_eq!(Some(line.balance_after_minor), row.balance_after_minor, "the stored balance at posting {}", row.id);
        assert_eq!(line.currency, Currency::EUR);
    }
    assert!(big.windows(2).all(|w| w[0].posting_id < w[1].posting_id && w[0].created_at <= w[1].created_at));
    assert_eq!(big.last().unwrap().balance_after_minor, balance(&mut conn, alice));
    assert_eq!(big[0].kind, EntryKind::Deposit);
    assert!(big.iter().any(|l| l.kind == EntryKind::Withdrawal && l.amount_minor < 0));
    assert!(big.iter().any(|l| l.kind == EntryKind::Transfer && l.amount_minor > 0));

    for size in [1, 2, 3, 7, 40, 41, 42] {
        assert_eq!(all_pages(&mut conn, alice, size), big, "pages of {size}");
    }
    // From the middle: the cursor's seed is the balance before it.
    let cut = &big[17];
    let rest = history::page(&mut conn, alice, Some(cut.posting_id), 5).unwrap();
    assert_eq!(rest, big[18..23].to_vec());
    // Past the end: an empty page, not an error.
    let end = history::page(&mut conn, alice, Some(big.last().unwrap().posting_id), 5).unwrap();
    assert!(end.is_empty());

    // A system account (no stored balance after its postings): the seed is the sum.
    let funding = accounts::system_account(&mut conn, SystemRole::ExternalFunding, Currency::EUR).unwrap();
    let system_big = history::page(&mut conn, funding, None, 10_000).unwrap();
    assert!(system_big.len() >= 10, "{}", system_big.len());
    assert!(stored(&mut conn, funding).iter().all(|r| r.balance_after_minor.is_none()));
    for size in [1, 3, 4] {
        assert_eq!(all_pages(&mut conn, funding, size), system_big, "system account, pages of {size}");
    }
    assert_eq!(system_big.last().unwrap().balance_after_minor, balance(&mut conn, funding));
    let sum: i64 = system_big.iter().map(|l| l.amount_minor).sum();
    assert_eq!(system_big.last().unwrap().balance_after_minor, sum);
}

#[testing::test]
fn the_balance_at_an_entry_or_a_moment_is_the_running_balance_then() {
    let db = testing::committed();
    let mut conn = db.conn();
    let alice = testing::funded_account(&mut conn, "alice", Currency::EUR, "500.00");
    let bob = testing::funded_account(&mut conn, "bob", Currency::EUR, "20.00");
    movements(&mut conn, alice, bob, 12);
    // A moment between two runs of movements (the server's clock is this machine's).
    std::thread::sleep(Duration::from_millis(50));
    let between = SystemTime::now();
    std::thread::sleep(Duration::from_millis(50));
    let first_run = history::page(&mut conn, alice, None, 10_000).unwrap();
    movements(&mut conn, alice, bob, 9);
    let lines = history::page(&mut conn, alice, None, 10_000).unwrap();
    assert!(lines.len() > first_run.len());

    for line in &lines {
        let at = history::balance_at(&mut conn, alice, At::Entry(line.entry_id)).unwrap();
        assert_eq!(at.balance_minor, line.balance_after_minor, "after entry {}", line.entry_id);
        assert_eq!((at.account, at.currency), (alice, Currency::EUR));
        // Just before the entry: the balance before the line.
        if let Ok(before) = EntryId::new(line.entry_id.get() - 1) {
            let expected = line.balance_after_minor - line.amount_minor;
            assert_eq!(history::balance_at(&mut conn, alice, At::Entry(before)).unwrap().balance_minor, expected);
        }
    }
    let at_between = history::balance_at(&mut conn, alice, At::Time(between)).unwrap();
    assert_eq!(at_between.balance_minor, first_run.last().unwrap().balance_after_minor);
    assert_ne!(at_between.balance_minor, balance(&mut conn, alice), "the second run moved money");
    let long_ago = UNIX_EPOCH + Duration::from_secs(86_400);
    assert_eq!(history::balance_at(&mut conn, alice, At::Time(long_ago)).unwrap().balance_minor, 0);
    let later = SystemTime::now() + Duration::from_secs(3_600);
    assert_eq!(
        history::balance_at(&mut conn, alice, At::Time(later)).unwrap().balance_minor,
        balance(&mut conn, alice)
    );
    // A line's own time includes it.
    let last = lines.last().unwrap();
    assert_eq!(
        history::balance_at(&mut conn, alice, At::Time(last.created_at)).unwrap().balance_minor,
        last.balance_after_minor
    );
}

#[testing::test]
fn an_unknown_account_is_not_found_and_an_empty_one_has_an_empty_history() {
    testing::with_rollback(|conn| {
        let missing = AccountId::new(987_654_321).unwrap();
        assert!(matches!(history::page(conn, missing, None, 10), Err(LedgerError::UnknownAccount(a)) if a == missing));
        let at = history::balance_at(conn, missing, At::Time(SystemTime::now()));
        assert!(matches!(at, Err(LedgerError::UnknownAccount(a)) if a == missing));
        let at = history::balance_at(conn, missing, At::Entry(EntryId::new(1).unwrap()));
        assert!(matches!(at, Err(LedgerError::UnknownAccount(_))));
        let empty = accounts::open(conn, &NewAccount::new("nobody", Currency::EUR), None).unwrap().id;
        assert!(history::page(conn, empty, None, 10).unwrap().is_empty());
        assert_eq!(history::balance_at(conn, empty, At::Time(SystemTime::now())).unwrap().balance_minor, 0);
        assert!(matches!(history::page(conn, empty, None, 0), Err(LedgerError::Invalid(_))));
    });
}

#[derive(QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = diesel::sql_types::Text)]
    #[diesel(column_name = "QUERY PLAN")]
    line: String,
}

#[testing::test]
fn a_page_and_a_balance_read_the_account_index_never_the_table() {
    let db = testing::committed();
    let mut conn = db.conn();
    let alice = testing::funded_account(&mut conn, "alice", Currency::EUR, "500.00");
    let bob = testing::funded_account(&mut conn, "bob", Currency::EUR, "20.00");
    movements(&mut conn, alice, bob, 20);
    let plan = |conn: &mut PgConnection, sql: &str, params: &[i64]| -> String {
        ledger_core::transaction(conn, &ledger_core::TxOptions::default(), |t| {
            ledger_core::tx::with_batch_plans(t, |t| {
                let query = diesel::sql_query(format!("EXPLAIN {sql}"));
                let lines: Vec<PlanLine> = match params {
                    [a, b] => query.bind::<BigInt, _>(a).bind::<BigInt, _>(b).load(t.conn())?,
                    [a, b, c] => query.bind::<BigInt, _>(a).bind::<BigInt, _>(b).bind::<BigInt, _>(c).load(t.conn())?,
                    _ => unreachable!(),
                };
                Ok::<_, LedgerError>(lines.into_iter().map(|l| l.line).collect::<Vec<_>>().join("\n"))
            })
        })
        .unwrap()
    };
    let page = plan(&mut conn, history::PAGE_SQL, &[alice.get(), 3, 100]);
    let at_entry = plan(&mut conn, history::BALANCE_AT_ENTRY_SQL, &[alice.get(), 5]);
    let at_time = plan(&mut conn, history::BALANCE_AT_TIME_SQL, &[alice.get(), 1_000_000]);
    for (name, text) in [("page", &page), ("balance at entry", &at_entry), ("balance at time", &at_time)] {
        assert!(!text.contains("Seq Scan") && !text.contains("Bitmap"), "{name} scans a table:\n{text}");
        assert!(text.contains("postings_account_id_id_idx"), "{name} reads the account's postings by index:\n{text}");
    }
    // The page reads the postings after the cursor in index order, LIMIT on the scan.
    assert!(page.contains("Limit"), "{page}");
}
