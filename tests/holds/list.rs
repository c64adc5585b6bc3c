//! `holds::list`: an account's holds as payer or payee, filtered by status, paged by a
//! cursor that chains exactly; bad queries are typed errors.

use super::*;
use ledger_core::holds::{HoldQuery, MAX_HOLD_PAGE};

fn query(account: AccountId) -> HoldQuery {
    HoldQuery { account, status: None, after: None, limit: 100 }
}

fn ids(holds: &[holds::Hold]) -> Vec<HoldId> {
    holds.iter().map(|h| h.id).collect()
}

#[testing::test]
fn an_accounts_holds_are_listed_as_payer_and_payee_filtered_and_paged() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "100.00");
        let b = testing::funded_account(conn, "b", Currency::EUR, "100.00");
        let c = testing::funded_account(conn, "c", Currency::EUR, "100.00");
        let a_to_b = hold(conn, a, b, "1.00").hold.id;
        let b_to_a = hold(conn, b, a, "2.00").hold.id;
        let b_to_c = hold(conn, b, c, "3.00").hold.id; // not a's
        let posted = hold(conn, a, c, "4.00").hold.id;
        holds::post(conn, posted, None, &key("post")).unwrap();
        let voided = hold(conn, c, a, "5.00").hold.id;
        holds::void(conn, voided, &key("void")).unwrap();

        let all = holds::list(conn, &query(a)).unwrap();
        assert_eq!(ids(&all), [a_to_b, b_to_a, posted, voided], "payer and payee, in id order, no one else's");
        assert_eq!(ids(&holds::list(conn, &query(c)).unwrap()), [b_to_c, posted, voided]);
        let pending = holds::list(conn, &HoldQuery { status: Some(HoldStatus::Pending), ..query(a) }).unwrap();
        assert_eq!(ids(&pending), [a_to_b, b_to_a]);
        let done = holds::list(conn, &HoldQuery { status: Some(HoldStatus::Posted), ..query(a) }).unwrap();
        assert_eq!((ids(&done), done[0].posted_minor), (vec![posted], 400));

        // Pages of two chain exactly: every hold once, none skipped.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = holds::list(conn, &HoldQuery { after, limit: 2, ..query(a) }).unwrap();
            seen.extend(ids(&page));
            match page.last() {
                Some(last) if page.len() == 2 => after = Some(last.id),
                _ => break,
            }
        }
        assert_eq!(seen, ids(&all));
    });
}

#[testing::test]
fn a_bad_query_is_a_typed_error_and_an_unknown_account_is_not_an_empty_page() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "1.00");
        for limit in [0, -1, MAX_HOLD_PAGE + 1] {
            let err = holds::list(conn, &HoldQuery { limit, ..query(a) }).unwrap_err();
            assert_eq!(err.code(), "invalid_input", "limit {limit}: {err}");
        }
        assert!(holds::list(conn, &HoldQuery { limit: MAX_HOLD_PAGE, ..query(a) }).unwrap().is_empty());
        let unknown = AccountId::new(i64::MAX).unwrap();
        assert!(matches!(holds::list(conn, &query(unknown)), Err(LedgerError::UnknownAccount(id)) if id == unknown));
    });
}
