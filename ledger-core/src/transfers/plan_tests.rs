//! `plan` as tables: a batch (transfers, links), what the keys and accounts were, and
//! the expected result of each item and the final balances.

use super::*;
use crate::accounts::{Account, AccountKind, AccountStatus};
use crate::ids::IdempotencyKey;
use crate::money::{Currency, Money};

/// Accounts 1..=3 (EUR, 100.00 each; 3 may overdraw by 50.00), 4 (JPY), 5 closed.
fn accounts() -> HashMap<AccountId, Result<LockedAccount, LedgerError>> {
    let open = |id: i64, currency, balance_minor, overdraft_limit_minor| {
        let account = Account {
            id: AccountId::from_db(id),
            owner: format!("owner-{id}"),
            currency,
            kind: AccountKind::Customer,
            balance_minor,
            overdraft_limit_minor,
            status: AccountStatus::Open,
        };
        (AccountId::from_db(id), Ok(LockedAccount::for_tests(account)))
    };
    let mut all: HashMap<_, _> = [
        open(1, Currency::EUR, 10_000, 0),
        open(2, Currency::EUR, 10_000, 0),
        open(3, Currency::EUR, 10_000, 5_000),
        open(4, Currency::JPY, 10_000, 0),
    ]
    .into_iter()
    .collect();
    all.insert(AccountId::from_db(5), Err(LedgerError::AccountClosed(AccountId::from_db(5))));
    all.insert(AccountId::from_db(6), Err(LedgerError::UnknownAccount(AccountId::from_db(6))));
    all
}

/// (from, to, amount in minor units, key, linked)
type Row = (i64, i64, i64, &'static str, bool);

fn items(rows: &[Row]) -> Vec<Item<Transfer>> {
    rows.iter()
        .map(|&(from, to, amount, key, linked)| Item {
            request: Transfer {
                from: AccountId::from_db(from),
                to: AccountId::from_db(to),
                amount: Money::from_minor(amount, Currency::EUR).unwrap(),
                key: IdempotencyKey::new(key).unwrap(),
                metadata: None,
            },
            linked,
        })
        .collect()
}

/// Every key fresh, except "old" (an earlier transfer 1 -> 2 of 1.00, entry 77) and
/// "dep" (a deposit's key).
fn keys(batch: &[Item<Transfer>]) -> HashMap<String, KeyBefore> {
    let mut keys: HashMap<String, KeyBefore> =
        batch.iter().map(|i| (i.request.key.as_str().to_string(), KeyBefore::Fresh)).collect();
    let old = items(&[(1, 2, 100, "old", false)]).remove(0).request;
    for (key, operation, fingerprint) in
        [("old", "transfer", old.fingerprint()), ("dep", "deposit", "account=1|amount=100|currency=EUR".into())]
    {
        if keys.contains_key(key) {
            keys.insert(key.into(), KeyBefore::Stored { operation: operation.into(), fingerprint, result: Some(77) });
        }
    }
    keys
}

/// Each item's result in short: "create a->b" with balances, "replay 77", "replay #i",
/// or the refusal's code.
fn short(p: &Planned) -> String {
    match p {
        Planned::Create { from_after_minor, to_after_minor } => format!("{from_after_minor}/{to_after_minor}"),
        Planned::Replay(e) => format!("replay {}", e.get()),
        Planned::ReplayOf(i) => format!("replay #{i}"),
        Planned::Refuse(e) => e.code().to_string(),
    }
}

/// (case, the batch, each item's result, the final balances (account, minor units))
type Case = (&'static str, &'static [Row], &'static [&'static str], &'static [(i64, i64)]);

#[test]
fn a_batch_is_decided_item_by_item_and_a_linked_chain_as_a_whole() {
    #[rustfmt::skip]
    let table: &[Case] = &[
        ("one transfer", &[(1, 2, 2_500, "a", false)], &["7500/12500"], &[(1, 7_500), (2, 12_500)]),
        ("later items see earlier balances",
            &[(1, 2, 6_000, "a", false), (1, 2, 6_000, "b", false), (2, 1, 1_000, "c", false)],
            &["4000/16000", "insufficient_funds", "15000/5000"], &[(1, 5_000), (2, 15_000)]),
        ("a refused item fails alone",
            &[(1, 1, 100, "a", false), (1, 5, 100, "b", false), (1, 6, 100, "c", false), (1, 4, 100, "d", false), (1, 2, 100, "e", false)],
            &["same_account", "account_closed", "unknown_account", "currency_mismatch", "9900/10100"], &[(1, 9_900), (2, 10_100)]),
        ("overdraft down to the floor, not past it",
            &[(3, 1, 15_000, "a", false), (3, 1, 1, "b", false)], &["-5000/25000", "insufficient_funds"], &[(1, 25_000), (3, -5_000)]),
        ("a linked chain succeeds together",
            &[(1, 2, 1_000, "a", true), (2, 3, 1_000, "b", false)], &["9000/11000", "10000/11000"], &[(1, 9_000), (2, 10_000), (3, 11_000)]),
        ("a linked chain fails together, and is undone",
            &[(1, 2, 1_000, "a", true), (2, 3, 50_000, "b", false), (1, 2, 10_000, "c", false)],
            &["linked_item_failed", "insufficient_funds", "0/20000"], &[(1, 0), (2, 20_000)]),
        ("a chain left open at the end is refused whole",
            &[(1, 2, 100, "a", false), (1, 2, 100, "b", true), (1, 2, 100, "c", true)],
            &["9900/10100", "linked_chain_open", "linked_chain_open"], &[(1, 9_900), (2, 10_100)]),
        ("a stored key with the same request replays, with another is a conflict",
            &[(1, 2, 100, "old", false), (1, 2, 999, "old", false), (1, 2, 100, "dep", false)],
            &["replay 77", "idempotency_conflict", "idempotency_conflict"], &[]),
        ("a key used twice in one batch: the second replays the first, or conflicts",
            &[(1, 2, 100, "a", false), (1, 2, 100, "a", false), (1, 2, 200, "a", false)],
            &["9900/10100", "replay #0", "idempotency_conflict"], &[(1, 9_900), (2, 10_100)]),
        ("a key whose first item was refused is free for a later one",
            &[(1, 2, 20_000, "a", false), (1, 2, 100, "a", false)], &["insufficient_funds", "9900/10100"], &[(1, 9_900), (2, 10_100)]),
        ("a key created in a failed chain is free again",
            &[(1, 2, 100, "a", true), (1, 1, 1, "b", false), (1, 2, 100, "a", false)],
            &["linked_item_failed", "same_account", "9900/10100"], &[(1, 9_900), (2, 10_100)]),
    ];
    for (name, rows, expected, balances) in table {
        let batch = items(rows);
        let keys = keys(&batch);
        let mut locked = accounts();
        let plan = plan(&batch, &keys, &mut locked);
        let got: Vec<String> = plan.items.iter().map(short).collect();
        assert_eq!(got, *expected, "{name}");
        let mut got_balances: Vec<(i64, i64)> = plan.balances.iter().map(|(a, b)| (a.get(), *b)).collect();
        got_balances.sort();
        let mut want: Vec<(i64, i64)> = balances.to_vec();
        // A failed chain may list an account it touched, at its unchanged balance.
        got_balances.retain(|(a, b)| want.iter().any(|(w, _)| w == a) || *b != 10_000);
        want.sort();
        assert_eq!(got_balances, want, "{name}: final balances");
    }
}

#[test]
fn keys_claimed_but_not_used_are_given_back() {
    let batch = items(&[(1, 2, 100, "a", false), (1, 1, 100, "b", false), (1, 2, 100, "old", false)]);
    let keys = keys(&batch);
    let plan = plan(&batch, &keys, &mut accounts());
    assert_eq!(plan.unused_keys, vec!["b".to_string()], "a refused item's fresh key; not a stored one");
}
