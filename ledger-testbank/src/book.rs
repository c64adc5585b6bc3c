//! What the bank does with a request: checks the credentials, pays each key once,
//! answers lookups, injects the configured faults, and records what the client did that
//! it must never do.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::auth::authenticate;
use crate::config::{Fault, Replay};
use crate::http::{percent_decode, Request};
use crate::{lock, Shared, BASE_PATH};

/// Size of the body the `oversized` fault answers with (over the gateway's 16 KiB limit).
const OVERSIZED_BODY: usize = 64 * 1024;

/// A payout the bank paid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    pub key: String,
    pub payout_id: i64,
    pub withdrawal_id: i64,
    pub amount: String,
    pub amount_minor: i64,
    pub currency: String,
    pub destination: String,
    pub reference: String,
}

/// Something the client did that it must never do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two calls for one key were in flight at the same time.
    Overlap { key: String },
    /// A key already used was sent again with a different payout (amount, destination...).
    KeyReused { key: String },
    /// One withdrawal was paid under two keys: money left twice.
    PaidTwice { withdrawal_id: i64, first_key: String, second_key: String },
    /// A request the contract does not allow (missing field, header and body disagree...).
    Malformed { reason: String },
}

#[derive(Default)]
pub(crate) struct Books {
    pub(crate) paid: HashMap<String, Payment>,
    /// key -> reason, for payouts refused with 422.
    pub(crate) refused: HashMap<String, String>,
    /// withdrawal id -> the key it was paid under.
    paid_withdrawals: HashMap<i64, String>,
    next_reference: u64,
}

/// What to do with the connection after handling a request.
pub(crate) enum Answer {
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Close without a word.
    Drop,
    /// Keep the connection open and never answer (the bank is hanging).
    Hold,
}

fn respond(status: u16, body: Value) -> Answer {
    Answer::Respond { status, headers: Vec::new(), body: body.to_string() }
}

/// Where a request goes, read from its method and path alone.
enum Route {
    Pay(String),
    Lookup(String),
    /// Off the contract, and a violation.
    Malformed(String),
    /// Off the contract but no sign of a broken client (e.g. a mistyped URL).
    Refuse(u16, &'static str),
}

fn route(request: &Request) -> Route {
    let lookup = request.path.strip_prefix(BASE_PATH).and_then(|rest| rest.strip_prefix('/'));
    match (request.method.as_str(), lookup) {
        ("POST", _) if request.path == BASE_PATH => match request.header("idempotency-key") {
            Some(key) if !key.is_empty() => Route::Pay(key.to_string()),
            _ => Route::Malformed("POST without an Idempotency-Key header".into()),
        },
        ("GET", Some(segment)) if !segment.is_empty() && !segment.contains('/') => match percent_decode(segment) {
            Some(key) => Route::Lookup(key),
            None => Route::Malformed(format!("bad percent-encoding in {:?}", request.path)),
        },
        _ if request.path == BASE_PATH => Route::Refuse(405, "method not allowed"),
        _ => Route::Refuse(404, "no such resource"),
    }
}

/// The answer to one request. `in_flight` holds the call's key until the caller drops
/// it, just before the answer can reach the client: a client may call again as soon as
/// it has an answer, so holding it any longer would flag honest clients.
pub(crate) fn handle<'a>(shared: &'a Shared, request: &Request, in_flight: &mut Option<InFlight<'a>>) -> Answer {
    let route = route(request);
    if shared.hang.load(Ordering::SeqCst) {
        let key = match &route {
            Route::Pay(key) | Route::Lookup(key) => key.clone(),
            _ => String::new(),
        };
        lock(&shared.hung).push(key);
        return Answer::Hold;
    }
    let config = &shared.config;
    if let Err(why) = authenticate(request, &config.token, &config.secret, config.max_signature_age) {
        shared.counters.auth_failures.fetch_add(1, Ordering::SeqCst);
        return respond(401, json!({ "error": why }));
    }
    let key = match route {
        Route::Pay(key) => {
            shared.counters.posts.fetch_add(1, Ordering::SeqCst);
            key
        }
        Route::Lookup(key) => {
            shared.counters.lookups.fetch_add(1, Ordering::SeqCst);
            key
        }
        Route::Malformed(reason) => return malformed(shared, reason),
        Route::Refuse(status, why) => {
            shared.counters.bad_requests.fetch_add(1, Ordering::SeqCst);
            return respond(status, json!({ "error": why }));
        }
    };
    *in_flight = Some(InFlight::enter(shared, &key));
    let faults = lock(&shared.faults).clone();
    let fault = faults.draw(&mut lock(&shared.rng));
    match fault {
        Fault::DropBefore => return Answer::Drop,
        Fault::ServerError => return respond(503, json!({ "error": "temporarily unavailable" })),
        Fault::Redirect => {
            return Answer::Respond {
                status: 307,
                headers: vec![("Location", format!("{}/moved", shared.url))],
                body: String::new(),
            }
        }
        _ => {}
    }
    let slow = if fault == Fault::Slow { faults.slow_delay } else { Default::default() };
    shared.sleep_unless_stopped(config.delay + slow);
    if request.method == "GET" {
        return lookup(shared, &key);
    }
    pay(shared, request, &key, fault)
}

pub(crate) fn malformed(shared: &Shared, reason: String) -> Answer {
    shared.counters.bad_requests.fetch_add(1, Ordering::SeqCst);
    lock(&shared.violations).push(Violation::Malformed { reason: reason.clone() });
    respond(400, json!({ "error": reason }))
}

fn lookup(shared: &Shared, key: &str) -> Answer {
    let books = lock(&shared.books);
    if let Some(p) = books.paid.get(key) {
        return respond(200, json!({ "status": "accepted", "reference": p.reference }));
    }
    if let Some(reason) = books.refused.get(key) {
        return respond(200, json!({ "status": "rejected", "reason": reason }));
    }
    respond(404, json!({ "status": "not_found", "idempotency_key": key }))
}

fn pay(shared: &Shared, request: &Request, key: &str, fault: Fault) -> Answer {
    let payout = match parse_payout(&request.body, key) {
        Ok(p) => p,
        Err(reason) => return malformed(shared, reason),
    };
    let mut books = lock(&shared.books);
    if let Some(first) = books.paid.get(key) {
        if (Payment { reference: first.reference.clone(), ..payout.clone() }) != *first {
            shared.counters.bad_requests.fetch_add(1, Ordering::SeqCst);
            lock(&shared.violations).push(Violation::KeyReused { key: key.to_string() });
            return respond(409, json!({ "error": "idempotency key reused for a different payout" }));
        }
        shared.counters.replays.fetch_add(1, Ordering::SeqCst);
        return match *lock(&shared.replay) {
            Replay::Accepted => respond(200, json!({ "status": "accepted", "reference": first.reference })),
            Replay::Status(code) => respond(code, json!({ "error": "duplicate idempotency key" })),
        };
    }
    if let Some(reason) = books.refused.get(key) {
        return respond(422, json!({ "error": reason }));
    }
    if shared.config.refused_destinations.contains(&payout.destination) {
        let reason = format!("account {} is closed", payout.destination);
        books.refused.insert(key.to_string(), reason.clone());
        return respond(422, json!({ "error": reason }));
    }
    books.next_reference += 1;
    let reference = format!("{}{}", shared.config.reference_prefix, books.next_reference);
    if let Some(first_key) = books.paid_withdrawals.get(&payout.withdrawal_id) {
        let (withdrawal_id, first_key, second_key) = (payout.withdrawal_id, first_key.clone(), key.to_string());
        lock(&shared.violations).push(Violation::PaidTwice { withdrawal_id, first_key, second_key });
    } else {
        books.paid_withdrawals.insert(payout.withdrawal_id, key.to_string());
    }
    books.paid.insert(key.to_string(), Payment { reference: reference.clone(), ..payout });
    drop(books);
    match fault {
        Fault::PayThenDrop => Answer::Drop,
        Fault::BareSuccess => Answer::Respond { status: 200, headers: Vec::new(), body: "OK".into() },
        Fault::Oversized => {
            respond(200, json!({ "status": "accepted", "reference": reference, "padding": "x".repeat(OVERSIZED_BODY) }))
        }
        _ => respond(shared.config.accepted_status, json!({ "status": "accepted", "reference": reference })),
    }
}

/// The payout in a POST body, checked against the contract.
fn parse_payout(body: &[u8], key: &str) -> Result<Payment, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let text =
        |name: &str| v.get(name).and_then(Value::as_str).map(str::to_string).ok_or(format!("no string {name:?}"));
    let int = |name: &str| v.get(name).and_then(Value::as_i64).ok_or(format!("no integer {name:?}"));
    let payment = Payment {
        key: text("idempotency_key")?,
        payout_id: int("payout_id")?,
        withdrawal_id: int("withdrawal_id")?,
        amount: text("amount")?,
        amount_minor: int("amount_minor")?,
        currency: text("currency")?,
        destination: text("destination")?,
        reference: String::new(),
    };
    if payment.key != key {
        return Err(format!("Idempotency-Key {key:?} and the body's {:?} differ", payment.key));
    }
    if payment.amount_minor <= 0 {
        return Err(format!("amount_minor {} is not positive", payment.amount_minor));
    }
    Ok(payment)
}

/// Counts a call for `key` in flight; a second one at the same time is a violation.
pub(crate) struct InFlight<'a> {
    shared: &'a Shared,
    key: String,
}

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared, key: &str) -> InFlight<'a> {
        let mut in_flight = lock(&shared.in_flight);
        let n = in_flight.entry(key.to_string()).or_insert(0);
        if *n > 0 {
            lock(&shared.violations).push(Violation::Overlap { key: key.to_string() });
        }
        *n += 1;
        InFlight { shared, key: key.to_string() }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.shared.in_flight);
        if let Some(n) = in_flight.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.key);
            }
        }
    }
}
