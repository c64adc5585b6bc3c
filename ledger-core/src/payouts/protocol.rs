//! What a gateway's answer means: the outcomes of a send and a lookup, the gateway
//! trait, and [`resolve`], the one function that turns them into a verdict.

use super::*;

/// The answer to a payout's POST, read under the gateway's contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Unambiguously paid.
    Accepted {
        /// The gateway's reference for the payment, if it gave one (stored on the
        /// payout, cut to 200 characters).
        reference: Option<String>,
    },
    /// Unambiguously refused (for example the bank refuses the account).
    Rejected {
        /// Why, as the gateway said it: stored on the payout and the withdrawal.
        reason: String,
    },
    /// Anything else: timeout, connection lost, 5xx, a redirect, a body we don't expect.
    /// It may have been paid: find out before acting.
    Unknown {
        /// What happened, for the payout's `last_error`.
        error: String,
    },
    /// Our credentials were refused (401/403). Says nothing about the payout.
    Unauthorized {
        /// The gateway's answer, for the round's report and the payout's `last_error`.
        error: String,
    },
}

/// The answer to a lookup of an earlier call by its idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupOutcome {
    /// An earlier call with this key was paid.
    Accepted {
        /// The gateway's reference for the payment, if it gave one.
        reference: Option<String>,
    },
    /// An earlier call with this key was refused, finally.
    Rejected {
        /// Why, as the gateway said it.
        reason: String,
    },
    /// The gateway never received a call with this key.
    NotFound,
    /// The lookup itself failed or was unclear: nothing is known.
    Unknown {
        /// What happened, for the payout's `last_error`.
        error: String,
    },
    /// Our credentials were refused (401/403). Says nothing about the payout.
    Unauthorized {
        /// The gateway's answer.
        error: String,
    },
}

/// Sends money out, and answers what became of an earlier call. Implementations must
/// be idempotent per `idempotency_key` or sit in front of a service that is. Called
/// with no database transaction open.
pub trait PayoutGateway: Send + Sync {
    /// Asks the gateway to pay `request`, under its `idempotency_key`. Must return
    /// within the dispatcher's `call_timeout_ms`; anything short of an unambiguous
    /// answer is [`SendOutcome::Unknown`].
    fn send(&self, request: &PayoutRequest) -> SendOutcome;
    /// Asks what became of earlier calls with `request.idempotency_key`, without
    /// sending anything. The same time limit as [`PayoutGateway::send`].
    fn lookup(&self, request: &PayoutRequest) -> LookupOutcome;
}

/// What this claim learnt about one payout: the single decision the recording acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Settle.
    Paid {
        /// The gateway's reference for the payment, if it gave one.
        reference: Option<String>,
    },
    /// Return the funds (a first call refused, or a lookup confirmed it).
    Refused {
        /// The gateway's reason, stored on the payout and the withdrawal.
        reason: String,
    },
    /// Not known: try again later (a lookup comes first next time).
    Unknown {
        /// What happened, stored as the payout's `last_error`.
        error: String,
    },
    /// Our credentials were refused: nothing is known; the dispatcher stops. The
    /// payout is tried again without using up an attempt.
    Unauthorized {
        /// The gateway's answer.
        error: String,
    },
    /// No call sent money in this claim (no time left in the lease, or shutting down):
    /// give the claim back.
    NotSent,
}

/// Decides one claimed payout by calling the gateway: the whole protocol, in one place.
///
/// - never sent before: POST. Accepted -> Paid; Rejected -> Refused (a first call's
///   refusal is final); anything else -> Unknown.
/// - possibly sent before: look it up first. Accepted -> Paid; Rejected -> Refused;
///   NotFound -> POST, and a refusal of that POST is believed only after a second
///   lookup says rejected or not found (the earlier call may still have landed).
///
/// `may_call` is asked before every call; it says whether the lease leaves room for
/// one more call to finish. A payout whose POST was never made comes back `NotSent`.
pub fn resolve(gateway: &dyn PayoutGateway, request: &PayoutRequest, may_call: &dyn Fn() -> bool) -> Verdict {
    if request.possibly_sent {
        if !may_call() {
            return Verdict::NotSent;
        }
        match gateway.lookup(request) {
            LookupOutcome::Accepted { reference } => return Verdict::Paid { reference },
            LookupOutcome::Rejected { reason } => return Verdict::Refused { reason },
            LookupOutcome::Unknown { error } => return Verdict::Unknown { error: format!("lookup: {error}") },
            LookupOutcome::Unauthorized { error } => return Verdict::Unauthorized { error },
            LookupOutcome::NotFound => {}
        }
    }
    if !may_call() {
        return Verdict::NotSent;
    }
    match gateway.send(request) {
        SendOutcome::Accepted { reference } => Verdict::Paid { reference },
        SendOutcome::Unknown { error } => Verdict::Unknown { error },
        SendOutcome::Unauthorized { error } => Verdict::Unauthorized { error },
        SendOutcome::Rejected { reason } if !request.possibly_sent => Verdict::Refused { reason },
        SendOutcome::Rejected { reason } => {
            // A replay of a key an earlier call paid may be answered with a 4xx: ask.
            if !may_call() {
                return Verdict::Unknown { error: format!("refused ({reason}), not yet confirmed by a lookup") };
            }
            match gateway.lookup(request) {
                LookupOutcome::Rejected { reason: confirmed } => Verdict::Refused { reason: confirmed },
                LookupOutcome::NotFound => Verdict::Refused { reason },
                LookupOutcome::Accepted { reference } => Verdict::Paid { reference },
                LookupOutcome::Unknown { error } => {
                    Verdict::Unknown { error: format!("refused ({reason}), lookup unclear: {error}") }
                }
                LookupOutcome::Unauthorized { error } => Verdict::Unauthorized { error },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A gateway that plays back scripted answers and records the calls made.
    struct Scripted {
        sends: Mutex<Vec<SendOutcome>>,
        lookups: Mutex<Vec<LookupOutcome>>,
        calls: Mutex<Vec<&'static str>>,
    }

    impl PayoutGateway for Scripted {
        fn send(&self, _: &PayoutRequest) -> SendOutcome {
            self.calls.lock().unwrap().push("send");
            self.sends.lock().unwrap().remove(0)
        }
        fn lookup(&self, _: &PayoutRequest) -> LookupOutcome {
            self.calls.lock().unwrap().push("lookup");
            self.lookups.lock().unwrap().remove(0)
        }
    }

    fn request(possibly_sent: bool) -> PayoutRequest {
        PayoutRequest {
            payout: PayoutId::from_db(1),
            withdrawal: WithdrawalId::from_db(1),
            amount_minor: 100,
            amount: "1.00".into(),
            currency: "EUR".into(),
            destination: "DE89370400440532013000".into(),
            idempotency_key: "payout-x-w1".into(),
            attempt: 1,
            token: 1,
            possibly_sent,
        }
    }

    fn accepted() -> SendOutcome {
        SendOutcome::Accepted { reference: Some("r".into()) }
    }
    fn rejected() -> SendOutcome {
        SendOutcome::Rejected { reason: "HTTP 422".into() }
    }
    fn unknown() -> SendOutcome {
        SendOutcome::Unknown { error: "timeout".into() }
    }
    fn l_accepted() -> LookupOutcome {
        LookupOutcome::Accepted { reference: Some("r".into()) }
    }
    fn l_rejected() -> LookupOutcome {
        LookupOutcome::Rejected { reason: "closed".into() }
    }
    fn l_unknown() -> LookupOutcome {
        LookupOutcome::Unknown { error: "HTTP 502".into() }
    }

    #[derive(Debug, PartialEq)]
    enum V {
        Paid,
        Refused,
        Unknown,
        Unauthorized,
        NotSent,
    }

    fn kind(v: &Verdict) -> V {
        match v {
            Verdict::Paid { .. } => V::Paid,
            Verdict::Refused { .. } => V::Refused,
            Verdict::Unknown { .. } => V::Unknown,
            Verdict::Unauthorized { .. } => V::Unauthorized,
            Verdict::NotSent => V::NotSent,
        }
    }

    /// (possibly sent before, send answers, lookup answers, calls allowed, verdict, calls made)
    type Row = (bool, Vec<SendOutcome>, Vec<LookupOutcome>, usize, V, Vec<&'static str>);

    /// What the protocol must do for each mix of earlier sends, answers and lease room.
    fn protocol_table() -> Vec<Row> {
        let unauthorized = || SendOutcome::Unauthorized { error: "HTTP 401".into() };
        vec![
            // A first call: its answer is the verdict; a 4xx is final.
            (false, vec![accepted()], vec![], 9, V::Paid, vec!["send"]),
            (false, vec![rejected()], vec![], 9, V::Refused, vec!["send"]),
            (false, vec![unknown()], vec![], 9, V::Unknown, vec!["send"]),
            (false, vec![unauthorized()], vec![], 9, V::Unauthorized, vec!["send"]),
            // Possibly sent before: look it up before sending again.
            (true, vec![], vec![l_accepted()], 9, V::Paid, vec!["lookup"]),
            (true, vec![], vec![l_rejected()], 9, V::Refused, vec!["lookup"]),
            (true, vec![], vec![l_unknown()], 9, V::Unknown, vec!["lookup"]),
            (true, vec![accepted()], vec![LookupOutcome::NotFound], 9, V::Paid, vec!["lookup", "send"]),
            (true, vec![unknown()], vec![LookupOutcome::NotFound], 9, V::Unknown, vec!["lookup", "send"]),
            // ...and a 4xx to the new send is believed only once a lookup confirms it:
            // a bank may answer a replay of a key it already paid with a 4xx.
            (
                true,
                vec![rejected()],
                vec![LookupOutcome::NotFound, l_accepted()],
                9,
                V::Paid,
                vec!["lookup", "send", "lookup"],
            ),
            (
                true,
                vec![rejected()],
                vec![LookupOutcome::NotFound, l_rejected()],
                9,
                V::Refused,
                vec!["lookup", "send", "lookup"],
            ),
            (
                true,
                vec![rejected()],
                vec![LookupOutcome::NotFound, LookupOutcome::NotFound],
                9,
                V::Refused,
                vec!["lookup", "send", "lookup"],
            ),
            (
                true,
                vec![rejected()],
                vec![LookupOutcome::NotFound, l_unknown()],
                9,
                V::Unknown,
                vec!["lookup", "send", "lookup"],
            ),
            (true, vec![rejected()], vec![LookupOutcome::NotFound], 2, V::Unknown, vec!["lookup", "send"]),
            // No room left in the lease: no call is made, the claim goes back.
            (false, vec![], vec![], 0, V::NotSent, vec![]),
            (true, vec![], vec![], 0, V::NotSent, vec![]),
            (true, vec![], vec![LookupOutcome::NotFound], 1, V::NotSent, vec!["lookup"]),
        ]
    }

    #[test]
    fn the_payout_protocol_pays_on_yes_refunds_on_a_confirmed_no_and_asks_otherwise() {
        for (i, (possibly_sent, sends, lookups, allowed, expected, calls)) in protocol_table().into_iter().enumerate() {
            let gateway =
                Scripted { sends: Mutex::new(sends), lookups: Mutex::new(lookups), calls: Mutex::new(Vec::new()) };
            let left = std::cell::Cell::new(allowed);
            let may_call = || {
                let n = left.get();
                left.set(n.saturating_sub(1));
                n > 0
            };
            let verdict = resolve(&gateway, &request(possibly_sent), &may_call);
            assert_eq!(kind(&verdict), expected, "row {i}: {verdict:?}");
            assert_eq!(*gateway.calls.lock().unwrap(), calls, "row {i}: calls");
        }
    }
}
