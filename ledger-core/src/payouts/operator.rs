//! What an operator does with a failed payout: send it again, or return the money
//! (after a lookup, or forced with a recorded reason); and the return entry itself.

use super::*;

/// Phase 2, refused: a compensating entry returns the funds to the customer, whose
/// account is locked like any other balance change; withdrawal returned with the reason.
pub(super) fn return_tx(
    tx: &mut Tx<'_>,
    payout: &Payout,
    reason: &str,
    forced: Option<&str>,
) -> Result<EntryId, LedgerError> {
    let currency = payout.currency;
    let amount = Amount::from_minor(payout.amount_minor)?;
    let in_transit = system(tx, SystemRole::PayoutsInTransit, currency)?;
    // A returned payout goes back even to a closed account: the money is the customer's.
    let customer = accounts::lock_even_if_closed(tx, payout.account_id)?;
    let after = customer.balance_after_credit(amount)?;
    let entry_ref = format!("payout:{}", payout.id);
    let entry = journal::post(
        tx,
        EntryKind::PayoutReturn,
        Some(&entry_ref),
        currency,
        &[
            Leg { account: in_transit, amount_minor: -amount.minor(), balance_after_minor: None },
            Leg { account: customer.id(), amount_minor: amount.minor(), balance_after_minor: Some(after) },
        ],
    )?;
    accounts::set_balance(tx, &customer, after)?;
    let reason = stored_text(reason, STORED_TEXT_MAX_CHARS);
    diesel::update(payouts::table.find(payout.id))
        .set((
            payouts::status.eq(PayoutStatus::Returned.as_str()),
            payouts::resolution_entry_id.eq(Some(entry.get())),
            payouts::last_error.eq(Some(&reason)),
            payouts::claim_token.eq(None::<i64>),
            payouts::forced_return_reason.eq(forced),
            payouts::updated_at.eq(diesel::dsl::now),
        ))
        .execute(tx.conn())?;
    set_withdrawal(
        tx,
        payout.withdrawal_id.get(),
        WithdrawalStatus::Returned,
        Some(&format!("payout returned: {reason}")),
    )?;
    Ok(entry)
}

/// Operator: send a `failed` payout again (attempts start over).
pub fn retry(conn: &mut PgConnection, id: PayoutId) -> Result<Payout, LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| {
        let updated =
            diesel::update(payouts::table.find(id.get()).filter(payouts::status.eq(PayoutStatus::Failed.as_str())))
                .set((
                    payouts::status.eq(PayoutStatus::Pending.as_str()),
                    payouts::attempts.eq(0),
                    payouts::claim_token.eq(None::<i64>),
                    // Not before the last claim's lease ends: its call may still be at work.
                    payouts::next_attempt_at
                        .eq(diesel::dsl::sql::<diesel::sql_types::Timestamptz>("GREATEST(next_attempt_at, now())")),
                    payouts::updated_at.eq(diesel::dsl::now),
                ))
                .execute(tx.conn())?;
        if updated == 0 {
            return Err(not_failed(tx.conn(), id));
        }
        get(tx.conn(), id)
    })
}

/// How an operator's return of a `failed` payout is authorised.
#[derive(Clone, Copy)]
pub enum ReturnAuthority<'a> {
    /// Ask the gateway first (required when a call may have reached it): a lookup that
    /// says rejected or never received allows the return; one that says accepted
    /// settles the payout instead; anything else refuses to act.
    Lookup(&'a dyn PayoutGateway),
    /// Return without asking, recorded as forced with the operator's reason.
    Force {
        /// Why the operator returns it unasked; stored with the payout.
        reason: &'a str,
    },
}

/// What `return_failed` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReturnResult {
    /// Returned: the customer's money is back on their account (the payout as it is now).
    Returned(Payout),
    /// The lookup said the gateway accepted it: settled, nothing returned.
    SettledInstead(Payout),
}

/// Operator: give up on a `failed` payout and return the funds to the customer. A
/// payout that may have reached the gateway is returned only after a lookup says it was
/// rejected or never received, or when forced (recorded as such).
pub fn return_failed(
    conn: &mut PgConnection,
    id: PayoutId,
    reason: &str,
    authority: ReturnAuthority<'_>,
) -> Result<ReturnResult, LedgerError> {
    let before = get(conn, id)?;
    if before.status != PayoutStatus::Failed {
        return Err(not_failed_err(id, &format!("is {}", before.status)));
    }
    // Its last call may still be at work in the gateway until the claim's lease ends:
    // a lookup before then could miss a payment that lands a moment later.
    let lease_running: bool =
        payouts::table.find(id.get()).select(payouts::next_attempt_at.gt(diesel::dsl::now)).first(conn)?;
    if lease_running && matches!(authority, ReturnAuthority::Lookup(_)) && before.possibly_sent {
        return Err(LedgerError::PayoutState {
            payout: id,
            reason: format!("payout {id}'s last call may still be in flight until its lease ends; try again shortly"),
        });
    }
    // The lookup runs with no transaction open; the decision is re-checked under lock.
    let allowed = allowed_resolution(id, &before, authority)?;
    tx::transaction(conn, &TxOptions::default(), |tx| resolve_locked(tx, id, &before, &allowed, reason))
}

/// What an operator's return may do, as decided before the payout is locked.
enum AllowedResolution {
    /// The lookup said the gateway accepted it: settle, with its reference if it gave one.
    Settle(Option<String>),
    /// Return the funds, recorded as forced with this reason when it was.
    Return { forced: Option<String> },
}

/// What `authority` allows for `before`: a forced return needs a reason; a lookup is
/// made only when a call may have reached the gateway, and an unclear one allows nothing.
fn allowed_resolution(
    id: PayoutId,
    before: &Payout,
    authority: ReturnAuthority<'_>,
) -> Result<AllowedResolution, LedgerError> {
    Ok(match authority {
        ReturnAuthority::Force { reason: why } => {
            if why.trim().is_empty() {
                return Err(LedgerError::Invalid(InvalidInput::BadField {
                    field: "reason",
                    reason: "a forced return needs a reason".into(),
                }));
            }
            AllowedResolution::Return { forced: Some(why.to_string()) }
        }
        ReturnAuthority::Lookup(_) if !before.possibly_sent => AllowedResolution::Return { forced: None },
        ReturnAuthority::Lookup(gateway) => match gateway.lookup(&request_of(before)?) {
            LookupOutcome::Rejected { .. } | LookupOutcome::NotFound => AllowedResolution::Return { forced: None },
            LookupOutcome::Accepted { reference } => AllowedResolution::Settle(reference),
            LookupOutcome::Unknown { error } | LookupOutcome::Unauthorized { error } => {
                return Err(LedgerError::PayoutState {
                    payout: id,
                    reason: format!(
                        "payout {id} may have been paid and the gateway's lookup was unclear ({error}); \
                         nothing returned. Retry it, or return it with --force --reason if you know it was not paid"
                    ),
                });
            }
        },
    })
}

/// Under the payout's lock: still failed and not claimed again since `before` was read
/// (else the lookup no longer speaks for it), then settled or returned as allowed.
fn resolve_locked(
    tx: &mut Tx<'_>,
    id: PayoutId,
    before: &Payout,
    allowed: &AllowedResolution,
    reason: &str,
) -> Result<ReturnResult, LedgerError> {
    let payout: Payout = payouts::table
        .find(id.get())
        .select(Payout::as_select())
        .for_no_key_update()
        .first(tx.conn())
        .optional()?
        .ok_or_else(|| not_failed_err(id, "does not exist"))?;
    if payout.status != PayoutStatus::Failed {
        return Err(not_failed_err(id, &format!("is {}", payout.status)));
    }
    // Claimed again since the lookup (an operator's retry, a dispatcher's call): the
    // lookup no longer speaks for it.
    if (payout.claim_token, payout.attempts) != (before.claim_token, before.attempts) {
        return Err(LedgerError::PayoutState {
            payout: id,
            reason: format!("payout {id} was sent again while it was being looked up; nothing returned"),
        });
    }
    match allowed {
        AllowedResolution::Settle(reference) => {
            settle_all(tx, &[(0, &payout, reference.as_deref())])?;
            Ok(ReturnResult::SettledInstead(get(tx.conn(), id)?))
        }
        AllowedResolution::Return { forced } => {
            return_tx(tx, &payout, reason, forced.as_deref())?;
            Ok(ReturnResult::Returned(get(tx.conn(), id)?))
        }
    }
}

/// The request a stored payout stands for (for a lookup outside a claim).
fn request_of(p: &Payout) -> Result<PayoutRequest, LedgerError> {
    let currency = p.currency;
    Ok(PayoutRequest {
        payout: p.id,
        withdrawal: p.withdrawal_id,
        amount_minor: p.amount_minor,
        amount: currency.format_minor(p.amount_minor),
        currency: p.currency.code().to_string(),
        destination: p.destination.clone(),
        idempotency_key: p.idempotency_key.clone(),
        attempt: p.attempts,
        token: p.claim_token.unwrap_or(0),
        possibly_sent: p.possibly_sent,
    })
}

fn not_failed(conn: &mut PgConnection, id: PayoutId) -> LedgerError {
    match get(conn, id) {
        Ok(p) => not_failed_err(id, &format!("is {}", p.status)),
        Err(e) => e,
    }
}

fn not_failed_err(id: PayoutId, what: &str) -> LedgerError {
    LedgerError::PayoutState {
        payout: id,
        reason: format!("payout {id} {what}; only a failed payout can be retried or returned"),
    }
}
