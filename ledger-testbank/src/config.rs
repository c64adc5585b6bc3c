//! How a bank behaves: its credentials, its limits, and the faults it injects.

use std::collections::HashSet;
use std::time::Duration;

use crate::BankError;

/// Injected faults, in percent of requests (their sum must not exceed 100). One fault at
/// most is drawn per request, from the bank's seeded RNG, after authentication.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Close the connection without an answer and without acting (POST and GET). The
    /// client cannot tell this from a payment whose answer was lost: it must not treat
    /// it as a refusal, and must find out (lookup) before giving the money back.
    pub drop_before_pct: u32,
    /// Answer 503 without acting (POST and GET): an overloaded or failing bank. Neither
    /// paid nor refused.
    pub server_error_pct: u32,
    /// Pay, then close the connection without an answer (POST only): the worst case,
    /// money gone and no word of it. Only a lookup can tell.
    pub pay_then_drop_pct: u32,
    /// Answer 307 with a `Location` header and do nothing (POST and GET): a load
    /// balancer or a moved endpoint. A client following it could POST a payout to a
    /// place nobody vetted; a client reading it as success would settle unpaid money.
    pub redirect_pct: u32,
    /// Pay, then answer `200 OK` with the plain-text body `OK` (POST only): a 2xx that is
    /// not the contract's accepted body, as a proxy or a sloppy bank might send. It must
    /// not be read as paid (nor as refused).
    pub bare_success_pct: u32,
    /// Pay, then answer 200 with an accepted body padded past 64 KiB (POST only): the
    /// client must stop reading at its limit and call the answer unknown, not buffer
    /// without end.
    pub oversized_pct: u32,
    /// Sleep [`Faults::slow_delay`] before acting, then act and answer normally (POST and
    /// GET): a slow bank, for timeouts. The call stays in flight while the bank sleeps,
    /// even if the client gave up: a client that then calls again for the same key
    /// overlaps it (a [`crate::Violation::Overlap`]), and a lookup made meanwhile
    /// truthfully answers 404 although the payment lands a moment later.
    pub slow_pct: u32,
    pub slow_delay: Duration,
}

impl Faults {
    pub fn none() -> Faults {
        Faults::default()
    }

    /// Percentages over 100 in sum would make the later faults unreachable in silence.
    pub fn check(&self) -> Result<(), BankError> {
        if self.total() > 100 {
            return Err(BankError::BadConfig(format!("fault percentages add up to more than 100: {self:?}")));
        }
        Ok(())
    }

    fn total(&self) -> u32 {
        self.table().iter().map(|(pct, _)| pct).sum()
    }

    fn table(&self) -> [(u32, Fault); 7] {
        [
            (self.drop_before_pct, Fault::DropBefore),
            (self.server_error_pct, Fault::ServerError),
            (self.pay_then_drop_pct, Fault::PayThenDrop),
            (self.redirect_pct, Fault::Redirect),
            (self.bare_success_pct, Fault::BareSuccess),
            (self.oversized_pct, Fault::Oversized),
            (self.slow_pct, Fault::Slow),
        ]
    }

    /// Always one roll per request (also with no faults), so a seed gives the same
    /// sequence of faults whatever was configured before.
    pub(crate) fn draw(&self, rng: &mut fastrand::Rng) -> Fault {
        let roll = rng.u32(0..100);
        let mut upto = 0;
        for (pct, fault) in self.table() {
            upto += pct;
            if roll < upto {
                return fault;
            }
        }
        Fault::None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    None,
    DropBefore,
    ServerError,
    PayThenDrop,
    Redirect,
    BareSuccess,
    Oversized,
    Slow,
}

/// How a POST for a key already paid (a replay) is answered. It is never paid again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// 200 `{"status":"accepted","reference":<the first reference>}`: a bank that honours
    /// idempotency keys the friendly way.
    Accepted,
    /// This status (e.g. 409, or 422 "duplicate"): legal, and nasty. A client that takes
    /// a 4xx to a replay as a refusal would give back money that was paid; it must look
    /// the key up first.
    Status(u16),
}

#[derive(Clone, Debug)]
pub struct BankConfig {
    pub token: String,
    pub secret: String,
    /// Seeds the fault RNG: the same seed and the same order of requests give the same
    /// faults.
    pub seed: u64,
    pub faults: Faults,
    pub replay: Replay,
    /// Destinations (IBANs) refused with 422, every time.
    pub refused_destinations: HashSet<String>,
    /// Connections served at once, one thread each; the rest wait in the listen backlog.
    pub max_connections: usize,
    /// Serve several requests per connection (HTTP/1.1 keep-alive), as a pooled client
    /// expects of a fast bank; otherwise every answer says `Connection: close`.
    pub keep_alive: bool,
    /// Longest wait for a request's bytes (the first request of a connection from its
    /// accept, later ones from their first byte), so a stuck or slow client cannot hold
    /// a connection thread for longer. Also the write timeout.
    pub read_timeout: Duration,
    /// A kept-alive connection idle this long between requests is closed.
    pub idle_timeout: Duration,
    /// How long the bank "works" on every authenticated call before acting.
    pub delay: Duration,
    /// The status of a first, accepted payment (200 or 201: both are the contract's).
    pub accepted_status: u16,
    /// References are this prefix and a count from 1.
    pub reference_prefix: String,
    /// Signatures further than this from the bank's clock are refused (replay defence).
    pub max_signature_age: Duration,
}

impl Default for BankConfig {
    /// The tests' bank: one request per connection, at most eight at once, no faults.
    fn default() -> BankConfig {
        BankConfig {
            token: "bank-test-token".into(),
            secret: "bank-test-signing-secret".into(),
            seed: 1,
            faults: Faults::none(),
            replay: Replay::Accepted,
            refused_destinations: HashSet::new(),
            max_connections: 8,
            keep_alive: false,
            read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            delay: Duration::ZERO,
            accepted_status: 201,
            reference_prefix: "bank-ref-".into(),
            max_signature_age: Duration::from_secs(300),
        }
    }
}

impl BankConfig {
    /// The bench's bank: keep-alive, up to 256 connections at once, every call answered
    /// after `delay`, no faults; so that the bench measures the worker, not the bank.
    pub fn fast(token: &str, secret: &str, delay: Duration) -> BankConfig {
        BankConfig {
            token: token.to_string(),
            secret: secret.to_string(),
            max_connections: 256,
            keep_alive: true,
            delay,
            accepted_status: 200,
            reference_prefix: "bench-bank-".into(),
            ..BankConfig::default()
        }
    }

    pub(crate) fn check(&self) -> Result<(), BankError> {
        self.faults.check()?;
        if self.max_connections == 0 {
            return Err(BankError::BadConfig("the bank needs room for at least one connection".into()));
        }
        if !(200..300).contains(&self.accepted_status) {
            return Err(BankError::BadConfig(format!("accepted_status {} is not a 2xx", self.accepted_status)));
        }
        Ok(())
    }
}
