//! The one place a withdrawal is decided: pure, no database. Every path calls it.

use super::*;

/// What to do with one withdrawal.
#[derive(Debug)]
pub enum Decision {
    /// Take `amount` out of the account, leaving `after_minor`.
    Debit {
        /// The job's amount, checked positive.
        amount: Amount,
        /// The job's currency, which the account holds.
        currency: Currency,
        /// The account's balance after the debit, in minor units; at or above its floor.
        after_minor: i64,
    },
    /// Refuse it, and why (a business refusal, recorded on the job).
    Reject(LedgerError),
}

/// The one place a withdrawal is decided. Pure: it reads no database and writes nothing.
/// `account` is the job's account as this transaction locked it (its balance is what
/// earlier jobs of the same batch left), or why it could not be used (unknown, closed, a
/// system account). Every path calls it: the single withdrawal, the batch's plan and
/// the careful per-job path.
pub fn decide(currency: Currency, amount_minor: i64, account: Result<&accounts::Account, LedgerError>) -> Decision {
    let decided = (|| {
        let account = account?;
        let amount = Amount::from_minor(amount_minor)?;
        account.expect_currency(currency)?;
        let after_minor = account.balance_after_debit(amount)?;
        Ok(Decision::Debit { amount, currency, after_minor })
    })();
    decided.unwrap_or_else(Decision::Reject)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(currency: Currency, balance_minor: i64, overdraft_limit_minor: i64) -> accounts::Account {
        accounts::Account {
            id: AccountId::from_db(7),
            owner: "t".into(),
            currency,
            kind: accounts::AccountKind::Customer,
            balance_minor,
            overdraft_limit_minor,
            status: AccountStatus::Open,
        }
    }

    /// `decide`, as a table: the job (currency, amount), the locked account (currency,
    /// balance, overdraft) or why it is unusable, and the decision (the balance after a
    /// debit, or the refusal's code).
    #[test]
    fn a_withdrawal_is_decided_by_one_pure_function() {
        const EUR: Currency = Currency::EUR;
        const JPY: Currency = Currency::JPY;
        type Case = (&'static str, Currency, i64, Result<(Currency, i64, i64), LedgerError>, Result<i64, &'static str>);
        let max = i64::MAX;
        let cases: Vec<Case> = vec![
            ("funds cover it", EUR, 4_000, Ok((EUR, 10_000, 0)), Ok(6_000)),
            ("down to exactly zero", EUR, 10_000, Ok((EUR, 10_000, 0)), Ok(0)),
            ("one cent short", EUR, 10_001, Ok((EUR, 10_000, 0)), Err("insufficient_funds")),
            ("into the overdraft", EUR, 6_000, Ok((EUR, 1_000, 5_000)), Ok(-5_000)),
            ("past the overdraft", EUR, 6_001, Ok((EUR, 1_000, 5_000)), Err("insufficient_funds")),
            ("the account holds another currency", EUR, 100, Ok((JPY, 10_000, 0)), Err("currency_mismatch")),
            // (A currency the ledger does not know cannot reach here: reading it fails.)
            ("a stored amount that is not positive", EUR, 0, Ok((EUR, 10_000, 0)), Err("invalid_input")),
            ("a balance that would leave i64", EUR, 10, Ok((EUR, -max, max)), Err("balance_overflow")),
            (
                "a closed account",
                EUR,
                100,
                Err(LedgerError::AccountClosed(AccountId::from_db(7))),
                Err("account_closed"),
            ),
            (
                "an unknown account",
                EUR,
                100,
                Err(LedgerError::UnknownAccount(AccountId::from_db(7))),
                Err("unknown_account"),
            ),
            (
                "a system account",
                EUR,
                100,
                Err(LedgerError::SystemAccount(AccountId::from_db(7))),
                Err("system_account"),
            ),
        ];
        for (name, currency, amount_minor, state, expected) in cases {
            let acct = state.map(|(c, balance, overdraft)| account(c, balance, overdraft));
            let got = match decide(currency, amount_minor, acct.as_ref().map_err(rebuild_refusal)) {
                Decision::Debit { amount, after_minor, .. } => {
                    assert_eq!(amount.minor(), amount_minor, "{name}: the amount debited is the job's");
                    Ok(after_minor)
                }
                Decision::Reject(e) => Err(e.code()),
            };
            assert_eq!(got, expected, "{name}");
        }
    }
}
