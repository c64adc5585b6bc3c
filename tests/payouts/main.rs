//! Two-phase payouts in ledger-core: settle, return, retry, leases, operator actions.

mod batch_claims;
#[path = "../common/mod.rs"]
mod common;
mod leases;
mod lookups;
mod verdicts;

use std::time::Duration;

use common::{assert_audit_clean, balance, withdrawal};
use diesel::pg::PgConnection;
use ledger_core::accounts::{self, SystemRole};
use ledger_core::payouts::{
    self, LookupOutcome, PayoutGateway, PayoutRequest, PayoutStatus, Recorded, RetryPolicy, ReturnAuthority,
    ReturnResult, SendOutcome, Verdict,
};
use ledger_core::retry::{Backoff, Jitter};
use ledger_core::withdrawals::{self, WithdrawalStatus};
use ledger_core::{AccountId, Currency, WithdrawalId};
use ledger_testdb as testing;

fn system_balance(conn: &mut PgConnection, role: SystemRole) -> i64 {
    let id = accounts::system_account(conn, role, Currency::EUR).unwrap();
    balance(conn, id)
}

/// A customer with `funds` and one processed withdrawal of `amount`; returns both ids.
fn paying_out(conn: &mut PgConnection, funds: &str, amount: &str) -> (AccountId, WithdrawalId) {
    let a = testing::funded_account(conn, "payee", Currency::EUR, funds);
    let w = withdrawals::withdraw(conn, &withdrawal(a, amount, "po")).unwrap();
    assert_eq!(w.status, WithdrawalStatus::PayingOut);
    (a, w.id)
}

fn claim_one(conn: &mut PgConnection, w: WithdrawalId) -> payouts::PayoutRequest {
    claim_one_leased(conn, w, 60_000)
}

/// Claims `w`'s payout with a lease of `lease_ms` (a short one ends at once, as if the
/// claim's last call was long over).
fn claim_one_leased(conn: &mut PgConnection, w: WithdrawalId, lease_ms: u64) -> payouts::PayoutRequest {
    let claimed = payouts::claim_due(conn, 100, lease_ms).unwrap();
    if lease_ms < 100 {
        std::thread::sleep(Duration::from_millis(lease_ms + 5)); // let the short lease end
    }
    claimed.requests.into_iter().find(|r| r.withdrawal == w).expect("the payout is due")
}

/// A gateway that must not be asked to send, and answers every lookup the same way.
struct Lookups(LookupOutcome);

impl PayoutGateway for Lookups {
    fn send(&self, r: &PayoutRequest) -> SendOutcome {
        panic!("an operator's return never sends ({})", r.idempotency_key)
    }
    fn lookup(&self, _: &PayoutRequest) -> LookupOutcome {
        self.0.clone()
    }
}

/// A withdrawal whose payout ended `failed` after calls with unknown outcomes.
fn failed_payout(conn: &mut PgConnection, a: AccountId, amount: &str) -> (WithdrawalId, ledger_core::PayoutId) {
    let w = withdrawals::withdraw(conn, &withdrawal(a, amount, "fp")).unwrap().id;
    let req = claim_one_leased(conn, w, 1);
    let once = RetryPolicy { max_attempts: 1, backoff: Backoff::new(1, 1, Jitter::Half) };
    let timeout = Verdict::Unknown { error: "timeout after sending".into() };
    assert_eq!(payouts::record(conn, &req, &timeout, &once).unwrap(), Recorded::Failed);
    (w, ledger_core::PayoutId::new(req.payout.get()).unwrap())
}
