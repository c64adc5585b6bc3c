//! ledger-core: a synchronous PostgreSQL ledger.
//!
//! Money moves only in balanced journal entries; customer balances change only under a
//! row lock (`SELECT ... FOR UPDATE`) taken inside a transaction, several rows always in
//! ascending id order; every write is idempotent under a caller-supplied key; money
//! leaves only through a payout outbox row written in the debiting transaction.
//!
//! Every operation comes in two forms: `op(conn, ..)` runs its own transaction (retrying
//! transient failures), and `op_tx(tx, ..)` joins the caller's transaction, so an
//! embedding service can combine ledger writes with its own in one commit.
//!
//! # Layout
//!
//! - Values: [`money`] (amounts, currencies), [`ids`], [`input`] (bad input, refused
//!   before the database is touched), [`metadata`] (a caller's JSON object on a transfer).
//! - Storage primitives: [`db`] (pools, sessions), [`tx`] (transactions, savepoints,
//!   ordered lock sets, batch plans), [`columns`] (how ids, currencies and status enums
//!   are stored), `prepared` (statements kept prepared), [`accounts`], [`journal`],
//!   [`idempotency`].
//! - Movements: [`deposits`], [`transfers`], [`withdrawals`]; [`batch`] (many requests in
//!   one transaction, one result each, linked chains). A withdrawal is decided in
//!   one place, [`withdrawals::decide`]; the batch path and the single path both call it.
//!   [`holds`]: two-phase transfers (hold, then post all or part, void, or expire).
//! - Payouts: [`outbox`] (phase 1, written with the debit), [`payouts`] (phase 2: what a
//!   gateway answer means, [`payouts::resolve`], and how it is recorded), [`dispatcher`]
//!   (the round an embedding service runs).
//! - Reading: [`history`] (an account's postings with running balances, paged by a
//!   cursor; its balance at an entry or a moment).
//! - Checks: [`audit`] (the invariants across the database), [`sqlstate`] (errors
//!   classified by SQLSTATE).
//! - Watching: [`stats`] (queue depths and the rates of the last minute, read from
//!   partial indexes).
//!
//! ARCHITECTURE.md at the repository root has the stages and the invariants.

#![warn(missing_docs)]

pub mod accounts;
pub mod audit;
pub mod batch;
mod batch_plan;
pub mod columns;
pub mod db;
pub mod deposits;
pub mod dispatcher;
pub mod error;
pub mod history;
pub mod holds;
pub mod idempotency;
pub mod ids;
pub mod input;
pub mod journal;
pub mod locks;
pub mod metadata;
pub mod money;
pub mod outbox;
pub mod payouts;
pub(crate) mod prepared;

pub mod retry;
/// The Diesel table definitions, generated from `migrations/` by `diesel print-schema`
/// (see `diesel.toml`); never edited by hand.
#[rustfmt::skip]
#[allow(missing_docs)]
pub mod schema;
mod schema_joins;
pub mod sqlstate;
pub mod stats;
pub mod transfers;
pub mod tx;
pub mod withdrawals;

pub use error::{InvalidInput, LedgerError};
pub use ids::{AccountId, EntryId, HoldId, IdempotencyKey, PayoutId, WithdrawalId};
pub use money::{Amount, Currency, Money};
pub use sqlstate::SqlState;
pub use tx::{transaction, LockSet, Tx, TxOptions};
