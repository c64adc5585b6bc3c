//! Holds: two-phase transfers between two customer accounts of one currency, as
//! TigerBeetle's pending transfers. A hold is pending until it is posted (all or part
//! of it to the payee, the rest back to the payer), voided (all back), or expired by
//! the daemon once its optional timeout has passed (all back, status `expired`).
//!
//! # The shape
//!
//! A hold is a real journal entry: [`hold`] moves the amount from the payer to the
//! `holds_pending` system account of its currency, under the payer's row lock and
//! floor check, exactly like a transfer's debit. The payer's stored balance drops at
//! once, so nothing else (a transfer, a withdrawal, another hold) can spend the held
//! money, and every existing debit path stays correct without knowing about holds. A
//! `holds` row records the payer, payee, amount, status, what was posted, the deadline,
//! the caller's key and both entries. [`post`] and [`void`] then move the amount out of
//! holds-pending in one balanced entry each; the audit checks that each currency's
//! holds-pending account holds exactly its pending holds (`audit/holds.rs`).
//!
//! # Balances
//!
//! An account's [`Balance`]: `balance_minor` is its stored balance, what it may spend
//! now (held money has already left it); `pending_debits_minor` is the sum of its
//! pending holds as payer, `pending_credits_minor` as payee. Its posted balance
//! ([`Balance::posted_minor`], as TigerBeetle counts it) is the stored balance plus its
//! pending debits: held money is still the payer's until the hold is posted.
//!
//! # Locks and races
//!
//! `post`, `void` and the expiry take the hold's row first (`SELECT ... FOR UPDATE`),
//! then the accounts they credit, in ascending id order (a `LockSet`). The status read
//! under the row lock decides: a post and the expiry loop racing for one hold end
//! with exactly one of them done and the other refused ([`LedgerError::HoldFinished`])
//! or skipped (the expiry takes rows `FOR UPDATE SKIP LOCKED`, so it never waits for
//! a post in progress, and the next round no longer finds the hold pending). The
//! deadline is when a hold becomes due for expiry, not a deadline for posting: a post
//! that takes the row before the expiry loop wins. A hold takes the payer's row lock
//! only (the payee's balance does not change until the post).
//!
//! Money returned to a payer reaches it even if it was closed meanwhile (as a returned
//! payout does); a post to a payee closed meanwhile is refused, and the hold can still
//! be voided or expire.
//!
//! # Idempotency
//!
//! Every write runs under a caller's key (`idempotency.rs`): the same key with the same
//! request replays the first result (its hold and entry: [`HoldReceipt::replayed`]),
//! the same key with another request is [`LedgerError::IdempotencyConflict`]. A refused
//! write (more than held, a finished hold, another currency, beyond the floor) changes
//! nothing, its key included. The expiry needs no key: the row lock and the status make
//! it happen once.
//!
//! # Withdrawals have this shape already
//!
//! A withdrawal is a hold whose payee is outside the ledger: its debit into
//! payouts-in-transit is the hold (the money leaves the customer at once, under the row
//! lock and floor check, and nothing else can spend it), a settled payout is the post
//! (in transit -> external settlement), a returned payout is the void (a compensating
//! entry back to the customer, even a closed one), and the audit pairs the in-transit
//! account with the open payouts as it pairs holds-pending with the pending holds. The
//! code is not shared beyond the primitives both use (`accounts`, `journal`,
//! `idempotency`, the system accounts): the withdrawal path decides in batches of
//! hundreds in one set-based statement, is resolved by a gateway's answer (never in
//! part, never by a timeout: an unanswered payout may have left, so it is looked up,
//! not voided), and settles a round in one entry per currency. Holds are one request
//! at a time, decided by their caller.
//!
//! # Forms
//!
//! Each write comes as `op(conn, ..)`, its own transaction retried on transient errors
//! ([`crate::tx::transaction`]), and `op_tx(tx, ..)`, which joins the caller's (on an
//! error, roll that transaction or its savepoint back: it may hold the refused key).

// Every public item of the holds has its rustdoc.
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::time::SystemTime;

use diesel::pg::PgConnection;

use crate::accounts::{self, LockedAccount, SystemRole};
use crate::error::LedgerError;
use crate::idempotency::{self, Begun};
use crate::ids::{AccountId, EntryId, HoldId, IdempotencyKey};
use crate::journal::{self, EntryKind, Leg};
use crate::money::{Amount, Currency, Money};
use crate::tx::{self, LockSet, Tx, TxOptions};

mod balance;
mod decide;
mod expire;
mod list;
pub(crate) mod status;
mod store;
mod timeout;

pub use balance::{balance, pending_minor, Balance};
pub use decide::{decide_hold, decide_resolution, Action, Resolution};
pub use expire::{expire_due, expire_due_tx, expire_due_with, Expired, MAX_EXPIRY_BATCH};
pub use list::{list, HoldQuery, MAX_HOLD_PAGE};
pub use status::HoldStatus;
pub use timeout::Timeout;

/// A request to hold `amount` from one account for another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldRequest {
    /// The payer: the account the amount is held from (it leaves its balance now).
    pub from: AccountId,
    /// The payee: the account a post credits.
    pub to: AccountId,
    /// How much, in which currency; both accounts must hold that currency.
    pub amount: Money,
    /// After this long a still-pending hold is voided by the expiry loop (status
    /// `expired`); `None`: it stays pending until posted or voided.
    pub timeout: Option<Timeout>,
    /// The caller's idempotency key.
    pub key: IdempotencyKey,
}

impl HoldRequest {
    /// The request as its idempotency key remembers it.
    fn fingerprint(&self) -> String {
        let timeout = self.timeout.map_or_else(|| "none".to_string(), |t| t.as_ms().to_string());
        format!(
            "from={}|to={}|amount={}|currency={}|timeout_ms={timeout}",
            self.from,
            self.to,
            self.amount.minor(),
            self.amount.currency()
        )
    }
}

/// A hold as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// Its id.
    pub id: HoldId,
    /// The account the amount was held from.
    pub payer: AccountId,
    /// The account a post credits.
    pub payee: AccountId,
    /// The currency of the hold and of both accounts.
    pub currency: Currency,
    /// What was held, in minor units.
    pub amount_minor: i64,
    /// What a post moved to the payee (0 unless posted).
    pub posted_minor: i64,
    /// Where it is in its life.
    pub status: HoldStatus,
    /// When the expiry loop voids it if it is still pending; `None`: never.
    pub expires_at: Option<SystemTime>,
    /// The idempotency key it was made under.
    pub key: String,
    /// The entry that moved the amount into holds-pending.
    pub hold_entry: EntryId,
    /// The entry that moved it out (post, void or expiry), once finished.
    pub resolution_entry: Option<EntryId>,
    /// When it was made.
    pub created_at: SystemTime,
    /// When it was posted, voided or expired.
    pub finished_at: Option<SystemTime>,
}

impl Hold {
    /// What was held, with its currency.
    pub fn amount(&self) -> Money {
        Money::from_minor(self.amount_minor, self.currency).expect("a hold's amount is positive (CHECK)")
    }

    /// What went back to the payer: the rest of a post, all of a void or an expiry,
    /// nothing while pending.
    pub fn returned_minor(&self) -> i64 {
        match self.status {
            HoldStatus::Pending => 0,
            _ => self.amount_minor - self.posted_minor,
        }
    }
}

/// What a hold, post or void answers: the hold, the entry the write made, whether it
/// was a replay, and the resulting balances of both parties. For a fresh write they are
/// read in its transaction, right after it; a replay returns the first call's hold and
/// entry, with the hold's status and the balances as they are now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldReceipt {
    /// The hold after the write.
    pub hold: Hold,
    /// The entry this request wrote (the hold's, or its resolution's).
    pub entry: EntryId,
    /// True when the key had been used for this request before: nothing was written.
    pub replayed: bool,
    /// The payer's balance after the write.
    pub payer: Balance,
    /// The payee's balance after the write.
    pub payee: Balance,
}

/// Reads a hold (no lock); [`LedgerError::UnknownHold`] if there is none.
pub fn get(conn: &mut PgConnection, id: HoldId) -> Result<Hold, LedgerError> {
    store::find(conn, id)
}

/// Holds `req.amount` from `req.from` for `req.to`, in a transaction of its own.
pub fn hold(conn: &mut PgConnection, req: &HoldRequest) -> Result<HoldReceipt, LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| hold_tx(tx, req))
}

/// [`hold`] in the caller's transaction.
pub fn hold_tx(tx: &mut Tx<'_>, req: &HoldRequest) -> Result<HoldReceipt, LedgerError> {
    if req.from == req.to {
        return Err(LedgerError::SameAccount(req.from));
    }
    if let Begun::Replay(id) = idempotency::begin(tx, &req.key, "hold", &req.fingerprint())? {
        let hold = store::find(tx.conn(), HoldId::from_db(id))?;
        let entry = hold.hold_entry;
        return receipt(tx.conn(), hold, entry, true);
    }
    let payer = accounts::lock(tx, req.from)?;
    let payee = accounts::get(tx.conn(), req.to)?;
    let payer_after = decide_hold(payer.account(), &payee, req.amount)?;
    let currency = req.amount.currency();
    let pending = accounts::system_account(tx.conn(), SystemRole::HoldsPending, currency)?;
    let entry = journal::post(
        tx,
        EntryKind::Hold,
        Some(&format!("hold:{}", req.key)),
        currency,
        &[
            Leg { account: payer.id(), amount_minor: -req.amount.minor(), balance_after_minor: Some(payer_after) },
            Leg { account: pending, amount_minor: req.amount.minor(), balance_after_minor: None },
        ],
    )?;
    accounts::set_balance(tx, &payer, payer_after)?;
    let id = store::insert(tx, req, entry)?;
    idempotency::finish(tx, &req.key, id.get())?;
    let hold = store::find(tx.conn(), id)?;
    receipt(tx.conn(), hold, entry, false)
}

/// Posts a pending hold: `amount` of it to the payee (`None`: all of it), the rest back
/// to the payer, in one entry; in a transaction of its own. Refused, with nothing
/// changed: more than held ([`LedgerError::PostExceedsHold`]), another currency
/// ([`LedgerError::HoldCurrencyMismatch`]), a hold no longer pending
/// ([`LedgerError::HoldFinished`]), a payee closed meanwhile.
pub fn post(
    conn: &mut PgConnection,
    hold: HoldId,
    amount: Option<Money>,
    key: &IdempotencyKey,
) -> Result<HoldReceipt, LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| post_tx(tx, hold, amount, key))
}

/// [`post`] in the caller's transaction.
pub fn post_tx(
    tx: &mut Tx<'_>,
    hold: HoldId,
    amount: Option<Money>,
    key: &IdempotencyKey,
) -> Result<HoldReceipt, LedgerError> {
    let amount_text = amount.map_or_else(|| "all".to_string(), |m| format!("{}|currency={}", m.minor(), m.currency()));
    let fingerprint = format!("hold={hold}|amount={amount_text}");
    resolve_tx(tx, hold, Action::Post(amount), key, "hold_post", &fingerprint)
}

/// Voids a pending hold: all of it back to the payer, in one entry; in a transaction of
/// its own. A hold no longer pending is [`LedgerError::HoldFinished`].
pub fn void(conn: &mut PgConnection, hold: HoldId, key: &IdempotencyKey) -> Result<HoldReceipt, LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| void_tx(tx, hold, key))
}

/// [`void`] in the caller's transaction.
pub fn void_tx(tx: &mut Tx<'_>, hold: HoldId, key: &IdempotencyKey) -> Result<HoldReceipt, LedgerError> {
    resolve_tx(tx, hold, Action::Void, key, "hold_void", &format!("hold={hold}"))
}

/// A post or a void under `key`: the hold's row lock, the decision, then the accounts.
fn resolve_tx(
    tx: &mut Tx<'_>,
    id: HoldId,
    action: Action,
    key: &IdempotencyKey,
    operation: &str,
    fingerprint: &str,
) -> Result<HoldReceipt, LedgerError> {
    if let Begun::Replay(stored) = idempotency::begin(tx, key, operation, fingerprint)? {
        let hold = store::find(tx.conn(), HoldId::from_db(stored))?;
        let entry = hold
            .resolution_entry
            .ok_or_else(|| LedgerError::Inconsistent(format!("hold {} was resolved without an entry", hold.id)))?;
        return receipt(tx.conn(), hold, entry, true);
    }
    let hold = store::lock(tx, id)?;
    let decided = decide_resolution(&hold, action)?;
    let mut credited = LockSet::new();
    if decided.posted_minor > 0 {
        credited = credited.with(hold.payee);
    }
    if decided.returned_minor > 0 {
        credited = credited.with(hold.payer);
    }
    let mut locked = lock_credited(tx, &hold, &credited)?;
    let pending = accounts::system_account(tx.conn(), SystemRole::HoldsPending, hold.currency)?;
    let kind = if action == Action::Void { EntryKind::HoldVoid } else { EntryKind::HoldPost };
    let entry = write_resolution(tx, &hold, &decided, kind, pending, &mut locked)?;
    idempotency::finish(tx, key, hold.id.get())?;
    let hold = store::find(tx.conn(), id)?;
    receipt(tx.conn(), hold, entry, false)
}

/// Locks the accounts a resolution credits, in ascending id order: the payer even if it
/// was closed meanwhile (money owed back must reach it), the payee only if usable.
fn lock_credited(
    tx: &mut Tx<'_>,
    hold: &Hold,
    set: &LockSet,
) -> Result<BTreeMap<AccountId, LockedAccount>, LedgerError> {
    let mut locked = BTreeMap::new();
    for id in set.ids() {
        let account = if id == hold.payer { accounts::lock_even_if_closed(tx, id)? } else { accounts::lock(tx, id)? };
        account.expect_currency(hold.currency)?;
        locked.insert(id, account);
    }
    Ok(locked)
}

/// Writes what `decided` moves out of holds-pending (`pending`) for `hold`, locked
/// pending by this transaction, whose credited accounts are in `locked` (their noted
/// balances are kept up to date, for several holds on one account). Returns the entry.
fn write_resolution(
    tx: &mut Tx<'_>,
    hold: &Hold,
    decided: &Resolution,
    kind: EntryKind,
    pending: AccountId,
    locked: &mut BTreeMap<AccountId, LockedAccount>,
) -> Result<EntryId, LedgerError> {
    let mut legs = vec![Leg { account: pending, amount_minor: -hold.amount_minor, balance_after_minor: None }];
    let mut credits = Vec::with_capacity(2);
    for (account, minor) in [(hold.payee, decided.posted_minor), (hold.payer, decided.returned_minor)] {
        if minor == 0 {
            continue;
        }
        let locked_account = locked.get(&account).expect("every credited account is locked");
        let after = locked_account.balance_after_credit(Amount::from_minor(minor)?)?;
        legs.push(Leg { account, amount_minor: minor, balance_after_minor: Some(after) });
        credits.push((account, after));
    }
    let reference = format!("{}:{}", kind.as_str().replace('_', "-"), hold.id);
    let entry = journal::post(tx, kind, Some(&reference), hold.currency, &legs)?;
    for (account, after) in credits {
        let locked_account = locked.get_mut(&account).expect("locked above");
        accounts::set_balance(tx, locked_account, after)?;
        locked_account.note_balance(after);
    }
    store::finish(tx, hold.id, decided, entry)?;
    Ok(entry)
}

fn receipt(conn: &mut PgConnection, hold: Hold, entry: EntryId, replayed: bool) -> Result<HoldReceipt, LedgerError> {
    let payer = balance(conn, hold.payer)?;
    let payee = balance(conn, hold.payee)?;
    Ok(HoldReceipt { hold, entry, replayed, payer, payee })
}
