//! Idempotency keys: the same key with the same request returns the first result; the
//! same key with a different request is a conflict; nothing is applied twice.
//!
//! The first request under a key inserts its row inside the operation's transaction. A
//! concurrent request with the same key blocks on that row's unique index entry until
//! the first commits (then it sees the row and replays) or rolls back (then it proceeds
//! as the first). A request that fails rolls back its key with everything else, so a
//! refused request leaves no trace and may be retried under the same key. When a caller
//! joins its own transaction (`op_tx`) and commits after a refusal, the key stays behind
//! without a result; nothing was applied under it, so the next request under that key
//! takes it over as fresh.

use diesel::prelude::*;

use crate::error::LedgerError;
use crate::ids::IdempotencyKey;
use crate::schema::idempotency_keys;
use crate::tx::Tx;

/// What `begin` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begun {
    /// First use of the key: do the work, then call `finish`.
    Fresh,
    /// The key was used before for the same request: here is its result id.
    Replay(i64),
}

/// Claims `key` for `operation` with a canonical description of the request.
pub fn begin(tx: &mut Tx<'_>, key: &IdempotencyKey, operation: &str, fingerprint: &str) -> Result<Begun, LedgerError> {
    // A key row can disappear while this waits for its lock: a batch gives back a key
    // it claimed without a result (`batch_plan`). Then the key is free: claim it again.
    for _ in 0..CLAIM_ATTEMPTS {
        if let Some(begun) = claim_or_read(tx, key, operation, fingerprint)? {
            return Ok(begun);
        }
    }
    Err(LedgerError::Inconsistent(format!(
        "idempotency key {:?} was given back {CLAIM_ATTEMPTS} times while this request waited for it",
        key.as_str()
    )))
}

/// How many times `begin` (and a batch, `batch_plan`) claims a key that keeps being given back meanwhile.
pub(crate) const CLAIM_ATTEMPTS: usize = 8;

/// One try of `begin`: `None` if the key's row was deleted while this waited for it.
fn claim_or_read(
    tx: &mut Tx<'_>,
    key: &IdempotencyKey,
    operation: &str,
    fingerprint: &str,
) -> Result<Option<Begun>, LedgerError> {
    let inserted = diesel::insert_into(idempotency_keys::table)
        .values((
            idempotency_keys::key.eq(key.as_str()),
            idempotency_keys::operation.eq(operation),
            idempotency_keys::request_fingerprint.eq(fingerprint),
        ))
        .on_conflict_do_nothing()
        .execute(tx.conn())?;
    if inserted == 1 {
        return Ok(Some(Begun::Fresh));
    }
    // Locked, so two requests that both find a key without a result (below) take turns:
    // the second reads the first's result once the first commits.
    let stored: Option<(String, String, Option<i64>)> = idempotency_keys::table
        .find(key.as_str())
        .select((idempotency_keys::operation, idempotency_keys::request_fingerprint, idempotency_keys::result_id))
        .for_update()
        .first(tx.conn())
        .optional()?;
    let Some((stored_op, stored_fp, result_id)) = stored else { return Ok(None) };
    let Some(id) = result_id else {
        // A key without a result applied nothing: a `_tx` call under it was refused and
        // the caller's transaction committed anyway (or this transaction claimed it
        // before, for a request that was refused). Nothing was done under it, so it is
        // free: this request takes it over.
        diesel::update(idempotency_keys::table.find(key.as_str()))
            .set((idempotency_keys::operation.eq(operation), idempotency_keys::request_fingerprint.eq(fingerprint)))
            .execute(tx.conn())?;
        return Ok(Some(Begun::Fresh));
    };
    if stored_op != operation || stored_fp != fingerprint {
        return Err(LedgerError::IdempotencyConflict { key: key.as_str().to_string(), operation: stored_op });
    }
    Ok(Some(Begun::Replay(id)))
}

/// Records the result of the work done under `key` (same transaction as `begin`).
pub fn finish(tx: &mut Tx<'_>, key: &IdempotencyKey, result_id: i64) -> Result<(), LedgerError> {
    let updated = diesel::update(idempotency_keys::table.find(key.as_str()))
        .set(idempotency_keys::result_id.eq(Some(result_id)))
        .execute(tx.conn())?;
    assert_eq!(updated, 1, "finish() without begin()");
    Ok(())
}
