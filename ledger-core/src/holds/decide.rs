//! The decisions of the holds, pure (no database): may this hold be made, and what does
//! a post, a void or an expiry of this hold move. The writes in `mod.rs` and
//! `expire.rs` only carry out what these decide. Tested as tables below.

use crate::accounts::{Account, AccountKind, AccountStatus};
use crate::error::LedgerError;
use crate::money::Money;

use super::{Hold, HoldStatus};

/// May `amount` be held from `payer` for `payee`: both hold its currency, the payee is
/// an open customer account, and the payer stays at or above its floor. Returns the
/// payer's balance once the amount has left it. (`payer` is the locked account: only a
/// usable customer account can be locked, see `accounts::lock`.)
pub fn decide_hold(payer: &Account, payee: &Account, amount: Money) -> Result<i64, LedgerError> {
    if payer.id == payee.id {
        return Err(LedgerError::SameAccount(payer.id));
    }
    if payee.kind == AccountKind::System {
        return Err(LedgerError::SystemAccount(payee.id));
    }
    if payee.status == AccountStatus::Closed {
        return Err(LedgerError::AccountClosed(payee.id));
    }
    payer.expect_currency(amount.currency())?;
    payee.expect_currency(amount.currency())?;
    payer.balance_after_debit(amount.amount())
}

/// What is asked of a pending hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Post it: this much to the payee (`None`: all of it), the rest back to the payer.
    Post(Option<Money>),
    /// Void it: all back to the payer.
    Void,
    /// Its timeout passed: all back to the payer (the expiry loop).
    Expire,
}

/// What a post, void or expiry of one hold moves out of holds-pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// The status the hold ends in.
    pub status: HoldStatus,
    /// To the payee (positive only for a post).
    pub posted_minor: i64,
    /// Back to the payer: the hold's amount minus what was posted.
    pub returned_minor: i64,
}

/// Decides `action` on `hold`, as read under its row lock. Only a pending hold can be
/// resolved, once: the status read under the lock is what makes a post racing the
/// expiry loop end with exactly one winner.
pub fn decide_resolution(hold: &Hold, action: Action) -> Result<Resolution, LedgerError> {
    if hold.status != HoldStatus::Pending {
        return Err(LedgerError::HoldFinished { hold: hold.id, status: hold.status });
    }
    let all = hold.amount_minor;
    let resolution = match action {
        Action::Post(None) => Resolution { status: HoldStatus::Posted, posted_minor: all, returned_minor: 0 },
        Action::Post(Some(amount)) => {
            if amount.currency() != hold.currency {
                return Err(LedgerError::HoldCurrencyMismatch {
                    hold: hold.id,
                    hold_currency: hold.currency,
                    request_currency: amount.currency(),
                });
            }
            if amount.minor() > all {
                return Err(LedgerError::PostExceedsHold {
                    hold: hold.id,
                    currency: hold.currency,
                    held_minor: all,
                    requested_minor: amount.minor(),
                });
            }
            Resolution {
                status: HoldStatus::Posted,
                posted_minor: amount.minor(),
                returned_minor: all - amount.minor(),
            }
        }
        Action::Void => Resolution { status: HoldStatus::Voided, posted_minor: 0, returned_minor: all },
        Action::Expire => {
            if hold.expires_at.is_none() {
                return Err(LedgerError::Inconsistent(format!("hold {} has no timeout to expire by", hold.id)));
            }
            Resolution { status: HoldStatus::Expired, posted_minor: 0, returned_minor: all }
        }
    };
    // Paired with the table's CHECKs: what leaves holds-pending is exactly the amount.
    debug_assert_eq!(resolution.posted_minor + resolution.returned_minor, all);
    debug_assert!(resolution.posted_minor >= 0 && resolution.returned_minor >= 0);
    Ok(resolution)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::ids::{AccountId, EntryId, HoldId};
    use crate::money::Currency;

    fn account(id: i64, currency: Currency, balance_minor: i64, overdraft_minor: i64) -> Account {
        Account {
            id: AccountId::from_db(id),
            owner: format!("o{id}"),
            currency,
            kind: AccountKind::Customer,
            balance_minor,
            overdraft_limit_minor: overdraft_minor,
            status: AccountStatus::Open,
        }
    }

    fn eur(minor: i64) -> Money {
        Money::from_minor(minor, Currency::EUR).unwrap()
    }

    #[test]
    fn a_hold_is_decided_like_a_transfer_from_the_payer() {
        let payer = account(1, Currency::EUR, 10_000, 0);
        let payee = account(2, Currency::EUR, 0, 0);
        let closed = Account { status: AccountStatus::Closed, ..account(3, Currency::EUR, 0, 0) };
        let system = Account { kind: AccountKind::System, ..account(4, Currency::EUR, 0, 0) };
        let yen = account(5, Currency::JPY, 0, 0);
        let overdrawn = account(6, Currency::EUR, 100, 500);
        // (payer, payee, amount, expected: the payer's balance after, or the error's code)
        let table: Vec<(&Account, &Account, Money, Result<i64, &str>)> = vec![
            (&payer, &payee, eur(3_000), Ok(7_000)),
            (&payer, &payee, eur(10_000), Ok(0)),
            (&payer, &payee, eur(10_001), Err("insufficient_funds")),
            (&overdrawn, &payee, eur(600), Ok(-500)),
            (&overdrawn, &payee, eur(601), Err("insufficient_funds")),
            (&payer, &payer, eur(1), Err("same_account")),
            (&payer, &closed, eur(1), Err("account_closed")),
            (&payer, &system, eur(1), Err("system_account")),
            (&payer, &yen, eur(1), Err("currency_mismatch")),
            (&payer, &payee, Money::from_minor(1, Currency::USD).unwrap(), Err("currency_mismatch")),
        ];
        for (i, (payer, payee, amount, expected)) in table.into_iter().enumerate() {
            let got = decide_hold(payer, payee, amount).map_err(|e| e.code());
            assert_eq!(got, expected, "case {i}: {amount} from {} to {}", payer.id, payee.id);
        }
    }

    fn hold(status: HoldStatus, amount_minor: i64, timeout: bool) -> Hold {
        Hold {
            id: HoldId::from_db(9),
            payer: AccountId::from_db(1),
            payee: AccountId::from_db(2),
            currency: Currency::EUR,
            amount_minor,
            posted_minor: 0,
            status,
            expires_at: timeout.then(|| UNIX_EPOCH + Duration::from_secs(60)),
            key: "k".into(),
            hold_entry: EntryId::from_db(1),
            resolution_entry: None,
            created_at: UNIX_EPOCH,
            finished_at: None,
        }
    }

    #[test]
    fn a_pending_hold_resolves_once_into_posted_and_returned_parts() {
        use HoldStatus::*;
        let pending = hold(Pending, 5_000, true);
        let no_timeout = hold(Pending, 5_000, false);
        // (hold, action, expected: (status, posted, returned), or the error's code)
        type Case<'a> = (&'a Hold, Action, Result<(HoldStatus, i64, i64), &'static str>);
        let table: Vec<Case> = vec![
            (&pending, Action::Post(None), Ok((Posted, 5_000, 0))),
            (&pending, Action::Post(Some(eur(5_000))), Ok((Posted, 5_000, 0))),
            (&pending, Action::Post(Some(eur(1_250))), Ok((Posted, 1_250, 3_750))),
            (&pending, Action::Post(Some(eur(1))), Ok((Posted, 1, 4_999))),
            (&pending, Action::Post(Some(eur(5_001))), Err("post_exceeds_hold")),
            (
                &pending,
                Action::Post(Some(Money::from_minor(10, Currency::JPY).unwrap())),
                Err("hold_currency_mismatch"),
            ),
            (&pending, Action::Void, Ok((Voided, 0, 5_000))),
            (&pending, Action::Expire, Ok((Expired, 0, 5_000))),
            (&no_timeout, Action::Void, Ok((Voided, 0, 5_000))),
            (&no_timeout, Action::Expire, Err("inconsistent")),
        ];
        for (i, (h, action, expected)) in table.into_iter().enumerate() {
            let got = decide_resolution(h, action).map(|r| (r.status, r.posted_minor, r.returned_minor));
            assert_eq!(got.map_err(|e| e.code()), expected, "case {i}: {action:?}");
        }
        // A finished hold refuses everything, naming its status.
        for status in [Posted, Voided, Expired] {
            for action in [Action::Post(None), Action::Post(Some(eur(1))), Action::Void, Action::Expire] {
                match decide_resolution(&hold(status, 5_000, true), action) {
                    Err(LedgerError::HoldFinished { status: s, .. }) => assert_eq!(s, status),
                    other => panic!("{status} {action:?}: {other:?}"),
                }
            }
        }
    }
}
