//! The expiry: pending holds whose timeout has passed are voided (status `expired`),
//! a bounded batch per transaction. The daemon runs it in a loop
//! (`ledger-worker/src/daemon/holds.rs`); an embedding service may run it itself.

use std::collections::{BTreeMap, HashMap};

use diesel::pg::PgConnection;

use crate::accounts::{self, SystemRole};
use crate::error::{InvalidInput, LedgerError};
use crate::ids::{AccountId, EntryId, HoldId};
use crate::journal::EntryKind;
use crate::money::Currency;
use crate::tx::{self, LockSet, Tx, TxOptions};

use super::decide::{decide_resolution, Action};
use super::{store, write_resolution};

/// The most holds one expiry transaction takes: its locks and its time stay bounded.
pub const MAX_EXPIRY_BATCH: usize = 1_000;

/// One hold the expiry voided, and the resulting balance of the one account it touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// The hold, now `expired`.
    pub hold: HoldId,
    /// The entry that returned its amount to the payer.
    pub entry: EntryId,
    /// The payer, credited with the whole amount.
    pub payer: AccountId,
    /// The hold's currency.
    pub currency: Currency,
    /// What went back to the payer (the hold's amount).
    pub returned_minor: i64,
    /// The payer's stored balance right after this hold's return.
    pub payer_balance_minor: i64,
}

/// Voids up to `limit` (1 to [`MAX_EXPIRY_BATCH`]) due holds in a transaction of its
/// own, the earliest deadlines first. Returns what it expired: fewer than `limit` means
/// none was left due (but for holds a post had locked meanwhile, skipped).
pub fn expire_due(conn: &mut PgConnection, limit: usize) -> Result<Vec<Expired>, LedgerError> {
    expire_due_with(conn, &TxOptions::default(), limit)
}

/// [`expire_due`] with the caller's transaction options (the daemon retries in its loop,
/// not inside the call).
pub fn expire_due_with(conn: &mut PgConnection, opts: &TxOptions, limit: usize) -> Result<Vec<Expired>, LedgerError> {
    check_limit(limit)?;
    tx::transaction(conn, opts, |tx| expire_due_tx(tx, limit))
}

/// [`expire_due`] in the caller's transaction.
///
/// The due holds are locked `FOR UPDATE SKIP LOCKED` (a hold a post has locked is left
/// to it), then all their payers at once, in ascending id order, so two expiry rounds
/// never deadlock on each other's accounts; then each hold gets its own entry.
pub fn expire_due_tx(tx: &mut Tx<'_>, limit: usize) -> Result<Vec<Expired>, LedgerError> {
    check_limit(limit)?;
    let due = store::lock_due(tx, limit)?;
    if due.is_empty() {
        return Ok(Vec::new());
    }
    let payers: LockSet = due.iter().map(|h| h.payer).collect();
    let mut locked = BTreeMap::new();
    for id in payers.ids() {
        // Money owed back reaches the payer even if it was closed meanwhile.
        locked.insert(id, accounts::lock_even_if_closed(tx, id)?);
    }
    let mut pending_accounts: HashMap<Currency, AccountId> = HashMap::new();
    let mut out = Vec::with_capacity(due.len());
    for hold in &due {
        let decided = decide_resolution(hold, Action::Expire)?;
        let pending = match pending_accounts.get(&hold.currency) {
            Some(id) => *id,
            None => {
                let id = accounts::system_account(tx.conn(), SystemRole::HoldsPending, hold.currency)?;
                *pending_accounts.entry(hold.currency).or_insert(id)
            }
        };
        let entry = write_resolution(tx, hold, &decided, EntryKind::HoldExpiry, pending, &mut locked)?;
        out.push(Expired {
            hold: hold.id,
            entry,
            payer: hold.payer,
            currency: hold.currency,
            returned_minor: decided.returned_minor,
            payer_balance_minor: locked[&hold.payer].balance_minor(),
        });
    }
    Ok(out)
}

fn check_limit(limit: usize) -> Result<(), LedgerError> {
    if !(1..=MAX_EXPIRY_BATCH).contains(&limit) {
        return Err(LedgerError::Invalid(InvalidInput::BadField {
            field: "limit",
            reason: format!("{limit}: an expiry batch takes 1 to {MAX_EXPIRY_BATCH} holds"),
        }));
    }
    Ok(())
}
